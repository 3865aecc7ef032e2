"""Eval in the training loop: each checkpoint scored on the suite as soon as it is written.

The weights are already in memory, so the checkpoint is scored there -- no reload, no server --
by the same batched engine, scoring and result files as ``mlxft eval`` (a later ``mlxft eval
--run`` finds them done). The base model is scored once at step 0 (LoRA's B matrices start at
zero, so the untrained model *is* the base). Early stop ends training when ``patience``
checkpoints in a row bring no new best score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_ft import runs
from mlx_ft.engine_batched import BatchedEngine
from mlx_ft.evaluate import bind, prepare, reusable, run_engine
from mlx_ft.files import read_json
from mlx_ft.train_config import EarlyStop
from mlx_ft.selection import wilson
from mlx_ft.targets import Target


class LoopEval:
    def __init__(self, suite, run_dir: Path, model_path: Path, early_stop: EarlyStop, *, wave: int = 256,
                 log: Callable[[str], None] = lambda s: None):
        self.suite, self.run_dir, self.model_path = suite, Path(run_dir), Path(model_path)
        self.early_stop, self.wave, self.log = early_stop, wave, log
        self.history: list[tuple[int, float]] = []  # (step, metric) of every scored target, base first
        self.eval_seconds = 0.0

    def score(self, model, tokenizer, *, step: int, fingerprint: dict | None, val_loss: float | None) -> dict:
        """Score the model as it is now, as target ``base`` (step 0) or the checkpoint of ``step``."""
        name = runs.BASE if step == 0 else runs.checkpoint_name(step)
        adapter = None if step == 0 else runs.checkpoint_dir(self.run_dir, step)
        target = Target(name, self.model_path, adapter, runs.evals_dir(self.run_dir, name), step, fingerprint,
                        val_loss)
        suite, parser = bind(self.suite, tokenizer)
        reusable(target, suite, force=True, log=self.log)  # drops a stale partial file
        model.eval()
        try:
            engine = BatchedEngine(model, tokenizer, suite, {name: None}, wave=self.wave)
            [record] = run_engine(engine, prepare([target], suite, parser))
        finally:
            model.train()
        self.eval_seconds += record["seconds"]
        s = record["summary"]
        metric = s["score"] if self.early_stop.metric == "score" else s["pass_rate"]
        self.history.append((step, metric))
        return record

    def restore(self, up_to_step: int) -> None:
        """On --resume: the scores of the base and the checkpoints already written, so early stop
        counts from where the run was."""
        names = [runs.BASE] + [c.name for c in runs.complete_checkpoints(self.run_dir) if c.step <= up_to_step]
        for name in names:
            path = runs.result_path(runs.evals_dir(self.run_dir, name), self.suite.name)
            if path.is_file():
                rec = read_json(path)
                s = rec["summary"]
                self.history.append((rec["target"]["step"] or 0,
                                     s["score"] if self.early_stop.metric == "score" else s["pass_rate"]))

    def line(self, record: dict, train_loss: float | None, val_loss: float | None) -> str:
        """The per-checkpoint progress line: losses and eval side by side."""
        s = record["summary"]
        passed = round(s["pass_rate"] * s["n"])
        lo, hi = wilson(passed, s["n"])
        step = record["target"]["step"]
        losses = (f"train loss {train_loss:.3f}, " if train_loss is not None else "") + (
            f"val loss {val_loss:.3f}" if val_loss is not None else "")
        return (f"step {step}: {losses} | eval {self.suite.name}: score {s['score']:.1%}, strict {s['pass_rate']:.1%} "
                f"(95% CI {lo:.0%}-{hi:.0%}) [{record['seconds']:.1f} s]")

    def stop_reason(self) -> str | None:
        """Why training should stop now, or None: ``patience`` checkpoints without a new best."""
        patience = self.early_stop.patience
        if not patience or len(self.history) <= patience:
            return None
        best_i = max(range(len(self.history)), key=lambda i: (self.history[i][1], -i))  # first best
        since = len(self.history) - 1 - best_i
        if since < patience:
            return None
        best_step, best = self.history[best_i]
        return (f"{since} checkpoint(s) in a row without a new best eval {self.early_stop.metric} "
                f"(best {best:.1%} at step {best_step}; patience {patience})")
