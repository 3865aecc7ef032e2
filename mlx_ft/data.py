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
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    extra = sorted(set(row) - {"messages", "tools"})
    if extra:
        return [f"unknown key(s) {extra}; a chat example has 'messages' (and optionally 'tools')"]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list of {role, content} objects"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"messages[{i}] is not an object")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            problems.append(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"messages[{i}].content must be a string")
    if problems:
        return problems
    if messages[-1]["role"] != "assistant":
        problems.append("the last message must be the assistant's answer (the training target)")
    elif not messages[-1]["content"].strip():
        problems.append("the assistant answer is empty; there is nothing to learn from it")
    if not any(m["role"] == "user" for m in messages):
        problems.append("no user message")
    if any(m["role"] == "system" for m in messages[1:]):
        problems.append("a system message may only come first")
    return problems


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
    return {r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"}


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
