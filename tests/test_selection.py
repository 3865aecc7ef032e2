"""pick-best on synthetic eval files: the choice, its statistics, and the reason in words."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.errors import EvalError
from mlx_ft.files import write_json
from mlx_ft.selection import cochran_q, mcnemar_exact, pick_best, seed_table, split_halves, wilson

IDS = [f"p{i:02d}" for i in range(27)]


def make_run(root, name, scores: dict, val_loss: dict):
    """scores: target -> list of per-prompt values (1.0 pass, 0.5 unwrapped, 0 fail)."""
    run = root / name
    write_json(run / "run.json", {"model_path": str(root / "model"), "base": {"val_loss": val_loss.get("base", 3.0)}})
    for target, values in scores.items():
        step = 0 if target == "base" else int(target.split("_")[1])
        if target != "base":
            d = run / "checkpoints" / target
            d.mkdir(parents=True)
            (d / "adapters.safetensors").write_bytes(b"")
            write_json(d / "manifest.json", {"step": step, "val_loss": val_loss[target]})
        results = [{"id": i, "category": "c", "value": v, "passed": v == 1.0,
                    "code": "ok" if v == 1.0 else "unwrapped" if v == 0.5 else "prose", "text": "t"}
                   for i, v in zip(IDS, values)]
        write_json(run / "evals" / target / "tools.json", {"results": results, "summary": {}})
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
    assert json.loads((run / "best.json").read_text())["chosen"]["adapter"].endswith("step_000100")
    assert r["p_best"]["step_000100"] > 0.95


def test_says_when_winner_is_not_distinguishable_from_base(tmp_path):
    run = make_run(tmp_path, "r", {"base": seq(10), "step_000010": seq(12)}, {"step_000010": 1.0})
    r = pick_best(run)
    assert r["chosen"]["name"] == "step_000010"
    assert "NOT distinguishable from the base" in r["reason"]


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
    runs = [make_run(tmp_path, f"r-s{s}", {"base": seq(0), "step_000010": seq(k)}, {"step_000010": 1})
            for s, k in ((1, 10), (2, 5), (3, 7))]
    t = seed_table(runs)
    assert [x["score"] for x in t["runs"]] == [round(10 / 27, 4), round(5 / 27, 4), round(7 / 27, 4)]
    assert t["ci95_half_width"] > 0 and t["cochran_q"]["step"] == 10
    r = CliRunner().invoke(main, ["pick-best", *sum((["--runs", str(x)] for x in runs), [])])
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
