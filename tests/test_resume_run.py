"""Resume at the level of `pretrain run`: real embedded Ray, 2 DeepSpeed workers on gloo, the
smoke model on tiny synthetic data, MLflow in a sqlite file.

- stop-and-resume is invisible: 6 steps straight (the session's `six_steps` run) vs stop
  after 3 (checkpoint.stop_after_step, the same clean stop SIGTERM takes) + resume to 6 ->
  bit-identical train/loss at every step, one MLflow run continued without duplicate steps;
- resume on 1 worker at ZeRO-3 from a 2-worker ZeRO-2 checkpoint (automatic resharding),
  stopped by SIGTERM to the `pretrain run` process: final committed checkpoint, exit 0;
- a checkpoint from another model is a one-paragraph error, exit 2, before Ray starts;
- a Ray worker killed with SIGKILL mid-run, checkpoints in gs:// (GCS emulator): Ray Train
  restarts the group (FailureConfig), it resumes from the newest committed checkpoint,
  logging no step twice; then SIGTERM to one Ray worker of the new group: final committed
  checkpoint, exit 0.

Each run costs ~60 s of start-up (Ray, worker processes, DeepSpeed) before its first step,
so one run checks several things where they do not interfere.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from tests.fixtures.pretrain_run import Run, committed, history, overrides, tracking_db


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory, smoke_data):
    """A 6-step run stopped cleanly after step 3: (its folder, checkpoint root, summary)."""
    where = tmp_path_factory.mktemp("stopped")
    ckpt = where / "ckpt"
    run = Run(where, *overrides(smoke_data, 6, 100, f"checkpoint.uri={ckpt}",
                                f"tracking.tracking_uri={tracking_db(where)}",
                                "checkpoint.stop_after_step=3"))
    return where, ckpt, run.finish()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_and_resume_is_invisible(smoke_data, stopped_at_3, six_steps):
    where, ckpt, first = stopped_at_3
    assert first["stopped"] and first["steps"] == 3
    assert first["checkpoint"] == f"{ckpt}/step_00000003"
    tracking = f"sqlite:///{where}/mlflow.db"
    from mlflow.tracking import MlflowClient
    assert MlflowClient(tracking).get_run(first["mlflow_run_id"]).info.status == "KILLED"

    straight_at, _, straight = six_steps
    resumed = Run(where, *overrides(smoke_data, 6, 100, f"checkpoint.uri={ckpt}",
                                    f"tracking.tracking_uri={tracking}")).finish()
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6 and not resumed["stopped"]
    # the same numbers, bit for bit, at every step and at the end
    assert resumed["metrics"]["train/loss"] == straight["metrics"]["train/loss"]
    a = history(f"sqlite:///{straight_at}/mlflow.db", straight["mlflow_run_id"])
    b = history(tracking, resumed["mlflow_run_id"])
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
    assert b == a   # one run continued: steps 1-3 from the first part, 4-6 from the resume
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    assert MlflowClient(tracking).get_run(first["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_on_one_worker_at_zero3_then_sigterm_to_the_driver(tmp_path, smoke_data, stopped_at_3):
    _, ckpt, _ = stopped_at_3
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt / "step_00000003", copy / "step_00000003")
    # no periodic checkpoint: the one after step 3 is the SIGTERM one
    run = Run(tmp_path, *overrides(smoke_data, 400, 1000, f"checkpoint.uri={copy}",
                                   f"tracking.tracking_uri={tracking_db(tmp_path)}",
                                   "resources.workers=1", "train.zero_stage=3",
                                   "checkpoint.preempt_grace_s=60"))
    run.wait_for("step 5/400")
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out = run.finish(timeout=120)
    assert time.monotonic() - t0 < 60          # within checkpoint.preempt_grace_s
    assert out["resumed_from_step"] == 3 and out["world_size"] == 1
    assert out["stopped"] and 5 <= out["steps"] < 400
    assert 0.5 < out["metrics"]["train/loss"] < 3.0
    # this tracking server never saw the checkpoint's run: a new one, said so
    assert "logging to a new run" in run.stderr()
    info = committed(str(copy))
    assert info.step == out["steps"] and info.world_size == 1 and info.zero_stage == 3
    assert out["checkpoint"] == info.uri


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, smoke_data, stopped_at_3):
    _, ckpt, _ = stopped_at_3
    run = Run(tmp_path, *overrides(smoke_data, 6, 100, f"checkpoint.uri={ckpt}",
                                   f"tracking.tracking_uri={tracking_db(tmp_path)}",
                                   "model.depth=2"))
    run.finish(code=2, timeout=120)
    err = run.stderr()
    assert "differing model config keys" in err and "depth" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_restarts_from_the_newest_checkpoint_on_gcs_and_sigterm_stops_it(
        tmp_path, smoke_data, gcs_bucket):
    uri = f"{gcs_bucket}/run"
    tracking = tracking_db(tmp_path)
    # Metrics are only sent when a checkpoint asks for it (flush interval longer than the
    # test): rank 0 dies with metrics queued, and the steps up to the checkpoint it resumes
    # from must be in MLflow all the same (they are never trained again).
    run = Run(tmp_path, *overrides(smoke_data, 400, 2, f"checkpoint.uri={uri}",
                                   f"tracking.tracking_uri={tracking}", "resources.max_failures=1",
                                   "checkpoint.preempt_grace_s=60", "tracking.flush_every_s=3600"))
    run.wait_for("step 1/400")
    deadline = time.monotonic() + 120
    while (committed(uri) is None or committed(uri).step < 4) and time.monotonic() < deadline:
        assert run.proc.poll() is None, run.stderr()[-4000:]
        time.sleep(0.3)
    workers = run.train_workers()
    assert len(workers) == 2
    rank0 = run.rank0_pid()
    assert rank0 in workers, run.log().read_text()[-4000:]
    os.kill(rank0, signal.SIGKILL)
    run.wait_for(f"resumed from {uri}/step_")
    # the new group trains past the killed group's last step, then one of its workers gets
    # SIGTERM (a node's preemption notice as Kubernetes delivers it): the whole group stops
    # with a final checkpoint. Past it: the killed group's metrics up to its last step are in
    # MLflow (a run cannot take them back), so a stop before that step would leave logged
    # steps beyond the final one.
    console = run.stderr()
    resumed_at = console.index(f"resumed from {uri}/step_")
    killed_last = max(int(n) for n in re.findall(r"^step (\d+)/400", console[:resumed_at], re.M))
    run.wait_for_true(lambda: any(int(n) > killed_last for n in re.findall(
        r"^step (\d+)/400", run.stderr()[resumed_at:], re.M)), 240,
        f"a step after the resume past step {killed_last}")
    restarted = run.train_workers()
    assert len(restarted) == 2 and not set(restarted) & set(workers)
    os.kill(restarted[-1], signal.SIGTERM)
    t0 = time.monotonic()
    out = run.finish(timeout=120)
    assert time.monotonic() - t0 < 60          # within checkpoint.preempt_grace_s
    assert out["stopped"] and out["steps"] < 400
    assert out["resumed_from_step"] and 4 <= out["resumed_from_step"] < out["steps"]
    info = committed(uri)
    assert info.step == out["steps"] and out["checkpoint"] == info.uri
    steps = [s for s, _ in history(tracking, out["mlflow_run_id"])]
    assert steps == list(range(1, out["steps"] + 1))   # re-trained steps were not logged twice
