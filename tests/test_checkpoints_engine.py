"""Checkpoints with real DeepSpeed engines (CPU, gloo, 2 processes) on a tiny TubeViT.

One scenario, in order, against the GCS emulator:
1. 2 ranks, ZeRO-2: train 4 steps, checkpoint every 2 (async upload + commit), record the
   full fp32 weights, Adam moments, lr, RNG draw, outputs, and the losses of steps 5-6.
2. resume on 2 ranks, ZeRO-2: everything identical, losses of steps 5-6 bit-exact.
3. resume on 1 rank, ZeRO-2 (universal conversion): weights/moments/step/lr exact.
   Also: a different model config is refused naming the keys.
4. resume on 2 ranks, ZeRO-3 (universal conversion): states exact, losses of 5-6 match,
   then save step 6 as a ZeRO-3 checkpoint.
5. export both the ZeRO-2 and the ZeRO-3 checkpoint; load_model reproduces the engine's
   outputs.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.fixtures.ranks import run_ranks

pytestmark = pytest.mark.slow

MODEL = dict(depth=1, dim=24, heads=2, mlp_dim=48, num_classes={"imagenet": 5})


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)


def probe() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def make_engine(stage: int, world: int):
    import deepspeed

    from pretrain.model import create_model

    torch.manual_seed(0)
    model = create_model("tubevit-ti", **MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "train_batch_size": 4 * world, "steps_per_print": 10**9,
          "zero_optimization": {"stage": stage, "ignore_unused_parameters": True}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds,
                                      dist_init_required=False)
    return engine


def train_step(engine, step: int, rank: int) -> float:
    x, y = batch(step, rank)
    loss = torch.nn.functional.cross_entropy(engine(x, dataset="imagenet"), y)
    engine.backward(loss)
    engine.step()
    return loss.item()


def full_state(engine) -> dict:
    """fp32 master weights and Adam moments, gathered (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # ZeRO-1/2 link the per-parameter views of Adam's state lazily at the first step; a
    # freshly loaded engine has not stepped yet.
    getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = (safe_get_full_fp32_param(p).clone(),
                     safe_get_full_optimizer_state(p, "exp_avg").clone(),
                     safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
    return out


@torch.no_grad()
def outputs(engine) -> torch.Tensor:
    engine.eval()
    y = engine(probe(), dataset="imagenet").clone()
    engine.train()
    return y


def worker(rank, world, mode, stage, uri, local) -> dict:
    """One rank of a run in `mode`; what it measured (rank 0's is the one compared)."""
    from checkpoints.config import CheckpointConfig
    from checkpoints.manager import CheckpointManager
    from pretrain.errors import UserError

    cfg = CheckpointConfig(uri=uri, every_steps=2, local_dir=local, keep_last=3)
    engine = make_engine(stage, world)
    out: dict = {}
    if mode == "wrong-config":
        mgr = CheckpointManager(cfg, model_config={**engine.module.config.__dict__, "dim": 48})
        try:
            mgr.maybe_resume(engine, None)
        except UserError as exc:
            out["error"] = str(exc)
        return out
    mgr = CheckpointManager(cfg, run_config={"train": {"steps": 6}})
    if mode == "save":
        for step in range(1, 5):
            train_step(engine, step, rank)
            mgr.maybe_save(step, engine, None, lambda: {"mlflow_run_id": "run-abc", "loss_window": [1.0]})
        out["last"] = mgr.finish(4, engine, None, lambda: {})
        out["rand"] = torch.rand(3)
        start = 4
    else:
        start, extra = mgr.maybe_resume(engine, None)
        out["rand"] = torch.rand(3)
        out["start"], out["extra"] = start, extra
    out["lr"] = engine.lr_scheduler.get_last_lr()
    out["adam_step"] = sorted({int(s["step"]) for s in engine.optimizer.optimizer.state.values()
                               if "step" in s})
    out["state"] = full_state(engine)
    out["outputs_at_4"] = outputs(engine)
    out["losses"] = [train_step(engine, s, rank) for s in (5, 6)]
    if mode == "resume-save":
        out["last"] = mgr.finish(6, engine, None, lambda: {"mlflow_run_id": "run-abc"})
        out["outputs_at_6"] = outputs(engine)
    return out


def spawn(world, mode, stage, uri, local):
    """Rank 0's results of `worker` on `world` ranks."""
    return run_ranks(worker, world, mode, stage, uri, local)[0]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for what, x, y in zip(("fp32", "exp_avg", "exp_avg_sq"), a[name], b[name]):
            assert torch.equal(x, y), f"{name} {what} differs after resume"


def test_save_resume_reshard_export(gcs_bucket, tmp_path):
    from checkpoints.discovery import list_checkpoints
    from checkpoints.export import export_checkpoint
    from pretrain.model import load_model

    uri, local = f"{gcs_bucket}/run", str(tmp_path / "local")

    # 1. straight run with saves at 2 and 4 (async upload to the emulator, commit).
    ref = spawn(2, "save", 2, uri, local)
    infos = list_checkpoints(uri)
    assert [(i.step, i.loadable, i.world_size, i.zero_stage) for i in infos] == [
        (2, True, 2, 2), (4, True, 2, 2)]
    assert ref["last"] == f"{uri}/step_00000004"
    assert infos[-1].manifest.mlflow_run_id == "run-abc"
    assert infos[-1].manifest.model_config["dim"] == 24
    leftovers = [d for root, dirs, _ in os.walk(os.path.join(local, "save")) for d in dirs
                 if d.startswith("step_")]
    assert leftovers == []   # local staging copies are removed once uploaded

    # 2. same world size and stage: exact continuation.
    same = spawn(2, "resume", 2, uri, local)
    assert same["start"] == 4 and same["extra"]["mlflow_run_id"] == "run-abc"
    assert_same_state(ref["state"], same["state"])
    assert same["losses"] == ref["losses"]
    assert torch.equal(same["rand"], ref["rand"]) and same["lr"] == ref["lr"]
    assert same["adam_step"] == ref["adam_step"] == [4]

    # 3. one rank (universal conversion), and a refused incompatible model.
    one = spawn(1, "resume", 2, uri, local)
    assert one["start"] == 4 and one["lr"] == ref["lr"] and one["adam_step"] == [4]
    assert_same_state(ref["state"], one["state"])
    assert torch.allclose(one["outputs_at_4"], ref["outputs_at_4"], atol=1e-6)
    wrong = spawn(1, "wrong-config", 2, uri, local)
    assert "dim: checkpoint 24, now 48" in wrong["error"]

    # 4. ZeRO-3 on 2 ranks (universal conversion), then a ZeRO-3 save at step 6.
    z3 = spawn(2, "resume-save", 3, uri, local)
    assert z3["start"] == 4 and z3["adam_step"] == [4] and z3["lr"] == ref["lr"]
    assert_same_state(ref["state"], z3["state"])
    assert z3["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert z3["last"] == f"{uri}/step_00000006"
    assert [(i.step, i.zero_stage) for i in list_checkpoints(uri)] == [(2, 2), (4, 2), (6, 3)]

    # 5. export: ZeRO-2 shards (step 4) and ZeRO-3 shards (step 6).
    for step, expected in ((4, ref["outputs_at_4"]), (6, z3["outputs_at_6"])):
        out = str(tmp_path / f"model{step}.safetensors")
        summary = export_checkpoint(f"{uri}/step_{step:08d}", out, "fp32")
        assert summary["step"] == step
        model = load_model(out).eval()
        with torch.no_grad():
            got = model(probe(), dataset="imagenet")
        assert torch.allclose(got, expected, atol=1e-5), (step, (got - expected).abs().max())
    out = str(tmp_path / "model_bf16.safetensors")
    export_checkpoint(uri, out, "bf16")   # the run root: newest committed (step 6)
    assert all(t.dtype == torch.bfloat16 for t in load_model(out).state_dict().values()
               if t.is_floating_point())
