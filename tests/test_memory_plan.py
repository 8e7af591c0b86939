"""Per-worker memory plan (pretrain/train/memory.py) and `pretrain plan`'s memory flags."""
from __future__ import annotations

import json

import pytest
import torch

from orchestration.cli import main
from pretrain.model import count_params, create_model
from pretrain.train.memory import GIB, plan_memory, verdict


def hand_model():
    # one 2D tube 1x8x8, depth 2, width 12, MLP 24, one 2-class head
    return create_model("tubevit-ti", depth=2, dim=12, heads=2, mlp_dim=24, num_classes={"a": 2},
                        tubes=[{"kernel": [1, 8, 8], "stride": [8, 8, 8]}])


def test_matches_hand_computed_numbers():
    model = hand_model()
    # tokenizer 12*3*64 + 12 = 2316; block 24+468+156+24+312+300 = 1284 (x2); norm 24;
    # pool 12+156+312+156 = 636; head 26
    assert count_params(model) == 5570
    plan = plan_memory(model, (16, 16), micro_batch=3, workers=2, zero_stage=2, precision="bf16",
                       overhead_gib=0.0)
    b = plan["bytes"]
    assert plan["tokens"] == 4 and plan["params_trainable"] == 5570
    assert b["params"] == 2 * 5570                     # bf16, not sharded at stage 2
    assert b["grads"] == 2 * 5570 // 2                 # sharded over 2
    assert b["optimizer"] == 12 * 5570 // 2            # fp32 master + m + v, sharded
    per_block = (9 * 4 * 12 + 2 * 4 * 24) * 2          # 1248
    assert b["activations"] == 3 * (2 * per_block + per_block + (2 * 4 * 12 + 2 * 12) * 2 + 3 * 16 * 16 * 2)
    assert b["working"] == 0 and b["buffers"] == 2 * 5570
    assert b["temporaries"] == 4 * 5570 // 2          # AdamW's temporary on the flat fp32 partition
    assert b["total"] == 11140 + 5570 + 33420 + 16560 + 11140 + 11140
    # the bootstrap's frozen prefix: only blocks[1:], norm, pool and head train
    frozen = plan_memory(model, (16, 16), micro_batch=3, workers=2, zero_stage=2, gate_layer=1, overhead_gib=0.0)
    assert frozen["params_trainable"] == 1284 + 24 + 636 + 26
    assert frozen["bytes"]["activations"] == 3 * (per_block + per_block + 240 + 1536)
    # stage 3: parameters sharded too, plus two gathered blocks
    z3 = plan_memory(model, (16, 16), micro_batch=3, workers=2, zero_stage=3, overhead_gib=0.0)
    assert z3["bytes"]["params"] == 5570 and z3["bytes"]["working"] == 2 * 2 * 1284
    fp32 = plan_memory(model, (16, 16), micro_batch=1, workers=1, zero_stage=0, precision="fp32", overhead_gib=0.0)
    assert fp32["bytes"]["optimizer"] == 8 * 5570 and fp32["bytes"]["params"] == 4 * 5570
    assert fp32["bytes"]["buffers"] == 0 and fp32["bytes"]["temporaries"] == 0   # one stage-0 worker


def test_monotonic_in_stage_and_workers():
    with torch.device("meta"):
        model = create_model("tubevit-l")
    kw = dict(micro_batch=4, precision="bf16", touched_only=False)
    for workers in (2, 8, 64):
        totals = [plan_memory(model, (32, 224, 224), workers=workers, zero_stage=s, **kw)["bytes"]["total"]
                  for s in range(4)]
        assert totals == sorted(totals, reverse=True) and totals[0] > totals[3]
    for stage in range(4):
        totals = [plan_memory(model, (32, 224, 224), workers=w, zero_stage=stage, **kw)["bytes"]["total"]
                  for w in (2, 4, 64)]   # (1 -> 2 workers adds the reduce bucket)
        assert totals == sorted(totals, reverse=True)
        assert (totals[0] == totals[-1]) == (stage == 0)
    full = plan_memory(model, (32, 224, 224), workers=8, zero_stage=3, **kw)
    ckpt = plan_memory(model, (32, 224, 224), workers=8, zero_stage=3, activation_checkpointing=True, **kw)
    assert ckpt["bytes"]["activations"] < full["bytes"]["activations"] / 4
    assert verdict(full, 1000.0)["fits"] and not verdict(full, 0.5)["fits"]
    assert full["gib"]["total"] == pytest.approx(full["bytes"]["total"] / GIB, abs=1e-3)


def plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_cli_memory_verdict(capsys):
    alone = plan_json(capsys, "--model", "tubevit-h", "--micro-batch", "128", "--device-memory", "80")
    assert not alone["fits"] and alone["memory_per_worker_gib"]["total"] > 80
    sharded = plan_json(capsys, "--model", "tubevit-h", "--workers", "64", "--zero-stage", "3",
                        "--micro-batch", "4", "--activation-checkpointing", "--device-memory", "80")
    assert sharded["fits"] and sharded["memory_per_worker_gib"]["total"] < alone["memory_per_worker_gib"]["total"]
    assert set(sharded["memory_per_worker_gib"]) >= {"params", "grads", "optimizer", "activations", "total"}
    boot = plan_json(capsys, "--model", "tubevit-h", "--gate-layer", "24", "--micro-batch", "4")
    assert boot["params_trainable"] < boot["params"] / 3
    assert main(["plan", "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    assert main(["plan", "--model", "tubevit-b", "--gate-layer", "12"]) == 2
    assert "--gate-layer 12" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_memory_benchmark_runs_the_real_training_code(tmp_path):
    """benchmarks/zero3_memory.py on a tiny stand-in: real DeepSpeed engines (stage 0 on one
    process, ZeRO-3 on two), its JSON contract, and the same first loss either way."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "benchmarks/zero3_memory.py", "--model", "tubevit-ti",
                          "--frames", "8", "--size", "32", "--json"], cwd=root,
                         capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("unsharded_peak_gib", "sharded_peak_gib_per_worker", "training_steps_peak_gib",
                "plan_unsharded_gib", "plan_sharded_gib", "ratio", "steps", "precision"):
        assert key in result, key
    assert len(result["sharded_peak_gib_per_worker"]) == 2 and result["precision"] == "bf16"
    assert result["loss"]["unsharded"] == pytest.approx(result["loss"]["sharded"], rel=1e-3)
    assert result["ratio"] > 0 and result["plan_sharded_gib"]["total"] > 0


def test_factorised_blocks_and_vtn_count_their_own_activations():
    """Divided / factorised attention keeps a second attention's tensors per block; VTN's
    chunked, checkpointed backbone keeps one chunk live whatever the clip length."""
    kw = dict(micro_batch=1, precision="bf16", overhead_gib=0.0)
    with torch.device("meta"):
        joint, fsa, divided = (create_model(n) for n in ("vivit-b", "vivit-fsa-b", "timesformer-b"))
        vtn = create_model("vtn-b")
    acts = {name: plan_memory(model, (16, 224, 224), **kw)["bytes"]["activations"]
            for name, model in (("joint", joint), ("fsa", fsa), ("divided", divided))}
    # same 1568 tokens: per block (16 N d + 2 N m) and (17 N d + 2 N m) against (9 N d + 2 N m)
    d, m = 768, 3072
    assert acts["fsa"] / acts["joint"] == pytest.approx((16 * d + 2 * m) / (9 * d + 2 * m), rel=0.02)
    assert acts["divided"] > acts["fsa"]
    vtn_acts = {(T, ckpt): plan_memory(vtn, (T, 224, 224), activation_checkpointing=ckpt, **kw)
                ["bytes"]["activations"] for T in (64, 256) for ckpt in (False, True)}
    assert vtn_acts[256, False] / vtn_acts[64, False] == pytest.approx(4.0, rel=0.01)
    assert vtn_acts[256, True] / vtn_acts[64, True] < 1.1          # bounded by the chunk
    assert vtn_acts[256, True] < vtn_acts[64, False] / 3
