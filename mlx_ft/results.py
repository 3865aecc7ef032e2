"""The eval result file: one target scored on one suite, ``evals/<target>/<suite>.json``.

Written atomically once the target's last prompt is scored; while an eval runs, each scored
prompt is appended to ``<suite>.partial.jsonl`` (a crash keeps what was done). Both carry the
suite's digest and the target's identity (targets.py), so a result is only ever reused for the
same suite and the same weights.
"""

from __future__ import annotations

import collections
from pathlib import Path

from mlx_ft import runs
from mlx_ft.errors import EvalError
from mlx_ft.files import read_json
from mlx_ft.targets import run_targets

FORMAT = "mlxft-eval/1"


def summarize(results: list[dict]) -> dict:
    """Mean rubric score, strict pass rate and failure codes: overall and per category."""
    def block(rows: list[dict]) -> dict:
        n = len(rows)
        return {"n": n, "score": round(sum(r["value"] for r in rows) / n, 4) if n else None,
                "pass_rate": round(sum(r["passed"] for r in rows) / n, 4) if n else None,
                "codes": dict(collections.Counter(r["code"] for r in rows).most_common())}

    cats: dict[str, list[dict]] = collections.defaultdict(list)
    for r in results:
        cats[r["category"]].append(r)
    return {**block(results), "categories": {c: block(rows) for c, rows in cats.items()}}


def prompt_row(prompt, reply, score) -> dict:
    """One scored prompt as stored in the result file."""
    return {"id": prompt.id, "category": prompt.category, "text": reply.text, "finish_reason": reply.finish_reason,
            "value": score.value, "passed": score.passed, "code": score.code, "explanation": score.explanation,
            "extracted": score.extracted, "completion_tokens": reply.completion_tokens,
            "prompt_tokens": reply.prompt_tokens, "latency_s": round(reply.latency_s, 3)}


def suite_digest(record: dict) -> str | None:
    """The suite digest a result was written for (files before the rename call it fingerprint)."""
    s = record.get("suite", {})
    return s.get("digest", s.get("fingerprint"))


def same_weights(record: dict, identity: dict) -> bool:
    """Whether a result (or partial row) was written for the weights ``identity`` names. Results
    from before identities were recorded carry none: they can't be trusted and are redone."""
    return record.get("identity") == identity


def load_results(run_dir: str | Path, suite_name: str) -> dict[str, dict]:
    """Complete eval results of a run for one suite, by target name. Raises if any is missing."""
    found, missing = {}, []
    for t in run_targets(run_dir):
        path = runs.result_path(t.out_dir, suite_name)
        if path.is_file():
            found[t.name] = read_json(path)
        else:
            missing.append(t.name)
    if missing:
        raise EvalError(f"{run_dir}: no {suite_name} eval for {', '.join(missing)}; run "
                        f"`mlxft eval --run {run_dir} --prompts <suite>` (or pass --eval-missing)")
    return found
