"""benchmarks/checkpoint_stall.py keeps working at a tiny size: its own GCS emulator, the
async and synchronous saves, the restore in the trainer's order (claim, build, restore) with
the raw-read baselines between build and restore, and one JSON line on stdout. Slow: a real
emulator and DeepSpeed engines; the figures themselves are the benchmark's business
(benchmarks/RESULTS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpoint_stall_runs_and_prints_one_json_line():
    out = subprocess.run([sys.executable, "benchmarks/checkpoint_stall.py", "--json",
                          "--model", "tubevit-ti", "--checkpoints", "1", "--steps-between", "1",
                          "--size", "32", "--restore-rounds", "1", "--raw-repeats", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]     # DeepSpeed's prints go to stderr
    result = json.loads(lines[0])
    assert result["model"] == "tubevit-ti" and result["checkpoint_bytes"] > 0
    assert result["uploads_in_flight_at_save"] == [0]
    assert 0 < result["blocked_s"] < result["sync_s"]
    (round_,) = result["restore_rounds"]
    assert round_["restore_s"] > 0 and round_["raw_kept_s"] > 0 and round_["build_s"] > 0
    assert 0 <= round_["lease_wait_s"] <= result["lease_settle_s"]
    assert result["restore_vs_raw_kept"] == pytest.approx(round_["raw_kept_s"] / round_["restore_s"],
                                                          abs=0.01)
