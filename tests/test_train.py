"""Training: preflight failures (fast) and real mlx-lm training steps on the embedded model (slow)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from mlx_ft.runs import complete_checkpoints
from mlx_ft.errors import ConfigError, TrainingError, UserError
from mlx_ft.smoke import smoke
from mlx_ft.train import Guard, load_config, train

from .conftest import write_jsonl


def cfg_for(tmp_path, data, **kw):
    base = {"name": "t", "data": str(data), "runs_dir": str(tmp_path / "runs"), "iters": 4, "save_every": 2,
            "batch_size": 2, "num_layers": 2, "learning_rate": 1e-3, "max_seq_length": 256}
    return load_config(None, {**base, **kw})


def test_guard_stops_on_nan():
    with pytest.raises(TrainingError, match="nan"):
        Guard(3.0).check(7, math.nan)


def test_guard_stops_on_divergence_not_on_noise():
    g = Guard(3.0)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.0, 2.5, 1.5, 3.0], 1):  # noisy but fine
        g.check(step, loss)
    with pytest.raises(TrainingError, match="diverged"):
        for step, loss in enumerate([9.0] * 5, 9):
            g.check(step, loss)


@pytest.mark.slow
def test_frozen_model_is_refused(tmp_path, tiny_data, embedded_model, monkeypatch):
    import mlx_lm.tuner.utils as tu

    monkeypatch.setattr(tu, "linear_to_lora_layers", lambda *a, **k: None)  # a bug that freezes everything
    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(cfg_for(tmp_path, tiny_data))
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


@pytest.mark.slow
def test_truncation_is_an_error_unless_allowed(tmp_path, tiny_data, embedded_model):
    with pytest.raises(ConfigError) as e:
        train(cfg_for(tmp_path, tiny_data, max_seq_length=60))
    assert "train.jsonl:" in str(e.value) and "--allow-truncation" in str(e.value)
    with pytest.raises(ConfigError, match="NaN"):
        train(cfg_for(tmp_path, tiny_data, max_seq_length=20, allow_truncation=True))


@pytest.mark.slow
def test_bad_data_fails_before_loading_anything(tmp_path):
    data = tmp_path / "d"
    write_jsonl(data / "train.jsonl", ['{"messages": [{"role": "user", "content": "x"}]}'])
    write_jsonl(data / "valid.jsonl", ["not json"])
    with pytest.raises(ConfigError) as e:
        train(cfg_for(tmp_path, data))
    assert "train.jsonl line 1" in str(e.value) and "valid.jsonl line 1" in str(e.value)


@pytest.mark.slow
def test_real_training_writes_loadable_checkpoints(tmp_path, tiny_data, embedded_model):
    cfg = cfg_for(tmp_path, tiny_data)
    summary = train(cfg)
    run = tmp_path / "runs" / "t"
    assert summary["status"] == "complete"
    ckpts = complete_checkpoints(run)
    assert [c.step for c in ckpts] == [2, 4]
    for c in ckpts:
        m = c.manifest
        assert set(m) >= {"step", "train_loss", "val_loss", "learning_rate", "tokens_seen", "wall_time_s", "fingerprint"}
        assert math.isfinite(m["val_loss"])
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert "val_loss" in metrics[0] and "val_loss" in metrics[2] and "val_loss" not in metrics[1]
    meta = json.loads((run / "run.json").read_text())
    assert meta["versions"]["mlx_lm"] and set(meta["data_sha256"]) == {"train", "valid"}
    assert meta["config"]["mask_prompt"] is True

    # each checkpoint loads with plain mlx_lm as is, and the adapter changes the model's answer
    from mlx_lm import generate, load

    from mlx_ft.fingerprint import fingerprint_model

    model, tok = load(str(embedded_model), adapter_path=str(ckpts[-1].path))
    assert fingerprint_model(model, tok) == ckpts[-1].manifest["fingerprint"]
    assert ckpts[-1].manifest["fingerprint"] != meta["base"]["fingerprint"]
    generate(model, tok, "hello", max_tokens=2)

    # the same validation set every time: re-scoring the base gives the recorded value
    with pytest.raises(UserError, match="already exists"):
        train(cfg)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, tiny_data, embedded_model):
    import mlx.core as mx

    cfg = cfg_for(tmp_path, tiny_data)
    train(cfg)
    run = tmp_path / "runs" / "t"
    final = mx.load(str(run / "checkpoints" / "step_000004" / "adapters.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if killed after step 2's checkpoint
    # a half-written checkpoint from the crash: hidden name, no manifest -- ignored
    (run / "checkpoints" / ".step_000004.partial-x").mkdir()
    summary = train(cfg, resume=True)
    assert summary["checkpoints"] == ["step_000002", "step_000004"]
    again = mx.load(str(run / "checkpoints" / "step_000004" / "adapters.safetensors"))
    for k in final:  # threaded BLAS sums in another order: equal relative to the weights' scale
        scale = mx.abs(final[k]).max().item()
        assert mx.abs(final[k] - again[k]).max().item() <= 1e-3 * scale + 1e-7, k
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_resume_refuses_changed_data(tmp_path, tiny_data, embedded_model):
    cfg = cfg_for(tmp_path, tiny_data, iters=2)
    train(cfg)
    with open(tiny_data / "train.jsonl", "a") as f:
        f.write((tiny_data / "train.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match="data .* changed"):
        train(cfg, resume=True)


@pytest.mark.slow
def test_smoke_passes_when_loss_falls_and_fails_when_it_cannot(tmp_path, tiny_data, embedded_model):
    result = smoke(cfg_for(tmp_path, tiny_data), steps=6, log=lambda s: None)
    assert result["passed"] and result["loss_last"] < result["loss_first"]
    with pytest.raises(TrainingError, match="did not fall"):
        smoke(cfg_for(tmp_path, tiny_data, learning_rate=1e-12), steps=6, log=lambda s: None)
