"""Peak memory of the streamed fuse (the default) vs the in-memory one, on a model too big for the old way.

Builds a deep synthetic llama (mlx-lm's model class, random weights, float32) and a random LoRA
adapter on its last layers, then runs ``mlx_ft.fuse.fuse`` twice, each in its own child process:
streamed under a cap of (output size + 2 full-precision layers + 300 MB) enforced by a watchdog
that kills the child the moment its RSS passes the cap (and ``mx.set_memory_limit``, mlx's own
guideline), and in-memory without a cap. Prints each child's peak RSS (``wait4``'s ru_maxrss) side
by side and checks the two outputs are identical tensor for tensor.

    .venv/bin/python scripts/bench_fuse.py --layers 64 --hidden 1024 --work /tmp/bench_fuse
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MB = 10**6


def build(work: Path, layers: int, hidden: int, lora_layers: int) -> tuple[Path, Path, dict]:
    """The base model folder, the adapter folder, and the sizes of one layer and the whole model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes, load_model, load_tokenizer, save

    from mlx_ft.models import resolve_model

    base, adapter = work / "base", work / "adapter"
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
              "intermediate_size": 4 * hidden, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
              "head_dim": 64, "rms_norm_eps": 1e-5, "vocab_size": 49152, "max_position_embeddings": 2048,
              "rope_theta": 10000.0, "tie_word_embeddings": True}
    if not (base / "config.json").is_file():
        model_class, args_class = _get_classes(config)
        mx.random.seed(0)
        model = model_class(args_class.from_dict(config))
        mx.eval(model.parameters())
        src = resolve_model(None)
        save(base, src, model, load_tokenizer(src), config)
        del model
    model, _ = load_model(base, lazy=True)
    layer_bytes = sum(v.nbytes for _, v in tree_flatten(model.layers[0].parameters()))
    total_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if not (adapter / "adapters.safetensors").is_file():
        params = {"rank": 8, "scale": 20.0, "dropout": 0.0}
        linear_to_lora_layers(model, lora_layers, params)
        mx.random.seed(1)
        weights = {k: 0.01 * mx.random.normal(v.shape) for k, v in tree_flatten(model.parameters())
                   if k.endswith((".lora_a", ".lora_b"))}
        adapter.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"model": str(base), "num_layers": lora_layers, "lora_parameters": params, "fine_tune_type": "lora"}))
    return base, adapter, {"layer_bytes": layer_bytes, "full_precision_bytes": total_bytes}


def child(args) -> None:
    """One fuse in this process (run by the parent with --child)."""
    import mlx.core as mx

    from mlx_ft.fuse import fuse

    if args.cap:
        mx.set_memory_limit(args.cap)
    rec = fuse(Path(args.adapter), Path(args.base), Path(args.out), bits=args.bits, group_size=64,
               in_memory=args.in_memory, force=True)
    print(json.dumps({k: rec[k] for k in ("size_bytes", "peak_rss_gb", "bits_per_weight", "seconds", "method")}))


def run_child(work: Path, base: Path, adapter: Path, out: str, bits: int, in_memory: bool, cap: int | None) -> dict:
    """Run one fuse in a child; a watchdog kills it if its RSS passes ``cap``. Returns its figures
    with its peak RSS from wait4 (the kernel's high-water mark, not a sample)."""
    import psutil

    cmd = [sys.executable, __file__, "--child", "--base", str(base), "--adapter", str(adapter),
           "--out", str(work / out), "--bits", str(bits), "--cap", str(cap or 0)] + (["--in-memory"] if in_memory else [])
    env = {**os.environ, "MLXFT_SKIP_MEMORY_CHECK": "1"}
    t0 = time.perf_counter()
    with open(work / f"{out}.log", "w") as log, open(work / f"{out}.json", "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=log, env=env)
        watched, killed, sampled = psutil.Process(proc.pid), False, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                sampled = max(sampled, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            if cap and sampled > cap and not killed:
                proc.kill()
                killed = True
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = (work / f"{out}.json").read_text()
    result = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 and not killed else {}
    return {**result, "returncode": proc.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024, "sampled_peak_rss_bytes": sampled, "killed_over_cap": killed,
            "wall_s": round(time.perf_counter() - t0, 1)}


def same_tensors(a: Path, b: Path) -> bool:
    import mlx.core as mx

    from mlx_ft.fuse_stream import read_weights

    ta, tb = read_weights(a), read_weights(b)
    return sorted(ta) == sorted(tb) and all(
        ta[k].dtype == tb[k].dtype and mx.array_equal(ta[k].reshape(-1).view(mx.uint8),
                                                      tb[k].reshape(-1).view(mx.uint8)).item() for k in ta)


def main(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # built in a child: a child's ru_maxrss starts at its parent's RSS when forked, so the parent stays small
    sizes = json.loads(subprocess.run([sys.executable, __file__, "--build", "--work", str(work), "--layers",
                                       str(args.layers), "--hidden", str(args.hidden), "--lora-layers",
                                       str(args.lora_layers)], check=True, capture_output=True, text=True
                                      ).stdout.strip().splitlines()[-1])
    base, adapter = work / "base", work / "adapter"
    out_estimate = sizes["full_precision_bytes"] // 32 * (args.bits + 0.5)  # group 64, 16-bit scale + bias
    cap = int(out_estimate + 2 * sizes["layer_bytes"] + 300 * MB)
    print(f"model: {args.layers} layers, hidden {args.hidden}, full precision {sizes['full_precision_bytes'] / MB:,.0f} MB "
          f"({sizes['full_precision_bytes'] / cap:.1f}x the cap); one layer {sizes['layer_bytes'] / MB:.0f} MB; "
          f"cap = output ~{out_estimate / MB:.0f} MB + 2 layers + 300 MB = {cap / MB:,.0f} MB", flush=True)
    streamed = run_child(work, base, adapter, "streamed", args.bits, False, cap)
    in_memory = run_child(work, base, adapter, "in_memory", args.bits, True, None) if not args.skip_in_memory else {}
    rows = [("streamed (default)", streamed), ("in-memory (--in-memory)", in_memory)]
    print(f"{'fuse':<24} {'peak RSS MB':>12} {'sampled MB':>10} {'output MB':>10} {'bits/weight':>11} {'seconds':>8}")
    for name, r in rows:
        if r:
            print(f"{name:<24} {r['peak_rss_bytes'] / MB:>12,.0f} {r['sampled_peak_rss_bytes'] / MB:>10,.0f} {r.get('size_bytes', 0) / MB:>10,.0f} "
                  f"{r.get('bits_per_weight', '-'):>11} {r['wall_s']:>8}")
    ok = streamed["returncode"] == 0 and not streamed["killed_over_cap"] and streamed["peak_rss_bytes"] <= cap
    print(f"streamed peak {streamed['peak_rss_bytes'] / MB:,.0f} MB {'<=' if ok else '>'} cap {cap / MB:,.0f} MB"
          + (" (killed by the watchdog)" if streamed["killed_over_cap"] else ""))
    if in_memory and ok:
        same = same_tensors(work / "streamed", work / "in_memory")
        print(f"outputs identical tensor for tensor: {same}")
        ok = ok and same
    (work / "bench.json").write_text(json.dumps({"cap_bytes": cap, **sizes, "streamed": streamed,
                                                 "in_memory": in_memory}, indent=2))
    return 0 if ok else 1


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_fuse")
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--lora-layers", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--skip-in-memory", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    for name in ("--base", "--adapter", "--out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    a = parse()
    if a.child:
        child(a)
        sys.exit(0)
    if a.build:
        print(json.dumps(build(Path(a.work), a.layers, a.hidden, a.lora_layers)[2]))
        sys.exit(0)
    sys.exit(main(a))
