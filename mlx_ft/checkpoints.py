"""Writing and restoring a checkpoint's training state (the folder layout is in runs.py).

``runs/<name>/checkpoints/step_000100/`` holds ``adapters.safetensors`` and ``adapter_config.json``
(so ``mlx_lm.load(base, adapter_path=folder)`` works as is), ``optimizer.safetensors`` (for an
exact ``--resume``) and ``manifest.json``, written last. The folder is built under a hidden name
and renamed into place, so a crash leaves either a complete checkpoint or a hidden partial one
that every later stage ignores.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ft import runs
from mlx_ft.errors import UserError
from mlx_ft.files import staged_dir, write_json


def write_checkpoint(run_dir: Path, step: int, model, optimizer, adapter_cfg: dict, manifest: dict) -> Path:
    final = runs.checkpoint_dir(run_dir, step)
    with staged_dir(final, force=True) as tmp:
        mx.save_safetensors(str(tmp / runs.ADAPTERS), dict(tree_flatten(model.trainable_parameters())))
        if optimizer is not None:
            state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), state)
        write_json(tmp / "adapter_config.json", adapter_cfg)
        write_json(tmp / runs.MANIFEST, manifest)
    return final


def load_training_state(folder: Path, model, optimizer) -> None:
    """Restore adapter weights and optimizer state (moments, step, lr) from a checkpoint."""
    weights = mx.load(str(folder / runs.ADAPTERS))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise UserError(f"{folder}: its adapter weights do not fit the model being trained (another num_layers, "
                        "rank or model?); resume with the config the run was trained with, or start over with --force")
    model.load_weights(list(weights.items()), strict=False)
    opt_file = folder / "optimizer.safetensors"
    if opt_file.exists():
        optimizer.init(model.trainable_parameters())
        state = dict(tree_flatten(optimizer.state))
        state.update(mx.load(str(opt_file)))
        optimizer.state = tree_unflatten(list(state.items()))
