"""A real node drain: Ray's GCS is told that the second node of a two-node cluster is being
preempted (DrainNode, reason PREEMPTION, a deadline), as a cloud's spot reclaim would through
the autoscaler. The job's workers get the notice from `ray.train.get_preemption_info()`,
checkpoint at once and train on; the checkpoint commits before the deadline; the job's log
and `pretrain status` name the notice. One job, stopped once the checkpoint is in (before
the deadline, so the drained node is never actually needed again).

The drain is Ray's own CLI, `ray drain-node` (hidden command, ray/scripts/scripts.py): it
calls `ray._raylet.GcsClient(address=GCS).drain_node(node_id_hex,
autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION, message, deadline_timestamp_ms)`, the same RPC
the autoscaler v2 uses. It marks the node draining (no new work there); it kills nothing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from orchestration.ray_jobs import last_json_line
from tests.fixtures.ray_nodes import ray_cluster
from tests.fixtures.servers import BIN
from tests.test_jobs_submit import (SMOKE, TERMINAL, last_json, logs_tail, run_cli,
                                    smoke_overrides, wait_for)

DEADLINE_S = 150   # the drain's deadline, from the moment it is sent


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke-data") / "synthetic"


@pytest.fixture
def two_nodes(monkeypatch):
    """A head and a second node on this machine, 2 CPUs each (tests/fixtures/ray_nodes.py),
    with this process set up to authenticate."""
    with ray_cluster(num_cpus=2, second_node_resources={"second_node": 1}) as info:
        for key, value in info["env"].items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        yield info


def second_node_id(cluster: dict) -> str:
    import requests

    token = Path(cluster["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    rows = requests.get(f"{cluster['dashboard']}/api/v0/nodes", params={"detail": "1"},
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=30).json()["data"]["result"]["result"]
    others = [n["node_id"] for n in rows if n["state"] == "ALIVE" and not n["is_head_node"]]
    assert len(others) == 1, rows
    return others[0]


def drain(cluster: dict, node_id: str, deadline_s: int) -> None:
    """`ray drain-node` with reason PREEMPTION and a deadline `deadline_s` from now."""
    exe = shutil.which("ray", path=str(BIN)) or "ray"
    env = dict(os.environ, **cluster["env"])
    proc = subprocess.run([exe, "drain-node", "--address", cluster["address"], "--node-id", node_id,
                           "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                           "--reason-message", "test: spot reclaim",
                           "--deadline-remaining-seconds", str(deadline_s)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_drain_notice_checkpoints_before_the_deadline(two_nodes, smoke_data, tmp_path,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    address = two_nodes["dashboard"]
    # 2 workers x 2 CPUs on two 2-CPU nodes: one worker per node. No periodic checkpoint
    # (every 1000 steps): a checkpoint before the stop can only be the drain's.
    code, out, err = run_cli("submit", SMOKE, *smoke_overrides(smoke_data, 2000, 1000),
                             "resources.workers=2", "resources.cpus_per_worker=2",
                             "train.preemption_poll_steps=3", "--name", "drain",
                             "--address", address, "--json")
    assert code == 0, err
    uri = last_json(out)["checkpoint_uri"]
    t_end = time.monotonic() + 400
    while True:   # training has started
        st = wait_for(address, "drain", statuses=TERMINAL + ("RUNNING",))
        if st["status"] != "RUNNING" or (st["step"] or 0) >= 3 or time.monotonic() > t_end:
            break
        time.sleep(1)
    assert st["status"] == "RUNNING" and st["step"] >= 3, (st, logs_tail(address, "drain"))
    before = st["step"]
    assert st["checkpoint_step"] is None

    drain(two_nodes, second_node_id(two_nodes), DEADLINE_S)
    deadline = time.time() + DEADLINE_S

    notice_step = None
    while time.time() < deadline - 10:   # the notice, then its checkpoint committed
        st = wait_for(address, "drain", statuses=TERMINAL + ("RUNNING",))
        if st["status"] != "RUNNING":
            break
        if notice_step is None:
            found = re.findall(r"preemption notice 1: node (\w+) .*deadline .*checkpoint at "
                               r"step (\d+)", run_cli("logs", "drain", "--address", address)[1])
            if found:
                notice_step = int(found[-1][1])
        if notice_step is not None and (st["checkpoint_step"] or 0) >= notice_step:
            break
        time.sleep(2)
    committed_at = time.time()
    log = logs_tail(address, "drain", 20000)
    assert notice_step is not None, (st, log)
    assert notice_step > before, (notice_step, before)
    assert st["status"] == "RUNNING" and st["checkpoint_step"] == notice_step, (st, log)
    assert committed_at < deadline
    assert st["preemptions"] == 1, st
    assert (Path(uri) / f"step_{notice_step:08d}").is_dir(), sorted(os.listdir(uri))
    code, out, _ = run_cli("status", "drain", "--address", address)
    assert "preemption notices 1" in out, out

    # training went on after the checkpoint; stop it (final checkpoint) before the deadline
    code, out, err = run_cli("stop", "drain", "--address", address, "--json")
    assert code == 0, err
    done = wait_for(address, "drain")
    log = logs_tail(address, "drain", 20000)
    assert done["status"] == "STOPPED", (done, log)
    assert done["checkpoint_step"] > notice_step, (done, log)
    summary = last_json_line(log)
    assert summary, log
    assert summary["preemptions"] == 1 and summary["restarts"] == 0, summary
    assert summary["preemption_notices"][0]["step"] == notice_step, summary
    assert done["preemptions"] == 1
