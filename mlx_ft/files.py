"""Atomic writes: a reader sees the old file, the new file, or nothing -- never half a file.

Every stage's contract with the next is a file on disk, so every write goes through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mlx_ft.errors import CorruptFileError, MlxftError, OutputExistsError


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    write_text(path, text)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise MlxftError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return path


def read_json(path: str | Path) -> Any:
    """A JSON file's content; CorruptFileError (naming the file and the spot) if it is not JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                   "it may have been cut short by a crash or edited by hand: restore it, or "
                                   "redo the stage that writes it") from None


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line and flush it, so a killed process keeps every finished row."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a killed writer."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged_dir(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place only if the body succeeds.

    A failure (or Ctrl-C) removes the partial folder; an existing ``final`` is refused unless
    ``force``, and even then it is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not force:
        raise OutputExistsError(f"{final} already exists; pass --force to replace it, or choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would have made it, not mkdtemp's private 0700
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
