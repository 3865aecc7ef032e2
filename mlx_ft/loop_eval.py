"""Eval in the training loop: the base and every checkpoint scored in the training process.

The weights are already in memory, so they are scored there -- no reload, no server -- by the same
batched engine, scoring and result files as ``mlxft eval`` (a later ``mlxft eval --run`` finds
them done). The base model is scored at step 0 (LoRA's B matrices start at zero, so the untrained
model *is* the base).

When they are scored depends on whether anything waits for the score:

- with early stop, each checkpoint is scored as soon as it is written (the decision needs it),
  the live model as it is;
- without it, the targets wait and are scored together when training ends, in one batch of the
  base plus one adapter slot per checkpoint (read back from the files just written, against the
  base weights still in memory). On a CPU a batch of 7 targets costs little more than a batch of
  one -- each decode step reads every weight once whatever the rows -- so the in-loop eval then
  costs what one ``mlxft eval --run`` after training costs, without loading the model again.

Early stop ends training when ``patience`` checkpoints in a row bring no new best score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_ft import batched, runs
from mlx_ft.engine_batched import BatchedEngine
from mlx_ft.evaluate import bind, prepare, reusable, run_engine
from mlx_ft.files import read_json
from mlx_ft.train_config import EarlyStop
from mlx_ft.selection import wilson
from mlx_ft.targets import Target

WRAPPERS = ("LoRALinear", "LoRASwitchLinear")  # mlx-lm's LoRA layers, each around the base layer it adapts


@dataclass
class _Pending:
    target: Target
    train_loss: float | None


class LoopEval:
    def __init__(self, suite, run_dir: Path, model_path: Path, early_stop: EarlyStop, model, *, wave: int = 256,
                 log: Callable[[str], None] = lambda s: None):
        """``model``: the model being trained, its adapter layers in place."""
        self.suite, self.run_dir, self.model_path = suite, Path(run_dir), Path(model_path)
        self.early_stop, self.wave, self.log = early_stop, wave, log
        self.history: list[tuple[int, float]] = []  # (step, metric) of every scored target, base first
        self.pending: list[_Pending] = []
        self.eval_seconds = 0.0
        # targets wait for the end of training when nothing decides on their score before then, and the
        # batched engine can give their adapters slots
        self.deferred = not early_stop.patience and _adapts_lora_only(model)

    def target(self, step: int, fingerprint: dict | None, val_loss: float | None) -> Target:
        name = runs.BASE if step == 0 else runs.checkpoint_name(step)
        adapter = None if step == 0 else runs.checkpoint_dir(self.run_dir, step)
        return Target(name, self.model_path, adapter, runs.evals_dir(self.run_dir, name), step, fingerprint, val_loss)

    def checkpoint(self, model, tokenizer, *, step: int, fingerprint: dict | None, val_loss: float | None,
                   train_loss: float | None) -> str:
        """Score (or queue) the base (step 0) or the checkpoint of ``step`` just written; the
        progress line to show for it."""
        target = self.target(step, fingerprint, val_loss)
        if self.deferred:
            self.pending.append(_Pending(target, train_loss))
            return f"{_losses(step, train_loss, val_loss)} | eval: queued, scored with the others when training ends"
        [record] = self._score(model, tokenizer, [target], live=True)
        return self.line(record, train_loss)

    def finish(self, model, tokenizer) -> list[str]:
        """Score every queued target in one batch; their progress lines."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        self.log(f"scoring {len(pending)} target(s) on {self.suite.name} in one batch (base weights in memory)")
        records = self._score(model, tokenizer, [p.target for p in pending], live=False)
        by_name = {r["target"]["name"]: r for r in records}
        return [self.line(by_name[p.target.name], p.train_loss) for p in pending]

    def _score(self, model, tokenizer, targets: list[Target], *, live: bool) -> list[dict]:
        """``live``: one target, the model as it is now. Otherwise each checkpoint target gets its
        adapter files read into a slot beside the base (slot 0, the model without its LoRA layers)."""
        suite, parser = bind(self.suite, tokenizer)
        for t in targets:
            reusable(t, suite, force=True, log=self.log)  # drops a stale partial file
        t0 = time.perf_counter()
        model.eval()
        restore = None if live else _unwrap_lora(model)
        try:
            adapters = {targets[0].name: None} if live else {
                t.name: batched.read_adapter(Path(t.adapter), model) if t.adapter else None for t in targets}
            engine = BatchedEngine(model, tokenizer, suite, adapters, wave=self.wave)
            records = run_engine(engine, prepare(targets, suite, parser))
        finally:
            if restore:
                restore()
            model.train()
        self.eval_seconds += time.perf_counter() - t0
        for r in sorted(records, key=lambda r: r["target"]["step"] or 0):
            self.history.append((r["target"]["step"] or 0, self._metric(r)))
        return records

    def _metric(self, record: dict) -> float:
        """What early stop compares: the eval score, or the strict pass rate."""
        s = record["summary"]
        return s["score"] if self.early_stop.metric == "score" else s["pass_rate"]

    def restore(self, up_to_step: int, base: dict) -> None:
        """On --resume: the scores of the base (``base``: run.json's) and the checkpoints already
        written, so early stop counts from where the run was; those a crash left unscored are queued
        (deferred mode)."""
        base = self.target(0, base.get("fingerprint"), base.get("val_loss"))
        found = [(base, None)] + [(self.target(c.step, c.manifest.get("fingerprint"), c.manifest.get("val_loss")),
                                   c.manifest.get("train_loss"))
                                  for c in runs.complete_checkpoints(self.run_dir) if c.step <= up_to_step]
        for target, train_loss in found:
            path = target.result_path(self.suite.name)
            if path.is_file():
                self.history.append((target.step or 0, self._metric(read_json(path))))
            elif self.deferred:
                self.pending.append(_Pending(target, train_loss))

    def line(self, record: dict, train_loss: float | None) -> str:
        """The per-checkpoint progress line: losses and eval side by side."""
        s = record["summary"]
        passed = round(s["pass_rate"] * s["n"])
        lo, hi = wilson(passed, s["n"])
        t = record["target"]
        return (f"{_losses(t['step'] or 0, train_loss, t['val_loss'])} | eval {self.suite.name}: score "
                f"{s['score']:.1%}, strict {s['pass_rate']:.1%} (95% CI {lo:.0%}-{hi:.0%})")

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


def _losses(step: int, train_loss: float | None, val_loss: float | None) -> str:
    parts = [f"train loss {train_loss:.3f}" if train_loss is not None else None,
             f"val loss {val_loss:.3f}" if val_loss is not None else None]
    return f"step {step}: " + ", ".join(p for p in parts if p)


def _adapts_lora_only(model) -> bool:
    """Every adapted layer is one of mlx-lm's LoRA wrappers the batched engine can give slots to
    (not DoRA, not an adapted embedding, not a full fine-tune)."""
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    return bool(kinds & set(WRAPPERS)) and not any(k.startswith(("DoRA", "LoRA")) and k not in WRAPPERS
                                                  for k in kinds)


def _unwrap_lora(model) -> Callable[[], None]:
    """Put each LoRA layer's base layer back in its place (the model becomes the base); returns
    what puts the LoRA layers back -- their parents first, since the batched engine may have put a
    router in place of a mixture-of-experts block around them."""
    from mlx.utils import tree_unflatten

    modules = dict(model.named_modules())
    wrapped = [(p, m) for p, m in modules.items() if type(m).__name__ in WRAPPERS]
    parents = sorted({p.rpartition(".")[0] for p, _ in wrapped} - {""})
    model.update_modules(tree_unflatten([(p, m.linear) for p, m in wrapped]))

    def restore() -> None:
        now = dict(model.named_modules())
        replaced = [(p, modules[p]) for p in parents if now.get(p) is not modules[p]]
        if replaced:
            model.update_modules(tree_unflatten(replaced))
        model.update_modules(tree_unflatten(wrapped))

    return restore
