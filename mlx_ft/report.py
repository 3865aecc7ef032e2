"""``mlxft report``: one Markdown file from the files the earlier stages wrote (nothing recomputed
except summaries of them)."""

from __future__ import annotations

from pathlib import Path

from mlx_ft.errors import UserError
from mlx_ft.evaluate import run_targets
from mlx_ft.files import read_json, read_jsonl, write_text
from mlx_ft.tables import excerpt, pct, table

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
    raise UserError(f"{path}: neither a run folder nor a model folder with {suite} eval results")


def build_report(run_dir: str | Path, suite: str = "tools", compare: list | None = None) -> str:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no run.json)")
    run = read_json(run_dir / "run.json")
    cfg = run["config"]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = _evals(run_dir, suite)
    best = read_json(run_dir / "best.json") if (run_dir / "best.json").is_file() else None
    out = [f"# mlxft report: {run_dir.name}", ""]
    out.append(f"Model `{run['model_path']}`, {cfg['fine_tune_type']} on {cfg['num_layers']} layers, lr "
               f"{cfg['learning_rate']}, batch {cfg['batch_size']}, {cfg['iters']} iters, seed {cfg['seed']}; "
               f"status {run.get('status')}, {run.get('train_seconds')} s of training. "
               f"mlx {run['versions']['mlx']}, mlx-lm {run['versions']['mlx_lm']}.")
    if best:
        out += ["", f"**Chosen: {best['chosen']['name']}** — {best['reason']}"]

    out += ["", "## Training curve", ""]
    train = [m for m in metrics if "train_loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    out.append(f"train loss {sparkline([m['train_loss'] for m in train])}  ")
    out.append(f"val loss {sparkline([m['val_loss'] for m in val])}")
    out.append("")
    out.append(table(["step", "train loss", "val loss", "lr", "tokens/s"],
                     [[m["step"], m.get("train_loss"), m.get("val_loss"), m.get("learning_rate"),
                       m.get("tokens_per_second")] for m in metrics
                      if "val_loss" in m or m["step"] % max(1, len(train) // 20) == 0], markdown=True))

    if evals:
        names = list(evals)
        out += ["", f"## Checkpoints on `{suite}`", ""]
        chosen = best["chosen"]["name"] if best else None
        vpick = best["val_loss_pick"]["name"] if best and best.get("val_loss_pick") else None
        guard = best.get("guard") if best else None
        guard_evals = _evals(run_dir, guard["suite"]) if guard else {}
        rows = []
        for n, rec in evals.items():
            s, t = rec["summary"], rec["target"]
            mark = " ".join(x for x, hit in (("eval pick", n == chosen), ("val-loss pick", n == vpick),
                                             ("excluded by guard", guard and n in guard["excluded"])) if hit)
            row = [n, t["step"], t["val_loss"], pct(s["score"]), pct(s["pass_rate"]), primary_failure(s["codes"])]
            if guard:
                row.append(pct(guard_evals[n]["summary"]["pass_rate"]) if n in guard_evals else "-")
            rows.append(row + [rec["seconds"], mark])
        heads = ["checkpoint", "step", "val loss", "score", "strict", "primary failure"]
        heads += [f"{guard['suite']} pass"] if guard else []
        out.append(table(heads + ["eval s", ""], rows, markdown=True))
        cats = list(evals[names[0]]["summary"]["categories"])
        out += ["", "## Per category (rubric score)", ""]
        out.append(table(["category"] + names,
                         [[c] + [pct(evals[n]["summary"]["categories"].get(c, {}).get("score")) for n in names]
                          for c in cats], markdown=True))
        shown = [n for n in ("base", chosen) if n in evals] or names[:1]
        out += ["", f"## Per prompt ({', '.join(shown)})", ""]
        rows = []
        for i, r0 in enumerate(evals[shown[0]]["results"]):
            row = [r0["id"], r0["category"]]
            for n in shown:
                r = evals[n]["results"][i]
                row += [f"{r['value']:.1f} {r['code']}", excerpt(r["text"], 60)]
            rows.append(row)
        heads = ["prompt", "category"] + [h for n in shown for h in (f"{n} score", f"{n} output")]
        out.append(table(heads, rows, markdown=True))

    if compare:
        out += ["", "## Comparison", ""]
        rows = [comparison_row(run_dir, suite)] + [comparison_row(Path(p), suite) for p in compare]
        out.append(table(["Phase", "Model", "Val Loss", "Score", "Strict", "Primary Failure"], rows, markdown=True))
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, suite: str = "tools", compare: list | None = None,
                 out: str | Path | None = None) -> Path:
    path = Path(out) if out else Path(run_dir) / "report.md"
    write_text(path, build_report(run_dir, suite, compare))
    return path
