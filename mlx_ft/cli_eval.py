"""The eval command (a thin shell over evaluate.py), its tables, and spreading targets over hosts."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_ft.cli_common import emit, errors, log
from mlx_ft.tables import excerpt, pct, table


def eval_tables(records: list[dict]) -> str:
    """Per-prompt table (one column per target) and per-category table, to compare targets side by side."""
    if not records:
        return "nothing evaluated"
    names = [r["target"]["name"] for r in records]
    by_id = [{x["id"]: x for x in r["results"]} for r in records]
    first = records[0]["results"]
    if len(records) == 1:
        rows = [[x["id"], x["category"], x["value"], "yes" if x["passed"] else "no", x["code"],
                 f"{x['latency_s']:.1f}s", excerpt(x["text"])] for x in first]
        prompt_table = table(["prompt", "category", "score", "pass", "code", "time", "output"], rows)
    else:
        rows = [[x["id"]] + [f"{m[x['id']]['value']:.1f} {m[x['id']]['code']}" for m in by_id] for x in first]
        prompt_table = table(["prompt"] + names, rows)
    cats = list(records[0]["summary"]["categories"])
    cat_rows = [[c] + [pct(r["summary"]["categories"][c]["score"]) for r in records] for c in cats]
    cat_rows.append(["overall"] + [pct(r["summary"]["score"]) for r in records])
    cat_rows.append(["strict pass"] + [pct(r["summary"]["pass_rate"]) for r in records])
    cat_table = table(["category"] + names, cat_rows)
    return f"{prompt_table}\n\n{cat_table}"


@click.command("eval")
@click.option("--prompts", "--suite", "suite_path", default="evals/tools.yaml", show_default=True,
              help="Eval suite YAML (format: README), or bfcl:CATEGORY[,CATEGORY] for a BFCL suite "
                   "(needs `pip install --no-deps bfcl-eval`).")
@click.option("--limit", type=int, help="BFCL: a deterministic sample of N prompts, split evenly over categories.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Evaluate the run's base model (step 0) and every complete checkpoint.")
@click.option("--model", help="Model folder, or a Hugging Face repo id in the HF cache, to evaluate "
                             "(default: the embedded model).")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), help="Checkpoint folder to apply.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where results go for --model/--adapter (default: next to the target; for a model in the "
                   "Hugging Face cache, runs/models/<name>/evals).")
@click.option("--engine", type=click.Choice(["batched", "server"]), default="batched", show_default=True,
              help="batched: every target of a base model in one in-process batch (fastest; greedy only). "
                   "server: an isolated mlx_lm.server per base model, targets one after another.")
@click.option("--port", type=int, help="Server engine: port for the server (default: a free one). A taken port is refused.")
@click.option("--concurrency", type=int, default=256, show_default=True,
              help="Most sequences generated at once (batched: rows per wave, also capped so the wave's KV "
                   "cache fits in a quarter of free memory; server: requests in flight).")
@click.option("--only", help="With --run: evaluate only these targets (comma-separated, e.g. base,step_000100).")
@click.option("--hosts", "hostfile", type=click.Path(dir_okay=False, path_type=Path),
              help="With --run: deal the targets over the hosts of an mlx.launch hostfile, one job per host; "
                   "results are copied back into RUN/evals/ (docs/distributed.md).")
@click.option("--resume", is_flag=True, help="Continue an interrupted eval, keeping finished prompts.")
@click.option("--force", is_flag=True, help="Re-evaluate targets that already have results.")
@click.option("--json", "as_json", is_flag=True, help="Print all results as JSON.")
@errors
def eval_cmd(suite_path, limit, run_dir, model, adapter, out, engine, port, concurrency, only, hostfile, resume, force,
             as_json):
    """Score targets (base model, checkpoints, a fused model) on a tool-call suite.

    Every target must first answer a fixed probe exactly as recorded when it was written (token
    ids and log-probabilities), so a wrong or silently ignored adapter is refused, not scored.

    Results: RUN/evals/<checkpoint>/<suite>.json (every prompt's raw text, score, strict pass,
    failure code, tokens, latency; totals per suite and category).
    """
    from mlx_ft.errors import UserError
    from mlx_ft.console import progress_bar
    from mlx_ft.evaluate import evaluate_targets, open_suite
    from mlx_ft.targets import run_targets, single_target

    suite = open_suite(suite_path, limit)
    if concurrency < 1:
        raise UserError(f"--concurrency {concurrency}: must be at least 1")
    if port is not None and engine != "server":
        raise UserError("--port is for --engine server (the batched engine runs in-process and opens no port)")
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--port {port} is out of range; use 1-65535, or leave it out to pick a free port")
    if run_dir and (model or adapter):
        raise UserError("give either --run or --model/--adapter, not both")
    if (only or hostfile) and not run_dir:
        raise UserError("--only and --hosts select among a run's targets: give --run")
    if hostfile and port is not None:
        raise UserError("--port cannot be used with --hosts: each host picks its own free port")
    targets = run_targets(run_dir) if run_dir else [single_target(model, adapter, out)]
    if run_dir:
        from mlx_ft.preflight import eval_mismatches

        for w in eval_mismatches(run_dir, suite):
            log(f"WARNING: {suite.path}: {w}")
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(names) - {t.name for t in targets})
        if unknown:
            raise UserError(f"--only {','.join(unknown)}: not a target of {run_dir}; its targets are "
                            f"{', '.join(t.name for t in targets)}")
        targets = [t for t in targets if t.name in names]
    if hostfile:
        records = _eval_spread(targets, suite, hostfile, suite_path=suite_path, limit=limit, run_dir=run_dir,
                               engine=engine, concurrency=concurrency, resume=resume, force=force)
        emit(records, as_json, eval_tables(records))
        return
    records = evaluate_targets(targets, suite, engine=engine, port=port, resume=resume, force=force,
                               concurrency=concurrency, log=log, log_dir=Path(run_dir) if run_dir else None,
                               progress=progress_bar(f"eval {suite.name}"))
    emit(records, as_json, eval_tables(records))


def _eval_spread(targets, suite, hostfile, *, suite_path, limit, run_dir, engine, concurrency, resume, force):
    """Deal the targets over the hosts; each host runs `mlxft eval --only` on its hand (hosts.py)."""
    from mlx_ft.files import read_json
    from mlx_ft.hosts import Job, deal, load_hosts, mlxft_argv, spread

    hosts = load_hosts(hostfile)
    suite_file = Path(suite_path).resolve() if Path(suite_path).is_file() else None  # else bfcl:...
    common = ["eval", "--run", str(Path(run_dir).resolve()), "--prompts", str(suite_file or suite_path),
              "--engine", engine, "--concurrency", str(concurrency)]
    common += (["--limit", str(limit)] if limit else []) + (["--resume"] if resume else [])
    common += ["--force"] if force else []
    jobs = []
    for hand in deal(targets, len(hosts)):
        names = ",".join(t.name for t in hand)
        jobs.append(Job(f"eval {names}", mlxft_argv(*common, "--only", names), outputs=[t.out_dir for t in hand],
                        inputs=[suite_file] if suite_file else [],
                        log_path=Path(run_dir) / "evals" / f"spread-{len(jobs)}.log"))
    log(f"spreading {len(targets)} target(s) over {len(jobs)} host(s)")
    spread(jobs, hosts, log=log)
    return [read_json(t.result_path(suite.name)) for t in targets]
