"""``mlxft train``: mlx-lm's own trainer, wrapped with preflight checks, guards and checkpoints.

We do not re-implement the training loop: ``mlx_lm.tuner.trainer.train`` runs every step. What
mlxft adds sits around it -- checks before the first step (seeds 000/001: nothing trainable, bad
data, examples whose tool call would be cut off), a callback that stops on NaN or divergence,
and, every ``save_every`` steps, a checkpoint folder that ``mlx_lm.load(base, adapter_path=...)``
loads as is, with its manifest written last so a folder without one is incomplete by definition.
Validation always scores the *full* validation set (mlx-lm's default scores 25 random batches,
a different subset every time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from mlx_ft import config as cfgmod
from mlx_ft import data as datamod
from mlx_ft.checkpoints import CHECKPOINTS, checkpoint_name, complete_checkpoints, write_checkpoint
from mlx_ft.errors import ConfigError, TrainingError, UserError
from mlx_ft.files import append_jsonl, read_json, read_jsonl, sha256, write_json, write_text


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0

    def check(self) -> list[str]:
        problems = []
        if self.rank < 1:
            problems.append(f"rank: must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        return problems


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Saved resolved in ``run.json``."""

    name: str = "demo"
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct, imported once
    data: str = "data/tools"
    runs_dir: str = "runs"
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    num_layers: int = 8
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 1e-4
    iters: int = 100
    batch_size: int = 4
    grad_accumulation: int = 1
    seed: int = 0
    max_seq_length: int = 2048
    save_every: int = 25
    mask_prompt: bool = True
    allow_truncation: bool = False
    grad_checkpoint: bool = False
    divergence_factor: float = 3.0  # stop when the recent loss mean exceeds this × the first
    eval_suite: str | None = None  # to warn when its system prompt differs from the data's

    def check(self) -> list[str]:
        p = []
        for key in ("iters", "batch_size", "save_every", "grad_accumulation", "max_seq_length"):
            if getattr(self, key) < 1:
                p.append(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.num_layers < 1 and self.num_layers != -1:
            p.append(f"num_layers: must be positive (or -1 for all layers), got {self.num_layers}")
        if not self.learning_rate > 0:
            p.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.seed < 0:
            p.append(f"seed: must be >= 0, got {self.seed}")
        if self.divergence_factor <= 1:
            p.append(f"divergence_factor: must be > 1, got {self.divergence_factor}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            p.append(f"name: {self.name!r} must be a plain folder name")
        return p

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """YAML file (optional) with CLI overrides on top; every problem reported at once."""
    data = cfgmod.read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return cfgmod.build(TrainConfig, data, path or "command line")


def versions() -> dict:
    import mlx.core as mx
    from importlib.metadata import version

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


# ---------------------------------------------------------------- preflight


@dataclass
class Prepared:
    cfg: TrainConfig
    model_path: Path
    model: object
    tokenizer: object
    splits: dict[str, list[dict]]
    lengths: datamod.LengthReport
    trainable: int
    total: int
    warnings: list[str]


def prepare(cfg: TrainConfig, log: Callable[[str], None]) -> Prepared:
    """Everything that can fail before the first step does fail here, loudly."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_ft.models import resolve_model

    splits = datamod.load_splits(cfg.data)
    for split, rows in splits.items():
        if len(rows) < cfg.batch_size:
            raise ConfigError(
                datamod.split_path(cfg.data, split),
                f"{len(rows)} example(s) but batch_size is {cfg.batch_size}; add examples or lower batch_size",
            )
    model_path = resolve_model(cfg.model, log=log)
    model, tokenizer = load(str(model_path))
    warnings = []

    lengths = datamod.length_report(splits["train"] + splits["valid"], tokenizer, cfg.max_seq_length)
    n_train = len(splits["train"])

    def where(lines: list[int]) -> str:
        named = [f"train.jsonl:{n}" if n <= n_train else f"valid.jsonl:{n - n_train}" for n in lines[:5]]
        return ", ".join(named) + (" ..." if len(lines) > 5 else "")

    if lengths.prompt_overflow:
        raise ConfigError(
            cfg.data,
            f"{len(lengths.prompt_overflow)} example(s) have a prompt of at least max_seq_length="
            f"{cfg.max_seq_length} tokens ({where(lengths.prompt_overflow)}): nothing of the answer is "
            "left to train on and mlx-lm's loss becomes NaN; raise max_seq_length or shorten the prompts",
        )
    if lengths.truncated:
        msg = (
            f"{len(lengths.truncated)} example(s) are longer than max_seq_length={cfg.max_seq_length} "
            f"(longest {lengths.max_tokens} tokens; {where(lengths.truncated)}): mlx-lm keeps only the head, "
            "cutting off the end of the answer"
        )
        if not cfg.allow_truncation:
            raise ConfigError(cfg.data, msg + "; raise max_seq_length, or pass --allow-truncation to accept it")
        warnings.append(msg)

    if cfg.eval_suite:
        from mlx_ft.suite import load_suite

        suite = load_suite(cfg.eval_suite)
        trained = datamod.system_prompts(splits["train"])
        if suite.system_prompt not in trained:
            warnings.append(
                f"the system prompt of {cfg.eval_suite} differs from every system prompt in the training data "
                f"({len(trained)} distinct); the eval will measure a prompt the model never trained on (seed 004)"
            )

    model.freeze()
    if cfg.num_layers > len(model.layers):
        raise ConfigError("config", f"num_layers: {cfg.num_layers} but the model has only {len(model.layers)} layers")
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0):]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, cfg.num_layers, lora_parameters(cfg), use_dora=cfg.fine_tune_type == "dora")
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    if trainable == 0:
        raise TrainingError(
            "no trainable parameters: every weight is frozen, training would learn nothing (seed 001); "
            "check fine_tune_type and num_layers"
        )
    return Prepared(cfg, model_path, model, tokenizer, splits, lengths, trainable, total, warnings)


def lora_parameters(cfg: TrainConfig) -> dict:
    return {"rank": cfg.lora.rank, "scale": cfg.lora.scale, "dropout": cfg.lora.dropout}


def adapter_config(cfg: TrainConfig, model_path: Path) -> dict:
    """What ``mlx_lm.load(adapter_path=...)`` reads (plus the base path, absolute)."""
    return {
        "model": str(Path(model_path).resolve()),
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.num_layers,
        "lora_parameters": lora_parameters(cfg) if cfg.fine_tune_type != "full" else None,
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


def _make_callback(run: "Run"):
    from mlx_lm.tuner.trainer import TrainingCallback

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            run.on_step(info)

    return Callback()


@dataclass
class Run:
    prep: Prepared
    log: Callable[[str], None]
    start_step: int = 0
    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    last_loss: float = float("nan")
    optimizer: object = None
    val_set: object = None
    guard: Guard | None = None
    first_losses: list[float] = field(default_factory=list)
    tokens_before: int = 0  # from the checkpoint we resumed, if any
    wall_before: float = 0.0
    rank: int = 0  # only rank 0 writes files
    world_size: int = 1

    @property
    def cfg(self) -> TrainConfig:
        return self.prep.cfg

    def val_loss(self) -> float:
        from mlx_lm.tuner.trainer import evaluate

        model = self.prep.model
        model.eval()
        loss = evaluate(model, self.val_set, batch_size=self.cfg.batch_size, num_batches=-1,
                        max_seq_length=self.cfg.max_seq_length)
        model.train()
        return float(loss)

    def on_step(self, info: dict) -> None:
        step = info["iteration"] + self.start_step
        loss = float(info["train_loss"])
        self.tokens = self.tokens_before + int(info["trained_tokens"])
        self.last_loss = loss
        self.first_losses.append(loss)
        row = {
            "step": step,
            "train_loss": loss,
            "learning_rate": float(info["learning_rate"]),
            "tokens_per_second": round(float(info["tokens_per_second"]), 2),
            "trained_tokens": self.tokens,
            "peak_memory_gb": round(float(info["peak_memory"]), 3),
        }
        self.guard.check(step, loss)  # the loss is averaged over ranks: every rank stops together
        if step % self.cfg.save_every == 0 or step == self.cfg.iters:
            row["val_loss"] = self.val_loss()  # collective under mlx.launch: every rank takes part
            if self.rank == 0:
                self.checkpoint(step, row)
                self.log(f"step {step}: train loss {loss:.3f}, val loss {row['val_loss']:.3f} -> checkpoint saved")
        if self.rank == 0:
            append_jsonl(self.cfg.run_dir / "metrics.jsonl", row)

    def checkpoint(self, step: int, row: dict) -> None:
        from mlx_ft.fingerprint import fingerprint_model

        model = self.prep.model
        model.eval()
        fp = fingerprint_model(model, self.prep.tokenizer)
        model.train()
        manifest = {
            "step": step,
            "train_loss": row["train_loss"],
            "val_loss": row["val_loss"],
            "learning_rate": row["learning_rate"],
            "tokens_seen": self.tokens,
            "wall_time_s": round(time.perf_counter() - self.t0 + self.wall_before, 2),
            "seed": self.cfg.seed,
            "base_model": str(self.prep.model_path.resolve()),
            "world_size": self.world_size,
            "fingerprint": fp,
        }
        write_checkpoint(
            self.cfg.run_dir, step, model, self.optimizer, adapter_config(self.cfg, self.prep.model_path), manifest
        )


def data_hashes(data_dir: str | Path) -> dict[str, str]:
    return {s: sha256(datamod.split_path(data_dir, s)) for s in datamod.SPLITS}


def _skip_batches(n: int, seed: int):
    """mlx-lm's batch iterator, seeded, with the first ``n`` batches skipped (exact resume)."""
    from mlx_lm.tuner.trainer import iterate_batches

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed_=None, comm_group=None, **kw):
        it = iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=seed, comm_group=comm_group)
        for i, batch in enumerate(it):
            if i >= n:
                yield batch

    return iterate


def train(cfg: TrainConfig, log: Callable[[str], None] = lambda s: None, resume: bool = False,
          force: bool = False, worker: bool = False) -> dict:
    """Run training; returns the summary also written to ``run.json``.

    ``worker``: this process is one rank under ``mlx.launch`` (mlx_ft.distributed); the launcher
    already checked and prepared the run folder, and only rank 0 writes to it."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_train

    from mlx_ft.fingerprint import fingerprint_model

    run_dir = cfg.run_dir
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if rank != 0:
        log = lambda s: None  # noqa: E731  (rank 0 speaks for the run)
    start_step, wall_before, tokens_before = 0, 0.0, 0
    previous = complete_checkpoints(run_dir) if resume else []
    if resume:
        if not (run_dir / "run.json").exists():
            raise UserError(f"{run_dir}: nothing to resume (no run.json); start it without --resume")
        old = read_json(run_dir / "run.json")
        if old["config"] != cfgmod.to_dict(cfg):
            changed = sorted(k for k in old["config"] if old["config"].get(k) != cfgmod.to_dict(cfg).get(k))
            raise UserError(f"{run_dir}: cannot resume with a different config (changed: {', '.join(changed)})")
        if old["data_sha256"] != data_hashes(cfg.data):
            raise UserError(f"{run_dir}: the data in {cfg.data} changed since the run started; refusing to resume")
    elif not worker and run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise UserError(f"{run_dir} already exists; use --resume to continue it, --force to start over, or another --name")

    prep = prepare(cfg, log)
    model = prep.model
    log(f"model {prep.model_path}; trainable parameters {prep.trainable:,} of {prep.total:,} "
        f"({100 * prep.trainable / prep.total:.3f}%)")
    for w in prep.warnings:
        log(f"WARNING: {w}")
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    lr = cfg.learning_rate
    opt = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}[cfg.optimizer](learning_rate=lr)
    if previous:
        last = previous[-1]
        from mlx_ft.checkpoints import load_training_state

        load_training_state(last.path, model, opt)
        start_step = last.step
        wall_before, tokens_before = last.manifest["wall_time_s"], last.manifest["tokens_seen"]
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        log(f"resuming from {last.path} (step {start_step})")
        if start_step >= cfg.iters:
            log("run already complete")
            return read_json(run_dir / "run.json")

    tok = prep.tokenizer
    train_set = CacheDataset(ChatDataset(prep.splits["train"], tok, mask_prompt=cfg.mask_prompt))
    val_set = CacheDataset(ChatDataset(prep.splits["valid"], tok, mask_prompt=cfg.mask_prompt))
    run = Run(prep, log, start_step=start_step, val_set=val_set, optimizer=opt, guard=Guard(cfg.divergence_factor),
              tokens_before=tokens_before, wall_before=wall_before, rank=rank, world_size=world)

    summary: dict = {}
    if not resume:
        if run_dir.exists() and force and not worker:
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        base_val = run.val_loss()
        model.eval()
        base_fp = fingerprint_model(model, tok) if rank == 0 else None  # LoRA B is zero at init: the base
        model.train()
        summary = {
            "name": cfg.name,
            "config": cfgmod.to_dict(cfg),
            "model_path": str(prep.model_path.resolve()),
            "data_sha256": data_hashes(cfg.data),
            "versions": versions(),
            "examples": {s: len(r) for s, r in prep.splits.items()},
            "target_tokens": prep.lengths.target_tokens,
            "trainable_parameters": prep.trainable,
            "total_parameters": prep.total,
            "base": {"val_loss": base_val, "fingerprint": base_fp},
            "warnings": prep.warnings,
            "world_size": world,
            "status": "running",
        }
        if rank == 0:
            write_json(run_dir / "run.json", summary)
            append_jsonl(run_dir / "metrics.jsonl", {"step": 0, "val_loss": base_val})
        log(f"base model val loss {base_val:.3f} on the full validation set ({len(prep.splits['valid'])} examples)")
    else:
        summary = read_json(run_dir / "run.json")

    args = TrainingArgs(
        batch_size=cfg.batch_size,
        iters=cfg.iters - start_step,
        val_batches=-1,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,  # we save our own checkpoints from the callback
        adapter_file=str(run_dir / ".mlx_lm_last_adapters.safetensors"),
        max_seq_length=cfg.max_seq_length,
        grad_checkpoint=cfg.grad_checkpoint,
        grad_accumulation_steps=cfg.grad_accumulation,
    )
    t0 = time.perf_counter()
    status = "failed"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # mlx-lm's progress bar goes to stderr
            mlx_train(model, opt, train_set, None, args=args, training_callback=_make_callback(run),
                      iterate_batches=_skip_batches(start_step, cfg.seed))
        status = "complete"
    except (KeyboardInterrupt, SystemExit):
        status = "interrupted"
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / ".mlx_lm_last_adapters.safetensors")
        summary.update(status=status, train_seconds=round(time.perf_counter() - t0 + wall_before, 2),
                       checkpoints=[c.name for c in complete_checkpoints(run_dir)])
        if rank == 0:
            write_json(run_dir / "run.json", summary)
    learned = run.first_losses
    if len(learned) >= 4:
        head, tail = _mean(learned[: len(learned) // 4 or 1]), _mean(learned[-(len(learned) // 4 or 1):])
        summary["loss_start_end"] = [round(head, 4), round(tail, 4)]
        if not tail < head:
            log(f"WARNING: training loss did not fall ({head:.3f} -> {tail:.3f}); the model may have learned "
                "nothing (seed 001): check learning_rate and that the right parameters train")
        if rank == 0:
            write_json(run_dir / "run.json", summary)
    return summary


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after the checkpoint we resume from (they will be trained again)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


SMOKE_MIN_FALL = 0.01  # relative: float noise alone moves the loss by ~1e-6


def smoke(cfg: TrainConfig, steps: int, log: Callable[[str], None]) -> dict:
    """A few real steps in a scratch folder; fails unless the training loss falls.

    The loss is compared on a *fixed* set of training examples (scored before and after), not on
    the per-step batch losses, whose batch-to-batch noise could fake a fall or hide one."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mlxft-smoke-") as tmp:
        rows = datamod.load_chat_jsonl(datamod.split_path(cfg.data, "train"))
        fixed = rows[: max(2 * cfg.batch_size, 1)]
        data = Path(tmp) / "data"
        data.mkdir()
        shutil.copy(datamod.split_path(cfg.data, "train"), data / "train.jsonl")
        (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed), encoding="utf-8")
        scfg = dataclasses.replace(cfg, runs_dir=str(Path(tmp) / "runs"), data=str(data), iters=steps,
                                   save_every=steps, eval_suite=None)
        train(scfg, log=log)
        rows = read_jsonl(scfg.run_dir / "metrics.jsonl")
    before = rows[0]["val_loss"]
    after = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    result = {"steps": steps, "examples": len(fixed), "loss_first": round(before, 4), "loss_last": round(after, 4),
              "passed": after < before * (1 - SMOKE_MIN_FALL)}
    if not result["passed"]:
        raise TrainingError(
            f"smoke test failed: training loss on {len(fixed)} fixed training examples did not fall over {steps} "
            f"steps by at least {SMOKE_MIN_FALL:.0%} ({before:.4f} -> {after:.4f}); raise learning_rate or check the data and trainable layers (seed 001)"
        )
    return result


__all__ = ["TrainConfig", "LoraConfig", "load_config", "train", "smoke", "CHECKPOINTS", "checkpoint_name"]
