"""report.html in a real browser: headless Chromium (Debian's package) driven by Playwright.

Opens the page from disk, checks that the charts rendered (SVG elements present, with size, with
one point per checkpoint), that clicking a cell of the per-prompt grid shows that prompt's raw
reply, that the page ran without errors and requested nothing but file: and data: URLs, and keeps
a screenshot (tests/artifacts/report_browser.png). Skips when Playwright or Chromium is absent;
scripts/setup.sh installs both.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_ft.cli import main

from .report_fixture import STEPS, make_fused, make_report_run

CHROMIUM = Path(os.environ.get("MLXFT_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MLXFT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=90_000)
        try:
            yield b
        finally:
            b.close()


def test_report_html_renders_and_shows_replies_offline(tmp_path, browser):
    run = make_report_run(tmp_path, "demo")
    seeds = [make_report_run(tmp_path, f"demo-s{i}", seed=i) for i in (1, 2)]
    for r in (run, *seeds):
        assert CliRunner().invoke(main, ["pick-best", "--run", str(r), "--bootstrap", "0"]).exit_code == 0
    fused = make_fused(tmp_path, run)
    args = ["report", "--run", str(run), "--compare", str(fused), *[a for s in seeds for a in ("--compare", str(s))]]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    page_path = run / "report.html"

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else route.abort())
    page.goto(page_path.as_uri())

    n_targets = 1 + len(STEPS)
    for chart in ("#chart-main", "#chart-heat", "#chart-grid", "#chart-seeds"):
        box = page.locator(chart).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 50, chart
    assert page.locator("#chart-main circle.pt-score").count() == n_targets
    assert page.locator("#chart-main rect.pt-strict").count() == n_targets
    assert page.locator("#chart-main path.pt-fused").count() == 1
    assert page.locator("#chart-seeds polyline.seed-line").count() == 3
    first = page.locator("#chart-main circle.pt-score").first.bounding_box()
    assert first["width"] > 0 and first["height"] > 0  # drawn, not collapsed

    base = json.loads((run / "evals" / "base" / "tools.json").read_text())
    pick = json.loads((run / "evals" / "step_000050" / "tools.json").read_text())
    j = next(i for i, r in enumerate(pick["results"]) if r["text"] != base["results"][i]["text"])
    row = ["base", *(f"step_{s:06d}" for s in STEPS)].index("step_000050")
    page.locator(f'#chart-grid rect.cell-prompt[data-t="{row}"][data-p="{j}"]').click()
    detail = page.locator("#detail")
    assert page.locator("#detail .d-text").text_content() == pick["results"][j]["text"]
    assert pick["results"][j]["id"] in detail.locator(".d-head").text_content()
    assert pick["results"][j]["explanation"] in detail.text_content()
    page.locator(f'#chart-grid rect.cell-prompt[data-t="0"][data-p="{j}"]').hover()
    assert page.locator("#detail .d-text").text_content() == base["results"][j]["text"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = tmp_path / "report_browser.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    print(f"\nscreenshot: {ARTIFACTS / shot.name} ({shot.stat().st_size} bytes); report.html "
          f"{page_path.stat().st_size} bytes")
    assert shot.stat().st_size > 20_000
    assert not errors, errors
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
