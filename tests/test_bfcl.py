"""BFCL checker on cases taken from the real BFCL files, a guard on synthetic evals, a real eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_ft.bfcl import CODES, load_bfcl, score
from mlx_ft.files import write_json
from mlx_ft.selection import pick_best

bfcl_eval = pytest.importorskip("bfcl_eval", reason="BFCL data wheel not installed: pip install --no-deps bfcl-eval")


def prompt(spec, pid):
    return next(p for p in load_bfcl(spec).prompts if p.id == pid)


def tc(name, **args):
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


# simple_python_0: calculate_triangle_area(base=10, height=5, unit in ["units", ""])
CASES = [
    ("bfcl:simple_python", "simple_python_0", tc("calculate_triangle_area", base=10, height=5), "ok"),
    ("bfcl:simple_python", "simple_python_0", tc("calculate_triangle_area", base=10, height=5, unit="units"), "ok"),
    ("bfcl:simple_python", "simple_python_0", tc("calculate_triangle_area", base=10, height=6), "wrong_arg_value"),
    ("bfcl:simple_python", "simple_python_0", tc("calculate_triangle_area", base=10), "missing_arg"),
    ("bfcl:simple_python", "simple_python_0", tc("calculate_triangle_area", base=10, height=5, color="red"),
     "unknown_arg"),
    ("bfcl:simple_python", "simple_python_0", tc("calculate_triangle_area", base="10", height=5), "wrong_type"),
    ("bfcl:simple_python", "simple_python_0", tc("area", base=10, height=5), "wrong_tool"),
    ("bfcl:simple_python", "simple_python_0", "The area is 25 square units.", "prose"),
    ("bfcl:simple_python", "simple_python_0", '<tool_call>{"name": "calculate_triangle_area", "arguments": {',
     "bad_json"),
    # parallel_0: two spotify.play calls, in any order
    ("bfcl:parallel", "parallel_0", tc("spotify.play", artist="Maroon 5", duration=15) +
     tc("spotify.play", artist="Taylor Swift", duration=20), "ok"),
    ("bfcl:parallel", "parallel_0", tc("spotify.play", artist="Taylor Swift", duration=20), "wrong_count"),
    ("bfcl:irrelevance", "irrelevance_0", "I can't compute that with the available functions.", "ok"),
    ("bfcl:irrelevance", "irrelevance_0", tc("determine_body_mass_index", weight=10, height=5), "irrelevant_call"),
]


@pytest.mark.parametrize("spec,pid,text,code", CASES)
def test_checker_on_real_bfcl_items(spec, pid, text, code):
    s = score(prompt(spec, pid), text, "stop")
    assert s.code == code, s.explanation
    assert s.passed == (code == "ok") and s.code in CODES


def test_int_accepted_for_float_and_strings_standardised():
    p = prompt("bfcl:parallel", "parallel_2")  # calculate_resistance(length=5, area=0.01, resistivity copper|"")
    calls = [c for c in p.answers]
    texts = "".join(tc("calculate_resistance", **{k: v[0] for k, v in next(iter(c.values())).items() if v[0] != ""})
                    for c in calls)
    assert score(p, texts).code == "ok"


def test_limit_is_deterministic_and_stratified():
    a = load_bfcl("bfcl:simple_python,irrelevance", limit=10)
    b = load_bfcl("bfcl:simple_python,irrelevance", limit=10)
    assert [p.id for p in a.prompts] == [p.id for p in b.prompts]
    cats = [p.category for p in a.prompts]
    assert cats.count("simple_python") == 5 and cats.count("irrelevance") == 5
    assert a.name == "bfcl_simple_python+irrelevance"


def test_unknown_category_is_a_clear_error():
    from mlx_ft.errors import UserError

    with pytest.raises(UserError, match="categories from"):
        load_bfcl("bfcl:nope")


def _write(run, target, suite, passed):
    results = [{"id": f"q{i}", "category": "c", "value": float(x), "passed": bool(x), "code": "ok" if x else "prose",
                "text": "t"} for i, x in enumerate(passed)]
    write_json(run / "evals" / target / f"{suite}.json", {"results": results, "summary": {}})


def test_guard_excludes_a_checkpoint_that_forgot_general_tool_calling(tmp_path):
    run = tmp_path / "r"
    write_json(run / "run.json", {"model_path": "m", "base": {"val_loss": 2.0}})
    for step in (10, 20):
        d = run / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "adapters.safetensors").write_bytes(b"")
        write_json(d / "manifest.json", {"step": step, "val_loss": 1.0})
    n = 27
    _write(run, "base", "tools", [0] * n)
    _write(run, "step_000010", "tools", [1] * 20 + [0] * 7)  # best on the primary suite ...
    _write(run, "step_000020", "tools", [1] * 15 + [0] * 12)
    _write(run, "base", "bfcl_simple_python", [1] * 20 + [0] * 7)
    _write(run, "step_000010", "bfcl_simple_python", [1] * 5 + [0] * 22)  # ... but forgot BFCL
    _write(run, "step_000020", "bfcl_simple_python", [1] * 19 + [0] * 8)
    r = pick_best(run, guard="bfcl:simple_python", bootstrap=0)
    assert r["guard"]["excluded"] == ["step_000010"]
    assert r["chosen"]["name"] == "step_000020"
    assert "excluded step_000010" in r["reason"]
    assert r["guard"]["checkpoints"]["step_000010"]["p_value"] < 0.05
    assert np.isclose(r["guard"]["checkpoints"]["step_000020"]["p_value"], 0.5)


@pytest.mark.slow
def test_real_bfcl_eval_on_the_embedded_model(tmp_path, embedded_model):
    from click.testing import CliRunner

    from mlx_ft.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["eval", "--suite", "bfcl:simple_python,irrelevance", "--limit", "4",
                                  "--model", str(embedded_model), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "bfcl_simple_python+irrelevance.json").read_text())
    assert [x["category"] for x in rec["results"]].count("irrelevance") == 2
    assert all(x["code"] in CODES for x in rec["results"])


# The checker's former misses, each against BFCL's own verdict (tests/test_bfcl_exact.py measures all of them)
def test_dict_valued_parameter_passes_and_is_checked_key_by_key():
    p = prompt("bfcl:simple_python", "simple_python_89")  # conditions: {department, school}
    good = {"database_name": "StudentDB", "table_name": "students",
            "conditions": {"department": "Science", "school": "Bluebird HS"}}
    assert score(p, tc("db_fetch_records", **good)).code == "ok"
    wrong = {**good, "conditions": {"department": "Arts", "school": "Bluebird HS"}}
    assert score(p, tc("db_fetch_records", **wrong)).code == "wrong_arg_value"
    missing = {**good, "conditions": {"department": "Science"}}
    assert score(p, tc("db_fetch_records", **missing)).code == "wrong_arg_value"


def test_null_for_an_optional_parameter_passes_where_the_answers_allow_it():
    p = prompt("bfcl:live_simple", "live_simple_58-27-0")  # movie_date: ["", None]
    assert score(p, tc("get_movies", city="Mumbai", movie_date=None)).code == "ok"
    assert score(p, tc("get_movies", city="Mumbai", movie_format=None)).code == "wrong_type"


def test_a_schema_parameter_absent_from_the_possible_answers_is_rejected():
    from mlx_ft.bfcl import BfclPrompt

    fn = {"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"},
                                                                     "b": {"type": "string"}}, "required": ["a"]}}
    p = BfclPrompt("x", "simple_python", "u", (), (fn,), ({"f": {"a": [1]}},))
    assert score(p, tc("f", a=1)).code == "ok"
    assert score(p, tc("f", a=1, b="y")).code == "unknown_arg"


def test_bind_renders_bfcl_functions_through_a_template_that_takes_tools():
    class Renders:
        def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
            return json.dumps(tools) + json.dumps(messages)

    class Ignores(Renders):
        def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
            return json.dumps(messages)

    suite = load_bfcl("bfcl:simple_python", limit=2)
    p = suite.prompts[0]
    assert (suite.tool_render, suite.tool_format, suite.tools(p)) == ("system_prompt", "json", None)
    assert suite.messages(p)[0]["role"] == "system"
    native = suite.bind(Renders())
    assert (native.tool_render, native.tool_format) == ("template", "auto")
    tools = native.tools(p)
    assert tools[0]["type"] == "function" and tools[0]["function"]["name"] == p.functions[0]["name"]
    assert tools[0]["function"]["parameters"]["type"] == "object"  # BFCL's "dict", as JSON Schema names it
    assert native.messages(p) == [dict(m) for m in p.messages]
    assert native.digest() != suite.digest()
    assert suite.bind(Ignores()).tool_render == "system_prompt"


def test_answers_are_read_by_the_models_parser():
    from mlx_ft.parsers import get_parser

    p = prompt("bfcl:simple_python", "simple_python_0")
    xml = ("<tool_call>\n<function=calculate_triangle_area>\n<parameter=base>\n10\n</parameter>\n"
           "<parameter=height>\n5\n</parameter>\n</function>\n</tool_call>")
    s = score(p, xml, "stop", parser=get_parser("qwen3_coder"))
    assert s.code == "ok", s.explanation  # values typed from the schema: 10 and 5 are integers
    assert s.extra["parser"] == "qwen3_coder"
    assert score(p, xml, "stop").code == "bad_json"
