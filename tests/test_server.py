"""The isolated server: fakes for the start-up logic, real mlx_lm.server for collisions."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mlx_ft.errors import PortInUseError, ServerError, WrongModelError
from mlx_ft.server import Server, check_port_free, free_port

FP = {"token_ids": [1, 2, 3], "logprobs": [-0.5, -0.1, -0.2], "text": "abc", "max_tokens": 8}


def sleeper_launcher(script: str = "sleep 60"):
    """A real, harmless child process standing in for mlx_lm.server."""
    launched = []

    def launch(cmd, **kw):
        launched.append(cmd)
        return subprocess.Popen(["sh", "-c", script], **kw)

    launch.launched = launched
    return launch


def fake_api(model_id: str, probe=FP, models=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": m} for m in (models or [model_id])]})
        body = __import__("json").loads(request.content)
        content = [{"id": i, "logprob": lp} for i, lp in zip(probe["token_ids"], probe["logprobs"])]
        return httpx.Response(200, json={
            "choices": [{"message": {"content": probe["text"] if body.get("logprobs") else "hi"},
                         "finish_reason": "stop", "logprobs": {"content": content}}],
            "usage": {"completion_tokens": 3, "prompt_tokens": 9}})

    return httpx.MockTransport(handler)


def make(tmp_path, launcher, transport, owner=lambda port, pid: True, timeout=5.0):
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    return Server(model, launcher=launcher, transport=transport, owner_check=owner, startup_timeout=timeout,
                  log_path=tmp_path / "server.log")


def test_ready_verified_and_reaped(tmp_path):
    launch = sleeper_launcher()
    server = make(tmp_path, launch, fake_api(str((tmp_path / "m").resolve())))
    with server:
        assert server.verify(FP)["token_ids"] == [1, 2, 3]
        reply = server.chat([{"role": "user", "content": "x"}], adapter=str(tmp_path))
        assert reply.text == "hi" and reply.completion_tokens == 3
        proc = server.proc
    assert proc.poll() is not None  # terminated and reaped
    cmd = launch.launched[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_child_that_exits_is_an_error_with_its_log(tmp_path):
    server = make(tmp_path, sleeper_launcher("echo boom-from-child; exit 3"), fake_api("x"), owner=lambda p, pid: False)
    with pytest.raises(ServerError, match="(?s)exited with code 3.*boom-from-child"):
        server.__enter__()


def test_bind_failure_that_hangs_is_detected_and_killed(tmp_path):
    launch = sleeper_launcher("echo 'OSError: [Errno 98] Address already in use'; sleep 60")
    server = make(tmp_path, launch, fake_api("x"), owner=lambda p, pid: False)
    t = time.monotonic()
    with pytest.raises(PortInUseError, match="Address already in use"):
        server.__enter__()
    assert time.monotonic() - t < 5
    assert server.proc.poll() is not None


def test_someone_else_on_the_port_never_becomes_ready(tmp_path):
    server = make(tmp_path, sleeper_launcher(), fake_api("x"), owner=lambda p, pid: False, timeout=1.0)
    with pytest.raises(ServerError, match="not ready"):
        server.__enter__()
    assert server.proc.poll() is not None


def test_models_list_without_our_model_is_refused(tmp_path):
    server = make(tmp_path, sleeper_launcher(), fake_api("x", models=["/some/other/model"]))
    with pytest.raises(WrongModelError, match="/some/other/model"):
        server.__enter__()


@pytest.mark.parametrize("probe,match", [
    ({**FP, "token_ids": [1, 2, 4]}, "probe tokens differ"),
    ({**FP, "logprobs": [-0.5, -0.1, -0.9]}, "log-probabilities differ"),
])
def test_fingerprint_mismatch_is_wrong_model(tmp_path, probe, match):
    with make(tmp_path, sleeper_launcher(), fake_api(str((tmp_path / "m").resolve()), probe=probe)) as server:
        with pytest.raises(WrongModelError, match=match):
            server.verify(FP)


def test_port_out_of_range():
    with pytest.raises(PortInUseError, match="out of range"):
        check_port_free(70000)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def _http_server(host: str, family: int):
    class S(http.server.ThreadingHTTPServer):
        address_family = family

    srv = S((host, 0), _Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("host,family", [
    ("127.0.0.1", socket.AF_INET), ("0.0.0.0", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_port_taken_by_another_http_server_is_refused_before_launch(tmp_path, host, family):
    try:
        other = _http_server(host, family)
    except OSError as e:
        pytest.skip(f"no {host} on this machine: {e}")
    port = other.server_address[1]
    launch = sleeper_launcher()
    try:
        with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
            Server(tmp_path, port=port, launcher=launch).__enter__()
        assert launch.launched == []  # nothing started, nothing scored
    finally:
        other.shutdown()
        other.server_close()


def test_free_port_is_free_everywhere():
    check_port_free(free_port())


# ------------------------------------------------------------------ real mlx_lm.server


@pytest.fixture
def other_mlx_server(embedded_model, tmp_path):
    """A second, real mlx_lm.server holding a port (serving the model with an adapter: another model)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(embedded_model), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_port_held_by_a_second_mlx_server_is_refused(tmp_path, embedded_model, other_mlx_server):
    with pytest.raises(PortInUseError, match=str(other_mlx_server)):
        Server(embedded_model, port=other_mlx_server, log_path=tmp_path / "s.log").__enter__()


@pytest.mark.slow
def test_real_child_that_cannot_bind_is_caught_not_trusted(tmp_path, embedded_model, other_mlx_server, monkeypatch):
    """Even past the port check, the health probe answered by the *other* server is not trusted:
    our child logs the bind failure and hangs; we detect it, kill it and refuse."""
    import mlx_ft.server as srv

    monkeypatch.setattr(srv, "check_port_free", lambda port: None)
    server = Server(embedded_model, port=other_mlx_server, log_path=tmp_path / "s.log", startup_timeout=60)
    with pytest.raises(PortInUseError, match="Address already in use"):
        server.__enter__()
    assert server.proc.poll() is not None


@pytest.mark.slow
def test_real_server_serves_the_recorded_fingerprint(tmp_path, embedded_model):
    from mlx_ft.files import read_json

    fp = read_json(embedded_model / "mlxft_import.json")["fingerprint"]
    with Server(embedded_model, log_path=tmp_path / "s.log") as server:
        assert server.verify(fp)["token_ids"] == fp["token_ids"]
        pid = server.proc.pid
        wrong = {**fp, "logprobs": [x - 0.5 for x in fp["logprobs"]]}
        with pytest.raises(WrongModelError):
            server.verify(wrong)
    with pytest.raises(ProcessLookupError):
        __import__("os").kill(pid, 0)
