#!/usr/bin/env python
"""Eval throughput: mlxft's eval vs the naive way, side by side in one run, outputs compared.

naive: a fresh ``mlx_lm.server --adapter-path CKPT`` per target, one request at a time (what the
seed user did). mlxft, both engines of ``mlx_ft.evaluate.evaluate_targets`` with identity checks on:
``batched`` (the default: every target in one in-process batch, one row per prompt and target) and
``server`` (one isolated server per base model, per-request adapters, a target's prompts in flight
at once). Prints the wall times, the ratios to naive, and how many greedy outputs are identical to
naive's, prompt by prompt. Each timing includes model loading and the identity probes.

    python scripts/bench_eval.py --run runs/demo            # base + every checkpoint × full suite
    python scripts/bench_eval.py --run runs/demo --quick    # 2 targets × 6 prompts (CI smoke)
    python scripts/bench_eval.py --targets 3 --save-naive /tmp/naive.json   # first 3 targets; keep naive
    python scripts/bench_eval.py --targets 3 --naive-from /tmp/naive.json   # iterate without naive's minutes

A naive measurement read back with --naive-from is from another run, not side by side: the figures
to report come from one run without it. The batched engine's line also gives decode's share of the
machine's matmul ceiling (engine_batched.ceiling_fraction).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_ft  # noqa: E402,F401  (fast BLAS before mlx)
from mlx_ft.evaluate import evaluate_targets  # noqa: E402
from mlx_ft.targets import run_targets  # noqa: E402
from mlx_ft.server import Server  # noqa: E402
from mlx_ft.suite import load_suite  # noqa: E402


class AdapterServer(Server):
    """The naive way: the adapter fixed at start-up with --adapter-path."""

    def __init__(self, model, adapter=None, **kw):
        super().__init__(model, **kw)
        self.adapter = adapter

    def command(self):
        cmd = super().command()
        return cmd + (["--adapter-path", str(self.adapter)] if self.adapter else [])


def naive(targets, suite, log_dir: Path) -> tuple[float, dict]:
    outputs = {}
    t0 = time.perf_counter()
    for t in targets:
        with AdapterServer(t.model, t.adapter, log_path=log_dir / f"naive-{t.name}.log",
                           max_tokens=suite.generation.max_tokens, concurrency=1) as server:
            for p in suite.prompts:
                messages = [{"role": "system", "content": suite.system_prompt}, {"role": "user", "content": p.user}]
                r = server.chat(messages, max_tokens=suite.generation.max_tokens,
                                temperature=suite.generation.temperature, stop=suite.generation.stop_sequences,
                                send_model=False)  # as a plain client would: the --adapter-path model
                outputs[(t.name, p.id)] = r.text
    return time.perf_counter() - t0, outputs


def ours(targets, suite, out_root: Path, engine: str) -> tuple[float, dict, dict]:
    """Wall time, outputs, and the engine's details as recorded with the target that finished last."""
    moved = [dataclasses.replace(t, out_dir=out_root / t.name) for t in targets]
    t0 = time.perf_counter()
    records = evaluate_targets(moved, suite, engine=engine, log=lambda s: print("  " + s, file=sys.stderr), log_dir=out_root)
    seconds = time.perf_counter() - t0
    return seconds, {(r["target"]["name"], x["id"]): x["text"] for r in records for x in r["results"]}, records[-1]["engine"]


def naive_measured(a, targets, suite, tmp: Path) -> tuple[float, dict]:
    """Naive's wall time and outputs: measured now, or read back from --naive-from (same targets and
    prompts required); written to --save-naive if given."""
    key = {"targets": [t.name for t in targets], "prompts": [p.id for p in suite.prompts]}
    if a.naive_from:
        saved = json.loads(Path(a.naive_from).read_text())
        if {k: saved[k] for k in key} != key:
            sys.exit(f"{a.naive_from}: measured on other targets or prompts than this run's")
        print(f"naive: read back from {a.naive_from} (not side by side)", file=sys.stderr)
        return saved["seconds"], {tuple(k.split("\t")): v for k, v in saved["outputs"].items()}
    print(f"naive: {len(targets)} fresh servers, {len(suite.prompts)} sequential requests each", file=sys.stderr)
    seconds, outputs = naive(targets, suite, tmp)
    if a.save_naive:
        Path(a.save_naive).write_text(json.dumps({**key, "seconds": seconds,
                                                  "outputs": {"\t".join(k): v for k, v in outputs.items()}}))
    return seconds, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--prompts", default="evals/tools.yaml")
    ap.add_argument("--quick", action="store_true", help="2 targets × 6 prompts")
    ap.add_argument("--targets", type=int, help="only the first N targets (base first)")
    ap.add_argument("--engines", default="batched,server", help="mlxft engines to time (comma-separated)")
    ap.add_argument("--save-naive", help="write naive's time and outputs to this JSON file")
    ap.add_argument("--naive-from", help="reuse a naive measurement saved with --save-naive (not side by side)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    suite = load_suite(a.prompts)
    targets = run_targets(a.run)[:a.targets]
    if a.quick:
        targets = [targets[0], targets[-1]]
        suite = dataclasses.replace(suite, prompts=suite.prompts[:6], name="bench-quick")
    with tempfile.TemporaryDirectory(prefix="mlxft-bench-") as tmp:
        tmp = Path(tmp)
        t_naive, out_naive = naive_measured(a, targets, suite, tmp)
        timings, same, diffs, details = {}, {}, {}, {}
        for engine in a.engines.split(","):
            print(f"mlxft --engine {engine}", file=sys.stderr)
            timings[engine], out, details[engine] = ours(targets, suite, tmp / engine, engine)
            same[engine] = sum(out_naive[k] == out.get(k) for k in out_naive)
            diffs[engine] = [list(k) for k in out_naive if out_naive[k] != out.get(k)]
    result = {"targets": len(targets), "prompts": len(suite.prompts), "max_tokens": suite.generation.max_tokens,
              "naive_s": round(t_naive, 1), "outputs": len(out_naive),
              **{f"{e}_s": round(t, 1) for e, t in timings.items()},
              **{f"{e}_speedup": round(t_naive / t, 2) for e, t in timings.items()},
              **{f"{e}_identical": same[e] for e in timings}, "differing": diffs,
              "naive_side_by_side": not a.naive_from, "batched_engine": details.get("batched")}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    n = len(out_naive)
    print(f"targets × prompts   {result['targets']} × {result['prompts']} (max_tokens {result['max_tokens']})")
    print(f"{'way':<52} {'wall':>8} {'speedup':>8} {'identical':>10}")
    print(f"{'naive: fresh server per target, sequential':<52} {t_naive:>7.1f}s {'1.00x':>8} {'-':>10}")
    for engine, label in (("batched", "mlxft --engine batched (default)"),
                          ("server", "mlxft --engine server")):
        if engine not in timings:
            continue
        print(f"{label:<52} {timings[engine]:>7.1f}s {t_naive / timings[engine]:>7.2f}x "
              f"{same[engine]:>5}/{n:<4}" + (f"  differing: {diffs[engine][:5]}" if diffs[engine] else ""))
    eng = details.get("batched") or {}
    if eng.get("ceiling_fraction") is not None:
        print(f"batched decode: {eng['decode_tokens_per_s']} tokens/s = {eng['ceiling_fraction']:.0%} of the matmul "
              f"ceiling ({eng['matmul_gflops']} GFLOP/s measured during the eval, as mlxft doctor does)")
    if a.naive_from:
        print(f"(naive read back from {a.naive_from}: not measured side by side)")


if __name__ == "__main__":
    main()
