#!/usr/bin/env python
"""Training speed, side by side in one run: mlxft train vs plain mlx_lm.lora, same config and data.

Three runs of the same LoRA config on the embedded model:
  A. stock ``mlx_lm.lora`` in a default environment (the mlx-cpu wheel's reference BLAS)
  B. ``mlx_lm.lora`` with OpenBLAS preloaded (the environment mlxft gives itself)
  C. ``mlxft train``
Prints each run's steady-state step time (mean over steps 2..N, from the trainer's own per-step
report, so model loading and validation are excluded) and whole-command wall time, then the ratios
C vs B (mlxft's overhead) and C vs A (fast BLAS).

    python scripts/bench_train.py            # 12 steps each
    python scripts/bench_train.py --quick    # 4 steps each (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_ft import _blas  # noqa: E402
from mlx_ft.models import resolve_model  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+\S\s+([\d,]+)\s+([\d.]+)k")


def steady_tokens_per_s(text: str) -> float:
    """Mean of mlx-lm's per-step tok/s over steps 2..N (step 1 includes compilation)."""
    rates = [float(m.group(3).replace(",", "")) for line in ANSI.sub("", text).splitlines()
             if (m := ROW.match(line)) and int(m.group(1)) > 1]
    return sum(rates) / len(rates) if rates else float("nan")


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t, p.stdout + p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", default="data/tools")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-stock", action="store_true", help="skip run A (slow); no BLAS ratio then")
    a = ap.parse_args()
    iters = 4 if a.quick else a.iters
    model = str(resolve_model(None))
    common = dict(batch_size=4, num_layers=8, learning_rate=5e-4, max_seq_length=512)
    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    stock_env = {**base_env, "MLXFT_FAST_BLAS": "0"}
    blas_env = _blas.child_env(base_env)
    with tempfile.TemporaryDirectory(prefix="mlxft-bench-train-") as tmp:
        lora = [sys.executable, "-m", "mlx_lm", "lora", "--model", model, "--train", "--data", a.data,
                "--iters", str(iters), "--batch-size", str(common["batch_size"]),
                "--num-layers", str(common["num_layers"]), "--learning-rate", str(common["learning_rate"]),
                "--max-seq-length", str(common["max_seq_length"]), "--mask-prompt", "--steps-per-report", "1",
                "--steps-per-eval", str(iters), "--val-batches", "1", "--save-every", str(iters), "--seed", "0"]
        mlxft = [sys.executable, "-m", "mlx_ft", "train", "--data", a.data, "--runs-dir", tmp, "--name", "bench",
                 "--iters", str(iters), "--save-every", str(iters), "--batch-size", str(common["batch_size"]),
                 "--num-layers", str(common["num_layers"]), "--learning-rate", str(common["learning_rate"]),
                 "--max-seq-length", str(common["max_seq_length"]), "--seed", "0", "--model", model]
        results = {}
        for label, cmd, env in (("A stock mlx_lm.lora (reference BLAS)", lora + ["--adapter-path", f"{tmp}/a"], stock_env),
                                ("B mlx_lm.lora + OpenBLAS", lora + ["--adapter-path", f"{tmp}/b"], blas_env),
                                ("C mlxft train", mlxft, base_env)):
            if a.skip_stock and label.startswith("A"):
                results[label] = {"wall_s": float("nan"), "tokens_per_s": float("nan")}
                continue
            print(f"running {label} ...", file=sys.stderr)
            wall, text = run(cmd, env)
            if label.startswith("C"):
                rows = [json.loads(x) for x in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
                rates = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r and r["step"] > 1]
                tps = sum(rates) / len(rates)
            else:
                tps = steady_tokens_per_s(text)
            results[label] = {"wall_s": round(wall, 1), "tokens_per_s": round(tps, 2)}
    a_, b_, c_ = (results[k] for k in results)
    summary = {"iters": iters, "runs": results,
               "overhead_C_vs_B": round(b_["tokens_per_s"] / c_["tokens_per_s"] - 1, 4),
               "speedup_C_vs_A": round(c_["tokens_per_s"] / a_["tokens_per_s"], 2),
               "wall_speedup_C_vs_A": round(a_["wall_s"] / c_["wall_s"], 2)}
    if a.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'run':<40} {'tokens/s (steps 2..N)':>22} {'wall s':>8}")
    for k, v in results.items():
        print(f"{k:<40} {v['tokens_per_s']:>22} {v['wall_s']:>8}")
    print(f"mlxft overhead vs mlx_lm.lora, same env: {100 * summary['overhead_C_vs_B']:+.1f}% time per token")
    print(f"mlxft vs stock mlx_lm.lora: {summary['speedup_C_vs_A']}x tokens/s, {summary['wall_speedup_C_vs_A']}x wall")


if __name__ == "__main__":
    main()
