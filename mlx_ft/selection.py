"""``mlxft pick-best``: choose a checkpoint by what it does, and say how sure that choice is.

Picking by validation loss once shipped a model that passed 22 % of the tool-call prompts while
another checkpoint did far better; with 27 prompts a 95 % interval is about ±17 points, and the
best of 8 noisy checkpoints is flattered by being the best (winner's curse). So next to the choice
we report: Wilson intervals, exact McNemar tests of the winner against the base and against the
val-loss pick (with the direction: prompts won and lost), a confirm split (select on one half of
the prompts, score on the other), and a bootstrap probability of being best.

``choose`` is the one pure function that decides; ``pick_best`` loads a run's eval files and calls
it; only the ``pick-best`` command writes ``best.json`` (``write_best``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_ft.errors import EvalError, UserError
from mlx_ft.files import write_json
from mlx_ft.results import load_results
from mlx_ft.runs import BASE
from mlx_ft.targets import run_targets

METRICS = ("score", "strict")
ALPHA = 0.05


@dataclass(frozen=True)
class Candidate:
    name: str
    step: int
    adapter: str | None
    val_loss: float | None
    ids: tuple[str, ...]
    values: np.ndarray  # rubric score per prompt
    passed: np.ndarray  # strict pass per prompt (bool)
    codes: dict

    def metric(self, metric: str, idx: np.ndarray | None = None) -> float:
        arr = self.values if metric == "score" else self.passed.astype(float)
        arr = arr if idx is None else arr[idx]
        return float(arr.mean()) if arr.size else float("nan")

    def key(self, metric: str, idx: np.ndarray | None = None) -> tuple:
        """Sort key: metric, then strict pass rate, then the earlier step wins a tie."""
        p = self.passed if idx is None else self.passed[idx]
        return (round(self.metric(metric, idx), 9), round(float(p.mean()) if p.size else 0.0, 9), -self.step)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (round(float(ci.low), 4), round(float(ci.high), 4))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact (binomial) McNemar test on paired pass/fail outcomes."""
    from scipy.stats import binomtest

    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return {"only_first": only_a, "only_second": only_b, "p_value": round(p, 6)}


def cochran_q(table: np.ndarray) -> dict:
    """Cochran's Q for k related binary samples; ``table`` is prompts × seeds of 0/1."""
    from scipy.stats import chi2

    x = np.asarray(table, dtype=float)
    k = x.shape[1]
    col, row, total = x.sum(axis=0), x.sum(axis=1), x.sum()
    denom = k * total - np.sum(row**2)
    if k < 2 or denom == 0:
        return {"q": 0.0, "df": k - 1, "p_value": 1.0}
    q = (k - 1) * (k * np.sum(col**2) - total**2) / denom
    return {"q": round(float(q), 4), "df": k - 1, "p_value": round(float(chi2.sf(q, k - 1)), 6)}


def split_halves(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic half split of the prompts (by a hash of the id, so it ignores file order)."""
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    return np.array(sorted(order[0::2]), dtype=int), np.array(sorted(order[1::2]), dtype=int)


def candidates(run_dir: str | Path, suite: str) -> list[Candidate]:
    results = load_results(run_dir, suite)
    out = []
    ids0 = None
    for t in run_targets(run_dir):
        rec = results[t.name]
        rows = rec["results"]
        ids = tuple(r["id"] for r in rows)
        if ids0 is None:
            ids0 = ids
        elif ids != ids0:
            raise EvalError(f"{run_dir}: {t.name} was evaluated on other prompts than the base; re-run the eval")
        codes: dict[str, int] = {}
        for r in rows:
            codes[r["code"]] = codes.get(r["code"], 0) + 1
        out.append(Candidate(t.name, t.step or 0, str(t.adapter) if t.adapter else None, t.val_loss, ids,
                             np.array([r["value"] for r in rows], dtype=float),
                             np.array([bool(r["passed"]) for r in rows]), codes))
    return out


def bootstrap_p_best(cands: list[Candidate], metric: str, n: int = 2000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    m = len(cands[0].ids)
    wins = dict.fromkeys((c.name for c in cands), 0)
    for _ in range(n):
        idx = rng.integers(0, m, m)
        best = max(cands, key=lambda c: c.key(metric, idx))
        wins[best.name] += 1
    return {k: round(v / n, 4) for k, v in wins.items()}


def guard_result(cands: list[Candidate], suite: str, alpha: float = ALPHA) -> dict:
    """Which checkpoints score significantly *below* the base on the guard suite (one-sided exact
    McNemar on shared prompt ids): those forgot general skill and may not be chosen."""
    from scipy.stats import binomtest

    base = next(c for c in cands if c.name == BASE)
    out = {"suite": suite, "alpha": alpha, "base_pass_rate": round(float(base.passed.mean()), 4),
           "checkpoints": {}, "excluded": []}
    for c in cands:
        if c.name == BASE:
            continue
        lost = int(np.sum(base.passed & ~c.passed))  # prompts the base passes and the checkpoint fails
        won = int(np.sum(~base.passed & c.passed))
        p = float(binomtest(lost, lost + won, 0.5, alternative="greater").pvalue) if lost + won else 1.0
        out["checkpoints"][c.name] = {"pass_rate": round(float(c.passed.mean()), 4), "lost": lost, "won": won,
                                      "p_value": round(p, 6)}
        if p < alpha:
            out["excluded"].append(c.name)
    return out


def guard_check(run_dir: str | Path, guard: str, alpha: float = ALPHA) -> dict:
    """``guard_result`` on a run's eval files for the guard suite (``bfcl:...`` names allowed)."""
    from mlx_ft.bfcl import suite_name

    name = suite_name(guard) if guard.startswith("bfcl:") else guard
    return guard_result(candidates(run_dir, name), name, alpha)


def check_options(metric: str, alpha: float, bootstrap: int) -> None:
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha {alpha}: a significance level must be between 0 and 1 (0.05 is usual)")
    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap}: give a number of resamples, or 0 to skip P(best)")


def verdict(test: dict, alpha: float) -> str:
    """'better', 'worse' or 'not_better': the direction of a paired test, not only its p-value.

    ``test`` is ``mcnemar_exact(first, second)``; 'better' needs more prompts won than lost *and*
    p < alpha, so a significant loss is never reported as a win."""
    won, lost, p = test["only_first"], test["only_second"], test["p_value"]
    if p < alpha and won > lost:
        return "better"
    if p < alpha and lost > won:
        return "worse"
    return "not_better"


def choose(cands: list[Candidate], *, metric: str = "score", confirm_split: bool = False, bootstrap: int = 2000,
           guard: dict | None = None, alpha: float = ALPHA, run: str = "", suite: str = "tools") -> dict:
    """The choice, every number behind it, and the reason in words. Pure: no files read or written.

    ``cands``: the base (named ``base``) and every checkpoint, each with its per-prompt results and
    val loss; ``guard``: ``guard_result`` on the guard suite, or None. Returns what ``best.json``
    holds."""
    check_options(metric, alpha, bootstrap)
    if len(cands) < 2:
        raise EvalError(f"{run or 'this run'}: no complete checkpoint to choose from (only the base model); "
                        "train one with `mlxft train` and evaluate it with `mlxft eval`")
    base = next(c for c in cands if c.name == BASE)
    with_loss = [c for c in cands if c.name != BASE and c.val_loss is not None]
    val_pick = min(with_loss, key=lambda c: (c.val_loss, c.step)) if with_loss else None
    eligible = [c for c in cands if not guard or c.name not in guard["excluded"]]
    sel_idx = conf_idx = None
    if confirm_split:
        sel_idx, conf_idx = split_halves(base.ids)
    winner = max(eligible, key=lambda c: c.key(metric, sel_idx))
    n = len(base.ids)

    def row(c: Candidate) -> dict:
        k = int(c.passed.sum())
        return {"name": c.name, "step": c.step, "adapter": c.adapter, "val_loss": c.val_loss,
                "score": round(c.metric("score"), 4), "strict_pass": round(k / n, 4), "strict_ci95": wilson(k, n),
                "codes": c.codes}

    vs_base = mcnemar_exact(winner.passed, base.passed)
    vs_val = mcnemar_exact(winner.passed, val_pick.passed) if val_pick else None
    result = {
        "run": run, "suite": suite, "metric": metric, "prompts": n, "alpha": alpha,
        "chosen": row(winner),
        "val_loss_pick": row(val_pick) if val_pick else None,
        "base": row(base),
        "mcnemar": {"vs_base": vs_base, "vs_val_loss_pick": vs_val},
        "verdict": {"vs_base": verdict(vs_base, alpha) if winner is not base else None,
                    "vs_val_loss_pick": verdict(vs_val, alpha) if vs_val and val_pick is not winner else None},
        "p_best": bootstrap_p_best(eligible, metric, bootstrap) if bootstrap else {},
        "guard": guard,
        "table": [row(c) for c in cands],
    }
    if confirm_split:
        result["confirm_split"] = {
            "selection_ids": [base.ids[i] for i in sel_idx], "confirm_ids": [base.ids[i] for i in conf_idx],
            "winner_selection": round(winner.metric(metric, sel_idx), 4),
            "winner_confirm": round(winner.metric(metric, conf_idx), 4),
            "base_confirm": round(base.metric(metric, conf_idx), 4),
        }
    result["reason"] = explain(result)
    return result


def pick_best(run_dir: str | Path, suite: str = "tools", metric: str = "score", confirm_split: bool = False,
              bootstrap: int = 2000, guard: str | None = None, alpha: float = ALPHA) -> dict:
    """Load a run's eval files (and the guard suite's) and ``choose``. Writes nothing: the
    ``pick-best`` command writes best.json with ``write_best``."""
    check_options(metric, alpha, bootstrap)
    cands = candidates(run_dir, suite)
    guard_info = guard_check(run_dir, guard, alpha) if guard else None
    result = choose(cands, metric=metric, confirm_split=confirm_split, bootstrap=bootstrap, guard=guard_info,
                    alpha=alpha, run=str(run_dir), suite=suite)
    # the options as given, so that the report can print the command that reproduces this choice
    result["options"] = {"metric": metric, "confirm_split": confirm_split, "bootstrap": bootstrap, "guard": guard,
                         "alpha": alpha}
    return result


def write_best(run_dir: str | Path, result: dict) -> Path:
    """``RUN/best.json``, atomically (``mlxft fuse --run`` fuses what it names)."""
    return write_json(Path(run_dir) / "best.json", result)


def _against(test: dict, v: str, what: str, alpha: float) -> str:
    counts = f"{_n(test['only_first'])} won, {test['only_second']} lost, p={test['p_value']:.3g}"
    if v == "better":
        return f"better than {what}: {counts}"
    if v == "worse":
        return f"WORSE than {what} on strict pass: {counts}"
    return f"NOT significantly better than {what} ({counts}; needs p<{alpha:g} with more won than lost)"


def _n(k: int) -> str:
    return f"{k} prompt{'s' if k != 1 else ''}"


def explain(r: dict) -> str:
    """The reason, first line first: is the pick significantly better than the base and than the
    val-loss pick (strict pass, exact McNemar, in which direction, at the alpha given)? Then the
    numbers behind it, one line each."""
    metric = "rubric score" if r["metric"] == "score" else "strict pass rate"
    alpha = r["alpha"]
    c, vp, v = r["chosen"], r["val_loss_pick"], r["verdict"]
    value = c["score"] if r["metric"] == "score" else c["strict_pass"]
    if c["name"] == BASE:
        head = (f"no checkpoint beats the base model on {r['suite']}: the base has the highest {metric}, "
                "so training did not help on this suite")
    else:
        head = f"{c['name']} is " + _against(r["mcnemar"]["vs_base"], v["vs_base"], "the base", alpha)
        if v["vs_val_loss_pick"]:
            what = f"the val-loss pick {vp['name']}"
            head += f"; {_against(r['mcnemar']['vs_val_loss_pick'], v['vs_val_loss_pick'], what, alpha)}"
        if any(x not in (None, "better") for x in v.values()):
            head += ": this choice may be noise; evaluate on more prompts before trusting it"
    lines = [head + ".",
             (f"{c['name']} has the highest {metric} ({_pct(value)}, strict pass {_pct(c['strict_pass'])}, 95% CI "
              f"{_pct(c['strict_ci95'][0])}-{_pct(c['strict_ci95'][1])}) of {len(r['table'])} candidates on "
              f"{r['prompts']} prompts (pairwise tests: exact McNemar on strict pass, alpha {alpha:g}).")]
    if vp is not None:
        if vp["name"] == c["name"]:
            lines.append("The lowest validation loss points to the same checkpoint.")
        else:
            vv = vp["score"] if r["metric"] == "score" else vp["strict_pass"]
            lines.append(f"The val-loss pick would have been {vp['name']} (val loss {vp['val_loss']:.3f}, "
                         f"{metric} {_pct(vv)}).")
    if r.get("guard"):
        g = r["guard"]
        lines.append(f"Guard {g['suite']}: " + (f"excluded {', '.join(g['excluded'])} (significantly below the base "
                                                f"{_pct(g['base_pass_rate'])}, one-sided p<{g['alpha']:g})."
                                                if g["excluded"] else "no checkpoint is significantly below the base."))
    if r.get("p_best"):
        lines.append(f"Bootstrap P(best)={r['p_best'].get(c['name'], 0):.2f}.")
    if "confirm_split" in r:
        cs = r["confirm_split"]
        lines.append(f"Selected on half the prompts ({_pct(cs['winner_selection'])}), it scores "
                     f"{_pct(cs['winner_confirm'])} on the other half (base {_pct(cs['base_confirm'])}).")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def seed_table(run_dirs: Sequence[str | Path], suite: str = "tools", metric: str = "score", *,
               picks: Sequence[dict] | None = None, confirm_split: bool = False, bootstrap: int = 0,
               guard: str | None = None, alpha: float = ALPHA) -> dict:
    """Across seeds: each run's pick, mean ± 95% t-interval, Cochran's Q at the common best step.

    ``picks``: the ``pick_best`` results already made for these runs (so the seed table uses the
    same choice, guard included); otherwise they are made here with the options given. Writes
    nothing."""
    from scipy import stats

    if picks is None:
        picks = [pick_best(r, suite, metric, confirm_split, bootstrap, guard=guard, alpha=alpha) for r in run_dirs]
    if len(picks) != len(run_dirs):
        raise UserError(f"seed_table: {len(picks)} pick(s) for {len(run_dirs)} run(s); give one pick per run")
    scores = np.array([p["chosen"]["score" if metric == "score" else "strict_pass"] for p in picks])
    mean = float(scores.mean())
    if len(scores) > 1:
        half = float(stats.t.ppf(0.975, len(scores) - 1) * scores.std(ddof=1) / np.sqrt(len(scores)))
    else:
        half = float("nan")
    out = {"runs": [{"run": str(r), "chosen": p["chosen"]["name"], "score": p["chosen"]["score"],
                     "strict_pass": p["chosen"]["strict_pass"], "verdict_vs_base": p.get("verdict", {}).get("vs_base")}
                    for r, p in zip(run_dirs, picks)],
           "mean": round(mean, 4), "ci95_half_width": round(half, 4) if np.isfinite(half) else None}
    # Cochran's Q at the step that is best on average across seeds
    per_run = [{c.step: c for c in candidates(r, suite)} for r in run_dirs]
    common = set.intersection(*(set(d) for d in per_run)) - {0}
    if common and len(run_dirs) > 1 and len({per_run[0][s].ids for s in common}) == 1:
        step = max(sorted(common), key=lambda s: np.mean([d[s].metric(metric) for d in per_run]))
        tab = np.stack([d[step].passed for d in per_run], axis=1).astype(int)
        out["cochran_q"] = {"step": step, **cochran_q(tab)}
    return out
