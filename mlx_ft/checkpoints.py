"""The checkpoint folder contract.

``runs/<name>/checkpoints/step_000100/`` holds ``adapters.safetensors`` and ``adapter_config.json``
(so ``mlx_lm.load(base, adapter_path=folder)`` works as is), ``optimizer.safetensors`` (for an
exact ``--resume``) and ``manifest.json``, written last. The folder is built under a hidden name
and renamed into place, so a crash leaves either a complete checkpoint or a hidden partial one
that every later stage ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_ft.files import read_json, staged_dir, write_json

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name


def complete_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Checkpoints with a manifest, by step. Anything else in the folder is ignored."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for d in sorted(root.glob("step_*")) if root.is_dir() else []:
        if not (d / MANIFEST).is_file() or not (d / "adapters.safetensors").is_file():
            continue
        try:
            manifest = read_json(d / MANIFEST)
        except ValueError:
            continue
        found.append(Checkpoint(d, int(manifest["step"]), manifest))
    return sorted(found, key=lambda c: c.step)


def write_checkpoint(run_dir: Path, step: int, model, optimizer, adapter_cfg: dict, manifest: dict) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    final = Path(run_dir) / CHECKPOINTS / checkpoint_name(step)
    with staged_dir(final, force=True) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        if optimizer is not None:
            state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), state)
        write_json(tmp / "adapter_config.json", adapter_cfg)
        write_json(tmp / MANIFEST, manifest)
    return final


def load_training_state(folder: Path, model, optimizer) -> None:
    """Restore adapter weights and optimizer state (moments, step, lr) from a checkpoint."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    weights = mx.load(str(folder / "adapters.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise ValueError(f"{folder}: adapter weights do not match the model being trained")
    model.load_weights(list(weights.items()), strict=False)
    opt_file = folder / "optimizer.safetensors"
    if opt_file.exists():
        optimizer.init(model.trainable_parameters())
        state = dict(tree_flatten(optimizer.state))
        state.update(mx.load(str(opt_file)))
        optimizer.state = tree_unflatten(list(state.items()))
