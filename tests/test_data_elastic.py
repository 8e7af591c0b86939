"""Resumption at a different world size: 2 real ranks (gloo, one process each) vs 1 rank.

Streaming's elastic deterministic partitioning fixes one global sample order (given the
canonical node count and seed); the loader state says how far into it a run got. So the
samples of global step k (the union over ranks) must be the same whatever the world size, and
a run saved on 2 ranks and resumed on 1 (or the reverse) must continue exactly where an
uninterrupted run would be, augmentation included.
"""
from __future__ import annotations

import pytest

from tests.fixtures.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_world_env")]

STEPS, SAVE_AT = 30, 11


def _cfg(root: str, batch_size: int, workers: int):
    from pretrain.data.config import DataConfig

    return DataConfig(video_uri=f"{root}/video/train", image_uri=f"{root}/image/train",
                      frames=4, size=32, image_size=32, frame_stride=2, batch_size=batch_size,
                      num_workers=workers, video_ratio=0.6, cache_dir=f"{root}/cache")


def _run(loader, steps: int, save_at: int | None = None):
    """[(modality, {sample id: pixel sum})] per step, and the state after `save_at` steps."""
    out, state = [], None
    for step, b in zip(range(steps), loader):
        sums = b.x.double().flatten(1).sum(1).tolist()
        out.append((b.modality, {int(i): round(s, 3) for i, s in zip(b.sample_ids.tolist(), sums)}))
        if save_at is not None and step + 1 == save_at:
            state = loader.state_dict()
    return out, state


def _rank(rank: int, world: int, root: str, batch_size: int, steps: int, save_at: int | None,
          state: dict | None) -> dict:
    """One rank of a multi-rank run: its steps and its state after `save_at` steps."""
    from pretrain.data.loader import JointLoader

    loader = JointLoader(_cfg(root, batch_size, 1), rank, world, seed=11)
    if state:
        loader.load_state_dict(state)
    steps, saved = _run(loader, steps, save_at)
    loader.close()
    return {"steps": steps, "state": saved}


def _two_ranks(root, batch_size: int, steps: int, save_at: int | None = None,
               state: dict | None = None) -> tuple[list, dict]:
    """Run 2 ranks; per step the union of both ranks' samples, and rank 0's saved state."""
    r0, r1 = run_ranks(_rank, 2, str(root), batch_size, steps, save_at, state, timeout=300)
    merged = []
    for (m0, s0), (m1, s1) in zip(r0["steps"], r1["steps"]):
        assert m0 == m1  # every rank has the same modality at every step
        assert not set(s0) & set(s1)  # ranks never share a sample within a step
        merged.append((m0, {**s0, **s1}))
    return merged, r0["state"]


def _one_rank(root, steps, state=None, save_at=None):
    from pretrain.data.loader import JointLoader

    loader = JointLoader(_cfg(str(root), 4, 1), 0, 1, seed=11)
    if state:
        loader.load_state_dict(state)
    out, saved = _run(loader, steps, save_at)
    loader.close()
    return [(m, {int(k): v for k, v in s.items()}) for m, s in out], saved


def test_two_ranks_saved_one_rank_resumed_and_back(small_synthetic):
    two, state_two = _two_ranks(small_synthetic, batch_size=2, steps=STEPS, save_at=SAVE_AT)
    one, state_one = _one_rank(small_synthetic, STEPS, save_at=SAVE_AT)
    # Same global batches whatever the world size (2 ranks x 2 == 1 rank x 4).
    assert two == one
    assert state_two["streams"] == state_one["streams"]
    # Saved on 2 ranks, resumed on 1: continues exactly (crosses video and image epochs).
    resumed_on_one, _ = _one_rank(small_synthetic, STEPS - SAVE_AT, state=state_two)
    assert resumed_on_one == one[SAVE_AT:]
    # Saved on 1 rank, resumed on 2.
    resumed_on_two, _ = _two_ranks(small_synthetic, batch_size=2, steps=STEPS - SAVE_AT,
                                   state=state_one)
    assert resumed_on_two == one[SAVE_AT:]
