"""Data-parallel training over ``mlx.launch`` (``mlxft train --ranks N`` or ``--hosts HOSTFILE``).

MLX ships the engine: ``mlx.launch`` starts one process per rank (ring backend over TCP, or MPI),
and mlx-lm's trainer averages gradients across ranks by itself, each rank taking a strided slice of
every batch. mlxft only checks what can be checked before launch (batch size divisible by the world
size, the run folder), starts ``mlx.launch``, and -- because ``mlx.launch`` exits 0 even when a rank
fails -- watches its output for a failed rank and fails the run with that rank's message.
Only rank 0 writes run.json, metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Callable

from mlx_ft import _blas
from mlx_ft.config import to_dict
from mlx_ft.errors import ConfigError, TrainingError, UserError
from mlx_ft.hosts import load_hosts
from mlx_ft.files import read_json, write_json

RANK_FAILED = re.compile(r"\[WARN\] Node with rank (\d+) exited with code (\d+)")


def world_size(ranks: int | None, hostfile: str | Path | None) -> int:
    if hostfile:
        return len(load_hosts(hostfile))
    if ranks is None or ranks < 1:
        raise UserError(f"--ranks {ranks}: must be at least 1")
    return ranks


def launcher() -> str:
    """mlx's public ``mlx.launch`` entry point, from this interpreter's environment."""
    beside = Path(sys.executable).with_name("mlx.launch")
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    if not found:
        raise UserError("mlx.launch not found next to this Python or on PATH; reinstall mlx in this environment "
                        "(pip install 'mlx[cpu]' on Linux, mlx on macOS)")
    return found


def launch_command(config_path: Path, ranks: int | None, hostfile: str | Path | None) -> list[str]:
    cmd = [launcher(), "--backend", "ring"]
    cmd += ["--hostfile", str(hostfile)] if hostfile else ["-n", str(ranks)]
    preload = _blas.child_env({}).get("LD_PRELOAD")
    if preload:
        cmd += ["--env", f"LD_PRELOAD={preload}"]
    return cmd + ["--", sys.executable, "-m", "mlx_ft", "train", "--worker", "-c", str(config_path)]


def train_distributed(cfg, ranks: int | None = None, hostfile: str | Path | None = None, force: bool = False,
                      log: Callable[[str], None] = lambda s: None, popen=subprocess.Popen) -> dict:
    """Run ``cfg`` data-parallel; returns rank 0's run.json. Raises if any rank failed."""
    world = world_size(ranks, hostfile)
    if cfg.batch_size % world:
        raise ConfigError("config", f"batch_size: {cfg.batch_size} is not divisible by the world size {world}; "
                                    f"use a multiple of {world}")
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise UserError(f"{run_dir} already exists; use --force to start over, or another --name")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from mlx_ft.models import resolve_model

    # resolve (and if needed import) the model once here, not concurrently in every rank
    cfg = dataclasses.replace(cfg, model=str(resolve_model(cfg.model, log=log).resolve()))
    config_path = write_json(run_dir / "launch-config.json", to_dict(cfg))
    cmd = launch_command(config_path, ranks, hostfile)
    log(f"launching {world} ranks: {' '.join(cmd)}")
    tail: deque[str] = deque(maxlen=40)
    failed: list[tuple[int, int]] = []
    proc = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(line.rstrip())
            m = RANK_FAILED.search(line)
            if m:
                failed.append((int(m.group(1)), int(m.group(2))))
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    if failed or rc != 0:
        what = ", ".join(f"rank {r} exited with code {c}" for r, c in failed) or f"mlx.launch exited with {rc}"
        raise TrainingError(f"distributed training failed ({what}); last output:\n" + "\n".join(tail))
    summary_path = run_dir / "run.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    if summary.get("status") != "complete":
        raise TrainingError(f"distributed training did not complete (run.json status {summary.get('status')!r}); "
                            "last output:\n" + "\n".join(tail))
    return summary
