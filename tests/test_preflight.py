"""Preflight's comparison of the training data with what the eval sends, on the real SmolLM2 template."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from mlx_ft.data import load_chat_jsonl
from mlx_ft.preflight import compare_with_eval, first_difference
from mlx_ft.suite import load_suite

from .conftest import DATA, SUITE


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from mlx_lm.tokenizer_utils import load

    return load(embedded_model)


TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0].content }}\n# Tools\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% set msgs = messages[1:] %}{% else %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tools_tokenizer(embedded_model, tmp_path_factory):
    """SmolLM2's tokenizer with a template that renders ``tools`` in the system turn."""
    import shutil

    from mlx_lm.tokenizer_utils import load

    d = tmp_path_factory.mktemp("tok")
    for f in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(embedded_model / f, d / f)
    cfg = json.loads((embedded_model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TOOLS_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load(d)


@pytest.fixture(scope="module")
def rows():
    return load_chat_jsonl(DATA / "train.jsonl")[:20]


def suite_with(tmp_path, edit):
    data = yaml.safe_load(SUITE.read_text())
    edit(data)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(p)


def test_the_demo_data_matches_the_shipped_suite(rows, tokenizer):
    assert compare_with_eval(rows, load_suite(SUITE), tokenizer) == []


def test_an_eval_only_suffix_on_the_system_prompt_is_named(tmp_path, rows, tokenizer):
    def edit(d):
        d["system_prompt"] += "_direct"

    (w,) = compare_with_eval(rows, suite_with(tmp_path, edit), tokenizer)
    assert "system prompt differs" in w and "line 1" in w and "_direct'" in w
    assert "seed" not in w


NATIVE_TOOL = {"name": "read_file", "description": "Read a file",
               "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}


def native_rows(rows, tool):
    out = []
    for r in rows:
        r = copy.deepcopy(r)
        r["tools"] = [{"type": "function", "function": tool}]
        out.append(r)
    return out


def test_tool_schemas_are_compared(tmp_path, rows, tools_tokenizer):
    tokenizer = tools_tokenizer

    def edit(d):
        d["tools"] = [NATIVE_TOOL]
        d["rubric"]["wrapper"] = None
        d["prompts"] = [p for p in d["prompts"] if p["expect"]["tool"] == "read_file"]

    suite = suite_with(tmp_path, edit)
    assert compare_with_eval(native_rows(rows, NATIVE_TOOL), suite, tokenizer) == []
    changed = json.loads(json.dumps(NATIVE_TOOL))
    changed["parameters"]["properties"]["path"]["description"] = "relative path"
    (w,) = compare_with_eval(native_rows(rows, changed), suite, tokenizer)
    assert "schema of tool read_file differs" in w and "relative path" in w
    (w,) = compare_with_eval(rows, suite, tokenizer)
    assert "no training example has a 'tools' list" in w


def test_first_difference_names_the_line():
    assert first_difference("a\nb\nc", "a\nB\nc") == "line 2: trained 'b', eval sends 'B'"
    assert first_difference("a", "a\nmore") == "line 2: trained '<nothing>', eval sends 'more'"


def test_tools_the_template_ignores_in_training_but_the_eval_writes_out_are_named(tmp_path, rows, tokenizer):
    def edit(d):
        d["tools"] = [NATIVE_TOOL]
        d["rubric"]["wrapper"] = None
        d["prompts"] = [p for p in d["prompts"] if p["expect"]["tool"] == "read_file"]

    (w,) = compare_with_eval(native_rows(rows, NATIVE_TOOL), suite_with(tmp_path, edit), tokenizer)
    assert "system prompt differs" in w and "line 2" in w
