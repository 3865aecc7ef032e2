"""Training data: chat JSONL as mlx-lm reads it, validated before a single step is spent.

Every problem of a file is reported at once with its line number. Length checks matter because
mlx-lm keeps only the head of a long example: the tail -- exactly the tool call we train on -- is
dropped with a one-line warning, and when the prompt alone fills ``max_seq_length`` the loss is NaN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_ft.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SPLITS = ("train", "valid")


def split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.jsonl"


def load_chat_jsonl(path: str | Path) -> list[dict]:
    """Read and validate one chat JSONL file; raise DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"file not found; expected {path.name} with one chat example per line")
    problems: list[str] = []
    rows: list[dict] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        problems.extend(f"line {n}: {p}" for p in check_example(row))
        rows.append(row)
    if not rows and not problems:
        problems.append("the file has no examples; add lines like "
                        '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}')
    if problems:
        raise DataError(path, problems)
    return rows


def check_example(row: Any) -> list[str]:
    """Structure problems of one row, for every shape mlx-lm's ChatDataset takes: plain chats,
    assistant ``tool_calls`` without ``content``, ``tool`` results, multi-turn, a ``tools`` list."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    extra = sorted(set(row) - {"messages", "tools"})
    if extra:
        return [f"unknown key(s) {extra}; a chat example has 'messages' (and optionally 'tools')"]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list of {role, content} objects"]
    problems = _check_tools(row.get("tools"))
    for i, m in enumerate(messages):
        problems.extend(_check_message(i, m))
    if problems:
        return problems
    last = messages[-1]
    if last["role"] != "assistant":
        problems.append("the last message must be the assistant's answer (the training target)")
    elif not text_of(last.get("content")).strip() and not last.get("tool_calls"):
        problems.append("the assistant answer is empty; there is nothing to learn from it")
    if not any(m["role"] == "user" for m in messages):
        problems.append("no user message")
    if any(m["role"] == "system" for m in messages[1:]):
        problems.append("a system message may only come first")
    return problems


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def _check_tools(tools: Any) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return [("'tools' must be a list of function schemas "
                '({"type": "function", "function": {"name": ..., "parameters": {...}}})')]
    bad = [i for i, t in enumerate(tools) if not isinstance((t.get("function") or t).get("name"), str)]
    return [f"tools[{i}] has no function name" for i in bad]


def _check_message(i: int, m: Any) -> list[str]:
    if not isinstance(m, dict):
        return [f"messages[{i}] is not an object"]
    role, content, calls = m.get("role"), m.get("content"), m.get("tool_calls")
    if role not in ROLES:
        return [f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}"]
    problems = []
    if calls is not None and role != "assistant":
        problems.append(f"messages[{i}].tool_calls: only an assistant message makes tool calls")
    if role == "assistant" and calls is not None:
        if content is not None and not isinstance(content, (str, list)):
            problems.append(f"messages[{i}].content must be a string (or absent, next to tool_calls)")
        problems.extend(_check_calls(i, calls))
    elif not isinstance(content, (str, list)):
        problems.append(f"messages[{i}].content must be a string")
    return problems


def _check_calls(i: int, calls: Any) -> list[str]:
    if not isinstance(calls, list) or not calls:
        return [(f"messages[{i}].tool_calls must be a non-empty list of "
                '{"type": "function", "function": {"name": ..., "arguments": {...}}}')]
    problems = []
    for j, c in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            problems.append(f'{where} must be {{"type": "function", "function": {{"name": ..., "arguments": {{...}}}}}}')
            continue
        args = fn.get("arguments", {})
        key = f"{where}.function.arguments" if "function" in c else f"{where}.arguments"
        if isinstance(args, str):
            problems.append(f"{key} is a JSON string; write it as an object, e.g. \"arguments\": "
                            f"{_as_object(args)} (chat templates such as Qwen3-Coder's iterate over it and fail, "
                            "others would train on an escaped string)")
        elif not isinstance(args, dict):
            problems.append(f"{key} must be an object of argument names to values, got {type(args).__name__}")
    return problems


def _as_object(args: str) -> str:
    try:
        return json.dumps(json.loads(args), ensure_ascii=False)[:80]
    except ValueError:
        return "{...}"


def load_splits(data_dir: str | Path) -> dict[str, list[dict]]:
    """Load train and valid splits, reporting the problems of both files before raising."""
    found: dict[str, list[dict]] = {}
    errors: list[DataError] = []
    for split in SPLITS:
        try:
            found[split] = load_chat_jsonl(split_path(data_dir, split))
        except DataError as e:
            errors.append(e)
    if errors:
        raise DataError(
            ", ".join(e.path for e in errors), [f"{Path(e.path).name} {p}" for e in errors for p in e.problems]
        )
    return found


def system_prompts(rows: list[dict]) -> set[str]:
    return {text_of(r["messages"][0]["content"]) for r in rows if r["messages"][0]["role"] == "system"}


def call_names(message: dict) -> list[str]:
    return [(c.get("function") or c).get("name", "") for c in message.get("tool_calls") or []]


def answer_problems(rows: list[dict], tokenizer, template: str = "the chat template") -> list[str]:
    """What the model would really be trained on, checked after the chat template renders each row
    (the answer mlx-lm trains on is what the full chat adds to the prompt): it must not be empty, and
    an answer written as ``tool_calls`` must still name every call (SmolLM2's template drops them)."""
    problems = []
    for n, row in enumerate(rows, start=1):
        messages, tools = row["messages"], row.get("tools")
        calls = call_names(messages[-1])
        drops = (f"line {n}: {template} does not render the assistant's tool_calls ({{why}}); write the call "
                 "into the assistant's content, in the format the model should learn, or use a model whose "
                 "chat template renders tool_calls")
        try:
            full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
            prompt = tokenizer.apply_chat_template(messages[:-1], tools=tools, tokenize=False,
                                                   add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors are the user's data meeting the template
            why = f"{type(e).__name__}: {e}"
            problems.append(drops.format(why=f"rendering fails with {why}") if calls else
                            f"line {n}: {template} fails to render this example ({why})")
            continue
        answer = full[len(prompt):] if full.startswith(prompt) else full[_common(full, prompt):]
        missing = [c for c in calls if c not in answer]
        if missing:
            problems.append(drops.format(why=f"the trained answer {answer.strip()[:60]!r} has no call to {missing[0]}"))
        elif not answer.strip():
            problems.append(f"line {n}: after {template} renders it, the trained answer is empty")
    return problems


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class LengthReport:
    examples: int
    max_tokens: int
    truncated: list[int]  # 1-based line numbers whose answer would be cut
    prompt_overflow: list[int]  # lines whose prompt alone fills max_seq_length (NaN loss)
    target_tokens: int  # total assistant tokens trained on (with mask_prompt)


def length_report(rows: list[dict], tokenizer, max_seq_length: int) -> LengthReport:
    """Tokenize every example exactly as mlx-lm's ChatDataset does and measure it."""
    truncated, overflow, longest, targets = [], [], 0, 0
    for n, row in enumerate(rows, start=1):
        messages, tools = row["messages"], row.get("tools")
        full = len(tokenizer.apply_chat_template(messages, tools=tools, return_dict=False))
        prompt = len(
            tokenizer.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True, return_dict=False)
        )
        longest = max(longest, full)
        targets += max(0, min(full, max_seq_length) - prompt)
        if prompt >= max_seq_length:
            overflow.append(n)
        elif full > max_seq_length:
            truncated.append(n)
    return LengthReport(len(rows), longest, truncated, overflow, targets)
