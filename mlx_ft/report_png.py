"""``report.png``: the report's main chart as an image beside report.md (for viewers that show
Markdown images but not HTML). matplotlib is an optional extra (``pip install 'mlxft[plot]'``);
without it the PNG is skipped and the user is told once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlx_ft.report_html import checkpoint_series

MISSING = ("matplotlib is not installed, so report.png (the chart beside report.md) was skipped; "
           "install it with: pip install 'mlxft[plot]'  (report.html has the same chart)")


def write_png(data: dict, path: Path, *, log: Callable[[str], None] = lambda s: None) -> bool:
    """Eval score, strict pass with 95% whiskers and val loss (right axis) per checkpoint; the eval
    and val-loss picks marked; fused models beside their adapter. False (and one message) without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log(MISSING)
        return False
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = checkpoint_series(data["evals"])
    best = data.get("best") or {}
    by = {p["name"]: p for p in series}
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    try:
        _scores(ax, series, by, best, data.get("fused", []))
        with_loss = [p for p in series if p["val_loss"] is not None]
        if with_loss:
            _val_loss(ax, with_loss, by, best)
        ax.set_title(f"{data['name']}: checkpoints on {data['suite']}")
        fig.tight_layout()
        _save_atomic(fig, Path(path))
    finally:
        plt.close(fig)
    return True


def _scores(ax, series: list[dict], by: dict, best: dict, fused: list[dict]) -> None:
    """Left axis: eval score, strict pass with whiskers, the eval pick, fused models."""
    steps = [p["step"] for p in series]
    ax.plot(steps, [p["score"] for p in series], "o-", color="#1565c0", label="eval score")
    ax.errorbar([s + 0.6 for s in steps], [p["strict"] for p in series],
                yerr=[[p["strict"] - p["lo"] for p in series], [p["hi"] - p["strict"] for p in series]],
                fmt="s", color="#2e7d32", capsize=3, markersize=4, label="strict pass (95% CI)")
    chosen = (best.get("chosen") or {}).get("name")
    if chosen in by:
        ax.plot([by[chosen]["step"]], [by[chosen]["score"]], "o", ms=14, mfc="none", mec="#1565c0")
        ax.annotate("eval pick", (by[chosen]["step"], by[chosen]["score"]), textcoords="offset points",
                    xytext=(0, 10), ha="center", fontsize=8)
    for f in fused:
        if f.get("source") in by:
            ax.plot([by[f["source"]]["step"] + 1.5], [f["score"]], "^", color="#c2185b", label=f"fused: {f['name']}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("eval score / strict pass")


def _val_loss(ax, with_loss: list[dict], by: dict, best: dict) -> None:
    """Right axis: val loss and the val-loss pick; one legend for both axes."""
    ax2 = ax.twinx()
    ax2.plot([p["step"] for p in with_loss], [p["val_loss"] for p in with_loss], "d--", color="#ef6c00",
             label="val loss")
    vpick = (best.get("val_loss_pick") or {}).get("name")
    if vpick in by and by[vpick]["val_loss"] is not None:
        ax2.annotate("val-loss pick", (by[vpick]["step"], by[vpick]["val_loss"]), textcoords="offset points",
                     xytext=(0, -14), ha="center", fontsize=8)
    ax2.set_ylabel("val loss")
    ax2.set_ylim(0, max(p["val_loss"] for p in with_loss) * 1.1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)


def _save_atomic(fig, path: Path) -> None:
    """Like files.write_text: a temp file in the same folder, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
