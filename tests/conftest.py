"""Shared fixtures. Slow tests use the real embedded model (imported once into MLXFT_HOME)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "evals" / "tools.yaml"
DATA = ROOT / "data" / "tools"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The embedded SmolLM2 model folder (float32), imported once per machine."""
    from mlx_ft.models import resolve_model

    return resolve_model(None)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A small slice of the demo data: enough for a few real training steps."""
    out = tmp_path / "data"
    out.mkdir()
    for split, n in (("train", 8), ("valid", 4)):
        lines = (DATA / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def copy_suite(tmp_path: Path, edit=None) -> Path:
    import yaml

    data = yaml.safe_load(SUITE.read_text())
    if edit:
        edit(data)
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def tree_snapshot(root: Path) -> dict:
    """Every file under root with its bytes: to prove a failed command changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


__all__ = ["write_jsonl", "copy_suite", "tree_snapshot", "shutil", "os"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, embedded_model) -> Path:
    """One small real training run shared by the fuse and report tests (4 steps, 2 checkpoints)."""
    from mlx_ft.train import load_config, train

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 16), ("valid", 4)):
        lines = (DATA / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, {"name": "tiny", "data": str(data), "runs_dir": str(root / "runs"), "iters": 6,
                             "save_every": 3, "batch_size": 2, "num_layers": 4, "learning_rate": 2e-3,
                             "max_seq_length": 256})
    train(cfg)
    return root / "runs" / "tiny"


def small_suite(tmp_path: Path, n: int = 3, max_tokens: int = 24) -> Path:
    import yaml

    data = yaml.safe_load(SUITE.read_text())
    data["prompts"] = data["prompts"][:n]
    data["generation"]["max_tokens"] = max_tokens
    data["name"] = "mini"  # results of a cut-down suite must never pass for the full one's
    p = tmp_path / "mini.yaml"
    p.write_text(yaml.safe_dump(data))
    return p
