#!/usr/bin/env python
"""Eval in the training loop vs training then ``mlxft eval --run``, side by side in one run.

Each way trains the same config (default configs/demo.yaml) and ends with every checkpoint and the
base scored on its eval_suite:
  A. ``mlxft train --eval`` (no early stop): the targets scored in the training process, together,
     when training ends
  B. ``mlxft train --no-eval`` then ``mlxft eval --run`` (the batched engine, all targets at once)
  C. ``mlxft train --eval`` with early stop on (a patience it never reaches): each checkpoint scored
     in the training process as it is written, as early stop needs
Prints the wall times, their ratios, how much of each in-loop run the evals took, and whether the
ways gave the same replies, prompt by prompt.

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

import yaml

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
        cfg = yaml.safe_load(Path(ROOT / a.config).read_text())
        patient = Path(tmp) / "patient.yaml"  # early stop on, never reached: every checkpoint scored at once
        patient.write_text(yaml.safe_dump({**cfg, "early_stop": {"metric": "score", "patience": 10**6},
                                           "data": str(ROOT / cfg["data"]),
                                           "eval_suite": str(ROOT / cfg["eval_suite"])}))
        loop_s = timed(["train", *common, "--name", "loop", "--eval"])
        train_s = timed(["train", *common, "--name", "after", "--no-eval"])
        eval_s = timed(["eval", "--run", str(Path(tmp) / "after"), "--prompts", cfg["eval_suite"]])
        each_s = timed(["train", "-c", str(patient), "--runs-dir", tmp, *extra, "--name", "each", "--eval"])
        runs = {n: json.loads((Path(tmp) / n / "run.json").read_text()) for n in ("loop", "each")}
        suite = yaml.safe_load(Path(ROOT / cfg["eval_suite"]).read_text())["name"]
        rep = {n: replies(Path(tmp) / n, suite) for n in ("loop", "after", "each")}
    after_s = train_s + eval_s
    for label, name, wall in (("A. train --eval, scored together at the end", "loop", loop_s),
                              ("C. train --eval, early stop: scored as written", "each", each_s)):
        r = runs[name]
        print(f"{label:48s} {wall:7.1f} s  (training {r['train_seconds']:.1f} s, evals {r['eval_seconds_in_loop']:.1f} s)")
    print(f"{'B. train --no-eval, then mlxft eval --run':48s} {after_s:7.1f} s  (train {train_s:.1f} s + eval {eval_s:.1f} s)")
    print(f"A / B wall time: {loop_s / after_s:.2f}  (at most 1: in-loop is no slower end to end)")
    print(f"C / B wall time: {each_s / after_s:.2f}  (the price of scoring each checkpoint as it lands)")
    for x, y in (("loop", "after"), ("loop", "each")):
        same = sum(rep[x][k] == rep[y].get(k) for k in rep[x])
        print(f"same replies {x} vs {y}: {same}/{len(rep[x])} (training is not bit-reproducible run to run "
              "with threaded BLAS)")

if __name__ == "__main__":
    main()
