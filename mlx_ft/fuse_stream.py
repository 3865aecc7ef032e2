"""The layer-streamed fuse behind ``mlxft fuse`` (the default; ``--in-memory`` is the old way).

Holding the whole base in full precision does not fit at the user's scale: a 30B 4-bit
mixture-of-experts base (~17 GB on disk) is ~61 GB dequantized. Here the base is loaded lazily
(``mx.load`` reads a tensor only when it is evaluated) and one layer at a time is dequantized,
fused with its LoRA delta (mlx-lm's own ``fuse()`` of that layer), measured, cast, quantized,
added to the current output shard and dropped. Peak memory: one output shard (at most the output)
+ a layer or two in full precision + a constant. Each step is the in-memory path's own operation
on one layer, so both give the same files bit for bit (tests/test_fuse.py checks it).
"""

from __future__ import annotations

import glob
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from mlx_ft.errors import ModelError

MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB


class ShardWriter:
    """The files ``mlx_lm.utils.save_model`` writes, written as tensors arrive: shards of at most
    ``max_bytes`` (a larger tensor gets its own), ``model.safetensors`` when there is one, else
    ``model-0000i-of-0000n.safetensors`` (named once n is known), and the sorted index."""

    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_bytes = folder, max_bytes
        self.shard: dict = {}
        self.size = self.total = self.values = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict) -> None:
        for name, value in tensors.items():
            if self.shard and self.size + value.nbytes > self.max_bytes:
                self._flush()
            self.shard[name] = value
            self.size += value.nbytes
            self.total += value.nbytes
            self.values += value.size

    def _flush(self) -> None:
        import mlx.core as mx

        path = self.folder / f".shard-{len(self.files):05d}.safetensors"
        mx.save_safetensors(str(path), self.shard, metadata={"format": "mlx"})
        self.files.append((path, list(self.shard)))
        self.shard, self.size = {}, 0

    def close(self, total_parameters: int) -> dict:
        """Write the last shard, name them all, write the index; returns the index."""
        if self.shard or not self.files:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total, "total_parameters": total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(self.folder / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=4)
        return index


def quant_decider(model, config: dict, bits: int, group_size: int, recipe: str | None):
    """(decide, quantized config): ``mlx_lm.utils.quantize_model``'s rule for one layer, as the
    in-memory path applies it to a full-precision model. ``decide(path, module)`` returns the
    ``to_quantized`` arguments, or None to keep the layer as it is; the config gains the
    ``quantization`` section with the layers the predicate gave their own settings."""
    qconfig = dict(config)
    if bits == 16:
        return (lambda path, module: None), qconfig
    default = {"group_size": group_size, "bits": bits, "mode": "affine"}
    predicate = getattr(model, "quant_predicate", None)
    if recipe:
        from mlx_lm.convert import mixed_quant_predicate_builder

        predicate = mixed_quant_predicate_builder(recipe, model, group_size)
    qconfig["quantization"] = dict(default)

    def decide(path: str, module) -> dict | None:
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size != 0:
            return None
        choice = predicate(path, module) if predicate is not None else True
        if isinstance(choice, dict):
            qconfig["quantization"][path] = choice
            return dict(choice)
        return dict(default) if choice else None

    qconfig["quantization_config"] = qconfig["quantization"]
    return decide, qconfig


FUSABLE = ("Linear", "SwitchLinear", "Embedding")  # what a LoRA layer's base is once the model is dequantized


def base_weight(name: str, lora):
    """The full-precision weight a LoRA layer adapts (Linear, a mixture-of-experts SwitchLinear, Embedding)."""
    base = lora.get("linear", lora.get("embedding"))
    if type(base).__name__ not in FUSABLE:
        raise ModelError(f"{name}: a {type(lora).__name__} over a {type(base).__name__}; mlxft fuse merges LoRA into "
                         f"{', '.join(FUSABLE)} layers only; use `mlx_lm.fuse` for this model, or evaluate the "
                         "adapter unfused")
    return base.weight


def is_lora(module) -> bool:
    return hasattr(module, "fuse") and hasattr(module, "lora_a")


def dequantized(module):
    """One layer as ``mlx_lm.utils.dequantize_model`` turns it (the same ``mx.dequantize``)."""
    import mlx.core as mx
    from mlx import nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = {nn.QuantizedLinear: nn.Linear, nn.QuantizedEmbedding: nn.Embedding, QuantizedSwitchLinear: SwitchLinear}
    cls = kinds.get(type(module))
    if cls is None:
        return module
    bias = "bias" in module
    weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits, module.mode)
    layer = cls(*weight.shape[::-1], **({} if cls is nn.Embedding else {"bias": bias}))
    if bias:
        layer.bias = module.bias
    layer.weight = weight
    return layer


def units(model) -> Iterator[tuple[str, object, str]]:
    """(path, module, kind) in the model's parameter order: 'lora' (an adapted layer with its
    base), 'layer' (any other leaf module), then 'loose' (arrays held by a module with children)."""
    from mlx import nn
    from mlx.utils import tree_flatten

    modules = dict(model.named_modules())
    done = set()
    for path, _ in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        parent = path.rpartition(".")[0]
        if parent in modules and is_lora(modules[parent]):
            if parent not in done:
                done.add(parent)
                yield parent, modules[parent], "lora"
        else:
            yield path, modules[path], "layer"
    for path, module in modules.items():
        if path not in done and not is_lora(module) and module.children() and _arrays(module):
            yield path, module, "loose"


def _arrays(module) -> list[str]:
    import mlx.core as mx

    return [k for k, v in module.items() if isinstance(v, mx.array)]


def _drop(module) -> None:
    """Release a processed layer's arrays (the lazy model keeps no other reference to them)."""
    for _, m in module.named_modules():
        for k in _arrays(m):
            del m[k]


def _n_params(module) -> int:
    """``mlx_lm.utils.get_total_parameters`` for one leaf module (quantized weights unpacked)."""
    from mlx.utils import tree_flatten

    if hasattr(module, "bits"):
        return (module.bias.size if "bias" in module else 0) + module.weight.size * 32 // module.bits
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def stream_layers(model, writer: ShardWriter, decide, dtype, on_pair: Callable) -> int:
    """Fuse, cast, quantize and write every layer of the lazily loaded, adapted ``model``, one at
    a time. ``on_pair(name, base weight, fused weight)`` sees each adapted layer (survival).
    Returns mlx-lm's parameter count of the output."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    n_params = 0
    for path, unit, kind in list(units(model)):
        if kind == "loose":  # arrays of a module with children: cast like model.set_dtype casts them
            tensors = {f"{path}.{k}": _cast(unit.pop(k), dtype) for k in _arrays(unit)}
        else:
            layer = full_precision(path, unit, kind, on_pair)
            layer.set_dtype(dtype)
            params = decide(path, layer)
            layer = layer.to_quantized(**params) if params else layer
            tensors = {f"{path}.{k}": v for k, v in tree_flatten(layer.parameters())}
            n_params += _n_params(layer)
            del layer
            _drop(unit)
        mx.eval(tensors)
        writer.add(tensors)
        del tensors
        mx.clear_cache()
    return n_params


def full_precision(path: str, unit, kind: str, on_pair: Callable):
    """The layer in full precision as the in-memory path has it: dequantized, and for an adapted
    layer fused with mlx-lm's own ``fuse()`` (LoRA, DoRA, mixture-of-experts) over that base."""
    if kind == "layer":
        return dequantized(unit)
    inner = "linear" if "linear" in unit else "embedding"
    setattr(unit, inner, dequantized(unit[inner]))
    w_base = base_weight(path, unit)
    fused = unit.fuse()
    on_pair(path, w_base, fused.weight)
    return fused


def _cast(x, dtype):
    import mlx.core as mx

    return x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x


def load_lazy(base: Path, adapter: Path):
    """(model, config without its quantization keys, the base's bits or None); no weight read yet."""
    from mlx_lm.utils import load_model

    model, config = load_model(base, lazy=True)
    base_bits = (config.get("quantization") or {}).get("bits")
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if (json.loads((adapter / "adapter_config.json").read_text()).get("fine_tune_type") or "lora") == "full":
        raise ModelError(f"{adapter}: fine_tune_type full is not supported here; mlxft fuse merges LoRA/DoRA "
                         "adapters")
    return model, config, base_bits


def read_weights(folder: Path) -> dict:
    """Every tensor of a model folder's shards (``model*.safetensors``), by name."""
    import mlx.core as mx

    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def write_folder(tmp: Path, base: Path, config: dict, keep_vision: bool) -> None:
    """Everything ``mlx_lm.utils.save`` writes beside the weights."""
    from mlx_lm.utils import create_model_card, load_tokenizer, save_config

    save_config(dict(config), config_path=tmp / "config.json", keep_vision_config=keep_vision)
    load_tokenizer(base, None, eos_token_ids=config.get("eos_token_id", None)).save_pretrained(tmp)
    for pattern in ("*.py", "generation_config.json"):
        for f in glob.glob(str(base / pattern)):
            shutil.copy(f, tmp)
    create_model_card(tmp, None)


def stream_fuse(adapter: Path, base: Path, tmp: Path, bits: int, group_size: int, recipe: str | None, dtype,
                on_pair: Callable, shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Fuse ``adapter`` into ``base`` layer by layer into the folder ``tmp``.
    Returns the base's bits, the values stored, mlx-lm's parameter count and the weights' bytes."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_adapters

    model, config, base_bits = load_lazy(base, adapter)
    keep_vision = "vision_tower" in getattr(model, "model", {})
    decide, qconfig = quant_decider(model, config, bits, group_size, recipe)
    model = load_adapters(model, str(adapter))
    if not any(is_lora(m) for _, m in model.named_modules()):
        raise ModelError(f"{adapter}: no LoRA layers found to fuse (fine_tune_type full is not supported here)")
    writer = ShardWriter(tmp, shard_bytes)
    total_parameters = stream_layers(model, writer, decide, dtype, on_pair)
    left = [k for k, _ in tree_flatten(model.parameters())]
    if left:
        raise ModelError(f"{base}: parameters {left[:3]} are outside the layers the streamed fuse walks; "
                         "pass --in-memory to fuse this model the old way")
    index = writer.close(total_parameters)
    write_folder(tmp, base, qconfig, keep_vision)
    return {"base_bits": base_bits, "parameters": writer.values, "total_parameters": total_parameters,
            "weights_bytes": index["metadata"]["total_size"]}
