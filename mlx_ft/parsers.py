"""Tool-call parsers: find the calls in a model's raw text, in the format the model was trained on.

Each model family writes its calls its own way (Qwen3-Coder's ``<function=NAME><parameter=ARG>``
XML, Hermes-style ``<tool_call>{json}</tool_call>``, Llama 3's ``{"name", "parameters"}``, pythonic
lists ``[f(a=1)]``). mlx-lm already ships one parser per family and picks one per tokenizer; we wrap
those (never rewrite them) and choose the same way mlx-lm does: ``tokenizer_config.json``'s
``tool_parser_type``, else inferred from the chat template. mlxft adds what mlx-lm has no parser for
(Llama 3 JSON, bare pythonic lists) and its own JSON scanner, which is also the fallback of every
parser. Extraction never raises: whatever a model emits, the answer is calls, spans and at most one
problem, which the scorer turns into exactly one failure code.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, NamedTuple

from mlx_ft.errors import UserError

THINK = "<think>"
MLXFT_FORMATS = ("json", "llama3_json", "pythonic")
# Signs of a call written outside its wrapper (e.g. Qwen3-Coder's <function=...> without <tool_call>).
INNER_MARKERS = {"qwen3_coder": "<function=", "glm47": "<arg_key>", "laguna": "<arg_key>",
                 "minimax_m2": "<invoke name=", "longcat": "<arg_key>"}
_BUDGET = 4_000_000  # characters a scanner may spend on text that fails to parse (megabyte answers stay linear)


@dataclass(frozen=True)
class Call:
    name: str
    args: dict
    wrapped: bool = False  # found inside the rubric's wrapper code string


class Extraction(NamedTuple):
    calls: list[Call]
    spans: list[tuple[int, int]]  # the text each call occupies, for the extra-text check
    problem: str | None = None  # why call-like text yielded no call
    problem_code: str | None = None  # "bad_json" (does not parse) or "bad_format" (wrong shape for the format)
    via: str = ""  # the parser that found the calls (a parser's name, or "json" when the fallback did)


@dataclass(frozen=True)
class Parser:
    """A named extractor; ``name`` is recorded in every result file, ``think`` is the model's think marker."""

    name: str
    find: Callable[[str, Any], Extraction]
    think: str = THINK

    def extract(self, text: str, tools: list[dict] | None = None) -> Extraction:
        """Calls in ``text`` (``tools``: OpenAI schemas, used by parsers that type their values)."""
        first = _safe(self.find, text, tools, self.name)
        if first.calls or self.name == "json":
            return first._replace(via=self.name)
        fallback = _json_fallback(text)
        if fallback.calls:
            return fallback._replace(via="json")
        return first if first.problem else fallback


@lru_cache(maxsize=16)
def _json_fallback(text: str) -> Extraction:
    """The JSON scanner's reading of a text, kept for the few parsers that fall back on the same text."""
    return _safe(scan_json, text, None, "json")


def _safe(find: Callable, text: str, tools: Any, name: str) -> Extraction:
    try:
        return find(text, tools)
    except Exception as e:  # noqa: BLE001 - a parser bug must cost one answer, not the eval
        return Extraction([], [], f"the {name} parser failed on this text ({type(e).__name__})", "bad_json")


# ------------------------------------------------------------------ mlxft's JSON scanner

_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


_OBJECT = re.compile(r'\{\s*["}]')  # where a JSON object can start: '{' then a key or '}'
_DECODER = json.JSONDecoder()


def find_json_objects(text: str, budget: list[int] | None = None) -> list[tuple[int, int, Any]]:
    """Every top-level JSON object in ``text`` as (start, end, value); stops when ``budget`` runs out."""
    budget = budget if budget is not None else [_BUDGET]
    out, i = [], 0
    while budget[0] > 0 and (m := _OBJECT.search(text, i)):
        i = m.start()
        try:
            value, end = _DECODER.scan_once(text, i)
        except json.JSONDecodeError as e:
            budget[0] -= max(e.pos - i, 1)
            i += 1
            continue
        except (StopIteration, RecursionError, ValueError):
            budget[0] -= 10_000
            i += 1
            continue
        out.append((i, end, value))
        i = end
    return out


def as_call(value: Any) -> Call | None:
    """A JSON value shaped like a call: {"name", "arguments"|"parameters"} (also OpenAI's {"function": ...})."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict) and "name" not in value:
        value = value["function"]
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        return Call(value["name"], args if isinstance(args, dict) else {})
    return None


def scan_json(text: str, tools: Any = None) -> Extraction:
    """``<tool_call>{json}</tool_call>`` blocks, else bare JSON call objects anywhere in the text."""
    calls, spans, problem, budget = [], [], None, [_BUDGET]
    tags = list(_TAG.finditer(text))
    if tags:
        for m in tags:
            objs = find_json_objects(m.group(1), budget)
            call = as_call(objs[0][2]) if objs else None
            if call is None:
                problem = f"<tool_call> body is not a JSON call: {m.group(1)[:60]!r}"
                continue
            calls.append(call)
            spans.append(m.span())
        return Extraction(calls, spans, problem, "bad_json" if problem else None)
    for start, end, value in find_json_objects(text, budget):
        call = as_call(value)
        if call:
            calls.append(call)
            spans.append((start, end))
    if not calls and re.search(r'\{\s*"name"\s*:', text):
        problem = "a JSON call starts but does not parse"
    return Extraction(calls, spans, problem, "bad_json" if problem else None)


# ------------------------------------------------------------------ mlxft: Llama 3.x JSON

_PYTHON_TAG = "<|python_tag|>"


def scan_llama3_json(text: str, tools: Any = None) -> Extraction:
    """Llama 3.x custom tools: ``{"name": ..., "parameters": {...}}`` (``;``-separated), optional <|python_tag|>."""
    calls, spans = [], []
    for start, end, value in find_json_objects(text):
        if isinstance(value, dict) and isinstance(value.get("name"), str) and (
                "parameters" in value or "arguments" in value):
            call = as_call(value)
            if call is None:
                continue
            tag = text.rfind(_PYTHON_TAG, 0, start)
            if tag != -1 and not text[tag + len(_PYTHON_TAG):start].strip():
                start = tag
            calls.append(call)
            spans.append((start, end))
    if calls:
        return Extraction(calls, spans)
    if _PYTHON_TAG in text or re.search(r'\{\s*"name"\s*:', text):
        return Extraction([], [], "a Llama 3 JSON call starts but does not parse", "bad_json")
    return Extraction([], [])


# ------------------------------------------------------------------ pythonic lists (mlx-lm's parser per list)

_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")


def scan_pythonic(text: str, tools: Any = None) -> Extraction:
    """``[f(a=1), g(b="x")]``: LFM2's marked form via mlx-lm's pythonic parser, else bare lists in the text."""
    marked = scan_markers(text, tools, "pythonic")
    if marked.calls or marked.problem:
        return marked
    module = _mlx_module("pythonic")
    calls, spans, budget, pos, problem = [], [], _BUDGET, 0, None
    while budget > 0 and (m := _LIST_START.search(text, pos)):
        s, found, close = m.start(), None, m.end()
        for _ in range(32):
            close = text.find("]", close)
            if close == -1 or close - s > 65_536:
                break
            budget -= close - s
            try:
                node = ast.parse(text[s:close + 1], mode="eval").body
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                close += 1
                continue
            if isinstance(node, ast.List) and node.elts and all(isinstance(e, ast.Call) for e in node.elts):
                found = close + 1
            break
        if found is None:
            problem = problem or f"a pythonic call list starts but does not parse: {text[s:s + 60]!r}"
            pos = m.end()
            continue
        parsed = _to_calls(module.parse_tool_call(text[s:found], tools))
        if parsed is None:
            problem = problem or f"a pythonic call list is not keyword-only calls: {text[s:s + 60]!r}"
        else:
            calls.extend(parsed)
            spans.extend([(s, found)] * len(parsed))
        pos = found
    if calls:
        return Extraction(calls, spans)
    return Extraction([], [], problem, "bad_json" if problem else None)


# ------------------------------------------------------------------ mlx-lm's parsers, between their markers


@cache
def _mlx_module(name: str):
    return importlib.import_module(f"mlx_lm.tool_parsers.{name}")


@lru_cache(maxsize=1)
def mlx_lm_names() -> tuple[str, ...]:
    import mlx_lm.tool_parsers as pkg

    return tuple(sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")))


def _to_calls(parsed: Any) -> list[Call] | None:
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [as_call(p) for p in items]
    return None if not calls or any(c is None for c in calls) else calls


def scan_markers(text: str, tools: Any, name: str) -> Extraction:
    """Split the text at the module's tool_call_start/end markers (as mlx-lm's server does) and
    hand each body to the module's ``parse_tool_call``."""
    module = _mlx_module(name)
    start, end = module.tool_call_start, module.tool_call_end
    calls, spans, problem, code = [], [], None, None
    pos, n = 0, 0
    while (a := text.find(start, pos)) != -1 and n < 256:
        n += 1
        body_at = a + len(start)
        b = text.find(end, body_at) if end else -1
        nxt = text.find(start, body_at)
        if b == -1 or (nxt != -1 and nxt < b):
            stop = nxt if nxt != -1 else len(text)
            span_end = stop
        else:
            stop, span_end = b, b + len(end)
        body = text[body_at:stop]
        try:
            found = _to_calls(module.parse_tool_call(body.strip("\n"), tools))
        except Exception:  # noqa: BLE001 - mlx-lm's parsers raise ValueError, IndexError, ...
            found = None
        if found is None:
            problem = problem or f"a {start} block does not parse as a {name} call: {body[:60]!r}"
            code = "bad_json"
        else:
            calls.extend(found)
            spans.extend([(a, span_end)] * len(found))
        pos = span_end if span_end > a else a + 1
    outside = outside_spans(text, spans) if calls else text
    inner = INNER_MARKERS.get(name)
    if not calls and not problem:
        if inner and inner in outside:
            problem, code = f"{inner}... written without {start} around it", "bad_format"
        elif end and end in text:
            problem, code = f"{end} without a {start} before it", "bad_format"
    return Extraction(calls, spans, problem, code)


def outside_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` without the (possibly overlapping) ``spans``."""
    rest, last = [], 0
    for a, b in sorted(set(spans)):
        rest.append(text[last:a])
        last = max(last, b)
    rest.append(text[last:])
    return "".join(rest)


# ------------------------------------------------------------------ registry


def names() -> tuple[str, ...]:
    """Every value a suite's ``tool_format`` accepts."""
    return ("auto", *MLXFT_FORMATS, *(n for n in mlx_lm_names() if n not in MLXFT_FORMATS))


def get_parser(name: str, think: str | None = None) -> Parser:
    """The parser called ``name`` (mlxft's or mlx-lm's)."""
    think = think or THINK
    if name == "json":
        return Parser("json", scan_json, think)
    if name == "llama3_json":
        return Parser("llama3_json", scan_llama3_json, think)
    if name == "pythonic":
        return Parser("pythonic", scan_pythonic, think)
    if name in mlx_lm_names():
        return Parser(name, lambda text, tools: scan_markers(text, tools, name), think)
    raise UserError(f"tool_format {name!r} is not a known tool-call format; use one of {', '.join(names())}")


def tokenizer_format(tokenizer: Any) -> str:
    """The format mlx-lm chose for this tokenizer (tool_parser_type, else inferred from the chat
    template); mlxft's Llama 3 JSON when the template is Llama 3's; else ``json``."""
    if tokenizer is None:
        return "json"
    kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    chosen = kwargs.get("tool_parser_type") if isinstance(kwargs, dict) else None
    fn = getattr(tokenizer, "tool_parser", None)
    if not chosen and fn is not None:
        module = getattr(fn, "__module__", "") or ""
        chosen = module.rsplit(".", 1)[-1] if module.startswith("mlx_lm.tool_parsers.") else None
    if chosen:
        return chosen
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and ("<|python_tag|>" in template or '"parameters": dictionary' in template):
        return "llama3_json"
    return "json"


def resolve_parser(tokenizer: Any, forced: str | None = None) -> Parser:
    """The parser for a model: ``forced`` (a suite's ``tool_format``) unless it is None or "auto",
    else the tokenizer's own. ``tokenizer`` is an mlx-lm TokenizerWrapper, or None (JSON)."""
    think = getattr(tokenizer, "think_start", None) if tokenizer is not None else None
    name = forced if forced and forced != "auto" else tokenizer_format(tokenizer)
    return get_parser(name, think if isinstance(think, str) and think else None)
