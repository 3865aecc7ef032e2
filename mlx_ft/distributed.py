"""Data-parallel training (``mlxft train --ranks N`` or ``--hosts HOSTFILE``), ring backend.

MLX ships the engine: mlx-lm's trainer averages gradients across ranks by itself, each rank taking a
strided slice of every batch; a rank finds its peers from ``MLX_RANK`` and the ring hostfile named
by ``MLX_HOSTFILE``. mlxft checks what can be checked before launch (batch size divisible by the
world size, the run folder), then:

- ``--ranks N`` (this machine): starts the N rank processes itself, with that environment, and
  waits on them. ``mlx.launch`` would do the same but its I/O loop spins: it polls its own stdin and
  each rank's always-writable stdin pipe with ``select``, which returns at once, so the launcher
  burns a whole core (measured: 88-94 % of one) while the ranks train -- half of a 2-core machine.
- ``--hosts HOSTFILE`` (several machines): ``mlx.launch`` starts the ranks over ssh, and because it
  exits 0 even when a rank fails, its output is watched for a failed rank.

Either way a failed rank fails the run with that rank's output. Only rank 0 writes run.json,
metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from mlx_ft import _blas
from mlx_ft.configfile import to_dict
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
    return cmd + ["--", *worker_command(config_path)]


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
    if hostfile:
        _launch_hosts(launch_command(config_path, None, hostfile), world, log, popen)
    else:
        _launch_local(worker_command(config_path), ranks, run_dir, log, popen)
    summary_path = run_dir / "run.json"
    summary = read_json(summary_path) if summary_path.exists() else {}
    if summary.get("status") != "complete":
        raise TrainingError(f"distributed training did not complete (run.json status {summary.get('status')!r})")
    return summary


def worker_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "mlx_ft", "train", "--worker", "-c", str(config_path)]


def ring_hostfile(ranks: int, run_dir: Path, port=None) -> Path:
    """The ring backend's hostfile for ``ranks`` processes on this machine: one loopback port each."""
    if port is None:
        from mlx_ft.server import free_port

        port = free_port
    return write_json(run_dir / "ring-hosts.json", [[f"127.0.0.1:{port()}"] for _ in range(ranks)])


def _launch_local(cmd: list[str], ranks: int, run_dir: Path, log: Callable[[str], None], popen) -> None:
    """Start every rank of this machine and wait on them (blocking reads, no polling loop). When one
    rank fails the others would wait forever on its gradients: they are stopped."""
    hostfile = ring_hostfile(ranks, run_dir)
    log(f"starting {ranks} ranks on this machine: {' '.join(cmd)}")
    procs, tails, readers = [], [deque(maxlen=40) for _ in range(ranks)], []
    try:
        for rank in range(ranks):
            env = {**_blas.child_env(), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            procs.append(popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True, env=env, start_new_session=True))
            say = log if rank == 0 else None  # rank 0 speaks for the run; the others' output is kept for errors
            readers.append(threading.Thread(target=_pump, args=(procs[-1], tails[rank], say), daemon=True))
            readers[-1].start()
        failed = _wait_all(procs)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    finally:
        for t in readers:
            t.join(timeout=10)
    if failed:
        rank, rc = failed
        raise TrainingError(f"distributed training failed (rank {rank} exited with code {rc}); its last output:\n"
                            + "\n".join(tails[rank]))


def _pump(proc, tail: deque, say) -> None:
    for line in proc.stdout:
        tail.append(line.rstrip())
        if say:
            say(line.rstrip())


def _wait_all(procs: list) -> tuple[int, int] | None:
    """Wait for every rank; the first (rank, exit code) that failed, after stopping the rest."""
    while True:
        codes = [p.poll() for p in procs]
        bad = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
        if bad:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait(timeout=30)
            return bad
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.5)


def _launch_hosts(cmd: list[str], world: int, log: Callable[[str], None], popen) -> None:
    """mlx.launch over the hostfile's hosts; it exits 0 even when a rank fails, so read its output."""
    log(f"launching {world} ranks: {' '.join(cmd)}")
    tail: deque[str] = deque(maxlen=40)
    failed: list[tuple[int, int]] = []
    # a stdin that stays open and idle: at EOF mlx.launch's select on it returns at once, every loop
    proc = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True,
                 start_new_session=True)
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
    finally:
        if proc.stdin:
            proc.stdin.close()
    if failed or rc != 0:
        what = ", ".join(f"rank {r} exited with code {c}" for r, c in failed) or f"mlx.launch exited with {rc}"
        raise TrainingError(f"distributed training failed ({what}); last output:\n" + "\n".join(tail))
