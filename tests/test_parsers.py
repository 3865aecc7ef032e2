"""Tool-call formats: the same rubric cases written in each format a model may be trained on, the
parser chosen the way mlx-lm chooses it, and a property test that no text breaks a parser."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest

from mlx_ft import bfcl
from mlx_ft.parsers import get_parser, mlx_lm_names, names, resolve_parser
from mlx_ft.scoring import CODES, score
from mlx_ft.suite import load_suite

from .conftest import SUITE

suite = load_suite(SUITE)
P = {p.id: p for p in suite.prompts}
READ = "read_file(path='docs/architecture.md')"


def qwen3(name, args):
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def hermes(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def bare_json(name, args):
    return json.dumps({"name": name, "arguments": args})


def llama3(name, args):
    return "<|python_tag|>" + json.dumps({"name": name, "parameters": args})


def pythonic(name, args):
    return "[" + name + "(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")]"


def lfm2(name, args):
    return "<|tool_call_start|>" + pythonic(name, args) + "<|tool_call_end|>"


def mistral(name, args):
    return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": args}])


FORMATS = [("json", hermes), ("json", bare_json), ("qwen3_coder", qwen3), ("json_tools", hermes),
           ("llama3_json", llama3), ("pythonic", pythonic), ("pythonic", lfm2), ("mistral", mistral)]


def cases(fmt):
    wrap = lambda code: fmt("execute_code", {"code": code})
    full = wrap(READ)
    return [
        # case, prompt, text, finish_reason, code, value
        ("wrapped", "text-01", full, "stop", "ok", 1.0),
        ("direct", "text-01", fmt("read_file", {"path": "docs/architecture.md"}), "stop", "unwrapped", 0.5),
        ("wrong tool", "text-01", fmt("write_file", {"path": "docs/architecture.md", "content": "x"}), "stop",
         "wrong_tool", 0.0),
        ("wrong tool inside", "text-01", wrap("git_status()"), "stop", "wrong_tool", 0.0),
        ("missing arg", "cst-02", wrap("cst_rename(old='InvoiceBuilder')"), "stop", "missing_arg", 1.0),
        ("wrong arg", "text-01", wrap("read_file(path='docs/other.md')"), "stop", "wrong_arg_value", 1.0),
        ("truncated", "text-01", full[: len(full) // 2], "length", "truncated", 0.0),
        ("prose naming a tool", "text-01", "I would call read_file on docs/architecture.md to read it.", "stop",
         "prose", 0.0),
        ("text around", "text-01", "Sure, here it is:\n" + full + "\nDone.", "stop", "extra_text", 1.0),
        ("two calls", "text-01", full + "\n" + wrap("git_status()"), "stop", "extra_text", 1.0),
        ("two calls, first wrong", "text-01", wrap("git_status()") + "\n" + full, "stop", "wrong_tool", 0.0),
    ]


TABLE = [(name, fmt.__name__, *c) for name, fmt in FORMATS for c in cases(fmt)]


@pytest.mark.parametrize("parser,shape,case,pid,text,finish,code,value", TABLE,
                         ids=[f"{t[1]}-{t[2]}" for t in TABLE])
def test_rubric_in_every_format(parser, shape, case, pid, text, finish, code, value):
    s = score(suite, P[pid], text, finish, parser=get_parser(parser))
    assert (s.code, s.value, s.passed) == (code, value, code == "ok"), s.explanation
    assert s.extra["parser"] in (parser, "json")


def test_qwen3_function_without_its_tool_call_is_bad_format_not_a_pass():
    text = qwen3("execute_code", {"code": READ}).replace("<tool_call>\n", "").replace("</tool_call>", "")
    s = score(suite, P["text-01"], text, "stop", parser=get_parser("qwen3_coder"))
    assert (s.code, s.passed) == ("bad_format", False), s.explanation
    assert "<function=" in s.explanation


def test_without_a_parser_xml_calls_stay_bad_json_as_before():
    s = score(suite, P["text-01"], qwen3("execute_code", {"code": READ}), "stop")
    assert s.code == "bad_json" and s.extra["parser"] == "json"


def test_json_fallback_reads_json_calls_of_an_xml_model():
    s = score(suite, P["text-01"], hermes("execute_code", {"code": READ}), "stop", parser=get_parser("qwen3_coder"))
    assert s.passed and s.extra["parser"] == "json"


def test_think_marker_comes_from_the_parser():
    p = get_parser("json", think="<|think:start|>")
    s = score(suite, P["text-01"], "<|think:start|>hmm " + hermes("execute_code", {"code": READ}), "stop", parser=p)
    assert s.code == "think_onset" and "<|think:start|>" in s.explanation
    assert score(suite, P["text-01"], "<think>", "length").code == "think_onset"


def test_unknown_format_is_a_clear_error():
    from mlx_ft.errors import UserError

    with pytest.raises(UserError, match="qwen3_coder"):
        get_parser("qwen4_xml")
    assert {"auto", "json", "llama3_json", "pythonic", "qwen3_coder", "glm47"} <= set(names())


class FakeTokenizer:
    def __init__(self, parser_type=None, template=None, think_start=None):
        self.init_kwargs = {"tool_parser_type": parser_type} if parser_type else {}
        self.chat_template = template
        self.think_start = think_start
        self.tool_parser = None


def test_resolve_follows_the_tokenizer_then_the_suite():
    assert resolve_parser(None).name == "json"
    assert resolve_parser(FakeTokenizer("qwen3_coder")).name == "qwen3_coder"
    assert resolve_parser(FakeTokenizer(template="...<|python_tag|>...")).name == "llama3_json"
    assert resolve_parser(FakeTokenizer()).name == "json"
    assert resolve_parser(FakeTokenizer("qwen3_coder"), "json").name == "json"
    assert resolve_parser(FakeTokenizer("qwen3_coder"), "auto").name == "qwen3_coder"
    assert resolve_parser(FakeTokenizer(think_start="<longcat_think>")).think == "<longcat_think>"
    assert resolve_parser(FakeTokenizer()).think == "<think>"


def test_a_real_tokenizer_with_a_qwen3_coder_template_gets_the_qwen3_coder_parser(tmp_path, embedded_model):
    """mlx-lm infers the parser from the chat template; mlxft takes the same choice."""
    from mlx_lm.tokenizer_utils import load

    for f in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(embedded_model / f, tmp_path / f)
    cfg = json.loads((embedded_model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                            "{# calls: <tool_call>\n<function=NAME> #}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    parser = resolve_parser(load(tmp_path))
    assert parser.name == "qwen3_coder"
    assert score(suite, P["text-01"], qwen3("execute_code", {"code": READ}), "stop", parser=parser).passed
    assert resolve_parser(load(embedded_model)).name == "json"  # SmolLM2's own template names no format


# ------------------------------------------------------------------ property test

FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=", "<function=read_file>", "<parameter=path>", "</parameter>",
             "</function>", "<|python_tag|>", "<|tool_call_start|>", "<|tool_call_end|>", "[TOOL_CALLS]",
             "<arg_key>", "<minimax:tool_call>", "<invoke name=", "<think>", "{", "}", "[", "]", "(", ")", '"', "'",
             "\\", ":", ",", ";", "=", '"name"', '"arguments"', '"parameters"', '"code"', "execute_code",
             "read_file", "path=", "code=", "null", "true", "1e999", "-0", "\n", " ", "\ud800", "\udfff", "é", "🙂",
             "\x00", "docs/architecture.md", "[ARGS]", "call:", "<start_function_call>", "<escape>", "ÿ"]


def adversarial(rng: random.Random, n: int) -> list[str]:
    valid = [f(name, {"code": READ}) for _, f in FORMATS for name in ("execute_code", "read_file")]
    texts = ["", " ", "{" * 5000, "[" * 5000 + "f(", '{"a":' * 20000, "(" * 3000, "<tool_call>" * 3000,
             "x" * 1_000_000, rng.choice(valid) * 3 + "y" * 1_000_000,
             "".join(rng.choice(FRAGMENTS) for _ in range(200_000)),
             '<tool_call>{"name": "execute_code", "arguments": {"code": "</tool_call><function=x>"}}</tool_call>',
             '{"name": "read_file", "arguments": "{\\"path\\": \\"<tool_call>\\"}"}']
    while len(texts) < n:
        kind = rng.randrange(4)
        if kind == 0:  # fragments soup
            texts.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 40))))
        elif kind == 1:  # a valid call cut off, or with a fragment spliced in
            t = rng.choice(valid)
            i = rng.randrange(len(t) + 1)
            texts.append(t[:i] if rng.random() < 0.5 else t[:i] + rng.choice(FRAGMENTS) + t[i:])
        elif kind == 2:  # random code points, surrogates included
            texts.append("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(0, 30))))
        else:  # nesting, balanced or not
            d = rng.randrange(1, 300)
            texts.append(rng.choice(["{", "[", '{"a": [', "f("]) * d + rng.choice(["", "}", "]", ")"]) * rng.randrange(d))
    return texts


def test_no_text_breaks_a_parser_or_the_scorer():
    rng = random.Random(20261127)
    texts = adversarial(rng, 10_000)
    parsers = [get_parser(n) for n in ("json", "llama3_json", "pythonic", *mlx_lm_names())]
    bfcl_prompt = bfcl.BfclPrompt("p", "simple_python", "u", (), (
        {"name": "read_file", "parameters": {"type": "dict", "properties": {"path": {"type": "string"}},
                                             "required": ["path"]}},), ({"read_file": {"path": ["a"]}},))
    start = time.process_time()  # CPU time: the machine may be shared
    codes: dict[str, int] = {}
    for i, text in enumerate(texts):
        big = len(text) > 100_000
        for p in parsers if (big or i % 4 == 0) else parsers[i % len(parsers): i % len(parsers) + 1]:
            found = p.extract(text)
            assert isinstance(found.calls, list) and len(found.calls) == len(found.spans)
            assert found.problem_code in (None, "bad_json", "bad_format")
        parser = parsers[i % len(parsers)]
        s = score(suite, P["text-01"], text, rng.choice(["stop", "length", None]), parser=parser)
        assert isinstance(s.code, str) and s.code in CODES and s.passed == (s.code == "ok"), text[:80]
        b = bfcl.score(bfcl_prompt, text, "stop", parser=parser)
        assert b.code in bfcl.CODES
        json.dumps(s.to_dict())  # the result file can hold it
        codes[s.code] = codes.get(s.code, 0) + 1
    seconds = time.process_time() - start
    print(f"\n{len(texts)} texts x {len(parsers)} parsers in {seconds:.1f}s CPU; codes {codes}")
    assert len(texts) == 10_000
    assert {"prose", "bad_json", "ok", "truncated"} <= set(codes)
    assert seconds < 20
