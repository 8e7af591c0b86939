"""How many training clips one CPU core decodes per second from a prepared video dataset.

`pretrain plan --measure-decode URI` sizes the data pipeline with this figure: the clips are
read the way the training loader reads them (a StreamingDataset over the shards, the loader's
own clip spec from a `DataConfig`, `samples.train_clip`: seek, decode, crop, resize), so the
rate is what one loader process achieves on this machine's cores. With data.clips_per_video
= k each decode gives k clips (`samples.train_clips`, as the loader cuts them), and the rate
counts clips, not decodes.

Decoding is single-threaded (pretrain/data/media.py), so the CPU time of the calling thread
around `train_clip` is one core's work, free of streaming's background threads and of other
load on the machine. Reading a sample's bytes (and, for a remote dataset, downloading its
shard) is left out: the loader's prefetch overlaps it with decoding.
"""
from __future__ import annotations

import shutil
import tempfile
import time

from pretrain import storage
from pretrain.errors import UserError

CLIPS = 20            # enough for a stable mean over a dataset's mix of sources
TIME_LIMIT_S = 60.0   # wall-clock bound, so a slow or huge dataset cannot stall `plan`


def measure_decode(uri: str, frames: int, size: int, frame_stride: int, fps: float | None = None,
                   clips: int = CLIPS, time_limit_s: float = TIME_LIMIT_S, seed: int = 0,
                   clips_per_video: int = 1) -> dict:
    """{"clips", "cpu_s", "clips_per_s_per_core", "clips_per_video"} from decoding up to
    `clips` samples of the video dataset at `uri` (each giving `clips_per_video` training
    clips), spread evenly over its samples, within `time_limit_s`."""
    from streaming import StreamingDataset

    from pretrain.data import shared_memory
    from pretrain.data.config import DataConfig
    from pretrain.data.loader import SAMPLE_ERRORS, clip_spec, predownload_window
    from pretrain.data.remote import make_stream
    from pretrain.data.samples import sample_rng, train_clip, train_clips
    from pretrain.data.shards import dataset_info

    info = dataset_info(uri)
    if info["modality"] != "video":
        raise UserError(f"--measure-decode '{uri}' is an {info['modality']} dataset; it needs "
                        "video shards written by `pretrain prepare video|synthetic`")
    if info["num_samples"] < 1:
        raise UserError(f"--measure-decode '{uri}' holds no samples")
    if clips_per_video < 1:
        raise UserError(f"clips per video {clips_per_video} must be >= 1 (data.clips_per_video)")
    # The loader's own spec, so the measurement follows whatever the loader decodes.
    cfg = DataConfig(frames=frames, size=size, frame_stride=frame_stride, fps=fps)
    spec = clip_spec(cfg, info["hflip_ok"])
    cache = tempfile.mkdtemp(prefix="measure-decode-") if storage.is_remote(uri) else None
    ds = StreamingDataset(streams=[make_stream(uri, cache or "")], shuffle=False, batch_size=1,
                          predownload=predownload_window(uri, 1))
    n = ds.num_samples
    cpu_s, done, bad = 0.0, 0, []
    deadline = time.monotonic() + time_limit_s
    try:
        for k in range(clips):
            if done and time.monotonic() > deadline:
                break
            sample_id = (k * n) // clips if clips <= n else k % n
            raw = ds[sample_id]
            rng = sample_rng(seed, k // n, sample_id)  # a new epoch's crop for a repeated sample
            t0 = time.thread_time()
            try:
                if clips_per_video > 1:
                    train_clips(raw, spec, rng, clips_per_video)
                else:
                    train_clip(raw, spec, rng)
            except SAMPLE_ERRORS as exc:
                bad.append(f"{raw.get('key', sample_id)}: {exc}")
                continue
            cpu_s += time.thread_time() - t0
            done += clips_per_video
    finally:
        shared_memory.release(ds)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    if not done:
        raise UserError(f"--measure-decode '{uri}': no clip of the {min(clips, n)} tried decodes "
                        f"({'; '.join(bad[:3])}); check the dataset with `pretrain prepare`")
    return {"clips": done, "cpu_s": round(cpu_s, 6), "clips_per_video": clips_per_video,
            "clips_per_s_per_core": done / max(cpu_s, 1e-9)}
