"""``mlxft eval``: score targets (base model, checkpoints, fused models) on a suite.

This module only orchestrates: targets -> an engine per base model (engines.py) -> scores ->
result files (results.py). Before any prompt, every target must answer the probe with its
recorded fingerprint; each scored prompt is appended to ``<suite>.partial.jsonl`` as it lands (a
crash keeps what was done; ``--resume`` continues), and ``<suite>.json`` is written atomically
when the target's last prompt is scored. A result is reused only for the same suite *and* the
same weights (targets.Target.identity); anything else is evaluated again.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from mlx_lm.utils import load_tokenizer

from mlx_ft.bfcl import load_bfcl
from mlx_ft.engine_batched import BatchedEngine, render
from mlx_ft.engine_server import ServerEngine
from mlx_ft.engines import ENGINES, Engine, Reply, Request
from mlx_ft.errors import ServerError, UserError
from mlx_ft.files import append_jsonl, read_json, read_jsonl, write_json
from mlx_ft.results import FORMAT, prompt_row, same_weights, suite_digest, summarize
from mlx_ft.scoring import score
from mlx_ft.server import Server
from mlx_ft.memory import check_memory
from mlx_ft.parsers import Parser, resolve_parser
from mlx_ft.suite import load_suite
from mlx_ft.targets import Target

Log = Callable[[str], None]
Progress = Callable[[int, int], None]  # (prompts scored so far, prompts to score) in this eval


def open_suite(spec: str | Path, limit: int | None = None):
    """A suite from a YAML path or a 'bfcl:CATEGORY[,CATEGORY]' spec."""
    if str(spec).startswith("bfcl:"):
        return load_bfcl(str(spec), limit)
    return load_suite(spec)


class _TargetEval:
    """One target's eval in progress: the prompts scored so far (from a resumed partial file
    too), each kept on disk as it lands, and the result file written when the last one is."""

    def __init__(self, target: Target, suite, parser: Parser, *, resume: bool, log: Log):
        self.target, self.suite, self.parser, self.log = target, suite, parser, log
        self.identity = target.identity()
        self.partial = target.partial_path(suite.name)
        self.done = self._resumed(resume)
        self.todo = [p for p in suite.prompts if p.id not in self.done]
        self.t0 = time.perf_counter()

    def _resumed(self, resume: bool) -> dict[str, dict]:
        if not self.partial.exists():
            return {}
        rows = [r for r in read_jsonl(self.partial)
                if r.get("suite_digest") == self.suite.digest() and same_weights(r, self.identity)]
        if not resume:
            raise UserError(f"{self.partial} holds {len(rows)} finished prompt(s) of an interrupted eval; "
                            "pass --resume to continue it or --force to start over")
        if rows:
            self.log(f"{self.target.name}: resuming, {len(rows)} of {len(self.suite.prompts)} prompts already scored")
        return {r["id"]: r for r in rows}

    def keep(self, prompt, reply: Reply) -> None:
        s = score(self.suite, prompt, reply.text, reply.finish_reason, reply.error, parser=self.parser)
        row = prompt_row(prompt, reply, s)
        self.done[prompt.id] = row
        self.target.out_dir.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.partial, {**row, "suite_digest": self.suite.digest(), "identity": self.identity})

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.suite.prompts)

    def finish(self, probe: dict, engine: dict) -> dict:
        """Write ``<suite>.json`` atomically and drop the partial file."""
        seconds = time.perf_counter() - self.t0
        results = [{k: v for k, v in self.done[p.id].items() if k not in ("suite_digest", "identity")}
                   for p in self.suite.prompts]
        gen, t = self.suite.generation, self.target
        record = {
            "format": FORMAT,
            "suite": {"name": self.suite.name, "path": self.suite.path, "digest": self.suite.digest(),
                      "generation": {"max_tokens": gen.max_tokens, "temperature": gen.temperature,
                                     "stop": gen.stop_sequences},
                      "parser": self.parser.name, **self.suite.record()},
            "target": {"name": t.name, "step": t.step, "model": str(t.model),
                       "adapter": str(t.adapter) if t.adapter else None, "val_loss": t.val_loss,
                       "fingerprint_checked": t.fingerprint is not None},
            "identity": self.identity,
            "engine": engine,
            "probe": probe,
            # batched engine: from loading the model until this target's last prompt was scored, in a
            # batch shared with the other targets (so they overlap; their sum is not the wall time)
            "seconds": round(seconds, 2),
            "prompts_per_second": round(len(self.todo) / seconds, 3) if self.todo and seconds > 0 else None,
            "results": results,
            "summary": summarize(results),
        }
        write_json(self.target.result_path(self.suite.name), record)
        self.partial.unlink(missing_ok=True)
        s = record["summary"]
        self.log(f"{t.name}: score {s['score']:.3f}, strict pass {s['pass_rate']:.1%} on {s['n']} prompts "
                 f"({seconds:.1f} s)")
        return record


def bind(suite, tokenizer):
    """The suite as ``tokenizer``'s model must see it (tools through its chat template, or in the
    system prompt) and the tool-call parser its answers are read with."""
    bound = suite.bind(tokenizer)
    parser = resolve_parser(tokenizer, bound.tool_format)
    gen = bound.generation
    if parser.think not in gen.stop_sequences:  # this model's think marker: a think block ends the answer
        bound = dataclasses.replace(bound, generation=dataclasses.replace(gen, stop=(*gen.stop, parser.think)))
    return bound, parser


def prepare(targets: list[Target], suite, parser: Parser, *, resume: bool = False,
            log: Log = lambda s: None) -> list[_TargetEval]:
    """Each target's eval, with what an interrupted eval already scored (refused without resume).
    ``suite`` is already bound to the targets' tokenizer (:func:`bind`)."""
    return [_TargetEval(t, suite, parser, resume=resume, log=log) for t in targets]


def run_engine(engine: Engine, evals: list[_TargetEval], *, progress: Progress | None = None) -> list[dict]:
    """Probe every target, then generate and score every prompt not yet scored; one result per target."""
    probes = engine.probe([e.target for e in evals])
    records = [e.finish(probes[e.target.name], engine.details()) for e in evals if e.complete]
    requests = [Request(e.target, p) for e in evals for p in e.todo]
    by_name = {e.target.name: e for e in evals}
    try:
        for n, (req, reply) in enumerate(engine.generate(requests), 1):
            ev = by_name[req.target.name]
            ev.keep(req.prompt, reply)
            if progress:
                progress(n, len(requests))
            if ev.complete:
                records.append(ev.finish(probes[ev.target.name], engine.details()))
    except ServerError as e:
        kept = ", ".join(f"{e.target.name}: {len(e.done)}" for e in evals if not e.complete)
        head, _, rest = str(e).partition("\n")
        raise ServerError(f"{head}; the prompts scored so far are kept ({kept}): rerun with --resume to continue"
                          + (f"\n{rest}" if rest else "")) from e
    return records


def reusable(target: Target, suite, force: bool, log: Log) -> dict | None:
    """The target's finished result for this suite and these weights, if there is one to reuse."""
    path = target.result_path(suite.name)
    if force:
        target.partial_path(suite.name).unlink(missing_ok=True)
        return None
    if not path.exists():
        return None
    old = read_json(path)
    if suite_digest(old) != suite.digest():
        raise UserError(f"{path} was written for a different version of suite {suite.name!r}; "
                        "pass --force to replace it")
    if not same_weights(old, target.identity()):
        log(f"{target.name}: {path} was written for other weights (the checkpoint changed since, or the file "
            "predates weight checks); evaluating it again")
        return None
    log(f"{target.name}: already evaluated on {suite.name} ({path}); --force to redo")
    return old


def open_engine(engine: str, model: Path, group: list[Target], suite, *, port: int | None, concurrency: int,
                server_factory, log: Log, log_dir: Path | None) -> Engine:
    if engine == "batched":
        return BatchedEngine.load(model, group, suite, wave=concurrency, log=log)
    log_path = (log_dir or group[0].out_dir.parent) / f"server-{int(time.time())}.log"
    return ServerEngine(model, suite, port=port, concurrency=concurrency, log_path=log_path,
                        server_factory=server_factory, log=log)


def evaluate_targets(targets: list[Target], suite, *, engine: str = "batched", port: int | None = None,
                     resume: bool = False, force: bool = False, concurrency: int = 256, server_factory=Server,
                     log: Log = lambda s: None, log_dir: Path | None = None,
                     progress: Progress | None = None, tokenizer_loader=load_tokenizer,
                     memory_check=check_memory) -> list[dict]:
    """Evaluate every target; results already complete for this suite and these weights are reused.

    ``engine="batched"`` (default): all targets of a base model in one in-process batch, up to
    ``concurrency`` sequences per wave. ``engine="server"``: one isolated ``mlx_lm.server`` per base
    model, one target after another, ``concurrency`` requests in flight.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    by_model: dict[Path, list[Target]] = collections.defaultdict(list)
    for t in targets:
        by_model[t.model.resolve()].append(t)
    records = []
    for model, group in by_model.items():
        tokenizer = tokenizer_loader(model)  # the tokenizer alone: how to render the suite, how to parse
        bound, parser = bind(suite, tokenizer)
        pending = []
        for t in group:
            old = reusable(t, bound, force, log)
            records.append(old) if old is not None else pending.append(t)
        if not pending:
            continue
        if engine == "server":
            check_server_can_score(tokenizer, model)
        evals = prepare(pending, bound, parser, resume=resume, log=log)  # before loading the model
        _check_memory(memory_check, engine, model, tokenizer, bound, evals, concurrency, log)
        with open_engine(engine, model, pending, bound, port=port, concurrency=concurrency,
                         server_factory=server_factory, log=log, log_dir=log_dir) as eng:
            records.extend(run_engine(eng, evals, progress=progress))
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(records, key=lambda r: order.get(r["target"]["name"], 0))


def _check_memory(memory_check, engine: str, model: Path, tokenizer, suite, evals: list[_TargetEval],
                  concurrency: int, log: Log) -> None:
    """Refuse an eval whose weights, adapters and KV cache would not fit, before loading anything."""
    longest = max((len(render(tokenizer, suite, p)) for p in suite.prompts), default=0) if tokenizer else 2048
    rows = sum(len(e.todo) for e in evals) if engine == "batched" else len(suite.prompts)
    memory_check("eval", model, log=log, adapters=sum(e.target.adapter is not None for e in evals),
                 rows=min(concurrency, max(rows, 1)), tokens=longest + suite.generation.max_tokens)


def check_server_can_score(tokenizer, model: Path) -> None:
    """mlx_lm.server moves tool calls into ``tool_calls`` and reasoning out of ``content``: the raw
    text the scorer reads is gone. Such models are scored by the batched engine only."""
    if getattr(tokenizer, "has_tool_calling", False) or getattr(tokenizer, "has_thinking", False):
        what = "tool calls" if getattr(tokenizer, "has_tool_calling", False) else "thinking blocks"
        raise UserError(f"{model}: its tokenizer parses {what}, and mlx_lm.server returns them outside the "
                        "message text, so --engine server cannot show the scorer what the model wrote; use "
                        "--engine batched (the default)")
