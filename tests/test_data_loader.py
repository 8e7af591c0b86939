"""Loaders over locally prepared shards: shapes, ranges, mixing, resumption, corrupt samples."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pretrain.data import shards
from pretrain.data.config import DataConfig
from pretrain.data.loader import EvalLoader, JointLoader, eval_indices
from pretrain.data.metadata import DataInfo, ensure_datasets
from pretrain.data.prepare import Item, prepare
from pretrain.data.synthetic import prepare_synthetic
from pretrain.errors import UserError


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, media_dir):
    """Real mp4s (4 codec/size/rate variants) and synthetic shards, prepared once."""
    root = tmp_path_factory.mktemp("shards")
    os.environ.setdefault("TUBEVIT_CACHE_DIR", str(root / "cache"))
    items = [Item(p, lbl) for p, lbl in media_dir["videos"]]
    prepare("video", items, str(root / "real"), progress=False, workers=1,
            work_dir=str(root / "work"))
    prepare_synthetic(str(root / "syn"), videos=48, images=40, frames=12, size=32, workers=1,
                      work_dir=str(root / "synwork"))
    return root


@pytest.fixture(autouse=True)
def _world_env(monkeypatch):
    # The loaders write the world into RANK/WORLD_SIZE/... for streaming: restore afterwards.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def _cfg(root, **kw) -> DataConfig:
    base = dict(video_uri=str(root / "syn/video/train"), image_uri=str(root / "syn/image/train"),
                video_eval_uri=str(root / "syn/video/val"),
                image_eval_uri=str(root / "syn/image/val"), frames=4, size=32, image_size=32,
                frame_stride=2, batch_size=4, num_workers=0, cache_dir=str(root / "cache"),
                eval_temporal_views=2, eval_spatial_views=3, eval_batch_size=3)
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    return [(b.modality, b.sample_ids.tolist(), round(float(b.x.double().sum()), 3))
            for _, b in zip(range(n), loader)]


def test_real_videos_give_clips_of_the_configured_shape(data_root):
    cfg = _cfg(data_root, video_uri=str(data_root / "real"), image_uri=None, frames=16,
               size=40, frame_stride=1, batch_size=4, num_workers=1)
    loader = JointLoader(cfg, seed=1)
    try:
        seen = set()
        for _, b in zip(range(4), loader):  # 8 videos / 4 = 2 batches per epoch: two epochs
            assert b.modality == "video" and b.dataset == "video"
            assert b.x.shape == (4, 3, 16, 40, 40) and b.x.dtype == torch.uint8
            assert b.y.dtype == torch.long and b.y.min() >= 0 and b.y.max() < 4
            # the trainer's normalisation: ImageNet-normalised pixels lie in [-2.12, 2.64]
            x = b.normalized("cpu").x
            assert x.dtype == torch.float32 and x.shape == b.x.shape
            assert x.min() >= -2.2 and x.max() <= 2.7 and x.std() > 0.05
            seen.update(b.sample_ids.tolist())
        assert seen == set(range(8)) and loader.skipped_samples == 0
    finally:
        loader.close()


def test_eval_views_and_images(data_root):
    cfg = _cfg(data_root)
    ev = EvalLoader(cfg, "video")
    batches = list(ev)
    n = shards.dataset_info(cfg.video_eval_uri)["num_samples"]
    assert sum(int(b.valid.sum()) for b in batches) == n
    b = batches[0]
    assert b.views == 6 and b.x.shape == (3 * 6, 3, 4, 32, 32)
    # temporal views differ (the shape moves); views of one clip come consecutively
    v = b.x.view(3, 6, 3, 4, 32, 32)
    assert not torch.equal(v[0, 0], v[0, 3])
    ei = EvalLoader(cfg, "image")
    bi = next(iter(ei))
    assert bi.x.shape == (3, 3, 32, 32) and bi.views == 1


def test_normalize_matches_the_float_reference_on_both_layouts():
    from pretrain.data.transforms import MEAN, STD, normalize

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 4, 5, 6), (2, 3, 5, 6)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        view = (1, 3) + (1,) * (len(shape) - 2)
        ref = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.double).view(view)) \
            / torch.tensor(STD, dtype=torch.double).view(view)
        out = normalize(x, "cpu")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
        half = normalize(x, "cpu", torch.bfloat16)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.double(), ref, rtol=1e-2, atol=1e-2)
        # an already-normalised float batch is only moved and cast, not normalised twice
        assert torch.equal(normalize(out, "cpu"), out)


def test_batch_buffers_are_reused_only_after_the_trainer_lets_go(data_root):
    """Video batches travel in buffers the loader process reuses (pretrain/data/batch_buffers.py):
    a batch the trainer still holds, or a view of it, is never written over, the pool grows
    instead; batches let go of are written again."""
    cfg = _cfg(data_root, image_uri=None, num_workers=1)
    loader = JointLoader(cfg, seed=3)
    try:
        held = next(loader).x[1:]          # a view keeps its batch
        copy = held.clone()
        for _ in range(12):                # three times the worker's prefetch
            next(loader)
        assert torch.equal(held, copy)
    finally:
        loader.close()
    loader = JointLoader(_cfg(data_root, image_uri=None, num_workers=0), seed=3)
    try:
        for _ in range(6):
            next(loader)
        pool = loader.streams["video"].ds._rows.pool
        assert len(pool.buffers) == 1      # each batch let go before the next
        kept = [next(loader) for _ in range(3)]
        assert len(pool.buffers) == 3 and len({b.x.data_ptr() for b in kept}) == 3
    finally:
        loader.close()


def test_training_side_gets_normalised_batches_with_the_loaders_state(data_root):
    from pretrain.train.device_batches import train_batches

    cfg = _cfg(data_root, num_workers=0)
    raw = JointLoader(cfg, seed=4)
    wrapped = train_batches(cfg, DataInfo.from_config(cfg), 0, 1, 4, device=torch.device("cpu"))
    try:
        for _ in range(3):
            a, b = next(raw), next(wrapped)
            assert a.x.dtype == torch.uint8 and b.x.dtype == torch.float32
            assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.y, b.y)
            torch.testing.assert_close(b.x, a.normalized("cpu").x)
        assert wrapped.state_dict() == raw.state_dict()
        assert wrapped.skipped_samples == 0 and wrapped.heads == raw.heads
    finally:
        raw.close()
        wrapped.close()


def test_loader_processes_fit_the_cores():
    from pretrain.data.loader import plan_workers

    both = {"video": 0.8, "image": 0.2}
    # room enough: as configured
    assert plan_workers(2, both, local_world_size=1, cores=16) == {"video": 2, "image": 2}
    # 2 ranks on 2 cores: one process per rank, for the modality drawn most
    assert plan_workers(1, both, local_world_size=2, cores=2) == {"video": 1, "image": 0}
    assert plan_workers(8, {"video": 0.3, "image": 0.7}, 2, 2) == {"video": 0, "image": 1}
    # 8 ranks on 64 cores asking for 8 + 8 each: 8 per rank, split by share
    assert plan_workers(8, {"video": 0.5, "image": 0.5}, 8, 64) == {"video": 4, "image": 4}
    assert plan_workers(8, both, 8, 64) == {"video": 6, "image": 2}
    assert plan_workers(4, {"video": 1.0}, 4, 8) == {"video": 2}
    assert plan_workers(0, both, 2, 2) == {"video": 0, "image": 0}
    for ranks, cores in ((1, 2), (2, 2), (4, 6), (8, 96)):
        got = plan_workers(8, both, ranks, cores)
        assert sum(got.values()) <= max(1, cores // ranks) and max(got.values()) >= 1


def test_eval_ranks_split_the_set_and_pad_equally():
    for n, world in ((10, 3), (7, 2), (2, 4), (6, 1)):
        parts = [eval_indices(n, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1
        counted = sorted(i for p in parts for i, ok in p if ok)
        assert counted == list(range(n))


def test_mixing_is_deterministic_and_follows_the_ratio(data_root):
    a = JointLoader(_cfg(data_root, video_ratio=0.3), seed=7)
    b = JointLoader(_cfg(data_root, video_ratio=0.3), seed=7)
    c = JointLoader(_cfg(data_root, video_ratio=0.3), seed=8)
    mods = [a.modality_at(k) for k in range(2000)]
    assert mods == [b.modality_at(k) for k in range(2000)]
    assert mods != [c.modality_at(k) for k in range(2000)]
    assert abs(mods.count("video") / 2000 - 0.3) < 0.04
    assert _take(a, 12) == _take(b, 12)
    for L in (a, b, c):
        L.close()


def test_resume_is_exact_across_epochs_and_worker_counts(data_root):
    cfg = _cfg(data_root, num_workers=0)
    full = JointLoader(cfg, seed=3)
    expected = _take(full, 40)  # 12 video / 10 image batches per epoch: crosses epochs
    full.close()
    first = JointLoader(cfg, seed=3)
    got = _take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    first.close()
    second = JointLoader(_cfg(data_root, num_workers=2), seed=3)
    second.load_state_dict(state)
    got += _take(second, 23)
    second.close()
    assert got == expected


def test_corrupt_sample_at_train_time_is_skipped_and_counted(data_root, tmp_path):
    from streaming import LocalDataset, MDSWriter

    src = LocalDataset(local=str(data_root / "syn/video/train"))
    out = tmp_path / "rotten"
    with MDSWriter(out=str(out), columns=shards.VIDEO_COLUMNS) as w:
        for i in range(8):
            s = dict(src[i])
            if i == 5:  # bit rot after prepare: the stored bytes no longer decode
                s["video"] = s["video"][:40] + bytes(200) + s["video"][240:]
            w.write(s)
    (out / shards.LABELS).write_text(json.dumps(shards.label_doc("video", "rot", ["a"] * 4, 8)))
    loader = JointLoader(_cfg(data_root, video_uri=str(out), image_uri=None), seed=0)
    batches = [b for _, b in zip(range(2), loader)]
    loader.close()
    ids = sorted(i for b in batches for i in b.sample_ids.tolist())
    assert ids == [0, 1, 2, 3, 4, 6, 7]
    assert loader.skipped_samples == 1 and sum(b.skipped for b in batches) == 1
    assert loader.state_dict()["skipped_samples"] == 1


def test_a_truncated_shard_is_skipped_and_counted_not_a_crash(data_root, tmp_path):
    """Half a shard's bytes gone (an interrupted copy): the samples past the cut cannot be
    read out of it at all; they are skipped and counted like undecodable ones, at training
    and at evaluation."""
    from streaming import LocalDataset, MDSWriter

    from pretrain.data.loader import EvalLoader

    src = LocalDataset(local=str(data_root / "syn/video/train"))
    out = tmp_path / "cut"
    with MDSWriter(out=str(out), columns=shards.VIDEO_COLUMNS) as w:
        for i in range(8):
            w.write(dict(src[i]))
    shard = next(out.glob("*.mds"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (out / shards.LABELS).write_text(json.dumps(shards.label_doc("video", "cut", ["a"] * 4, 8)))
    loader = JointLoader(_cfg(data_root, video_uri=str(out), image_uri=None), seed=0)
    batches = [b for _, b in zip(range(2), loader)]
    loader.close()
    kept = sorted(i for b in batches for i in b.sample_ids.tolist())
    assert 0 < len(kept) < 8 and loader.skipped_samples == 8 - len(kept)
    assert any("not readable from its shard" in r for r in loader.skip_reasons)

    cfg = _cfg(data_root, video_uri=str(out), image_uri=None, video_eval_uri=str(out))
    ev = EvalLoader(cfg, "video", uri=str(out))
    valid = sum(int(b.valid.sum()) for b in ev)
    assert valid == len(kept) and ev.skipped_samples == 8 - len(kept)


def test_short_videos_loop_and_fps_sampling(data_root):
    from pretrain.data.samples import ClipSpec, train_clip
    from streaming import LocalDataset
    import random

    ds = LocalDataset(local=str(data_root / "real"))
    short = next(ds[i] for i in range(len(ds)) if ds[i]["num_frames"] == 12)
    spec = ClipSpec(frames=32, size=24, stride=1, fps=None, crop_scale=1.0, hflip=False)
    clip = train_clip(short, spec, random.Random(0))
    assert clip.shape == (3, 32, 24, 24)
    assert torch.equal(clip[:, 0], clip[:, 12])  # frame 12 is frame 0 again
    slow = ClipSpec(frames=4, size=24, stride=1, fps=short["fps"] / 3, crop_scale=1.0,
                    hflip=False)
    assert train_clip(short, slow, random.Random(0)).shape == (3, 4, 24, 24)


def test_missing_dataset_is_a_user_error_naming_the_uri(data_root, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere"):
        JointLoader(_cfg(data_root, video_uri=missing), seed=0)
    with pytest.raises(UserError, match="holds a image dataset"):
        ensure_datasets(_cfg(data_root, video_uri=str(data_root / "syn/image/train")))
    info = ensure_datasets(_cfg(data_root)).datasets
    assert info["video"]["name"] == "synthetic_video" and info["image_eval"]["num_classes"] == 4


def test_synthetic_made_when_missing(tmp_path):
    root = tmp_path / "auto"
    cfg = DataConfig(video_uri=str(root / "video/train"), image_uri=None,
                     video_eval_uri=str(root / "video/val"))
    cfg.synthetic.prepare_if_missing, cfg.synthetic.root = True, str(root)
    cfg.synthetic.videos, cfg.synthetic.images, cfg.synthetic.frames = 8, 0, 8
    cfg.synthetic.size = 32
    info = ensure_datasets(cfg).datasets
    assert info["video"]["num_samples"] == 8 and info["video_eval"]["num_samples"] == 4
    assert np.isfinite(info["video"]["num_classes"])


_MANY_LOADERS = r'''
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pretrain.data.config import DataConfig
from pretrain.data.loader import EvalLoader, JointLoader
root = sys.argv[1]
cfg = DataConfig(video_uri=f"{root}/syn/video/train", image_uri=f"{root}/syn/image/train",
                 video_eval_uri=f"{root}/syn/video/val", frames=4, size=32, image_size=32,
                 frame_stride=2, batch_size=4, num_workers=int(sys.argv[3]),
                 cache_dir=f"{root}/cache", eval_temporal_views=1, eval_spatial_views=1)
counts = []
for i in range(int(sys.argv[4])):
    joint = JointLoader(cfg, seed=i)
    for _, batch in zip(range(3), joint):
        pass
    ev = EvalLoader(cfg, "video")
    list(ev)
    joint.close()
    ev.close()
    counts.append(len(os.listdir("/proc/self/fd")))
print(counts)
'''


@pytest.mark.slow   # builds and closes loaders (and their worker processes) many times: ~25 s
@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_built_again_and_again_leak_no_descriptors_or_shared_memory(data_root, workers,
                                                                             tmp_path):
    """Streaming holds every shared-memory block it opens until exit (its issue #457): a
    process that builds loaders repeatedly ran out of descriptors under `ulimit -n 1024`.
    Here 6 rounds of joint + eval loaders run under a limit of 128 descriptors, the count
    stays flat (a leak of one descriptor a round shows), and closed loaders leave nothing
    in /dev/shm."""
    import subprocess
    import sys

    # Streaming's block names in /dev/shm; ours are the ones that appear during the run.
    def blocks():
        return {n for n in os.listdir("/dev/shm") if n[:6].isdigit()}

    before = blocks()
    script = tmp_path / "many_loaders.py"
    script.write_text(_MANY_LOADERS)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, str(script), str(data_root), "128", str(workers), "6"],
                         capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(counts) == 6 and counts[-1] <= counts[0] + 2, counts
    assert blocks() - before == set()


def test_measured_decode_rate_counts_the_clips_of_each_decode(data_root):
    """`pretrain plan --measure-decode`'s figure: with clips_per_video = k every decode counts
    k clips (what the loader gets from it), and k < 1 is refused by name."""
    from pretrain.data.decode_rate import measure_decode

    uri = str(data_root / "real")
    one = measure_decode(uri, frames=4, size=24, frame_stride=2, clips=3)
    two = measure_decode(uri, frames=4, size=24, frame_stride=2, clips=3, clips_per_video=2)
    assert (one["clips"], one["clips_per_video"]) == (3, 1)
    assert (two["clips"], two["clips_per_video"]) == (6, 2)
    assert two["clips_per_s_per_core"] == pytest.approx(6 / two["cpu_s"], rel=0.01)
    with pytest.raises(UserError, match="clips_per_video"):
        measure_decode(uri, frames=4, size=24, frame_stride=2, clips_per_video=0)
