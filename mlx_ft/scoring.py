"""Scoring: pure functions from (suite, prompt, raw model text) to a Score. No I/O here.

We parse the raw text ourselves and never trust the server's tool-call parser (mlx-lm drops calls
it cannot parse). Calls are found in ``<tool_call>`` tags or as bare JSON objects; a call to the
wrapper (``execute_code``) has its ``code`` string parsed with ``ast`` -- parsed, never executed.

Every result carries one failure code (``ok`` when it passed), so a table of codes says *how* a
checkpoint fails, not just how often (seed 004: prose vs direct calls vs think blocks).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_ft.suite import Prompt, Suite

CODES = (
    "ok",
    "think_onset",  # a <think> block began: the budget goes to reasoning, not to a call
    "truncated",  # hit max_tokens before a complete call
    "prose",  # text without any tool call
    "bad_json",  # something call-like that does not parse
    "wrong_tool",  # a call, but not to the expected tool
    "missing_arg",  # expected tool, a required argument absent
    "wrong_arg_value",  # expected tool, an argument value not among the accepted ones
    "unwrapped",  # expected tool called directly, without the rubric's wrapper
    "extra_text",  # a correct call with text around it
    "server_error",  # no text: the request itself failed
)


@dataclass(frozen=True)
class Call:
    name: str
    args: dict
    wrapped: bool = False  # found inside the wrapper's code string


@dataclass(frozen=True)
class Score:
    value: float  # rubric score
    passed: bool  # strict: right tool in the right format, required args present, values accepted
    code: str  # one of CODES
    explanation: str
    extracted: dict | None = None  # the call we judged, {"name", "args", "wrapped"}
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_THINK = re.compile(r"<think>", re.I)


def find_json_objects(text: str) -> list[tuple[int, int, Any]]:
    """Every top-level JSON object in ``text`` as (start, end, value)."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while (i := text.find("{", i)) != -1:
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        out.append((i, end, value))
        i = end
    return out


def _as_call(value: Any) -> Call | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return Call(value["name"], args if isinstance(args, dict) else {})
    return None


def extract_calls(text: str) -> tuple[list[Call], list[tuple[int, int]], str | None]:
    """(calls, spans of text they occupy, parse problem if something call-like did not parse)."""
    calls, spans, problem = [], [], None
    tags = list(_TAG.finditer(text))
    if tags:
        for m in tags:
            objs = find_json_objects(m.group(1))
            call = _as_call(objs[0][2]) if objs else None
            if call is None:
                problem = f"<tool_call> body is not a JSON call: {m.group(1)[:60]!r}"
                continue
            calls.append(call)
            spans.append(m.span())
        return calls, spans, problem
    for start, end, value in find_json_objects(text):
        call = _as_call(value)
        if call:
            calls.append(call)
            spans.append((start, end))
    if not calls and re.search(r'\{\s*"name"\s*:', text):
        problem = "a JSON call starts but does not parse"
    return calls, spans, problem


def parse_code_calls(code: str, params: dict[str, tuple[str, ...]]) -> list[Call]:
    """Calls in a Python code string, via ``ast`` (never executed). Positional args are named
    from the tool's parameter list; non-literal values are kept as their source text."""
    tree = ast.parse(code)
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if not name:
                continue
            names = params.get(name, ())
            args = {}
            for i, a in enumerate(node.args):
                args[names[i] if i < len(names) else f"_{i}"] = _literal(a)
            for kw in node.keywords:
                if kw.arg:
                    args[kw.arg] = _literal(kw.value)
            calls.append(Call(name, args, wrapped=True))
    return calls


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return ast.unparse(node)


def _norm(v: Any) -> Any:
    """Compare values as a user would: '7' == 7, surrounding quotes and spaces ignored."""
    if isinstance(v, str):
        v = v.strip().strip("'\"").strip()
        try:
            return float(v)
        except ValueError:
            return v
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def check_args(prompt: Prompt, call: Call) -> tuple[str, str] | None:
    for arg, accepted in prompt.expect.args.items():
        if arg not in call.args:
            return "missing_arg", f"{call.name} is missing required argument {arg!r}"
        if accepted and _norm(call.args[arg]) not in {_norm(a) for a in accepted}:
            return "wrong_arg_value", f"{call.name}({arg}={call.args[arg]!r}) not among accepted {accepted}"
    return None


def score(suite: Suite, prompt: Prompt, text: str | None, finish_reason: str | None = None,
          error: str | None = None) -> Score:
    """Judge one raw answer. ``finish_reason`` 'length' means the server hit max_tokens."""
    if suite.kind == "bfcl":
        from mlx_ft import bfcl

        return bfcl.score(prompt, text, finish_reason, error)
    r = suite.rubric
    if text is None or error:
        return Score(r.other, False, "server_error", f"request failed: {error or 'no text'}")
    calls, spans, problem = extract_calls(text)
    think = _THINK.search(text)
    if think and (not spans or think.start() < spans[0][0]):
        return Score(r.other, False, "think_onset", "a <think> block began before any tool call")
    if not calls:
        if finish_reason == "length":
            return Score(r.other, False, "truncated", f"hit max_tokens ({suite.generation.max_tokens}) before a complete call")
        if problem:
            return Score(r.other, False, "bad_json", problem)
        return Score(r.other, False, "prose", f"no tool call: {_excerpt(text)}")

    params = {t.name: t.params for t in suite.tools}
    expected = set(prompt.expect.tools)
    first = calls[0]
    if r.wrapper and first.name == r.wrapper:
        code = first.args.get("code")
        if not isinstance(code, str):
            return Score(r.other, False, "bad_json", f"{r.wrapper} call has no 'code' string", _ex(first))
        try:
            inner = parse_code_calls(code, params)
        except SyntaxError as e:
            return Score(r.other, False, "bad_json", f"{r.wrapper} code is not valid Python: {e.msg}", _ex(first))
        hit = next((c for c in inner if c.name in expected), None)
        if hit is None:
            named = [c.name for c in inner] or ["nothing"]
            return Score(r.other, False, "wrong_tool",
                         f"{r.wrapper} calls {', '.join(named)}; expected {prompt.expect.tool}", _ex(first))
        call, value, level = hit, r.wrapped, "wrapped"
    elif first.name in expected:
        call, value, level = first, (r.direct if r.wrapper else r.wrapped), "direct"
    else:
        return Score(r.other, False, "wrong_tool", f"called {first.name}; expected {prompt.expect.tool}", _ex(first))

    bad = check_args(prompt, call)
    if bad:
        return Score(value, False, bad[0], bad[1], _ex(call))
    if level == "direct" and r.wrapper:
        return Score(value, False, "unwrapped", f"{call.name} called directly, not inside {r.wrapper}", _ex(call))
    outside = _outside(text, spans[:1])
    if outside:
        return Score(value, False, "extra_text", f"correct call with extra text: {_excerpt(outside)}", _ex(call))
    return Score(value, True, "ok", f"{call.name} called correctly" + (f" inside {r.wrapper}" if level == "wrapped" else ""),
                 _ex(call))


def _outside(text: str, spans: list[tuple[int, int]]) -> str:
    rest, last = [], 0
    for a, b in spans:
        rest.append(text[last:a])
        last = b
    rest.append(text[last:])
    return "".join(rest).strip()


def _ex(call: Call) -> dict:
    return {"name": call.name, "args": call.args, "wrapped": call.wrapped}


def _excerpt(text: str, n: int = 70) -> str:
    one = " ".join(text.split())
    return repr(one[:n] + ("..." if len(one) > n else ""))
