"""pick-best on synthetic eval files: the choice, its statistics, and the reason in words."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.errors import EvalError, UserError
from mlx_ft.files import write_json
from mlx_ft.selection import cochran_q, mcnemar_exact, pick_best, seed_table, split_halves, wilson

IDS = [f"p{i:02d}" for i in range(27)]


def make_run(root, name, scores: dict, val_loss: dict, suite: str = "tools"):
    """scores: target -> list of per-prompt values (1.0 pass, 0.5 unwrapped, 0 fail)."""
    run = root / name
    write_json(run / "run.json", {"model_path": str(root / "model"), "base": {"val_loss": val_loss.get("base", 3.0)}})
    for target, values in scores.items():
        step = 0 if target == "base" else int(target.split("_")[1])
        if target != "base":
            d = run / "checkpoints" / target
            d.mkdir(parents=True, exist_ok=True)
            (d / "adapters.safetensors").write_bytes(b"")
            write_json(d / "manifest.json", {"step": step, "val_loss": val_loss[target]})
        results = [{"id": i, "category": "c", "value": v, "passed": v == 1.0,
                    "code": "ok" if v == 1.0 else "unwrapped" if v == 0.5 else "prose", "text": "t"}
                   for i, v in zip(IDS, values)]
        write_json(run / "evals" / target / f"{suite}.json", {"results": results, "summary": {}})
    return run


def seq(passes: int, halves: int = 0):
    return [1.0] * passes + [0.5] * halves + [0.0] * (27 - passes - halves)


def test_picks_by_eval_score_not_val_loss(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(2), "step_000100": seq(20), "step_000200": seq(6)},
                   {"step_000100": 0.5, "step_000200": 0.176})
    r = pick_best(run)
    assert r["chosen"]["name"] == "step_000100"
    assert r["val_loss_pick"]["name"] == "step_000200"
    assert r["mcnemar"]["vs_base"]["p_value"] < 0.001
    assert r["mcnemar"]["vs_val_loss_pick"]["p_value"] < 0.01
    assert "val-loss pick would have been step_000200" in r["reason"]
    assert r["p_best"]["step_000100"] > 0.95
    first = r["reason"].splitlines()[0]
    assert first.startswith("step_000100 is better than the base: 18 prompts won, 0 lost, p=")
    assert "better than the val-loss pick step_000200: 14 prompts won, 0 lost" in first and "NOT" not in first


def test_only_the_command_writes_best_json(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(2), "step_000100": seq(20)}, {"step_000100": 0.5})
    pick_best(run)
    assert not (run / "best.json").exists()
    res = CliRunner().invoke(main, ["pick-best", "--run", str(run), "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "best.json").read_text())["chosen"]["adapter"].endswith("step_000100")


def test_says_plainly_when_winner_is_not_better_than_base(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(10), "step_000010": seq(12)}, {"step_000010": 1.0})
    r = pick_best(run)
    assert r["chosen"]["name"] == "step_000010"
    assert r["verdict"]["vs_base"] == "not_better"
    first = r["reason"].splitlines()[0]
    assert "NOT significantly better than the base (2 prompts won, 0 lost, p=0.5" in first
    assert "may be noise" in first


def test_a_significant_loss_is_not_called_better(tmp_path):
    # Highest rubric score (27 half-credit replies, 0.5) but 10 strict passes fewer than the base:
    # the two-sided test is significant, and it is a loss.
    run = make_run(tmp_path, "r", {"base": seq(10), "step_000010": seq(0, 27)}, {"step_000010": 1.0})
    r = pick_best(run, bootstrap=0)
    assert r["chosen"]["name"] == "step_000010"
    assert r["mcnemar"]["vs_base"]["p_value"] < 0.05
    assert r["verdict"]["vs_base"] == "worse"
    first = r["reason"].splitlines()[0]
    assert "WORSE than the base on strict pass: 0 prompts won, 10 lost" in first
    assert "better, p=" not in r["reason"] and "is better than" not in r["reason"]


def test_alpha_given_is_the_alpha_used(tmp_path):
    # 6 prompts won, 0 lost: exact two-sided p = 2 * 0.5**6 = 0.03125, between 0.01 and 0.05
    run = make_run(tmp_path, "r", {"base": seq(4), "step_000010": seq(10)}, {"step_000010": 1.0})
    loose = pick_best(run, bootstrap=0, alpha=0.05)
    strict = pick_best(run, bootstrap=0, alpha=0.01)
    assert np.isclose(loose["mcnemar"]["vs_base"]["p_value"], 0.03125, rtol=1e-4)
    assert loose["reason"].startswith("step_000010 is better than the base: 6 prompts won, 0 lost")
    assert strict["verdict"]["vs_base"] == "not_better" and strict["alpha"] == 0.01
    assert "NOT significantly better than the base" in strict["reason"].splitlines()[0]
    assert "p<0.01" in strict["reason"]
    r = CliRunner().invoke(main, ["pick-best", "--run", str(run), "--alpha", "0.01", "--bootstrap", "0"])
    assert r.exit_code == 0 and "NOT significantly better than the base" in r.output
    r = CliRunner().invoke(main, ["pick-best", "--run", str(run), "--alpha", "5"])
    assert r.exit_code == 2 and "--alpha 5" in r.output
    with pytest.raises(UserError, match="between 0 and 1"):
        pick_best(run, alpha=0)


def test_not_better_than_the_val_loss_pick_is_said_first(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(0), "step_000010": seq(20), "step_000020": seq(19)},
                   {"step_000010": 1.0, "step_000020": 0.5})
    r = pick_best(run, bootstrap=0)
    assert r["chosen"]["name"] == "step_000010" and r["val_loss_pick"]["name"] == "step_000020"
    first = r["reason"].splitlines()[0]
    assert "better than the base: 20 prompts won, 0 lost" in first
    assert "NOT significantly better than the val-loss pick step_000020 (1 prompt won, 0 lost, p=1" in first
    assert "may be noise" in first


def test_tie_break_strict_then_earlier_step(tmp_path):
    # same rubric mean (0.5): 10 passes + 7 halves = 13.5 vs 13 passes + 1 half = 13.5
    run = make_run(tmp_path, "r", {"base": seq(0), "step_000010": seq(10, 7), "step_000020": seq(13, 1),
                                   "step_000030": seq(13, 1)},
                   {"step_000010": 1, "step_000020": 1, "step_000030": 1})
    assert pick_best(run, bootstrap=0)["chosen"]["name"] == "step_000020"
    assert pick_best(run, metric="strict", bootstrap=0)["chosen"]["name"] == "step_000020"


def test_base_can_win_and_says_training_did_not_help(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(9), "step_000010": seq(3)}, {"step_000010": 0.1})
    r = pick_best(run, bootstrap=0)
    assert r["chosen"]["name"] == "base" and "did not help" in r["reason"]


def test_confirm_split_reports_the_other_half(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(0), "step_000010": seq(14)}, {"step_000010": 1})
    r = pick_best(run, confirm_split=True, bootstrap=0)
    cs = r["confirm_split"]
    assert sorted(cs["selection_ids"] + cs["confirm_ids"]) == IDS
    assert abs(len(cs["selection_ids"]) - len(cs["confirm_ids"])) <= 1
    passing = set(IDS[:14])  # seq(14): the first 14 prompts pass
    assert np.isclose(cs["winner_confirm"], len(passing & set(cs["confirm_ids"])) / len(cs["confirm_ids"]),
                      rtol=1e-3)
    assert np.isclose(cs["winner_selection"], len(passing & set(cs["selection_ids"])) / len(cs["selection_ids"]),
                      rtol=1e-3)
    assert "other half" in r["reason"]


def test_missing_eval_is_named(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(0), "step_000010": seq(3)}, {"step_000010": 1, "step_000020": 1})
    d = run / "checkpoints" / "step_000020"
    d.mkdir(parents=True)
    (d / "adapters.safetensors").write_bytes(b"")
    write_json(d / "manifest.json", {"step": 20, "val_loss": 1})
    with pytest.raises(EvalError, match="step_000020"):
        pick_best(run)
    r = CliRunner().invoke(main, ["pick-best", "--run", str(run)])
    assert r.exit_code == 2 and "step_000020" in r.output and "Traceback" not in r.output


def test_seed_table_and_cochran(tmp_path):
    from scipy import stats

    runs = [make_run(tmp_path, f"r-s{s}", {"base": seq(0), "step_000010": seq(k)}, {"step_000010": 1})
            for s, k in ((1, 10), (2, 5), (3, 7))]
    t = seed_table(runs)
    x = np.array([10, 5, 7]) / 27
    assert [x["score"] for x in t["runs"]] == [round(10 / 27, 4), round(5 / 27, 4), round(7 / 27, 4)]
    assert np.isclose(t["mean"], x.mean(), rtol=1e-3)
    assert np.isclose(t["ci95_half_width"], stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3), rtol=1e-3)
    assert t["cochran_q"]["step"] == 10
    r = CliRunner().invoke(main, ["pick-best", *[a for x in runs for a in ("--runs", str(x))]])
    assert r.exit_code == 0, r.output
    assert "Cochran's Q" in r.output and "mean best score across seeds" in r.output


def test_statistics_against_known_values():
    lo, hi = wilson(6, 27)
    assert (lo, hi) == (0.1061, 0.4076)  # Wilson interval for 6/27
    a = np.array([True] * 8 + [False] * 19)
    b = np.array([False] * 8 + [False] * 19)
    assert mcnemar_exact(a, b)["p_value"] == round(2 * 0.5**8, 6)
    # Cochran's Q textbook example: 12 subjects, 3 treatments -> Q = 10.75
    t = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0], [0, 1, 0],
                  [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    assert cochran_q(t)["q"] == 10.75


def test_split_is_deterministic_and_order_free():
    a = split_halves(IDS)
    b = split_halves(list(reversed(IDS)))
    assert [IDS[i] for i in a[0]] == sorted(list(reversed(IDS))[i] for i in b[0])


def _guarded_seed(tmp_path, name):
    """step_000010 wins the primary suite but forgot the guard suite; step_000020 is the guarded pick."""
    run = make_run(tmp_path, name, {"base": seq(0), "step_000010": seq(20), "step_000020": seq(15)},
                   {"step_000010": 1, "step_000020": 1})
    make_run(tmp_path, name, {"base": seq(20), "step_000010": seq(5), "step_000020": seq(19)},
             {"step_000010": 1, "step_000020": 1}, suite="guard")
    return run


def test_runs_use_the_same_options_and_write_nothing(tmp_path):
    runs = [_guarded_seed(tmp_path, f"s{i}") for i in (1, 2)]
    for r in runs:
        write_json(r / "best.json", {"chosen": {"name": "kept"}})
    t = seed_table(runs, guard="guard")
    assert [x["chosen"] for x in t["runs"]] == ["step_000020", "step_000020"]
    args = [a for x in runs for a in ("--runs", str(x))] + ["--guard", "guard", "--bootstrap", "0", "--json"]
    res = CliRunner().invoke(main, ["pick-best", *args])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [x["chosen"] for x in out["seeds"]["runs"]] == ["step_000020", "step_000020"]
    assert [r["chosen"]["name"] for r in out["runs"]] == ["step_000020", "step_000020"]
    for r in runs:  # a seed table is no reason to replace what `mlxft fuse --run` will fuse
        assert json.loads((r / "best.json").read_text()) == {"chosen": {"name": "kept"}}
    res = CliRunner().invoke(main, ["pick-best", *args, "--write-runs"])
    assert res.exit_code == 0, res.output
    for r in runs:
        best = json.loads((r / "best.json").read_text())
        assert best["chosen"]["name"] == "step_000020" and best["guard"]["excluded"] == ["step_000010"]


def test_seed_table_reuses_the_picks_given(tmp_path):
    runs = [_guarded_seed(tmp_path, f"s{i}") for i in (1, 2)]
    picks = [pick_best(r, guard="guard", bootstrap=0) for r in runs]
    assert seed_table(runs, picks=picks)["runs"][0]["chosen"] == "step_000020"
    assert seed_table(runs)["runs"][0]["chosen"] == "step_000010"  # unguarded: the other choice
