"""A checkpoint written before the consolidation of the config, storage and trainer code
(main at 427e247) still resumes, and trains on exactly as the old code did.

tests/data/checkpoint-427e247/step_00000002 is step 2 of a 4-step run of the old code (2
workers, ZeRO-2, a 1-block TubeViT on synthetic data; reference.json holds its overrides and
its train/loss at step 4; smoke.yaml is the config file of that run, kept here so that later
changes to configs/smoke.yaml do not change this test). Here the current code resumes that
checkpoint through `pretrain run` (real embedded Ray, two DeepSpeed workers on gloo), trains
steps 3 and 4 on the same synthetic data (its encoding is deterministic), and must land on
the old run's loss. A checkpoint the new code cannot read fails to resume; one it reads
wrongly (a renamed key, a model built differently, a lost data position) gives another loss.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "checkpoint-427e247"

pytestmark = pytest.mark.slow


def test_checkpoint_of_the_old_code_resumes_to_the_same_loss(tmp_path):
    reference = json.loads((FIXTURE / "reference.json").read_text())
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    shutil.copytree(FIXTURE / "step_00000002", checkpoints / "step_00000002")
    data = tmp_path / "data" / "synthetic"
    args = [*reference["overrides"], f"train.steps={reference['steps']}",
            "checkpoint.every_steps=2", f"checkpoint.uri={checkpoints}",
            f"data.synthetic.root={data}",
            f"data.video_uri={data}/video/train", f"data.video_eval_uri={data}/video/val",
            f"data.image_uri={data}/image/train", f"data.image_eval_uri={data}/image/val"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "run", str(FIXTURE / "smoke.yaml"),
         *args, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == 2, proc.stderr[-4000:]
    assert summary["steps"] == reference["steps"]
    # Same machine: bit-identical. The tolerance only allows another CPU's float reductions;
    # a fresh or misread model lands ~1e-3 away.
    assert summary["metrics"]["train/loss"] == pytest.approx(
        reference["train_loss_at_step_4"], rel=0, abs=2e-5)
