"""Masked pretraining at the level of `pretrain run` (real embedded Ray, 2 DeepSpeed workers at
ZeRO-3 on gloo, the smoke model with the masked objective of configs/smoke-masked.yaml on
tiny synthetic data, MLflow in a sqlite file), in two runs:

- a 6-step run that checkpoints at step 3 and evaluates at steps 0 and 3: the kNN monitor
  (eval/knn_*_top1) and the held-out reconstruction loss are logged from step 0, the
  input/masked/reconstruction PNGs are MLflow artifacts, and the node's system metrics
  (system/node_0/...) are in the run;
- a run resumed from a copy of its step-3 checkpoint, with activation checkpointing on,
  trains steps 4-6 to bit-identical train/loss values: the masks of a resumed run are the
  masks of the straight one (the mask RNG's position is in the checkpoint; without it the
  losses differ), and recomputing the blocks' activations in backward changes no bit. Its
  train.steps is larger (the learning rate is constant, train.min_lr = train.lr, so the
  schedule does not depend on it) and SIGTERM to `pretrain run` stops it after step 6, as a
  preemption would: final committed checkpoint, exit 0;
- that preemption checkpoint (2 ranks, ZeRO-3) resumed on one worker at ZeRO-2 for one more
  step: the universal conversion carries a masked run to another world size and stage
  (restore._bridge_param_states; before it, this resume raised IndexError inside DeepSpeed).

Then that masked checkpoint is exported (`pretrain export`): the file rebuilds the masked
autoencoder, and `load_encoder` gives the TubeViT that smoke.yaml fine-tunes (decoder dropped).
The machinery (Run, overrides, history) is tests/fixtures/pretrain_run.py's.
"""
from __future__ import annotations

import shutil
import signal

import pytest
import torch

from checkpoints.layout import step_dir

from tests.fixtures.pretrain_run import Run, committed, history, overrides, tracking_db

pytestmark = pytest.mark.slow

MASKED = ["train.objective=masked", "train.zero_stage=3", "masked.scheme=aligned", "masked.video_ratio=0.75",
          "masked.decoder.dim=64", "masked.decoder.depth=1", "masked.decoder.heads=4",
          "masked.knn_bank=32", "masked.grid_samples=2", "train.eval_every=3",
          "data.eval_temporal_views=1", "train.lr=1e-3", "train.min_lr=1e-3"]


@pytest.mark.timeout(900)
def test_masked_run_monitors_from_step_0_resumes_exactly_resizes_and_exports(tmp_path_factory, smoke_data):
    from mlflow.tracking import MlflowClient

    data = smoke_data   # the session's tiny synthetic data, written once
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    tracking = tracking_db(first)
    straight = Run(first, *overrides(data, 6, 3, f"checkpoint.uri={first}/ckpt",
                                     f"tracking.tracking_uri={tracking}",
                                     "tracking.system_metrics_every_s=1", *MASKED)).finish()
    run_id = straight["mlflow_run_id"]
    # the node's CPU, memory and network beside the training metrics (one node here)
    logged = MlflowClient(tracking).get_run(run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_percentage",
                 "network_transmit_megabytes"):
        assert f"system/node_0/{name}" in logged, sorted(logged)
    for key in ("eval/knn_video_top1", "eval/knn_image_top1", "eval/video_recon_loss"):
        points = history(tracking, run_id, key)
        assert [s for s, _ in points] == [0, 3], (key, points)
        assert all(0.0 <= v <= 1.0 if "knn" in key else v > 0.0 for _, v in points), (key, points)
    artifacts = {f.path for f in MlflowClient(tracking).list_artifacts(run_id, "reconstructions")}
    assert {"reconstructions/video_step_0000000.png", "reconstructions/image_step_0000003.png"} <= artifacts
    losses = history(tracking, run_id)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]

    shutil.copytree(first / "ckpt" / "step_00000003", second / "ckpt" / "step_00000003")
    # no periodic checkpoint after step 3: the next one is SIGTERM's
    run = Run(second, *overrides(data, 400, 1000, f"checkpoint.uri={second}/ckpt",
                                 f"tracking.tracking_uri={tracking_db(second)}",
                                 "train.activation_checkpointing=true",
                                 "checkpoint.preempt_grace_s=60", *MASKED))
    run.wait_for("step 6/400")
    run.proc.send_signal(signal.SIGTERM)
    resumed = run.finish(timeout=120)
    assert resumed["resumed_from_step"] == 3 and resumed["stopped"] and 6 <= resumed["steps"] < 400
    info = committed(str(second / "ckpt"))
    assert info.step == resumed["steps"] and resumed["checkpoint"] == info.uri
    again = history(f"sqlite:///{second}/mlflow.db", resumed["mlflow_run_id"])
    assert again[:3] == losses[3:]      # steps 4-6, bit for bit
    assert [s for s, _ in again] == list(range(4, resumed["steps"] + 1))

    # the preemption checkpoint on another world size and ZeRO stage: 2 ranks at 3 -> 1 at 2
    third = tmp_path_factory.mktemp("third")
    shutil.copytree(second / "ckpt" / step_dir(info.step), third / "ckpt" / step_dir(info.step))
    zero2 = [o for o in MASKED if not o.startswith("train.zero_stage=")] + ["train.zero_stage=2"]
    resized = Run(third, *overrides(data, info.step + 1, 1000, f"checkpoint.uri={third}/ckpt",
                                    f"tracking.tracking_uri={tracking_db(third)}",
                                    "resources.workers=1", *zero2)).finish()
    assert resized["resumed_from_step"] == info.step and resized["world_size"] == 1
    assert resized["steps"] == info.step + 1 and 0.0 < resized["metrics"]["train/loss"] < 5.0
    last = committed(str(third / "ckpt"))
    assert (last.step, last.world_size, last.zero_stage) == (info.step + 1, 1, 2)

    from orchestration.cli import main as cli
    from pretrain.model import load_model
    from pretrain.model.io import load_encoder
    from pretrain.model.mae import MaskedAutoencoder

    out = str(second / "masked.safetensors")
    assert cli(["export", str(second / "ckpt"), "--out", out]) == 0
    assert isinstance(load_model(out), MaskedAutoencoder)
    encoder = load_encoder(out, {"motion": 4})
    assert type(encoder).__name__ == "TubeViT" and encoder.datasets == ["motion"]
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 8, 32, 32)).shape == (2, 4)
