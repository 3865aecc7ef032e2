"""Table-driven scoring tests with real-looking model outputs, one or more per failure code."""

from __future__ import annotations

import pytest

from mlx_ft.parsers import get_parser
from mlx_ft.scoring import CODES, extract_calls, parse_code_calls, score
from mlx_ft.suite import load_suite

from .conftest import SUITE

suite = load_suite(SUITE)
P = {p.id: p for p in suite.prompts}

W = '<tool_call>{"name": "execute_code", "arguments": {"code": "%s"}}</tool_call>'

CASES = [
    # id, raw model text, finish_reason, expected code, expected value, expected strict pass
    ("text-01", W % "read_file(path='docs/architecture.md')", "stop", "ok", 1.0, True),
    ("text-01", W % "read_file('docs/architecture.md')", "stop", "ok", 1.0, True),  # positional arg named
    ("git-03", W % "git_log(n=7)", "stop", "ok", 1.0, True),
    ("git-03", W % "git_log(n='7')", "stop", "ok", 1.0, True),  # "7" and 7 are the same value
    ("git-01", W % "git_status()", "stop", "ok", 1.0, True),
    # close tag removed by the server's stop-string filter: still a complete call
    ("text-01", W[: -len("</tool_call>")] % "read_file(path='docs/architecture.md')", "stop", "ok", 1.0, True),
    ("text-01", '<tool_call>{"name": "read_file", "arguments": {"path": "docs/architecture.md"}}</tool_call>',
     "stop", "unwrapped", 0.5, False),
    ("text-01", '{"name": "read_file", "arguments": {"path": "docs/architecture.md"}}', "stop", "unwrapped", 0.5, False),
    # seed 004's prose answers
    ("dom-01", "Let me first check what's in that file...", "stop", "prose", 0.0, False),
    ("lsp-02", ("I'll search for all references to `send_reminder` across the project.\nLet me search for all "
     "occurrences..."), "stop", "prose", 0.0, False),
    ("dom-02", "I need to read that file first to understand the routes.", "stop", "prose", 0.0, False),
    ("text-01", "<think>\nThe user wants to open a file. I should call read_file with the path", "length",
     "think_onset", 0.0, False),
    ("text-01", ("Sure, here is how you could do that in Python:\n```python\nwith open('docs/architecture.md') as f:\n"
     "    print(f.read())"), "length", "truncated", 0.0, False),
    ("text-01", '<tool_call>{"name": "execute_code", "arguments": {"code": "read_file(path=', "length",
     "truncated", 0.0, False),
    ("valid-02", '<tool_call>{"name": "execute_code", "arguments": {"code": "ruff_check(path=\'a.py\')"}', "stop",
     "bad_json", 0.0, False),
    ("valid-02", W % "ruff_check(path='billing/invoice.py'", "stop", "bad_json", 0.0, False),
    ("valid-01", W % "ruff_check(path='billing/invoice.py')", "stop", "wrong_tool", 0.0, False),
    ("lsp-01", '<tool_call>{"name": "find_references", "arguments": {"symbol": "InvoiceBuilder"}}</tool_call>',
     "stop", "wrong_tool", 0.0, False),
    ("cst-02", W % "cst_rename(old='InvoiceBuilder')", "stop", "missing_arg", 1.0, False),
    ("valid-03", W % "pytest_run(path='tests/test_routes.py')", "stop", "wrong_arg_value", 1.0, False),
    ("text-01", "Sure! " + W % "read_file(path='docs/architecture.md')", "stop", "extra_text", 1.0, False),
    ("text-01", None, None, "server_error", 0.0, False),
]


# the same cases read by a model's own parser (tests/test_parsers.py has the table for every format)
XML_CASES = [
    ("text-01", ("<tool_call>\n<function=read_file>\n<parameter=path>\ndocs/architecture.md\n</parameter>\n</function>"
     "\n</tool_call>"), "stop", "unwrapped", 0.5, False),
    # Qwen3-Coder's known failure: the function block without its <tool_call> around it
    ("text-01", "<function=read_file>\n<parameter=path>\ndocs/architecture.md\n</parameter>\n</function>", "stop",
     "bad_format", 0.0, False),
]


@pytest.mark.parametrize("pid,text,finish,code,value,passed", CASES)
def test_score_table(pid, text, finish, code, value, passed):
    s = score(suite, P[pid], text, finish, error=None if text is not None else "HTTP 500")
    assert (s.code, s.value, s.passed) == (code, value, passed), s.explanation
    assert s.code in CODES
    assert s.explanation


@pytest.mark.parametrize("pid,text,finish,code,value,passed", XML_CASES)
def test_score_table_with_the_qwen3_coder_parser(pid, text, finish, code, value, passed):
    s = score(suite, P[pid], text, finish, parser=get_parser("qwen3_coder"))
    assert (s.code, s.value, s.passed) == (code, value, passed), s.explanation
    assert s.code in CODES
    assert s.explanation


def test_every_failure_code_is_covered_by_the_table():
    assert {c[3] for c in CASES + XML_CASES} == set(CODES)


def test_extracted_call_is_reported():
    s = score(suite, P["cst-02"], W % "cst_rename(old='InvoiceBuilder', new='InvoiceFactory')", "stop")
    assert s.passed
    assert s.extracted == {"name": "cst_rename", "args": {"old": "InvoiceBuilder", "new": "InvoiceFactory"},
                           "wrapped": True}


def test_code_in_wrapper_is_parsed_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x'); read_file(path='docs/architecture.md')"
    s = score(suite, P["text-01"], W % code.replace('"', '\\"'), "stop")
    assert s.value == 1.0
    assert not marker.exists()


def test_rubric_weights_are_settings(tmp_path):
    import dataclasses

    from mlx_ft.suite import Rubric

    custom = dataclasses.replace(suite, rubric=Rubric(wrapper="run_python", wrapped=1.0, direct=0.25, other=0.0))
    direct = '<tool_call>{"name": "read_file", "arguments": {"path": "docs/architecture.md"}}</tool_call>'
    assert score(custom, P["text-01"], direct, "stop").value == 0.25
    wrapped = '<tool_call>{"name": "run_python", "arguments": {"code": "read_file(path=\'docs/architecture.md\')"}}'
    assert score(custom, P["text-01"], wrapped, "stop").passed


def test_no_wrapper_rubric_makes_a_direct_call_a_full_pass():
    import dataclasses

    from mlx_ft.suite import Rubric

    plain = dataclasses.replace(suite, rubric=Rubric(wrapper=None))
    s = score(plain, P["text-01"], '{"name": "read_file", "arguments": {"path": "docs/architecture.md"}}', "stop")
    assert (s.code, s.value, s.passed) == ("ok", 1.0, True)


def test_extract_calls_finds_json_with_string_arguments():
    calls, _, problem = extract_calls('{"name": "git_log", "arguments": "{\\"n\\": 3}"}')
    assert problem is None and calls[0].args == {"n": 3}


def test_parse_code_calls_handles_attributes_and_non_literals():
    calls = parse_code_calls("tools.read_file(path=base + '/x.py')", {"read_file": ("path",)})
    assert calls[0].name == "read_file" and calls[0].args == {"path": "base + '/x.py'"}
