"""``mlxft run``: the whole loop as one resumable command.

train (with in-loop eval) -> eval whatever is missing -> pick-best (guard if configured) -> fuse
(``fuse: {bits: N}`` in the config) -> eval the fused model beside its adapter -> report. Each
stage looks at what is on disk first and is skipped, saying so, when its output is complete and
matches the config; so a rerun after a crash or Ctrl-C goes on where it stopped. ``force`` redoes
every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_ft import runs
from mlx_ft.configfile import to_dict
from mlx_ft.errors import UserError
from mlx_ft.evaluate import evaluate_targets, open_suite
from mlx_ft.files import read_json
from mlx_ft.fuse import compare_with_adapter, fuse, output_dtype
from mlx_ft.train_config import TrainConfig
from mlx_ft.report import write_report
from mlx_ft.selection import pick_best, write_best
from mlx_ft.targets import run_targets
from mlx_ft.train import train

Log = Callable[[str], None]


def train_stage(cfg: TrainConfig, force: bool, log: Log) -> dict:
    """Train, continue an interrupted run, or skip a complete one trained with this config."""
    run_dir = cfg.run_dir
    if force or not runs.is_run(run_dir):
        return train(cfg, log=log, force=force)
    old = read_json(runs.run_json(run_dir))
    if old.get("config") != to_dict(cfg):
        changed = sorted(k for k in to_dict(cfg) if old.get("config", {}).get(k) != to_dict(cfg)[k])
        raise UserError(f"{run_dir} was trained with another config (changed: {', '.join(changed)}); pass --force "
                        "to train it again, or give the run another name")
    if old.get("status") == "complete":
        log(f"train: {run_dir} is complete ({len(old.get('checkpoints', []))} checkpoints); skipping")
        return old
    log(f"train: {run_dir} stopped at status {old.get('status')!r}; resuming from its last checkpoint")
    return train(cfg, log=log, resume=True)


def fuse_stage(cfg: TrainConfig, best: dict, suite, force: bool, log: Log) -> dict | None:
    """Fuse the chosen checkpoint at the configured bits and evaluate it beside its adapter,
    unless that fused model already exists for this checkpoint and these settings."""
    if not cfg.fuse.bits:
        log("fuse: no fuse.bits in the config; skipping")
        return None
    adapter = best["chosen"].get("adapter")
    if not adapter:
        log("fuse: the best candidate is the base model itself; nothing to fuse")
        return None
    out = Path(cfg.fuse.out or f"fused_models/{cfg.name}-{cfg.fuse.bits}bit")
    base = Path(read_json(Path(adapter) / "adapter_config.json")["model"])
    record = read_json(out / "fused.json") if (out / "fused.json").is_file() else None
    settings = (cfg.fuse.bits, cfg.fuse.group_size, output_dtype(cfg.fuse.dtype, base))
    same = record is not None and record.get("source_checkpoint") == str(Path(adapter).resolve()) and (
        record.get("bits"), record.get("group_size"), record.get("dtype")) == settings
    if same and not force and record.get("eval", {}).get("suite") == suite.name:
        log(f"fuse: {out} already holds {Path(adapter).name} at {cfg.fuse.bits} bits, evaluated; skipping")
        return {**record, "out": str(out)}
    if not same or force:
        if out.exists() and not force and record is None:
            raise UserError(f"{out} exists and is not a fused model of mlxft; set fuse.out in the config")
        record = fuse(Path(adapter), base, out, cfg.fuse.bits, cfg.fuse.group_size, force=out.exists(), log=log,
                      dtype=cfg.fuse.dtype)
    record["eval"] = compare_with_adapter(out, Path(adapter), suite, log=log)
    return {**record, "out": str(out)}


def run_pipeline(cfg: TrainConfig, *, force: bool = False, log: Log = lambda s: None) -> dict:
    """Every stage in order; returns what ``mlxft run`` prints: the choice, the fused model, the report."""
    if not cfg.eval_suite:
        raise UserError("mlxft run needs eval_suite in the config: the suite that picks the checkpoint")
    suite = open_suite(cfg.eval_suite)
    if not cfg.eval_during_training:
        log("eval_during_training is off: checkpoints are evaluated after training")
    summary = train_stage(cfg, force, log)
    run_dir = cfg.run_dir
    log(f"eval: {suite.name} on the base and every checkpoint (results from the training loop are reused)")
    evaluate_targets(run_targets(run_dir), suite, log=log, log_dir=run_dir)
    if cfg.pick.guard:
        log(f"eval: guard suite {cfg.pick.guard}")
        evaluate_targets(run_targets(run_dir), open_suite(cfg.pick.guard), log=log, log_dir=run_dir)
    best = pick_best(run_dir, suite.name, cfg.pick.metric, guard=cfg.pick.guard, alpha=cfg.pick.alpha)
    write_best(run_dir, best)
    log(f"pick-best: {best['chosen']['name']} -> {runs.best_path(run_dir)}")
    fused = fuse_stage(cfg, best, suite, force, log)
    report = write_report(run_dir, suite.name, [fused["out"]] if fused else [], log=log)
    return {"run": str(run_dir), "status": summary.get("status"), "early_stop": summary.get("early_stop"),
            "chosen": best["chosen"], "reason": best["reason"], "fused": fused,
            "report": {k: str(v) for k, v in report.items()}}

