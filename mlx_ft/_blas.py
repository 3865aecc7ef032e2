"""Put a fast BLAS under mlx on Linux CPU before mlx is first imported.

The Linux ``mlx[cpu]`` wheel links ``cblas_sgemm`` dynamically against a bundled reference BLAS
(~5 GFLOP/s here). Loading the system OpenBLAS with ``RTLD_GLOBAL`` first makes the dynamic linker
resolve mlx's BLAS symbols to it (~75 GFLOP/s on the same 2 cores) -- no re-exec and no
``LD_PRELOAD`` needed for our own process. Child processes (``mlx_lm.server``) get ``LD_PRELOAD``
through :func:`child_env`. Set ``MLXFT_FAST_BLAS=0`` to opt out (benchmarks use that).
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "sudo apt-get install -y libopenblas0-pthread"

loaded: str | None = None


def find_openblas() -> str | None:
    """Path of a system OpenBLAS, or None (always None off Linux: Metal/Accelerate need none)."""
    if not sys.platform.startswith("linux"):
        return None
    return next((p for p in CANDIDATES if os.path.exists(p)), None)


def enabled() -> bool:
    return os.environ.get("MLXFT_FAST_BLAS", "1") not in ("0", "false", "no", "off")


def preload() -> str | None:
    """Load OpenBLAS globally if possible; returns its path. A no-op once mlx is imported."""
    global loaded
    if loaded or not enabled() or "mlx.core" in sys.modules:
        return loaded
    path = find_openblas()
    if path:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded = path
        except OSError:
            loaded = None
    return loaded


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an mlx child process, with the fast BLAS preloaded when we use it."""
    env = dict(os.environ if env is None else env)
    path = find_openblas() if enabled() else None
    if path and path not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD")) if p)
    return env
