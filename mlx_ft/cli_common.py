"""What every command shares: logging to stderr, results to stdout, errors as exit codes.

``MlxftError``s become clean messages: exit 2 for bad input the user can fix, 1 for everything
else; an ``OSError`` names its file; Ctrl-C and SIGTERM leave finished work on disk.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import click

from mlx_ft.errors import MlxftError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mlxft never downloads; make any attempt fail fast
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def log(msg: str) -> None:
    click.echo(msg, err=True)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def errors(fn):
    """Turn MlxftError into a one-paragraph message and its exit code; no traceback for users."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _terminate)  # run finally blocks: children reaped, partial output removed
        try:
            return fn(*args, **kwargs)
        except MlxftError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # disk full, unwritable folder, ...: say which file, keep what is on disk
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"Error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted; finished work is kept on disk.", err=True)
            sys.exit(130)

    return wrapper


def emit(data, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)
