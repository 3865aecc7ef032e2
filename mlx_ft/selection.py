"""``mlxft pick-best``: choose a checkpoint by what it does, and say how sure that choice is.

Seed 004 picked by validation loss (0.176) and shipped a 22.2 % model; with 27 prompts a 95 %
interval is about ±17 points, and the best of 8 noisy checkpoints is flattered by being the best
(winner's curse). So next to the choice we report: Wilson intervals, exact McNemar tests of the
winner against the base and against the val-loss pick, a confirm split (select on one half of the
prompts, score on the other), and a bootstrap probability of being best. Reads only eval files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mlx_ft.errors import EvalError, UserError
from mlx_ft.evaluate import BASE, load_results, run_targets
from mlx_ft.files import write_json

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


def guard_check(run_dir: str | Path, guard: str, alpha: float = ALPHA) -> dict:
    """Which checkpoints score significantly *below* the base on the guard suite (one-sided exact
    McNemar on shared prompt ids): those forgot general skill and may not be chosen."""
    from scipy.stats import binomtest

    from mlx_ft.bfcl import suite_name

    name = suite_name(guard) if guard.startswith("bfcl:") else guard
    cands = candidates(run_dir, name)
    base = next(c for c in cands if c.name == BASE)
    out = {"suite": name, "alpha": alpha, "base_pass_rate": round(float(base.passed.mean()), 4),
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


def pick_best(run_dir: str | Path, suite: str = "tools", metric: str = "score", confirm_split: bool = False,
              bootstrap: int = 2000, write: bool = True, guard: str | None = None, alpha: float = ALPHA) -> dict:
    """Choose the best checkpoint of a run by eval score; write best.json with the reason.

    With ``guard``, checkpoints significantly worse than the base on the guard suite are excluded."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
    run_dir = Path(run_dir)
    cands = candidates(run_dir, suite)
    if len(cands) < 2:
        raise EvalError(f"{run_dir}: no complete checkpoint to choose from (only the base model)")
    base = next(c for c in cands if c.name == BASE)
    with_loss = [c for c in cands if c.name != BASE and c.val_loss is not None]
    val_pick = min(with_loss, key=lambda c: (c.val_loss, c.step)) if with_loss else None

    guard_info = guard_check(run_dir, guard, alpha) if guard else None
    eligible = [c for c in cands if not guard_info or c.name not in guard_info["excluded"]]
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
    p_best = bootstrap_p_best(cands, metric, bootstrap) if bootstrap else {}
    result = {
        "run": str(run_dir), "suite": suite, "metric": metric, "prompts": n,
        "chosen": row(winner),
        "val_loss_pick": row(val_pick) if val_pick else None,
        "base": row(base),
        "mcnemar": {"vs_base": vs_base, "vs_val_loss_pick": vs_val},
        "p_best": p_best,
        "guard": guard_info,
        "table": [row(c) for c in cands],
    }
    if confirm_split:
        result["confirm_split"] = {
            "selection_ids": [base.ids[i] for i in sel_idx], "confirm_ids": [base.ids[i] for i in conf_idx],
            "winner_selection": round(winner.metric(metric, sel_idx), 4),
            "winner_confirm": round(winner.metric(metric, conf_idx), 4),
            "base_confirm": round(base.metric(metric, conf_idx), 4),
        }
    result["reason"] = explain(result, winner, base, val_pick)
    if write:
        write_json(run_dir / "best.json", result)
    return result


def explain(r: dict, winner: Candidate, base: Candidate, val_pick: Candidate | None) -> str:
    metric = "rubric score" if r["metric"] == "score" else "strict pass rate"
    c = r["chosen"]
    parts = [f"{c['name']} has the highest {metric} ({_pct(winner.metric(r['metric']))}, strict pass "
             f"{_pct(c['strict_pass'])}, 95% CI {_pct(c['strict_ci95'][0])}-{_pct(c['strict_ci95'][1])}) "
             f"of {len(r['table'])} candidates on {r['prompts']} prompts"]
    if winner.name == BASE:
        parts.append("no checkpoint beats the base model: training did not help on this suite")
    else:
        p = r["mcnemar"]["vs_base"]["p_value"]
        parts.append(f"vs base: {'better, p=' if p < ALPHA else 'NOT distinguishable from the base, p='}{p:.3g}")
    if val_pick is not None:
        if val_pick.name == winner.name:
            parts.append("the lowest validation loss points to the same checkpoint")
        else:
            p = r["mcnemar"]["vs_val_loss_pick"]["p_value"]
            parts.append(f"the val-loss pick would have been {val_pick.name} (val loss {val_pick.val_loss:.3f}, "
                         f"{metric} {_pct(val_pick.metric(r['metric']))}); difference "
                         f"{'significant' if p < ALPHA else 'not significant'}, p={p:.3g}")
    if r.get("guard"):
        g = r["guard"]
        parts.append(f"guard {g['suite']}: " + (f"excluded {', '.join(g['excluded'])} (significantly below the base "
                                                  f"{_pct(g['base_pass_rate'])}, one-sided p<{g['alpha']})"
                                                  if g["excluded"] else "no checkpoint is significantly below the base"))
    if r.get("p_best"):
        parts.append(f"bootstrap P(best)={r['p_best'].get(winner.name, 0):.2f}")
    if "confirm_split" in r:
        cs = r["confirm_split"]
        parts.append(f"selected on half the prompts ({_pct(cs['winner_selection'])}), it scores "
                     f"{_pct(cs['winner_confirm'])} on the other half (base {_pct(cs['base_confirm'])})")
    return "; ".join(parts) + "."


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def seed_table(run_dirs: Sequence[str | Path], suite: str = "tools", metric: str = "score") -> dict:
    """Across seeds: each run's best, mean ± 95% t-interval, Cochran's Q at the common best step."""
    from scipy import stats

    picks = [pick_best(r, suite, metric, bootstrap=0) for r in run_dirs]
    scores = np.array([p["chosen"]["score" if metric == "score" else "strict_pass"] for p in picks])
    mean = float(scores.mean())
    if len(scores) > 1:
        half = float(stats.t.ppf(0.975, len(scores) - 1) * scores.std(ddof=1) / np.sqrt(len(scores)))
    else:
        half = float("nan")
    out = {"runs": [{"run": str(r), "chosen": p["chosen"]["name"], "score": p["chosen"]["score"],
                     "strict_pass": p["chosen"]["strict_pass"]} for r, p in zip(run_dirs, picks)],
           "mean": round(mean, 4), "ci95_half_width": round(half, 4) if np.isfinite(half) else None}
    # Cochran's Q at the step that is best on average across seeds
    per_run = [{c.step: c for c in candidates(r, suite)} for r in run_dirs]
    common = set.intersection(*(set(d) for d in per_run)) - {0}
    if common and len(run_dirs) > 1 and len({per_run[0][s].ids for s in common}) == 1:
        step = max(sorted(common), key=lambda s: np.mean([d[s].metric(metric) for d in per_run]))
        tab = np.stack([d[step].passed for d in per_run], axis=1).astype(int)
        out["cochran_q"] = {"step": step, **cochran_q(tab)}
    return out
