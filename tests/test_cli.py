"""Bad input through the CLI: exit code 2, one clear message naming file/line/key and the fix,
no traceback, nothing on disk changed. Cheap cases only (no model is loaded for any of them)."""

from __future__ import annotations

import json
import re
import struct

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main

from .conftest import copy_suite, tree_snapshot, write_jsonl

GOOD = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "a"}]}


def setup_case(tmp_path, kind):
    """Build the workspace for one case; returns the CLI args."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [GOOD] * 4)
    write_jsonl(data / "valid.jsonl", [GOOD] * 4)
    cfg = tmp_path / "cfg.yaml"
    train = ["train", "--runs-dir", str(tmp_path / "runs"), "--data", str(data), "--model", str(tmp_path / "nomodel")]

    def with_cfg(text):
        cfg.write_text(text)
        return ["train", "-c", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--data", str(data)]

    def with_data(rows, split="train"):
        write_jsonl(data / f"{split}.jsonl", rows)
        return train

    def suite(edit):
        return ["eval", "--prompts", str(copy_suite(tmp_path, edit)), "--model", str(tmp_path / "nomodel")]

    cases = {
        "yaml_syntax": lambda: with_cfg("iters: [1, 2\n"),
        "unknown_key": lambda: with_cfg("learning_rat: 1e-4\n"),
        "wrong_type": lambda: with_cfg("batch_size: four\n"),
        "bool_as_number": lambda: with_cfg("mask_prompt: 3\n"),
        "zero_iters": lambda: with_cfg("iters: 0\n"),
        "negative_save_every": lambda: with_cfg("save_every: -10\n"),
        "top_level_list": lambda: with_cfg("- a\n- b\n"),
        "missing_config": lambda: ["train", "-c", str(tmp_path / "nope.yaml")],
        "missing_model": lambda: train,
        "empty_train": lambda: with_data([]),
        "invalid_json_line": lambda: with_data([GOOD, "{oops", GOOD, GOOD]),
        "wrong_role": lambda: with_data([{"messages": [{"role": "human", "content": "x"},
                                                       {"role": "assistant", "content": "y"}]}] * 4),
        "empty_assistant": lambda: with_data([{"messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": ""}]}] * 4),
        "too_few_examples": lambda: with_data([GOOD], split="valid") + ["--batch-size", "4"],
        "bad_seeds": lambda: train + ["--seeds", "1,x"],
        "suite_duplicate_ids": lambda: suite(lambda d: d["prompts"][1].update(id=d["prompts"][0]["id"])),
        "suite_missing_tool": lambda: suite(lambda d: d["prompts"][0]["expect"].pop("tool")),
        "suite_unknown_tool": lambda: suite(lambda d: d["prompts"][0]["expect"].update(tool="nope")),
        "suite_bad_rubric": lambda: suite(lambda d: d["rubric"].update(direct=1.5)),
        "suite_unknown_key": lambda: suite(lambda d: d.update(temperature=0)),
        "eval_port_out_of_range": lambda: ["eval", "--model", str(tmp_path), "--engine", "server", "--port", "70000"],
        "eval_port_without_server": lambda: ["eval", "--model", str(tmp_path), "--port", "8080"],
        "eval_run_without_manifests": lambda: (tmp_path / "runs" / "x").mkdir(parents=True) or
        ["eval", "--run", str(tmp_path / "runs" / "x")],
        "pick_best_not_a_run": lambda: ["pick-best", "--run", str(tmp_path)],
        "fuse_bad_bits": lambda: ["fuse", "--adapter", str(tmp_path), "--bits", "7"],
        "fuse_bad_group": lambda: ["fuse", "--adapter", str(tmp_path), "--bits", "4", "--group-size", "48"],
        "fuse_no_best": lambda: (tmp_path / "runs" / "y").mkdir(parents=True) or
        ["fuse", "--run", str(tmp_path / "runs" / "y"), "--no-eval"],
        "fuse_not_a_checkpoint": lambda: ["fuse", "--adapter", str(tmp_path / "data"), "--no-eval"],
        "gguf_missing": lambda: ["import-gguf", str(tmp_path / "x.gguf"), str(tmp_path / "out")],
        "gguf_not_gguf": lambda: [(tmp_path / "x.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 8),
                                  ["import-gguf", str(tmp_path / "x.gguf"), str(tmp_path / "out")]][1],
        "gguf_output_exists": lambda: (tmp_path / "out").mkdir() or
        ["import-gguf", str(__import__("mlx_ft.models").models.default_gguf()), str(tmp_path / "out")],
        "report_not_a_run": lambda: ["report", "--run", str(tmp_path)],
        "run_without_eval_suite": lambda: with_cfg(f"data: {data}\n") and ["run", "-c", str(cfg)],
        "early_stop_without_loop_eval": lambda: with_cfg("early_stop: {patience: 2}\n"),
    }
    return cases[kind]()


EXPECT = {
    "yaml_syntax": "line 2", "unknown_key": "learning_rat: unknown key", "wrong_type": "batch_size: expected an integer",
    "bool_as_number": "mask_prompt: expected true or false", "zero_iters": "iters: must be a positive integer",
    "negative_save_every": "save_every", "top_level_list": "top level must be a mapping",
    "missing_config": "file not found", "missing_model": "no such folder", "empty_train": "no examples",
    "invalid_json_line": "line 2: invalid JSON", "wrong_role": "role is 'human'",
    "empty_assistant": "assistant answer is empty", "too_few_examples": "batch_size is 4",
    "bad_seeds": "expected integers", "suite_duplicate_ids": "duplicate id",
    "suite_missing_tool": "tool: required key is missing", "suite_unknown_tool": "'nope' is not in the suite's tools",
    "suite_bad_rubric": "rubric.direct", "suite_unknown_key": "temperature: unknown key",
    "eval_port_out_of_range": "out of range", "eval_run_without_manifests": "no run.json",
    "pick_best_not_a_run": "no run.json", "fuse_bad_bits": "use one of 2, 3, 4, 5, 6, 8, 16",
    "fuse_bad_group": "--group-size 48", "fuse_no_best": "pick-best", "fuse_not_a_checkpoint": "not a checkpoint",
    "gguf_missing": "no such GGUF", "gguf_not_gguf": "not a readable GGUF",
    "gguf_output_exists": "already exists", "report_not_a_run": "no run.json",
    "eval_port_without_server": "--port is for --engine server", "run_without_eval_suite": "needs eval_suite",
    "early_stop_without_loop_eval": "early_stop: needs eval_during_training",
}


def test_every_bad_input_case_is_checked(tmp_path):
    """A case built in setup_case but missing from EXPECT would never run."""
    import inspect

    src = inspect.getsource(setup_case)
    built = set(re.findall(r'^        "(\w+)": lambda', src, flags=re.M))
    assert built == set(EXPECT)


@pytest.mark.parametrize("kind", sorted(EXPECT))
def test_bad_input_exits_2_with_a_clear_message(tmp_path, kind):
    args = setup_case(tmp_path, kind)
    before = tree_snapshot(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert EXPECT[kind] in r.output, r.output
    assert "Traceback" not in r.output
    assert tree_snapshot(tmp_path) == before  # nothing on disk changed


def test_all_problems_of_a_data_file_at_once(tmp_path):
    args = setup_case(tmp_path, "missing_model")
    write_jsonl(tmp_path / "data" / "train.jsonl", ["{x", GOOD, {"messages": []}, json.dumps({"a": 1})])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert "line 1" in r.output and "line 3" in r.output and "line 4" in r.output and "3 problem(s)" in r.output


def test_help_explains_every_command():
    r = CliRunner().invoke(main, ["--help"])
    for cmd in ("train", "eval", "pick-best", "fuse", "report", "import-gguf", "doctor"):
        assert cmd in r.output
    r = CliRunner().invoke(main, ["train", "--help"])
    assert "--save-every" in r.output and "--smoke" in r.output and "--resume" in r.output
