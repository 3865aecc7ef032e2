"""BFCL suites (``--suite bfcl:simple_python``) and an AST checker with BFCL's own semantics.

The Berkeley Function Calling Leaderboard's data ships in the PyPI wheel ``bfcl-eval``
(``pip install --no-deps bfcl-eval``: only its data is read, none of its code is imported).
A narrow fine-tune can win the user's own suite and lose general tool calling; pick-best's
``--guard`` uses these suites to refuse such a checkpoint.

Rendering (``tool_render`` in every result): through the chat template's ``tools`` when the
template renders them (``bind(tokenizer)``), answers then read by the model's own parser; else the
functions are written into the system prompt as JSON schemas and the model is asked for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` per call (read as JSON).
Checking is a port of BFCL's ``ast_checker`` for Python (tests/test_bfcl_exact.py measures the
agreement on every item of five categories): function name, required parameters present, no
parameter outside the schema or the possible answers, exact types (int accepted for float; a value
of the possible answers' type counts as a variable), strings compared without case, spaces or
,./-_*^ punctuation, dicts and lists of dicts key by key, parallel calls matched in any order.
For irrelevance, no call is a pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_ft.errors import UserError
from mlx_ft.parsers import Call, Parser, get_parser
from mlx_ft.scoring import Rubric, Score, no_call
from mlx_ft.suite import Generation
from mlx_ft.task import Task, digest, openai_tools

CODES = ("ok", "prose", "truncated", "bad_json", "bad_format", "wrong_tool", "missing_arg", "unknown_arg",
         "wrong_type", "wrong_arg_value", "wrong_count", "irrelevant_call", "server_error")
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "live_simple")
INSTALL = "pip install --no-deps bfcl-eval"
SYSTEM = (
    "You can call these functions (JSON schemas):\n{functions}\n"
    'To call a function answer only with <tool_call>{{"name": NAME, "arguments": {{...}}}}</tool_call>, '
    "one block per call. If no function fits the request, answer in plain text without any call."
)
PY_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
            "dict": dict, "any": str}
JSON = get_parser("json")


@dataclass(frozen=True)
class BfclPrompt:
    id: str
    category: str
    user: str  # the last user message, for tables
    messages: tuple  # the question's turns
    functions: tuple  # JSON schemas offered
    answers: tuple  # ground truth: ({name: {param: [accepted values]}}, ...); () for irrelevance


@dataclass(frozen=True)
class BfclSuite(Task):
    name: str
    prompts: tuple[BfclPrompt, ...]
    path: str = ""
    generation: Generation = field(default_factory=lambda: Generation(max_tokens=160))
    tool_render: str = "system_prompt"  # "template" after bind() with a template that renders tools
    format: str = "bfcl/v4"
    system_prompt: str = SYSTEM

    @property
    def tool_format(self) -> str:
        """The model's own format when the template shows the tools; JSON when our system prompt asks for it."""
        return "auto" if self.tool_render == "template" else "json"

    def digest(self) -> str:
        blob = {"kind": "bfcl", "system": SYSTEM, "gen": asdict(self.generation),
                "rubric": asdict(Rubric(wrapper=None)), "prompts": [asdict(p) for p in self.prompts]}
        if self.tool_render != "system_prompt":
            blob["render"] = self.tool_render
        return digest(blob)

    def messages(self, prompt: BfclPrompt) -> list[dict]:
        if self.tool_render == "template":
            return [dict(m) for m in prompt.messages]
        return messages(prompt)

    def tools(self, prompt: BfclPrompt) -> list[dict] | None:
        return openai_tools(prompt.functions) if self.tool_render == "template" else None

    def score(self, prompt: BfclPrompt, text: str | None, finish_reason: str | None, error: str | None,
              parser: Parser) -> Score:
        return score(prompt, text, finish_reason, error, parser, self.generation.max_tokens)


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


def load_bfcl(spec: str, limit: int | None = None, root: Path | None = None) -> BfclSuite:
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
    return BfclSuite(name=suite_name(spec), prompts=tuple(prompts), path=spec)


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def messages(prompt: BfclPrompt) -> list[dict]:
    """The system-prompt rendering: the functions as JSON lines, the answer format spelled out."""
    functions = "\n".join(json.dumps(f) for f in prompt.functions)
    return [{"role": "system", "content": SYSTEM.format(functions=functions)}, *prompt.messages]


# ------------------------------------------------------------------ checker: BFCL's ast_checker, Python


def _std(s: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _answer_type(accepted: list) -> type | None:
    return next((type(a) for a in accepted if a != ""), None)


def _type_check(param: str, value: Any, accepted: list, tname: str, tp: type, inner: type | None):
    """(problem or None, is_variable), as BFCL's type_checker (nested lists checked one level deep)."""
    atype = _answer_type(accepted)
    is_var = atype is not None and atype != tp
    bad = ("wrong_type", f"{param}={value!r} is not of type {tname}")
    if type(value) == tp:
        if inner is None:
            return None, is_var
        for option in accepted:
            if type(option) != list or all(
                    _type_check(param, v, option, str(inner), inner, None)[0] is None for v in value):
                return None, is_var
        return bad, is_var
    if atype is not None and type(value) == atype:
        return None, True
    return bad, is_var


def _dict_ok(value: dict, options: list) -> bool:
    for option in options:
        if option == "":
            continue
        if not isinstance(option, dict):
            continue
        ok = all(k in option and (_std(v) if type(v) == str else v) in
                 [_std(a) if type(a) == str else a for a in option[k]] for k, v in value.items())
        if ok and all(k in value or "" in acc for k, acc in option.items()):
            return True
    return False


def _list_dict_ok(value: list, options: list) -> bool:
    return any((isinstance(o, list) or o == "") and len(o) == len(value) and all(_dict_ok(v, [d]) for v, d in zip(value, o))
               for o in options)


def _value_problem(param: str, value: Any, accepted: list, tp: type, inner: type | None) -> tuple[str, str] | None:
    bad = ("wrong_arg_value", f"{param}={value!r} not among accepted {accepted}")
    if tp is dict:
        return None if _dict_ok(value, accepted) else bad
    if tp is list and inner is dict:
        return None if _list_dict_ok(value, accepted) else bad
    if tp is str:
        return None if _std(value) in [_std(a) for a in accepted if type(a) == str] else bad
    if tp is list:
        got = [_std(v) if type(v) == str else v for v in value]
        opts = [[_std(a) if type(a) == str else a for a in o] for o in accepted if isinstance(o, list) or o == ""]
        return None if got in opts else bad
    return None if value in accepted else bad


def check_call(call: Call, expected: dict, functions: tuple) -> tuple[str, str] | None:
    """None if ``call`` matches one ground-truth entry {name: {param: accepted}}, else (code, why)."""
    (name, answers), = expected.items()
    if call.name != name:
        return "wrong_tool", f"called {call.name}; expected {name}"
    schema = next((f for f in functions if f.get("name") == name), {}).get("parameters", {})
    props = schema.get("properties", {})
    for p in schema.get("required", []):
        if p not in call.args:
            return "missing_arg", f"{name} is missing required parameter {p!r}"
    for p, value in call.args.items():
        if p not in props or p not in answers:
            return "unknown_arg", f"{name}({p}=...) is not expected: not in the schema or the possible answers"
        tname = props[p].get("type", "any")
        tp = PY_TYPES.get(tname, str)
        inner = PY_TYPES.get(props[p].get("items", {}).get("type", "any"), str) if tname in ("array", "tuple") else None
        if tname == "float" and type(value) == int:
            value = float(value)
        bad, is_var = _type_check(p, value, answers[p], tname, tp, inner)
        if bad:
            return bad[0], f"{name}({bad[1]})"
        if not is_var and tp in (dict, str, list):
            bad = _value_problem(p, value, answers[p], tp, inner)
            if bad:
                return bad[0], f"{name}({bad[1]})"
        elif value not in answers[p]:
            return "wrong_arg_value", f"{name}({p}={value!r}) not among accepted {answers[p]}"
    for p, accepted in answers.items():
        if p not in call.args and "" not in accepted:
            return "missing_arg", f"{name} is missing parameter {p!r}"
    return None


def check(calls: list[Call], answers: list[dict], functions: tuple, category: str) -> tuple[str, str] | None:
    """BFCL's verdict for a whole answer: count, then simple / multiple (first call) / parallel (any order)."""
    if len(calls) != len(answers):
        return "wrong_count", f"{len(calls)} call(s); expected {len(answers)}"
    if "parallel" not in category:
        return check_call(calls[0], answers[0], functions)
    used: set[int] = set()
    for exp in answers:
        problem = None
        for j, c in enumerate(calls):
            if j in used:
                continue
            problem = check_call(c, exp, functions)
            if problem is None:
                used.add(j)
                break
        if problem is not None:
            return problem
    return None


def score(prompt: BfclPrompt, text: str | None, finish_reason: str | None = None, error: str | None = None,
          parser: Parser | None = None, max_tokens: int = 160) -> Score:
    if text is None or error:
        return Score(0.0, False, "server_error", f"request failed: {error or 'no text'}")
    parser = parser or JSON
    found = parser.extract(text, openai_tools(prompt.functions))
    extra = {"parser": found.via or parser.name}
    calls = found.calls
    extracted = {"calls": [{"name": c.name, "args": c.args} for c in calls]} if calls else None
    if prompt.category == "irrelevance":
        if calls:
            return Score(0.0, False, "irrelevant_call", f"called {calls[0].name} though no function fits", extracted,
                         extra)
        return Score(1.0, True, "ok", "no call, as none of the functions fits", extra=extra)
    if not calls:
        s = no_call(0.0, text, found, finish_reason, max_tokens)
        return dataclasses.replace(s, extra=extra)
    bad = check(calls, list(prompt.answers), prompt.functions, prompt.category)
    if bad:
        return Score(0.0, False, bad[0], bad[1], extracted, extra)
    return Score(1.0, True, "ok", f"{len(calls)} call(s) match the possible answers", extracted, extra)
