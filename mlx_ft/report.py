"""``mlxft report``: report.md, report.html and report.png from the files the earlier stages wrote
(nothing recomputed except summaries of them).

``gather`` reads the files into one dict; ``build_report`` (Markdown), ``report_html.render`` and
``report_png.write_png`` are functions of that dict.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_ft.errors import UserError
from mlx_ft.files import read_json, read_jsonl, write_text
from mlx_ft.report_html import num
from mlx_ft.tables import excerpt, pct, table
from mlx_ft.targets import run_targets

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in vals)


def primary_failure(codes: dict) -> str:
    bad = {k: v for k, v in codes.items() if k != "ok"}
    if not bad:
        return "-"
    k = max(bad, key=bad.get)
    return f"{k} ({bad[k]})"


def _evals(run_dir: Path, suite: str) -> dict[str, dict]:
    out = {}
    for t in run_targets(run_dir):
        p = t.out_dir / f"{suite}.json"
        if p.is_file():
            out[t.name] = read_json(p)
    return out


def _fused(path: Path, run_dir: Path, suite: str) -> dict | None:
    """A fused model folder's eval, and which checkpoint of this run it was fused from (if any)."""
    ev = path / "evals" / f"{suite}.json"
    if not ev.is_file():
        return None
    rec = read_json(ev)
    label, source, f = f"{path.name} (fused)", None, {}
    if (path / "fused.json").is_file():
        f = read_json(path / "fused.json")
        src = Path(f["source_checkpoint"])
        label = f"{path.name} (fused {f['bits']}-bit of {src.name})"
        run_of = src.parent.parent
        # fused from this run (or from this run before its folder was moved or copied)
        if run_of.resolve() == run_dir.resolve() or (run_of.name == run_dir.name and (run_dir / "checkpoints" /
                                                                                     src.name).is_dir()):
            source = src.name
    return {"name": path.name, "path": str(path), "label": label, "source": source, "bits": f.get("bits"),
            "source_checkpoint": f.get("source_checkpoint"), "score": rec["summary"]["score"],
            "strict": rec["summary"]["pass_rate"], "record": rec}


def comparison_row(path: Path, suite: str) -> list:
    """One 'Phase | Model | Val Loss | Score | Strict | Primary Failure' row for a run or fused model."""
    if (path / "run.json").is_file():
        best = path / "best.json"
        if best.is_file():
            c = read_json(best)["chosen"]
            return [path.name, c["name"], c["val_loss"], pct(c["score"]), pct(c["strict_pass"]),
                    primary_failure(c["codes"])]
        return [path.name, "(no best.json)", None, "-", "-", "-"]
    ev = path / "evals" / f"{suite}.json"
    if ev.is_file():
        rec = read_json(ev)
        s = rec["summary"]
        label = "fused"
        if (path / "fused.json").is_file():
            f = read_json(path / "fused.json")
            label = f"fused {f['bits']}-bit of {Path(f['source_checkpoint']).name}"
        return [path.name, label, None, pct(s["score"]), pct(s["pass_rate"]), primary_failure(s["codes"])]
    raise UserError(f"{path}: neither a run folder nor a model folder with {suite} eval results; "
                    "give --compare a run folder or a fused model folder that `mlxft fuse` evaluated")


def _seed(path: Path, suite: str) -> dict:
    evals = _evals(path, suite)
    best = read_json(path / "best.json") if (path / "best.json").is_file() else None
    return {"name": path.name, "points": {r["target"].get("step") or 0: r["summary"]["score"] for r in evals.values()},
            "chosen": best["chosen"]["name"] if best else None,
            "chosen_score": best["chosen"]["score"] if best else None}


def commands(run_dir: Path, run: dict, evals: dict, best: dict | None, fused: list[dict], suite: str,
             compare: list) -> str:
    """The commands (and the resolved config) that reproduce this run and this report."""
    import yaml

    rec = next(iter(evals.values()), None)
    suite_path = (rec or {}).get("suite", {}).get("path") or f"<{suite} suite file>"
    engine = (rec or {}).get("engine", {}).get("name")
    lines = ["# config.yaml (the run's resolved config):",
             *("  " + x for x in yaml.safe_dump(run.get("config", {}), sort_keys=False).splitlines()),
             "mlxft train -c config.yaml",
             f"mlxft eval --run {run_dir} --prompts {suite_path}" + (f" --engine {engine}" if engine else "")]
    if best:
        o = best.get("options") or {"metric": best.get("metric", "score"), "alpha": best.get("alpha", 0.05)}
        cmd = f"mlxft pick-best --run {run_dir} --suite {best.get('suite', suite)} --metric {o.get('metric', 'score')}"
        cmd += f" --alpha {num(o.get('alpha', 0.05))}"
        cmd += " --confirm-split" if o.get("confirm_split") or "confirm_split" in best else ""
        cmd += f" --bootstrap {o['bootstrap']}" if "bootstrap" in o else ""
        cmd += f" --guard {o['guard']}" if o.get("guard") else ""
        lines.append(cmd)
    for f in fused:
        if f["source_checkpoint"]:
            lines.append(f"mlxft fuse --adapter {f['source_checkpoint']} --bits {f['bits']} --out {f['path']}")
    lines.append(f"mlxft report --run {run_dir} --suite {suite}" + "".join(f" --compare {c}" for c in compare))
    return "\n".join(x for x in lines if x)


def gather(run_dir: str | Path, suite: str = "tools", compare: list | None = None) -> dict:
    """Everything the report shows, read from the run folder and the --compare folders."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no run.json); train one with `mlxft train`")
    compare = [Path(p) for p in compare or []]
    run = read_json(run_dir / "run.json")
    evals = _evals(run_dir, suite)
    best = read_json(run_dir / "best.json") if (run_dir / "best.json").is_file() else None
    fused = [f for f in (_fused(p, run_dir, suite) for p in compare if not (p / "run.json").is_file()) if f]
    for p in compare:
        comparison_row(p, suite)  # refuse a folder that is neither, before anything is written
    seed_runs = [run_dir] + [p for p in compare if (p / "run.json").is_file()]
    return {"name": run_dir.name, "run_dir": str(run_dir), "suite": suite, "run": run, "evals": evals, "best": best,
            "metrics": read_jsonl(run_dir / "metrics.jsonl"), "fused": fused,
            "fused_evals": {f["name"]: f["record"] for f in fused},
            "seeds": [_seed(p, suite) for p in seed_runs] if len(seed_runs) > 1 else [],
            "compare": [str(p) for p in compare],
            "commands": commands(run_dir, run, evals, best, fused, suite, compare)}


def eval_seconds(evals: dict[str, dict]) -> tuple[dict[str, object], float | None]:
    """What the 'eval s' column can honestly show: a server eval's own time; for the batched engine,
    whose targets share one batch (each file's seconds count from the batch's start), 'batch', and
    the batch's wall time once."""
    cells, batch = {}, None
    for n, rec in evals.items():
        engine = rec.get("engine", {})
        if engine.get("name") == "batched" and engine.get("targets", 2) > 1:
            cells[n] = "batch"
            batch = max(batch or 0.0, rec["seconds"])
        else:
            cells[n] = rec["seconds"]
    return cells, batch


def _reason_md(reason: str) -> list[str]:
    first, *rest = reason.splitlines()
    return [f"{first}", ""] + [f"- {x}" for x in rest]


def build_report(run_dir: str | Path, suite: str = "tools", compare: list | None = None, *,
                 data: dict | None = None, png: str | None = None, html_name: str | None = None) -> str:
    data = data or gather(run_dir, suite, compare)
    out = _header(data, png, html_name) + _training_md(data["metrics"])
    if data["evals"]:
        out += _checkpoints_md(data) + _categories_md(data["evals"]) + _prompts_md(data)
    if data["compare"]:
        out += ["", "## Comparison", ""]
        rows = [comparison_row(Path(data["run_dir"]), data["suite"])] + [
            comparison_row(Path(p), data["suite"]) for p in data["compare"]]
        out.append(table(["Phase", "Model", "Val Loss", "Score", "Strict", "Primary Failure"], rows, markdown=True))
    return "\n".join(out) + "\n"


def _header(data: dict, png: str | None, html_name: str | None) -> list[str]:
    run, best, cfg = data["run"], data["best"], data["run"]["config"]
    out = [f"# mlxft report: {Path(data['run_dir']).name}", ""]
    out.append(f"Model `{run['model_path']}`, {cfg['fine_tune_type']} on {cfg['num_layers']} layers, lr "
               f"{num(cfg['learning_rate'])}, batch {cfg['batch_size']}, {cfg['iters']} iters, seed {cfg['seed']}; "
               f"status {run.get('status')}, {run.get('train_seconds')} s of training. "
               f"mlx {run['versions']['mlx']}, mlx-lm {run['versions']['mlx_lm']}.")
    if html_name:
        out += ["", (f"Charts, the per-prompt grid with every raw reply, and the commands that reproduce this "
                     f"run: [{html_name}]({html_name}).")]
    if best:
        out += ["", f"**Chosen: {best['chosen']['name']}** — " + "\n".join(_reason_md(best["reason"]))]
    if png:
        out += ["", f"![eval score, strict pass (95% CI) and val loss per checkpoint]({png})"]
    return out


def _training_md(metrics: list[dict]) -> list[str]:
    train = [m for m in metrics if "train_loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    out = ["", "## Training curve", "", f"train loss {sparkline([m['train_loss'] for m in train])}  ",
           f"val loss {sparkline([m['val_loss'] for m in val])}", ""]
    out.append(table(["step", "train loss", "val loss", "lr", "tokens/s"],
                     [[m["step"], m.get("train_loss"), m.get("val_loss"), num(m.get("learning_rate")),
                       m.get("tokens_per_second")] for m in metrics
                      if "val_loss" in m or m["step"] % max(1, len(train) // 20) == 0], markdown=True))
    return out


def _checkpoints_md(data: dict) -> list[str]:
    evals, best = data["evals"], data["best"]
    out = ["", f"## Checkpoints on `{data['suite']}`", ""]
    chosen = best["chosen"]["name"] if best else None
    vpick = best["val_loss_pick"]["name"] if best and best.get("val_loss_pick") else None
    guard = best.get("guard") if best else None
    guard_evals = _evals(Path(data["run_dir"]), guard["suite"]) if guard else {}
    secs, batch = eval_seconds(evals)
    rows = []
    for n, rec in evals.items():
        s, t = rec["summary"], rec["target"]
        mark = " ".join(x for x, hit in (("eval pick", n == chosen), ("val-loss pick", n == vpick),
                                         ("excluded by guard", guard and n in guard["excluded"])) if hit)
        row = [n, t["step"], t["val_loss"], pct(s["score"]), pct(s["pass_rate"]), primary_failure(s["codes"])]
        if guard:
            row.append(pct(guard_evals[n]["summary"]["pass_rate"]) if n in guard_evals else "-")
        rows.append(row + [secs[n], mark])
    heads = ["checkpoint", "step", "val loss", "score", "strict", "primary failure"]
    heads += [f"{guard['suite']} pass"] if guard else []
    out.append(table(heads + ["eval s", ""], rows, markdown=True))
    if batch is not None:
        out += ["", (f"eval s: 'batch' marks targets the batched engine evaluated together in one batch, "
                     f"which took {batch:.1f} s in all; a per-checkpoint time does not exist there.")]
    return out


def _categories_md(evals: dict[str, dict]) -> list[str]:
    names = list(evals)
    cats = list(evals[names[0]]["summary"]["categories"])
    return ["", "## Per category (rubric score)", "",
            table(["category"] + names, [[c] + [pct(evals[n]["summary"]["categories"].get(c, {}).get("score"))
                                                for n in names] for c in cats], markdown=True)]


def _prompts_md(data: dict) -> list[str]:
    evals, best = data["evals"], data["best"]
    chosen = best["chosen"]["name"] if best else None
    shown = [n for n in ("base", chosen) if n in evals] or list(evals)[:1]
    rows = []
    for i, r0 in enumerate(evals[shown[0]]["results"]):
        row = [r0["id"], r0["category"]]
        for n in shown:
            r = evals[n]["results"][i]
            row += [f"{r['value']:.1f} {r['code']}", excerpt(r["text"], 60)]
        rows.append(row)
    heads = ["prompt", "category"] + [h for n in shown for h in (f"{n} score", f"{n} output")]
    return ["", f"## Per prompt ({', '.join(shown)})", "", table(heads, rows, markdown=True)]


def write_report(run_dir: str | Path, suite: str = "tools", compare: list | None = None,
                 out: str | Path | None = None, *, log: Callable[[str], None] = lambda s: None) -> dict[str, Path]:
    """report.md, report.html beside it, and report.png when matplotlib is installed (said once if not).
    Returns the paths written, by kind."""
    from mlx_ft import report_html, report_png

    md = Path(out) if out else Path(run_dir) / "report.md"
    data = gather(run_dir, suite, compare)
    paths: dict[str, Path] = {}
    if data["evals"]:
        png = md.with_suffix(".png")
        if report_png.write_png(data, png, log=log):
            paths["png"] = png
    html_path = md.with_suffix(".html")
    write_text(html_path, report_html.render(data))
    paths["html"] = html_path
    paths["md"] = write_text(md, build_report(run_dir, suite, compare, data=data, png=paths["png"].name if "png" in paths
                                              else None, html_name=html_path.name))
    return {k: paths[k] for k in ("md", "html", "png") if k in paths}
