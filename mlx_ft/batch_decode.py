"""The batched greedy decode loop: rows of (adapter slot, prompt) in waves, each row's tokens
until its stop, as mlx-lm's generator would give them.

mlx-lm's PromptProcessingBatch prefills each wave's rows into its batch KV cache classes (rows of
similar length together); a small greedy loop (:func:`decode`) then decodes them, taking only the
argmax where mlx-lm's generator would normalise every row over the whole vocabulary. The model is
a :class:`mlx_ft.batched.MultiAdapterModel`: each row carries its slot through the cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import psutil
from mlx_lm.generate import PromptProcessingBatch, TextStateMachine, _extend_cache, make_stop_sequences

from mlx_ft.batched import MultiAdapterModel, RowSlots
from mlx_ft.errors import WrongModelError
from mlx_ft.fingerprint import PROBE_MESSAGES, PROBE_TOKENS, compare


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
