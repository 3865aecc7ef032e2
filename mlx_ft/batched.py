"""Every adapter of one base model in one continuous batch, in-process.

mlx-lm's server can batch concurrent requests, but only requests for the same weights: it drains
its batch and reloads the base whenever the adapter changes, so K checkpoints cost K prefills, K
decode tails (the batch shrinks to the one longest answer) and K reloads. Here the base is loaded
once and every adapted linear layer holds the LoRA matrices of *all* targets side by side
(:class:`MultiLoRALinear`); each batch row carries its slot (0 = the base: no update, exactly the
base output). mlx-lm's own pieces run the batch: its PromptProcessingBatch prefills the rows
into its batch KV cache classes; a small greedy loop (:func:`decode`) then decodes them, taking
only the argmax where mlx-lm's generator would normalise every row over the whole vocabulary.

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

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import psutil
from mlx_lm.generate import PromptProcessingBatch, TextStateMachine, _extend_cache, make_stop_sequences

from mlx_ft.errors import EvalError, WrongModelError
from mlx_ft.files import read_json
from mlx_ft.fingerprint import PROBE_MESSAGES, PROBE_TOKENS, compare


class RowSlots:
    """A cache-list entry that holds each batch row's adapter slot (see module doc)."""

    def __init__(self, slots):
        self.slots = slots

    def merge(self, caches):
        import mlx.core as mx

        return RowSlots(mx.concatenate([c.slots for c in caches]))

    def extend(self, other):
        import mlx.core as mx

        self.slots = mx.concatenate([self.slots, other.slots])

    def filter(self, keep):
        import mlx.core as mx

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


def _multi_lora_class():
    from mlx import nn

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
            import mlx.core as mx

            y = self.linear(x)
            mask, row_scale = self.mask, self.row_scale
            if x.ndim == 2:  # [rows * tokens, in]: a block that flattened the batch first (olmoe's router)
                n = x.shape[0] // mask.shape[0]
                mask, row_scale = mx.repeat(mask[:, 0], n, axis=0), mx.repeat(row_scale[:, 0], n, axis=0)
            z = ((x @ self.a) * mask) @ self.b
            return y + (row_scale * z).astype(x.dtype)

    return MultiLoRALinear


def _multi_lora_switch_class():
    from mlx import nn

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
            import mlx.core as mx

            y = self.linear(x, indices, sorted_indices=sorted_indices)
            if self.pos is None or self.pos.shape != indices.shape:
                raise EvalError(f"batched engine: expert indices of shape {indices.shape} do not line up with the "
                                f"rows' adapter slots ({None if self.pos is None else self.pos.shape}); this "
                                "mixture-of-experts block routes tokens in a way the batched engine does not "
                                "know, use --engine server")
            idx = self.pos * self.num_experts + indices  # the combined index is not sorted: no sorted hint
            z = mx.gather_mm(mx.gather_mm(x, self.a_t, rhs_indices=idx), self.b_t, rhs_indices=idx)
            return y + (self.scale[..., None, None] * z).astype(x.dtype)

    return MultiLoRASwitchLinear


def _slot_router_class():
    from mlx import nn

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
            import mlx.core as mx

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

    return SlotRouter


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
    import mlx.core as mx

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
    return f"{layer.num_experts} experts, {in_dims} -> {out_dims}" if _kind(layer) == "switch" else f"{in_dims} -> {out_dims}"


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
    import mlx.core as mx

    (in_dims, out_dims), e = _dims(layer), layer.num_experts
    a_st, b_st = [], []
    for pair in pairs:
        ta, tb = pair or (mx.zeros((e, rank, in_dims)), mx.zeros((e, out_dims, rank)))
        r = ta.shape[1]
        a_st.append(mx.pad(ta.astype(mx.float32), [(0, 0), (0, rank - r), (0, 0)]))
        b_st.append(mx.pad(tb.astype(mx.float32), [(0, 0), (0, 0), (0, rank - r)]))
    return _multi_lora_switch_class()(layer, mx.concatenate(a_st), mx.concatenate(b_st), e)


class MultiAdapterModel:
    """The base model with K adapter slots (slot 0 = base) and the routing each forward pass reads."""

    def __init__(self, model, adapters: list[Adapter | None]):
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        MultiLoRALinear, SlotRouter = _multi_lora_class(), _slot_router_class()
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
        import mlx.core as mx

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
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model) + [RowSlots(mx.array([slot]))]

    def prefill(self, slot: int, tokens: list[int]) -> list:
        """A cache holding ``tokens`` already processed with ``slot``'s weights."""
        import mlx.core as mx

        cache = self.new_cache(slot)
        if tokens:
            self(mx.array(tokens)[None], cache=cache)
            mx.eval([c.state for c in cache])
        return cache


def wave_size(prefix_cache: list | None, longest: int, limit: int) -> int:
    """Rows per wave: at most ``limit``, and few enough that the wave's KV cache (every row at its
    longest, prompt + max_tokens, in the 256-token blocks mlx-lm's caches grow by) fits in a
    quarter of the memory available now."""
    layers = [c for c in (prefix_cache or [])[:-1] if getattr(c, "keys", None) is not None]
    if not layers:
        return limit
    per_token = sum(c.nbytes / c.keys.shape[-2] for c in layers)  # keys + values, every layer
    per_row = per_token * 256 * -(-longest // 256)
    return max(1, min(limit, int(psutil.virtual_memory().available / 4 // per_row)))


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix all sequences share, leaving each at least one token."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs):
            return i
    return max(n, 0)


@dataclass
class Row:
    slot: int  # whose weights: 0 = base, k = the k-th adapter
    key: object  # the caller's name for this row, handed back in Done
    tokens: list[int]
    max_tokens: int
    probe: bool = False  # probe rows stop at EOS only and record log-probabilities


@dataclass
class Done:
    key: object
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    seconds: float


def probe_rows(tokenizer, slots: dict[int, dict | None]) -> list[Row]:
    """One fingerprint-probe row per slot (key = the slot), as long as that slot's recorded probe."""
    prompt = tokenizer.apply_chat_template(PROBE_MESSAGES, add_generation_prompt=True)
    return [Row(s, s, list(prompt), (fp or {}).get("max_tokens", PROBE_TOKENS), probe=True)
            for s, fp in sorted(slots.items())]


def check_probe(name: str, expected: dict | None, done: Done) -> dict:
    """The probe row's answer vs the recorded fingerprint; raise WrongModelError on a mismatch."""
    got = {"token_ids": done.token_ids, "logprobs": [round(x, 5) for x in done.logprobs]}
    if expected is None:
        return {**got, "checked": False}
    why = compare(expected, done.token_ids, done.logprobs)
    if why:
        raise WrongModelError(f"{name}: the batched engine's probe does not match the fingerprint recorded "
                              f"with the checkpoint: {why}")
    return {**got, "checked": True}


def reply_text(tokenizer, text_sm, ids: list[int], finish_reason: str) -> str:
    """What the model wrote, as the server's text would be for a model without a tool parser:
    decoded by the same streaming detokenizer (which, unlike ``tokenizer.decode``, drops the first
    token's leading space), stop words stripped by ``text_sm`` (engine_batched.raw_text_machine:
    tool-call and think markers are kept for the scorer)."""
    detok = tokenizer.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    state, segments = TextStateMachine.split(text_sm.make_state("normal"), detok.text)
    if finish_reason == "length":
        state, flushed, current = TextStateMachine.flush(state)
        segments.append((current, flushed))
    return "".join(text for _, text in segments)


class _Live:
    """One row being generated: its tokens so far and where it stops, as mlx-lm's generator decides."""

    def __init__(self, row: Row, matcher):
        self.row, self.matcher = row, matcher
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.finish: str | None = None

    def advance(self, token: int, logprob: float | None) -> bool:
        """Take the row's next token; True when the row has just finished. A stop sequence's last
        token is not kept, and a stop wins over reaching max_tokens on the same token."""
        if self.matcher.advance(token):
            self.finish = "stop"
            return True
        self.ids.append(token)
        if self.row.probe:
            self.lps.append(logprob)
        if len(self.ids) >= self.row.max_tokens:
            self.finish = "length"
        return self.finish is not None


def _waves(rows: list[Row], wave: int) -> list[list[Row]]:
    """``rows`` cut into the fewest waves of at most ``wave`` rows, all about the same size."""
    if not rows:
        return []
    n_waves = -(-len(rows) // max(wave, 1))
    size = -(-len(rows) // n_waves)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _groups(lengths: list[int], pad_share: float = 0.1) -> list[list[int]]:
    """Row indices sorted by prompt length, cut into prefill groups: a new group starts where
    right-padding every row to the group's longest prompt would waste more than ``pad_share`` of
    the group's prefill (one batch of all rows padded ~40 % of the demo's prefill)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * lengths[i] * (1 - pad_share) <= sum(lengths[j] for j in g) + lengths[i]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def _prefill(engine: MultiAdapterModel, chunk: list[Row], shared: dict) -> tuple[list, list[int], int]:
    """One batch KV cache holding every row's prompt but its last token (each row starting from its
    slot's shared prefix cache; probe rows from scratch), the chunk indices of its rows in batch
    order, and the number of tokens prefilled. mlx-lm's PromptProcessingBatch pads and caches;
    rows of similar length are prefilled together (:func:`_groups`) so little of it is padding."""
    caches, prompts = [], []
    for r in chunk:
        n, cache = shared.get(r.slot, (0, None))
        if r.probe or cache is None:
            n, cache = 0, engine.new_cache(r.slot)
        else:  # mlx-lm merges the caches it is given into the batch's, never writing to them
            cache = [*cache[:-1], RowSlots(cache[-1].slots)]
        prompts.append(r.tokens[n:])
        caches.append(cache)
    groups = _groups([len(p) for p in prompts])
    batch_cache = None
    for g in groups:
        part = PromptProcessingBatch(engine, list(g), [caches[i] for i in g])
        if any(len(prompts[i]) > 1 for i in g):
            part.prompt([prompts[i][:-1] for i in g])
        batch_cache = part.prompt_cache if batch_cache is None else _extend_cache(batch_cache, part.prompt_cache)
    mx.eval([c.state for c in batch_cache])
    return batch_cache, [i for g in groups for i in g], sum(len(p) - 1 for p in prompts)


def _filter(cache: list, keep: list[int]) -> None:
    for c in cache:
        c.filter(keep)


def _greedy(engine: MultiAdapterModel, cache: list, tokens: mx.array, logprobs: bool) -> tuple:
    """One decode step: each row's next token, argmax of its logits, and with ``logprobs`` the
    token's log-probability. mlx-lm normalises every row's logits over the whole vocabulary at every
    step (a quarter of a step's time here) for its sampler; a greedy row needs only the argmax,
    which a per-row shift does not move. Waves that want log-probabilities (the probes) take
    mlx-lm's exact path: the argmax of the normalised logits."""
    logits = engine(tokens[:, None], cache=cache)[:, -1, :]
    if not logprobs:
        return mx.argmax(logits, axis=-1), None
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nxt = mx.argmax(lp, axis=-1)
    return nxt, mx.take_along_axis(lp, nxt[:, None], axis=-1)[:, 0]


def _count(totals: dict) -> None:
    """Start the counters ``decode`` adds to at zero."""
    for key in ("waves", "prompt_tokens", "decode_tokens", "useful_tokens", "prompt_s", "decode_s"):
        totals.setdefault(key, 0)


def _run_wave(engine, chunk: list[Row], shared: dict, matchers: list, totals: dict, prune: float, t0: float):
    """Prefill ``chunk`` and greedy-decode it to the end, yielding each row's Done as it finishes.

    The next step is queued (``async_eval``) before this step's tokens are read, so the Python work
    of matching stops and the caller's work on each Done overlap the forward pass."""
    t = time.perf_counter()
    totals["waves"] += 1
    cache, order, n_prompt = _prefill(engine, chunk, shared)
    chunk, matchers = [chunk[i] for i in order], [matchers[i] for i in order]
    tokens = mx.array([r.tokens[-1] for r in chunk])
    totals["prompt_tokens"] += n_prompt
    totals["prompt_s"] += time.perf_counter() - t
    t = time.perf_counter()
    live = [_Live(r, m) for r, m in zip(chunk, matchers)]
    want_lp, steps, done = any(r.probe for r in chunk), max(r.max_tokens for r in chunk), 0
    step = _greedy(engine, cache, tokens, want_lp)
    mx.async_eval(step)
    while step is not None:
        tokens, lps = step
        done += 1
        step = _greedy(engine, cache, tokens, want_lp) if done < steps else None
        if step is not None:
            mx.async_eval(step)
        toks, lps = tokens.tolist(), (lps.tolist() if lps is not None else None)
        totals["decode_tokens"] += len(live)
        for i, row in enumerate(live):
            if row.finish is None and row.advance(toks[i], lps[i] if lps else None):
                totals["useful_tokens"] += len(row.ids) + (row.finish == "stop")
                yield Done(row.row.key, row.ids, row.lps, row.finish, len(row.row.tokens), time.perf_counter() - t0)
        keep = [i for i, row in enumerate(live) if row.finish is None]
        if not keep:
            break
        if step is not None and len(live) - len(keep) >= max(1, prune * len(live)):
            _filter(cache, keep)  # copies the batch KV cache: done for many stopped rows at once
            step = (step[0][mx.array(keep)], None if step[1] is None else step[1][mx.array(keep)])
            live = [live[i] for i in keep]
        totals["decode_s"] = totals["decode_s"] + time.perf_counter() - t
        t = time.perf_counter()
    totals["decode_s"] += time.perf_counter() - t


def decode(engine: MultiAdapterModel, tokenizer, rows: list[Row], *, stop_words=(), wave: int = 64,
           shared: dict[int, tuple[int, list]] | None = None, stats: dict | None = None,
           prune: float = 0.1) -> Iterator[Done]:
    """Greedy-decode every row, yielding each row's :class:`Done` as it finishes. Where the time
    went (prefill and decode tokens and seconds, summed over waves) is added to ``stats`` if given,
    as it goes.

    Rows run in waves of at most ``wave`` rows: mlx-lm's PromptProcessingBatch prefills them into
    one batch KV cache (mlx-lm's cache classes), then a small greedy loop decodes them
    (:func:`_greedy`). Filtering the batch cache copies all of it, so a stopped row stays in the
    batch (one row of wasted compute per step) until ``prune`` of the batch has stopped, then those
    rows leave together. Stop words and EOS are matched per row with mlx-lm's own StopSequences,
    exactly where its generator would stop (a multi-token stop word's last token is the one
    dropped; the text state machine strips the rest).

    ``shared[slot] = (n, cache)``: the first n tokens of every row of that slot are already in
    ``cache`` (their common system prompt, prefilled once); the rows start from it without copying
    it (``batch_generate``'s contract: the caches it is given are not updated in place).
    """
    stops = make_stop_sequences(tokenizer, list(stop_words))
    eos_only = make_stop_sequences(tokenizer, [])
    totals = stats if stats is not None else {}
    _count(totals)
    t0 = time.perf_counter()
    for chunk in _waves(rows, wave):
        matchers = [(eos_only if r.probe else stops).matcher() for r in chunk]
        try:
            yield from _run_wave(engine, chunk, shared or {}, matchers, totals, prune, t0)
        finally:
            mx.clear_cache()
