#!/usr/bin/env python
"""Where eval time goes, for one checkpoint of a run: server start, adapter load, prefill, decode.

    python scripts/profile_eval.py --run runs/demo [--checkpoint step_000048]

Measured through the same isolated server mlxft uses: start until ready; the probe request that
makes the server load the adapter (it reloads the base with it); the suite's prompts with
max_tokens=1 (prefill, batched); the same prompts at the suite's max_tokens (prefill + decode);
decode = the difference. Also the server's peak RSS.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_ft  # noqa: E402,F401
from mlx_ft.evaluate import run_targets  # noqa: E402
from mlx_ft.server import Server  # noqa: E402
from mlx_ft.suite import load_suite  # noqa: E402


def batch(server, suite, adapter, max_tokens):
    def one(p):
        return server.chat(suite.messages(p), adapter=adapter, max_tokens=max_tokens, stop=suite.generation.stop_sequences)

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(len(suite.prompts)) as pool:
        replies = list(pool.map(one, suite.prompts))
    return time.perf_counter() - t, sum(r.completion_tokens or 0 for r in replies)


def main() -> None:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--checkpoint")
    ap.add_argument("--prompts", default="evals/tools.yaml")
    a = ap.parse_args()
    suite = load_suite(a.prompts)
    targets = run_targets(a.run)
    target = next((t for t in targets if t.name == a.checkpoint), targets[-1])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with Server(target.model, log_path=Path(tmp) / "s.log", max_tokens=suite.generation.max_tokens) as server:
            start = time.perf_counter() - t0
            t = time.perf_counter()
            server.verify(target.fingerprint, adapter=str(target.adapter) if target.adapter else None)
            load = time.perf_counter() - t
            adapter = str(target.adapter) if target.adapter else None
            server.chat(suite.messages(suite.prompts[0]), adapter=adapter, max_tokens=1)  # as evaluate() does
            prefill, _ = batch(server, suite, adapter, 1)
            full, tokens = batch(server, suite, adapter, suite.generation.max_tokens)
            rss = psutil.Process(server.proc.pid).memory_info().rss
    decode = full - prefill
    print(f"target                 {target.name} ({len(suite.prompts)} prompts, max_tokens {suite.generation.max_tokens})")
    print(f"server start to ready  {start:.2f} s")
    print(f"adapter load + probe   {load:.2f} s")
    print(f"prefill (max_tokens 1) {prefill:.2f} s")
    print(f"decode                 {decode:.2f} s for {tokens} tokens ({tokens / decode:.1f} tokens/s batched)")
    print(f"total per checkpoint   {load + full:.2f} s (+ {start:.2f} s once per base model)")
    print(f"server RSS             {rss / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
