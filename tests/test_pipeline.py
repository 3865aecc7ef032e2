"""Eval in the training loop, early stop, and ``mlxft run`` (real short runs on the embedded model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.train_config import EarlyStop, load_config

from .conftest import small_suite

pytestmark = pytest.mark.slow


def loop_config(tmp_path: Path, data: Path, suite: Path, **over) -> dict:
    cfg = {"name": "loop", "data": str(data), "runs_dir": str(tmp_path / "runs"), "iters": 4, "save_every": 2,
           "batch_size": 2, "num_layers": 4, "learning_rate": 2e-3, "max_seq_length": 256,
           "eval_suite": str(suite), "eval_during_training": True}
    return {**cfg, **over}


def texts(path: Path) -> list[str]:
    return [x["text"] for x in json.loads(path.read_text())["results"]]


def test_in_loop_results_are_what_mlxft_eval_gives(tmp_path, trained):
    cfg, summary = trained
    suite, run = Path(cfg.eval_suite), cfg.run_dir
    names = ["base", "step_000003", "step_000006"]
    assert sorted(p.parent.name for p in run.glob("evals/*/mini.json")) == names
    # without early stop nothing waits for a score: the base and both checkpoints are scored together,
    # in one batch when training ends (one engine, three targets)
    assert [json.loads((run / "evals" / n / "mini.json").read_text())["engine"]["targets"] for n in names] == [3] * 3
    assert summary["eval_seconds_in_loop"] > 0
    # a later eval of the run finds every target done (nothing loaded, nothing generated) ...
    r = CliRunner().invoke(main, ["eval", "--run", str(run), "--prompts", str(suite)])
    assert r.exit_code == 0, r.output
    assert r.output.count("already evaluated") == 3
    # ... and evaluating the same checkpoints again from their files gives the same replies
    again = tmp_path / "again"
    shutil.copytree(run, again)
    r = CliRunner().invoke(main, ["eval", "--run", str(again), "--prompts", str(suite), "--force"])
    assert r.exit_code == 0, r.output
    for name in names:
        assert texts(again / "evals" / name / "mini.json") == texts(run / "evals" / name / "mini.json"), name


def test_early_stop_ends_training_on_a_plateau(tmp_path, tiny_data, embedded_model):
    """At a learning rate this small nothing changes the greedy answers: no checkpoint can bring a new
    best score, so patience 1 stops training at the first checkpoint after the base."""
    from mlx_lm.utils import load

    from mlx_ft.train import train

    suite = small_suite(tmp_path, n=2, max_tokens=8)
    cfg = load_config(None, loop_config(tmp_path, tiny_data, suite, iters=8, learning_rate=1e-9,
                                        early_stop={"metric": "score", "patience": 1}))
    assert cfg.early_stop == EarlyStop("score", 1)
    summary = train(cfg)
    assert summary["status"] == "complete" and summary["checkpoints"] == ["step_000002"]
    assert summary["early_stop"]["step"] == 2 and summary["early_stop"]["planned_iters"] == 8
    assert "without a new best" in summary["early_stop"]["reason"]
    saved = json.loads((cfg.run_dir / "run.json").read_text())
    assert saved["early_stop"] == summary["early_stop"]
    model, _ = load(str(embedded_model), adapter_path=str(cfg.run_dir / "checkpoints" / "step_000002"))
    assert model is not None  # the last checkpoint is complete and loads as is


def test_early_stop_needs_the_loop_eval(tmp_path, tiny_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(tiny_data), "early_stop": {"patience": 2}}))
    r = CliRunner().invoke(main, ["train", "-c", str(cfg)])
    assert r.exit_code == 2 and "eval_during_training" in r.output and "eval_suite" in r.output


def test_mlxft_run_resumes_after_an_interruption_without_redoing_stages(tmp_path, trained, monkeypatch):
    """The shared run stands for a first `mlxft run` that trained, then was stopped; every later
    invocation continues where the last one stopped, never redoing a finished stage."""
    from mlx_ft import pipeline
    from mlx_ft.configfile import to_dict

    src, _ = trained
    shutil.copytree(src.run_dir, tmp_path / "runs" / "tiny", ignore=shutil.ignore_patterns("evals"))
    shutil.copytree(src.run_dir / "evals" / "base", tmp_path / "runs" / "tiny" / "evals" / "base")
    cfg = to_dict(load_config(None, {**to_dict(src), "runs_dir": str(tmp_path / "runs"),
                                     "fuse": {"bits": 4, "group_size": 32, "out": str(tmp_path / "fused")}}))
    run = tmp_path / "runs" / "tiny"
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "config": cfg}))  # as if `mlxft run` had trained it
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    real_pick = pipeline.pick_best

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "pick_best", interrupted)  # Ctrl-C between eval and pick-best
    r = CliRunner().invoke(main, ["run", "-c", str(cfg_path)])
    assert r.exit_code == 130
    assert "is complete (2 checkpoints); skipping" in r.output and "base: already evaluated" in r.output
    weights = (run / "checkpoints" / "step_000006" / "adapters.safetensors").read_bytes()
    assert not (run / "best.json").exists()

    def pick_a_checkpoint(*a, **k):  # whatever wins, make the fuse stage run
        best = real_pick(*a, **k)
        best["chosen"] = next(c for c in best["table"] if c["name"] == "step_000006")
        return best

    monkeypatch.setattr(pipeline, "pick_best", pick_a_checkpoint)
    r = CliRunner().invoke(main, ["run", "-c", str(cfg_path)])
    assert r.exit_code == 0, r.output
    assert "is complete (2 checkpoints); skipping" in r.output
    for name in ("base", "step_000003", "step_000006"):  # the in-loop results, not evaluated again
        assert f"{name}: already evaluated" in r.output
    assert (run / "checkpoints" / "step_000006" / "adapters.safetensors").read_bytes() == weights  # not retrained
    fused = json.loads((tmp_path / "fused" / "fused.json").read_text())
    assert fused["source_checkpoint"].endswith("step_000006") and fused["bits"] == 4 and "eval" in fused
    assert "fused model:" in r.output and "report:" in r.output and (run / "report.html").is_file()
    before = (tmp_path / "fused" / "fused.json").read_bytes()
    r = CliRunner().invoke(main, ["run", "-c", str(cfg_path)])  # everything done: every stage skipped
    assert r.exit_code == 0, r.output
    assert "already holds step_000006 at 4 bits, evaluated; skipping" in r.output
    assert (tmp_path / "fused" / "fused.json").read_bytes() == before


def test_resumed_run_scores_the_checkpoints_a_crash_left_unscored(tmp_path, trained):
    """Killed after the last checkpoint but before the end-of-training eval: --resume finds the
    training complete and scores what waited, with the result the uninterrupted run gave."""
    from mlx_ft.configfile import to_dict
    from mlx_ft.train import train

    src, _ = trained
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(src.run_dir, run)
    shutil.rmtree(run / "evals" / "step_000006")
    cfg = load_config(None, {**to_dict(src), "runs_dir": str(tmp_path / "runs")})
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "config": to_dict(cfg)}))  # the copy's own folder
    logs = []
    train(cfg, log=logs.append, resume=True)
    assert "run already complete" in logs
    assert any(line.startswith("step 6: train loss") and "| eval mini: score" in line for line in logs), logs
    again = run / "evals" / "step_000006" / "mini.json"
    assert texts(again) == texts(src.run_dir / "evals" / "step_000006" / "mini.json")
    assert (run / "evals" / "base" / "mini.json").read_bytes() == (
        src.run_dir / "evals" / "base" / "mini.json").read_bytes()  # the scored ones are left alone
