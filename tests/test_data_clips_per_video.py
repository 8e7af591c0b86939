"""data.clips_per_video = k (repeated sampling): k clips from one decode of each video.

A batch of B clips holds B/k videos, each video's clips consecutive with their own start and
crop; the loader decodes each video once; its state counts videos, so resumption (also on a
different number of ranks) continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import random

import pytest
import torch

from pretrain.data import samples as samples_mod
from pretrain.data import transforms
from pretrain.data.config import DataConfig
from pretrain.data.loader import JointLoader
from pretrain.errors import UserError
from tests.fixtures.ranks import run_ranks

K = 2

pytestmark = pytest.mark.usefixtures("no_world_env")


def _cfg(root, batch_size: int = 4, workers: int = 0, **kw) -> DataConfig:
    base = dict(video_uri=f"{root}/video/train", image_uri=f"{root}/image/train", frames=4,
                size=32, image_size=32, frame_stride=2, batch_size=batch_size,
                clips_per_video=K, num_workers=workers, video_ratio=0.6,
                cache_dir=f"{root}/cache")
    base.update(kw)
    return DataConfig(**base)


def _run(loader, steps: int, save_at: int | None = None):
    """[(modality, sorted [(sample id, pixel sum)])] per step, and the state after `save_at`."""
    out, state = [], None
    for step, b in zip(range(steps), loader):
        sums = b.x.double().flatten(1).sum(1).tolist()
        out.append((b.modality, sorted((int(i), round(s, 3))
                                       for i, s in zip(b.sample_ids.tolist(), sums))))
        if save_at is not None and step + 1 == save_at:
            state = loader.state_dict()
    return out, state


def _frames_decoded(crops) -> list[int]:
    """The sorted frame indices one `media.decode_crops` call decodes (the union of its
    clips' frames)."""
    return sorted({int(i) for crop in crops for i in crop.indices})


def test_a_batch_holds_k_clips_of_each_of_b_over_k_videos(small_synthetic, monkeypatch):
    starts, decodes = [], []
    real_indices, real_decode = transforms.clip_indices, samples_mod.decode_crops

    def spy_indices(start, *args):
        starts.append(start)
        return real_indices(start, *args)

    def spy_decode(*args, **kw):
        decodes.append(_frames_decoded(args[2]))
        return real_decode(*args, **kw)

    monkeypatch.setattr(transforms, "clip_indices", spy_indices)
    monkeypatch.setattr(samples_mod, "decode_crops", spy_decode)
    cfg = _cfg(small_synthetic, batch_size=6, video_ratio=1.0, image_uri=None)
    loader = JointLoader(cfg, seed=3)
    try:
        batches = [b for _, b in zip(range(5), loader)]
    finally:
        loader.close()
    assert len(decodes) == 5 * 3  # one decode per video: 3 videos per batch of 6 clips
    assert len(starts) == 5 * 6  # and a start for every clip
    for b in batches:
        assert b.x.shape == (6, 3, 4, 32, 32) and len(b) == 6
        ids, y = b.sample_ids.tolist(), b.y.tolist()
        assert ids[0::2] == ids[1::2] and y[0::2] == y[1::2]  # a video's clips consecutive
        assert len(set(ids)) == 3
        for v in range(3):
            # Own crop (and start, flip): the clips of one video are never the same pixels.
            assert not (b.x[2 * v] == b.x[2 * v + 1]).all()
    # Independent starts, whole frame steps (stride 2) apart so overlapping clips share
    # frames, inside the window (12-frame videos, 7-frame span).
    window = min(samples_mod.REPEAT_WINDOW * 7, 12)
    gaps = [starts[v + 1] - starts[v] for v in range(0, len(starts), 2)]
    assert all(abs(g - round(g)) < 1e-9 and round(g) % 2 == 0 and abs(g) <= window - 7
               for g in gaps)
    assert 5 <= sum(g != 0 for g in gaps) < len(gaps)


def test_one_decode_cuts_k_clips_of_a_real_video_inside_the_window(media_dir, monkeypatch):
    """On an x264 file: one decode call, k distinct clips of the clip spec, their frames inside
    one window of at most REPEAT_WINDOW spans; reproducible from the sample's generator."""
    from pretrain.data.media import probe_video
    from pretrain.data.samples import ClipSpec, train_clips

    path = next(p for p, _ in media_dir["videos"] if "libx264" in p)
    data = open(path, "rb").read()
    meta = probe_video(data)
    raw = {"video": data, "fps": meta.fps, "num_frames": meta.num_frames,
           "width": meta.width, "height": meta.height}
    spec = ClipSpec(frames=4, size=24, stride=2, fps=None, crop_scale=0.4, hflip=True)
    decodes = []
    real_decode = samples_mod.decode_crops

    def spy_decode(*args, **kw):
        decodes.append(_frames_decoded(args[2]))
        return real_decode(*args, **kw)

    monkeypatch.setattr(samples_mod, "decode_crops", spy_decode)
    for seed in range(6):
        decodes.clear()
        clips = train_clips(raw, spec, random.Random(seed), 3)
        assert clips.shape == (3, 3, 4, 24, 24) and clips.dtype == torch.uint8
        assert len(decodes) == 1
        span = (spec.frames - 1) * spec.stride + 1
        assert decodes[0][-1] - decodes[0][0] < samples_mod.REPEAT_WINDOW * span
        assert len({clips[j].numpy().tobytes() for j in range(3)}) == 3
    # Same seed, same clips (the draws come only from the sample's generator).
    a = train_clips(raw, spec, random.Random(7), 3)
    b = train_clips(raw, spec, random.Random(7), 3)
    assert (a == b).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_at_k2_continues_exactly(small_synthetic, workers):
    steps, save_at = 40, 13  # crosses the video epoch (24 steps of 2 videos) and image epochs
    loader = JointLoader(_cfg(small_synthetic, workers=workers), seed=5)
    full, state = _run(loader, steps, save_at)
    loader.close()
    assert {m for m, _ in full} == {"video", "image"}
    assert state["streams"]["video"]["sample_in_epoch"] % 2 == 0  # counts videos, 2 per batch
    resumed = JointLoader(_cfg(small_synthetic, workers=workers), seed=5)
    resumed.load_state_dict(state)
    rest, _ = _run(resumed, steps - save_at)
    resumed.close()
    assert rest == full[save_at:]


def test_video_samples_counted_are_videos(small_synthetic):
    loader = JointLoader(_cfg(small_synthetic, video_ratio=1.0, image_uri=None), seed=1)
    try:
        seen = [b.sample_ids.tolist() for _, b in zip(range(24), loader)]  # one epoch
        state = loader.state_dict()
    finally:
        loader.close()
    ids = [i for batch in seen for i in batch]
    assert sorted(set(ids)) == list(range(48)) and len(ids) == 2 * 48  # every video, k clips
    assert state["streams"]["video"]["sample_in_epoch"] == 48


def test_k_must_divide_the_batch():
    with pytest.raises(UserError, match=r"data\.batch_size=6.*data\.clips_per_video=4"):
        DataConfig(video_uri="/x", batch_size=6, clips_per_video=4).validate()
    DataConfig(video_uri="/x", batch_size=8, clips_per_video=4).validate()
    # Images only: k does not apply.
    DataConfig(image_uri="/x", batch_size=6, clips_per_video=4).validate()


def test_clips_per_video_is_a_config_key_of_at_least_one():
    from pretrain.config_loader import from_dict

    assert from_dict(DataConfig, {"video_uri": "/x"}).clips_per_video == 1
    assert from_dict(DataConfig, {"video_uri": "/x", "clips_per_video": 2}).clips_per_video == 2
    with pytest.raises(UserError, match="clips_per_video"):
        from_dict(DataConfig, {"video_uri": "/x", "clips_per_video": 0})


# ----------------------------------------------------------------------------- elastic


def _rank(rank: int, world: int, root: str, batch_size: int, steps: int, save_at: int | None,
          state: dict | None) -> dict:
    loader = JointLoader(_cfg(root, batch_size), rank, world, seed=11)
    if state:
        loader.load_state_dict(state)
    out, saved = _run(loader, steps, save_at)
    loader.close()
    return {"steps": out, "state": saved}


def _two_ranks(root, steps: int, save_at: int | None = None, state: dict | None = None):
    """Per step the union of both ranks' clips (2 clips = 1 video per rank), rank 0's state."""
    r0, r1 = run_ranks(_rank, 2, str(root), 2, steps, save_at, state, timeout=300)
    merged = []
    for (m0, s0), (m1, s1) in zip(r0["steps"], r1["steps"]):
        assert m0 == m1
        assert not {i for i, _ in s0} & {i for i, _ in s1}  # ranks never share a video
        merged.append((m0, sorted(s0 + s1)))
    return merged, r0["state"]


@pytest.mark.slow
def test_k2_two_ranks_saved_one_rank_resumed(small_synthetic):
    steps, save_at = 30, 11
    two, state_two = _two_ranks(small_synthetic, steps, save_at)
    loader = JointLoader(_cfg(small_synthetic, 4), 0, 1, seed=11)
    one, state_one = _run(loader, steps, save_at)
    loader.close()
    assert two == one  # 2 ranks x 1 video x 2 clips == 1 rank x 2 videos x 2 clips
    assert state_two["streams"] == state_one["streams"]
    resumed = JointLoader(_cfg(small_synthetic, 4), 0, 1, seed=11)
    resumed.load_state_dict(state_two)
    rest, _ = _run(resumed, steps - save_at)
    resumed.close()
    assert rest == one[save_at:]
