"""Jobs spread over the hosts of an ``mlx.launch`` hostfile, one job per host at a time.

Used for work that is independent per job -- one training seed, or a share of the checkpoints to
evaluate -- where data parallelism (``mlx.launch``, see distributed.py) would only add traffic.
The hostfile is mlx's own format, read with mlx's own parser. Like ``mlx.launch``, a host named
``127.0.0.1`` (or ``localhost``) runs its job as a local process; any other host runs it over
``ssh -o BatchMode=yes`` in the same working directory with the same Python, so every host needs
the same paths (docs/distributed.md; ``mlxft doctor --hosts`` checks). Each job's output folder
is copied back from a remote host (``rsync -a``) into the same place here, so the run folders end up
exactly as if everything had run on this machine. A failed job does not stop the others; the
failures are reported together at the end with each one's last output.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlx_ft.errors import ConfigError, MlxftError, SpreadError, UserError

LOCAL = ("127.0.0.1", "localhost")
SSH = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10")


@dataclass(frozen=True)
class Host:
    name: str  # what ssh connects to

    @property
    def local(self) -> bool:
        return self.name in LOCAL


@dataclass
class Job:
    label: str  # "seed 3", "eval step_000100,step_000200"
    argv: list[str]  # run on the host, in this working directory
    outputs: list[Path] = field(default_factory=list)  # folders to copy back from a remote host
    inputs: list[Path] = field(default_factory=list)  # files to copy to a remote host first (same path)
    log_path: Path | None = None  # the job's whole output is written here as it runs


def load_hosts(path: str | Path) -> list[Host]:
    """The hosts of an mlx.launch JSON hostfile: a list of ``{"ssh": NAME, "ips": [...]}``, or an
    object with that list under ``"hosts"`` (mlx.launch reads both). Every problem is reported."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found")
    example = '[{"ssh": "mac1.local", "ips": ["10.0.0.1"]}]; see docs/distributed.md'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(path, f"not JSON ({e}); expected e.g. {example}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise ConfigError(path, f"no hosts listed; expected e.g. {example}")
    problems = []
    for i, h in enumerate(hosts):
        if not isinstance(h, dict) or not isinstance(h.get("ssh"), str) or not h["ssh"]:
            problems.append(f"hosts[{i}]: needs \"ssh\": a host name to ssh into, e.g. {example}")
        elif not isinstance(h.get("ips", []), list) or not all(isinstance(x, str) for x in h.get("ips", [])):
            problems.append(f"hosts[{i}].ips: must be a list of IP address strings")
    if problems:
        raise ConfigError(path, problems)
    return [Host(h["ssh"]) for h in hosts]


def mlxft_argv(*args: str) -> list[str]:
    """``python -m mlx_ft ARGS`` with this interpreter (the same path is required on every host)."""
    return [sys.executable, "-m", "mlx_ft", *args]


def command(host: Host, argv: Sequence[str], cwd: Path | None = None) -> list[str]:
    """The local command line that runs ``argv`` on ``host`` in ``cwd`` (default: here)."""
    if host.local:
        return list(argv)
    cwd = Path(cwd or Path.cwd()).resolve()
    return [*SSH, host.name, f"cd {shlex.quote(str(cwd))} && {shlex.join(argv)}"]


def _rsync(host: Host, src: str, dst: str, what: str) -> None:
    if shutil.which("rsync") is None:
        raise UserError("rsync is needed to move files to and from remote hosts; install it")
    r = subprocess.run(["rsync", "-a", "-e", shlex.join(SSH), src, dst], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SpreadError(f"{host.name}: {what} failed: {r.stderr.strip()[-500:]}")


def push(host: Host, file: Path) -> None:
    """Copy ``file`` to the same path on ``host`` (nothing to do for a local host)."""
    if host.local:
        return
    file = file.resolve()
    r = subprocess.run([*SSH, host.name, f"mkdir -p {shlex.quote(str(file.parent))}"], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        raise SpreadError(f"{host.name}: cannot create {file.parent}: {r.stderr.strip()[-500:]}")
    _rsync(host, str(file), f"{host.name}:{file}", f"copying {file} there")


def fetch(host: Host, folder: Path) -> None:
    """Copy ``folder`` from ``host`` to the same path here (nothing to do for a local host)."""
    if host.local:
        return
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _rsync(host, f"{host.name}:{folder}/", f"{folder}/", f"copying {folder} back")


def _run_job(host: Host, job: Job, popen, tail: deque[str]) -> str | None:
    """Run one job on ``host``, its output into ``tail`` (and its log file); the reason it failed, or None."""
    try:
        for file in job.inputs:
            push(host, file)
        # stdin: never the user's terminal (ssh would forward it to the job and read keystrokes)
        proc = popen(command(host, job.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     stdin=subprocess.DEVNULL, env={**os.environ, "MLXFT_SPREAD_HOST": host.name})
        with contextlib.ExitStack() as stack:
            out = None
            if job.log_path:
                job.log_path.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(job.log_path.open("w"))
            for line in proc.stdout:
                tail.append(line.rstrip())
                if out:
                    out.write(line)
                    out.flush()
        rc = proc.wait()
        if rc != 0:
            return f"exit code {rc}"
        for folder in job.outputs:
            fetch(host, folder)
        return None
    except (OSError, MlxftError) as e:
        return str(e)


def spread(jobs: list[Job], hosts: list[Host], *, log: Callable[[str], None] = lambda s: None,
           popen=subprocess.Popen) -> None:
    """Run every job on some host, one job per host at a time; raise SpreadError listing all failures."""
    if not hosts:
        raise UserError("no hosts to spread the jobs over")
    todo: queue.Queue[Job] = queue.Queue()
    for j in jobs:
        todo.put(j)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(host: Host) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            log(f"[{host.name}] {job.label}: started" + (f" (output: {job.log_path})" if job.log_path else ""))
            tail: deque[str] = deque(maxlen=30)
            why = _run_job(host, job, popen, tail)
            if why is None:
                log(f"[{host.name}] {job.label}: done")
                continue
            with lock:
                failures.append(f"{job.label} on {host.name}: {why}\n    " + "\n    ".join(tail))
            log(f"[{host.name}] {job.label}: FAILED ({why})")

    threads = [threading.Thread(target=worker, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SpreadError(f"{len(failures)} of {len(jobs)} job(s) failed:\n" + "\n".join(failures))


def deal(items: list, n: int) -> list[list]:
    """``items`` dealt round-robin into at most ``n`` non-empty hands (order kept within each)."""
    hands = [items[i::n] for i in range(max(1, min(n, len(items))))]
    return [h for h in hands if h]
