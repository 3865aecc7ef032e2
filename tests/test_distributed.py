"""Data parallel over mlx.launch: real 2-rank training on this machine (ring backend, loopback)."""

from __future__ import annotations

import json
import subprocess

import pytest

from mlx_ft.distributed import RANK_FAILED, train_distributed, world_size
from mlx_ft.errors import ConfigError, TrainingError
from mlx_ft.train import load_config, train


def cfg_for(tmp_path, data, name, **kw):
    base = {"name": name, "data": str(data), "runs_dir": str(tmp_path / "runs"), "iters": 3, "save_every": 3,
            "batch_size": 4, "num_layers": 2, "learning_rate": 1e-3, "max_seq_length": 256}
    return load_config(None, {**base, **kw})


def test_batch_not_divisible_by_world_is_refused_before_launch(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        train_distributed(cfg_for(tmp_path, tmp_path, "x"), ranks=3, popen=lambda *a, **k: calls.append(a))
    assert calls == []


def test_hostfile_counts_hosts(tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    assert world_size(None, hf) == 2


def test_a_failed_rank_fails_the_run_even_though_mlx_launch_exits_0(tmp_path):
    """mlx.launch prints a warning and exits 0 when a rank dies; that must not pass for success."""
    script = "echo 'rank 1: ValueError: boom'; echo '[WARN] Node with rank 1 exited with code 3'; exit 0"

    def fake_popen(cmd, **kw):
        assert "mlx.launch" in cmd[0] and kw["stdin"] == subprocess.PIPE  # an idle open stdin: no busy loop
        return subprocess.Popen(["sh", "-c", script], **kw)

    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    with pytest.raises(TrainingError, match="(?s)rank 1 exited with code 3.*ValueError: boom"):
        train_distributed(cfg_for(tmp_path, tmp_path, "x"), hostfile=hf, popen=fake_popen)
    assert RANK_FAILED.search("[WARN] Node with rank 0 exited with code 1")


def test_local_ranks_get_the_ring_environment_and_a_failed_rank_stops_the_others(tmp_path):
    """--ranks N starts the ranks itself (mlx.launch's I/O loop would spin a core): each gets MLX_RANK
    and the loopback ring hostfile; when rank 1 dies, rank 0 (waiting on its gradients) is stopped."""
    started = []

    def fake_popen(cmd, **kw):
        rank = int(kw["env"]["MLX_RANK"])
        started.append((rank, json.loads(open(kw["env"]["MLX_HOSTFILE"]).read())))
        script = "sleep 30" if rank == 0 else "echo 'ValueError: boom'; exit 3"
        return subprocess.Popen(["sh", "-c", script], **kw)

    with pytest.raises(TrainingError, match="(?s)rank 1 exited with code 3.*ValueError: boom"):
        train_distributed(cfg_for(tmp_path, tmp_path, "x"), ranks=2, popen=fake_popen)
    assert [r for r, _ in started] == [0, 1]
    ring = started[0][1]
    assert len(ring) == 2 and all(len(n) == 1 and n[0].startswith("127.0.0.1:") for n in ring)
    assert ring[0] != ring[1]


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_write_once(tmp_path, tiny_data, embedded_model):
    # a small lr: Adam's first steps are sign-like, so the slightly different loss weighting of 2 ranks
    # (mean of per-rank token means vs one token mean) would otherwise be amplified into the curve
    one = train(cfg_for(tmp_path, tiny_data, "one", learning_rate=1e-4))
    two = train_distributed(cfg_for(tmp_path, tiny_data, "two", learning_rate=1e-4), ranks=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    runs = tmp_path / "runs"

    def losses(name):
        rows = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r], [r["step"] for r in rows]

    (l1, s1), (l2, s2) = losses("one"), losses("two")
    assert s1 == s2 == [0, 1, 2, 3]  # every row written once, by rank 0 only
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 0.05 * a, (l1, l2)  # same global batch at every step
    manifest = json.loads((runs / "two" / "checkpoints" / "step_000003" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert [p.name for p in (runs / "two" / "checkpoints").iterdir()] == ["step_000003"]


@pytest.mark.slow
def test_crashing_rank_fails_mlxft_train(tmp_path, tiny_data, embedded_model):
    """A real rank that dies (its data file vanishes after launch checks) fails the run with its message."""
    cfg = cfg_for(tmp_path, tmp_path / "missing-data", "crash")
    with pytest.raises(TrainingError, match="rank"):
        train_distributed(cfg, ranks=2)


def test_one_hostfile_parser_for_training_and_spreading(tmp_path):
    """mlx.launch reads a list or {"hosts": [...]}; training and spreading must agree with it."""
    from mlx_ft.hosts import load_hosts

    listed = [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "mac2.local", "ips": ["10.0.0.2"]}]
    for i, data in enumerate((listed, {"hosts": listed, "backend": "ring"})):
        path = tmp_path / f"h{i}.json"
        path.write_text(json.dumps(data))
        assert world_size(None, path) == 2
        assert [h.name for h in load_hosts(path)] == ["mac1.local", "mac2.local"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"ips": ["10.0.0.1"]}, {"ssh": "m", "ips": "10.0.0.2"}]))
    with pytest.raises(ConfigError, match=r"hosts\[0\].*ssh(.|\n)*hosts\[1\]\.ips"):
        world_size(None, bad)
