"""``mlxft run``: the whole pipeline from one config (a thin shell over pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_ft.cli_common import emit, errors, log


@click.command("run")
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML training config with eval_suite (and optionally eval_during_training, early_stop, "
                   "pick: {metric, guard, alpha}, fuse: {bits, group_size, out}).")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose output is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@errors
def run_cmd(config_path: Path, force: bool, as_json: bool) -> None:
    """Train (eval in the loop) -> pick-best -> fuse -> eval the fused model -> report, in one command.

    Each stage is skipped when its output on disk is complete and matches the config, so running
    the same command again after a crash or Ctrl-C continues where it stopped.
    """
    from mlx_ft.pipeline import run_pipeline
    from mlx_ft.train_config import load_config

    out = run_pipeline(load_config(config_path), force=force, log=log)
    lines = [f"chosen: {out['chosen']['name']} of {out['run']}", out["reason"]]
    if out["early_stop"]:
        lines.append(f"training stopped early at step {out['early_stop']['step']}: {out['early_stop']['reason']}")
    if out["fused"]:
        e = out["fused"].get("eval", {})
        lines.append(f"fused model: {out['fused']['out']} ({out['fused']['bits']} bits), score "
                     f"{e.get('fused_score', 0):.1%} vs adapter {e.get('adapter_score', 0):.1%}, strict pass "
                     f"{e.get('fused_pass_rate', 0):.1%} vs {e.get('adapter_pass_rate', 0):.1%}")
    lines.append("report: " + ", ".join(out["report"].values()))
    emit(out, as_json, "\n".join(lines))
