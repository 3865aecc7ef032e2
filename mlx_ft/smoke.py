"""``mlxft train --smoke``: a few real steps in a scratch folder, failing unless the loss falls."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlx_ft import data as datamod
from mlx_ft.errors import TrainingError
from mlx_ft.files import read_jsonl
from mlx_ft.train import train
from mlx_ft.train_config import TrainConfig

SMOKE_MIN_FALL = 0.01  # relative: float noise alone moves the loss by ~1e-6


def smoke(cfg: TrainConfig, steps: int, log: Callable[[str], None]) -> dict:
    """A few real steps in a scratch folder; fails unless the training loss falls.

    The loss is compared on a *fixed* set of training examples (scored before and after), not on
    the per-step batch losses, whose batch-to-batch noise could fake a fall or hide one."""
    with tempfile.TemporaryDirectory(prefix="mlxft-smoke-") as tmp:
        rows = datamod.load_chat_jsonl(datamod.split_path(cfg.data, "train"))
        fixed = rows[: max(2 * cfg.batch_size, 1)]
        data = Path(tmp) / "data"
        data.mkdir()
        shutil.copy(datamod.split_path(cfg.data, "train"), data / "train.jsonl")
        (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed), encoding="utf-8")
        scfg = dataclasses.replace(cfg, runs_dir=str(Path(tmp) / "runs"), data=str(data), iters=steps,
                                   save_every=steps, eval_suite=None,
                                   eval_during_training=False)
        train(scfg, log=log)
        rows = read_jsonl(scfg.run_dir / "metrics.jsonl")
    before = rows[0]["val_loss"]
    after = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    result = {"steps": steps, "examples": len(fixed), "loss_first": round(before, 4), "loss_last": round(after, 4),
              "passed": after < before * (1 - SMOKE_MIN_FALL)}
    if not result["passed"]:
        raise TrainingError(
            f"smoke test failed: training loss on {len(fixed)} fixed training examples did not fall over {steps} "
            f"steps by at least {SMOKE_MIN_FALL:.0%} ({before:.4f} -> {after:.4f}); raise learning_rate or check the "
            "data and which layers train"
        )
    return result
