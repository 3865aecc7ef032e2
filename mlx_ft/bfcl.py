"""BFCL suites (``--suite bfcl:simple_python``) and an AST checker with BFCL's semantics.

The Berkeley Function Calling Leaderboard's data ships in the PyPI wheel ``bfcl-eval``
(``pip install --no-deps bfcl-eval``: only its data is read, none of its code is imported).
A narrow fine-tune can win the user's own suite and lose general tool calling; pick-best's
``--guard`` uses these suites to refuse such a checkpoint.

Rendering: the functions are offered in the system prompt as JSON schemas (documented here and in
the README; SmolLM2's chat template has no ``tools`` support), and the model is asked to answer with
one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` per call, or plain text when no
function fits. Checking follows BFCL's AST checker: function name, required parameters present, no
unknown parameters, types (int accepted for float), values among the possible answers ("" in the
list: the parameter may be omitted), strings compared without case, spaces or ,./-_*^ punctuation,
parallel calls matched in any order; for irrelevance, no call is a pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_ft.errors import UserError
from mlx_ft.scoring import Call, Score, extract_calls
from mlx_ft.suite import Generation, Rubric, Suite

CODES = ("ok", "prose", "truncated", "bad_json", "wrong_tool", "missing_arg", "unknown_arg", "wrong_type",
         "wrong_arg_value", "wrong_count", "irrelevant_call", "server_error")
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "live_simple")
INSTALL = "pip install --no-deps bfcl-eval"
SYSTEM = (
    "You can call these functions (JSON schemas):\n{functions}\n"
    'To call a function answer only with <tool_call>{{"name": NAME, "arguments": {{...}}}}</tool_call>, '
    "one block per call. If no function fits the request, answer in plain text without any call."
)
TYPES = {"integer": (int,), "float": (int, float), "number": (int, float), "string": (str,), "boolean": (bool,),
         "array": (list,), "tuple": (list,), "dict": (dict,), "object": (dict,), "any": (object,)}


@dataclass(frozen=True)
class BfclPrompt:
    id: str
    category: str
    user: str  # the last user message, for tables
    messages: tuple  # the question's turns
    functions: tuple  # JSON schemas offered
    answers: tuple  # ground truth: ({name: {param: [accepted values]}}, ...); () for irrelevance


def data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"BFCL suites need the data of the bfcl-eval wheel; install it with: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def suite_name(spec: str) -> str:
    """'bfcl:simple_python,irrelevance' -> 'bfcl_simple_python+irrelevance' (the results file name)."""
    return spec.replace(":", "_").replace(",", "+")


def load_bfcl(spec: str, limit: int | None = None, root: Path | None = None) -> Suite:
    """Suite for 'bfcl:CAT[,CAT...]'; ``limit`` takes a deterministic sample split evenly over categories."""
    cats = [c.strip() for c in spec.split(":", 1)[1].split(",") if c.strip()] if ":" in spec else []
    bad = [c for c in cats if c not in CATEGORIES]
    if not cats or bad:
        raise UserError(f"--suite {spec!r}: use bfcl:CATEGORY[,CATEGORY...] with categories from "
                        f"{', '.join(CATEGORIES)}")
    if limit is not None and limit < len(cats):
        raise UserError(f"--limit {limit}: must be at least the number of categories ({len(cats)})")
    root = root or data_dir()
    prompts = []
    for i, cat in enumerate(cats):
        rows = _read_jsonl(root / f"BFCL_v4_{cat}.json")
        answers = {}
        answer_file = root / "possible_answer" / f"BFCL_v4_{cat}.json"
        if answer_file.exists():
            answers = {r["id"]: r["ground_truth"] for r in _read_jsonl(answer_file)}
        if limit is not None:
            share = limit // len(cats) + (1 if i < limit % len(cats) else 0)
            rows = sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())[:share]
            rows = sorted(rows, key=lambda r: _natural(r["id"]))
        for r in rows:
            turns = r["question"][0]
            prompts.append(BfclPrompt(r["id"], cat, turns[-1]["content"], tuple(turns), tuple(r["function"]),
                                      tuple(answers.get(r["id"], ()))))
    return Suite(name=suite_name(spec), format="bfcl/v4", system_prompt=SYSTEM, tools=(), prompts=tuple(prompts),
                 generation=Generation(max_tokens=160), rubric=Rubric(wrapper=None), path=spec, kind="bfcl")


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def messages(prompt: BfclPrompt) -> list[dict]:
    functions = "\n".join(json.dumps(f) for f in prompt.functions)
    return [{"role": "system", "content": SYSTEM.format(functions=functions)}, *prompt.messages]


# ------------------------------------------------------------------ checker (pure functions)


def _std(v: Any) -> Any:
    if isinstance(v, str):
        return re.sub(r"[ ,./\-_*^]", "", v).lower()
    if isinstance(v, list):
        return [_std(x) for x in v]
    if isinstance(v, dict):
        return {k: _std(x) for k, x in v.items()}
    return v


def _type_ok(value: Any, schema_type: str) -> bool:
    allowed = TYPES.get(schema_type, (object,))
    if isinstance(value, bool) and bool not in allowed and object not in allowed:
        return False
    return isinstance(value, allowed)


def _value_ok(value: Any, accepted: list) -> bool:
    if isinstance(value, float) and value.is_integer():
        candidates = [value, int(value)]
    else:
        candidates = [value]
    acc = [_std(a) for a in accepted if a != ""]
    return any(_std(c) in acc or (isinstance(c, (int, float)) and not isinstance(c, bool) and
                                  any(isinstance(a, (int, float)) and a == c for a in acc)) for c in candidates)


def check_call(call: Call, expected: dict, functions: tuple) -> tuple[str, str] | None:
    """None if ``call`` matches one ground-truth entry {name: {param: accepted}}, else (code, why)."""
    (name, params), = expected.items()
    if call.name != name:
        return "wrong_tool", f"called {call.name}; expected {name}"
    schema = next((f for f in functions if f["name"] == name), {}).get("parameters", {})
    props = schema.get("properties", {})
    for p in schema.get("required", []):
        if p not in call.args:
            return "missing_arg", f"{name} is missing required parameter {p!r}"
    for p, v in call.args.items():
        if p not in props:
            return "unknown_arg", f"{name} has no parameter {p!r}"
        if not _type_ok(v, props[p].get("type", "any")):
            return "wrong_type", f"{name}({p}={v!r}) is not of type {props[p].get('type')}"
        if p in params and not _value_ok(v, params[p]):
            return "wrong_arg_value", f"{name}({p}={v!r}) not among accepted {params[p]}"
    for p, accepted in params.items():
        if p not in call.args and "" not in accepted:
            return "missing_arg", f"{name} is missing parameter {p!r}"
    return None


def _match(calls: list[Call], expected: list[dict], functions: tuple) -> tuple[str, str] | None:
    """Order-free perfect matching of calls to expected entries (backtracking; n is small)."""
    if len(calls) != len(expected):
        return "wrong_count", f"{len(calls)} call(s); expected {len(expected)}"
    first_problem: list = []

    def solve(i: int, used: frozenset) -> bool:
        if i == len(calls):
            return True
        for j, exp in enumerate(expected):
            if j in used:
                continue
            bad = check_call(calls[i], exp, functions)
            if bad is None and solve(i + 1, used | {j}):
                return True
            if bad and not first_problem:
                first_problem.append(bad)
        return False

    if solve(0, frozenset()):
        return None
    return first_problem[0] if first_problem else ("wrong_tool", "no assignment of calls to expected calls")


def score(prompt: BfclPrompt, text: str | None, finish_reason: str | None = None, error: str | None = None) -> Score:
    if text is None or error:
        return Score(0.0, False, "server_error", f"request failed: {error or 'no text'}")
    calls, _spans, problem = extract_calls(text)
    extracted = {"calls": [{"name": c.name, "args": c.args} for c in calls]} if calls else None
    if prompt.category == "irrelevance":
        if calls:
            return Score(0.0, False, "irrelevant_call", f"called {calls[0].name} though no function fits", extracted)
        return Score(1.0, True, "ok", "no call, as none of the functions fits")
    if not calls:
        if finish_reason == "length":
            return Score(0.0, False, "truncated", "hit max_tokens before a complete call")
        if problem:
            return Score(0.0, False, "bad_json", problem)
        return Score(0.0, False, "prose", "no function call")
    bad = _match(calls, list(prompt.answers), prompt.functions)
    if bad:
        return Score(0.0, False, bad[0], bad[1], extracted)
    return Score(1.0, True, "ok", f"{len(calls)} call(s) match the possible answers", extracted)
