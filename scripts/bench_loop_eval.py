#!/usr/bin/env python
"""Eval in the training loop vs training then ``mlxft eval --run``, side by side in one run.

Both ways train the same config (default configs/demo.yaml) and end with every checkpoint and the
base scored on its eval_suite:
  A. ``mlxft train --eval``: each checkpoint scored in the training process as it is written
  B. ``mlxft train --no-eval`` then ``mlxft eval --run`` (the batched engine, all targets at once)
Prints both wall times, their ratio, how much of A's training wall time the evals took, and whether
both ways gave the same replies, prompt by prompt.

    python scripts/bench_loop_eval.py [--config configs/demo.yaml] [--iters 48]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLXFT = [sys.executable, "-m", "mlx_ft"]


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(MLXFT + args, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"mlxft {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def replies(run: Path, suite: str) -> dict:
    return {(f.parent.name, x["id"]): x["text"] for f in run.glob(f"evals/*/{suite}.json")
            for x in json.loads(f.read_text())["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--iters", type=int)
    a = ap.parse_args()
    extra = ["--iters", str(a.iters)] if a.iters else []
    with tempfile.TemporaryDirectory() as tmp:
        common = ["-c", a.config, "--runs-dir", tmp, *extra]
        loop_s = timed(["train", *common, "--name", "loop", "--eval"])
        train_s = timed(["train", *common, "--name", "after", "--no-eval"])
        suite_path = __import__("yaml").safe_load(Path(ROOT / a.config).read_text())["eval_suite"]
        eval_s = timed(["eval", "--run", str(Path(tmp) / "after"), "--prompts", suite_path])
        run = json.loads((Path(tmp) / "loop" / "run.json").read_text())
        suite = __import__("yaml").safe_load(Path(ROOT / suite_path).read_text())["name"]
        a_rep, b_rep = replies(Path(tmp) / "loop", suite), replies(Path(tmp) / "after", suite)
    after_s = train_s + eval_s
    in_loop = run["eval_seconds_in_loop"]
    same = sum(a_rep[k] == b_rep.get(k) for k in a_rep)
    print(f"A. train with in-loop eval          {loop_s:7.1f} s  (evals {in_loop:.1f} s = "
          f"{100 * in_loop / run['train_seconds']:.0f}% of its training wall time {run['train_seconds']:.1f} s)")
    print(f"B. train, then mlxft eval --run     {after_s:7.1f} s  (train {train_s:.1f} s + eval {eval_s:.1f} s)")
    print(f"A / B wall time: {loop_s / after_s:.2f}  (below 1: in-loop is faster end to end)")
    print(f"same replies A vs B: {same}/{len(a_rep)} (training is not bit-reproducible run to run with threaded BLAS)")


if __name__ == "__main__":
    main()
