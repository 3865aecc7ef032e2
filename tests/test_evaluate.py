"""Eval stage: fake server for the bookkeeping, a real mlx_lm.server for one real eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_ft.errors import EvalError, ServerError, UserError, WrongModelError
from mlx_ft.evaluate import evaluate_targets
from mlx_ft.results import load_results
from mlx_ft.targets import run_targets
from mlx_ft.files import write_json
from mlx_ft.server import Reply
from mlx_ft.suite import load_suite

from .conftest import SUITE

suite = load_suite(SUITE)


def evaluate(*args, **kw):
    """The eval of fake models: no tokenizer on disk (tools in the system prompt, JSON calls)."""
    return evaluate_targets(*args, tokenizer_loader=lambda model: None, memory_check=lambda *a, **k: None, **kw)
W = '<tool_call>{"name": "execute_code", "arguments": {"code": "%s"}}</tool_call>'


def fake_run(tmp_path: Path, steps=(10, 20)) -> Path:
    run = tmp_path / "runs" / "r"
    write_json(run / "run.json", {"model_path": str(tmp_path / "model"), "base": {"val_loss": 2.0, "fingerprint": {"who": "base"}}})
    for s in steps:
        d = run / "checkpoints" / f"step_{s:06d}"
        d.mkdir(parents=True)
        (d / "adapters.safetensors").write_bytes(b"")
        write_json(d / "manifest.json", {"step": s, "val_loss": 1.0 / s, "fingerprint": {"who": d.name}})
    # an incomplete checkpoint (no manifest): never evaluated
    (run / "checkpoints" / "step_000030").mkdir(parents=True)
    (run / "checkpoints" / "step_000030" / "adapters.safetensors").write_bytes(b"")
    return run


class FakeServer:
    """Answers like a model: the base talks prose, checkpoints call the expected tool."""

    instances: list = []

    def __init__(self, model, *, die_after=None, wrong_for=None, **kw):
        self.model, self.die_after, self.wrong_for, self.calls = model, die_after, wrong_for, 0
        self.dead = False
        FakeServer.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def close(self):
        self.closed = True

    def alive(self):
        return not self.dead

    def log_tail(self, n=15):
        return "fake log"

    def verify(self, fingerprint, adapter=None):
        who = Path(adapter).name if adapter else "base"
        if who == self.wrong_for:
            raise WrongModelError(f"not serving {who}")
        assert fingerprint == {"who": who}
        return {"token_ids": [], "logprobs": [], "text": who}

    def chat(self, messages, adapter=None, **kw):
        if kw.get("max_tokens") == 1:  # evaluate()'s cache warm-up request: not a scored prompt
            self.warmups = getattr(self, "warmups", 0) + 1
            return Reply("x", "length", 1, 30, 0.01)
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            self.dead = True
            return Reply(None, None, None, None, 0.01, error="ConnectError: refused")
        user = messages[-1]["content"]
        prompt = next(p for p in suite.prompts if p.user == user)
        if adapter is None:
            return Reply("Let me first check what's in that file...", "stop", 9, 30, 0.01)
        args = ", ".join(f"{k}={(v or ['any'])[0]!r}" for k, v in prompt.expect.args.items())
        return Reply(W % f"{prompt.expect.tool}({args})", "stop", 20, 30, 0.01)


def factory(**opts):
    return lambda model, **kw: FakeServer(model, **opts)


def test_run_targets_are_base_plus_complete_checkpoints(tmp_path):
    names = [t.name for t in run_targets(fake_run(tmp_path))]
    assert names == ["base", "step_000010", "step_000020"]


def test_evaluate_writes_per_target_results(tmp_path):
    run = fake_run(tmp_path)
    n = len(FakeServer.instances)
    records = evaluate(run_targets(run), suite, engine="server", server_factory=factory())
    assert len(FakeServer.instances) - n == 1  # one server for all targets of a base model
    assert [r["target"]["name"] for r in records] == ["base", "step_000010", "step_000020"]
    base, ckpt = records[0], records[1]
    assert base["summary"]["score"] == 0 and base["summary"]["codes"] == {"prose": len(suite.prompts)}
    assert ckpt["summary"]["score"] == 1.0 and ckpt["summary"]["pass_rate"] == 1.0
    saved = json.loads((run / "evals" / "step_000010" / "tools.json").read_text())
    assert saved["results"][0]["text"] and saved["target"]["val_loss"] == 0.1
    assert set(saved["summary"]["categories"]) == {p.category for p in suite.prompts}
    assert set(load_results(run, "tools")) == {"base", "step_000010", "step_000020"}


def test_existing_results_are_reused_not_redone(tmp_path):
    run = fake_run(tmp_path)
    evaluate(run_targets(run), suite, engine="server", server_factory=factory())
    before = (run / "evals" / "base" / "tools.json").read_bytes()
    n = len(FakeServer.instances)
    evaluate(run_targets(run), suite, engine="server", server_factory=factory())
    assert (run / "evals" / "base" / "tools.json").read_bytes() == before
    assert FakeServer.instances[n:] == []  # no server started at all


def test_server_death_keeps_finished_prompts_and_resume_completes(tmp_path):
    run = fake_run(tmp_path, steps=(10,))
    targets = run_targets(run)[1:]
    with pytest.raises(ServerError, match="died.*--resume"):
        evaluate(targets, suite, engine="server", server_factory=factory(die_after=5), concurrency=1)
    partial = run / "evals" / "step_000010" / "tools.partial.jsonl"
    kept = [json.loads(x) for x in partial.read_text().splitlines()]
    assert len(kept) == 5
    with pytest.raises(UserError, match="--resume"):
        evaluate(targets, suite, engine="server", server_factory=factory())
    records = evaluate(targets, suite, engine="server", server_factory=factory(), resume=True)
    assert FakeServer.instances[-1].calls == len(suite.prompts) - 5  # only the rest was asked
    assert records[0]["summary"]["pass_rate"] == 1.0 and not partial.exists()
    # identical to an uninterrupted eval, prompt by prompt
    fresh = evaluate(run_targets(fake_run(tmp_path / "b", steps=(10,)))[1:], suite, engine="server", server_factory=factory())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "latency_s"} for r in rs]  # noqa: E731
    assert strip(records[0]["results"]) == strip(fresh[0]["results"])


def test_results_of_other_weights_are_not_reused(tmp_path):
    """Retraining a run (new weights, same checkpoint names) must not leave the old scores standing."""
    run = fake_run(tmp_path, steps=(10,))
    evaluate(run_targets(run), suite, engine="server", server_factory=factory())
    result = run / "evals" / "step_000010" / "tools.json"
    old_identity = json.loads(result.read_text())["identity"]
    (run / "checkpoints" / "step_000010" / "adapters.safetensors").write_bytes(b"new weights")
    n = len(FakeServer.instances)
    logs: list[str] = []
    evaluate(run_targets(run), suite, engine="server", server_factory=factory(), log=logs.append)
    assert len(FakeServer.instances) - n == 1 and FakeServer.instances[-1].calls == len(suite.prompts)
    assert any("other weights" in line for line in logs)
    assert json.loads(result.read_text())["identity"] != old_identity
    assert json.loads((run / "evals" / "base" / "tools.json").read_text())["identity"]  # base reused as is


def test_partial_rows_of_other_weights_are_not_resumed(tmp_path):
    run = fake_run(tmp_path, steps=(10,))
    targets = run_targets(run)[1:]
    with pytest.raises(ServerError):
        evaluate(targets, suite, engine="server", server_factory=factory(die_after=5), concurrency=1)
    (run / "checkpoints" / "step_000010" / "adapters.safetensors").write_bytes(b"retrained")
    evaluate(run_targets(run)[1:], suite, engine="server", server_factory=factory(), resume=True)
    assert FakeServer.instances[-1].calls == len(suite.prompts)  # nothing of the old weights kept


def test_wrong_model_scores_nothing(tmp_path):
    run = fake_run(tmp_path, steps=(10,))
    with pytest.raises(WrongModelError):
        evaluate(run_targets(run), suite, engine="server", server_factory=factory(wrong_for="step_000010"))
    assert not (run / "evals" / "step_000010" / "tools.json").exists()
    assert not (run / "evals" / "step_000010" / "tools.partial.jsonl").exists()


def test_missing_results_are_named(tmp_path):
    run = fake_run(tmp_path)
    evaluate(run_targets(run)[:2], suite, engine="server", server_factory=factory())
    with pytest.raises(EvalError, match="step_000020"):
        load_results(run, "tools")


def test_results_of_an_edited_suite_are_not_mixed(tmp_path):
    import dataclasses

    run = fake_run(tmp_path, steps=())
    evaluate(run_targets(run), suite, engine="server", server_factory=factory())
    edited = dataclasses.replace(suite, system_prompt="You are another agent.")
    with pytest.raises(UserError, match="different version"):
        evaluate(run_targets(run), edited, engine="server", server_factory=factory())


@pytest.mark.slow
def test_real_eval_through_mlx_lm_server(tmp_path, embedded_model):
    """A real eval of a few prompts of the shipped suite on the embedded model, via the CLI."""
    from click.testing import CliRunner

    from mlx_ft.cli import main

    from .conftest import small_suite

    small = small_suite(tmp_path, n=3, max_tokens=16)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["eval", "--prompts", str(small), "--model", str(embedded_model), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "mini.json").read_text())
    assert rec["target"]["fingerprint_checked"] is True
    assert len(rec["results"]) == 3 and all(x["text"] for x in rec["results"])
    assert all(x["completion_tokens"] <= 16 for x in rec["results"])
    assert "overall" in r.output and "text-01" in r.output
