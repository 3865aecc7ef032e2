"""``report.html``: the report as one self-contained page that opens from disk.

Pure functions from the data ``report.py`` gathers to strings: inline SVG charts, one small inline
script for the per-prompt grid, no network (a Content-Security-Policy forbids it). Model replies
contain ``<tool_call>`` tags, so every piece of text is escaped: ``html.escape`` in markup, and
``<``/``>``/``&`` as ``\\u`` escapes in the embedded JSON the script reads with ``textContent``.
"""

from __future__ import annotations

import html
import json
import math

from mlx_ft.selection import wilson

CODE_COLORS = {
    "ok": "#2e7d32", "extra_text": "#9ccc65", "unwrapped": "#fdd835", "missing_arg": "#ffb74d",
    "wrong_arg_value": "#fb8c00", "wrong_tool": "#f4511e", "bad_json": "#c62828", "bad_format": "#ad1457",
    "prose": "#8e24aa",
    "think_onset": "#5e35b1", "truncated": "#3949ab", "server_error": "#212121",
}
OTHER_COLOR = "#9e9e9e"
W, H = 760, 340
ML, MR, MT, MB = 58, 66, 28, 46  # chart margins


def esc(x: object) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: object) -> str:
    """A number with its significant digits kept (a learning rate of 5e-4 stays 0.0005)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    return str(x) if isinstance(x, int) else f"{x:.4g}"


def json_for_script(data: object) -> str:
    """JSON that cannot end the ``<script>`` element it sits in, whatever the model wrote."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def checkpoint_series(evals: dict[str, dict]) -> list[dict]:
    """One point per evaluated target: step, rubric score, strict pass with its 95% Wilson interval,
    val loss. Shared by the HTML chart and the PNG."""
    out = []
    for name, rec in evals.items():
        s, t = rec["summary"], rec["target"]
        n = s["n"]
        k = sum(bool(r["passed"]) for r in rec["results"])
        lo, hi = wilson(k, n)
        out.append({"name": name, "step": t.get("step") or 0, "score": s["score"], "strict": s["pass_rate"],
                    "lo": lo, "hi": hi, "val_loss": t.get("val_loss")})
    return sorted(out, key=lambda p: p["step"])


def t_interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half width of its 95% t-interval (None for fewer than two values)."""
    from scipy import stats

    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, float(stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values)))


class _Axes:
    """Linear maps from data to SVG pixels for one chart."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, w: int = W, h: int = H):
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.w, self.h = w, h

    def x(self, v: float) -> float:
        return round(ML + (v - self.x0) / (self.x1 - self.x0) * (self.w - ML - MR), 1)

    def y(self, v: float, lo: float | None = None, hi: float | None = None) -> float:
        lo = self.y0 if lo is None else lo
        hi = self.y1 if hi is None else hi
        return round(self.h - MB - (v - lo) / (hi - lo) * (self.h - MT - MB), 1)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def _frame(ax: _Axes, steps: list[int], left_label: str, right: tuple[float, float, str] | None) -> list[str]:
    out = []
    for v in _ticks(0, 1):
        y = ax.y(v)
        out.append(f'<line class="grid" x1="{ML}" x2="{ax.w - MR}" y1="{y}" y2="{y}"/>'
                   f'<text class="tick" x="{ML - 6}" y="{y + 4}" text-anchor="end">{round(100 * v)}%</text>')
    if right:
        lo, hi, label = right
        for v in _ticks(lo, hi):
            out.append(f'<text class="tick" x="{ax.w - MR + 6}" y="{ax.y(v, lo, hi) + 4}">{v:.2f}</text>')
        out.append(f'<text class="axis" transform="translate({ax.w - 14},{(ax.h - MB + MT) / 2}) rotate(90)" '
                   f'text-anchor="middle">{esc(label)}</text>')
    for s in steps:
        out.append(f'<text class="tick" x="{ax.x(s)}" y="{ax.h - MB + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text class="axis" x="{(ax.w + ML - MR) / 2}" y="{ax.h - 8}" text-anchor="middle">step</text>'
               f'<text class="axis" transform="translate(14,{(ax.h - MB + MT) / 2}) rotate(-90)" '
               f'text-anchor="middle">{esc(left_label)}</text>'
               f'<line class="frame" x1="{ML}" x2="{ML}" y1="{MT}" y2="{ax.h - MB}"/>'
               f'<line class="frame" x1="{ML}" x2="{ax.w - MR}" y1="{ax.h - MB}" y2="{ax.h - MB}"/>')
    return out


def _poly(cls: str, pts: list[tuple[float, float]]) -> str:
    return f'<polyline class="{cls}" points="{" ".join(f"{x},{y}" for x, y in pts)}"/>' if len(pts) > 1 else ""


def main_chart(series: list[dict], fused: list[dict], eval_pick: str | None, val_pick: str | None) -> str:
    """Eval score, strict pass (95% Wilson whiskers) and val loss (right axis) per checkpoint."""
    steps = [p["step"] for p in series]
    ax = _Axes(min(steps), max(steps), 0, 1)
    losses = [p["val_loss"] for p in series if p["val_loss"] is not None]
    vhi = max(losses) * 1.1 if losses else 1.0
    out = _frame(ax, steps, "eval score / strict pass", (0.0, vhi, "val loss"))
    out.append(_poly("line-score", [(ax.x(p["step"]), ax.y(p["score"])) for p in series]))
    out.append(_poly("line-val", [(ax.x(p["step"]), ax.y(p["val_loss"], 0, vhi)) for p in series
                                  if p["val_loss"] is not None]))
    by_name = {p["name"]: p for p in series}
    for p in series:
        x = ax.x(p["step"])
        ylo, yhi, ys = ax.y(p["lo"]), ax.y(p["hi"]), ax.y(p["strict"])
        out.append(f'<g class="whisker" data-name="{esc(p["name"])}"><line x1="{x + 5}" x2="{x + 5}" y1="{ylo}" '
                   f'y2="{yhi}"/><line x1="{x + 1}" x2="{x + 9}" y1="{ylo}" y2="{ylo}"/>'
                   f'<line x1="{x + 1}" x2="{x + 9}" y1="{yhi}" y2="{yhi}"/></g>')
        out.append(f'<rect class="pt-strict" data-name="{esc(p["name"])}" x="{x + 2}" y="{ys - 3}" width="6" height="6">'
                   f'<title>{esc(p["name"])}: strict pass {pct(p["strict"])} (95% CI {pct(p["lo"])}-{pct(p["hi"])})'
                   f'</title></rect>')
        out.append(f'<circle class="pt-score" data-name="{esc(p["name"])}" cx="{x}" cy="{ax.y(p["score"])}" r="4">'
                   f'<title>{esc(p["name"])}: eval score {pct(p["score"])}</title></circle>')
        if p["val_loss"] is not None:
            yv = ax.y(p["val_loss"], 0, vhi)
            out.append(f'<circle class="pt-val" data-name="{esc(p["name"])}" cx="{x}" cy="{yv}" r="3">'
                       f'<title>{esc(p["name"])}: val loss {p["val_loss"]:.3f}</title></circle>')
    if eval_pick in by_name:
        p = by_name[eval_pick]
        x, y = ax.x(p["step"]), ax.y(p["score"])
        out.append(f'<circle class="mark-eval-pick" cx="{x}" cy="{y}" r="9"/>'
                   f'<text class="label" x="{x}" y="{y - 14}" text-anchor="middle">eval pick</text>')
    if val_pick in by_name and by_name[val_pick]["val_loss"] is not None:
        p = by_name[val_pick]
        x, y = ax.x(p["step"]), ax.y(p["val_loss"], 0, vhi)
        out.append(f'<circle class="mark-val-pick" cx="{x}" cy="{y}" r="8"/>'
                   f'<text class="label" x="{x}" y="{y + 20}" text-anchor="middle">val-loss pick</text>')
    for f in fused:
        if f.get("source") not in by_name:
            continue
        x, y = ax.x(by_name[f["source"]]["step"]) + 14, ax.y(f["score"])
        out.append(f'<path class="pt-fused" data-name="{esc(f["name"])}" d="M{x},{y - 5} L{x + 5},{y + 4} '
                   f'L{x - 5},{y + 4} Z"><title>{esc(f["label"])}: eval score {pct(f["score"])}, strict pass '
                   f'{pct(f["strict"])}</title></path>')
    legend = [("#1565c0", "eval score"), ("#2e7d32", "strict pass, 95% CI"), ("#ef6c00", "val loss (right axis)"),
              ("#c2185b", "fused model (beside its adapter)")]
    for i, (color, label) in enumerate(legend):
        x = ML + 10 + i * 160
        out.append(f'<line class="legend" stroke="{color}" stroke-width="3" x1="{x}" x2="{x + 18}" y1="12" y2="12"/>'
                   f'<text class="tick" x="{x + 24}" y="16">{label}</text>')
    return _svg("chart-main", "Eval score and val loss per checkpoint", out)


def _svg(id_: str, title: str, body: list[str], w: int = W, h: int = H) -> str:
    return (f'<svg id="{id_}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{esc(title)}">'
            + "".join(body) + "</svg>")


def heatmap(evals: dict[str, dict]) -> str:
    """Rubric score per checkpoint (rows) and category (columns)."""
    names = list(evals)
    cats = list(next(iter(evals.values()))["summary"]["categories"]) if evals else []
    cw, ch, top = 92, 24, 70
    left = 16 + 7 * max((len(n) for n in names), default=8)
    out = []
    for j, c in enumerate(cats):
        x = left + j * cw + cw / 2
        out.append(f'<text class="tick" transform="translate({x},{top - 8}) rotate(-30)">{esc(c)}</text>')
    for i, n in enumerate(names):
        y = top + i * ch
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 16}" text-anchor="end">{esc(n)}</text>')
        for j, c in enumerate(cats):
            v = evals[n]["summary"]["categories"].get(c, {}).get("score")
            fill = OTHER_COLOR if v is None else f"hsl({round(120 * v)},55%,{round(78 - 30 * v)}%)"
            x = left + j * cw
            out.append(f'<rect class="heat" data-name="{esc(n)}" data-category="{esc(c)}" x="{x}" y="{y}" '
                       f'width="{cw - 2}" height="{ch - 2}" fill="{fill}"><title>{esc(n)} / {esc(c)}: {pct(v)}'
                       f'</title></rect><text class="cell" x="{x + cw / 2}" y="{y + 16}" text-anchor="middle">'
                       f'{pct(v)}</text>')
    return _svg("chart-heat", "Rubric score per checkpoint and category", out, left + len(cats) * cw + 10,
                top + len(names) * ch + 10)


def prompt_grid(evals: dict[str, dict]) -> tuple[str, dict]:
    """Checkpoint × prompt cells coloured by failure code, and the data a click shows."""
    names = list(evals)
    first = next(iter(evals.values()))["results"] if evals else []
    ids = [r["id"] for r in first]
    cw, ch, top = 16, 18, 8
    left = 16 + 7 * max((len(n) for n in names), default=8)
    out, cells = [], []
    for i, n in enumerate(names):
        y = top + i * ch
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 13}" text-anchor="end">{esc(n)}</text>')
        rows = {r["id"]: r for r in evals[n]["results"]}
        row = []
        for j, pid in enumerate(ids):
            r = rows.get(pid)
            code = r["code"] if r else "missing"
            out.append(f'<rect class="cell-prompt" data-t="{i}" data-p="{j}" data-code="{esc(code)}" '
                       f'x="{left + j * cw}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                       f'fill="{CODE_COLORS.get(code, OTHER_COLOR)}"><title>{esc(n)} / {esc(pid)}: {esc(code)}'
                       f'</title></rect>')
            row.append({"id": pid, "category": r["category"], "code": code, "value": r["value"],
                        "explanation": r.get("explanation"), "text": r.get("text"),
                        "finish": r.get("finish_reason")} if r else {"id": pid, "code": code})
        cells.append(row)
    h = top + len(names) * ch + 8
    svg = _svg("chart-grid", "Failure code per checkpoint and prompt", out, left + len(ids) * cw + 10, h)
    return svg, {"targets": names, "cells": cells}


def legend_codes(evals: dict[str, dict]) -> str:
    seen = {r["code"] for rec in evals.values() for r in rec["results"]}
    return "".join(f'<span class="code"><i style="background:{CODE_COLORS.get(c, OTHER_COLOR)}"></i>{esc(c)}</span>'
                   for c in [*CODE_COLORS, *sorted(seen - set(CODE_COLORS))] if c in seen)


def seed_chart(seeds: list[dict]) -> str:
    """One line per run (seed): eval score per step; the mean with its 95% t-interval where every
    run has that step."""
    steps = sorted({s for run in seeds for s in run["points"]})
    ax = _Axes(min(steps), max(steps), 0, 1)
    out = _frame(ax, steps, "eval score", None)
    palette = ["#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e", "#283593"]
    for i, run in enumerate(seeds):
        color = palette[i % len(palette)]
        pts = sorted(run["points"].items())
        out.append(f'<polyline class="seed-line" data-run="{esc(run["name"])}" stroke="{color}" points="'
                   + " ".join(f"{ax.x(s)},{ax.y(v)}" for s, v in pts) + '"/>')
        out += [f'<circle class="pt-seed" data-run="{esc(run["name"])}" cx="{ax.x(s)}" cy="{ax.y(v)}" r="3" '
                f'fill="{color}"><title>{esc(run["name"])} step {s}: {pct(v)}</title></circle>' for s, v in pts]
        out.append(f'<text class="tick" x="{ML + 10 + i * 150}" y="16" fill="{color}">— {esc(run["name"])}</text>')
    common = [s for s in steps if all(s in run["points"] for run in seeds)]
    means = []
    for s in common:
        m, half = t_interval([run["points"][s] for run in seeds])
        means.append((s, m))
        if half is not None:
            x = ax.x(s)
            out.append(f'<line class="whisker-seed" x1="{x}" x2="{x}" y1="{ax.y(max(0.0, m - half))}" '
                       f'y2="{ax.y(min(1.0, m + half))}"><title>step {s}: mean {pct(m)} ± {pct(half)} (95% t)'
                       f'</title></line>')
    out.append(_poly("seed-mean", [(ax.x(s), ax.y(m)) for s, m in means]))
    return _svg("chart-seeds", "Eval score per step, one line per run", out)


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#212121;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
svg{max-width:100%;height:auto;background:#fff}
.grid{stroke:#eee}.frame{stroke:#999}.tick{font-size:11px;fill:#555}.axis{font-size:12px;fill:#333}
.label{font-size:11px;font-weight:600;fill:#000}.cell{font-size:11px;fill:#111}
.line-score{fill:none;stroke:#1565c0;stroke-width:2}.pt-score{fill:#1565c0}
.line-val{fill:none;stroke:#ef6c00;stroke-width:1.5;stroke-dasharray:5 3}.pt-val{fill:#ef6c00}
.pt-strict{fill:#2e7d32}.whisker line{stroke:#2e7d32;stroke-width:1.2}.pt-fused{fill:#c2185b}
.mark-eval-pick{fill:none;stroke:#1565c0;stroke-width:2}.mark-val-pick{fill:none;stroke:#ef6c00;stroke-width:2}
.seed-line{fill:none;stroke-width:1.5}.seed-mean{fill:none;stroke:#000;stroke-width:2.5}
.whisker-seed{stroke:#000;stroke-width:1.5}
.cell-prompt{cursor:pointer}.cell-prompt:hover,.cell-prompt.sel{stroke:#000;stroke-width:2}
.code{display:inline-block;margin-right:12px;font-size:12px}.code i{display:inline-block;width:11px;height:11px;
margin-right:4px;vertical-align:-1px}
#detail{border:1px solid #ccc;padding:8px 12px;margin-top:8px;min-height:80px;background:#fafafa}
#detail pre{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #eee;padding:6px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
pre.cmd{background:#f4f4f4;padding:8px;overflow-x:auto}.reason{background:#f5f9ff;padding:8px 12px}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('grid-data').textContent);
  var d = document.getElementById('detail');
  function show(el){
    var c = data.cells[+el.getAttribute('data-t')][+el.getAttribute('data-p')];
    document.querySelectorAll('.cell-prompt.sel').forEach(function(x){x.classList.remove('sel');});
    el.classList.add('sel');
    d.querySelector('.d-head').textContent = data.targets[+el.getAttribute('data-t')] + ' / ' + c.id +
      ' (' + (c.category || '') + '): ' + c.code + (c.value === undefined ? '' : ', score ' + c.value);
    d.querySelector('.d-expl').textContent = c.explanation || '';
    d.querySelector('.d-text').textContent = c.text === null || c.text === undefined ? '(no reply)' : c.text;
  }
  document.querySelectorAll('.cell-prompt').forEach(function(el){
    el.addEventListener('click', function(){show(el);});
    el.addEventListener('mouseenter', function(){show(el);});
  });
})();
"""


def _table(heads: list[str], rows: list[list]) -> str:
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def render(data: dict) -> str:
    """The whole page from the data ``report.gather`` returns."""
    run, evals, best = data["run"], data["evals"], data.get("best")
    body = [f"<h1>mlxft report: {esc(data['name'])}</h1>"]
    if best:
        lines = best["reason"].splitlines()
        body.append(f'<div class="reason"><b>Chosen: {esc(best["chosen"]["name"])}</b> — {esc(lines[0])}'
                    + "".join(f"<br>{esc(x)}" for x in lines[1:]) + "</div>")
    if evals:
        series = checkpoint_series(evals)
        vp = best["val_loss_pick"]["name"] if best and best.get("val_loss_pick") else None
        body += [f"<h2>Checkpoints on {esc(data['suite'])}</h2>",
                 main_chart(series, data.get("fused", []), best["chosen"]["name"] if best else None, vp),
                 "<h2>Per category (rubric score)</h2>", heatmap(evals)]
        grid, cells = prompt_grid({**evals, **data.get("fused_evals", {})})
        body += ["<h2>Per prompt (click or hover a cell for the raw reply)</h2>", f"<div>{legend_codes(evals)}</div>",
                 grid, ('<div id="detail"><div class="d-head">Click a cell.</div><div class="d-expl"></div>'
                        '<pre class="d-text"></pre></div>'),
                 f'<script type="application/json" id="grid-data">{json_for_script(cells)}</script>']
    else:
        body.append(f"<p>No eval results on {esc(data['suite'])} yet: run <code>mlxft eval --run "
                    f"{esc(data['run_dir'])}</code>.</p>")
    seeds = data.get("seeds") or []
    if len(seeds) > 1:
        drawn = [s for s in seeds if s["points"]]  # a run not evaluated yet has no line
        body += ["<h2>Runs (seeds)</h2>", seed_chart(drawn) if len(drawn) > 1 else ""]
        picked = [s["chosen_score"] for s in seeds if s.get("chosen_score") is not None]
        if picked:
            m, half = t_interval(picked)
            body.append(f"<p>Eval pick per run: mean {pct(m)}" + (f" ± {pct(half)} (95% t" if half is not None else
                                                                   " (") + f", {len(picked)} runs).</p>")
        body.append(_table(["run", "eval pick", "score"], [[s["name"], s.get("chosen") or "(no best.json)",
                                                             pct(s.get("chosen_score"))] for s in seeds]))
    cfg = run.get("config", {})
    body += ["<h2>Settings</h2>", _table(["setting", "value"], [[k, num(v) if not isinstance(v, dict) else
                                                                  json.dumps(v)] for k, v in cfg.items()]),
             "<h2>Versions</h2>", _table(["package", "version"], [[k, v] for k, v in run.get("versions", {}).items()]),
             "<h2>Reproduce</h2>", f'<pre class="cmd">{esc(data["commands"])}</pre>']
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{csp}"><title>mlxft report: {esc(data["name"])}</title><style>{STYLE}</style></head><body>'
            + "\n".join(body) + f"<script>{SCRIPT}</script></body></html>\n")
