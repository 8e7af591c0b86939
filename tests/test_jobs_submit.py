"""The job verbs against real Ray clusters on 127.0.0.1 with token auth.

- the `ray_head` fixture (one node): trivial jobs for status/logs/list/stop mechanics and the
  error paths.
- The smoke config as a job (tags, drained, losing a node and growing back, stopped with a
  final checkpoint, submitted again under its name and resumed, followed to SUCCEEDED, found
  by `list`): tests/test_elastic_workers.py, one job's whole life on two nodes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.cli import main as cli
from orchestration.ray_jobs import JobsClient, job_runtime_env
from tests.fixtures.net import free_port
from tests.fixtures.pretrain_run import overrides
from tests.fixtures.ray_nodes import ray_agent_ports, ray_cluster

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(list(argv))
    return code, out.getvalue(), err.getvalue()


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture
def head(ray_head, monkeypatch):
    """The dashboard address of the shared head, with this process set up to authenticate."""
    for key, value in ray_head["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return ray_head["dashboard"]


def wait_for(address: str, job: str, statuses=TERMINAL, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, out, err = run_cli("status", job, "--address", address, "--json")
        assert code == 0, err
        st = last_json(out)
        if st["status"] in statuses or time.monotonic() > deadline:
            return st
        time.sleep(1.0)


def logs_tail(address: str, job: str, chars: int = 4000) -> str:
    """The end of a job's output, for assertion messages."""
    return run_cli("logs", job, "--address", address)[1][-chars:]


def smoke_overrides(data_root: Path, steps: int, every: int) -> list[str]:
    """The smoke config, tiny (tests/fixtures/pretrain_run.py), with the grace period a
    `pretrain stop` gives it."""
    return overrides(data_root, steps, every, "checkpoint.preempt_grace_s=60")


# ---------------------------------------------------------------------------------------
# Errors that need no cluster


def test_unreachable_address_is_one_paragraph():
    port = free_port()  # nothing listens there
    code, out, err = run_cli("status", "anything", "--address", f"127.0.0.1:{port}")
    assert code == 2
    assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_bad_config_is_rejected_before_contacting_any_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port()  # unreachable: a config error must come first
    code, out, err = run_cli("submit", SMOKE, "train.zero_stage=7", "--address",
                             f"127.0.0.1:{port}")
    assert code == 2 and "train.zero_stage" in err and "cannot reach" not in err
    code, out, err = run_cli("submit", SMOKE, "--name", "Bad Name!", "--address",
                             f"127.0.0.1:{port}")
    assert code == 2 and "job name 'Bad Name!' is not valid" in err


# ---------------------------------------------------------------------------------------
# Mechanics with trivial jobs on the shared head


@pytest.mark.slow
def test_status_logs_list_and_attempts_of_a_named_job(head):
    client = JobsClient(head)
    script = "print('step 3/5  loss 0.5000  1.0 samples/s'); print('hello from the job')"
    first = client.submit(name="hello", entrypoint=f'python -c "{script}"', runtime_env={},
                          metadata={})
    assert first == "hello-1"
    st = wait_for(head, "hello")
    assert st["status"] == "SUCCEEDED"
    assert (st["step"], st["steps"], st["loss"]) == (3, 5, 0.5)
    code, out, _ = run_cli("logs", "hello", "--address", head)
    assert code == 0 and "hello from the job" in out
    # the same name again is the next attempt; the name means the newest one
    second = client.submit(name="hello", entrypoint="python -c \"print('again')\"",
                           runtime_env={}, metadata={})
    assert second == "hello-2"
    code, out, _ = run_cli("logs", "hello", "--address", head, "--follow")
    assert code == 0 and "again" in out  # --follow returns once the job has ended
    code, out, _ = run_cli("list", "--address", head, "--json")
    ids = {j["submission_id"]: j for j in last_json(out)["jobs"]}
    assert ids["hello-1"]["name"] == ids["hello-2"]["name"] == "hello"
    assert ids["hello-2"]["attempt"] == 2


class DroppingProxy:
    """A TCP forwarder on 127.0.0.1 to `target` whose open connections `drop()` cuts, as a
    flaky network or a restarted port-forward would; new connections go through again."""

    def __init__(self, target: str):
        import socket
        import threading
        from urllib.parse import urlparse

        url = urlparse(target)
        self.target = (url.hostname, url.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.pairs: list = []
        self.drops = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def drop(self) -> None:
        import socket

        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
        self.drops += 1

    def close(self) -> None:
        self.server.close()
        self.drop()


@pytest.mark.slow
def test_follow_resumes_after_a_dropped_connection_and_status_reads_the_tail(head):
    """`logs --follow` through a connection cut mid-stream gives every line once, in order,
    and ends with the job; `status` finds the progress line in the log's last lines."""
    lines = [f"line {i:03d}" for i in range(80)]
    script = ("import time\n"
              "for i in range(80):\n"
              "    print(f'line {i:03d}', flush=True); time.sleep(0.05)\n"
              "print('step 3/5  loss 0.5000  1.0 samples/s', flush=True)\n")
    client = JobsClient(head)
    client.submit(name="chatty", entrypoint=f"python -c \"{script}\"", runtime_env={},
                  metadata={})
    proxy = DroppingProxy(head)
    try:
        got = []
        for chunk in JobsClient(proxy.address).follow("chatty", reconnect_wait_s=0.2):
            got.append(chunk)
            if proxy.drops == 0 and "".join(got).count("\n") >= 10:
                proxy.drop()   # mid-stream: the job is still printing
    finally:
        proxy.close()
    assert proxy.drops >= 1
    followed = [x for x in "".join(got).splitlines() if x.startswith(("line", "step"))]
    assert followed == lines + ["step 3/5  loss 0.5000  1.0 samples/s"]
    assert client.resolve("chatty").status == "SUCCEEDED"   # follow ended with the job
    tail = client.logs_tail("chatty", lines=3).splitlines()
    assert len(tail) <= 3 and tail[-1] == "step 3/5  loss 0.5000  1.0 samples/s"
    st = wait_for(head, "chatty")
    assert (st["step"], st["steps"], st["loss"]) == (3, 5, 0.5)


@pytest.mark.slow
def test_stop_gives_the_job_its_grace_period_and_a_running_name_is_refused(head, tmp_path):
    marker = tmp_path / "final-checkpoint"
    # SIGTERM -> 5 s of "checkpointing" (Ray's default grace is 3 s) -> exit
    script = tmp_path / "job.py"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        "def term(*_):\n"
        "    time.sleep(5)\n"
        f"    pathlib.Path({str(marker)!r}).write_text('saved')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")
    env = job_runtime_env("unused: true\n", name="graceful", use_gpu=False, grace_s=10,
                          working_dir=None)
    client = JobsClient(head)
    client.submit(name="graceful", entrypoint=f"{sys.executable} {script}", runtime_env=env,
                  metadata={})
    deadline = time.monotonic() + 60
    while "ready" not in client.logs("graceful") and time.monotonic() < deadline:
        time.sleep(0.5)
    code, out, err = run_cli("submit", SMOKE, "--name", "graceful", "--address", head)
    assert code == 2 and "still RUNNING as submission graceful-1" in err
    code, out, err = run_cli("stop", "graceful", "--address", head, "--json")
    assert code == 0, err
    assert last_json(out)["status"] == "STOPPED"
    assert marker.read_text() == "saved"  # not SIGKILLed after Ray's default 3 s


@pytest.mark.slow
def test_unknown_job_and_bad_token_are_clear_errors(head, monkeypatch):
    code, out, err = run_cli("status", "no-such-job", "--address", head)
    assert code == 2 and "no job 'no-such-job'" in err and "Traceback" not in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, out, err = run_cli("list", "--address", head)
    assert code == 2 and "refused our credentials" in err and "RAY_AUTH_TOKEN" in err


@pytest.mark.slow
def test_missing_token_is_a_clear_error(ray_head):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "list", "--address",
                           ray_head["dashboard"]], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refused our credentials" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr


@pytest.mark.slow
def test_invalid_config_never_reaches_the_cluster(head):
    before = len(JobsClient(head).list())
    code, out, err = run_cli("submit", SMOKE, "resources.wrkers=2", "--address", head)
    assert code == 2 and "resources.wrkers" in err
    assert len(JobsClient(head).list()) == before


@pytest.mark.slow
def test_head_without_a_job_agent_is_one_clear_error(monkeypatch):
    """Another process holds the port the head's dashboard agent wants: the head comes up,
    but no submission can run. `pretrain submit` says so and what to do, after a bounded wait."""
    import socket

    import orchestration.ray_jobs as ray_jobs

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    flags = ray_agent_ports()
    flags[flags.index("--dashboard-agent-listen-port") + 1] = str(taken)
    try:
        with ray_cluster(num_cpus=1, agent_ports=flags) as cluster:
            for key, value in cluster["env"].items():
                monkeypatch.setenv(key, value)
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
            monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
            monkeypatch.setattr(ray_jobs, "AGENT_WAIT_S", 10)
            code, out, err = run_cli("submit", SMOKE, "--address", cluster["dashboard"], "--name", "x")
            assert code != 0
            assert "has no job agent" in err and "--dashboard-agent-listen-port" in err, err
            assert "Traceback" not in err
    finally:
        holder.close()
