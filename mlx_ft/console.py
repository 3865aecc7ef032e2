"""What a person reads on stderr: logs, progress, and the output of libraries we run.

Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org): mlx-lm's
trainer prints through a rich console fixed to truecolor, which would put ``\\x1b[38;5;244m``
into every line of a log file or pipe.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterator

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def colour_ok(stream=None) -> bool:
    stream = stream or sys.stderr
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


class Plain(io.TextIOBase):
    """A text stream that writes to ``target`` with ANSI escape sequences removed."""

    def __init__(self, target):
        self.target = target

    def write(self, text: str) -> int:
        self.target.write(ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """Send what a library prints to stdout to stderr instead (stdout is for results), without
    colour unless stderr is a terminal that wants it."""
    target = sys.stderr if colour_ok(sys.stderr) else Plain(sys.stderr)
    with contextlib.redirect_stdout(target):
        yield


def progress_bar(label: str, stream=None, width: int = 30) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback drawing a bar on a terminal, or a line per quarter elsewhere."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    t0 = time.perf_counter()
    last = [-1]

    def update(done: int, total: int) -> None:
        if total <= 0:
            return
        rate = done / max(time.perf_counter() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        if tty:
            fill = int(width * done / total)
            stream.write(f"\r{label} [{'#' * fill}{'-' * (width - fill)}] {done}/{total} "
                         f"{rate:.1f}/s eta {eta:.0f}s" + ("\n" if done == total else ""))
            stream.flush()
        elif (quarter := 4 * done // total) != last[0]:
            last[0] = quarter
            stream.write(f"{label}: {done}/{total} ({rate:.1f}/s)\n")
            stream.flush()

    return update
