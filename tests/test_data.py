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


READ = {"type": "function", "function": {"name": "read_file", "description": "Read a file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}


def call(name="read_file", **args):
    return {"type": "function", "function": {"name": name, "arguments": args or {"path": "a.md"}}}


# every shape mlx-lm's ChatDataset takes (mlx-lm LORA.md's tools format among them)
TOOL_ROWS = [
    {"messages": [{"role": "user", "content": "Open a.md"}, {"role": "assistant", "tool_calls": [call()]}],
     "tools": [READ]},
    {"messages": [{"role": "system", "content": "agent"}, {"role": "user", "content": "Open a.md"},
                  {"role": "assistant", "tool_calls": [call()]}], "tools": [READ]},
    {"messages": [{"role": "user", "content": "Open a.md"}, {"role": "assistant", "content": None,
                                                              "tool_calls": [call()]}], "tools": [READ]},
    {"messages": [{"role": "user", "content": "Open a.md"}, {"role": "assistant", "content": "",
                                                              "tool_calls": [call(), call(path="b.md")]}]},
    {"messages": [{"role": "user", "content": "Open a.md"}, {"role": "assistant", "tool_calls": [call()]},
                  {"role": "tool", "content": "# A"}, {"role": "assistant", "content": "It is a heading."}],
     "tools": [READ]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "Open a.md"}, {"role": "assistant", "tool_calls": [call()]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Open a.md"}]},
                  {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": "Open a.md"},
                  {"role": "assistant", "tool_calls": [{"function": {"name": "read_file", "arguments": {}}}]}],
     "tools": [READ["function"]]},
]


def test_mlx_lm_tools_format_is_accepted(tmp_path):
    rows = load_chat_jsonl(write_jsonl(tmp_path / "train.jsonl", TOOL_ROWS))
    assert len(rows) == 8


def test_tool_call_shape_problems_are_reported_with_line_and_fix(tmp_path):
    as_string = {"type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.md"}'}}
    rows = [
        {"messages": [{"role": "user", "content": "Open a.md"}, {"role": "assistant", "tool_calls": [as_string]}]},
        {"messages": [{"role": "user", "content": "x", "tool_calls": [call()]}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": []}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "read_file"},
    ]
    with pytest.raises(DataError) as e:
        load_chat_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    text = str(e.value)
    for needle in (('line 1: messages[1].tool_calls[0].function.arguments is a JSON string; write it as an object, '
                   'e.g. "arguments": {"path": "a.md"}'), "line 2: messages[0].tool_calls: only an assistant",
                   "line 3: messages[1].tool_calls must be a non-empty list", "line 4: messages[0].content must be",
                   "line 5: messages[1].tool_calls[0] must be", "line 6: 'tools' must be a list"):
        assert needle in text, needle


@pytest.fixture(scope="module")
def smollm2(embedded_model):
    from mlx_lm.tokenizer_utils import load

    return load(embedded_model)


def test_a_template_that_drops_tool_calls_is_a_clear_error(smollm2):
    from mlx_ft.data import answer_problems

    problems = answer_problems(TOOL_ROWS[:2], smollm2, "the chat template of smollm2")
    assert len(problems) == 2
    assert problems[0].startswith("line 1: the chat template of smollm2 does not render the assistant's tool_calls")
    assert "write the call into the assistant's content" in problems[0]
    assert answer_problems([GOOD], smollm2, "t") == []


def test_a_template_that_renders_tool_calls_passes(embedded_model, tmp_path):
    import shutil

    from mlx_lm.tokenizer_utils import load

    from mlx_ft.data import answer_problems

    for f in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(embedded_model / f, tmp_path / f)
    cfg = json.loads((embedded_model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load(tmp_path)
    assert answer_problems(TOOL_ROWS[:6], tok, "t") == []
    assert answer_problems([GOOD], tok, "t") == []
    cfg["chat_template"] = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (problem,) = answer_problems([GOOD], load(tmp_path), "the user-only template")
    assert problem == "line 1: after the user-only template renders it, the trained answer is empty"


def test_xml_demo_is_consistent_with_its_suite_and_template(embedded_model, tmp_path):
    """data/xml + data/xml/chat_template.jinja + evals/tools-xml.yaml: the template renders every
    call, mlx-lm infers the qwen3_coder parser from it, the eval sends what the data trained on, and
    a trained answer scores as a pass through that parser."""
    import shutil

    from mlx_lm.tokenizer_utils import load

    from mlx_ft.data import answer_problems
    from mlx_ft.parsers import resolve_parser
    from mlx_ft.preflight import compare_with_eval
    from mlx_ft.scoring import score
    from mlx_ft.suite import load_suite

    from .conftest import ROOT

    for f in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(embedded_model / f, tmp_path / f)
    cfg = json.loads((embedded_model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (ROOT / "data" / "xml" / "chat_template.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load(tmp_path)
    splits = load_splits(ROOT / "data" / "xml")
    suite = load_suite(ROOT / "evals" / "tools-xml.yaml").bind(tok)
    parser = resolve_parser(tok, suite.tool_format)
    assert (parser.name, suite.tool_render) == ("qwen3_coder", "template")
    assert answer_problems(splits["train"] + splits["valid"], tok) == []
    assert compare_with_eval(splits["train"], suite, tok) == []
    prompt = next(p for p in suite.prompts if p.id == "text-01")
    row = {"messages": [*suite.messages(prompt), {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "execute_code",
                                          "arguments": {"code": "read_file(path='docs/architecture.md')"}}}]}]}
    full = tok.apply_chat_template(row["messages"], tools=suite.tools(prompt), tokenize=False)
    sent = tok.apply_chat_template(suite.messages(prompt), tools=suite.tools(prompt), tokenize=False,
                                   add_generation_prompt=True)
    answer = full[len(sent):].removesuffix("<|im_end|>\n")
    assert answer.startswith("<tool_call>\n<function=execute_code>")
    assert score(suite, prompt, answer, "stop", parser=parser).code == "ok"
    without_tag = answer.removeprefix("<tool_call>\n").removesuffix("</tool_call>")
    assert score(suite, prompt, without_tag, "stop", parser=parser).code == "bad_format"


def test_xml_demo_data_is_what_the_script_writes(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--format", "xml", "--suite",
                    str(ROOT / "evals" / "tools-xml.yaml"), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "valid"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (ROOT / "data" / "xml" / f"{split}.jsonl").read_text()
