"""``mlxft train``: mlx-lm's own trainer, wrapped with preflight checks, guards and checkpoints.

We do not re-implement the training loop: ``mlx_lm.tuner.trainer.train`` runs every step. What
mlxft adds sits around it -- checks before the first step (nothing trainable, bad
data, examples whose tool call would be cut off), a callback that stops on NaN or divergence,
and, every ``save_every`` steps, a checkpoint folder that ``mlx_lm.load(base, adapter_path=...)``
loads as is, with its manifest written last so a folder without one is incomplete by definition.
Validation always scores the *full* validation set (mlx-lm's default scores 25 random batches,
a different subset every time).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, iterate_batches
from mlx_lm.tuner.trainer import evaluate as evaluate_loss
from mlx_lm.tuner.trainer import train as mlx_train

from mlx_ft import configfile as cfgmod
from mlx_ft import data as datamod
from mlx_ft import runs
from mlx_ft.checkpoints import load_training_state, write_checkpoint
from mlx_ft.console import library_output
from mlx_ft.errors import EarlyStopped, TrainingError, UserError
from mlx_ft.files import append_jsonl, read_json, read_jsonl, sha256, write_json, write_text
from mlx_ft.models import identity
from mlx_ft.fingerprint import fingerprint_model
from mlx_ft.loop_eval import LoopEval
from mlx_ft.preflight import Prepared, prepare
from mlx_ft.train_config import LoraConfig, TrainConfig, adapter_config, load_config
from mlx_ft.runs import complete_checkpoints
from mlx_ft.suite import load_suite


def versions() -> dict:
    from importlib.metadata import version

    import mlx.core as mx

    from mlx_ft import __version__, _blas

    return {
        "mlxft": __version__,
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(mx.default_device()),
        "fast_blas": _blas.loaded,
    }

# ---------------------------------------------------------------- training


class Guard:
    """Stops training on NaN/inf or when the loss runs away from where it started."""

    window = 5

    def __init__(self, factor: float):
        self.factor = factor
        self.losses: list[float] = []

    def check(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"training loss is {loss} at step {step}; stopped. Lower learning_rate, check the data "
                "for examples that leave nothing to train on; checkpoints saved so far are kept"
            )
        self.losses.append(loss)
        if len(self.losses) >= 2 * self.window:
            start = sum(self.losses[: self.window]) / self.window
            recent = sum(self.losses[-self.window:]) / self.window
            if recent > self.factor * start:
                raise TrainingError(
                    f"training diverged: mean loss of the last {self.window} steps is {recent:.3f}, more than "
                    f"{self.factor}× the first steps' {start:.3f} (step {step}); lower learning_rate. "
                    "Checkpoints saved so far are kept"
                )


class _Callback(TrainingCallback):
    def __init__(self, session: "TrainingSession"):
        self.session = session

    def on_train_loss_report(self, info: dict) -> None:
        self.session.on_step(info)


@dataclass
class TrainingSession:
    """One ``train`` call's state: what mlx-lm's callback reports goes through :meth:`on_step`."""

    prep: Prepared
    log: Callable[[str], None]
    start_step: int = 0
    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    optimizer: object = None
    val_set: object = None
    guard: Guard | None = None
    loop_eval: LoopEval | None = None
    tokens_before: int = 0  # from the checkpoint we resumed, if any
    wall_before: float = 0.0
    rank: int = 0  # only rank 0 writes files
    world_size: int = 1

    @property
    def cfg(self) -> TrainConfig:
        return self.prep.cfg

    def val_loss(self) -> float:
        model = self.prep.model
        model.eval()
        loss = evaluate_loss(model, self.val_set, batch_size=self.cfg.batch_size, num_batches=-1,
                             max_seq_length=self.cfg.max_seq_length)
        model.train()
        return float(loss)

    def fingerprint(self) -> dict:
        model = self.prep.model
        model.eval()
        fp = fingerprint_model(model, self.prep.tokenizer)
        model.train()
        return fp

    def on_step(self, info: dict) -> None:
        step = info["iteration"] + self.start_step
        loss = float(info["train_loss"])
        self.tokens = self.tokens_before + int(info["trained_tokens"])
        row = {
            "step": step,
            "train_loss": loss,
            "learning_rate": float(info["learning_rate"]),
            "tokens_per_second": round(float(info["tokens_per_second"]), 2),
            "trained_tokens": self.tokens,
            "peak_memory_gb": round(float(info["peak_memory"]), 3),
        }
        self.guard.check(step, loss)  # the loss is averaged over ranks: every rank stops together
        stop = None
        if step % self.cfg.save_every == 0 or step == self.cfg.iters:
            row["val_loss"] = self.val_loss()  # collective under mlx.launch: every rank takes part
            if self.rank == 0:
                stop = self.checkpoint(step, row)
        if self.rank == 0:
            append_jsonl(runs.metrics_path(self.cfg.run_dir), row)
        if stop:
            raise EarlyStopped(stop)

    def checkpoint(self, step: int, row: dict) -> str | None:
        """Write the checkpoint, score it if the loop evaluates; why training should stop, if it should."""
        fp = self.fingerprint()
        manifest = {
            "step": step,
            "train_loss": row["train_loss"],
            "val_loss": row["val_loss"],
            "learning_rate": row["learning_rate"],
            "tokens_seen": self.tokens,
            "wall_time_s": round(time.perf_counter() - self.t0 + self.wall_before, 2),
            "seed": self.cfg.seed,
            "base_model": str(self.prep.model_path.resolve()),
            "model": identity(self.cfg.model, self.prep.model_path),  # repo id + commit when from the HF cache
            "world_size": self.world_size,
            "fingerprint": fp,
        }
        write_checkpoint(self.cfg.run_dir, step, self.prep.model, self.optimizer,
                         adapter_config(self.cfg, self.prep.model_path), manifest)
        if self.loop_eval is None:
            self.log(f"step {step}: train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f} "
                     "-> checkpoint saved")
            return None
        line = self.loop_eval.checkpoint(self.prep.model, self.prep.tokenizer, step=step, fingerprint=fp,
                                         val_loss=row["val_loss"], train_loss=row["train_loss"])
        self.log(line + " -> checkpoint saved")
        return self.loop_eval.stop_reason()


def data_hashes(data_dir: str | Path) -> dict[str, str]:
    return {s: sha256(datamod.split_path(data_dir, s)) for s in datamod.SPLITS}


def _skip_batches(n: int, seed: int):
    """mlx-lm's batch iterator, seeded, with the first ``n`` batches skipped (exact resume)."""

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed_=None, comm_group=None, **kw):
        it = iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=seed, comm_group=comm_group)
        for i, batch in enumerate(it):
            if i >= n:
                yield batch

    return iterate


def _check_start(cfg: TrainConfig, resume: bool, force: bool, worker: bool) -> list:
    """The checkpoints to resume from (none for a fresh run); refuse what can't be started."""
    run_dir = cfg.run_dir
    if not resume:
        if not worker and run_dir.exists() and any(run_dir.iterdir()) and not force:
            raise UserError(f"{run_dir} already exists; use --resume to continue it, --force to start over, "
                            "or another --name")
        return []
    if not runs.is_run(run_dir):
        raise UserError(f"{run_dir}: nothing to resume (no run.json); start it without --resume")
    old = read_json(runs.run_json(run_dir))
    if old["config"] != cfgmod.to_dict(cfg):
        changed = sorted(k for k in old["config"] if old["config"].get(k) != cfgmod.to_dict(cfg).get(k))
        raise UserError(f"{run_dir}: cannot resume with a different config (changed: {', '.join(changed)})")
    if old["data_sha256"] != data_hashes(cfg.data):
        raise UserError(f"{run_dir}: the data in {cfg.data} changed since the run started; refusing to resume")
    return complete_checkpoints(run_dir)


def _loop_eval(cfg: TrainConfig, prep: Prepared, log: Callable[[str], None]) -> LoopEval | None:
    if not (cfg.eval_during_training and cfg.eval_suite):
        return None
    return LoopEval(load_suite(cfg.eval_suite), cfg.run_dir, prep.model_path, cfg.early_stop, prep.model, log=log)


def _begin(session: TrainingSession, force: bool, worker: bool) -> dict:
    """A fresh run: the folder, the base model's val loss, fingerprint and in-loop eval, run.json."""
    cfg, prep, run_dir = session.cfg, session.prep, session.cfg.run_dir
    if run_dir.exists() and force and not worker:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_val = session.val_loss()
    base_fp = session.fingerprint() if session.rank == 0 else None  # LoRA B is zero at init: the base
    summary = {
        "name": cfg.name,
        "config": cfgmod.to_dict(cfg),
        "model_path": str(prep.model_path.resolve()),
        "model": identity(cfg.model, prep.model_path),
        "data_sha256": data_hashes(cfg.data),
        "versions": versions(),
        "examples": {s: len(r) for s, r in prep.splits.items()},
        "target_tokens": prep.lengths.target_tokens,
        "trainable_parameters": prep.trainable,
        "total_parameters": prep.total,
        "base": {"val_loss": base_val, "fingerprint": base_fp},
        "warnings": prep.warnings,
        "world_size": session.world_size,
        "status": "running",
    }
    if session.rank != 0:
        return summary
    write_json(runs.run_json(run_dir), summary)
    row = {"step": 0, "val_loss": base_val}
    session.log(f"base model val loss {base_val:.3f} on the full validation set ({len(prep.splits['valid'])} examples)")
    if session.loop_eval:
        session.log(session.loop_eval.checkpoint(prep.model, prep.tokenizer, step=0, fingerprint=base_fp,
                                                 val_loss=base_val, train_loss=None))
    append_jsonl(runs.metrics_path(run_dir), row)
    return summary


def _restore(session: TrainingSession, last) -> None:
    """Continue from checkpoint ``last``: weights, optimizer state, counters, metrics."""
    load_training_state(last.path, session.prep.model, session.optimizer)
    session.start_step = last.step
    session.wall_before, session.tokens_before = last.manifest["wall_time_s"], last.manifest["tokens_seen"]
    _truncate_metrics(runs.metrics_path(session.cfg.run_dir), last.step)
    session.log(f"resuming from {last.path} (step {last.step})")


def _mlx_args(cfg: TrainConfig, start_step: int) -> TrainingArgs:
    return TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.iters - start_step,
        val_batches=-1,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,  # we save our own checkpoints from the callback
        adapter_file=str(cfg.run_dir / ".mlx_lm_last_adapters.safetensors"),
        max_seq_length=cfg.max_seq_length,
        grad_checkpoint=cfg.grad_checkpoint,
        grad_accumulation_steps=cfg.grad_accumulation,
    )


def _run_loop(session: TrainingSession, summary: dict, train_set) -> None:
    """mlx-lm's own training loop; run.json says how it ended, whatever happens."""
    cfg, run_dir = session.cfg, session.cfg.run_dir
    t0 = time.perf_counter()
    status = "failed"
    try:
        with library_output():  # mlx-lm's progress bar: to stderr, colour only on a terminal
            mlx_train(session.prep.model, session.optimizer, train_set, None, args=_mlx_args(cfg, session.start_step),
                      training_callback=_Callback(session), iterate_batches=_skip_batches(session.start_step, cfg.seed))
        status = "complete"
    except EarlyStopped as e:
        last = complete_checkpoints(run_dir)[-1]
        status = "complete"
        summary["early_stop"] = {"reason": str(e), "step": last.step, "planned_iters": cfg.iters}
        session.log(f"early stop at step {last.step}: {e}")
    except (KeyboardInterrupt, SystemExit):
        status = "interrupted"
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / ".mlx_lm_last_adapters.safetensors")
        summary.update(status=status, train_seconds=round(time.perf_counter() - t0 + session.wall_before, 2),
                       checkpoints=[c.name for c in complete_checkpoints(run_dir)])
        if session.loop_eval:
            summary["eval_seconds_in_loop"] = round(session.loop_eval.eval_seconds, 2)
        if session.rank == 0:
            write_json(runs.run_json(run_dir), summary)
    _finish_loop_eval(session, summary)


def _finish_loop_eval(session: TrainingSession, summary: dict) -> None:
    """Training is complete: score the targets that waited for it (loop_eval.py), in one batch."""
    if not (session.loop_eval and session.loop_eval.pending):
        return
    for line in session.loop_eval.finish(session.prep.model, session.prep.tokenizer):
        session.log(line)
    summary["eval_seconds_in_loop"] = round(session.loop_eval.eval_seconds, 2)
    write_json(runs.run_json(session.cfg.run_dir), summary)


def train(cfg: TrainConfig, log: Callable[[str], None] = lambda s: None, resume: bool = False,
          force: bool = False, worker: bool = False) -> dict:
    """Run training; returns the summary also written to ``run.json``.

    ``worker``: this process is one rank under ``mlx.launch`` (mlx_ft.distributed); the launcher
    already checked and prepared the run folder, and only rank 0 writes to it."""
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if rank != 0:
        log = lambda s: None  # noqa: E731  (rank 0 speaks for the run)
    previous = _check_start(cfg, resume, force, worker)
    prep = prepare(cfg, log)
    log(f"model {prep.model_path}; trainable parameters {prep.trainable:,} of {prep.total:,} "
        f"({100 * prep.trainable / prep.total:.3f}%)")
    for w in prep.warnings:
        log(f"WARNING: {w}")
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    opt = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[cfg.optimizer](learning_rate=cfg.learning_rate)
    tok = prep.tokenizer
    session = TrainingSession(prep, log, optimizer=opt, guard=Guard(cfg.divergence_factor), rank=rank,
                              world_size=world, loop_eval=_loop_eval(cfg, prep, log) if rank == 0 else None,
                              val_set=CacheDataset(ChatDataset(prep.splits["valid"], tok, mask_prompt=cfg.mask_prompt)))
    if previous:
        _restore(session, previous[-1])
        done = read_json(runs.run_json(cfg.run_dir))
        if session.loop_eval:
            session.loop_eval.restore(session.start_step, done["base"])
        if session.start_step >= cfg.iters or done.get("early_stop"):
            log("run already complete")
            _finish_loop_eval(session, done)  # what a crash after the last step left unscored
            return done
    summary = read_json(runs.run_json(cfg.run_dir)) if resume else _begin(session, force, worker)
    _run_loop(session, summary, CacheDataset(ChatDataset(prep.splits["train"], tok, mask_prompt=cfg.mask_prompt)))
    _check_learned(session, summary)
    return summary


def _check_learned(session: TrainingSession, summary: dict) -> None:
    """Warn when the training loss did not fall: the model may have learned nothing."""
    learned = session.guard.losses  # every step's loss of this session, as the guard saw it
    if len(learned) < 4:
        return
    head, tail = _mean(learned[: len(learned) // 4 or 1]), _mean(learned[-(len(learned) // 4 or 1):])
    summary["loss_start_end"] = [round(head, 4), round(tail, 4)]
    if not tail < head:
        session.log(f"WARNING: training loss did not fall ({head:.3f} -> {tail:.3f}); the model may have learned "
                    "nothing: check that learning_rate is not too low and that the right parameters train")
    if session.rank == 0:
        write_json(runs.run_json(session.cfg.run_dir), summary)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after the checkpoint we resume from (they will be trained again)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


__all__ = ["TrainConfig", "LoraConfig", "load_config", "train", "Guard"]
