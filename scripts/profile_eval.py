#!/usr/bin/env python
"""Where eval time goes: the batched engine for a whole run, or the server engine for one checkpoint.

    python scripts/profile_eval.py --run runs/demo                       # batched engine (default)
    python scripts/profile_eval.py --run runs/demo --engine server [--checkpoint step_000048]

batched: the real steps of ``mlx_ft.engine_batched.BatchedEngine`` timed one by one on base + every
checkpoint: model load, reading the adapters strictly and stacking them, the fingerprint probes,
then generation (shared prompt prefix, prefill and decode times, decode's share of the machine's
matmul ceiling); and this process's peak RSS.
server: through the same isolated server mlxft uses: start until ready; the probe request that
makes the server load the adapter (it reloads the base with it); the suite's prompts with
max_tokens=1 (prefill, batched); the same prompts at the suite's max_tokens (prefill + decode);
decode = the difference. Also the server's RSS.
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
from mlx_ft.engines import Request  # noqa: E402
from mlx_ft.targets import run_targets  # noqa: E402
from mlx_ft.server import Server  # noqa: E402
from mlx_ft.suite import load_suite  # noqa: E402


def batch(server, suite, adapter, max_tokens):
    def one(p):
        return server.chat(suite.messages(p), adapter=adapter, max_tokens=max_tokens, stop=suite.generation.stop_sequences)

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(len(suite.prompts)) as pool:
        replies = list(pool.map(one, suite.prompts))
    return time.perf_counter() - t, sum(r.completion_tokens or 0 for r in replies)


def profile_batched(targets, suite) -> None:
    import resource

    from mlx_lm.utils import load

    from mlx_ft import batched
    from mlx_ft.engine_batched import BatchedEngine

    t = time.perf_counter()
    model, tokenizer = load(str(targets[0].model))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    adapters = {x.name: batched.read_adapter(x.adapter, model) if x.adapter else None for x in targets}
    engine = BatchedEngine(model, tokenizer, suite, adapters)
    adapters_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.probe(targets)
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    replies = list(engine.generate([Request(x, p) for x in targets for p in suite.prompts]))
    gen_s = time.perf_counter() - t
    st = engine.stats
    total = load_s + adapters_s + probe_s + gen_s
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"targets                    {len(targets)} × {len(suite.prompts)} prompts (max_tokens "
          f"{suite.generation.max_tokens}), {len(replies)} replies, {st['waves']} wave(s)")
    print(f"model load                 {load_s:.2f} s")
    print(f"{f'read {len(targets) - 1} adapters + stack':<27}{adapters_s:.2f} s")
    print(f"fingerprint probes         {probe_s:.2f} s ({len(targets)} rows, one batch)")
    print(f"prefill                    {st['prompt_s']:.2f} s for {st['prompt_tokens']} tokens")
    print(f"decode                     {st['decode_s']:.2f} s for {st['decode_tokens']} tokens "
          f"({st['decode_tokens'] / st['decode_s']:.0f} tokens/s; {st['useful_tokens']} kept)")
    d = engine.details()
    if d["ceiling_fraction"] is not None:
        print(f"decode vs compute ceiling  {d['ceiling_fraction']:.0%} ({d['decode_tokens_per_s']} tokens/s x 2 x "
              f"{engine.params / 1e6:.1f} M weights; matmul {d['matmul_gflops']} GFLOP/s, best of mlxft doctor's test "
              "before/after decode)")
    print(f"generate wall              {gen_s:.2f} s (shared prefix, prefill, decode, detokenize)")
    print(f"total                      {total:.2f} s ({total / len(targets):.2f} s per target)")
    print(f"peak RSS                   {rss / 1e9:.2f} GB")


def main() -> None:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--engine", choices=["batched", "server"], default="batched")
    ap.add_argument("--checkpoint", help="server engine: the checkpoint to profile (default: the last)")
    ap.add_argument("--prompts", default="evals/tools.yaml")
    a = ap.parse_args()
    suite = load_suite(a.prompts)
    targets = run_targets(a.run)
    if a.engine == "batched":
        profile_batched(targets, suite)
        return
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
