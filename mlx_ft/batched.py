"""Every adapter of one base model in one continuous batch, in-process.

mlx-lm's server can batch concurrent requests, but only requests for the same weights: it drains
its batch and reloads the base whenever the adapter changes, so K checkpoints cost K prefills, K
decode tails (the batch shrinks to the one longest answer) and K reloads. Here the base is loaded
once and every adapted linear layer holds the LoRA matrices of *all* targets side by side
(:class:`MultiLoRALinear`); each batch row carries its slot (0 = the base: no update, exactly the
base output), and mlx-lm's own :class:`~mlx_lm.generate.BatchGenerator` drives the batch: prefill,
KV caches, greedy sampling.

How rows keep their slot: BatchGenerator merges, filters, extends and extracts the per-layer KV
caches as rows join and leave. One extra entry at the end of the cache list, :class:`RowSlots`,
follows the same protocol, so it always lists the slot of each live row in order; the model
wrapper reads it before each forward pass and hands the rest of the list to the real model.

Identity: before any prompt is generated, every target's fingerprint probe runs as a row of a
batch through this same routing and must match the fingerprint recorded with the checkpoint.
Adapter files are read strictly: every tensor must be a LoRA matrix of a linear layer of this base
with the right shape (seed 000: a lenient load hid a mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
            y = self.linear(x)
            z = ((x @ self.a) * self.mask) @ self.b
            return y + (self.row_scale * z).astype(x.dtype)

    return MultiLoRALinear


@dataclass
class Adapter:
    path: Path
    config: dict
    tensors: dict = field(repr=False)  # module path -> (a [in, r], b [r, out])
    scale: float = 1.0


def read_adapter(path: Path, model) -> Adapter:
    """Read a LoRA adapter folder strictly against ``model``: every tensor must be an ``lora_a`` or
    ``lora_b`` of a linear layer that exists, with matching shapes, in pairs."""
    import mlx.core as mx
    from mlx import nn

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
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise EvalError(f"{weights_path}: {mod_path!r} is not a linear layer of {cfg.get('model', 'the base')}; "
                            "was this adapter trained on another model?")
        if set(pair) != {"lora_a", "lora_b"}:
            raise EvalError(f"{weights_path}: {mod_path} has {sorted(pair)} only; a LoRA layer needs lora_a and lora_b")
        in_dims, out_dims = _dims(layer)
        a, b = pair["lora_a"], pair["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != in_dims or b.shape[1] != out_dims or a.shape[1] != b.shape[0]:
            raise EvalError(f"{weights_path}: {mod_path} LoRA shapes {a.shape} x {b.shape} don't fit the base layer "
                            f"({in_dims} -> {out_dims}); was this adapter trained on another model?")
        tensors[mod_path] = (a, b)
    if not tensors:
        raise EvalError(f"{weights_path}: no LoRA tensors")
    return Adapter(path, cfg, tensors, float(scale))


def _dims(layer) -> tuple[int, int]:
    """(input, output) size of a Linear or QuantizedLinear (whose weight packs 32/bits per column)."""
    out_dims, in_dims = layer.weight.shape
    if hasattr(layer, "bits"):
        in_dims = in_dims * 32 // layer.bits
    return in_dims, out_dims


class MultiAdapterModel:
    """The base model with K adapter slots (slot 0 = base) and the routing that BatchGenerator drives."""

    def __init__(self, model, adapters: list[Adapter | None]):
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        MultiLoRALinear = _multi_lora_class()
        self.model = model
        modules = dict(model.named_modules())
        paths = sorted({p for ad in adapters if ad for p in ad.tensors})
        rank = max((a.shape[1] for ad in adapters if ad for a, _ in ad.tensors.values()), default=0)
        lora_slots = [k for k, ad in enumerate(adapters) if ad]
        # column j of every layer's stacked lora_a belongs to slot col_slot[j]
        self.col_slot = mx.array([k for k in lora_slots for _ in range(rank)])
        self.scales = mx.array([ad.scale if ad else 0.0 for ad in adapters], dtype=mx.float32)
        self.layers, replaced = [], []
        for p in paths:
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
        if replaced:
            model.update_modules(tree_unflatten(replaced))
        mx.eval([(m.a, m.b) for m in self.layers])

    def route(self, slots) -> None:
        """Give the next forward pass one adapter slot per batch row."""
        import mlx.core as mx

        mask = (self.col_slot[None, :] == slots[:, None]).astype(mx.float32)[:, None, :]
        row_scale = self.scales[slots][:, None, None]
        for m in self.layers:
            m.mask, m.row_scale = mask, row_scale

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
    import psutil

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
    """The message content mlx-lm's server would return for these tokens: decoded by the same
    streaming detokenizer (which, unlike ``tokenizer.decode``, drops the first token's leading
    space), stop words and control sequences stripped by its own text state machine, only the
    "normal" state's text kept."""
    from mlx_lm.generate import TextStateMachine

    detok = tokenizer.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    state = text_sm.make_state(getattr(tokenizer, "response_initial_state", None) or "normal")
    state, segments = TextStateMachine.split(state, detok.text)
    if finish_reason == "length":
        state, flushed, current = TextStateMachine.flush(state)
        segments.append((current, flushed))
    return "".join(text for st, text in segments if st == "normal")


class _Live:
    """One row being generated: its tokens so far and where it stops, as mlx-lm's generator decides."""

    def __init__(self, row: Row, matcher):
        self.row, self.matcher = row, matcher
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.finish: str | None = None

    def advance(self, resp) -> bool:
        """Take the row's next token; True when the row has just finished. A stop sequence's last
        token is not kept, and a stop wins over reaching max_tokens on the same token."""
        if self.matcher.advance(resp.token):
            self.finish = "stop"
            return True
        self.ids.append(int(resp.token))
        if self.row.probe:
            self.lps.append(float(resp.logprobs[resp.token].item()))
        if len(self.ids) >= self.row.max_tokens:
            self.finish = "length"
        return self.finish is not None


def generate(engine: MultiAdapterModel, tokenizer, rows: list[Row], *, stop_words=(), wave: int = 64,
             shared: dict[int, tuple[int, list]] | None = None, on_done=None, prune: float = 0.1) -> dict:
    """Greedy-generate every row; ``on_done(Done)`` is called as each row finishes. Returns where
    the time went (mlx-lm's own counters, summed over waves).

    Rows run in waves of at most ``wave`` rows. mlx-lm's BatchGenerator copies the whole batch KV
    cache each time a row leaves, and would do so at almost every step of an eval, so here a
    stopped row stays in the batch (one row of wasted compute per step) until ``prune`` of the
    wave has stopped, then those rows leave together. Stop words and EOS are matched per row with
    mlx-lm's own StopSequences, exactly where its generator would stop (a multi-token stop word's
    last token is the one dropped; the text state machine strips the rest).

    ``shared[slot] = (n, cache)``: the first n tokens of every row of that slot are already in
    ``cache`` (their common system prompt, prefilled once); the rows start from it without copying
    it (``batch_generate``'s contract: the caches it is given are not updated in place).
    """
    import time

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, make_stop_sequences

    stops = make_stop_sequences(tokenizer, list(stop_words))
    eos_only = make_stop_sequences(tokenizer, [])
    t0 = time.perf_counter()
    totals = {"waves": 0, "prompt_tokens": 0, "prompt_s": 0.0, "decode_tokens": 0, "decode_s": 0.0,
              "useful_tokens": 0}
    n_waves = -(-len(rows) // max(wave, 1))
    size = -(-len(rows) // n_waves) if rows else 1
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        steps = max(r.max_tokens for r in chunk)
        gen = BatchGenerator(engine, max_tokens=steps, stop_tokens=None,
                             completion_batch_size=len(chunk), prefill_batch_size=len(chunk))
        caches, prompts = [], []
        for r in chunk:
            n, cache = (shared or {}).get(r.slot, (0, None))
            if r.probe or cache is None:
                n, cache = 0, engine.new_cache(r.slot)
            else:  # mlx-lm merges the caches it is given into the batch's, never writing to them
                cache = [*cache[:-1], RowSlots(cache[-1].slots)]
            prompts.append(r.tokens[n:])
            caches.append(cache)
        # all rows get the same step count, so the generator itself never drops one mid-wave
        uids = gen.insert(prompts, [steps] * len(chunk), caches=caches)
        live = {uid: _Live(r, (eos_only if r.probe else stops).matcher()) for uid, r in zip(uids, chunk)}
        stopped: list[int] = []
        try:
            with gen.stats() as st:
                while live and (responses := gen.next_generated()):
                    for resp in responses:
                        row = live.get(resp.uid)
                        if row is None or not row.advance(resp):
                            continue  # a stopped row still in the batch, or one that goes on
                        del live[resp.uid]
                        stopped.append(resp.uid)
                        totals["useful_tokens"] += len(row.ids) + (row.finish == "stop")
                        if on_done:
                            on_done(Done(row.row.key, row.ids, row.lps, row.finish, len(row.row.tokens),
                                         time.perf_counter() - t0))
                    if live and len(stopped) >= max(1, prune * len(chunk)):
                        gen.remove(stopped)
                        stopped = []
            totals["waves"] += 1
            totals["prompt_tokens"] += st.prompt_tokens
            totals["prompt_s"] += st.prompt_time
            totals["decode_tokens"] += st.generation_tokens
            totals["decode_s"] += st.decode_time
        finally:
            gen.close()
            del gen
            mx.clear_cache()
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in totals.items()}
