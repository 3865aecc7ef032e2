"""The batched engine: many adapters in one in-process batch (mlx_ft/batched.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from mlx_ft import batch_decode, batched
from mlx_ft.errors import EvalError, WrongModelError

from .conftest import small_suite


def test_row_slots_follow_the_batch_protocol():
    import mlx.core as mx

    a, b = batched.RowSlots(mx.array([1])), batched.RowSlots(mx.array([2]))
    merged = a.merge([a, b, batched.RowSlots(mx.array([0]))])
    assert merged.slots.tolist() == [1, 2, 0]
    merged.filter([0, 2])
    assert merged.slots.tolist() == [1, 0]
    merged.extend(batched.RowSlots(mx.array([3, 4])))
    assert merged.slots.tolist() == [1, 0, 3, 4]
    assert merged.extract(2).slots.tolist() == [3]


@pytest.mark.parametrize("seqs, n", [
    ([[1, 2, 3, 4], [1, 2, 5]], 2),
    ([[1, 2, 3], [1, 2, 3]], 2),  # identical prompts: each keeps its last token to prefill
    ([[7, 1], [8, 1]], 0),
    ([[1, 2, 3]], 2),
    ([], 0),
])
def test_common_prefix_leaves_every_row_a_token(seqs, n):
    assert batch_decode.common_prefix(seqs) == n


def _tamper(src: Path, dst: Path, edit) -> Path:
    import mlx.core as mx

    shutil.copytree(src, dst)
    weights = dict(mx.load(str(dst / "adapters.safetensors")))
    edit(weights)
    mx.save_safetensors(str(dst / "adapters.safetensors"), weights)
    return dst


@pytest.mark.slow
def test_adapter_files_are_read_strictly(tmp_path, trained_run, embedded_model):
    """Seed 000: a lenient load hid a mismatch. Any tensor that is not a fitting LoRA matrix is refused."""
    from mlx_lm.utils import load

    model, _ = load(str(embedded_model))
    ckpt = trained_run / "checkpoints" / "step_000003"
    ok = batched.read_adapter(ckpt, model)
    assert ok.tensors and all(a.shape[1] == b.shape[0] for a, b in ok.tensors.values())
    first = min(ok.tensors)

    def extra(w):
        w["model.layers.0.mlp.gate_proj.magnitude"] = w[f"{first}.lora_a"]

    def reshaped(w):
        w[f"{first}.lora_a"] = w[f"{first}.lora_a"][:-1]

    def elsewhere(w):
        w["model.layers.0.no_such_proj.lora_a"] = w.pop(f"{first}.lora_a")
        w["model.layers.0.no_such_proj.lora_b"] = w.pop(f"{first}.lora_b")

    def half(w):
        w.pop(f"{first}.lora_b")

    for name, edit, words in [("extra", extra, "not a LoRA matrix"), ("shape", reshaped, "don't fit"),
                              ("where", elsewhere, "not a linear layer"), ("half", half, "needs lora_a and lora_b")]:
        with pytest.raises(EvalError, match=words):
            batched.read_adapter(_tamper(ckpt, tmp_path / name, edit), model)


@pytest.mark.slow
def test_each_row_gets_exactly_its_own_adapter(trained_run, embedded_model):
    """One batch mixing base rows and rows of two checkpoints gives, row by row, the logits of the
    base model and of mlx-lm's own LoRA model for that checkpoint."""
    import mlx.core as mx
    from mlx_lm.utils import load

    ckpts = [trained_run / "checkpoints" / s for s in ("step_000003", "step_000006")]
    tokens = mx.array([[1, 504, 3458, 282, 4649, 314, 2]] * 4)
    ref = []
    for adapter in (None, *ckpts):
        m, _ = load(str(embedded_model), adapter_path=str(adapter) if adapter else None)
        ref.append(m(tokens[:1])[0])
    model, _ = load(str(embedded_model))
    engine = batched.MultiAdapterModel(model, [None] + [batched.read_adapter(c, model) for c in ckpts])
    slots = [2, 0, 1, 2]
    out = engine(tokens, cache=[None] * len(model.layers) + [batched.RowSlots(mx.array(slots))])
    for row, slot in enumerate(slots):
        # (x @ A * mask) @ B and x @ A @ B sum in another order: compare relative to the logits' scale
        scale = mx.abs(ref[slot]).max().item()
        err = mx.abs(out[row] - ref[slot]).max().item()
        assert err <= 1e-5 * scale + 1e-6, (row, slot, err, scale)
        assert (out[row].argmax(axis=-1) == ref[slot].argmax(axis=-1)).all().item(), (row, slot)
    gap = mx.abs(ref[1] - ref[2]).max().item()
    assert gap > 1e-2 * mx.abs(ref[1]).max().item()  # the two checkpoints do differ, far beyond float noise


@pytest.mark.slow
def test_batched_and_server_engines_agree_prompt_by_prompt(tmp_path, trained_run):
    """Base + every checkpoint: the batched engine's answers are the server engine's, identity checked."""
    from click.testing import CliRunner

    from mlx_ft.cli import main

    suite = small_suite(tmp_path, n=4, max_tokens=24)
    texts = {}
    for engine in ("batched", "server"):
        run = tmp_path / engine
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("evals"))
        r = CliRunner().invoke(main, ["eval", "--prompts", str(suite), "--run", str(run), "--engine", engine])
        assert r.exit_code == 0, r.output
        for rec_path in sorted(run.glob("evals/*/mini.json")):
            rec = json.loads(rec_path.read_text())
            assert rec["engine"]["name"] == engine and rec["target"]["fingerprint_checked"]
            for x in rec["results"]:
                texts.setdefault((rec["target"]["name"], x["id"]), {})[engine] = (
                    x["text"], x["finish_reason"], x["completion_tokens"], x["code"])
    assert len(texts) == 3 * 4
    assert {k: v["batched"] for k, v in texts.items()} == {k: v["server"] for k, v in texts.items()}


@pytest.mark.slow
def test_a_checkpoint_with_another_fingerprint_is_refused_before_scoring(tmp_path, trained_run):
    from mlx_ft.evaluate import evaluate_targets
    from mlx_ft.suite import load_suite
    from mlx_ft.targets import run_targets

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("evals"))
    targets = run_targets(run)
    # step 6 recorded with step 3's fingerprint: as if its adapter file had been swapped
    swapped = [*targets[:2], dataclasses.replace(targets[2], fingerprint=targets[1].fingerprint)]
    with pytest.raises(WrongModelError, match="step_000006"):
        evaluate_targets(swapped, load_suite(small_suite(tmp_path, n=2, max_tokens=8)))
    assert not list(run.glob("evals/*/mini*.json*"))  # nothing scored for anyone
