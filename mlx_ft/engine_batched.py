"""The ``batched`` engine: every target of one base model in one in-process batch (batched.py, batch_decode.py).

The base is loaded once; each adapter target gets a slot, and every (target, prompt) request is a
row of mlx-lm's BatchGenerator routed to its slot. Greedy only. A model already in memory (the
training loop's, with its LoRA layers live) is served as is, as slot 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlx_lm.generate import TextStateMachine
from mlx_lm.utils import load

from mlx_ft import batch_decode, batched, doctor
from mlx_ft.engines import Reply, Request
from mlx_ft.errors import UserError


def raw_text_machine(stop_words: list[str]) -> TextStateMachine:
    """mlx-lm's text state machine with the stop words only: it strips a stop word the way the
    server does, and keeps everything else -- tool-call and think markers included -- because the
    scorer reads what the model wrote, with the model's own parser."""
    return TextStateMachine({"normal": [(w, "normal") for w in stop_words]} if stop_words else None)


def render(tokenizer, suite, prompt) -> list[int]:
    """The prompt's tokens exactly as the chat template renders its messages (and tools)."""
    tools = suite.tools(prompt)
    if tools:
        return tokenizer.apply_chat_template(suite.messages(prompt), tools=tools, add_generation_prompt=True)
    return tokenizer.apply_chat_template(suite.messages(prompt), add_generation_prompt=True)


class BatchedEngine:
    name = "batched"

    def __init__(self, model, tokenizer, suite, adapters: dict[str, batched.Adapter | None], *, wave: int = 256,
                 log: Callable[[str], None] = lambda s: None):
        """``adapters``: each target's adapter by target name (None: the model as it is)."""
        if suite.generation.temperature != 0:
            raise UserError(f"{suite.path}: generation.temperature {suite.generation.temperature}; the batched "
                            "engine is greedy only (temperature 0); use --engine server for sampling")
        self.tokenizer, self.suite, self.wave, self.log = tokenizer, suite, wave, log
        stack: list[batched.Adapter | None] = [None]
        self.slot: dict[str, int] = {}
        for name, a in adapters.items():
            if a is not None:
                stack.append(a)
            self.slot[name] = len(stack) - 1 if a is not None else 0
        self.params = matmul_params(model)  # before the adapters go in: the base's own matmuls
        self.multi = batched.MultiAdapterModel(model, stack)
        self.stats: dict = {}
        self.text_sm = raw_text_machine(suite.generation.stop_sequences)

    @classmethod
    def load(cls, model_path: Path, targets: list, suite, *, wave: int = 256,
             log: Callable[[str], None] = lambda s: None) -> "BatchedEngine":
        t0 = time.perf_counter()
        model, tokenizer = load(str(model_path))
        adapters = {t.name: batched.read_adapter(Path(t.adapter), model) if t.adapter else None for t in targets}
        engine = cls(model, tokenizer, suite, adapters, wave=wave, log=log)
        log(f"batched engine: {Path(model_path).name} loaded with {sum(a is not None for a in adapters.values())} "
            f"adapter(s) in {time.perf_counter() - t0:.1f} s")
        return engine

    def __enter__(self) -> "BatchedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.multi = None

    def details(self) -> dict:
        """What ran, and how close decode came to the machine's compute ceiling (so far, when a
        target finishes before the batch does)."""
        st = self.stats
        return {"name": self.name, "targets": len(self.slot), "rows": st.get("rows"), "waves": st.get("waves"),
                "decode_tokens_per_s": _rate(st), "matmul_gflops": st.get("ceiling_gflops"),
                "ceiling_fraction": ceiling_fraction(st, self.params)}

    def probe(self, targets: list) -> dict[str, dict]:
        """Every target's probe, one row per slot, all in one batch through the same routing."""
        rows = batch_decode.probe_rows(self.tokenizer, {self.slot[t.name]: t.fingerprint for t in targets})
        done = {d.key: d for d in batch_decode.decode(self.multi, self.tokenizer, rows, wave=len(rows))}
        return {t.name: batch_decode.check_probe(t.name, t.fingerprint, done[self.slot[t.name]]) for t in targets}

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Reply]]:
        gen = self.suite.generation
        tokens: dict[str, list[int]] = {}
        for r in requests:
            if r.prompt.id not in tokens:
                tokens[r.prompt.id] = render(self.tokenizer, self.suite, r.prompt)
        rows = [batch_decode.Row(self.slot[r.target.name], i, tokens[r.prompt.id], gen.max_tokens)
                for i, r in enumerate(requests)]
        if not rows:
            return
        shared, wave = self._shared_prefix(rows)
        self.stats = {"rows": len(rows), "ceiling_gflops": measure_ceiling()}
        for d in batch_decode.decode(self.multi, self.tokenizer, rows, stop_words=gen.stop_sequences, wave=wave,
                                shared=shared, stats=self.stats):
            text = batch_decode.reply_text(self.tokenizer, self.text_sm, d.token_ids, d.finish_reason)
            yield requests[d.key], Reply(text, d.finish_reason, len(d.token_ids) + (d.finish_reason == "stop"),
                                         d.prompt_tokens, d.seconds)
        self.stats["ceiling_gflops"] = max(self.stats["ceiling_gflops"], measure_ceiling())
        self.log(summary(self.stats, self.params))

    def _shared_prefix(self, rows: list[batch_decode.Row]) -> tuple[dict, int]:
        """The rows' common prompt prefix (the system prompt), prefilled once per slot, and the
        wave size that lets the KV cache fit in memory."""
        n = batch_decode.common_prefix([r.tokens for r in rows])
        slots = sorted({r.slot for r in rows})
        shared = {s: (n, self.multi.prefill(s, rows[0].tokens[:n])) for s in slots}
        longest = max(len(r.tokens) for r in rows) + max(r.max_tokens for r in rows)
        wave = batch_decode.wave_size(shared[slots[0]][1], longest, self.wave)
        self.log(f"batched engine: {len(rows)} prompts of {len(slots)} target(s) in waves of up to {wave} rows; "
                 f"shared prompt prefix {n} tokens, prefilled once per target")
        return shared, wave


def matmul_params(model) -> int | None:
    """The weights one token's forward pass multiplies with: every parameter (quantized weights
    counted unpacked, quantization scales/biases not), less an embedding table that only looks
    tokens up (one tied to the output layer is a matmul and counts). None for mixture-of-experts
    models, whose tokens use only some experts' weights."""
    from mlx import nn
    from mlx.utils import tree_flatten

    n = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda v: isinstance(v, nn.Module)):
        if batched._kind(m) == "switch":
            return None
        bits = getattr(m, "bits", None)
        for name, v in tree_flatten(m.parameters()):
            if bits and name in ("scales", "biases"):
                continue
            n += v.size * 32 // bits if bits and name == "weight" else v.size
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is not None and embed is not None:
        n -= embed.weight.size * (32 // embed.bits if hasattr(embed, "bits") else 1)
    return n


def measure_ceiling(tries: int = 3) -> float:
    """This machine's matmul GFLOP/s as ``mlxft doctor`` measures it (512² float32), best of a few
    tries: the ceiling decode is compared with, taken at the time of the eval."""
    return round(max(doctor.matmul_gflops() for _ in range(tries)), 1)


def _rate(st: dict) -> float | None:
    return round(st["decode_tokens"] / st["decode_s"], 1) if st.get("decode_s") else None


def ceiling_fraction(st: dict, params: int | None) -> float | None:
    """Decode's matmul rate (2 FLOPs per weight per token, every row of the batch counted, stopped
    rows waiting to leave included) over the machine's measured matmul GFLOP/s."""
    if not params or not st.get("decode_s") or not st.get("ceiling_gflops"):
        return None
    return round(_rate(st) * 2 * params / 1e9 / st["ceiling_gflops"], 3)


def summary(st: dict, params: int | None) -> str:
    """The engine's line after decode: where the time went, and how far below the machine's
    compute ceiling decode ran (an eval far below it has something else eating the machine)."""
    line = (f"batched engine: prefill {st['prompt_tokens']} tokens in {st['prompt_s']:.1f} s, decode "
            f"{st['decode_tokens']} tokens ({st['useful_tokens']} kept) in {st['decode_s']:.1f} s")
    frac = ceiling_fraction(st, params)
    if frac is None:
        return line
    return (line + f" = {_rate(st):.0f} tokens/s x {2 * params / 1e9:.2f} GFLOP = {frac:.0%} of this machine's "
            f"matmul ceiling ({st['ceiling_gflops']:.0f} GFLOP/s, as mlxft doctor measures it)")
