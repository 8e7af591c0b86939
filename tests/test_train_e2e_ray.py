"""`pretrain run configs/smoke.yaml` end to end: embedded Ray, 2 workers, DeepSpeed ZeRO-2, the
real synthetic data, a real MLflow server.

Checks: the --json summary (last stdout line), one MLflow run with the resolved config as
params + config.yaml, every promised metric present, train/loss falls between the first and
the last log point. The ZeRO-2 run is the smoke config exactly as a user runs it (600
steps, ~4-6 minutes on 2 cores) and must learn both tasks on the held-out sets: video top-1
>= 0.9 (4 motion directions) and image top-1 >= 0.8 (4 shapes); chance is 0.25 for both.
Two workers at ZeRO-3 under `pretrain run` are tests/test_masked_train_run.py's (a straight
run, a bit-identical resume, an export); one worker at ZeRO-3 resumed from a ZeRO-2
checkpoint is tests/test_resume_run.py's.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "data" / "smoke2"   # shared with `pretrain run configs/smoke.yaml`

METRICS = ["train/loss", "train/lr", "perf/samples_per_sec", "perf/tokens_per_sec",
           "perf/step_time_s", "eval/video_top1", "eval/image_top1", "data/skipped_samples"]


def run_smoke(tmp_path: Path, tracking_uri: str, *overrides: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "orchestration.cli", "run", str(ROOT / "configs" / "smoke.yaml"),
           f"tracking.tracking_uri={tracking_uri}", f"checkpoint.uri={tmp_path / 'ckpt'}",
           f"data.synthetic.root={SYNTHETIC}",
           *(f"data.{k}_uri={SYNTHETIC / m / s}" for k, m, s in
             (("video", "video", "train"), ("video_eval", "video", "val"),
              ("image", "image", "train"), ("image_eval", "image", "val"))),
           *overrides, "--json"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step " in proc.stderr and "samples/s" in proc.stderr and "eta" in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_run(summary: dict, tracking_uri: str, zero_stage: int, loss_falls: bool = True) -> None:
    from mlflow.tracking import MlflowClient

    assert summary["tracking_uri"] == tracking_uri
    assert summary["checkpoint"] and Path(summary["checkpoint"]).exists()
    for key in METRICS:
        assert key in summary["metrics"], key
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == str(zero_stage)
    assert run.data.params["resources.workers"] == "2"
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    for key in METRICS:
        assert key in run.data.metrics, key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                      key=lambda m: m.step)]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), losses
    if loss_falls:
        assert losses[-1] < losses[0] - 0.05, losses
    # one run per job, never one per worker
    exp = client.get_experiment(run.info.experiment_id)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_id = '{run.info.run_id}'")
    assert len(runs) == 1


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_smoke_config_learns_motion_and_shape(tmp_path, mlflow_server):
    summary = run_smoke(tmp_path, mlflow_server)
    check_run(summary, mlflow_server, 2)
    assert summary["metrics"]["eval/video_top1"] >= 0.9, summary["metrics"]
    assert summary["metrics"]["eval/image_top1"] >= 0.8, summary["metrics"]
