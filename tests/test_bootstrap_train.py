"""Training a bootstrapped model through the real training code (slow).

1. ZeRO-3 on 2 processes with the frozen prefix: the model is built partitioned from the
   file (zero.Init + one tensor at a time), trains a video and an image step, and afterwards
   exactly the trainable parameters differ from the file; the losses equal ZeRO-0's.
2. End to end on tiny stand-ins: a small TubeViT trained on the synthetic demo data (the
   session's six-step smoke run) -> its model file -> `pretrain bootstrap` into a wider,
   deeper random timm ViT -> `pretrain run configs/bootstrap-tiny.yaml` (Ray, 2 workers,
   ZeRO-3) on the same data.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.ranks import run_ranks

timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
SMALL_TUBES = [{"kernel": [1, 8, 8], "stride": [8, 8, 8]}, {"kernel": [4, 8, 8], "stride": [4, 8, 8]}]


def tiny_vit(dim=64, depth=4, heads=4, patch=8, img=32):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             num_classes=0)


def make_bootstrapped(path: str) -> None:
    from pretrain.model import create_model, save_model
    from pretrain.model.bootstrap import bootstrap

    torch.manual_seed(1)
    small = create_model("tubevit-ti", depth=2, dim=48, heads=2, mlp_dim=96, tubes=SMALL_TUBES,
                         num_classes={"vid": 4, "img": 3})
    model, meta = bootstrap(tiny_vit().state_dict(), small, gate_layer=2, heads=4)
    save_model(model, path, meta)


def _zero_worker(rank: int, world: int, path: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from pretrain.model import load_model
    from pretrain.train.config import ExperimentConfig, from_dict
    from pretrain.train.engine import build_engine
    from pretrain.train.worker import build_model, train_micro_step

    reference = load_model(path).state_dict()
    results = {}
    for stage in (0, 3):
        cfg = from_dict(ExperimentConfig, {
            "data": {"video_uri": "unused", "image_uri": "unused", "batch_size": 2},
            "train": {"steps": 2, "zero_stage": stage, "precision": "fp32", "lr": 1e-2},
            "bootstrap": {"init_from": path}})
        model = build_model(cfg, {"vid": 4, "img": 3})
        partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        engine, _, _ = build_engine(model, cfg, world)
        losses = []
        for step, (modality, dataset) in enumerate([("video", "vid"), ("image", "img")]):
            g = torch.Generator().manual_seed(10 * step + rank)
            batch = type("Batch", (), {})()
            batch.modality, batch.dataset = modality, dataset
            batch.x = torch.randn((2, 3, 8, 32, 32) if modality == "video" else (2, 3, 32, 32), generator=g)
            batch.y = torch.randint(0, 3, (2,), generator=g)
            loss = train_micro_step(engine, batch).detach()
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
        changed, trainable = [], []
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                trainable.append(name)
            with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
                if not torch.equal(p.detach().reshape(reference[name].shape), reference[name]):
                    changed.append(name)
        results[stage] = {"losses": losses, "changed": changed, "trainable": trainable,
                          "partitioned": partitioned}
        engine.destroy()
    return results


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_frozen_prefix_trains_only_the_trainable_part(tmp_path):
    path = str(tmp_path / "boot.safetensors")
    make_bootstrapped(path)
    results = run_ranks(_zero_worker, 2, path)[0]
    z0, z3 = results[0], results[3]
    assert z3["partitioned"] and not z0["partitioned"]   # built partitioned under ZeRO-3
    for r in (z0, z3):
        assert set(r["changed"]) == set(r["trainable"]), set(r["changed"]) ^ set(r["trainable"])
        assert not any(n.startswith(("tokenizer.", "pos_embed.", "blocks.0.", "blocks.1.")) for n in r["trainable"])
        assert {"blocks.2.attn.qkv.weight", "gate.alpha", "heads.vid.weight", "heads.img.weight"} <= set(r["trainable"])
    assert z3["losses"] == pytest.approx(z0["losses"], rel=1e-5)
    assert all(math.isfinite(v) for v in z3["losses"])


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 240) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)   # the first user of the session's six-step run pays for it here
def test_small_tubevit_to_bootstrapped_vit_trains_through_pretrain_run(tmp_path, six_steps, smoke_data):
    from pretrain.model import load_model
    from pretrain.model.bootstrap import frozen_prefix
    from tests.fixtures.pretrain_run import overrides, tracking_db

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    py = sys.executable
    # 1. the small TubeViT: the smoke config trained a few steps (the session's six-step run)
    # 2. its model file, from the committed checkpoint
    _run([py, "-m", "orchestration.cli", "export", six_steps[2]["checkpoint"], "--out", "small.safetensors"],
         tmp_path, env)

    # 3. a larger "image ViT" (width 128 vs 96, 6 blocks, patch 8 at 32 px) and the bootstrap
    torch.save(tiny_vit(dim=128, depth=6).state_dict(), tmp_path / "vit.pth")
    out = _run([py, "-m", "orchestration.cli", "bootstrap", "--image-checkpoint", "vit.pth", "--tubes-from",
                "small.safetensors", "--gate-layer", "4", "--heads", "4", "--out", "boot.safetensors", "--json"],
               tmp_path, env)
    boot = json.loads(out.strip().splitlines()[-1])
    assert boot["dim"] == 128 and boot["trained_blocks"] == 2 and boot["width_map"].endswith("d=96 -> D=128")

    # 4. train it: pretrain run, Ray, 2 workers, ZeRO-3, frozen prefix
    same_data = [o for o in overrides(smoke_data, 4, 4) if o.startswith("data.")]
    out = _run([py, "-m", "orchestration.cli", "run", str(REPO / "configs/bootstrap-tiny.yaml"),
                *same_data, "bootstrap.init_from=boot.safetensors", "train.steps=4", "train.warmup_steps=1",
                "train.log_every=2", "train.eval_at_end=true", "checkpoint.every_steps=4",
                "data.batch_size=4", "data.image_batch_size=4", "data.eval_batch_size=4",
                f"tracking.tracking_uri={tracking_db(tmp_path)}", "--json"], tmp_path, env, timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["world_size"] == 2 and result["checkpoint"]
    assert math.isfinite(result["metrics"]["train/loss"])
    assert 0.0 <= result["metrics"]["eval/video_top1"] <= 1.0

    # 5. export the ZeRO-3 checkpoint: frozen parameters (not in the optimizer's shards) come
    # back unchanged from the bootstrap file, trained ones changed
    _run([py, "-m", "orchestration.cli", "export", result["checkpoint"], "--out", "trained.safetensors"],
         tmp_path, env)
    trained, boot_model = load_model(str(tmp_path / "trained.safetensors")), load_model(str(tmp_path / "boot.safetensors"))
    before = boot_model.state_dict()
    frozen = [n for n in before if frozen_prefix(n, 4)]
    assert frozen and all(torch.equal(trained.state_dict()[n], before[n]) for n in frozen)
    assert not torch.equal(trained.state_dict()["blocks.5.mlp.fc1.weight"], before["blocks.5.mlp.fc1.weight"])
