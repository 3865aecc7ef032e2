"""The Qwen3-Coder XML example end to end on a real model: the embedded model with an XML-calling chat
template, trained briefly in mlx-lm's ``tools`` format, its checkpoints scored in the training loop
through the qwen3_coder parser chosen from the template (configs/demo-xml.yaml, cut down)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from .conftest import ROOT, small_suite  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def xml_model(tmp_path_factory, embedded_model):
    out = tmp_path_factory.mktemp("xml") / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--format", "xml", "--suite",
                    str(ROOT / "evals" / "tools-xml.yaml"), "--out", str(out.parent / "data"), "--model-out",
                    str(out)], check=True, capture_output=True, cwd=ROOT)
    return out


def test_the_xml_model_is_scored_with_its_own_parser_on_its_raw_text(tmp_path, xml_model):
    from mlx_lm.utils import load_tokenizer

    from mlx_ft.batch_decode import reply_text
    from mlx_ft.engine_batched import raw_text_machine
    from mlx_ft.evaluate import bind
    from mlx_ft.scoring import score
    from mlx_ft.suite import load_suite

    tok = load_tokenizer(xml_model)
    assert tok.has_tool_calling  # mlx-lm infers a tool parser from the template: the server would hide calls
    suite, parser = bind(load_suite(ROOT / "evals" / "tools-xml.yaml"), tok)
    assert parser.name == "qwen3_coder" and suite.tool_render == "template"
    call = ("<tool_call>\n<function=execute_code>\n<parameter=code>\nprint(read_file(path=\"docs/architecture.md\"))\n"
            "</parameter>\n</function>\n")  # the stop word </tool_call> ends generation before its own text
    text = reply_text(tok, raw_text_machine(suite.generation.stop_sequences), tok.encode(call, add_special_tokens=False),
                      "stop")
    assert text == call  # markers kept: the scorer sees what the model wrote
    prompt = next(p for p in suite.prompts if p.expect.tool == "read_file")
    s = score(suite, prompt, text, "stop", None, parser=parser)
    assert s.passed and s.code == "ok", s
    unwrapped = "<function=read_file>\n<parameter=path>\ndocs/architecture.md\n</parameter>\n</function>"
    assert score(suite, prompt, unwrapped, "stop", None, parser=parser).code == "bad_format"


def test_the_xml_example_trains_and_scores_in_the_loop(tmp_path, xml_model):
    from click.testing import CliRunner

    from mlx_ft.cli import main

    data = xml_model.parent / "data"
    suite = yaml.safe_load((ROOT / "evals" / "tools-xml.yaml").read_text())
    suite["prompts"] = suite["prompts"][:3]
    suite["generation"]["max_tokens"] = 24
    (tmp_path / "xml.yaml").write_text(yaml.safe_dump(suite))
    cfg = yaml.safe_load((ROOT / "configs" / "demo-xml.yaml").read_text())
    cfg.update(model=str(xml_model), data=str(data), eval_suite=str(tmp_path / "xml.yaml"), iters=2, save_every=2,
               batch_size=2, runs_dir=str(tmp_path / "runs"), num_layers=2)
    cfg.pop("fuse")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["train", "-c", str(tmp_path / "cfg.yaml")])
    assert r.exit_code == 0, r.output
    for name in ("base", "step_000002"):
        rec = json.loads((tmp_path / "runs" / "demo-xml" / "evals" / name / "tools-xml.json").read_text())
        assert rec["suite"]["parser"] == "qwen3_coder" and rec["suite"]["tool_render"] == "template"
        assert len(rec["results"]) == 3
