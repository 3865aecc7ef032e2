"""Shared fixtures. Slow tests use the real embedded model (imported once into MLXFT_HOME)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Parallel workers share the cores: one BLAS thread each, or their OpenBLAS threads (which spin while
    # they wait for work) crowd each other out. Set before mlx is first imported, inherited by children.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core, at most 4, and no more than 6 GiB of memory each (a worker's
    real model, batch KV caches and server children)."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4, int(psutil.virtual_memory().total / 2**30 // 6)))
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


__all__ = ["copy_suite", "os", "shutil", "tree_snapshot", "write_jsonl"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, embedded_model):
    """One small real training run shared by the fuse, eval, pipeline and report tests: 6 steps,
    checkpoints at 3 and 6, the base and both checkpoints scored in the training loop on a 3-prompt
    suite ("mini"). Returns (config, summary)."""
    from mlx_ft.train import load_config, train

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 16), ("valid", 4)):
        lines = (DATA / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, {"name": "tiny", "data": str(data), "runs_dir": str(root / "runs"), "iters": 6,
                             "save_every": 3, "batch_size": 2, "num_layers": 4, "learning_rate": 2e-3,
                             "max_seq_length": 256, "eval_suite": str(small_suite(root, n=3, max_tokens=16)),
                             "eval_during_training": True})
    return cfg, train(cfg)


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    """The shared run's folder (see :func:`trained`)."""
    return trained[0].run_dir


def small_suite(tmp_path: Path, n: int = 3, max_tokens: int = 24) -> Path:
    import yaml

    data = yaml.safe_load(SUITE.read_text())
    data["prompts"] = data["prompts"][:n]
    data["generation"]["max_tokens"] = max_tokens
    data["name"] = "mini"  # results of a cut-down suite must never pass for the full one's
    p = tmp_path / "mini.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def make_hf_cache(hub: Path, repo_id: str, src: Path, commit: str = "0123456789abcdef0123456789abcdef01234567",
                  ref: str = "main") -> Path:
    """huggingface_hub's cache layout for ``src``'s files: ``hub/models--org--name/{refs/<ref>,
    blobs/<id>, snapshots/<commit>/<file> -> ../../blobs/<id>}``. Blobs link to src's files (no copy)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{commit[:8]}{i:04d}"
        blob.symlink_to(f.resolve())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_hf_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face home for this test, with the hub unreachable (HF_HUB_OFFLINE=1)."""
    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


# Tiny random-weight models of each architecture users fine-tune, from mlx-lm's own model classes,
# with the embedded model's tokenizer (so its vocabulary size). Dimensions divide by 64 (quantization groups).
_TINY_COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": 49152,
                "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": True}
TINY_ARCHS = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3"},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "moe_intermediate_size": 64, "norm_topk_prob": True},
    "gemma3_text": {"model_type": "gemma3_text", "query_pre_attn_scalar": 16, "sliding_window": 32,
                    "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0},
    # a mixture of experts that flattens [batch, tokens] before routing (the batched engine must follow)
    "olmoe": {"model_type": "olmoe", "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64},
}


def tiny_model(out: Path, arch: str, tokenizer_src: Path, bits: int | None = None, seed: int = 0) -> Path:
    """Write a tiny random-weight ``arch`` model to ``out`` (``bits``: quantized with mlx-lm, group 64)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, quantize_model, save

    config = {**_TINY_COMMON, **TINY_ARCHS[arch]}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, 64, bits)
    save(out, tokenizer_src, model, _tokenizer(tokenizer_src), config)
    return out


@functools.lru_cache(maxsize=2)
def _tokenizer(src: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(src)
