"""Fast checks of the training pieces that need no process group: schedule, weight-decay
groups, DeepSpeed config, the MFU table, the loss window carried over a resume."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.train.config import ExperimentConfig, from_dict
from pretrain.train.engine import deepspeed_config
from pretrain.train.metrics import Window, accelerator_peak
from pretrain.train.optim import param_groups, warmup_cosine


def cfg(**train):
    return from_dict(ExperimentConfig, {"model": {"name": "tubevit-ti"},
                                        "data": {"video_uri": "v", "batch_size": 4},
                                        "train": {"steps": 100, **train}})


def test_warmup_then_cosine():
    lr = lambda s: warmup_cosine(s, warmup=10, total=110, peak=1.0, final=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_no_weight_decay_params_are_excluded():
    from pretrain.model import create_model

    model = create_model("tubevit-ti", depth=1, dim=48, heads=2, mlp_dim=96)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert model.no_weight_decay() <= skipped
    assert "pool.query" in skipped
    assert all(p.ndim > 1 for p in decay["params"])


def test_deepspeed_config_follows_train_section():
    ds = deepspeed_config(cfg(zero_stage=3, precision="bf16", grad_accum_steps=4, grad_clip=0.5), 8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["train_batch_size"] == 4 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    off = deepspeed_config(cfg(zero_stage=3, cpu_offload=True), 2)["zero_optimization"]
    assert off["offload_param"]["device"] == "cpu" and off["offload_optimizer"]["device"] == "cpu"
    assert "bf16" not in deepspeed_config(cfg(precision="fp32"), 1)
    # ZeRO-3's working set is bounded by our settings, not DeepSpeed's 1e9-element defaults
    # (which kept every gathered block whole until its backward and stepped Adam on the
    # whole partition at once).
    z3 = deepspeed_config(cfg(zero_stage=3, zero_bucket_elements=20_000_000,
                              zero3_sub_group_elements=5_000_000), 2)["zero_optimization"]
    assert z3["stage3_max_live_parameters"] == z3["stage3_max_reuse_distance"] == 20_000_000
    assert z3["stage3_prefetch_bucket_size"] == z3["reduce_bucket_size"] == 20_000_000
    assert z3["sub_group_size"] == 5_000_000


def test_mfu_peak_only_for_known_accelerators():
    assert accelerator_peak("NVIDIA H100 80GB HBM3", "bf16") == ("H100", 989e12)
    assert accelerator_peak("NVIDIA H100 PCIe", "bf16")[1] == 756e12
    assert accelerator_peak("NVIDIA A100-SXM4-80GB", "bf16")[1] == 312e12
    assert accelerator_peak("some cpu", "bf16")[1] is None


def test_loss_window_mean_and_carry_over_resume():
    w = Window()
    for v in (1.0, 2.0, 3.0):
        w.add_step(torch.tensor(v), 4, 40, 1e6, "video")
    carried = w.carry(1)
    assert carried == {"loss_mean": 2.0, "steps": 3.0}
    resumed = Window.from_carry(carried)
    resumed.add_step(torch.tensor(6.0), 4, 40, 1e6, "image")
    m = resumed.reduce(1, None, 1e-3)
    assert m["train/loss"] == pytest.approx(3.0)   # (1 + 2 + 3 + 6) / 4, as without a resume
    assert "perf/mfu" not in m and m["train/lr"] == 1e-3
