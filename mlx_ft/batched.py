"""Every adapter of one base model in one continuous batch, in-process.

mlx-lm's server can batch concurrent requests, but only requests for the same weights: it drains
its batch and reloads the base whenever the adapter changes, so K checkpoints cost K prefills, K
decode tails (the batch shrinks to the one longest answer) and K reloads. Here the base is loaded
once and every adapted linear layer holds the LoRA matrices of *all* targets side by side
(:class:`MultiLoRALinear`); each batch row carries its slot (0 = the base: no update, exactly the
base output). mlx-lm's own pieces run the batch (batch_decode.py): its PromptProcessingBatch prefills the
rows into its batch KV cache classes, and a small greedy loop decodes them.

How rows keep their slot: the batch KV cache is merged, filtered and extended as rows join and
leave. One extra entry at the end of the cache list, :class:`RowSlots`, follows the same protocol,
so it always lists the slot of each live row in order; the model wrapper reads it before each
forward pass and hands the rest of the list to the real model.

Identity: before any prompt is generated, every target's fingerprint probe runs as a row of a
batch through this same routing and must match the fingerprint recorded with the checkpoint.
Adapter files are read strictly: every tensor must be a LoRA matrix of a linear layer of this base
with the right shape (a lenient load can hide an architecture mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_ft.errors import EvalError
from mlx_ft.files import read_json


class RowSlots:
    """A cache-list entry that holds each batch row's adapter slot (see module doc)."""

    def __init__(self, slots):
        self.slots = slots

    def merge(self, caches):
        return RowSlots(mx.concatenate([c.slots for c in caches]))

    def extend(self, other):
        self.slots = mx.concatenate([self.slots, other.slots])

    def filter(self, keep):
        self.slots = self.slots[mx.array(keep)]

    def extract(self, idx):
        return RowSlots(self.slots[idx:idx + 1])

    def prepare(self, **kwargs):
        pass

    def finalize(self):
        pass

    @property
    def state(self):
        return self.slots

    @property
    def nbytes(self):
        return self.slots.nbytes


class MultiLoRALinear(nn.Module):
    """A linear layer plus the LoRA updates of every adapter slot, each row getting its own.

    The adapters' ``lora_a`` are side by side in ``a`` ([in, S*r]) and their ``lora_b`` stacked
    in ``b`` ([S*r, out]); ``mask`` ([rows, 1, S*r]) keeps each row's own r columns and zeroes
    the others, so a row's update is exactly (x @ lora_a) @ lora_b of its adapter -- two matmuls
    for the whole batch instead of one small pair per row. Base rows have an all-zero mask.
    """

    def __init__(self, linear, a, b):
        super().__init__()
        self.linear = linear
        self.a, self.b = a, b
        self.mask = self.row_scale = None  # set by MultiAdapterModel.route before each forward

    def __call__(self, x):
        y = self.linear(x)
        mask, row_scale = self.mask, self.row_scale
        if x.ndim == 2:  # [rows * tokens, in]: a block that flattened the batch first (olmoe's router)
            n = x.shape[0] // mask.shape[0]
            mask, row_scale = mx.repeat(mask[:, 0], n, axis=0), mx.repeat(row_scale[:, 0], n, axis=0)
        z = ((x @ self.a) * mask) @ self.b
        return y + (row_scale * z).astype(x.dtype)


class MultiLoRASwitchLinear(nn.Module):
    """A mixture-of-experts layer (SwitchLinear/QuantizedSwitchLinear) plus every slot's
    LoRASwitchLinear update, each (token, expert) pair getting its own row's adapter.

    mlx-lm's LoRASwitchLinear keeps one LoRA pair per expert (``lora_a`` [E, r, in], ``lora_b``
    [E, out, r]) and lets ``gather_mm`` pick expert ``indices[i]`` for pair i. Here the pairs of
    all adapters are stacked along that same expert axis ([P*E, ...], adapter p's expert e at
    p*E + e), so the same gather routes each pair to its expert *of its row's adapter*: index
    ``pos * E + expert``. ``pos``/``scale`` (one per pair, in the order the layer sees its pairs)
    are set by the :class:`SlotRouter` around the layer's parent before each call.
    """

    def __init__(self, linear, a, b, num_experts: int):
        super().__init__()
        self.linear = linear
        self.a_t, self.b_t = a.swapaxes(-1, -2), b.swapaxes(-1, -2)  # [P*E, in, r], [P*E, r, out]
        self.num_experts = num_experts
        self.pos = self.scale = None

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        if self.pos is None or self.pos.shape != indices.shape:
            raise EvalError(f"batched engine: expert indices of shape {indices.shape} do not line up with the "
                            f"rows' adapter slots ({None if self.pos is None else self.pos.shape}); this "
                            "mixture-of-experts block routes tokens in a way the batched engine does not "
                            "know, use --engine server")
        idx = self.pos * self.num_experts + indices  # the combined index is not sorted: no sorted hint
        z = mx.gather_mm(mx.gather_mm(x, self.a_t, rhs_indices=idx), self.b_t, rhs_indices=idx)
        return y + (self.scale[..., None, None] * z).astype(x.dtype)


class SlotRouter(nn.Module):
    """Wraps a SwitchGLU/SwitchMLP: hands its adapted switch layers one adapter slot per
    (token, expert) pair, in the order they will see the pairs. Those blocks flatten the pairs
    and sort them by expert once there are at least ``SORT_AT`` (mlx-lm's switch_layers), with
    the same argsort we repeat here, so the slots follow their tokens exactly."""

    SORT_AT = 64

    def __init__(self, inner, layers):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "switch_layers", layers)  # already children of inner, not again
        self.row_pos = self.row_scale = None  # per batch row, set by MultiAdapterModel.route

    def __call__(self, x, indices):
        rows, n = self.row_pos.shape[0], indices.shape[0]
        row_pos, row_scale = self.row_pos, self.row_scale
        if n != rows:  # blocks that flatten [rows, tokens] to rows*tokens first (olmoe): row-major
            if n % rows:
                raise EvalError(f"batched engine: a {type(self.inner).__name__} called with {n} token rows for "
                                f"a batch of {rows}; its routing is not one the batched engine knows, "
                                "use --engine server")
            row_pos, row_scale = mx.repeat(row_pos, n // rows), mx.repeat(row_scale, n // rows)
        lead = (n,) + (1,) * (indices.ndim - 1)
        pos = mx.broadcast_to(row_pos.reshape(lead), indices.shape)
        scale = mx.broadcast_to(row_scale.reshape(lead), indices.shape)
        if indices.size >= self.SORT_AT:
            order = mx.argsort(mx.stop_gradient(indices).flatten())
            pos, scale = pos.flatten()[order], scale.flatten()[order]
        for m in self.switch_layers:
            m.pos, m.scale = pos, scale
        return self.inner(x, indices)


@dataclass
class Adapter:
    path: Path
    config: dict
    # module path -> (a, b): a Linear's (a [in, r], b [r, out]); a switch layer's (a [E, r, in], b [E, out, r])
    tensors: dict = field(repr=False)
    scale: float = 1.0


LINEAR_TYPES = ("Linear", "QuantizedLinear")
SWITCH_TYPES = ("SwitchLinear", "QuantizedSwitchLinear")
ROUTED_BY = ("SwitchGLU", "SwitchMLP")  # the mixture-of-experts blocks whose token routing SlotRouter repeats


def _kind(layer) -> str | None:
    """'linear', 'switch', or None for a layer type the batched engine cannot adapt."""
    name = type(layer).__name__
    return "linear" if name in LINEAR_TYPES else "switch" if name in SWITCH_TYPES else None


def read_adapter(path: Path, model) -> Adapter:
    """Read a LoRA adapter folder strictly against ``model``: every tensor must be an ``lora_a`` or
    ``lora_b`` of a linear or mixture-of-experts (switch) layer that exists, with matching shapes, in pairs."""
    cfg_path, weights_path = path / "adapter_config.json", path / "adapters.safetensors"
    cfg = read_json(cfg_path)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise EvalError(f"{cfg_path}: fine_tune_type {kind!r}; the batched engine serves LoRA adapters only, "
                        "use --engine server")
    scale = (cfg.get("lora_parameters") or {}).get("scale")
    if not isinstance(scale, (int, float)):
        raise EvalError(f"{cfg_path}: lora_parameters.scale missing or not a number ({scale!r})")
    modules = dict(model.named_modules())
    pairs: dict[str, dict] = {}
    for name, value in mx.load(str(weights_path)).items():
        mod_path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise EvalError(f"{weights_path}: tensor {name!r} is not a LoRA matrix (lora_a/lora_b); "
                            "use --engine server for this adapter")
        pairs.setdefault(mod_path, {})[leaf] = value
    tensors = {}
    for mod_path, pair in pairs.items():
        layer = modules.get(mod_path)
        if layer is None:
            raise EvalError(f"{weights_path}: {mod_path!r} is not a linear layer of {cfg.get('model', 'the base')} "
                            "(it has no layer of that name); was this adapter trained on another model?")
        kind = _kind(layer)
        if kind is None:
            raise EvalError(f"{weights_path}: {mod_path!r} is a {type(layer).__name__}; the batched engine adapts "
                            f"{', '.join(LINEAR_TYPES + SWITCH_TYPES)} layers only; use --engine server")
        if kind == "switch":
            parent = modules.get(mod_path.rpartition(".")[0])
            if type(parent).__name__ not in ROUTED_BY:
                raise EvalError(f"{weights_path}: {mod_path!r} sits in a {type(parent).__name__}, whose expert "
                                f"routing the batched engine does not know (it knows {', '.join(ROUTED_BY)}); "
                                "use --engine server")
        if set(pair) != {"lora_a", "lora_b"}:
            raise EvalError(f"{weights_path}: {mod_path} has {sorted(pair)} only; a LoRA layer needs lora_a and lora_b")
        a, b = pair["lora_a"], pair["lora_b"]
        if not _fits(layer, a, b):
            raise EvalError(f"{weights_path}: {mod_path} LoRA shapes {a.shape} x {b.shape} don't fit the base "
                            f"{type(layer).__name__} ({_describe(layer)}); was this adapter trained on another model?")
        tensors[mod_path] = (a, b)
    if not tensors:
        raise EvalError(f"{weights_path}: no LoRA tensors")
    return Adapter(path, cfg, tensors, float(scale))


def _fits(layer, a, b) -> bool:
    """LoRA pair shapes for this layer: a Linear's [in, r] x [r, out], a switch layer's [E, r, in] x [E, out, r]."""
    in_dims, out_dims = _dims(layer)
    if _kind(layer) == "linear":
        return a.ndim == b.ndim == 2 and a.shape[0] == in_dims and b.shape[1] == out_dims and a.shape[1] == b.shape[0]
    e = layer.num_experts
    return (a.ndim == b.ndim == 3 and a.shape[0] == b.shape[0] == e and a.shape[2] == in_dims
            and b.shape[1] == out_dims and a.shape[1] == b.shape[2])


def _describe(layer) -> str:
    in_dims, out_dims = _dims(layer)
    dims = f"{in_dims} -> {out_dims}"
    return f"{layer.num_experts} experts, {dims}" if _kind(layer) == "switch" else dims


def _dims(layer) -> tuple[int, int]:
    """(input, output) size of a Linear or QuantizedLinear (whose weight packs 32/bits per column),
    or of a SwitchLinear/QuantizedSwitchLinear (per expert)."""
    if _kind(layer) == "switch":
        return layer.input_dims, layer.output_dims
    out_dims, in_dims = layer.weight.shape
    if hasattr(layer, "bits"):
        in_dims = in_dims * 32 // layer.bits
    return in_dims, out_dims


def _stack_switch(layer, pairs: list, rank: int):
    """A MultiLoRASwitchLinear over ``layer`` with each adapter's per-expert pairs (None: this
    adapter leaves the layer alone, a zero update) stacked along the expert axis, rank zero-padded."""
    (in_dims, out_dims), e = _dims(layer), layer.num_experts
    a_st, b_st = [], []
    for pair in pairs:
        ta, tb = pair or (mx.zeros((e, rank, in_dims)), mx.zeros((e, out_dims, rank)))
        r = ta.shape[1]
        a_st.append(mx.pad(ta.astype(mx.float32), [(0, 0), (0, rank - r), (0, 0)]))
        b_st.append(mx.pad(tb.astype(mx.float32), [(0, 0), (0, 0), (0, rank - r)]))
    return MultiLoRASwitchLinear(layer, mx.concatenate(a_st), mx.concatenate(b_st), e)


class MultiAdapterModel:
    """The base model with K adapter slots (slot 0 = base) and the routing each forward pass reads."""

    def __init__(self, model, adapters: list[Adapter | None]):
        self.model = model
        modules = dict(model.named_modules())
        paths = sorted({p for ad in adapters if ad for p in ad.tensors})
        linear = [p for p in paths if _kind(modules[p]) == "linear"]
        switch = [p for p in paths if _kind(modules[p]) == "switch"]
        rank = max((ad.tensors[p][0].shape[-2 if p in switch else 1] for ad in adapters if ad for p in ad.tensors),
                   default=0)
        lora_slots = [k for k, ad in enumerate(adapters) if ad]
        # column j of every layer's stacked lora_a belongs to slot col_slot[j]
        self.col_slot = mx.array([k for k in lora_slots for _ in range(rank)])
        self.scales = mx.array([ad.scale if ad else 0.0 for ad in adapters], dtype=mx.float32)
        # a switch layer stacks its adapters along the expert axis: slot k's experts sit at slot_pos[k]
        # (base rows use position 0 with scale 0: exactly no update)
        self.slot_pos = mx.array([lora_slots.index(k) if k in lora_slots else 0 for k in range(len(adapters))])
        self.layers, replaced = [], []
        for p in linear:
            layer = modules[p]
            in_dims, out_dims = _dims(layer)
            a_cols, b_rows = [], []
            for k in lora_slots:
                ta, tb = adapters[k].tensors.get(p, (None, None))
                if ta is None:  # this adapter leaves the layer alone: a zero update
                    ta, tb = mx.zeros((in_dims, rank)), mx.zeros((rank, out_dims))
                r = ta.shape[1]  # a smaller rank is zero-padded: the product is the same
                a_cols.append(mx.pad(ta.astype(mx.float32), [(0, 0), (0, rank - r)]))
                b_rows.append(mx.pad(tb.astype(mx.float32), [(0, rank - r), (0, 0)]))
            multi = MultiLoRALinear(layer, mx.concatenate(a_cols, axis=1), mx.concatenate(b_rows, axis=0))
            self.layers.append(multi)
            replaced.append((p, multi))
        self.switch_layers, by_parent = [], {}
        for p in switch:
            multi = _stack_switch(modules[p], [adapters[k].tensors.get(p) for k in lora_slots], rank)
            self.switch_layers.append(multi)
            by_parent.setdefault(p.rpartition(".")[0], []).append(multi)
            replaced.append((p, multi))
        if replaced:
            model.update_modules(tree_unflatten(replaced))
        self.routers = [SlotRouter(modules[parent], layers) for parent, layers in by_parent.items()]
        if self.routers:  # after the switch layers are in place inside their parents
            model.update_modules(tree_unflatten(list(zip(by_parent, self.routers))))
        mx.eval([(m.a, m.b) for m in self.layers] + [(m.a_t, m.b_t) for m in self.switch_layers])

    def route(self, slots) -> None:
        """Give the next forward pass one adapter slot per batch row."""
        mask = (self.col_slot[None, :] == slots[:, None]).astype(mx.float32)[:, None, :]
        row_scale = self.scales[slots][:, None, None]
        for m in self.layers:
            m.mask, m.row_scale = mask, row_scale
        for r in self.routers:
            r.row_pos, r.row_scale = self.slot_pos[slots], self.scales[slots]

    def __call__(self, inputs, cache=None, **kwargs):
        self.route(cache[-1].slots)
        return self.model(inputs, cache=cache[:-1], **kwargs)

    def new_cache(self, slot: int) -> list:
        return make_prompt_cache(self.model) + [RowSlots(mx.array([slot]))]

    def prefill(self, slot: int, tokens: list[int]) -> list:
        """A cache holding ``tokens`` already processed with ``slot``'s weights."""
        cache = self.new_cache(slot)
        if tokens:
            self(mx.array(tokens)[None], cache=cache)
            mx.eval([c.state for c in cache])
        return cache
