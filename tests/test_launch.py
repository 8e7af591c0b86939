"""`python -m pretrain.train.launch`: the Ray-less launcher whose rank 0 serves the process
group's store on loopback (issue 14 item 12; torchrun's agent store listens on every
interface).

Fast: argument errors are one line naming the flag; the env of every rank; the worker's
choice of store address and its torchrun warning; failure and signal handling with stand-in
ranks. Slow: 2 ranks of the smoke config through the launcher, one run: the store on 127.0.0.1
only while they train, then SIGTERM to the launcher (final checkpoint, exit 0, summary JSON
last on stdout).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pretrain.train import checkpoint_hook, launch, worker
from tests.fixtures.net import free_port
from tests.fixtures.pretrain_run import SMOKE, committed, overrides, tracking_db


def job(*argv: str) -> launch.Job:
    import argparse

    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    return launch.job_from_args(parser.parse_args(list(argv)))


# ---- arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["--nproc-per-node", "0", SMOKE], "--nproc-per-node 0 is not valid"),
    (["--nproc-per-node", "2", "--nnodes", "0", SMOKE], "--nnodes 0 is not valid"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", SMOKE],
     "--node-rank 2 is out of range for --nnodes 2: valid values are 0..1"),
    (["--nproc-per-node", "2", "--master-port", "70000", SMOKE], "TCP port, 1..65535"),
    (["--nproc-per-node", "2", "--nnodes", "2", SMOKE], "--nnodes 2 needs --master-addr"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", SMOKE],
     "--nnodes 2 needs --master-addr"),
    (["--nproc-per-node", "2", "--nnodes", "2", "--master-addr", "10.0.0.5", SMOKE],
     "--nnodes 2 needs --master-port"),
    (["--nproc-per-node", "2", "no/such.yaml"], "config file 'no/such.yaml' not found"),
    (["--nproc-per-node", "2", SMOKE, "train.steps"], "'train.steps' is not an override"),
    (["--nproc-per-node", "two", SMOKE], "argument --nproc-per-node: invalid int value: 'two'"),
    (["--nproc-per-node", "2", "--bogus", SMOKE], "unrecognized arguments: --bogus"),
    ([SMOKE], "required: --nproc-per-node"),
])
def test_bad_arguments_are_one_line_naming_the_flag(argv, says, capsys):
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_pretrain_launch_is_the_same_launcher(capsys):
    from orchestration.cli import main as cli

    assert cli(["launch", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", SMOKE]) == 2
    assert "--nnodes 2 needs --master-addr" in capsys.readouterr().err


def test_one_node_defaults_to_loopback_and_a_free_port():
    j = job("--nproc-per-node", "2", SMOKE, "train.steps=3")
    assert (j.master_addr, j.world_size, j.worker_args) == ("127.0.0.1", 2, (SMOKE, "train.steps=3"))
    assert 0 < j.master_port < 65536 and j.run_id
    assert job("--nproc-per-node", "2", SMOKE).run_id != j.run_id   # a new job, a new id


def test_every_rank_gets_its_place_in_the_job_and_one_job_id():
    j = job("--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1",
            "--master-addr", "10.0.0.5", "--master-port", "29555", SMOKE)
    base = {"PATH": "/bin", "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "x"}
    envs = [launch.rank_env(j, local, base) for local in range(2)]
    want = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "NODE_RANK": "1",
            "NNODES": "2", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29555",
            checkpoint_hook.LAUNCH_RUN_ID_ENV: "10.0.0.5:29555",   # the same on every node
            "PATH": "/bin"}                                       # and no TORCHELASTIC_*
    for local, env in enumerate(envs):
        assert env == {**want, "RANK": str(2 + local), "LOCAL_RANK": str(local)}
    assert base["TORCHELASTIC_RUN_ID"] == "x"   # the caller's env is left alone


def test_the_checkpoint_lease_gets_the_launchers_job_id(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")   # torchrun's default: every job's
    assert checkpoint_hook.launcher_job_id() == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t1")
    assert checkpoint_hook.launcher_job_id() == "torchrun:t1"
    monkeypatch.setenv(checkpoint_hook.LAUNCH_RUN_ID_ENV, "abc")
    assert checkpoint_hook.launcher_job_id() == "launch:abc"


# ---- the worker's side: where rank 0's store listens -----------------------------------


@pytest.fixture
def made(monkeypatch):
    """The arguments worker._make_group passes to engine.init_process_group."""
    calls = []
    monkeypatch.setattr(worker, "init_process_group", lambda *a: calls.append(a))
    for name in ("LOCAL_WORLD_SIZE", "NNODES", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    return calls


@pytest.mark.parametrize("env, host", [
    ({"LOCAL_WORLD_SIZE": "4"}, "127.0.0.1"),          # every rank on this node
    ({"NNODES": "1"}, "127.0.0.1"),
    ({"LOCAL_WORLD_SIZE": "2", "NNODES": "2"}, "10.0.0.5"),   # several nodes: the master's address
    ({}, "10.0.0.5"),                                  # unknown (deepspeed's launcher): MASTER_ADDR
])
def test_the_store_is_on_loopback_on_one_node_else_on_the_master_address(made, monkeypatch, env, host):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    worker._make_group("gloo", 30)
    assert made == [("gloo", host, 29555, 1, 4, 30)]


def test_a_rank_alone_picks_its_own_port_and_a_group_without_a_port_is_an_error(made, monkeypatch):
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    worker._make_group("gloo", 30)
    assert made == [("gloo", "127.0.0.1", 0, 0, 1, 30)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(worker.UserError, match="MASTER_PORT is not set.*pretrain.train.launch"):
        worker._make_group("gloo", 30)


def test_under_torchrun_rank0_warns_that_its_store_is_on_every_interface(monkeypatch, capsys):
    joined = []
    monkeypatch.setattr(worker.dist, "init_process_group", lambda *a, **k: joined.append(a))
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        worker._join_torchrun_store("gloo", 30)
    err = capsys.readouterr().err
    assert joined == [("gloo",), ("gloo",)]          # env://, torchrun's store
    assert err.count("\n") == 1 and "every network interface" in err
    assert "python -m pretrain.train.launch" in err


# ---- the launcher's processes, with stand-in ranks -------------------------------------

# A stand-in rank: notes its pid and a SIGTERM in files named by its rank, exits per $EXIT_<rank>.
RANK_SCRIPT = """
import os, signal, sys, time
d, rank = sys.argv[1], os.environ["RANK"]
def stop(*_):
    open(os.path.join(d, "term" + rank), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(d, "up" + rank), "w").write(str(os.getpid()))
code = os.environ.get("EXIT_" + rank)
if code is not None:   # once every rank is up (their SIGTERM handlers too)
    while len([n for n in os.listdir(d) if n.startswith("up")]) < int(os.environ["WORLD_SIZE"]):
        time.sleep(0.02)
    sys.exit(int(code))
time.sleep(60)
"""


def stand_in(tmp_path: Path) -> list[str]:
    return [sys.executable, "-c", RANK_SCRIPT, str(tmp_path)]


def wait_for(ok, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_failed_rank_stops_the_others_and_its_code_is_the_launchers(tmp_path, monkeypatch):
    monkeypatch.setenv("EXIT_1", "3")
    t0 = time.monotonic()
    assert launch.launch(job("--nproc-per-node", "3", SMOKE), stand_in(tmp_path)) == 3
    assert time.monotonic() - t0 < launch.FAILURE_GRACE_S    # they stopped when asked
    assert {p.name for p in tmp_path.iterdir()} >= {"term0", "term2"}


def test_sigterm_and_sigint_to_the_launcher_reach_every_rank_as_sigterm(tmp_path):
    for signum in (signal.SIGTERM, signal.SIGINT):
        folder = tmp_path / signum.name
        folder.mkdir()

        def signal_when_up():
            wait_for(lambda: len(list(folder.glob("up*"))) == 2)
            os.kill(os.getpid(), signum)

        threading.Thread(target=signal_when_up, daemon=True).start()
        before = signal.getsignal(signum)
        assert launch.launch(job("--nproc-per-node", "2", SMOKE), stand_in(folder)) == 0
        assert {p.name for p in folder.glob("term*")} == {"term0", "term1"}
        assert signal.getsignal(signum) is before    # the launcher's handler is gone again


def test_a_rank_killed_by_a_signal_exits_the_launcher_as_a_shell_would(tmp_path, monkeypatch):
    monkeypatch.setenv("EXIT_0", "0")

    def kill_rank1():
        wait_for(lambda: (tmp_path / "up1").exists())
        os.kill(int((tmp_path / "up1").read_text()), signal.SIGKILL)

    threading.Thread(target=kill_rank1, daemon=True).start()
    assert launch.launch(job("--nproc-per-node", "2", SMOKE), stand_in(tmp_path)) == 128 + 9


# ---- the real thing: 2 ranks of the smoke config ----------------------------------------


class Launched:
    """`python -m pretrain.train.launch --nproc-per-node 2 SMOKE ...` as a subprocess."""

    def __init__(self, tmp_path: Path, data: Path, steps: int, every: int, *extra: str):
        self.port = free_port()
        self.out, self.err = tmp_path / "out.txt", tmp_path / "err.txt"
        args = overrides(data, steps, every, f"tracking.tracking_uri={tracking_db(tmp_path)}",
                         f"checkpoint.uri={tmp_path}/ckpt", *extra)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pretrain.train.launch", "--nproc-per-node", "2",
             "--master-port", str(self.port), SMOKE, *args],
            cwd=tmp_path, env=dict(os.environ, DS_ACCELERATOR="cpu"),
            stdout=self.out.open("w"), stderr=self.err.open("w"))

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def listening(self) -> set[str]:
        """Addresses any process of the job listens on at MASTER_PORT right now."""
        found = set()
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            try:
                found |= {c.laddr.ip for c in proc.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port}
            except psutil.NoSuchProcess:
                pass
        return found

    def finish(self, timeout: float) -> tuple[int, dict]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        lines = self.out.read_text().strip().splitlines()
        return rc, (json.loads(lines[-1]) if rc == 0 and lines else {})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_keep_the_store_on_loopback_and_sigterm_writes_a_final_checkpoint(tmp_path, smoke_data):
    # no periodic checkpoint: the one we find is the final one
    run = Launched(tmp_path, smoke_data, 400, 1000, "checkpoint.preempt_grace_s=60")
    seen: set[str] = set()
    deadline = time.monotonic() + 300
    while "step 3/400" not in run.stderr():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.stderr()[-4000:]
        seen |= run.listening()
        time.sleep(0.2)
    seen |= run.listening()
    run.proc.send_signal(signal.SIGTERM)
    rc, summary = run.finish(120)
    assert rc == 0, run.stderr()[-6000:]
    assert summary["stopped"] and 3 <= summary["steps"] < 400 and summary["world_size"] == 2
    info = committed(str(tmp_path / "ckpt"))
    assert info is not None and info.step == summary["steps"] and summary["checkpoint"] == info.uri
    # rank 0's store was seen, and only ever on loopback (torch's own: "::" or "0.0.0.0")
    assert seen == {"127.0.0.1"}, (seen, run.stderr()[-3000:])
