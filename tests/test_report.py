"""mlxft report on a realistic run folder (tests/report_fixture.py): report.md's content, the
numbers it prints, report.html's structure and escaping, and the PNG with and without matplotlib."""

from __future__ import annotations

import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main
from mlx_ft.report_html import json_for_script, num

from .report_fixture import STEPS, make_fused, make_report_run

TARGETS = ["base"] + [f"step_{s:06d}" for s in STEPS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three seeds of one recipe, each with best.json from the pick-best command, and a fused model."""
    root = tmp_path_factory.mktemp("report")
    out = {name: make_report_run(root, name, seed=i) for i, name in enumerate(("demo", "demo-s1", "demo-s2"))}
    for run in out.values():
        r = CliRunner().invoke(main, ["pick-best", "--run", str(run), "--bootstrap", "50"])
        assert r.exit_code == 0, r.output
    out["fused"] = make_fused(root, out["demo"])
    return out


def report(tmp_path: Path, runs: dict, *extra: str):
    """`mlxft report` on a copy of the demo run (so each test sees only its own outputs)."""
    run = tmp_path / "demo"
    shutil.copytree(runs["demo"], run)
    args = ["report", "--run", str(run), "--compare", str(runs["fused"]), "--compare", str(runs["demo-s1"]),
            "--compare", str(runs["demo-s2"]), *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return run, res


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str, cls: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and cls in (a.get("class") or "").split()]


def parse(page: str) -> Tags:
    t = Tags()
    t.feed(page)
    return t


def evals(run: Path, name: str) -> dict:
    return json.loads((run / "evals" / name / "tools.json").read_text())


def test_learning_rate_keeps_its_significant_digits(tmp_path, runs):
    assert [num(x) for x in (5e-4, 1e-5, 2e-3, 0.1234567, 3, None)] == ["0.0005", "1e-05", "0.002", "0.1235", "3", "-"]
    run, _ = report(tmp_path, runs)
    md = (run / "report.md").read_text()
    assert "lr 0.0005," in md
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| 25 | ")]
    assert rows and rows[0][3] == "0.0005"  # step | train loss | val loss | lr | tokens/s
    assert "| 0.001 |" not in md


def test_eval_seconds_are_not_repeated_batch_times(tmp_path, runs):
    run, _ = report(tmp_path, runs)
    md = (run / "report.md").read_text()
    wall = max(evals(run, n)["seconds"] for n in TARGETS)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith(("| base |", "| step_"))}
    assert all(rows[n][6] == "batch" for n in TARGETS), rows  # the 'eval s' column
    assert md.count(f"took {wall:.1f} s in all") == 1

    # a server-engine eval has a time of its own: shown as is
    rec = evals(run, "step_000050")
    rec["engine"] = {"name": "server"}
    rec["seconds"] = 12.34
    (run / "evals" / "step_000050" / "tools.json").write_text(json.dumps(rec))
    assert CliRunner().invoke(main, ["report", "--run", str(run)]).exit_code == 0
    md = (run / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| step_000050 |"))
    assert row.split(" | ")[6] == "12.340"


def test_report_md_shows_the_choice_and_links_the_charts(tmp_path, runs):
    run, res = report(tmp_path, runs)
    best = json.loads((run / "best.json").read_text())
    md = (run / "report.md").read_text()
    first = best["reason"].splitlines()[0]
    assert f"**Chosen: {best['chosen']['name']}** — {first}" in md
    assert "[report.html](report.html)" in md and "](report.png)" in md
    assert "fused 5-bit of step_000050" in md and "| demo-s1 |" in md
    assert res.stdout.split() == [str(run / "report.md"), str(run / "report.html"), str(run / "report.png")]


def test_report_html_structure_and_escaping(tmp_path, runs):
    run, _ = report(tmp_path, runs)
    page = (run / "report.html").read_text()
    t = parse(page)
    n_prompts = len(evals(run, "base")["results"])
    cats = evals(run, "base")["summary"]["categories"]
    assert len(t.find("circle", "pt-score")) == len(TARGETS)
    assert len(t.find("rect", "pt-strict")) == len(TARGETS)
    assert len(t.find("g", "whisker")) == len(TARGETS)
    assert len(t.find("circle", "pt-val")) == len(TARGETS)
    assert [a["data-name"] for a in t.find("path", "pt-fused")] == [runs["fused"].name]
    assert len(t.find("circle", "mark-eval-pick")) == 1 and len(t.find("circle", "mark-val-pick")) == 1
    assert len(t.find("rect", "heat")) == len(TARGETS) * len(cats)
    assert len(t.find("rect", "cell-prompt")) == (len(TARGETS) + 1) * n_prompts
    assert len(t.find("polyline", "seed-line")) == 3
    # the eval pick's ring sits on the chosen checkpoint's score point
    chosen = json.loads((run / "best.json").read_text())["chosen"]["name"]
    ring = t.find("circle", "mark-eval-pick")[0]
    point = next(a for a in t.find("circle", "pt-score") if a["data-name"] == chosen)
    assert (ring["cx"], ring["cy"]) == (point["cx"], point["cy"])
    # the cells carry each failure code, and the grid data every raw reply, escaped
    codes = [a["data-code"] for a in t.find("rect", "cell-prompt")[:n_prompts]]
    assert codes == [r["code"] for r in evals(run, "base")["results"]]
    assert "<tool_call>" not in page and "<b>&amp; then" not in page  # fixture replies hold both
    blob = page.split('<script type="application/json" id="grid-data">')[1].split("</script>")[0]
    grid = json.loads(blob)
    assert grid["cells"][2][0]["text"] == evals(run, "step_000050")["results"][0]["text"]
    # self-contained: nothing to fetch, and a policy that forbids fetching
    assert not [a for _, a in t.tags if "src" in a or "href" in a]
    assert "default-src 'none'" in page
    assert "mlxft train -c config.yaml" in page and "learning_rate: 0.0005" in page
    assert f"mlxft report --run {run}" in page and "mlxft fuse --adapter" in page


def test_json_in_a_script_cannot_close_it():
    nasty = {"text": "</script><script>alert(1)</script> & <tool_call>"}
    s = json_for_script(nasty)
    assert "<" not in s and ">" not in s and "&" not in s
    assert json.loads(s) == nasty


def test_png_is_skipped_and_said_once_without_matplotlib(tmp_path, runs, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    run, res = report(tmp_path, runs)
    assert res.stderr.count("matplotlib is not installed") == 1
    assert "pip install 'mlxft[plot]'" in res.stderr
    assert not (run / "report.png").exists()
    assert "report.png" not in (run / "report.md").read_text()
    assert (run / "report.html").is_file()


def test_png_beside_report_md(tmp_path, runs):
    pytest.importorskip("matplotlib")
    run, res = report(tmp_path, runs)
    png = (run / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "matplotlib" not in res.stderr


def test_unknown_compare_folder_is_refused_before_writing(tmp_path, runs):
    run = tmp_path / "demo"
    shutil.copytree(runs["demo"], run)
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["report", "--run", str(run), "--compare", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "neither a run folder nor a model folder" in res.output
    assert not (run / "report.md").exists() and not (run / "report.html").exists()


def test_a_run_without_evals_still_gets_a_page(tmp_path, runs):
    run = tmp_path / "demo"
    shutil.copytree(runs["demo"], run)
    shutil.rmtree(run / "evals")
    (run / "best.json").unlink()
    res = CliRunner().invoke(main, ["report", "--run", str(run)])
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert "No eval results on tools yet" in page and 'id="chart-main"' not in page
    assert not (run / "report.png").exists() and "## Checkpoints" not in (run / "report.md").read_text()
