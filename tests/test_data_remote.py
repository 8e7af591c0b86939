"""Shards in (emulated) GCS: prepare writes gs://, the loaders stream it through a local cache."""
from __future__ import annotations

import os

import pytest

from pretrain.data import shards
from pretrain.data.config import DataConfig
from pretrain.data.loader import EvalLoader, JointLoader
from pretrain.data.prepare import Item, prepare
from pretrain.data.synthetic import prepare_synthetic
from pretrain.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TUBEVIT_CACHE_DIR", str(tmp_path / "tubevit-cache"))


def _take(loader, n):
    return [(b.modality, b.sample_ids.tolist(), round(float(b.x.double().sum()), 3))
            for _, b in zip(range(n), loader)]


def test_emulator_round_trip_matches_local(gcs_bucket, media_dir, tmp_path):
    remote, local = f"{gcs_bucket}/syn", str(tmp_path / "syn")
    for out in (remote, local):
        prepare_synthetic(out, videos=24, images=16, frames=8, size=32, workers=1)
    # real mp4s of several codecs, with a broken one, straight to the bucket
    items = [Item(p, lbl) for p, lbl in media_dir["videos"]]
    res = prepare("video", items + [Item(media_dir["broken"]["corrupt"], "left")],
                  f"{gcs_bucket}/real", progress=False, workers=1)
    assert res.written == len(items) and len(res.skipped) == 1
    assert shards.dataset_info(f"{gcs_bucket}/real")["num_samples"] == len(items)

    def cfg(root, cache):
        return DataConfig(video_uri=f"{root}/video/train", image_uri=f"{root}/image/train",
                          video_eval_uri=f"{root}/video/val", frames=4, size=32, image_size=32,
                          batch_size=4, num_workers=1, cache_dir=str(tmp_path / cache),
                          cache_limit="50mb", eval_temporal_views=2, eval_spatial_views=1)

    a = JointLoader(cfg(remote, "cache-remote"), seed=5)
    b = JointLoader(cfg(local, "cache-local"), seed=5)
    try:
        assert _take(a, 20) == _take(b, 20)
    finally:
        a.close()
        b.close()
    cached = os.listdir(tmp_path / "cache-remote")
    assert len(cached) == 2  # one cache folder per remote dataset
    ev = EvalLoader(cfg(remote, "cache-remote"), "video")
    batches = list(ev)
    n = shards.dataset_info(f"{remote}/video/val")["num_samples"]
    assert sum(int(x.valid.sum()) for x in batches) == n == 6 and batches[0].views == 2


def test_missing_bucket_path_is_a_user_error(gcs_bucket, tmp_path):
    uri = f"{gcs_bucket}/not/there"
    with pytest.raises(UserError, match=uri):
        JointLoader(DataConfig(video_uri=uri, cache_dir=str(tmp_path / "c")), seed=0)
