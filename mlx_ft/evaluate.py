"""``mlxft eval``: score targets (base model, checkpoints, fused models) on a suite.

Two engines, one contract. ``batched`` (default): every target of a base model in one in-process
batch, each row routed to its adapter (../batched.py). ``server``: one isolated ``mlx_lm.server``
per base model serves every target of that base as a per-request adapter (``model`` + ``adapters``
in the body; see ../server.py for why both), its prompts in flight at once so the server batches
them. Either way, before any prompt each target must answer the probe with its recorded
fingerprint; each prompt's result is appended to ``<suite>.partial.jsonl`` as it lands (a crash
keeps what was done; ``--resume`` continues), and ``<suite>.json`` is written atomically when the
target's last prompt is scored.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlx_ft.checkpoints import complete_checkpoints
from mlx_ft.errors import EvalError, ServerError, UserError
from mlx_ft.files import append_jsonl, read_json, read_jsonl, write_json
from mlx_ft.scoring import score
from mlx_ft.server import Reply, Server
from mlx_ft.suite import Suite

FORMAT = "mlxft-eval/1"
BASE = "base"
ENGINES = ("batched", "server")


@dataclass(frozen=True)
class Target:
    name: str  # "base", "step_000100", "fused"
    model: Path
    adapter: Path | None
    out_dir: Path  # results go to out_dir/<suite>.json
    step: int | None = None
    fingerprint: dict | None = None
    val_loss: float | None = None

    def result_path(self, suite: Suite) -> Path:
        return self.out_dir / f"{suite.name}.json"

    def partial_path(self, suite: Suite) -> Path:
        return self.out_dir / f"{suite.name}.partial.jsonl"


def run_targets(run_dir: str | Path) -> list[Target]:
    """The base model as step 0, then every complete checkpoint (manifest present)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no run.json); train one with `mlxft train`")
    run = read_json(run_dir / "run.json")
    model = Path(run["model_path"])
    targets = [Target(BASE, model, None, run_dir / "evals" / BASE, 0, run["base"].get("fingerprint"),
                      run["base"].get("val_loss"))]
    for c in complete_checkpoints(run_dir):
        targets.append(Target(c.name, Path(c.manifest.get("base_model", model)), c.path, run_dir / "evals" / c.name,
                              c.step, c.manifest.get("fingerprint"), c.manifest.get("val_loss")))
    return targets


def single_target(model: str | Path | None, adapter: str | Path | None, out: str | Path | None) -> Target:
    """A target from --model/--adapter, with its fingerprint if one was recorded next to it."""
    from mlx_ft.models import resolve_model

    if model is None and adapter and (Path(adapter) / "adapter_config.json").is_file():
        model = read_json(Path(adapter) / "adapter_config.json").get("model")  # the base it was trained on
    model = resolve_model(str(model) if model else None)
    fp, name, step, val = None, Path(model).name, None, None
    if adapter:
        adapter = Path(adapter)
        if not (adapter / "adapters.safetensors").is_file():
            raise UserError(f"{adapter}: no adapters.safetensors; give a checkpoint folder")
        manifest = adapter / "manifest.json"
        if manifest.is_file():
            m = read_json(manifest)
            fp, step, val = m.get("fingerprint"), m.get("step"), m.get("val_loss")
        name = adapter.name
        run_dir = adapter.parent.parent
        default_out = run_dir / "evals" / name if (run_dir / "run.json").is_file() else adapter / "evals"
    else:
        for record in ("fused.json", "mlxft_import.json"):
            if (Path(model) / record).is_file():
                fp = read_json(Path(model) / record).get("fingerprint")
        default_out = Path(model) / "evals"
    return Target(name, Path(model), Path(adapter) if adapter else None, Path(out) if out else default_out, step, fp, val)


def summarize(results: list[dict]) -> dict:
    def block(rows: list[dict]) -> dict:
        n = len(rows)
        return {"n": n, "score": round(sum(r["value"] for r in rows) / n, 4) if n else None,
                "pass_rate": round(sum(r["passed"] for r in rows) / n, 4) if n else None,
                "codes": dict(collections.Counter(r["code"] for r in rows).most_common())}

    cats: dict[str, list[dict]] = collections.defaultdict(list)
    for r in results:
        cats[r["category"]].append(r)
    return {**block(results), "categories": {c: block(rows) for c, rows in cats.items()}}


def _prompt_row(suite: Suite, prompt, reply) -> dict:
    s = score(suite, prompt, reply.text, reply.finish_reason, reply.error)
    return {"id": prompt.id, "category": prompt.category, "text": reply.text, "finish_reason": reply.finish_reason,
            "value": s.value, "passed": s.passed, "code": s.code, "explanation": s.explanation,
            "extracted": s.extracted, "completion_tokens": reply.completion_tokens,
            "prompt_tokens": reply.prompt_tokens, "latency_s": round(reply.latency_s, 3)}


def _resume_rows(suite: Suite, target: Target, resume: bool, log: Callable[[str], None]) -> dict[str, dict]:
    """Prompts already scored by an interrupted eval of this target (refused without --resume)."""
    partial = target.partial_path(suite)
    done: dict[str, dict] = {}
    if partial.exists():
        rows = [r for r in read_jsonl(partial) if r.get("suite_fingerprint") == suite.fingerprint()]
        if not resume:
            raise UserError(f"{partial} holds {len(rows)} finished prompt(s) of an interrupted eval; "
                            "pass --resume to continue it or --force to start over")
        done = {r["id"]: r for r in rows}
        if done:
            log(f"{target.name}: resuming, {len(done)} of {len(suite.prompts)} prompts already scored")
    target.out_dir.mkdir(parents=True, exist_ok=True)
    return done


def _keep(suite: Suite, target: Target, done: dict[str, dict], prompt, reply) -> None:
    row = _prompt_row(suite, prompt, reply)
    done[prompt.id] = row
    append_jsonl(target.partial_path(suite), {**row, "suite_fingerprint": suite.fingerprint()})


def _finish(suite: Suite, target: Target, done: dict[str, dict], *, probe: dict, seconds: float, asked: int,
            engine: dict, log: Callable[[str], None]) -> dict:
    """Write the target's ``<suite>.json`` atomically and drop its partial file."""
    gen = suite.generation
    results = [{k: v for k, v in done[p.id].items() if k != "suite_fingerprint"} for p in suite.prompts]
    record = {
        "format": FORMAT,
        "suite": {"name": suite.name, "path": suite.path, "fingerprint": suite.fingerprint(),
                  "generation": {"max_tokens": gen.max_tokens, "temperature": gen.temperature,
                                 "stop": gen.stop_sequences}},
        "target": {"name": target.name, "step": target.step, "model": str(target.model),
                   "adapter": str(target.adapter) if target.adapter else None, "val_loss": target.val_loss,
                   "fingerprint_checked": target.fingerprint is not None},
        "engine": engine,
        "probe": probe,
        "seconds": round(seconds, 2),
        "prompts_per_second": round(asked / seconds, 3) if asked and seconds > 0 else None,
        "results": results,
        "summary": summarize(results),
    }
    write_json(target.result_path(suite), record)
    target.partial_path(suite).unlink(missing_ok=True)
    s = record["summary"]
    log(f"{target.name}: score {s['score']:.3f}, strict pass {s['pass_rate']:.1%} on {s['n']} prompts "
        f"({seconds:.1f} s)")
    return record


def evaluate_target(server: Server, suite: Suite, target: Target, *, resume: bool, concurrency: int,
                    log: Callable[[str], None]) -> dict:
    """One target through the server engine: probe, then every prompt in flight at once."""
    partial = target.partial_path(suite)
    done = _resume_rows(suite, target, resume, log)
    t0 = time.perf_counter()
    probe = server.verify(target.fingerprint, adapter=str(target.adapter) if target.adapter else None)
    todo = [p for p in suite.prompts if p.id not in done]
    gen = suite.generation
    adapter = str(target.adapter) if target.adapter else None
    if len(todo) > 1:
        # One 1-token request first: the server caches the KV of the shared system prompt, and the
        # concurrent batch below starts from that cache instead of prefilling it once per prompt.
        server.chat(suite.messages(todo[0]), adapter=adapter, max_tokens=1, temperature=gen.temperature)

    def ask(prompt):
        return prompt, server.chat(suite.messages(prompt), adapter=adapter,
                                   max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                   stop=gen.stop_sequences)

    with cf.ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(todo) or 1))) as pool:
        futures = [pool.submit(ask, p) for p in todo]
        try:
            for fut in cf.as_completed(futures):
                prompt, reply = fut.result()
                if reply.error and not server.alive():
                    raise ServerError(
                        f"the server died during the eval of {target.name} ({len(done)} of {len(suite.prompts)} "
                        f"prompts scored and kept in {partial}); rerun with --resume. Log:\n{server.log_tail()}")
                _keep(suite, target, done, prompt, reply)
        except BaseException:
            for f in futures:
                f.cancel()
            server.close()  # in-flight requests fail at once instead of holding the pool open
            raise
    return _finish(suite, target, done, probe=probe, seconds=time.perf_counter() - t0, asked=len(todo),
                   engine={"name": "server"}, log=log)


def evaluate_batched(model_path: Path, group: list[Target], suite: Suite, *, resume: bool, wave: int,
                     log: Callable[[str], None]) -> list[dict]:
    """Every target of one base model in one in-process batch (see ../batched.py).

    Same contract as the server engine: each target's probe must match its recorded fingerprint
    before any prompt is generated, each scored prompt is appended to its partial file as it
    lands, and a target's ``<suite>.json`` is written as soon as its last prompt is scored.
    """
    from mlx_lm.generate import make_text_state_machine
    from mlx_lm.utils import load

    from mlx_ft import batched

    if suite.generation.temperature != 0:
        raise UserError(f"{suite.path}: generation.temperature {suite.generation.temperature}; the batched engine "
                        "is greedy only (temperature 0); use --engine server for sampling")
    t0 = time.perf_counter()
    done = {t.name: _resume_rows(suite, t, resume, log) for t in group}
    model, tokenizer = load(str(model_path))
    adapters: list = [None]
    slot: dict[str, int] = {}
    for t in group:
        if t.adapter:
            adapters.append(batched.read_adapter(Path(t.adapter), model))
        slot[t.name] = len(adapters) - 1 if t.adapter else 0
    engine = batched.MultiAdapterModel(model, adapters)
    log(f"batched engine: {model_path.name} loaded with {len(adapters) - 1} adapter(s) in "
        f"{time.perf_counter() - t0:.1f} s")

    probes: dict[int, batched.Done] = {}
    batched.generate(engine, tokenizer, batched.probe_rows(tokenizer, {slot[t.name]: t.fingerprint for t in group}),
                     on_done=lambda d: probes.__setitem__(d.key, d))
    probe = {t.name: batched.check_probe(t.name, t.fingerprint, probes[slot[t.name]]) for t in group}

    gen = suite.generation
    tokens = {p.id: tokenizer.apply_chat_template(suite.messages(p), add_generation_prompt=True)
              for p in suite.prompts}
    todo = {t.name: [p for p in suite.prompts if p.id not in done[t.name]] for t in group}
    rows = [batched.Row(slot[t.name], (t.name, p.id), tokens[p.id], gen.max_tokens)
            for t in group for p in todo[t.name]]
    n = batched.common_prefix([r.tokens for r in rows])
    used = sorted({slot[t.name] for t in group if todo[t.name]})
    shared = {s: (n, engine.prefill(s, rows[0].tokens[:n])) for s in used} if rows else {}
    if rows:
        longest = max(len(r.tokens) for r in rows) + gen.max_tokens
        wave = batched.wave_size(shared[used[0]][1], longest, wave)
        log(f"batched engine: {len(rows)} prompts of {sum(bool(v) for v in todo.values())} target(s) in waves of "
            f"up to {wave} rows; shared prompt prefix {n} tokens, prefilled once per target")
    by_name = {t.name: t for t in group}
    prompts = {p.id: p for p in suite.prompts}
    left = {name: len(v) for name, v in todo.items()}
    text_sm = make_text_state_machine(tokenizer, gen.stop_sequences)
    records: list[dict] = []

    def finish(name: str) -> None:
        t = by_name[name]
        # seconds: from loading the model until this target's last prompt was scored, in a batch
        # shared with the other targets (so they overlap; their sum is not the wall time)
        records.append(_finish(suite, t, done[name], probe=probe[name], seconds=time.perf_counter() - t0,
                               asked=len(todo[name]), log=log,
                               engine={"name": "batched", "targets_in_batch": len(group), "rows": len(rows)}))

    def on_done(d: batched.Done) -> None:
        name, pid = d.key
        text = batched.reply_text(tokenizer, text_sm, d.token_ids, d.finish_reason)
        reply = Reply(text, d.finish_reason, len(d.token_ids) + (d.finish_reason == "stop"), d.prompt_tokens,
                      d.seconds)
        _keep(suite, by_name[name], done[name], prompts[pid], reply)
        left[name] -= 1
        if left[name] == 0:
            finish(name)

    for name, count in left.items():
        if count == 0:  # everything was already in the partial file
            finish(name)
    stats = batched.generate(engine, tokenizer, rows, stop_words=gen.stop_sequences, wave=wave, shared=shared,
                             on_done=on_done)
    if rows:
        log(f"batched engine: prefill {stats['prompt_tokens']} tokens in {stats['prompt_s']:.1f} s, decode "
            f"{stats['decode_tokens']} tokens ({stats['useful_tokens']} kept) in {stats['decode_s']:.1f} s")
    return records


def evaluate(targets: list[Target], suite: Suite, *, engine: str = "batched", port: int | None = None,
             resume: bool = False, force: bool = False, concurrency: int = 256, server_factory=Server,
             log: Callable[[str], None] = lambda s: None, log_dir: Path | None = None) -> list[dict]:
    """Evaluate every target; already complete results (same suite) are reused, not redone.

    ``engine="batched"`` (default): all targets of a base model in one in-process batch, up to
    ``concurrency`` sequences per wave. ``engine="server"``: one isolated ``mlx_lm.server`` per base
    model, one target after another, ``concurrency`` requests in flight.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    records, pending = [], []
    for t in targets:
        path = t.result_path(suite)
        if path.exists() and not force:
            old = read_json(path)
            if old.get("suite", {}).get("fingerprint") == suite.fingerprint():
                log(f"{t.name}: already evaluated on {suite.name} ({path}); --force to redo")
                records.append(old)
                continue
            raise UserError(f"{path} was written for a different version of suite {suite.name!r}; "
                            "pass --force to replace it")
        if force:
            t.partial_path(suite).unlink(missing_ok=True)
        pending.append(t)
    by_model: dict[Path, list[Target]] = collections.defaultdict(list)
    for t in pending:
        by_model[t.model.resolve()].append(t)
    for model, group in by_model.items():
        if engine == "batched":
            records.extend(evaluate_batched(model, group, suite, resume=resume, wave=concurrency, log=log))
            continue
        log_path = (log_dir or group[0].out_dir.parent) / f"server-{int(time.time())}.log"
        with server_factory(model, port=port, log_path=log_path, max_tokens=suite.generation.max_tokens,
                            concurrency=concurrency, log=log) as server:
            for t in group:
                records.append(evaluate_target(server, suite, t, resume=resume, concurrency=concurrency, log=log))
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(records, key=lambda r: order.get(r["target"]["name"], 0))


def load_results(run_dir: str | Path, suite_name: str) -> dict[str, dict]:
    """Complete eval results of a run for one suite, by target name. Raises if any is missing."""
    targets = run_targets(run_dir)
    found, missing = {}, []
    for t in targets:
        path = t.out_dir / f"{suite_name}.json"
        if path.is_file():
            found[t.name] = read_json(path)
        else:
            missing.append(t.name)
    if missing:
        raise EvalError(f"{run_dir}: no {suite_name} eval for {', '.join(missing)}; run "
                        f"`mlxft eval --run {run_dir} --prompts <suite>` (or pass --eval-missing)")
    return found
