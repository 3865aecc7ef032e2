"""``mlxft fuse``: fuse a checkpoint into a *full-precision* base, quantize to N bits, prove it works.

mlx-lm's own fuse re-quantizes at the base's bits with no bits option, and fusing a small LoRA
delta into already-quantized weights can round it away (a merged model that no longer behaves like its adapter). So: dequantize
the base, fuse, measure how much of each LoRA delta survives quantization, quantize, write the
folder atomically, then evaluate the fused model beside its adapter (``compare_with_adapter``).
By default one layer at a time (mlx_ft/fuse_stream.py: a 30B base need not fit in memory at full
precision); ``in_memory`` does the whole model at once, the reference the streamed path must equal
bit for bit. Scales, biases and unquantized tensors are written in ``dtype`` (float16 by default:
a float32 base's float32 scales made ``--bits 5`` 7 bits per weight).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlx_ft.errors import ModelError, UserError
from mlx_ft.files import read_json, staged_dir, write_json
from mlx_ft.fuse_stream import base_weight
from mlx_ft.memory import check_memory, float_dtype
from mlx_ft.models import identity

BITS = (2, 3, 4, 5, 6, 8, 16)
GROUP_SIZES = (32, 64, 128)
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
DTYPES = ("auto", "float16", "bfloat16", "float32")  # of the scales, biases and unquantized tensors written
SURVIVAL_WARN = 0.5  # cosine of (quantized fused - quantized base) vs the LoRA delta


def output_dtype(dtype: str, base: Path) -> str:
    """``auto``: the base's own 16-bit dtype (bfloat16 for most bases users have); for a float32
    base, float16, whose 11-bit mantissa keeps the scales of an 8-bit fuse exact enough (bfloat16's 8
    bits made an 8-bit fuse no closer to its adapter than a 4-bit one). float16 tops out at 65,504:
    a model with larger activations wants ``--dtype bfloat16``."""
    if dtype != "auto":
        return dtype
    found = float_dtype(base)
    return found if found in ("float16", "bfloat16") else "float16"


def check_args(bits: int, group_size: int, recipe: str | None, dtype: str = "auto") -> None:
    if bits not in BITS:
        raise UserError(f"--bits {bits}: use one of {', '.join(map(str, BITS))} (16 keeps full precision)")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")
    if recipe and recipe not in RECIPES:
        raise UserError(f"--recipe {recipe}: use one of {', '.join(RECIPES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} (fuse.dtype in a config): use one of {', '.join(DTYPES)}")


def resolve_source(run: str | Path | None, adapter: str | Path | None, model: str | Path | None) -> tuple[Path, Path]:
    """(adapter folder, base model folder) from --adapter or the run's best.json."""
    if adapter is None:
        if run is None:
            raise UserError("give --run RUN (uses RUN/best.json) or --adapter CHECKPOINT")
        best = Path(run) / "best.json"
        if not best.is_file():
            raise UserError(f"{best} not found; run `mlxft pick-best --run {run}` first, or pass --adapter")
        chosen = read_json(best)["chosen"]
        if not chosen.get("adapter"):
            raise UserError(f"{best}: the best candidate is the base model itself; there is nothing to fuse")
        adapter = chosen["adapter"]
    adapter = Path(adapter)
    if not (adapter / "adapters.safetensors").is_file() or not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a checkpoint folder (needs adapters.safetensors and adapter_config.json)")
    if model:  # a folder or a Hugging Face repo id (from the local cache)
        from mlx_ft.models import resolve_model

        return adapter, resolve_model(str(model))
    base = Path(read_json(adapter / "adapter_config.json").get("model", ""))
    if not (base / "config.json").is_file():
        raise ModelError(f"base model {base} not found; pass --model with the folder or repo id the adapter was "
                         "trained on")
    return adapter, base


def _lora_modules(model) -> list[tuple[str, object]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "fuse") and hasattr(m, "lora_a")]


def survival_row(name: str, w_base, w_fused, bits: int, group_size: int, dtype=None) -> dict | None:
    """How much of one layer's LoRA delta survives being written at ``bits`` in ``dtype``.

    delta = W_fused - W_base (full precision); kept = Q(W_fused) - Q(W_base), where Q casts to the
    output dtype and quantizes (bits 16: only casts). The cosine between kept and delta and the
    relative error ||kept - delta|| / ||delta||; None when the delta is zero."""
    import mlx.core as mx

    delta = (w_fused - w_base).astype(mx.float32)
    dn = mx.linalg.norm(delta).item()
    if dn == 0:
        return None

    def q(w):
        w = w if dtype is None else w.astype(dtype)
        if bits == 16:
            return w.astype(mx.float32)
        return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size,
                             bits=bits).astype(mx.float32)

    kept = q(w_fused) - q(w_base)
    cos = (mx.sum(kept * delta) / (mx.linalg.norm(kept) * dn + 1e-12)).item()
    rel = (mx.linalg.norm(kept - delta) / dn).item()
    return {"layer": name, "delta_norm": round(dn, 5), "cosine": round(cos, 4), "rel_error": round(rel, 4)}


def summarize_survival(rows: list[dict | None]) -> dict:
    """Per layer (sorted by name) and as medians."""
    rows = sorted((r for r in rows if r), key=lambda r: r["layer"])
    cos_sorted = sorted(r["cosine"] for r in rows)
    rel_sorted = sorted(r["rel_error"] for r in rows)
    median = (lambda xs: xs[len(xs) // 2] if xs else None)
    return {"layers": rows, "median_cosine": median(cos_sorted), "median_rel_error": median(rel_sorted),
            "min_cosine": cos_sorted[0] if cos_sorted else None}


def survival(pairs: list[tuple[str, object, object]], bits: int, group_size: int, dtype=None) -> dict:
    """How much of each LoRA delta survives quantization (:func:`survival_row` per adapted layer)."""
    return summarize_survival([survival_row(n, b, f, bits, group_size, dtype) for n, b, f in pairs])


def fuse(adapter: Path, base: Path, out: Path, bits: int = 5, group_size: int = 32, recipe: str | None = None,
         force: bool = False, log: Callable[[str], None] = lambda s: None, *, dtype: str = "auto",
         in_memory: bool = False, shard_bytes: int | None = None) -> dict:
    """Fuse ``adapter`` into ``base`` at ``bits`` (scales, biases and unquantized tensors in
    ``dtype``) and save atomically. Layer by layer (peak memory: about the output plus a layer or
    two), or with ``in_memory`` the whole base dequantized at once. Returns the fuse record."""
    import mlx.core as mx

    check_args(bits, group_size, recipe, dtype)
    dtype = output_dtype(dtype, base)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it, or choose another --out")
    t0 = time.perf_counter()
    _reset_peak_rss()
    _check_memory(adapter, base, bits, log, streamed=not in_memory)
    with staged_dir(out, force=force) as tmp:
        build = _fuse_in_memory if in_memory else _fuse_streamed
        built = build(adapter, base, tmp, bits, group_size, recipe, getattr(mx, dtype), log,
                      **({"shard_bytes": shard_bytes} if shard_bytes and not in_memory else {}))
        surv = built["survival"]
        warnings = []
        if surv["median_cosine"] is not None and surv["median_cosine"] < SURVIVAL_WARN:
            warnings.append(f"at {bits} bits most of the LoRA delta is rounded away (median cosine "
                            f"{surv['median_cosine']:.2f}); the fused model may behave like the base. Use more bits")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        record = {
            "source_checkpoint": str(adapter.resolve()), "base_model": str(base.resolve()),
            "model": identity(None, base), "base_bits": built["base_bits"], "bits": bits,
            "group_size": group_size if bits != 16 else None, "recipe": recipe, "dtype": dtype,
            "method": "in-memory" if in_memory else "streamed", "size_bytes": size,
            "bits_per_weight": round(built["bits_per_weight"], 3), "parameters": built["parameters"],
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3), "peak_rss_gb": round(_peak_rss_bytes() / 1e9, 3),
            "survival": surv, "warnings": warnings, "fingerprint": built["fingerprint"],
        }
        write_json(tmp / "fused.json", record)
    for w in warnings:
        log(f"WARNING: {w}")
    log(f"fused in {record['seconds']} s, {size / 1e6:.1f} MB, {record['bits_per_weight']} bits per weight, "
        f"adapter survival median cosine {surv['median_cosine']}")
    return record


def _fuse_in_memory(adapter: Path, base: Path, tmp: Path, bits: int, group_size: int, recipe: str | None, dtype,
                    log: Callable[[str], None]) -> dict:
    """The whole base dequantized → fuse every adapted layer → cast → quantize → mlx-lm's save."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight, save

    model, tok, config, base_bits = _load_full_precision(base, log)
    pairs = _merge(model, adapter, log)
    surv = survival(pairs, bits, group_size, dtype)
    del pairs
    model.set_dtype(dtype)
    if bits != 16:
        model, config = _quantize(model, config, bits, group_size, recipe, log)
    model.eval()
    log(f"writing {tmp}")
    save(tmp, base, model, tok, config, donate_model=False)
    built = {"base_bits": base_bits, "survival": surv,
             "parameters": sum(v.size for _, v in tree_flatten(model.parameters())),
             "bits_per_weight": compute_bits_per_weight(model)}
    del model
    return {**built, "fingerprint": fingerprint_folder(tmp)}


def fingerprint_folder(folder: Path) -> dict:
    """The fused model's probe answer, loaded back from its folder (quantized: the output's size).
    Where quantized kernels are slow (CPU), computed in float32 like the view ``eval_view`` serves:
    float16 arithmetic there is emulated, ~25x slower (measured: 367 s vs 15 s for the demo)."""
    import mlx.core as mx
    from mlx_lm.utils import load

    from mlx_ft.fingerprint import fingerprint_model

    model, tok = load(str(folder))
    if quantized_kernels_are_slow():
        model.set_dtype(mx.float32)
    return fingerprint_model(model, tok)


def _fuse_streamed(adapter: Path, base: Path, tmp: Path, bits: int, group_size: int, recipe: str | None, dtype,
                   log: Callable[[str], None], **kw) -> dict:
    """mlx_ft/fuse_stream.py writes the folder layer by layer; the fused model is loaded back
    (quantized: the output's size) only for its fingerprint."""
    from mlx_ft.fuse_stream import stream_fuse

    rows = []
    log(f"fusing {base} layer by layer into {tmp} ({bits} bits, {dtype})")
    built = stream_fuse(adapter, base, tmp, bits, group_size, recipe, dtype,
                        lambda n, b, f: rows.append(survival_row(n, b, f, bits, group_size, dtype)), **kw)
    log(f"fused {len(rows)} adapted layers")
    return {**built, "survival": summarize_survival(rows), "fingerprint": fingerprint_folder(tmp),
            "bits_per_weight": built["weights_bytes"] * 8 / built["total_parameters"]}


def _check_memory(adapter: Path, base: Path, bits: int, log: Callable[[str], None], streamed: bool = True) -> None:
    """Refuse before loading when the fuse would not fit in memory (mlx_ft/memory.py)."""
    acfg = read_json(adapter / "adapter_config.json")
    check_memory("fuse", base, bits=bits if streamed or bits != 16 else 0, log=log, lora_layers=acfg.get("num_layers"),
                 lora_rank=(acfg.get("lora_parameters") or {}).get("rank", 8), streamed=streamed)


def _load_full_precision(base: Path, log: Callable[[str], None]):
    """(model, tokenizer, config, the base's bits or None): a quantized base dequantized, its
    quantization keys dropped from the config."""
    from mlx_lm.utils import dequantize_model, load

    log(f"loading {base}")
    model, tok, config = load(str(base), return_config=True)
    base_bits = (config.get("quantization") or {}).get("bits")
    if base_bits:
        log(f"dequantizing the {base_bits}-bit base before fusing")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return model, tok, config, base_bits


def _merge(model, adapter: Path, log: Callable[[str], None]) -> list[tuple[str, object, object]]:
    """Apply the adapter's LoRA layers to the (full-precision) model and fuse each into its base
    layer, in place. Returns (layer, base weight, fused weight) per adapted layer."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load_adapters

    model = load_adapters(model, str(adapter))
    loras = _lora_modules(model)
    if not loras:
        raise ModelError(f"{adapter}: no LoRA layers found to fuse (fine_tune_type full is not supported here)")
    log(f"fusing {len(loras)} adapted layers")
    base_weights = {n: base_weight(n, m) for n, m in loras}
    fused = [(n, m.fuse()) for n, m in loras]
    model.update_modules(tree_unflatten(fused))
    return [(n, base_weights[n], layer.weight) for n, layer in fused]


def _quantize(model, config: dict, bits: int, group_size: int, recipe: str | None, log: Callable[[str], None]):
    from mlx_lm.utils import quantize_model

    log(f"quantizing to {bits} bits, group size {group_size}" + (f", recipe {recipe}" if recipe else ""))
    predicate = None
    if recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder

        predicate = mixed_quant_predicate_builder(recipe, model, group_size)
    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints its bits/weight line to stdout
        return quantize_model(model, config, group_size, bits, quant_predicate=predicate)


def _reset_peak_rss() -> None:
    """Start the peak-RSS count at this fuse (Linux): ``mlxft run`` trains in the same process, and a
    forked child's ru_maxrss starts at its parent's RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    """VmHWM since :func:`_reset_peak_rss` where /proc has it, else the process's ru_maxrss."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def quantized_kernels_are_slow() -> bool:
    """mlx's CPU quantized matmul uses no BLAS: batched decode measured 10-15x slower than float32
    with OpenBLAS here (docs/benchmarks.md). On Metal the quantized kernels are the fast path."""
    import mlx.core as mx

    return not (hasattr(mx, "metal") and mx.metal.is_available())


@contextlib.contextmanager
def eval_view(out: Path, kernels: str):
    """The folder to serve for the fused eval.

    'quantized': the fused folder itself. 'dequantized': a temporary float32 copy of the *quantized*
    weights (the same values, dequantized exactly in float32), served with fast float kernels and deleted
    afterwards. 'auto' picks dequantized where quantized kernels are slow (CPU)."""
    import shutil
    import tempfile

    cfg = read_json(out / "config.json")
    if kernels == "auto":
        kernels = "dequantized" if quantized_kernels_are_slow() else "quantized"
    if kernels == "quantized" or "quantization" not in cfg:
        yield out, "quantized" if "quantization" in cfg else "float"
        return
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load, save

    from mlx_ft.models import home

    (home() / "eval-views").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}-", dir=home() / "eval-views"))
    try:
        model, tok, config = load(str(out), return_config=True)
        model.set_dtype(mx.float32)  # scales and biases first: dequantized in float32, as the kernels do
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        save(tmp, out, model, tok, config, donate_model=True)
        shutil.copy(out / "fused.json", tmp / "fused.json")
        yield tmp, "dequantized"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_with_adapter(out: Path, adapter: Path, suite, *, kernels: str = "auto",
                         log: Callable[[str], None] = lambda s: None, port: int | None = None) -> dict:
    """Evaluate the fused model on the suite and compare prompt by prompt with the adapter's eval."""
    import numpy as np

    from mlx_ft.evaluate import evaluate_targets
    from mlx_ft.selection import mcnemar_exact
    from mlx_ft.targets import Target, single_target

    record = read_json(out / "fused.json")
    adapter_target = single_target(record["base_model"], adapter, None)
    with eval_view(out, kernels) as (served, used):
        if used == "dequantized":
            log(f"evaluating the fused weights dequantized to float32 ({served}): same values, CPU-fast kernels")
        fused_target = Target(out.name, served, None, out / "evals", fingerprint=record["fingerprint"])
        fused_rec, adapter_rec = None, None
        engine = "server" if port else "batched"  # a port only means something to the server engine
        for rec in evaluate_targets([adapter_target, fused_target], suite, engine=engine, port=port, log=log,
                            log_dir=out / "evals"):
            if rec["target"]["adapter"]:
                adapter_rec = rec
            else:
                fused_rec = rec
    a = {r["id"]: r for r in adapter_rec["results"]}
    ids = [r["id"] for r in fused_rec["results"]]
    fused_pass = np.array([r["passed"] for r in fused_rec["results"]])
    adapter_pass = np.array([a[i]["passed"] for i in ids])
    same_text = sum(fr["text"] == a[fr["id"]]["text"] for fr in fused_rec["results"])
    comparison = {
        "suite": suite.name, "kernels": used,
        "fused_score": fused_rec["summary"]["score"], "adapter_score": adapter_rec["summary"]["score"],
        "fused_pass_rate": fused_rec["summary"]["pass_rate"], "adapter_pass_rate": adapter_rec["summary"]["pass_rate"],
        "identical_outputs": same_text, "prompts": len(ids),
        "mcnemar": mcnemar_exact(fused_pass, adapter_pass),
        "eval_seconds": fused_rec["seconds"],
    }
    record["eval"] = comparison
    write_json(out / "fused.json", record)
    return comparison
