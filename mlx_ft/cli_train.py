"""Commands before evaluation: import-gguf, train, doctor (thin shells over the API)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mlx_ft.cli_common import emit, errors, log


@click.command("import-gguf")
@click.argument("gguf", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["native", "float32", "float16", "bfloat16"]), default="float32",
              show_default=True,
              help="Store dequantized weights in this dtype, or 'native' to keep the GGUF's 4/8-bit weights. "
                   "float32 trains ~20x faster on a Linux CPU with OpenBLAS (quantized kernels use no BLAS).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
@errors
def import_gguf_cmd(gguf: Path, out: Path, dtype: str, force: bool, as_json: bool) -> None:
    """Convert a llama-architecture GGUF file into an MLX model folder (strictly verified)."""
    from mlx_ft.gguf import import_gguf

    report = import_gguf(gguf, out, dtype=dtype, force=force, log=log)
    emit(report, as_json, f"{out}: {report['tensors']} tensors, {report['parameters']:,} parameters, "
                          f"answer to the probe: {report['verified_answer']!r}")



@click.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML training config; flags below override its keys.")
@click.option("--name", help="Run name: output goes to RUNS_DIR/NAME.")
@click.option("--model", help="Local MLX model folder, or a Hugging Face repo id (org/name[@revision]) already in the "
                             "HF cache (never downloaded). Default: the embedded SmolLM2-135M-Instruct.")
@click.option("--data", help="Folder with train.jsonl and valid.jsonl (mlx-lm chat format).")
@click.option("--runs-dir", help="Where run folders go (default runs).")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]))
@click.option("--num-layers", type=int, help="Layers to adapt, counted from the top (-1: all).")
@click.option("--learning-rate", "--lr", "learning_rate", type=float)
@click.option("--iters", type=int)
@click.option("--batch-size", type=int)
@click.option("--grad-accumulation", type=int)
@click.option("--seed", type=int, help="PRNG seed (0 is a seed).")
@click.option("--seeds", help="Comma-separated seeds: one run per seed, named NAME-sSEED.")
@click.option("--max-seq-length", type=int)
@click.option("--save-every", type=int, help="Write a checkpoint every N steps (and at the last step).")
@click.option("--eval-suite", help="Eval suite YAML: scored in the loop with --eval, and checked against the data.")
@click.option("--eval/--no-eval", "eval_during_training", default=None,
              help="Score the base and every checkpoint on --eval-suite in the training process: together "
                   "when training ends, or each as it is written when early_stop is set (config "
                   "eval_during_training; results in RUN/evals/, as mlxft eval writes them).")
@click.option("--mask-prompt/--no-mask-prompt", default=None, help="Train only on the answer (default on).")
@click.option("--allow-truncation", is_flag=True, default=None,
              help="Train even if some answers would be cut by max_seq_length.")
@click.option("--smoke", is_flag=True, help="Run a few steps in a scratch folder; fail unless the loss falls.")
@click.option("--smoke-steps", type=int, default=6, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint of the run.")
@click.option("--force", is_flag=True, help="Delete an existing run folder of the same name first.")
@click.option("--ranks", type=int, help="Data-parallel over N local processes (mlx.launch, ring backend).")
@click.option("--hosts", "hostfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Data-parallel over the hosts of an mlx.launch JSON hostfile (docs/distributed.md).")
@click.option("--spread", is_flag=True,
              help="With --seeds and --hosts: one seed per host at a time (not data-parallel); each run "
                   "folder is copied back here.")
@click.option("--worker", is_flag=True, hidden=True, help="Internal: one rank started by mlx.launch.")
@click.option("--json", "as_json", is_flag=True)
@errors
def train(config_path, seeds, smoke, smoke_steps, resume, force, ranks, hostfile, spread, worker, as_json, mask_prompt,
          allow_truncation, eval_during_training, **flags):
    """Train with mlx-lm, writing a loadable checkpoint every --save-every steps.

    Before the first step: data schema, lengths vs max_seq_length, trainable parameters. During
    training: NaN/divergence guard. Output: RUNS_DIR/NAME/{run.json, metrics.jsonl,
    checkpoints/step_NNNNNN/}.
    """
    from mlx_ft import smoke as smokemod
    from mlx_ft import train as trainmod
    from mlx_ft.errors import UserError

    overrides = {k: v for k, v in flags.items() if v is not None}
    if mask_prompt is not None:
        overrides["mask_prompt"] = mask_prompt
    if eval_during_training is not None:
        overrides["eval_during_training"] = eval_during_training
    if allow_truncation:
        overrides["allow_truncation"] = True
    cfg = trainmod.load_config(config_path, overrides)
    if smoke:
        result = smokemod.smoke(cfg, smoke_steps, log)
        emit(result, as_json, f"smoke test passed: loss {result['loss_first']} -> {result['loss_last']} "
                              f"over {result['steps']} steps")
        return
    configs = _seed_configs(cfg, seeds) if seeds else [cfg]
    if worker:
        trainmod.train(cfg, log=log, worker=True)
        return
    if (ranks or hostfile) and (smoke or resume):
        raise UserError("--ranks/--hosts cannot be combined with --smoke or --resume")
    if spread:
        if not (hostfile and seeds) or ranks:
            raise UserError("--spread runs one seed per host: give --seeds and --hosts (and no --ranks)")
        _train_spread(configs, hostfile, force)
    results = []
    for c in configs:
        if spread:
            from mlx_ft.files import read_json

            summary = read_json(c.run_dir / "run.json")
        elif ranks or hostfile:
            from mlx_ft.distributed import train_distributed

            summary = train_distributed(c, ranks, hostfile, force=force, log=log)
        else:
            summary = trainmod.train(c, log=log, resume=resume, force=force)
        results.append({"run": str(c.run_dir), "status": summary["status"], "checkpoints": summary["checkpoints"],
                        "train_seconds": summary["train_seconds"], "loss_start_end": summary.get("loss_start_end")})
    emit(results if seeds else results[0], as_json,
         "\n".join(f"{r['run']}: {r['status']}, {len(r['checkpoints'])} checkpoints, {r['train_seconds']} s"
                   for r in results))


def _seed_configs(cfg, seeds: str) -> list:
    """One config per seed of ``--seeds 1,2,3``, each run named NAME-sSEED."""
    import dataclasses

    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: expected integers like 1,2,3", param_hint="--seeds") from None
    return [dataclasses.replace(cfg, seed=s, name=f"{cfg.name}-s{s}") for s in values]


def _train_spread(configs, hostfile, force: bool) -> None:
    """Each seed's run as a job on some host of the hostfile (see hosts.py)."""
    from mlx_ft.configfile import to_dict
    from mlx_ft.errors import OutputExistsError
    from mlx_ft.files import write_json
    from mlx_ft.hosts import Job, load_hosts, mlxft_argv, spread

    hosts = load_hosts(hostfile)
    taken = [str(c.run_dir) for c in configs if c.run_dir.exists() and any(c.run_dir.iterdir())]
    if taken and not force:
        raise OutputExistsError(f"{', '.join(taken)} already exist(s); use --force to start over, or another --name")
    jobs = []
    for c in configs:
        staged = write_json(Path(c.runs_dir) / ".spread" / f"{c.name}.json", to_dict(c))
        jobs.append(Job(f"seed {c.seed} ({c.run_dir})",
                        mlxft_argv("train", "-c", str(staged.resolve()), *(["--force"] if force else [])),
                        outputs=[c.run_dir], inputs=[staged], log_path=staged.with_suffix(".log")))
    log(f"spreading {len(jobs)} seed run(s) over {len(hosts)} host(s), one job per host at a time")
    spread(jobs, hosts, log=log)


@click.command()
@click.option("--model", help="Model folder or cached Hugging Face repo id that must be present (default: the "
                             "embedded model); also prints its size and whether train/eval/fuse fit in memory.")
@click.option("--data", help="Data folder that must hold train.jsonl.")
@click.option("--hosts", "hostfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Also check every host of an mlx.launch hostfile: reachable over ssh, the same "
                   "mlx/mlx-lm/mlxft versions as here, the model and data present at the same paths.")
@click.option("--json", "as_json", is_flag=True)
@errors
def doctor(model, data, hostfile, as_json: bool) -> None:
    """Backend, versions, measured matmul speed, and what to fix if it is slow.

    Exits 1 when something must be fixed before training here (or, with --hosts, on some host).
    """
    from mlx_ft.doctor import check_hosts, diagnose, format_hosts, format_report, paths_report

    report = {**diagnose(), "paths": paths_report(model, data)}
    bad = bool(report["fix"]) or not all(p["present"] for p in report["paths"].values())
    estimates = report["paths"].get("model", {}).get("estimates", {})
    bad = bad or not all(e["fits"] for e in estimates.values())  # a stage that would not fit in memory
    if hostfile:
        from mlx_ft.hosts import load_hosts

        rows = check_hosts(load_hosts(hostfile), report, model, data)
        report["hosts"] = rows
        bad = bad or any(r["problems"] for r in rows)
        emit(report, as_json, format_report(report) + "\n\n" + format_hosts(rows))
    else:
        emit(report, as_json, format_report(report))
    if bad:
        sys.exit(1)
