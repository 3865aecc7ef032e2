"""Memory honesty: a model's size on disk and a peak-memory estimate per stage, before loading it.

A 30B mixture-of-experts model that does not fit should be refused in a second with numbers, not
after minutes of loading and a swap storm or an OOM kill. Everything here reads ``config.json`` and
the safetensors *headers* only. The estimates are deliberately simple sums (weights + adapters +
optimizer state + activations or KV cache + logits), each part reported, so a user can see which
knob (batch size, sequence length, eval rows) moves it. They are estimates: set
``MLXFT_SKIP_MEMORY_CHECK=1`` to try anyway. The batched engine also sizes each wave to the memory
free at that moment (batch_decode.wave_size); this check is the up-front, whole-stage one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_ft.errors import ModelError, UserError

GB = 1e9
STAGES = ("train", "eval", "fuse")
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "U16": 2, "I16": 2,
               "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SKIP_ENV = "MLXFT_SKIP_MEMORY_CHECK"
KNOBS = {"weights": "use a smaller or quantized model", "adapters": "evaluate fewer checkpoints at once",
         "activations": "lower batch_size or max_seq_length, or set grad_checkpoint",
         "logits": "lower batch_size or max_seq_length (eval: fewer rows per wave)",
         "kv_cache": "evaluate fewer rows at once (--wave) or lower max_tokens", "quantized": "use fewer bits"}


@dataclass(frozen=True)
class ModelSize:
    disk_bytes: int  # the weight files; also what the loaded weights take in memory, quantized or not
    params: int  # parameters at full precision (quantized weights unpacked)
    dtype_bytes: int  # bytes per value of the unquantized tensors (2: bf16/f16, 4: f32)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per expert for a mixture of experts
    experts: int  # 1 for a dense model
    vocab: int


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def float_dtype(model_path: str | Path) -> str | None:
    """The dtype most of a model's unquantized tensors are stored in ("float16", "bfloat16",
    "float32"), read from the safetensors headers; None when there is none to read."""
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    seen = [names[v["dtype"]] for f in sorted(Path(model_path).glob("*.safetensors"))
            for k, v in _header(f).items() if k != "__metadata__" and v.get("dtype") in names]
    return max(set(seen), key=seen.count) if seen else None


def model_size(model_path: str | Path) -> ModelSize:
    """Sizes from config.json and the safetensors headers, without reading any weight."""
    path = Path(model_path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'}: cannot read the model config ({e})") from e
    cfg = {**cfg.get("text_config", {}), **cfg}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weight files")
    quant = cfg.get("quantization") or {}
    tensors: dict[str, dict] = {}
    disk = 0
    for f in files:
        disk += f.stat().st_size
        tensors.update({k: v for k, v in _header(f).items() if k != "__metadata__"})
    params, float_bytes = 0, []
    for name, t in tensors.items():
        n = math.prod(t["shape"])
        module, _, leaf = name.rpartition(".")
        scales = tensors.get(f"{module}.scales")
        if leaf == "weight" and scales is not None and t["dtype"] in ("U32", "U8"):
            group = (quant.get(module) or {}).get("group_size", quant.get("group_size", 64))
            in_dims = scales["shape"][-1] * group
            params += n // t["shape"][-1] * in_dims
        elif leaf in ("scales", "biases") and f"{module}.weight" in tensors and scales is not None:
            continue  # quantization metadata, counted in disk_bytes
        else:
            params += n
            float_bytes.append(DTYPE_BYTES.get(t["dtype"], 2))
    heads = int(cfg.get("num_attention_heads", 1))
    hidden = int(cfg.get("hidden_size", 0))
    return ModelSize(
        disk_bytes=disk, params=params, dtype_bytes=max(set(float_bytes), key=float_bytes.count) if float_bytes else 2,
        layers=int(cfg.get("num_hidden_layers", 0)), hidden=hidden, heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or (hidden // heads if heads else 0)),
        intermediate=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 4 * hidden)),
        experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 1),
        vocab=int(cfg.get("vocab_size", 0)),
    )


def lora_params(m: ModelSize, rank: int, layers: int | None = None) -> int:
    """LoRA parameters of mlx-lm's default keys (attention q/k/v/o, MLP gate/up/down; per expert
    for a mixture of experts) on the last ``layers`` layers."""
    h, q, kv, i = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, m.intermediate
    attn = (h + q) + 2 * (h + kv) + (q + h)
    mlp = m.experts * (2 * (h + i) + (i + h)) + ((h + m.experts) if m.experts > 1 else 0)  # + the router
    n = m.layers if layers is None or layers < 0 else min(layers, m.layers)
    return rank * (attn + mlp) * n


def estimate(stage: str, m: ModelSize, *, batch_size: int = 4, seq_len: int = 2048, lora_rank: int = 8,
             lora_layers: int | None = 8, adapters: int = 1, rows: int = 64, tokens: int = 2048,
             bits: int = 4, streamed: bool = False) -> dict[str, int]:
    """Peak memory of ``stage`` in bytes, by part, plus ``total``.

    train: weights + LoRA parameters with gradient and Adam moments (4 x float32) + the activations
    kept for backward in the adapted layers (about 16 hidden-size and 3 intermediate-size values per
    token, plus the attention scores) + the logits with their softmax and gradients (4 x float32).
    Measured on SmolLM2-135M (8 LoRA layers): peak 3.32 GB at 4 x 512 tokens (estimate 3.37), 3.63 GB
    at 2 x 1024 (estimate 3.67). Defaults are mlxft's training defaults (batch 4, 2048 tokens, 8 layers)
    and an eval of 64 rows of 2048 tokens.
    eval: weights + every adapter (float32, the batched engine's stacks) + the KV cache of ``rows``
    rows of ``tokens`` tokens + one step's logits. fuse: the full-precision model (a quantized base
    is dequantized first) + the quantized copy at ``bits`` + the adapter; ``streamed`` (mlxft fuse's
    default, mlx_ft/fuse_stream.py): the output + two layers in float32 + 300 MB (measured:
    docs/benchmarks.md)."""
    if stage not in STAGES:
        raise UserError(f"stage {stage!r}: one of {', '.join(STAGES)}")
    lora = lora_params(m, lora_rank, lora_layers) * 4
    parts: dict[str, int] = {"weights": m.disk_bytes}
    if stage == "train":
        n = m.layers if lora_layers is None or lora_layers < 0 else min(lora_layers, m.layers)
        tok = batch_size * seq_len
        parts["adapters"] = lora * 4
        parts["activations"] = n * (tok * (16 * m.hidden + 3 * m.intermediate) * 4
                                    + batch_size * m.heads * seq_len * seq_len * 4)
        parts["logits"] = tok * m.vocab * 4 * 4
    elif stage == "eval":
        parts["adapters"] = lora * adapters
        parts["kv_cache"] = rows * tokens * m.layers * 2 * m.kv_heads * m.head_dim * m.dtype_bytes
        parts["logits"] = rows * m.vocab * 4 * 2
    elif streamed:
        parts["weights"] = 2 * m.params // max(m.layers, 1) * 4  # two layers in full precision
        parts["quantized"] = m.params * min(bits, 16) // 8 * 5 // 4
        parts["adapters"] = lora + 300 * 10**6
    else:
        parts["weights"] = max(m.disk_bytes, m.params * m.dtype_bytes)
        parts["quantized"] = m.params * bits // 8 * 5 // 4  # plus scales and biases
        parts["adapters"] = lora
    parts["total"] = sum(parts.values())
    return parts


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def describe(stage: str, parts: dict[str, int], available: int) -> str:
    detail = ", ".join(f"{k.replace('_', ' ')} {human(v)}" for k, v in parts.items() if k != "total")
    return f"{stage}: estimated peak memory {human(parts['total'])} ({detail}) of {human(available)} available"


def check_memory(stage: str, model_path: str | Path, *, log: Callable[[str], None] = lambda s: None,
                 available: int | None = None, **sizes) -> dict[str, int]:
    """Log the model's size on disk and ``stage``'s peak-memory estimate; raise ModelError, before
    anything is loaded, when it exceeds the available memory.
    ``sizes``: the keyword arguments of :func:`estimate` (batch_size, seq_len, rows, tokens, ...)."""
    m = model_size(model_path)
    parts = estimate(stage, m, **sizes)
    free = available_bytes() if available is None else available
    log(f"model {model_path}: {human(m.disk_bytes)} on disk, {m.params / 1e6:,.1f} M parameters")
    log(describe(stage, parts, free))
    if parts["total"] > free and os.environ.get(SKIP_ENV) != "1":
        largest = max((k for k in parts if k != "total"), key=parts.get)
        raise ModelError(
            f"{describe(stage, parts, free)}: it would not fit. The largest part is {largest.replace('_', ' ')}: "
            f"{KNOBS[largest]}, or free memory; set {SKIP_ENV}=1 to try anyway")
    return parts
