from __future__ import annotations

import json

import pytest

from mlx_ft.data import length_report, load_chat_jsonl, load_splits
from mlx_ft.errors import DataError

from .conftest import DATA, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_demo_data_is_valid():
    splits = load_splits(DATA)
    assert len(splits["train"]) >= 100 and len(splits["valid"]) >= 20


def test_demo_data_never_contains_an_eval_request():
    from mlx_ft.suite import load_suite

    from .conftest import SUITE

    eval_users = {p.user for p in load_suite(SUITE).prompts}
    for split in ("train", "valid"):
        for line in (DATA / f"{split}.jsonl").read_text().splitlines():
            user = next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
            assert not any(u in user for u in eval_users)


def test_every_bad_line_reported_with_its_number(tmp_path):
    rows = [
        GOOD,
        "{not json",
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "a"}]},
        {"text": "plain"},
        [1, 2],
    ]
    with pytest.raises(DataError) as e:
        load_chat_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    text = str(e.value)
    for needle in ("line 2: invalid JSON", "line 3: messages[1].role is 'bot'", "line 4: the assistant answer is empty",
                   "line 5: the last message must be the assistant", "line 6: unknown key", "line 7: expected a JSON object"):
        assert needle in text, needle
    assert "line 1" not in text


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_chat_jsonl(write_jsonl(tmp_path / "train.jsonl", []))


def test_both_splits_reported_together(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ["{bad"])
    with pytest.raises(DataError) as e:
        load_splits(tmp_path)
    assert "train.jsonl line 1" in str(e.value) and "valid.jsonl" in str(e.value)


class FakeTokenizer:
    """One token per character of each message's content: lengths easy to reason about."""

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, return_dict=False):
        return [0] * (sum(len(m["content"]) for m in messages) + (1 if add_generation_prompt else 0))


def test_length_report_finds_truncated_and_overflowing_examples():
    rows = [
        {"messages": [{"role": "user", "content": "a" * 5}, {"role": "assistant", "content": "b" * 5}]},  # fits
        {"messages": [{"role": "user", "content": "a" * 5}, {"role": "assistant", "content": "b" * 20}]},  # cut
        {"messages": [{"role": "user", "content": "a" * 30}, {"role": "assistant", "content": "b"}]},  # prompt fills
    ]
    r = length_report(rows, FakeTokenizer(), max_seq_length=16)
    assert r.truncated == [2] and r.prompt_overflow == [3] and r.max_tokens == 31
