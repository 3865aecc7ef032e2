"""``mlxft import-gguf``: turn a llama-architecture GGUF into an MLX model folder.

``mx.load`` reads GGUF natively (Q4_0/Q4_1/Q8_0 come back as MLX affine weights with
weight/scales/biases); this module maps llama.cpp names to Hugging Face llama names, rebuilds the
tokenizer from the GGUF vocabulary with ``tokenizers``, and writes a folder that ``mlx_lm.load``,
``mlx_lm.generate`` and ``mlx_lm.server`` use as is. The result is verified by a *strict* load:
every tensor must land on a parameter and every parameter must be filled (a silent
``strict=False`` load hid an architecture mismatch).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from mlx_ft.errors import ModelError
from mlx_ft.files import staged_dir, write_json

GGUF_GROUP_SIZE = 32
DTYPES = ("native", "float32", "float16", "bfloat16")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SUFFIXES = ("weight", "scales", "biases")


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``; None if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", gguf_name)
    if m:
        layer, part, suffix = m.groups()
        if part in _LAYER_NAMES and suffix in _SUFFIXES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
        return None
    m = re.fullmatch(r"(\w+)\.(\w+)", gguf_name)
    if m and m.group(1) in _TOP_NAMES and m.group(2) in _SUFFIXES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _scalar(meta: dict, key: str, path: Path):
    if key not in meta:
        raise ModelError(f"{path}: GGUF metadata has no '{key}'; is this a complete llama GGUF?")
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def build_config(meta: dict, path: Path, quantization: dict | None, tied: bool) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(
            f"{path}: GGUF architecture is {arch!r}; import-gguf supports 'llama' only. "
            "Convert other architectures with their own tools (e.g. mlx_lm.convert from safetensors)."
        )
    p = "llama."
    heads = int(_scalar(meta, p + "attention.head_count", path))
    hidden = int(_scalar(meta, p + "embedding_length", path))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, p + "block_count", path)),
        "intermediate_size": int(_scalar(meta, p + "feed_forward_length", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(p + "rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_scalar(meta, p + "attention.layer_norm_rms_epsilon", path)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        # llama.cpp stores q/k rows permuted for its interleaved RoPE; MLX's traditional RoPE
        # is exactly that layout, so no un-permuting is needed.
        "rope_traditional": True,
        "tie_word_embeddings": tied,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "torch_dtype": "float32",
    }
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def build_tokenizer(meta: dict, path: Path):
    """A ``tokenizers`` BPE tokenizer from the GGUF vocabulary (gpt2-style byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(
            f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; "
            "only byte-level BPE ('gpt2') tokenizers can be rebuilt"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta["tokenizer.ggml.token_type"].tolist()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    # llama.cpp's 'smollm' pre-tokenizer splits digits one by one before the gpt2 regex.
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") in ("smollm", "qwen2", "llama-bpe"):
        steps.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def tok(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i.item() if hasattr(i, "item") else i)] if i is not None else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id") or tok("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def convert_weights(gguf: dict, path: Path, dtype: str) -> tuple[dict, dict | None]:
    """Rename tensors; dequantize to ``dtype`` unless 'native'. Returns (weights, quantization)."""
    import mlx.core as mx

    unknown = sorted(k for k in gguf if hf_name(k) is None)
    if unknown:
        raise ModelError(
            f"{path}: {len(unknown)} tensor(s) have no llama mapping (first: {unknown[:3]}); "
            "the file is not a plain llama model, refusing a partial import"
        )
    weights = {hf_name(k): v for k, v in gguf.items()}
    bases = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")})
    group = GGUF_GROUP_SIZE  # every GGUF block type mx.load reads (Q4_0, Q4_1, Q8_0) has 32 weights
    bits_of = {
        b: weights[f"{b}.weight"].shape[-1] * 32 // (weights[f"{b}.scales"].shape[-1] * group) for b in bases
    }
    if dtype == "native":
        if not bits_of:
            return weights, None
        # llama.cpp mixes block types (e.g. Q8_0 for some layers in a Q4_1 file): the most common
        # width is the default, the others become mlx-lm per-layer overrides.
        bits = max(set(bits_of.values()), key=list(bits_of.values()).count)
        quant: dict = {"group_size": group, "bits": bits}
        quant.update({b: {"group_size": group, "bits": n} for b, n in bits_of.items() if n != bits})
        return weights, quant
    target = getattr(mx, dtype)
    out = {}
    for k, v in weights.items():
        base, suffix = k.rsplit(".", 1)
        if suffix in ("scales", "biases"):
            continue
        if f"{base}.scales" in weights:
            scales, biases = weights[f"{base}.scales"], weights[f"{base}.biases"]
            v = mx.dequantize(v, scales, biases, group_size=group, bits=bits_of[base])
        out[k] = v.astype(target)
    return out, None


def import_gguf(
    gguf_path: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    verify: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Convert, write atomically, then prove the folder loads strictly and answers sensibly."""
    import mlx.core as mx

    gguf_path, out = Path(gguf_path), Path(out)
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: no such GGUF file")
    t0 = time.perf_counter()
    try:
        gguf, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:  # mlx raises ValueError/RuntimeError with the gguflib message
        raise ModelError(f"{gguf_path}: not a readable GGUF file ({e}); is it truncated?") from e
    tied = "output.weight" not in gguf
    weights, quant = convert_weights(gguf, gguf_path, dtype)
    config = build_config(meta, gguf_path, quant, tied)
    tokenizer = build_tokenizer(meta, gguf_path)
    with staged_dir(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        tok_cfg = tokenizer_config(meta)
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        write_json(tmp / "special_tokens_map.json", {k: v for k, v in tok_cfg.items() if k.endswith("_token")})
        report = {"source": str(gguf_path.resolve()), "dtype": dtype, "tensors": len(weights)}
        if verify:
            report.update(verify_model(tmp))
        report["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / "mlxft_import.json", report)
    log(f"imported {gguf_path.name} -> {out} ({dtype}, {len(weights)} tensors, {report['seconds']} s)")
    return report


PROBE_QUESTION = "What is the capital of France?"


def verify_model(folder: str | Path) -> dict:
    """Strict load (no missing or unexpected weights) and a greedy answer to a known question."""
    from mlx.utils import tree_flatten
    from mlx_lm.generate import generate

    from mlx_ft.fingerprint import fingerprint_model
    from mlx_lm.utils import load

    try:
        model, tok = load(str(folder))  # load_model is strict by default
    except ValueError as e:
        raise ModelError(f"{folder}: imported weights do not match the llama architecture: {e}") from e
    prompt = tok.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}], add_generation_prompt=True)
    answer = generate(model, tok, prompt, max_tokens=24, verbose=False)
    if "paris" not in answer.lower():
        raise ModelError(
            f"{folder}: the imported model answered {answer!r} to {PROBE_QUESTION!r}; "
            "expected Paris -- the conversion is wrong (RoPE layout, tokenizer or weights)"
        )
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"verified_answer": answer.strip(), "parameters": int(n_params),
            "fingerprint": fingerprint_model(model, tok)}
