#!/usr/bin/env python
"""Where one batched decode step goes: its matmuls alone vs the whole step vs the machine's ceiling.

On a run's base model with its checkpoints' adapters, for a batch of ``--rows`` rows with a
``--cache``-token KV cache, best of 5 each, side by side in one process:
  - every matmul of the step alone at the step's shapes ([rows, in] x [in, out], lm_head included),
  - a bare model step (mlx-lm's forward, no adapters), and the multi-adapter step (batched engine),
  - the element-wise pieces of a step that are not matmuls (SiLU, attention, exp),
each as GFLOP/s of the model's 2 x parameters per row and as a share of ``mlxft doctor``'s ceiling.

    python scripts/profile_decode_step.py --run runs/demo [--rows 189] [--cache 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_ft  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx import nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models.activations import swiglu  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from mlx_ft import batched, doctor, runs  # noqa: E402
from mlx_ft.engine_batched import matmul_params  # noqa: E402


def best_ms(f, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(f())
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def step_ms(model, cache: list, rows: int, length: int) -> float:
    """One decode step of every row at a fixed cache length (the offsets are wound back each time)."""
    model(mx.array([[100 + i % 50] * length for i in range(rows)]), cache=cache)
    mx.eval([c.state for c in cache])
    x = mx.array([[7]] * rows)

    def one():
        out = model(x, cache=cache)[:, -1, :]
        for c in cache:
            if hasattr(c, "offset"):
                c.offset -= 1
        return mx.argmax(out, axis=-1)

    return best_ms(one)


def matmuls_ms(model, rows: int) -> float:
    layers = [m for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda v: isinstance(v, nn.Module))
              if isinstance(m, nn.Linear)]
    emb = model.model.embed_tokens.weight
    xs = {d: mx.random.normal((rows, d)) for d in {m.weight.shape[1] for m in layers} | {emb.shape[1]}}
    mx.eval(list(xs.values()))
    return best_ms(lambda: [xs[m.weight.shape[1]] @ m.weight.T for m in layers] + [xs[emb.shape[1]] @ emb.T])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--rows", type=int, default=189)
    ap.add_argument("--cache", type=int, default=100)
    a = ap.parse_args()
    run = Path(a.run)
    model, _ = load(json.loads(runs.run_json(run).read_text())["model_path"])
    adapters = [batched.read_adapter(c.path, model) for c in runs.complete_checkpoints(run)]
    params, rows = matmul_params(model), a.rows
    ceiling = max(doctor.matmul_gflops() for _ in range(5))

    def line(what: str, ms: float) -> None:
        gflops = rows * 2 * params / (ms / 1e3) / 1e9
        print(f"{what:58s} {ms:7.0f} ms  {gflops:6.1f} GFLOP/s = {gflops / ceiling:4.0%} of the ceiling")

    print(f"ceiling (mlxft doctor, best of 5): {ceiling:.0f} GFLOP/s; {params / 1e6:.1f} M matmul parameters; "
          f"{rows} rows, {a.cache}-token cache")
    line("every matmul of the step alone, at its shapes", matmuls_ms(model, rows))
    line("bare model step (mlx-lm forward, no adapters)", step_ms(model, make_prompt_cache(model), rows, a.cache))
    multi = batched.MultiAdapterModel(model, [None, *adapters])
    slots = batched.RowSlots(mx.array([i % (len(adapters) + 1) for i in range(rows)]))
    line(f"multi-adapter step ({len(adapters)} adapters, batched engine)",
         step_ms(multi, make_prompt_cache(model) + [slots], rows, a.cache))
    cfg = model.args
    layers, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    heads, kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, hidden // cfg.num_attention_heads
    g, u = mx.random.normal((rows, 1, inter)), mx.random.normal((rows, 1, inter))
    q = mx.random.normal((rows, heads, 1, dim))
    k, v = mx.random.normal((rows, kv, a.cache, dim)), mx.random.normal((rows, kv, a.cache, dim))
    mx.eval(g, u, q, k, v)
    sdpa = mx.fast.scaled_dot_product_attention
    print("not matmuls, per step (every layer):")
    for what, f in (("SiLU-gated MLP activation (mlx-lm swiglu)", lambda: swiglu(g, u)),
                    ("exp alone over the same arrays", lambda: mx.exp(g)),
                    ("a multiply over the same arrays", lambda: g * u),
                    ("attention (mx.fast sdpa, GQA)", lambda: sdpa(q, k, v, scale=dim ** -0.5))):
        print(f"  {what} x {layers}: {best_ms(lambda f=f: [f() for _ in range(layers)]):.0f} ms")


if __name__ == "__main__":
    main()
