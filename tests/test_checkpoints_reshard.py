"""A ZeRO-3 checkpoint resumed at ZeRO-2 on another world size (real DeepSpeed engines, CPU).

tests/test_checkpoints_engine.py covers ZeRO-2 -> ZeRO-2 on fewer ranks and ZeRO-2 -> ZeRO-3;
this is the other direction: 2 ranks at ZeRO-3 save after 2 steps, 1 rank at ZeRO-2 resumes
through the universal conversion (checkpoints/restore.py) and must hold exactly the saved
fp32 weights, Adam moments, step and lr. It failed inside DeepSpeed's ZeRO-1/2 universal
load (`load_hp_checkpoint_state`: IndexError, too many indices for a 1-dim tensor) because
ds_to_universal writes a ZeRO-3 source's per-parameter states as bare tensors, which only
the ZeRO-3 loader reads (see restore._bridge_param_states).
"""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.ranks import run_ranks
from tests.test_checkpoints_engine import full_state, make_engine, train_step

pytestmark = pytest.mark.slow


def worker(rank, world, mode, stage, uri, local) -> dict:
    from checkpoints.config import CheckpointConfig
    from checkpoints.manager import CheckpointManager

    cfg = CheckpointConfig(uri=uri, every_steps=2, local_dir=local)
    engine = make_engine(stage, world)
    mgr = CheckpointManager(cfg, run_config={"train": {"steps": 4}})
    out: dict = {}
    if mode == "save":
        for step in (1, 2):
            train_step(engine, step, rank)
        out["last"] = mgr.finish(2, engine, None, lambda: {})
    else:
        out["start"], _ = mgr.maybe_resume(engine, None)
    out["lr"] = engine.lr_scheduler.get_last_lr()
    out["adam_step"] = sorted({int(s["step"]) for s in engine.optimizer.optimizer.state.values()
                               if "step" in s})
    out["state"] = full_state(engine)
    if mode == "resume":
        out["loss"] = train_step(engine, 3, rank)   # the resumed engine also trains on
    return out


def test_zero3_two_ranks_resumes_at_zero2_on_one(tmp_path):
    from checkpoints.discovery import list_checkpoints

    uri, local = str(tmp_path / "run"), str(tmp_path / "local")
    saved = run_ranks(worker, 2, "save", 3, uri, local)[0]
    assert [(i.step, i.world_size, i.zero_stage) for i in list_checkpoints(uri)] == [(2, 2, 3)]

    resumed = run_ranks(worker, 1, "resume", 2, uri, local)[0]
    assert resumed["start"] == 2 and resumed["lr"] == saved["lr"]
    assert resumed["adam_step"] == saved["adam_step"] == [2]
    assert saved["state"].keys() == resumed["state"].keys()
    for name, (a, b) in ((n, (saved["state"][n], resumed["state"][n])) for n in saved["state"]):
        for what, x, y in zip(("fp32", "exp_avg", "exp_avg_sq"), a, b):
            assert torch.equal(x, y), f"{name} {what} differs after the ZeRO-3 -> ZeRO-2 resume"
    assert torch.isfinite(torch.tensor(resumed["loss"]))
