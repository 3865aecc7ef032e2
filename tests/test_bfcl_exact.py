"""Differential test: mlxft's BFCL checker against BFCL's own ``ast_checker`` on every item of five
categories, each answered correctly and with perturbations (dropped, renamed, extra, null, retyped,
dict and list-of-dict edits, wrong name, wrong count). Skips where bfcl-eval is not installed."""

from __future__ import annotations

import collections
import copy
import json
import random
import sys
import types

import pytest

from mlx_ft.bfcl import check, load_bfcl, score
from mlx_ft.parsers import Call

pytest.importorskip("bfcl_eval", reason="BFCL data wheel not installed: pip install --no-deps bfcl-eval")

CATS = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple")


@pytest.fixture(scope="module")
def ast_checker():
    """BFCL's checker, importable from the --no-deps wheel once its model table is stubbed."""
    name = "bfcl_eval.constants.model_config"
    saved = sys.modules.get(name)
    stub = types.ModuleType(name)
    stub.MODEL_CONFIG_MAPPING = collections.defaultdict(lambda: types.SimpleNamespace(underscore_to_dot=False))
    sys.modules[name] = stub
    try:
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker as checker
    finally:
        if saved is not None:
            sys.modules[name] = saved
    return lambda functions, output, answers, cat: checker(list(functions), output, answers, Language.PYTHON, cat,
                                                             "mlxft")["valid"]


def first(accepted: list, last: bool = False):
    vals = [a for a in accepted if a != ""]
    return (vals[-1] if last else vals[0]) if vals else None


def correct(answers: tuple, last: bool = False, minimal: bool = False) -> list[dict]:
    out = []
    for exp in answers:
        (name, params), = exp.items()
        args = {p: first(acc, last) for p, acc in params.items()
                if first(acc) is not None and not (minimal and "" in acc)}
        out.append({name: args})
    return out


def retype(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return int(v) if v.is_integer() else str(v)
    if isinstance(v, str):
        return 7
    if isinstance(v, list):
        return v[0] if v else "x"
    if isinstance(v, dict):
        return json.dumps(v)
    return "x"


def perturb(prompt, rng: random.Random) -> list[list[dict]]:
    """Answers near the ground truth, each a BFCL model output [{name: {param: value}}, ...]."""
    base = correct(prompt.answers)
    outs = [base, correct(prompt.answers, last=True), correct(prompt.answers, minimal=True)]
    schema = {f["name"]: f["parameters"] for f in prompt.functions}

    def edit(fn):
        o = copy.deepcopy(base)
        k = rng.randrange(len(o))
        (name, args), = o[k].items()
        if fn(name, args, k, o) is not False:
            outs.append(o)

    def drop(name, args, k, o):
        if not args:
            return False
        args.pop(rng.choice(sorted(args)))

    def rename(name, args, k, o):
        if not args:
            return False
        p = rng.choice(sorted(args))
        args[p + "_x"] = args.pop(p)

    def wrong_type(name, args, k, o):
        if not args:
            return False
        p = rng.choice(sorted(args))
        args[p] = retype(args[p])

    def null(name, args, k, o):
        params = prompt.answers[k][name]
        opt = [p for p, acc in params.items() if "" in acc] or sorted(params)
        if not opt:
            return False
        args[rng.choice(opt)] = None

    def extra_schema(name, args, k, o):
        props = schema.get(name, {}).get("properties", {})
        spare = [p for p in props if p not in prompt.answers[k][name]]
        if not spare:
            return False
        p = rng.choice(spare)
        args[p] = {"string": "x", "integer": 1, "float": 1.5, "boolean": True}.get(props[p].get("type"), "x")

    def extra_unknown(name, args, k, o):
        args["zz_unknown"] = 1

    def wrong_name(name, args, k, o):
        o[k] = {name + "_v2": args}

    def string_case(name, args, k, o):
        strs = [p for p, v in args.items() if isinstance(v, str)]
        if not strs:
            return False
        p = rng.choice(strs)
        args[p] = rng.choice([args[p].upper(), args[p] + ".", " " + args[p], args[p] + "zz", args[p][:-1]])

    def numbers(name, args, k, o):
        nums = [p for p, v in args.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not nums:
            return False
        p = rng.choice(nums)
        v = args[p]
        args[p] = rng.choice([float(v), int(v) if float(v).is_integer() else v, v + 1, -v])

    def dict_edit(name, args, k, o):
        ds = [p for p, v in args.items() if isinstance(v, dict) or (isinstance(v, list) and v and
                                                                     isinstance(v[0], dict))]
        if not ds:
            return False
        p = rng.choice(ds)
        v = args[p]
        d = v if isinstance(v, dict) else v[0]
        choice = rng.randrange(5)
        if choice == 0 and d:
            d.pop(rng.choice(sorted(d)))
        elif choice == 1:
            d["zz"] = 1
        elif choice == 2 and d:
            key = rng.choice(sorted(d))
            d[key] = retype(d[key])
        elif choice == 3 and isinstance(v, list):
            v.reverse() if len(v) > 1 else v.append(copy.deepcopy(v[0]))
        elif choice == 4 and d:
            key = rng.choice(sorted(d))
            d[key] = d[key].upper() if isinstance(d[key], str) else d[key]

    def list_edit(name, args, k, o):
        ls = [p for p, v in args.items() if isinstance(v, list)]
        if not ls:
            return False
        p = rng.choice(ls)
        args[p] = rng.choice([list(reversed(args[p])), args[p][:-1], args[p] + args[p][:1], []])

    for fn in (drop, rename, wrong_type, null, extra_schema, extra_unknown, wrong_name, string_case, numbers,
               dict_edit, dict_edit, list_edit):
        edit(fn)
    if len(base) > 1:
        outs.append(list(reversed(base)))
        outs.append(base[:-1])
    outs.append(base + base[:1])
    return outs


def test_agreement_with_bfcl_ast_checker(ast_checker):
    rng = random.Random(14)
    total = agree = correct_total = correct_pass = 0
    misses = []
    for cat in CATS:
        for prompt in load_bfcl(f"bfcl:{cat}").prompts:
            for i, out in enumerate(perturb(prompt, rng)):
                theirs = ast_checker(prompt.functions, out, list(prompt.answers), cat)
                calls = [Call(n, a) for c in out for n, a in c.items()]
                ours = check(calls, list(prompt.answers), prompt.functions, cat) is None
                total += 1
                agree += ours == theirs
                if i == 0 and theirs:  # the ground truth's first values, as BFCL accepts them
                    correct_total += 1
                    correct_pass += ours
                if ours != theirs and len(misses) < 10:
                    misses.append((prompt.id, out, theirs))
    rate = agree / total
    print(f"\nBFCL agreement: {agree}/{total} = {rate:.4%}; exactly-correct answers passing: "
          f"{correct_pass}/{correct_total}")
    assert total > 15_000
    assert rate >= 0.999, misses
    assert correct_pass / correct_total >= 0.999, misses


def test_the_text_path_agrees_with_the_call_path(ast_checker):
    """The same verdicts when answers go through text and the JSON parser (a sample per category)."""
    rng = random.Random(7)
    for cat in CATS:
        for prompt in load_bfcl(f"bfcl:{cat}", limit=15).prompts:
            for out in perturb(prompt, rng)[:6]:
                text = "".join("<tool_call>" + json.dumps({"name": n, "arguments": a}) + "</tool_call>"
                               for c in out for n, a in c.items())
                theirs = ast_checker(prompt.functions, json.loads(json.dumps(out)), list(prompt.answers), cat)
                assert score(prompt, text, "stop").passed == theirs, (prompt.id, text)
