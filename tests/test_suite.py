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


def test_digest_changes_with_the_prompts(tmp_path):
    def edit(d):
        d["prompts"][0]["user"] = "Open docs/other.md"

    assert load_suite(copy_suite(tmp_path, edit)).digest() != load_suite(SUITE).digest()


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nprompts: [\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_suite(p)


NATIVE = {
    "format": "mlxft-suite/1", "name": "native", "system_prompt": "You are a coding agent.",
    "tools": [
        {"name": "read_file", "description": "Read a file",
         "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
        {"type": "function", "function": {"name": "git_log", "description": "Show commits", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer"}}, "required": []}}},
    ],
    "rubric": {"wrapper": None},
    "prompts": [{"id": "a", "category": "c", "user": "Open x.md", "expect": {"tool": "read_file",
                                                                          "args": {"path": ["x.md"]}}}],
}


def write(tmp_path, data):
    import yaml

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


class Renders:
    def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
        return str(tools) + str(messages)


class Ignores:
    def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
        return str(messages)


def test_native_tools_are_passed_to_the_chat_template(tmp_path):
    s = load_suite(write(tmp_path, NATIVE))
    p = s.prompts[0]
    assert s.tool_render == "template" and s.tool_format == "auto"
    tools = s.tools(p)
    assert [t["function"]["name"] for t in tools] == ["read_file", "git_log"]
    assert tools[0] == {"type": "function", "function": NATIVE["tools"][0]}
    assert s.messages(p) == [{"role": "system", "content": "You are a coding agent."},
                             {"role": "user", "content": "Open x.md"}]
    assert s.bind(Renders()) == s


def test_native_tools_go_to_the_system_prompt_when_the_template_ignores_them(tmp_path):
    s = load_suite(write(tmp_path, NATIVE)).bind(Ignores())
    p = s.prompts[0]
    assert s.tool_render == "system_prompt" and s.tools(p) is None
    system = s.messages(p)[0]["content"]
    assert system.startswith("You are a coding agent.") and '"name": "git_log"' in system
    assert s.digest() != load_suite(write(tmp_path, NATIVE)).digest()
    assert s.record() == {"tool_render": "system_prompt", "tool_format": "auto"}


def test_name_params_suites_render_nothing_and_keep_their_digest():
    s = load_suite(SUITE)
    assert s.tools(s.prompts[0]) is None and s.tool_render == "none"
    assert s.bind(Renders()) is s
    assert s.digest() == "e16cde1ea6cdc510"  # results written before native tools existed stay valid


def test_native_tool_problems_are_reported(tmp_path):
    import copy

    d = copy.deepcopy(NATIVE)
    d["tool_format"] = "qwen4_xml"
    d["tools"].append({"name": "run", "params": ["x"]})
    d["rubric"]["wrapper"] = "run"
    d["tools"][0]["parameters"]["required"] = ["path", "mode"]
    d["prompts"][0]["expect"]["args"] = {"file": []}
    with pytest.raises(ConfigError) as e:
        load_suite(write(tmp_path, d))
    text = str(e.value)
    for needle in ("tool_format: 'qwen4_xml'", "'run' may be listed in tools only as a JSON schema", "parameters.required: ['mode']",
                   "'file' is not a parameter of read_file"):
        assert needle in text, needle


def test_tool_format_is_read(tmp_path):
    assert load_suite(write(tmp_path, {**NATIVE, "tool_format": "qwen3_coder"})).tool_format == "qwen3_coder"


def test_task_modules_import_only_downward_and_never_switch_on_kind():
    """parsers <- scoring <- task <- suite <- bfcl: no cycle, no lazy import, no `kind` switch."""
    import ast
    from pathlib import Path

    order = ["parsers", "scoring", "task", "suite", "bfcl"]
    root = Path(__file__).resolve().parent.parent / "mlx_ft"
    for i, mod in enumerate(order):
        source = (root / f"{mod}.py").read_text()
        tree = ast.parse(source)
        imported = {n.module.split(".")[1] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("mlx_ft.")}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "mlx_ft"
                     for a in n.names}
        assert not imported & set(order[i:]), (mod, imported & set(order[i:]))
        assert ".kind" not in source, mod


def test_the_wrapper_as_a_schema_is_shown_and_the_functions_inside_it_are_not(tmp_path):
    import copy

    d = copy.deepcopy(NATIVE)
    d["rubric"] = {"wrapper": "execute_code"}
    d["tools"] = [{"name": "execute_code", "description": "Run Python code", "parameters": {
        "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}},
        {"name": "read_file", "params": ["path"]}]
    s = load_suite(write(tmp_path, d))
    assert [t["function"]["name"] for t in s.tools(s.prompts[0])] == ["execute_code"]
    assert s.params_of("read_file") == ("path",)
