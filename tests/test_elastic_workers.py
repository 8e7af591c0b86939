"""Elastic workers on a real two-node Ray cluster (tests/fixtures/ray_nodes.py).

A job with resources.workers=[1, 2] (one worker per node: 2 CPUs each on 2-CPU nodes)
starts on both nodes; the second node is lost (SIGKILL to its raylet, agents and workers:
a machine gone, not a polite drain); Ray Train restarts the group on the one worker left,
which resumes from the newest checkpoint and trains on; a new node joins and the group grows
back to two; the job is stopped. It has then seen exactly the samples an uninterrupted run of
as many steps sees (its loader position equals that of a one-rank loader taking the global
batch every step), and MLflow holds every step once.
"""
from __future__ import annotations

import dataclasses
import re
import signal
from pathlib import Path

import pytest
import torch

from tests.fixtures.pretrain_run import Run, committed, history, overrides
from tests.fixtures.ray_nodes import add_node, kill_node, ray_cluster
from tests.test_preemption_drain import second_node_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# A lost node is declared dead after ~3 s of missed health checks (Ray's default: ~30 s).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


@pytest.fixture
def two_nodes():
    with ray_cluster(num_cpus=2, second_node_resources={}, system_env=FAST_HEALTH_CHECKS) as info:
        yield info


def _steps(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^step (\d+)/\d+ ", text, re.M)]


def _trains_past(run: Run, marker: str, steps: int, timeout: float = 300) -> int:
    """Wait for `marker` in the run's console, then for `steps` more training steps after
    it; the last step seen."""
    run.wait_for(marker, timeout)

    def after() -> list[int]:
        return _steps(run.stderr().split(marker, 1)[1])

    run.wait_for_true(lambda: len(after()) >= steps, timeout, f"{steps} steps after {marker!r}")
    return after()[-1]


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


def test_two_workers_lose_a_node_go_on_with_one_and_grow_back(two_nodes, tmp_path):
    data, ckpt = tmp_path / "synthetic", tmp_path / "ckpt"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = overrides(data, 5000, 3, "resources.workers=[1, 2]", "resources.cpus_per_worker=2",
                     "resources.max_failures=3", "resources.elastic_resize_every_s=5",
                     f"checkpoint.uri={ckpt}", f"tracking.tracking_uri={tracking}")
    run = Run(tmp_path, *args, env={"RAY_ADDRESS": two_nodes["address"], **two_nodes["env"]})
    run.wait_for("step 6/", timeout=400)

    kill_node(second_node_id(two_nodes))
    lost_at = _steps(run.stderr())[-1]
    _trains_past(run, "worker group restart 1: resuming from the newest checkpoint on 1 "
                 "worker(s)", 6)

    add_node(two_nodes)
    _trains_past(run, "worker group restart 2: resuming from the newest checkpoint on 2 "
                 "worker(s)", 4)
    run.proc.send_signal(signal.SIGTERM)
    out = run.finish(timeout=300)

    assert out["stopped"] and out["world_sizes"] == [2, 1, 2] and out["restarts"] == 2, out
    steps = out["steps"]
    assert steps > lost_at + 6
    info = committed(str(ckpt))
    assert info.step == steps and info.world_size == 2
    state = torch.load(Path(info.uri) / "run_state" / "rank_00000.pt", weights_only=False)
    assert state["loader"]["streams"] == _uninterrupted_streams(info.manifest.config, steps)
    # every step logged once, restarts and replays included
    assert [s for s, _ in history(tracking, out["mlflow_run_id"])] == list(range(1, steps + 1))
