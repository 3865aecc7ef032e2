"""A run folder as the real stages leave it, without training or generating anything.

run.json, metrics.jsonl and checkpoints/step_*/manifest.json in the shape train.py writes them;
evals/<target>/tools.json written by evaluate.py's own writer (``prepare`` -> ``keep`` -> ``finish``)
from replies scored by the real scorer on the real suite (evals/tools.yaml), so the report reads
exactly what an eval leaves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mlx_ft.engines import Reply
from mlx_ft.evaluate import bind, prepare
from mlx_ft.files import write_json
from mlx_ft.suite import load_suite
from mlx_ft.targets import Target

SUITE_PATH = Path(__file__).resolve().parent.parent / "evals" / "tools.yaml"


def wrapped(code: str) -> str:
    return f'<tool_call>{json.dumps({"name": "execute_code", "arguments": {"code": code}})}</tool_call>'

STEPS = (25, 50, 75, 100)
# strict-pass probability per target: eval peaks at step 50 while val loss keeps falling
QUALITY = {"base": 0.1, "step_000025": 0.45, "step_000050": 0.85, "step_000075": 0.6, "step_000100": 0.5}
VAL_LOSS = {"base": 2.4, "step_000025": 1.1, "step_000050": 0.62, "step_000075": 0.41, "step_000100": 0.33}


def reply_for(prompt, kind: str) -> tuple[str, str]:
    """A realistic raw reply of the given kind for a prompt, and its finish reason."""
    args = ", ".join(f"{k}={(v[0] if v else 'x')!r}" for k, v in prompt.expect.args.items())
    call = f"{prompt.expect.tool}({args})"
    if kind == "ok":
        return wrapped(call), "stop"
    if kind == "unwrapped":
        direct = {k: (v[0] if v else "x") for k, v in prompt.expect.args.items()}
        return f'<tool_call>{json.dumps({"name": prompt.expect.tool, "arguments": direct})}</tool_call>', "stop"
    if kind == "think":
        return "<think>\nThe user wants me to " + prompt.user.lower()[:40], "length"
    if kind == "wrong_tool":
        other = "git_status()" if prompt.expect.tool != "git_status" else "list_routes()"
        return wrapped(other), "stop"
    return f"Let me first look at that. {prompt.user} <b>&amp; then</b> I will reply.", "stop"


def write_eval(suite, target: Target, quality: float, rng, *, seconds: float, engine: dict) -> dict:
    bound, parser = bind(suite, None)  # no tokenizer: tools in the system prompt, JSON calls
    (ev,) = prepare([target], bound, parser)
    for p in suite.prompts:
        u = rng.random()
        kind = "ok" if u < quality else ["unwrapped", "prose", "think", "wrong_tool"][int(rng.integers(0, 4))]
        text, finish = reply_for(p, kind)
        ev.keep(p, Reply(text, finish, 20, 300, 0.5))
    ev.t0 = time.perf_counter() - seconds  # as if the eval had taken this long
    return ev.finish({"ok": True}, engine)


def make_report_run(root: Path, name: str = "demo", seed: int = 0, learning_rate: float = 5e-4,
                    quality: dict | None = None) -> Path:
    """A complete run with base + 4 checkpoints, each evaluated in one batched eval."""
    quality = quality or QUALITY
    suite = load_suite(SUITE_PATH)
    rng = np.random.default_rng(seed)
    run = Path(root) / name
    model = Path(root) / "model"
    config = {"name": name, "model": None, "data": "data/tools", "runs_dir": str(root), "fine_tune_type": "lora",
              "num_layers": 8, "lora": {"rank": 8, "scale": 20.0, "dropout": 0.0}, "optimizer": "adam",
              "learning_rate": learning_rate, "iters": STEPS[-1], "batch_size": 4, "grad_accumulation": 1,
              "seed": seed, "max_seq_length": 2048, "save_every": 25, "mask_prompt": True,
              "allow_truncation": False, "grad_checkpoint": False, "divergence_factor": 3.0, "eval_suite": None}
    write_json(run / "run.json", {
        "name": name, "config": config, "model_path": str(model), "data_sha256": {"train": "ab" * 32, "valid": "cd" * 32},
        "versions": {"mlxft": "0.1.0", "mlx": "0.32.0", "mlx_lm": "0.32.2", "python": "3.11.2",
                     "platform": "Linux-x86_64", "device": "Device(cpu, 0)", "fast_blas": True},
        "examples": {"train": 120, "valid": 24}, "base": {"val_loss": VAL_LOSS["base"], "fingerprint": None},
        "warnings": [], "world_size": 1, "status": "complete", "train_seconds": 312.5,
        "checkpoints": [f"step_{s:06d}" for s in STEPS]})
    metrics = [{"step": 0, "val_loss": VAL_LOSS["base"]}]
    for step in range(1, STEPS[-1] + 1):
        row = {"step": step, "train_loss": round(2.2 * 0.97**step + 0.2, 4), "learning_rate": learning_rate,
               "tokens_per_second": 850.0, "trained_tokens": 1200 * step, "peak_memory_gb": 1.2}
        if step in STEPS:
            row["val_loss"] = VAL_LOSS[f"step_{step:06d}"]
        metrics.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    targets = [Target("base", model, None, run / "evals" / "base", 0, None, VAL_LOSS["base"])]
    for step in STEPS:
        d = run / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "adapters.safetensors").write_bytes(b"\0" * 64)
        write_json(d / "adapter_config.json", {"model": str(model), "fine_tune_type": "lora"})
        manifest = {"step": step, "train_loss": metrics[step]["train_loss"], "val_loss": VAL_LOSS[d.name],
                    "learning_rate": learning_rate, "tokens_seen": 1200 * step, "wall_time_s": 3.1 * step,
                    "seed": seed, "base_model": str(model), "world_size": 1, "fingerprint": None}
        write_json(d / "manifest.json", manifest)
        targets.append(Target(d.name, model, d, run / "evals" / d.name, step, None, VAL_LOSS[d.name]))
    rows = len(targets) * len(suite.prompts)
    for i, t in enumerate(targets):  # batched: each target's seconds count from the batch's start
        write_eval(suite, t, quality[t.name], rng, seconds=40.0 + 6.5 * i,
                   engine={"name": "batched", "rows": rows, "waves": 1})
    return run


def make_fused(root: Path, run: Path, checkpoint: str = "step_000050", bits: int = 5, quality: float = 0.8) -> Path:
    """A fused model folder (fused.json + evals/tools.json, served by the server engine)."""
    suite = load_suite(SUITE_PATH)
    out = Path(root) / "fused_models" / f"{run.name}-{checkpoint}-{bits}bit"
    write_json(out / "fused.json", {"source_checkpoint": str((run / "checkpoints" / checkpoint).resolve()),
                                    "base_model": str(Path(root) / "model"), "bits": bits, "group_size": 32,
                                    "recipe": None, "size_bytes": 98_000_000, "seconds": 12.0})
    write_eval(suite, Target(out.name, out, None, out / "evals"), quality, np.random.default_rng(7),
               seconds=21.5, engine={"name": "server"})
    return out
