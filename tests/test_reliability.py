"""Faults: signals during eval and fuse leave no orphan and no half-written folder; a full disk or
an unwritable folder is a clear error that damages nothing already on disk."""

from __future__ import annotations

import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from mlx_ft.errors import MlxftError
from mlx_ft.files import staged_dir, write_json

from .conftest import small_suite


def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "best.json", {"chosen": "old"})

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(MlxftError, match="No space left"):
        write_json(path, {"chosen": "new"})
    assert json.loads(path.read_text()) == {"chosen": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]  # no temp file left


def test_failed_staged_folder_leaves_nothing_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(final, force=True) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unwritable_output_is_a_clear_error(tmp_path):
    from click.testing import CliRunner

    from mlx_ft.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = CliRunner().invoke(main, ["import-gguf", str(__import__("mlx_ft.models").models.default_gguf()),
                                  str(blocker / "out"), "--dtype", "native"])
    assert r.exit_code in (1, 2) and "Error:" in r.output and "Traceback" not in r.output
    assert blocker.read_text() == "not a folder"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _spawn(args: list[str]) -> subprocess.Popen:
    # SIGINT back to its default: a shell starts background jobs (CI, nohup-style runs) with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt -- not the Ctrl-C this test is about
    return subprocess.Popen([sys.executable, "-m", "mlx_ft", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}; stderr:\n{''.join(seen)}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_eval_leaves_no_orphan_server(tmp_path, embedded_model, sig):
    suite = small_suite(tmp_path, n=27, max_tokens=64)
    proc = _spawn(["eval", "--prompts", str(suite), "--model", str(embedded_model), "--out", str(tmp_path / "o"),
                   "--engine", "server"])
    child = int(_wait_for(proc, r"server pid (\d+) ready").group(1))
    time.sleep(1.0)  # requests in flight
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "mlx_lm.server child left running"
    assert not (tmp_path / "o" / "mini.json").exists()  # no final result from a cut eval


@pytest.mark.slow
def test_sigterm_during_fuse_leaves_no_half_written_folder(tmp_path, trained_run):
    out = tmp_path / "fused"
    proc = _spawn(["fuse", "--adapter", str(trained_run / "checkpoints" / "step_000006"), "--bits", "4",
                   "--out", str(out), "--no-eval"])
    _wait_for(proc, r"layer by layer|quantizing|writing")  # mid-fuse: the staged folder is being written
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".fused")] == []


@pytest.mark.slow
def test_server_killed_mid_eval_keeps_prompts_and_resume_completes(tmp_path, embedded_model):
    suite = small_suite(tmp_path, n=8, max_tokens=24)
    out = tmp_path / "o"
    args = ["eval", "--prompts", str(suite), "--model", str(embedded_model), "--out", str(out), "--concurrency", "1",
            "--engine", "server"]
    proc = _spawn(args)
    child = int(_wait_for(proc, r"server pid (\d+) ready").group(1))
    partial = out / "mini.partial.jsonl"
    deadline = time.monotonic() + 120
    while (not partial.exists() or len(partial.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)  # the server dies mid-eval
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert "died" in err and "--resume" in err
    kept = len(partial.read_text().splitlines())
    assert 3 <= kept < 8 and not (out / "mini.json").exists()
    done = subprocess.run([sys.executable, "-m", "mlx_ft", *args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{kept} of 8 prompts already scored" in done.stderr
    rec = json.loads((out / "mini.json").read_text())
    assert len(rec["results"]) == 8 and not partial.exists()


@pytest.mark.slow
def test_batched_eval_killed_keeps_prompts_and_resume_completes(tmp_path, trained_run):
    """SIGKILL mid-way through a batched eval of base + 2 checkpoints: every scored prompt is kept,
    no target that was still running has a final result, and --resume asks only for the rest."""
    suite = small_suite(tmp_path, n=12, max_tokens=16)  # 12 prompts: a target's partial file reaches 8 rows
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("evals"))
    args = ["eval", "--prompts", str(suite), "--run", str(run), "--concurrency", "4"]  # waves of 4 rows
    proc = _spawn(args)
    partials = lambda: sum(len(p.read_text().splitlines()) for p in run.glob("evals/*/mini.partial.jsonl"))  # noqa: E731
    deadline = time.monotonic() + 240
    while partials() < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = partials()
    finished = [p.parent.name for p in run.glob("evals/*/mini.json")]
    assert kept >= 5 and len(finished) < 3
    done = subprocess.run([sys.executable, "-m", "mlx_ft", *args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "prompts already scored" in done.stderr
    for name in ("base", "step_000003", "step_000006"):
        rec = json.loads((run / "evals" / name / "mini.json").read_text())
        assert [r["id"] for r in rec["results"]] == [p["id"] for p in yaml.safe_load(suite.read_text())["prompts"]]
    assert not list(run.glob("evals/*/mini.partial.jsonl"))


@pytest.mark.slow
def test_sigkill_during_training_leaves_only_complete_checkpoints(tmp_path, tiny_data, embedded_model):
    from mlx_ft.runs import complete_checkpoints

    args = ["train", "--name", "k", "--data", str(tiny_data), "--runs-dir", str(tmp_path / "runs"), "--iters", "6",
            "--save-every", "2", "--batch-size", "2", "--num-layers", "2", "--lr", "1e-3", "--max-seq-length", "256"]
    proc = _spawn(args)
    _wait_for(proc, r"step 2: .* checkpoint saved")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = tmp_path / "runs" / "k"
    steps = [c.step for c in complete_checkpoints(run)]
    assert steps and steps[0] == 2 and steps[-1] < 6
    for c in complete_checkpoints(run):  # every visible checkpoint is whole
        assert (c.path / "adapters.safetensors").stat().st_size > 0 and (c.path / "adapter_config.json").exists()
    done = subprocess.run([sys.executable, "-m", "mlx_ft", *args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [c.step for c in complete_checkpoints(run)] == [2, 4, 6]


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    """Temp files and folders are private (0600/0700); what lands must be as shareable as open()/mkdir make it."""
    from mlx_ft.files import staged_dir, write_text

    old = os.umask(0o022)
    try:
        assert (write_text(tmp_path / "a.json", "{}").stat().st_mode & 0o777) == 0o644
        with staged_dir(tmp_path / "folder") as d:
            (d / "x").write_text("x")
        assert ((tmp_path / "folder").stat().st_mode & 0o777) == 0o755
    finally:
        os.umask(old)
