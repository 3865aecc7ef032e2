"""Jobs spread over the hosts of a hostfile (mlx_ft/hosts.py), doctor --hosts, train/eval --hosts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from mlx_ft import hosts
from mlx_ft.cli import main
from mlx_ft.errors import ConfigError, UserError

from .conftest import small_suite


def hostfile(tmp_path: Path, names, wrap=False) -> Path:
    entries = [{"ssh": n, "ips": []} for n in names]
    p = tmp_path / "hosts.json"
    p.write_text(json.dumps({"backend": "ring", "hosts": entries} if wrap else entries))
    return p


def test_hostfile_in_both_mlx_formats(tmp_path):
    assert [h.name for h in hosts.load_hosts(hostfile(tmp_path, ["a", "b"]))] == ["a", "b"]
    assert [h.name for h in hosts.load_hosts(hostfile(tmp_path, ["127.0.0.1"], wrap=True))] == ["127.0.0.1"]


@pytest.mark.parametrize("text, error", [("[", ConfigError), ("[]", ConfigError), ('[{"ips": []}]', ConfigError)])
def test_bad_hostfiles_are_named(tmp_path, text, error):
    p = tmp_path / "h.json"
    p.write_text(text)
    with pytest.raises(error, match="h.json"):
        hosts.load_hosts(p)
    with pytest.raises(UserError, match="not found"):
        hosts.load_hosts(tmp_path / "nope.json")


def test_local_hosts_run_directly_and_remote_ones_over_ssh(tmp_path):
    argv = ["python", "-m", "mlx_ft", "eval", "--only", "a b"]
    assert hosts.command(hosts.Host("127.0.0.1"), argv) == argv
    remote = hosts.command(hosts.Host("mac2"), argv, cwd=tmp_path)
    assert remote[:-2] == list(hosts.SSH) and remote[-2] == "mac2"
    assert remote[-1] == f"cd {tmp_path} && python -m mlx_ft eval --only 'a b'"


def test_deal_is_round_robin_and_never_empty():
    assert hosts.deal([1, 2, 3, 4, 5], 2) == [[1, 3, 5], [2, 4]]
    assert hosts.deal([1], 3) == [[1]]
    assert hosts.deal([], 3) == []


class FakeProc:
    """A job that 'runs' for a moment; exit code from the argv."""

    running: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    def __init__(self, cmd, **kw):
        self.host = kw["env"]["MLXFT_SPREAD_HOST"]
        self.rc = int(cmd[-1].split()[-1])  # local argv, or the remote shell line
        with self.lock:
            self.running[self.host] = self.running.get(self.host, 0) + 1
            assert self.running[self.host] == 1, "two jobs at once on one host"
        self.stdout = iter([f"job {self.rc} on {self.host}\n", "Traceback: boom\n" if self.rc else "ok\n"])

    def wait(self):
        time.sleep(0.05)
        with self.lock:
            self.running[self.host] -= 1
        return self.rc


def test_spread_runs_one_job_per_host_and_reports_every_failure():
    jobs = [hosts.Job(f"job {i}", ["true", str(rc)]) for i, rc in enumerate([0, 3, 0, 0, 5, 0])]
    seen = []
    with pytest.raises(hosts.SpreadError) as e:
        hosts.spread(jobs, [hosts.Host("127.0.0.1"), hosts.Host("localhost")], log=seen.append, popen=FakeProc)
    msg = str(e.value)
    assert "2 of 6 job(s) failed" in msg and "job 1 on" in msg and "job 4 on" in msg and "Traceback: boom" in msg
    assert sum("done" in s for s in seen) == 4  # the failures did not stop the others


def test_remote_outputs_are_fetched_after_success(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(hosts, "fetch", lambda host, folder: fetched.append((host.name, folder)))
    monkeypatch.setattr(hosts, "push", lambda host, file: None)
    with pytest.raises(hosts.SpreadError):
        hosts.spread([hosts.Job("a", ["x", "0"], outputs=[tmp_path / "a"]),
                      hosts.Job("b", ["x", "1"], outputs=[tmp_path / "b"])], [hosts.Host("mac2")], popen=FakeProc)
    assert fetched == [("mac2", tmp_path / "a")]  # a failed job's folder is not copied over anything


def test_doctor_hosts_reports_each_host_and_fails_on_an_unreachable_one(tmp_path):
    """Real: the local host runs `mlxft doctor --json`; an unresolvable host goes through real ssh."""
    hf = hostfile(tmp_path, ["127.0.0.1", "no-such-host.invalid"])
    r = subprocess.run([sys.executable, "-m", "mlx_ft", "doctor", "--hosts", str(hf), "--json"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr
    rows = {row["host"]: row for row in json.loads(r.stdout)["hosts"]}
    local, missing = rows["127.0.0.1"], rows["no-such-host.invalid"]
    assert local["reachable"] and local["problems"] == [] and local["matmul_gflops_512"] > 0
    assert local["versions"]["mlx"] == json.loads(r.stdout)["versions"]["mlx"]
    assert not missing["reachable"] and "no-such-host.invalid" in missing["problems"][0]


def test_doctor_hosts_names_a_missing_data_folder(tmp_path):
    hf = hostfile(tmp_path, ["127.0.0.1"])
    r = CliRunner().invoke(main, ["doctor", "--hosts", str(hf), "--data", str(tmp_path / "nodata")])
    assert r.exit_code == 1
    assert "data missing" in r.output and "nodata" in r.output


@pytest.mark.slow
def test_seeds_spread_over_two_hosts(tmp_path, tiny_data, embedded_model):
    hf = hostfile(tmp_path, ["127.0.0.1", "localhost"])
    args = ["train", "--name", "sp", "--data", str(tiny_data), "--runs-dir", str(tmp_path / "runs"), "--iters", "2",
            "--save-every", "2", "--batch-size", "2", "--num-layers", "2", "--max-seq-length", "256",
            "--seeds", "1,2", "--hosts", str(hf), "--spread", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for seed in (1, 2):
        assert "checkpoint saved" in (tmp_path / "runs" / ".spread" / f"sp-s{seed}.log").read_text()
        run = json.loads((tmp_path / "runs" / f"sp-s{seed}" / "run.json").read_text())
        assert run["status"] == "complete" and run["config"]["seed"] == seed
    a, b = ((tmp_path / "runs" / f"sp-s{s}" / "checkpoints" / "step_000002" / "adapters.safetensors").read_bytes()
            for s in (1, 2))
    assert a != b  # two seeds, two different runs
    again = CliRunner().invoke(main, args)  # nothing is overwritten without --force
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.slow
def test_eval_spread_over_two_hosts_equals_one_machine(tmp_path, trained_run):
    suite = small_suite(tmp_path, n=2, max_tokens=12)
    hf = hostfile(tmp_path, ["127.0.0.1", "localhost"])
    results = {}
    for how, extra in (("spread", ["--hosts", str(hf)]), ("one", [])):
        run = tmp_path / how
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("evals"))
        r = CliRunner().invoke(main, ["eval", "--prompts", str(suite), "--run", str(run), *extra])
        assert r.exit_code == 0, r.output
        results[how] = {p.parent.name: [x["text"] for x in json.loads(p.read_text())["results"]]
                        for p in run.glob("evals/*/mini.json")}
    assert sorted(results["spread"]) == ["base", "step_000003", "step_000006"]
    assert results["spread"] == results["one"]
    logs = sorted((tmp_path / "spread" / "evals").glob("spread-*.log"))  # each job's whole output, kept
    assert len(logs) == 2 and all("strict pass" in p.read_text() for p in logs)
