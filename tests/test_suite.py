from __future__ import annotations

import pytest

from mlx_ft.errors import ConfigError
from mlx_ft.suite import ALWAYS_STOP, load_suite

from .conftest import SUITE, copy_suite


def test_shipped_suite_loads_with_seed_categories():
    s = load_suite(SUITE)
    assert len(s.prompts) >= 27
    assert {p.category for p in s.prompts} == {"text_tools", "validation", "git", "cst", "lsp", "domain", "multi_tool"}
    assert "<think>" in s.generation.stop_sequences
    assert s.generation.temperature == 0


def test_think_stop_cannot_be_forgotten(tmp_path):
    def edit(d):
        d["generation"]["stop"] = []

    s = load_suite(copy_suite(tmp_path, edit))
    assert set(ALWAYS_STOP) <= set(s.generation.stop_sequences)


def test_every_problem_reported_at_once(tmp_path):
    def edit(d):
        d["prompts"][1]["id"] = d["prompts"][0]["id"]  # duplicate id
        d["prompts"][2]["expect"]["tool"] = "no_such_tool"  # unknown tool
        del d["prompts"][3]["user"]  # missing field
        d["prompts"][4]["expect"]["args"] = {"path": "not-a-list"}  # bad type
        d["generation"]["max_tokens"] = "many"  # bad type
        d["rubric"]["direct"] = 2  # bad weight
        d["colour"] = "blue"  # unknown key

    with pytest.raises(ConfigError) as e:
        load_suite(copy_suite(tmp_path, edit))
    text = str(e.value)
    for needle in ("duplicate id", "no_such_tool", "user: required key is missing", "args.path",
                   "generation.max_tokens", "rubric.direct", "colour: unknown key"):
        assert needle in text, needle
    assert "suite.yaml" in text
    assert len(e.value.problems) >= 7


def test_format_version_is_checked(tmp_path):
    def edit(d):
        d["format"] = "mlxft-suite/99"

    with pytest.raises(ConfigError, match="mlxft-suite/99"):
        load_suite(copy_suite(tmp_path, edit))


def test_fingerprint_changes_with_the_prompts(tmp_path):
    def edit(d):
        d["prompts"][0]["user"] = "Open docs/other.md"

    assert load_suite(copy_suite(tmp_path, edit)).fingerprint() != load_suite(SUITE).fingerprint()


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nprompts: [\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_suite(p)
