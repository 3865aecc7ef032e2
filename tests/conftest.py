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
