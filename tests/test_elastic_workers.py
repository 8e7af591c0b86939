"""A node drained, lost and replaced under a running job, on a real two-node Ray cluster
(tests/fixtures/ray_nodes.py), through the operator's verbs (`pretrain submit`, `status`,
`logs`, `stop` against the cluster's Jobs API).

The job: resources.workers=[1, 2] (elastic), 2 CPUs per worker on 2-CPU nodes, so one worker
per node. In order:
1. it starts on both nodes (one Ray Train worker on each);
2. the second node is drained (Ray's `ray drain-node`, reason PREEMPTION, a deadline: what
   a cloud's spot reclaim does through the autoscaler): the workers get the notice, write a
   checkpoint at once, committed before the deadline, and train on; the log and `pretrain
   status` name the notice;
3. the deadline passes and the node goes (SIGKILL to its raylet, agents and workers: a
   machine gone): Ray Train restarts the group on the one worker left, which resumes from
   the newest checkpoint and trains on;
4. a new node joins: the group grows back to two;
5. `pretrain stop`: a final checkpoint. The run has then seen exactly the samples an
   uninterrupted run of as many steps sees (its loader position equals that of one rank
   taking the global batch every step), and MLflow holds every step once;
6. the same name submitted again: attempt 2 resumes from that checkpoint (the config's
   relative checkpoint path anchored where the operator typed the command, under the job's
   name), runs to SUCCEEDED followed with `logs --follow`, continues the same MLflow run
   (named after the job, with the submit's tags), and `list` finds both attempts by tag
   and status.
(One job's whole life, so the cluster and the job start once: each start costs about a
minute on 2 cores.)
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
import torch

from orchestration.ray_jobs import last_json_line
from tests.fixtures.pretrain_run import committed, history, tracking_db
from tests.fixtures.ray_nodes import (add_node, drain_node, kill_node, node_ids, ray_cluster,
                                      state_rows)
from tests.test_jobs_submit import (SMOKE, TERMINAL, last_json, logs_tail, run_cli,
                                    smoke_overrides, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]   # ~6 minutes on an idle 2-core machine

DEADLINE_S = 90   # the drain's deadline, from the moment it is sent
TAGS = ("--tag", "team=vision", "--tag", "sweep=lr-3")
# A lost node is declared dead after ~3 s of missed health checks (Ray's default: ~30 s).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


@pytest.fixture
def two_nodes(monkeypatch):
    """A head and a second node, 2 CPUs each, with this process set up to authenticate."""
    with ray_cluster(num_cpus=2, second_node_resources={}, system_env=FAST_HEALTH_CHECKS) as info:
        for key, value in info["env"].items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        yield info


def _steps(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^step (\d+)/\d+ ", text, re.M)]


def _log(address: str) -> str:
    return run_cli("logs", "elastic", "--address", address)[1]


def _wait_log(address: str, ok, what: str, timeout: float = 300) -> str:
    """Poll the job's log until `ok(log)`; fails if the job ends first or after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        log = _log(address)
        if ok(log):
            return log
        st = wait_for(address, "elastic", statuses=TERMINAL + ("RUNNING", "PENDING"))
        assert st["status"] in ("RUNNING", "PENDING"), (what, st, log[-4000:])
        assert time.monotonic() < deadline, (f"no {what}", log[-4000:])
        time.sleep(2)


def _trains_past(address: str, marker: str, steps: int) -> None:
    """Wait for `marker` in the job's log, then for `steps` training steps after it."""
    _wait_log(address, lambda log: marker in log and len(_steps(log.split(marker, 1)[1])) >= steps,
              f"{steps} steps after {marker!r}")


def _uninterrupted_streams(config: dict, steps: int) -> dict:
    """The loader position after `steps` steps of an uninterrupted run of `config` (the
    checkpoint's own): one rank taking the global batch of max workers every step."""
    from pretrain.data.loader import JointLoader
    from pretrain.train.config import ExperimentConfig, from_dict

    cfg = from_dict(ExperimentConfig, config)
    most = cfg.resources.max_workers
    data = dataclasses.replace(cfg.data, batch_size=most * cfg.data.batch_size,
                               image_batch_size=most * cfg.data.image_micro_batch)
    loader = JointLoader(data, 0, 1, seed=cfg.train.seed)
    try:
        for _ in range(steps):
            next(loader)
        return loader.state_dict()["streams"]
    finally:
        loader.close()


def test_a_node_drained_lost_and_replaced_under_an_elastic_job(two_nodes, smoke_data, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    address = two_nodes["dashboard"]
    tracking = tracking_db(tmp_path)

    def submit(steps: int) -> dict:
        # checkpoint.uri stays the config's relative runs/smoke/checkpoints
        code, out, err = run_cli("submit", SMOKE, *smoke_overrides(smoke_data, steps, 3),
                                 "resources.workers=[1, 2]", "resources.cpus_per_worker=2",
                                 "resources.max_failures=3", "resources.elastic_resize_every_s=5",
                                 "train.preemption_poll_steps=3",
                                 f"tracking.tracking_uri={tracking}", "--name", "elastic",
                                 "--address", address, "--json", *TAGS)
        assert code == 0, err
        return last_json(out)

    sub = submit(5000)
    assert sub["job_id"] == "elastic-1" and sub["tags"] == {"team": "vision", "sweep": "lr-3"}
    uri = sub["checkpoint_uri"]   # the job's own folder under checkpoint.uri, anchored here
    assert uri == str(tmp_path / "runs" / "smoke" / "checkpoints" / "elastic")

    # 1. two workers, one per node
    _wait_log(address, lambda log: len(_steps(log)) >= 3, "3 steps", timeout=400)
    workers = {a["node_id"] for a in state_rows(two_nodes, "actors")
               if "TrainWorker" in a.get("class_name", "") and a["state"] == "ALIVE"}
    assert workers == set(node_ids(two_nodes)), workers
    second = node_ids(two_nodes, head=False)[0]

    # 2. the drain notice: a checkpoint before the deadline, training goes on
    before = _steps(_log(address))[-1]
    drain_node(two_nodes, second, DEADLINE_S)
    deadline = time.time() + DEADLINE_S
    notice = r"preemption notice 1: node (\w+) .*deadline .*checkpoint at step (\d+)"
    log = _wait_log(address, lambda log: re.search(notice, log), "a preemption notice")
    notice_step = int(re.search(notice, log).group(2))
    assert notice_step > before
    _wait_log(address, lambda log: f"committed checkpoint step {notice_step} " in log,
              f"the checkpoint of step {notice_step}")
    assert time.time() < deadline
    code, out, _ = run_cli("status", "elastic", "--address", address)
    assert "preemption notices 1" in out, out

    # 3. the node goes: the group goes on on one worker
    kill_node(second)
    _trains_past(address, "worker group restart 1: resuming from the newest checkpoint on 1 "
                 "worker(s)", 6)

    # 4. capacity returns: the group grows back to two
    add_node(two_nodes)
    _trains_past(address, "worker group restart 2: resuming from the newest checkpoint on 2 "
                 "worker(s)", 4)

    # 5. stop: a final checkpoint, the summary, the samples of an uninterrupted run
    code, out, err = run_cli("stop", "elastic", "--address", address, "--json")
    assert code == 0, err
    done = wait_for(address, "elastic")
    log = logs_tail(address, "elastic", 20000)
    assert done["status"] == "STOPPED", (done, log)
    summary = last_json_line(log)
    assert summary and summary["stopped"], log
    assert summary["world_sizes"] == [2, 1, 2] and summary["restarts"] == 2, summary
    assert summary["preemptions"] == 1 and summary["preemption_notices"][0]["step"] == notice_step
    assert done["preemptions"] == 1 and done["restarts"] == 2, done
    steps = summary["steps"]
    info = committed(uri)
    assert info.step == steps == done["checkpoint_step"] and info.world_size == 2
    state = torch.load(Path(info.uri) / "run_state" / "rank_00000.pt", weights_only=False)
    assert state["loader"]["streams"] == _uninterrupted_streams(info.manifest.config, steps)
    # every step logged once, restarts and replays included
    assert [s for s, _ in history(tracking, summary["mlflow_run_id"])] == list(range(1, steps + 1))

    # 6. the same name again: attempt 2 resumes from the final checkpoint and finishes
    sub = submit(steps + 2)
    assert sub["job_id"] == "elastic-2" and sub["resumes_from_step"] == steps
    code, followed, _ = run_cli("logs", "elastic", "--follow", "--address", address)
    again = wait_for(address, "elastic")
    assert again["status"] == "SUCCEEDED" and again["job_id"] == "elastic-2", \
        logs_tail(address, "elastic-2")
    final = steps + 2
    assert again["step"] == final and f"step {final}/{final}" in followed
    assert again["checkpoint_step"] == final and again["checkpoint"].startswith(uri)
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]   # the same run continued
    assert [s for s, _ in history(tracking, again["mlflow_run_id"])] == list(range(1, final + 1))
    # tags: in the job's metadata, as filters of `list`, and on the MLflow run named after it
    assert again["tags"] == {"team": "vision", "sweep": "lr-3"}

    def listed(*filters: str) -> set[str]:
        code, out, err = run_cli("list", "--address", address, "--json", *filters)
        assert code == 0, err
        return {j["submission_id"] for j in last_json(out)["jobs"]}

    assert "elastic-2" in listed("--tag", "team=vision", "--status", "succeeded")
    assert "elastic-1" in listed("--tag", "team=vision", "--tag", "sweep=lr-3")
    assert "elastic-2" not in listed("--tag", "team=audio")
    assert "elastic-2" not in listed("--tag", "team=vision", "--status", "FAILED")
    assert listed("--tag", "team=vision") <= listed()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking).get_run(again["mlflow_run_id"])
    assert run.data.tags["team"] == "vision" and run.data.tags["sweep"] == "lr-3"
    assert run.info.run_name == "elastic"
