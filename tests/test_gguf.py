from __future__ import annotations

import json

import pytest

from mlx_ft.errors import ModelError
from mlx_ft.gguf import hf_name, import_gguf
from mlx_ft.models import default_gguf


@pytest.mark.parametrize("gguf,hf", [
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("blk.12.ffn_down.scales", "model.layers.12.mlp.down_proj.scales"),
    ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
    ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
    ("token_embd.biases", "model.embed_tokens.biases"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_qkv.weight", None),
    ("rope_freqs.weight", None),
])
def test_name_mapping(gguf, hf):
    assert hf_name(gguf) == hf


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["native", "float16"])
def test_import_is_strict_and_answers_paris(tmp_path, dtype):
    out = tmp_path / "model"
    report = import_gguf(default_gguf(), out, dtype=dtype)
    assert "paris" in report["verified_answer"].lower()
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True
    assert ("quantization" in config) == (dtype == "native")
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "im_start" in tok_cfg["chat_template"]
    assert report["fingerprint"]["token_ids"]
    # mlx_lm loads it strictly, and a missing tensor is caught rather than silently zero (seed 000)
    import mlx.core as mx
    from mlx_lm.utils import load

    load(str(out))
    weights = mx.load(str(out / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.startswith("model.layers.3.mlp.up_proj.")}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="up_proj"):
        load(str(out))


@pytest.mark.slow
def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="already exists"):
        import_gguf(default_gguf(), out, dtype="native")
    assert (out / "keep.txt").read_text() == "mine"


def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_gguf().read_bytes()[: 1 << 20])
    with pytest.raises(ModelError, match="truncated"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, monkeypatch):
    import mlx.core as mx

    real_load = mx.load

    def fake_load(path, return_metadata=False):
        weights, meta = real_load(str(default_gguf()), return_metadata=True)
        return weights, {**meta, "general.architecture": "qwen2moe"}

    monkeypatch.setattr(mx, "load", fake_load)
    with pytest.raises(ModelError, match="qwen2moe"):
        import_gguf(default_gguf(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
