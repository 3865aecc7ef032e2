"""Model size and peak-memory estimates, checked against what mlx actually allocates (mlx_ft/memory.py)."""

from __future__ import annotations

import pytest

from mlx_ft import memory
from mlx_ft.errors import ModelError
from mlx_ft.memory import check_memory, estimate, model_size

from .conftest import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, embedded_model):
    root = tmp_path_factory.mktemp("mem")
    return {(arch, bits): tiny_model(root / f"{arch}-{bits}", arch, embedded_model, bits)
            for arch in ("llama", "qwen3_moe") for bits in (None, 4)}


def _count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_sizes_come_from_headers_and_match_the_loaded_model(tiny, arch):
    """Parameters counted from the safetensors headers are the float model's, also for its 4-bit
    copy (weights unpacked; qwen3_moe's router is 8-bit there: mixed per-layer bits)."""
    from mlx_lm.utils import load_model

    float_size, q4 = model_size(tiny[(arch, None)]), model_size(tiny[(arch, 4)])
    assert float_size.params == _count(load_model(tiny[(arch, None)])[0])
    assert q4.params == float_size.params
    assert float_size.disk_bytes == sum(p.stat().st_size for p in tiny[(arch, None)].glob("*.safetensors"))
    assert 3.5 < float_size.disk_bytes / q4.disk_bytes < 8  # 32-bit vs 4-bit + scales, embeddings included
    assert (float_size.experts, float_size.layers, float_size.kv_heads, float_size.head_dim) == (
        4 if arch == "qwen3_moe" else 1, 2, 2, 16)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_lora_parameters_are_mlx_lms(tiny, arch):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model = load_model(tiny[(arch, None)])[0]
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 1.0, "dropout": 0.0})
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert memory.lora_params(model_size(tiny[(arch, None)]), 4, 1) == trainable


def test_kv_cache_estimate_is_what_the_cache_holds(tiny):
    """3 rows x 256 tokens (mlx-lm's caches grow in 256-token steps): the estimate is the bytes held."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model = load_model(tiny[("llama", None)])[0]
    cache = make_prompt_cache(model)
    model(mx.zeros((3, 256), dtype=mx.int32), cache=cache)
    held = sum(c.nbytes for c in cache)
    parts = estimate("eval", model_size(tiny[("llama", None)]), rows=3, tokens=256, adapters=0)
    assert parts["kv_cache"] == held


def test_estimates_grow_with_what_drives_them(tiny):
    m = model_size(tiny[("qwen3_moe", 4)])
    small, big = estimate("train", m, batch_size=1, seq_len=512), estimate("train", m, batch_size=4, seq_len=2048)
    assert big["activations"] > 4 * small["activations"] and big["logits"] == 16 * small["logits"]
    assert estimate("eval", m, rows=128)["kv_cache"] == 2 * estimate("eval", m, rows=64)["kv_cache"]
    fuse = estimate("fuse", m)
    assert fuse["weights"] == m.params * m.dtype_bytes > m.disk_bytes  # the base is dequantized to fuse
    for parts in (small, big, fuse):
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_check_memory_logs_and_refuses_before_loading(tiny, monkeypatch):
    path = tiny[("llama", 4)]
    lines = []
    parts = check_memory("eval", path, log=lines.append, available=10**12, rows=8, tokens=512)
    assert "MB on disk" in lines[0] and "eval: estimated peak memory" in lines[1] and parts["total"] > 0
    with pytest.raises(ModelError, match=r"train: estimated peak memory .* it would not fit.*"
                                                      r"largest part is logits: lower batch_size") as e:
        check_memory("train", path, available=10**6, batch_size=8, seq_len=4096)
    assert e.value.exit_code == 2
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert check_memory("train", path, available=10**6)["total"] > 10**6  # the user's call: try anyway


def test_doctor_reports_size_and_whether_each_stage_fits(tiny):
    from mlx_ft.doctor import format_report, memory_report

    path = tiny[("qwen3_moe", 4)]
    roomy, tight = memory_report(path, available=10**12), memory_report(path, available=10**6)
    assert roomy["size_bytes"] == model_size(path).disk_bytes
    assert all(e["fits"] for e in roomy["estimates"].values())
    assert not any(e["fits"] for e in tight["estimates"].values())
    text = format_report({"backend": "cpu", "device": "cpu", "platform": "x", "versions": {}, "blas": "b",
                          "matmul_gflops_512": 1.0, "fix": None,
                          "paths": {"model": {"path": str(path), "present": True, **tight}}})
    assert text.count("DOES NOT FIT") == 3 and "GB on disk" in text
