"""Models by Hugging Face repo id, from an offline cache (mlx_ft/models.py)."""

from __future__ import annotations

import json
import socket

import pytest

from mlx_ft.errors import ModelError
from mlx_ft.models import identity, resolve_model

from .conftest import DATA, make_hf_cache

COMMIT = "a" * 40
OTHER = "b" * 40


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: a cached model must need none."""

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def cached(offline_hf_home, embedded_model):
    """The embedded model as ``test-org/tiny`` in the HF cache: main at COMMIT, tag v2 at OTHER."""
    hub = offline_hf_home / "hub"
    make_hf_cache(hub, "test-org/tiny", embedded_model, COMMIT)
    make_hf_cache(hub, "test-org/tiny", embedded_model, OTHER, ref="v2")
    return hub / "models--test-org--tiny"


def test_repo_id_resolves_to_the_cached_snapshot_without_the_network(cached, no_network):
    path = resolve_model("test-org/tiny")
    assert path == cached / "snapshots" / COMMIT
    assert identity("test-org/tiny", path) == {"spec": "test-org/tiny", "path": str(path.resolve()),
                                                "repo_id": "test-org/tiny", "revision": COMMIT}
    assert resolve_model("test-org/tiny@v2") == cached / "snapshots" / OTHER  # a tag, through refs/
    assert resolve_model(f"test-org/tiny@{OTHER}") == cached / "snapshots" / OTHER  # a commit hash


def test_local_folder_wins_and_records_no_repo(tmp_path, embedded_model):
    assert resolve_model(str(embedded_model)) == embedded_model
    assert identity(str(embedded_model), embedded_model)["repo_id"] is None


@pytest.mark.parametrize("spec", ["test-org/absent", "test-org/tiny@no-such-branch"])
def test_a_model_not_in_the_cache_says_how_to_get_it(cached, no_network, spec):
    repo = spec.partition("@")[0]
    with pytest.raises(ModelError, match=f"huggingface-cli download {repo}") as e:
        resolve_model(spec)
    assert "never downloads" in str(e.value) and str(cached.parent) in str(e.value)


def test_an_incomplete_snapshot_is_refused(offline_hf_home, tmp_path):
    src = tmp_path / "partial"
    src.mkdir()
    (src / "config.json").write_text("{}")  # no weights: an interrupted download
    make_hf_cache(offline_hf_home / "hub", "test-org/partial", src, COMMIT)
    with pytest.raises(ModelError, match="interrupted download"):
        resolve_model("test-org/partial")


def test_not_a_folder_nor_a_repo_id(tmp_path):
    with pytest.raises(ModelError, match="no such folder, and not a Hugging Face repo id"):
        resolve_model(str(tmp_path / "nope"))


@pytest.mark.slow
def test_train_by_repo_id_records_the_revision(cached, no_network, tmp_path):
    """2 real steps on the cached model named by repo id: run.json and the manifest say which commit."""
    from mlx_lm import load

    from mlx_ft.train import load_config, train

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 2), ("valid", 2)):
        (data / f"{split}.jsonl").write_text("\n".join((DATA / f"{split}.jsonl").read_text().splitlines()[:n]) + "\n")
    cfg = load_config(None, {"name": "hub", "model": "test-org/tiny", "data": str(data), "runs_dir": str(tmp_path),
                             "iters": 2, "save_every": 2, "batch_size": 1, "num_layers": 1, "max_seq_length": 512})
    train(cfg)
    want = {"spec": "test-org/tiny", "repo_id": "test-org/tiny", "revision": COMMIT,
            "path": str((cached / "snapshots" / COMMIT).resolve())}
    run = json.loads((tmp_path / "hub" / "run.json").read_text())
    assert run["model"] == want and run["status"] == "complete"
    ckpt = tmp_path / "hub" / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "manifest.json").read_text())["model"] == want
    load(want["path"], adapter_path=str(ckpt))  # the checkpoint loads against the snapshot as is


def test_eval_fuse_and_doctor_take_a_repo_id(cached, no_network, tmp_path):
    from mlx_ft.doctor import paths_report
    from mlx_ft.fuse import resolve_source
    from mlx_ft.targets import single_target

    snap = cached / "snapshots" / COMMIT
    assert single_target("test-org/tiny", None, tmp_path / "out").model == snap
    adapter = tmp_path / "ckpt"
    adapter.mkdir()
    (adapter / "adapters.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text(json.dumps({"model": "/elsewhere"}))
    assert resolve_source(None, adapter, "test-org/tiny@v2") == (adapter, cached / "snapshots" / OTHER)
    found = paths_report("test-org/tiny", None)["model"]
    assert found["present"] and found["path"] == str(snap.resolve()) and found["size_bytes"] > 0
    missing = paths_report("test-org/absent", None)["model"]
    assert not missing["present"] and "huggingface-cli download test-org/absent" in missing["why"]


def test_two_processes_wanting_the_embedded_model_import_it_once(tmp_path, monkeypatch):
    """Two mlxft processes (or two test workers) starting on a fresh machine: one imports, the other
    waits for it and uses that import (no second import, no folder replaced under the first's feet)."""
    import threading
    import time

    from mlx_ft import gguf, models

    monkeypatch.setenv("MLXFT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "default_gguf", lambda: tmp_path / "x.gguf")
    imports = []

    def slow_import(src, out, dtype, log):
        imports.append(out)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one imports
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(gguf, "import_gguf", slow_import)
    got = []
    threads = [threading.Thread(target=lambda: got.append(resolve_model(None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(imports) == 1 and got == [imports[0]] * 2
