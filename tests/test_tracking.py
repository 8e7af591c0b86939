"""The metric logger against a real `mlflow server` on 127.0.0.1: batching off the training
thread, and `mark()`, which a checkpoint waits on before it commits."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pretrain.train.tracking import MetricLogger, NullLogger


@pytest.mark.slow
def test_mark_is_set_once_earlier_metrics_are_on_the_server(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment("mark-test")
    run_id = client.create_run(exp).info.run_id
    # A flush interval far longer than the test: only the mark can make these go out.
    logger = MetricLogger(mlflow_server, run_id, flush_every_s=3600)
    try:
        for step in range(1, 6):
            logger.log({"train/loss": 1.0 / step}, step)
        assert logger.mark().wait(60)
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == [1, 2, 3, 4, 5]
        logger.log({"train/loss": 0.1}, 6)          # after the mark: still batched
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] != []
        assert 6 not in [m.step for m in client.get_metric_history(run_id, "train/loss")]
    finally:
        logger.close()
    assert 6 in [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert logger.mark().is_set()                  # closed: nothing left to wait for


def test_null_logger_mark_never_blocks():
    assert NullLogger().mark().is_set()
