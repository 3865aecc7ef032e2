"""Commands after evaluation: pick-best, fuse, report (thin shells over the API)."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_ft.cli_common import emit, errors, log
from mlx_ft.tables import pct, table


def best_text(r: dict) -> str:
    rows = []
    for c in r["table"]:
        marks = " ".join(m for m, hit in (("<- eval pick", c["name"] == r["chosen"]["name"]),
                                          ("<- val-loss pick", r["val_loss_pick"] and c["name"] == r["val_loss_pick"]["name"]))
                         if hit)
        lo, hi = c["strict_ci95"]
        codes = ", ".join(f"{k} {v}" for k, v in c["codes"].items())
        rows.append([c["name"], c["step"], c["val_loss"], pct(c["score"]), pct(c["strict_pass"]),
                     f"{pct(lo)}-{pct(hi)}", r["p_best"].get(c["name"]) if r["p_best"] else None, codes, marks])
    t = table(["checkpoint", "step", "val loss", "score", "strict", "strict 95% CI", "P(best)", "failure codes", ""],
              rows)
    return f"{t}\n\n{r['reason']}"


@click.command("pick-best")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--runs", "run_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Several runs (seeds): adds a seed table. Repeat the option or use a glob.")
@click.option("--suite", default="tools", show_default=True, help="Suite name (the eval file's name).")
@click.option("--metric", type=click.Choice(["score", "strict"]), default="score", show_default=True,
              help="score: rubric mean; strict: strict pass rate.")
@click.option("--confirm-split", is_flag=True,
              help="Select on one half of the prompts, report the winner on the other (winner's curse).")
@click.option("--bootstrap", type=int, default=2000, show_default=True, help="Resamples for P(best); 0 skips.")
@click.option("--eval-missing", "prompts", type=click.Path(dir_okay=False, path_type=Path),
              help="Suite file: evaluate checkpoints that have no results yet, then pick.")
@click.option("--guard", help="Regression guard suite, e.g. bfcl:simple_python: exclude checkpoints significantly "
                              "below the base on it (evaluate it first with mlxft eval --suite ...).")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Significance level of the tests vs the base, vs the val-loss pick, and of the guard.")
@click.option("--write-runs", is_flag=True,
              help="With --runs: also write each run's best.json (the same choice as printed, guard included).")
@click.option("--json", "as_json", is_flag=True)
@errors
def pick_best_cmd(run_dir, run_dirs, suite, metric, confirm_split, bootstrap, prompts, guard, alpha, write_runs,
                  as_json):
    """Choose the checkpoint by eval score (not validation loss) and write RUN/best.json.

    Tie-break: higher strict pass rate, then the earlier step. Reports Wilson intervals, exact
    McNemar tests vs the base and vs the val-loss pick, and bootstrap P(best). With --runs, every
    run is chosen with the same options and nothing is written unless --write-runs is given.
    """
    from mlx_ft.errors import UserError
    from mlx_ft.selection import check_options, pick_best, seed_table, write_best

    runs = list(run_dirs) + ([run_dir] if run_dir else [])
    if not runs:
        raise UserError("give --run RUN (or --runs RUN1 --runs RUN2 ... for several seeds)")
    check_options(metric, alpha, bootstrap)  # before --eval-missing spends minutes evaluating
    if prompts:
        from mlx_ft.evaluate import evaluate_targets
        from mlx_ft.targets import run_targets
        from mlx_ft.suite import load_suite

        s = load_suite(prompts)
        suite = s.name
        for r in runs:
            evaluate_targets(run_targets(r), s, log=log, log_dir=Path(r))
    results = [pick_best(r, suite, metric, confirm_split, bootstrap, guard=guard, alpha=alpha) for r in runs]
    for r, res in zip(runs, results):
        if r == run_dir or write_runs:
            log(f"wrote {write_best(r, res)}")
    text = "\n\n".join(f"== {r['run']}\n{best_text(r)}" for r in results)
    data: dict | list = results[0] if len(results) == 1 else results
    if len(runs) > 1:
        seeds = seed_table(runs, suite, metric, picks=results)
        rows = [[x["run"], x["chosen"], pct(x["score"]), pct(x["strict_pass"]),
                 (x.get("verdict_vs_base") or "-").replace("_", " ")] for x in seeds["runs"]]
        text += "\n\n" + table(["run", "best", "score", "strict", "vs base"], rows)
        half = seeds["ci95_half_width"]
        text += f"\nmean best score across seeds {pct(seeds['mean'])}" + (f" ± {pct(half)} (95% t)" if half else "")
        if "cochran_q" in seeds:
            q = seeds["cochran_q"]
            text += f"\nCochran's Q at step {q['step']}: Q={q['q']}, df={q['df']}, p={q['p_value']:.3g}"
        data = {"runs": results, "seeds": seeds}
    emit(data, as_json, text)


@click.command("fuse")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Fuse the checkpoint chosen in RUN/best.json.")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), help="Or fuse this checkpoint.")
@click.option("--model",
              help="Base model folder or cached Hugging Face repo id (default: the one the adapter was trained on).")
@click.option("--bits", type=int, default=5, show_default=True, help="2, 3, 4, 5, 6, 8, or 16 (no quantization).")
@click.option("--group-size", type=int, default=32, show_default=True, help="32, 64 or 128.")
@click.option("--recipe", type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]),
              help="mlx-lm mixed-precision recipe instead of uniform bits.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default fused_models/<run>-<checkpoint>-<bits>bit).")
@click.option("--prompts", "suite_path", type=click.Path(dir_okay=False, path_type=Path), default="evals/tools.yaml",
              show_default=True, help="Suite to evaluate the fused model beside its adapter.")
@click.option("--no-eval", is_flag=True, help="Skip the fused-vs-adapter evaluation.")
@click.option("--eval-kernels", type=click.Choice(["auto", "quantized", "dequantized"]), default="auto",
              show_default=True,
              help="Serve the fused model with its quantized kernels, or its exact dequantized weights "
                   "(auto: dequantized on CPU, where quantized kernels are 10-15x slower).")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto", show_default=True,
              help="Of the scales, biases and unquantized tensors. auto: the base's own 16-bit dtype, float16 for "
                   "a float32 base (16-bit: --bits 5 --group-size 32 is 6.0 bits per weight; float32 makes it 7).")
@click.option("--in-memory", is_flag=True,
              help="Dequantize the whole base at once (the old way; needs the model in full precision in memory) "
                   "instead of streaming it layer by layer.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True)
@errors
def fuse_cmd(run_dir, adapter, model, bits, group_size, recipe, out, suite_path, no_eval, eval_kernels, dtype,
             in_memory, force, as_json):
    """Fuse a checkpoint into a full-precision base, quantize, and evaluate it beside the adapter.

    The base is streamed layer by layer (peak memory about the output + two layers), so a base that
    does not fit in memory at full precision can still be fused; --in-memory does it the old way."""
    from mlx_ft.fuse import check_args, compare_with_adapter, fuse, resolve_source

    check_args(bits, group_size, recipe, dtype)
    suite = None
    if not no_eval:
        from mlx_ft.suite import load_suite

        suite = load_suite(suite_path)
    adapter_path, base = resolve_source(run_dir, adapter, model)
    if out is None:
        stem = f"{adapter_path.parent.parent.name}-{adapter_path.name}-{'f' if bits == 16 else bits}"
        out = Path("fused_models") / (stem + ("" if bits == 16 else "bit"))
    record = fuse(adapter_path, base, out, bits, group_size, recipe, force, log=log, dtype=dtype, in_memory=in_memory)
    if suite is not None:
        record["eval"] = compare_with_adapter(out, adapter_path, suite, kernels=eval_kernels, log=log)
    lines = [(f"{out}: {record['size_bytes'] / 1e6:.1f} MB, {bits} bits ({record['bits_per_weight']} per weight, "
              f"{dtype}), fused {record['method']} in {record['seconds']} s, peak RSS {record['peak_rss_gb']} GB"),
             (f"adapter survival: median cosine {record['survival']['median_cosine']}, median relative error "
              f"{record['survival']['median_rel_error']}")]
    if "eval" in record:
        e = record["eval"]
        lines.append(table(["", "score", "strict pass"], [
            ["adapter", pct(e["adapter_score"]), pct(e["adapter_pass_rate"])],
            ["fused", pct(e["fused_score"]), pct(e["fused_pass_rate"])]]))
        lines.append(f"identical outputs {e['identical_outputs']}/{e['prompts']}; McNemar p={e['mcnemar']['p_value']:.3g}; "
                     f"served with {e['kernels']} kernels")
    emit(record, as_json, "\n".join(lines))


@click.command("report")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--compare", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Other runs or fused model folders to compare against.")
@click.option("--suite", default="tools", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Default RUN/report.md; report.html and report.png are written beside it.")
@errors
def report_cmd(run_dir, compare, suite, out):
    """Write report.md, report.html (charts, per-prompt grid with every raw reply; opens from disk,
    loads nothing from the network) and report.png (needs matplotlib: pip install 'mlxft[plot]').

    Run folders given to --compare are shown as seeds (one line per run); fused model folders as
    points beside the checkpoint they were fused from.
    """
    from mlx_ft.report import write_report

    paths = write_report(run_dir, suite, list(compare), out, log=log)
    for path in paths.values():
        click.echo(str(path))
