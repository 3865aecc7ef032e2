"""The on-disk layout of a run folder, and nothing else: every stage asks here for its paths.

::

    runs/<name>/
      run.json                      what was trained, on what, and how it ended
      metrics.jsonl                 one row per training step
      checkpoints/step_000100/      adapters.safetensors, adapter_config.json, optimizer.safetensors,
                                    manifest.json (written last: no manifest = incomplete)
      evals/<target>/<suite>.json   one eval of one target (``base`` is the base model, step 0)
      evals/<target>/<suite>.partial.jsonl
                                    prompts scored so far by an interrupted eval
      best.json                     pick-best's choice and its reason
      report.md, report.html        mlxft report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_ft.errors import CorruptFileError, UserError
from mlx_ft.files import read_json

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
ADAPTERS = "adapters.safetensors"
EVALS = "evals"
BEST = "best.json"
BASE = "base"  # the base model's target name in evals/


def run_json(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_JSON


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def best_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / BEST


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / checkpoint_name(step)


def evals_dir(run_dir: str | Path, target: str) -> Path:
    """Where the results of one target (``base`` or a checkpoint name) go."""
    return Path(run_dir) / EVALS / target


def result_path(out_dir: str | Path, suite: str) -> Path:
    return Path(out_dir) / f"{suite}.json"


def partial_path(out_dir: str | Path, suite: str) -> Path:
    return Path(out_dir) / f"{suite}.partial.jsonl"


def is_run(run_dir: str | Path) -> bool:
    return run_json(run_dir).is_file()


def read_run(run_dir: str | Path) -> dict:
    """run.json of a run folder, or a UserError saying how to make one."""
    if not is_run(run_dir):
        raise UserError(f"{run_dir}: not a run folder (no {RUN_JSON}); train one with `mlxft train`")
    return read_json(run_json(run_dir))


def run_of_checkpoint(folder: str | Path) -> Path | None:
    """The run folder a checkpoint folder belongs to, if it sits in one."""
    run_dir = Path(folder).parent.parent
    return run_dir if Path(folder).parent.name == CHECKPOINTS and is_run(run_dir) else None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name


def complete_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Checkpoints with a manifest and adapters, by step. Anything else in the folder is ignored."""
    root = checkpoints_dir(run_dir)
    found = []
    for d in sorted(root.glob("step_*")) if root.is_dir() else []:
        if not (d / MANIFEST).is_file() or not (d / ADAPTERS).is_file():
            continue
        try:
            manifest = read_json(d / MANIFEST)
        except CorruptFileError:
            continue  # a manifest being written by another process: not complete yet
        found.append(Checkpoint(d, int(manifest["step"]), manifest))
    return sorted(found, key=lambda c: c.step)
