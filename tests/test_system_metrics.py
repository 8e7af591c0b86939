"""Per-node system metrics (pretrain/train/system_metrics.py) land in a real MLflow store
(sqlite file) under system/node_<N>/, from the node leader only; at the level of
`pretrain run` the masked-run test (tests/test_masked_train_run.py) checks them too."""
from __future__ import annotations

import time

import pytest

from pretrain.train import system_metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("sys")


@pytest.fixture
def run(store):
    uri, client, exp = store
    return uri, client, client.create_run(exp).info.run_id


def test_the_node_leader_logs_cpu_memory_disk_and_network(run, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "3")
    uri, client, run_id = run
    monitor = system_metrics.start_node_monitor(uri, run_id, every_s=0.2)
    assert monitor is not None and monitor.node_id == "node_3"
    time.sleep(1.0)
    monitor.close()
    keys = set(client.get_run(run_id).data.metrics)
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes",
                 "disk_usage_percentage", "network_receive_megabytes"):
        assert f"system/node_3/{name}" in keys, sorted(keys)
    steps = [m.step for m in client.get_metric_history(run_id, "system/node_3/cpu_utilization_percentage")]
    assert steps == sorted(steps) and len(steps) >= 2


@pytest.mark.parametrize("env,every_s", [({"LOCAL_RANK": "1"}, 1.0), ({"LOCAL_RANK": "0"}, 0.0)])
def test_other_local_ranks_and_zero_interval_start_nothing(run, monkeypatch, env, every_s):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    uri, _, run_id = run
    assert system_metrics.start_node_monitor(uri, run_id, every_s) is None
    assert system_metrics.start_node_monitor(None, run_id, 1.0) is None


def test_torchrun_group_rank_names_the_node(monkeypatch):
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.setenv("GROUP_RANK", "2")
    assert system_metrics.node_rank() == 2
