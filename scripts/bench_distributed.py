#!/usr/bin/env python
"""``--ranks 2`` training, side by side in one run: ranks started through ``mlx.launch`` (as before)
vs started by mlxft itself (the default now), same config and data.

mlx.launch's I/O loop polls its stdin and each rank's stdin pipe with ``select``; both are always
ready, so the launcher spins while the ranks train. Prints, for each way: wall time, steps/s from
run.json, and the CPU seconds spent outside the ranks (the mlx.launch process, or this process
for the mlxft launcher) -- then the ratios.

    python scripts/bench_distributed.py --iters 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from mlx_ft import distributed  # noqa: E402
from mlx_ft.configfile import to_dict  # noqa: E402
from mlx_ft.files import read_json, write_json  # noqa: E402
from mlx_ft.models import resolve_model  # noqa: E402
from mlx_ft.train_config import load_config  # noqa: E402


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def via_mlx_launch(cfg, run_dir: Path) -> float:
    """The launcher's own CPU seconds (children excluded), sampled until it exits."""
    cmd = distributed.launch_command(run_dir / "launch-config.json", 2, None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    launcher, cpu = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            t = launcher.cpu_times()
            cpu = t.user + t.system
        except psutil.Error:
            break
        time.sleep(0.5)
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit("mlx.launch failed")
    return cpu


def via_mlxft(cfg, run_dir: Path) -> float:
    before = self_cpu()
    distributed._launch_local(distributed.worker_command(run_dir / "launch-config.json"), 2, run_dir,
                              lambda s: None, subprocess.Popen)
    return self_cpu() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--data", default="data/tools")
    a = ap.parse_args()
    model = str(resolve_model(None).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, way in (("mlx.launch", via_mlx_launch), ("mlxft", via_mlxft)):
            cfg = load_config(None, {"name": name.replace(".", "-"), "data": str(Path(a.data).resolve()),
                                     "runs_dir": tmp, "iters": a.iters, "save_every": a.iters, "batch_size": 4,
                                     "num_layers": 8, "max_seq_length": 512, "learning_rate": 1e-4})
            cfg = dataclasses.replace(cfg, model=model)
            cfg.run_dir.mkdir(parents=True)
            write_json(cfg.run_dir / "launch-config.json", to_dict(cfg))
            t = time.perf_counter()
            cpu = way(cfg, cfg.run_dir)
            wall = time.perf_counter() - t
            run = read_json(cfg.run_dir / "run.json")
            assert run["status"] == "complete", run["status"]
            rows.append({"way": name, "wall_s": round(wall, 1), "steps_per_s": round(a.iters / run["train_seconds"], 3),
                         "launcher_cpu_s": round(cpu, 1), "launcher_cpu_pct": round(100 * cpu / wall, 1)})
    for r in rows:
        print(f"{r['way']:<11} wall {r['wall_s']:7.1f} s  {r['steps_per_s']:.3f} steps/s  launcher CPU "
              f"{r['launcher_cpu_s']:6.1f} s ({r['launcher_cpu_pct']:.0f}% of a core)")
    print(f"steps/s mlxft / mlx.launch: {rows[1]['steps_per_s'] / rows[0]['steps_per_s']:.2f}x; "
          f"wall: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
