"""An ``mlx_lm.server`` child that is provably serving the model we meant.

An eval once scored the wrong model because port 8080 was taken and a health probe was answered by
another server. mlx-lm's server makes that easy to repeat: on a taken port it logs "Address already
in use" and *hangs*; ``/health`` says ok whatever is loaded; the response's ``model`` field echoes
the request; a per-request adapter is silently ignored unless ``model`` is sent too. So "ready"
here means all of:

1. the port was free on 127.0.0.1, ::1, 0.0.0.0 and :: before we started (Linux lets an IPv4 and
   an IPv6 server share a port number);
2. our child is alive and did not log a bind failure;
3. the OS says the listening socket on that port belongs to our child's PID;
4. ``/v1/models`` lists our model path;
5. a greedy probe answered by the server matches the fingerprint recorded for that checkpoint
   (checked per target, see :meth:`Server.verify`).

The child is always terminated and reaped (context manager; also on exceptions and Ctrl-C).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import httpx

from mlx_ft import _blas
from mlx_ft.engines import Reply
from mlx_ft.errors import PortInUseError, ServerError, WrongModelError
from mlx_ft.fingerprint import PROBE_MESSAGES, compare

HOST = "127.0.0.1"
CHECK_ADDRS = (("127.0.0.1", socket.AF_INET), ("0.0.0.0", socket.AF_INET), ("::1", socket.AF_INET6),
               ("::", socket.AF_INET6))
BIND_FAILURE = "Address already in use"
RETRIES = 4

Launcher = Callable[..., subprocess.Popen]


def _bindable(addr: str, family: int, port: int) -> bool:
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this machine: nothing can listen there either
        return True
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        return True
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return True
        return False
    finally:
        s.close()


def listeners(port: int) -> list[tuple[str, int | None]]:
    """(address, pid) of every socket listening on ``port`` (pid None when the OS won't say)."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return []
    return [(c.laddr.ip, c.pid) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def check_port_free(port: int) -> None:
    if not 1 <= port <= 65535:
        raise PortInUseError(f"--port {port} is out of range; use 1-65535, or leave it out to pick a free port")
    taken = [addr for addr, family in CHECK_ADDRS if not _bindable(addr, family, port)]
    if taken:
        holders = ", ".join(f"{a} (pid {p})" if p else a for a, p in listeners(port)) or ", ".join(taken)
        raise PortInUseError(
            f"port {port} is already in use on {', '.join(taken)} by {holders}; an eval there could score "
            "another model. Stop that process, or leave --port out to use a free port"
        )


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        try:
            check_port_free(port)
            return port
        except PortInUseError:
            continue
    raise ServerError("could not find a free port on 127.0.0.1")


class Server:
    """Context manager around one ``mlx_lm.server`` child for one base model."""

    def __init__(self, model: str | Path, *, port: int | None = None, log_path: str | Path | None = None,
                 max_tokens: int = 512, concurrency: int = 32, startup_timeout: float = 180.0,
                 launcher: Launcher = subprocess.Popen, transport: httpx.BaseTransport | None = None,
                 owner_check: Callable[[int, int], bool] | None = None, log: Callable[[str], None] = lambda s: None):
        self.model = str(Path(model).resolve())
        self.requested_port = port
        self.port: int | None = None
        self.log_path = Path(log_path) if log_path else None
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.startup_timeout = startup_timeout
        self.launcher = launcher
        self.transport = transport
        self.owner_check = owner_check or _owns_port
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.client: httpx.Client | None = None
        self._log_file = None

    # ------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlx_lm.server", "--model", self.model, "--host", HOST,
                "--port", str(self.port), "--max-tokens", str(self.max_tokens),
                "--decode-concurrency", str(self.concurrency), "--prompt-concurrency", str(self.concurrency),
                "--log-level", "INFO"]

    def __enter__(self) -> "Server":
        self.port = self.requested_port or free_port()
        check_port_free(self.port)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
        env = _blas.child_env()
        env["HF_HUB_OFFLINE"] = "1"
        # /v1/models scans the HF cache and answers an empty body when that folder does not exist;
        # an empty cache of our own keeps the answer to exactly our --model.
        hub = _empty_hub()
        env["HF_HUB_CACHE"] = str(hub)
        try:
            self.proc = self.launcher(self.command(), stdout=self._log_file or subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)
            self.client = httpx.Client(base_url=f"http://{HOST}:{self.port}", transport=self.transport,
                                       timeout=httpx.Timeout(600.0, connect=5.0))
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.client is not None:
            self.client.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, n: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        stage = "starting"
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"mlx_lm.server exited with code {self.proc.returncode} while {stage}; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            if BIND_FAILURE in self.log_tail(50):
                raise PortInUseError(f"mlx_lm.server could not bind port {self.port} ({BIND_FAILURE}); "
                                     f"another process took it. Log:\n{self.log_tail()}")
            if stage == "starting" and self.owner_check(self.port, self.proc.pid):
                stage = "loading"
            if stage == "loading":
                try:
                    if self.client.get("/health").status_code == 200:
                        self._check_models()
                        self.log(f"server pid {self.proc.pid} ready on {HOST}:{self.port} for {self.model}")
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.25)
        raise ServerError(f"mlx_lm.server not ready after {self.startup_timeout:.0f} s ({stage}); "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def _check_models(self) -> None:
        r = self.client.get("/v1/models")
        try:
            ids = [m.get("id") for m in r.json().get("data", [])]
        except ValueError:
            ids = []
        if self.model not in ids:
            raise WrongModelError(f"server on port {self.port} does not list {self.model} in /v1/models "
                                  f"(it lists {ids[:5]}); refusing to score")

    # ------------------------------------------------------------ requests

    def chat(self, messages: Sequence[dict], *, adapter: str | None = None, max_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (), logprobs: bool = False,
             tools: Sequence[dict] | None = None, send_model: bool = True) -> Reply:
        """One chat completion. ``model`` is sent unless told not to: without it mlx-lm ignores a
        per-request adapter, and *with* it but without ``adapters`` it drops a ``--adapter-path``
        adapter (measured) -- so the body always says exactly which weights to use."""
        body = {"messages": list(messages), "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "stop": list(stop), "stream": False}
        if send_model:
            body["model"] = self.model
        if adapter:
            body["adapters"] = str(Path(adapter).resolve())
        if logprobs:
            body["logprobs"] = True
        if tools:
            body["tools"] = list(tools)  # rendered by the model's chat template, as in training
        t = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                r = self.client.post("/v1/chat/completions", json=body)
                break
            except httpx.TransportError as e:
                # http.server listens with a backlog of 5 and closes every connection (HTTP/1.0), so a
                # burst of concurrent requests can be reset. Greedy requests are safe to repeat.
                if attempt == RETRIES or not self.alive():
                    return Reply(None, None, None, None, time.perf_counter() - t, error=f"{type(e).__name__}: {e}")
                time.sleep(0.2 * (attempt + 1))
        latency = time.perf_counter() - t
        if r.status_code != 200:
            return Reply(None, None, None, None, latency, error=f"HTTP {r.status_code}: {r.text[:200]}")
        data = r.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        lp = (choice.get("logprobs") or {}).get("content") or []
        return Reply(choice["message"].get("content") or "", choice.get("finish_reason"),
                     usage.get("completion_tokens"), usage.get("prompt_tokens"), latency,
                     token_ids=[int(x["id"]) for x in lp if "id" in x] or None,
                     logprobs=[float(x["logprob"]) for x in lp if "logprob" in x] or None)

    def verify(self, fingerprint: dict | None, adapter: str | None = None) -> dict:
        """Ask the probe through the server; raise WrongModelError unless it matches the record."""
        if not self.owner_check(self.port, self.proc.pid):
            raise WrongModelError(f"port {self.port} is no longer held by our server (pid {self.proc.pid})")
        max_tokens = (fingerprint or {}).get("max_tokens", 8)
        reply = self.chat(PROBE_MESSAGES, adapter=adapter, max_tokens=max_tokens, logprobs=True)
        if reply.error:
            raise ServerError(f"probe request failed: {reply.error}\n{self.log_tail()}")
        ids, lps = list(reply.token_ids or []), list(reply.logprobs or [])
        # the server includes the eos token in its logprobs; the recorded fingerprint stops before it
        if fingerprint and len(ids) > len(fingerprint["token_ids"]):
            ids, lps = ids[: len(fingerprint["token_ids"])], lps[: len(fingerprint["token_ids"])]
        seen = {"token_ids": ids, "logprobs": lps, "text": reply.text}
        if fingerprint:
            why = compare(fingerprint, ids, lps)
            if why:
                target = f"adapter {adapter}" if adapter else f"model {self.model}"
                raise WrongModelError(f"the server is not serving {target}: {why}; nothing was scored")
        return seen


def _empty_hub() -> Path:
    from mlx_ft.models import home

    hub = home() / "empty-hf-hub"
    hub.mkdir(parents=True, exist_ok=True)
    return hub


def _owns_port(port: int, pid: int) -> bool:
    """True when a socket listening on ``port`` belongs to ``pid`` or one of its children.

    Asks per process (works without root on macOS, unlike a system-wide connection list)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return True
    return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
