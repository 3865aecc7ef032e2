"""Scoring: pure functions from (task, prompt, raw model text) to a Score. No I/O here.

We parse the raw text ourselves and never trust the server's tool-call parser (mlx-lm drops calls
it cannot parse). Calls are found by the model's own format (``mlx_ft.parsers``; JSON when none is
given); a call to the rubric's wrapper (``execute_code``) has its ``code`` string parsed with
``ast`` -- parsed, never executed.

Every result carries exactly one failure code (``ok`` when it passed), so a table of codes says
*how* a checkpoint fails, not just how often: prose, direct calls, think blocks, a format the
parser does not accept.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_ft import parsers
from mlx_ft.parsers import Call, Extraction, Parser, find_json_objects, get_parser, scan_json

__all__ = [
    "CODES",
    "Call",
    "Expect",
    "Rubric",
    "Score",
    "check_args",
    "extract_calls",
    "find_json_objects",
    "judge",
    "parse_code_calls",
    "score",
]

CODES = (
    "ok",
    "think_onset",  # a think block began: the budget goes to reasoning, not to a call
    "truncated",  # hit max_tokens before a complete call
    "prose",  # text without any tool call
    "bad_json",  # something call-like that does not parse (JSON, XML or pythonic)
    "bad_format",  # a call in a shape the model's format does not allow, e.g. <function=...> without <tool_call>
    "wrong_tool",  # a call, but not to the expected tool
    "missing_arg",  # expected tool, a required argument absent
    "wrong_arg_value",  # expected tool, an argument value not among the accepted ones
    "unwrapped",  # expected tool called directly, without the rubric's wrapper
    "extra_text",  # a correct call with text (or another call) around it
    "server_error",  # no text: the request itself failed
)
JSON = get_parser("json")


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


@dataclass(frozen=True)
class Rubric:
    """Score for each level of the rubric; the wrapper's name is a setting, not code."""

    wrapper: str | None = "execute_code"
    wrapped: float = 1.0  # the expected tool called inside the wrapper's code
    direct: float = 0.5  # the expected tool called directly, without the wrapper
    other: float = 0.0  # prose, no call, wrong tool, broken call

    def check(self) -> list[str]:
        p = []
        for k in ("wrapped", "direct", "other"):
            v = getattr(self, k)
            if not 0 <= v <= 1:
                p.append(f"{k}: must be between 0 and 1, got {v}")
        if not self.other <= self.direct <= self.wrapped:
            p.append(f"weights must satisfy other <= direct <= wrapped, got {self.other}, {self.direct}, {self.wrapped}")
        return p


@dataclass(frozen=True)
class Expect:
    tool: str
    alternatives: tuple[str, ...] = ()
    # argument -> accepted values (an empty list accepts any value; the key being present is what counts)
    args: dict = field(default_factory=dict)

    def check(self) -> list[str]:
        p = []
        for k, v in self.args.items():
            if not isinstance(v, list):
                p.append(f"args.{k}: expected a list of accepted values (or []), got {v!r}")
        return p

    @property
    def tools(self) -> tuple[str, ...]:
        return (self.tool, *self.alternatives)


def score(suite: Any, prompt: Any, text: str | None, finish_reason: str | None = None, error: str | None = None,
          parser: Parser | None = None) -> Score:
    """Judge one raw answer with the suite's own scorer. ``finish_reason`` 'length' means the server
    hit max_tokens; ``parser`` is the model's (``parsers.resolve_parser``), None for JSON."""
    return suite.score(prompt, text, finish_reason, error, parser or JSON)


def extract_calls(text: str) -> tuple[list[Call], list[tuple[int, int]], str | None]:
    """(calls, spans, parse problem) by mlxft's JSON scanner: ``<tool_call>{json}`` or bare JSON."""
    found = scan_json(text)
    return found.calls, found.spans, found.problem


def no_call(other: float, text: str, found: Extraction, finish_reason: str | None, max_tokens: int) -> Score:
    """The code of an answer in which no call was found (one place, so every task agrees)."""
    if finish_reason == "length":
        return Score(other, False, "truncated", f"hit max_tokens ({max_tokens}) before a complete call")
    if found.problem:
        return Score(other, False, found.problem_code or "bad_json", found.problem)
    return Score(other, False, "prose", f"no tool call: {_excerpt(text)}")


def think_first(text: str, found: Extraction, think: str) -> bool:
    m = re.search(re.escape(think), text, re.IGNORECASE) if think else None
    return bool(m) and (not found.spans or m.start() < found.spans[0][0])


def judge(rubric: Rubric, params: dict[str, tuple[str, ...]], expect: Expect, text: str | None,
          finish_reason: str | None, error: str | None, parser: Parser, max_tokens: int,
          tools: list[dict] | None = None) -> Score:
    """The tool-suite rubric (wrapped / direct / other) applied to the calls ``parser`` finds."""
    r = rubric
    if text is None or error:
        return Score(r.other, False, "server_error", f"request failed: {error or 'no text'}")
    found = parser.extract(text, tools)
    extra = {"parser": found.via or parser.name}
    if think_first(text, found, parser.think):
        return Score(r.other, False, "think_onset", f"a {parser.think} block began before any tool call", extra=extra)
    if not found.calls:
        return _with(no_call(r.other, text, found, finish_reason, max_tokens), extra)

    first = found.calls[0]
    expected = set(expect.tools)
    if r.wrapper and first.name == r.wrapper:
        code = first.args.get("code")
        if not isinstance(code, str):
            return Score(r.other, False, "bad_json", f"{r.wrapper} call has no 'code' string", _ex(first), extra)
        try:
            inner = parse_code_calls(code, params)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            why = e.msg if isinstance(e, SyntaxError) else type(e).__name__
            return Score(r.other, False, "bad_json", f"{r.wrapper} code is not valid Python: {why}", _ex(first), extra)
        hit = next((c for c in inner if c.name in expected), None)
        if hit is None:
            named = [c.name for c in inner] or ["nothing"]
            return Score(r.other, False, "wrong_tool",
                         f"{r.wrapper} calls {', '.join(named)}; expected {expect.tool}", _ex(first), extra)
        call, value, level = hit, r.wrapped, "wrapped"
    elif first.name in expected:
        call, value, level = first, (r.direct if r.wrapper else r.wrapped), "direct"
    else:
        return Score(r.other, False, "wrong_tool", f"called {first.name}; expected {expect.tool}", _ex(first), extra)

    bad = check_args(expect, call)
    if bad:
        return Score(value, False, bad[0], bad[1], _ex(call), extra)
    if level == "direct" and r.wrapper:
        return Score(value, False, "unwrapped", f"{call.name} called directly, not inside {r.wrapper}", _ex(call), extra)
    outside = outside_spans(text, found.spans[:1])
    if outside:
        return Score(value, False, "extra_text", f"correct call with extra text: {_excerpt(outside)}", _ex(call), extra)
    return Score(value, True, "ok", f"{call.name} called correctly" + (f" inside {r.wrapper}" if level == "wrapped" else ""),
                 _ex(call), extra)


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
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        try:
            return ast.unparse(node)
        except RecursionError:
            return "<expression>"


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
    if isinstance(v, (list, dict)):
        return repr(v)  # hashable, so it can be compared with the accepted values
    return v


def check_args(expect: Any, call: Call) -> tuple[str, str] | None:
    """(code, why) for the first required argument missing or not accepted; ``expect`` may be a prompt."""
    expect = getattr(expect, "expect", expect)
    for arg, accepted in expect.args.items():
        if arg not in call.args:
            return "missing_arg", f"{call.name} is missing required argument {arg!r}"
        if accepted and _norm(call.args[arg]) not in {_norm(a) for a in accepted}:
            return "wrong_arg_value", f"{call.name}({arg}={call.args[arg]!r}) not among accepted {accepted}"
    return None


def outside_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """The text around the calls, stripped: what counts as extra text."""
    return parsers.outside_spans(text, spans).strip()


def _with(s: Score, extra: dict) -> Score:
    return Score(s.value, s.passed, s.code, s.explanation, s.extracted, {**s.extra, **extra})


def _ex(call: Call) -> dict:
    return {"name": call.name, "args": call.args, "wrapped": call.wrapped}


def _excerpt(text: str, n: int = 70) -> str:
    one = " ".join(text.split())
    return repr(one[:n] + ("..." if len(one) > n else ""))
