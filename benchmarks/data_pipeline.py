"""Data pipeline: what a training clip costs on one CPU core, from crawl-shaped originals to
the batch the trainer receives.

    python benchmarks/data_pipeline.py --json [--manifest CSV] [--frames 32] [--stride 2]
                                       [--size 224] [--clips-per-video 2] [--remote]

Sources: the videos of `--manifest` (a `pretrain prepare` manifest: path,label), or, without
one, sources made here as uploads are: x264 with its defaults (preset medium, CRF 23, GOP 250,
B-frames), 10 s, 360p-720p at 24-30 fps, a camera panning over a textured scene
(`transcode.camera_like_source`), plus a portrait clip and a VP9 webm (libvpx-vp9). They are
prepared into a temporary folder with `pretrain prepare video`'s defaults (the training
format of pretrain/data/transcode.py); the dataset repeats each source so that an epoch
holds enough batches to time. The clip spec is `--frames` frames, `--stride` (frames of the
recorded video, as data.frame_stride), random resized crops to `--size` (data's defaults:
crop scale 0.4, flips), clips drawn by the loader's own seeded sampling.

Figures, clips per CPU second (all threads and processes of the measurement, so other load
on a shared machine slows but does not skew them):

- naive_clips_per_s_per_core: the originals, each clip decoded as a loader reading original
  files does (the project's path before prepare re-encoded): open, seek to the keyframe
  before the clip, decode forward, convert the clip's frames to RGB scaled so that the crop
  becomes size x size, cut the crop, flip, lay out (3, T, S, S). Same sample positions and
  crops as the loader's clips (the same draws on each file's own frame count and size).
- ceiling_clips_per_s_per_core: raw decode of the prepared bytes at the loader's clip
  positions: bare PyAV, open, seek, decode forward, convert each of the clip's frames to an
  RGB array at the stored size (one reused swscale context). No crop, scale, tensors, shards
  or processes.
- loader_clips_per_s_per_core: `JointLoader` with its defaults (data.num_workers worker
  processes, batch 8, one clip per decode) over the prepared dataset, batches as the trainer
  receives them (uint8, in shared memory; the normalisation runs on the trainer's device).
  CPU of the training process and its loader workers between two points where the workers
  are idle with full prefetch queues, so the counted work is exactly the batches yielded.
- loader_repeated_clips_per_s_per_core: the same with data.clips_per_video =
  `--clips-per-video` (repeated sampling: one decode, k clips).
- speedup = loader / naive (goal >= 5); ratio = loader / ceiling (one clip per decode; goal
  >= 0.9); repeated_speedup = loader_repeated / naive.
- loader_clips_per_s: the loader's wall-clock rate on this machine (all its workers).

Renamed from the previous version (which used tiny synthetic sources): ceiling_clips_per_s
is now ceiling_clips_per_s_per_core; loader_cpu_ms_per_clip, ceiling_cpu_ms_per_clip and
cpu_ratio keep their meaning. With `--remote` the first epoch is read from a local folder and
from the GCS emulator (the same shards uploaded): local_first_epoch_clips_per_s,
remote_first_epoch_clips_per_s, remote_vs_local (null without --remote or without the
gcp-storage-emulator executable).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_result  # noqa: E402
from pretrain.data.config import DataConfig  # noqa: E402

SEED = 0
# (width, height, fps, codec): the mix of a crawl, 360p-720p at 24-30 fps, one portrait.
SOURCES = [(640, 360, 30, "h264"), (854, 480, 24, "h264"), (960, 540, 25, "h264"),
           (1280, 720, 30, "h264"), (360, 640, 30, "h264"), (640, 360, 30, "vp9")]


# ----------------------------------------------------------------------------- sources


def make_sources(folder: str, seconds: float) -> str:
    """The real-shaped sources (see the module docstring) and a manifest naming them."""
    from pretrain.data.transcode import camera_like_source

    rows = []
    for i, (w, h, fps, codec) in enumerate(SOURCES):
        data = camera_like_source(w, h, fps, seconds, seed=i)
        ext = "mp4"
        if codec == "vp9":
            data, ext = _to_vp9(data, fps), "webm"
        path = os.path.join(folder, f"src{i}_{w}x{h}_{fps}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        rows.append((path, f"class{i % 2}"))
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return manifest


def _to_vp9(mp4: bytes, fps: int) -> bytes:
    """The same frames as a VP9 webm (libvpx-vp9, realtime speed: its encode is slow)."""
    import av

    out = io.BytesIO()
    with av.open(io.BytesIO(mp4)) as src, av.open(out, mode="w", format="webm") as dst:
        stream = None
        for frame in src.decode(video=0):
            if stream is None:
                stream = dst.add_stream("libvpx-vp9", rate=fps)
                stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "yuv420p"
                stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}
            frame.pts = None
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out.getvalue()


def prepare_dataset(manifest: str, out: str, min_samples: int) -> tuple[dict, int]:
    """Prepare the manifest's videos with the CLI's defaults, each repeated so that the
    dataset holds at least `min_samples` samples. Returns ({key: original path}, sources)."""
    from pretrain.data import transcode
    from pretrain.data.prepare import Item, prepare, read_manifest

    items = read_manifest(manifest)
    repeat = -(-min_samples // max(1, len(items)))
    rep = [Item(it.path, it.label, key=f"{it.path}#{r}") for r in range(repeat) for it in items]
    result = prepare("video", rep, out, store=transcode.VIDEO, progress=False)
    if not result.written:
        raise SystemExit(f"no video of {manifest} could be prepared: {result.skipped[:3]}")
    return {f"{it.path}#{r}": it.path for r in range(repeat) for it in items}, len(items)


# ----------------------------------------------------------------------------- clip draws


def clip_draw(raw: dict, spec, rng: random.Random, fps: float, num_frames: int, width: int,
              height: int, source_fps: float):
    """The frames, crop box and flip `samples.train_clip` draws from `rng`, on a file with the
    given fps, frame count and size (stride counted in frames of the recorded video)."""
    from pretrain.data import transforms as T

    step = T.frame_step(fps, spec.fps, spec.stride, source_fps)
    start = T.train_start(rng, spec.frames, step, num_frames)
    indices = T.clip_indices(start, spec.frames, step, num_frames)
    box = T.random_resized_box(rng, width, height, spec.crop_scale)
    flip = spec.hflip and rng.random() < 0.5
    return indices, box, flip


def naive_clip(data: bytes, fps: float, indices, box, flip, width: int, height: int,
               size: int) -> np.ndarray:
    """A training clip from original bytes as before prepare re-encoded (see the docstring)."""
    from pretrain.data import transforms as T
    from pretrain.data.media import decode_frames

    x, y, w, h = box
    sw, sh = max(size, round(width * size / w)), max(size, round(height * size / h))
    x0, y0 = min(int(round(x * size / w)), sw - size), min(int(round(y * size / h)), sh - size)
    unique = sorted(set(indices))
    frames = dict(zip(unique, decode_frames(data, unique, fps, (sw, sh))))
    return T.clip_tensor(np.stack([frames[i] for i in indices]), x0, y0, size, flip).numpy()


_REFORMATTER = None


def raw_decode(data: bytes, fps: float, indices) -> int:
    """Bare PyAV: the clip's frames as full-size RGB arrays (the ceiling)."""
    import av

    global _REFORMATTER
    if _REFORMATTER is None:
        from av.video.reformatter import VideoReformatter

        _REFORMATTER = VideoReformatter()
    wanted = sorted(set(indices))
    got = 0
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        half = 0.5 / fps
        if wanted[0] / fps > 1.0:
            c.seek(int((wanted[0] / fps - half) / s.time_base), stream=s, backward=True)
        for frame in c.decode(s):
            while got < len(wanted) and frame.time >= wanted[got] / fps - half:
                _REFORMATTER.reformat(frame, format="rgb24", threads=1).to_ndarray()
                got += 1
            if got == len(wanted):
                break
    return got


# ----------------------------------------------------------------------------- measuring


def loader_cfg(uri: str, cache: str, args, clips_per_video: int = 1) -> DataConfig:
    return DataConfig(video_uri=uri, image_uri=None, frames=args.frames,
                      frame_stride=args.stride, size=args.size, cache_dir=cache,
                      cache_limit=None, clips_per_video=clips_per_video)


def _cpu_of(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # a process that ended: nothing more to add
            pass
    return total


def _wait_idle(procs, quiet_s: float = 0.4, limit_s: float = 120.0) -> None:
    """Until the loader workers stop using CPU (their prefetch queues are full)."""
    last = _cpu_of(procs)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = _cpu_of(procs)
        if now - last < 0.02:
            return
        last = now


def time_loader(cfg: DataConfig, batches: int) -> dict:
    """Per-core and wall-clock rates of the joint loader, and the clips it gave
    [(sample id, epoch)]."""
    import psutil

    from pretrain.data.loader import JointLoader

    loader = JointLoader(cfg, seed=SEED)
    stream = loader.streams["video"]
    me = psutil.Process()
    try:
        it = iter(loader)
        next(it)  # workers started
        workers = [psutil.Process(w.pid) for w in stream.loader._iterator._workers]
        _wait_idle(workers)
        cpu0, t0 = _cpu_of([me, *workers]), time.perf_counter()
        seen, clips = [], 0
        for _ in range(batches):
            epoch = stream.epoch
            b = next(it)
            clips += len(b)
            seen += [(int(i), epoch) for i in b.sample_ids[::cfg.clips_per_video]]
        wall = time.perf_counter() - t0
        _wait_idle(workers)
        cpu = _cpu_of([me, *workers]) - cpu0
    finally:
        loader.close()
    return {"per_core": clips / cpu, "wall": clips / wall, "cpu_per_clip": cpu / clips,
            "seen": seen, "clips": clips}


def clip_jobs(local: str, originals: dict, seen: list, spec) -> list[dict]:
    """For each clip the loader gave: its prepared bytes and draw, and the original's."""
    from streaming import LocalDataset

    from pretrain.data.media import probe_video
    from pretrain.data.samples import sample_rng

    ds = LocalDataset(local=local)
    meta_of: dict[str, object] = {}
    jobs = []
    for sid, epoch in seen:
        raw = ds[sid]
        path = originals[raw["key"]]
        if path not in meta_of:
            with open(path, "rb") as f:
                data = f.read()
            meta_of[path] = (data, probe_video(data))
        data, meta = meta_of[path]
        draw = clip_draw(raw, spec, sample_rng(SEED, epoch, sid), raw["fps"], raw["num_frames"],
                         raw["width"], raw["height"], raw.get("source_fps") or raw["fps"])
        # The same draws on the original's own frame count, size and rate.
        odraw = clip_draw(raw, spec, sample_rng(SEED, epoch, sid), meta.fps, meta.num_frames,
                          meta.width, meta.height, meta.fps)
        jobs.append({"stored": raw["video"], "fps": raw["fps"], "indices": draw[0],
                     "original": data, "meta": meta, "odraw": odraw})
    return jobs


def time_ceiling(jobs: list[dict]) -> float:
    raw_decode(jobs[0]["stored"], jobs[0]["fps"], jobs[0]["indices"])  # warm the scaler
    t0 = time.process_time()
    for job in jobs:
        raw_decode(job["stored"], job["fps"], job["indices"])
    return len(jobs) / (time.process_time() - t0)


def time_naive(jobs: list[dict], size: int) -> float:
    t0 = time.process_time()
    for job in jobs:
        m = job["meta"]
        naive_clip(job["original"], m.fps, *job["odraw"], m.width, m.height, size)
    return len(jobs) / (time.process_time() - t0)


def first_epoch(uri: str, cache: str, args, n: int) -> float:
    from pretrain.data.loader import JointLoader

    cfg = loader_cfg(uri, cache, args)
    loader = JointLoader(cfg, seed=SEED)
    try:
        t0 = time.perf_counter()
        clips = sum(len(next(loader)) for _ in range(n // cfg.batch_size))
        return clips / (time.perf_counter() - t0)
    finally:
        loader.close()


def start_emulator():
    from tests.fixtures.net import free_port

    exe = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable)) or \
        shutil.which("gcp-storage-emulator")
    if not exe:
        return None, None
    port = free_port()
    proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
            break
        except Exception:
            time.sleep(0.25)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    return proc, url


def remote_first_epoch(local: str, tmp: str, args, n: int) -> tuple[float, float | None]:
    local_rate = first_epoch(local, os.path.join(tmp, "c-local"), args, n)
    proc, url = start_emulator()
    if proc is None:
        return local_rate, None
    try:
        from pretrain import storage

        fs = storage.emulator_filesystem(url, project="bench")
        fs.mkdir("bench")
        for name in os.listdir(local):
            fs.put(os.path.join(local, name), f"bench/shards/{name}")
        return local_rate, first_epoch("gs://bench/shards", os.path.join(tmp, "c-remote"),
                                       args, n)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--manifest", help="CSV of videos (path,label) to measure on; default: "
                                       "real-shaped sources made here")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--clips-per-video", type=int, default=2,
                    help="k of the repeated-sampling loader figure (data.clips_per_video)")
    ap.add_argument("--batches", type=int, default=10, help="loader batches timed")
    ap.add_argument("--naive-clips", type=int, default=24,
                    help="clips decoded from the originals (slow: they are the baseline)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the made sources")
    ap.add_argument("--remote", action="store_true",
                    help="also time the first epoch from the GCS emulator vs a local folder")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from pretrain.data.loader import clip_spec

    tmp = tempfile.mkdtemp(prefix="bench-data-")
    os.environ["TUBEVIT_CACHE_DIR"] = os.path.join(tmp, "cache")
    try:
        manifest = args.manifest
        if manifest is None:
            os.makedirs(os.path.join(tmp, "src"))
            manifest = make_sources(os.path.join(tmp, "src"), args.seconds)
        local = os.path.join(tmp, "shards")
        cfg = loader_cfg(local, os.path.join(tmp, "c0"), args)
        # Enough samples that the timed batches and the prefetch queues stay in one epoch.
        need = (args.batches + 2 + 4 * max(cfg.num_workers, 1) + 2) * cfg.batch_size
        originals, sources = prepare_dataset(manifest, local, need)
        spec = clip_spec(cfg, True)

        loader = time_loader(cfg, args.batches)
        jobs = clip_jobs(local, originals, loader["seen"], spec)
        ceiling = time_ceiling(jobs)
        naive = time_naive(jobs[:args.naive_clips], args.size)
        k = args.clips_per_video
        repeated = (time_loader(loader_cfg(local, os.path.join(tmp, "c1"), args, k),
                                args.batches) if k > 1 else None)
        local_first = remote_first = None
        if args.remote:
            local_first, remote_first = remote_first_epoch(local, tmp, args, need)
        result = {
            "workers": cfg.num_workers,
            "clip": f"{args.frames}x{args.size}x{args.size} stride {args.stride}",
            "source": (f"{sources} videos of {args.manifest}" if args.manifest else
                       f"{sources} made: " + ", ".join(f"{w}x{h}@{f} {c}" for w, h, f, c in SOURCES)),
            "clips_timed": loader["clips"],
            "naive_clips_per_s_per_core": round(naive, 2),
            "ceiling_clips_per_s_per_core": round(ceiling, 2),
            "loader_clips_per_s_per_core": round(loader["per_core"], 2),
            "speedup": round(loader["per_core"] / naive, 2),
            "ratio": round(loader["per_core"] / ceiling, 3),
            "clips_per_video": k,
            "loader_repeated_clips_per_s_per_core":
                None if repeated is None else round(repeated["per_core"], 2),
            "repeated_speedup": None if repeated is None else round(repeated["per_core"] / naive, 2),
            "loader_clips_per_s": round(loader["wall"], 2),
            "loader_cpu_ms_per_clip": round(loader["cpu_per_clip"] * 1000, 2),
            "ceiling_cpu_ms_per_clip": round(1000 / ceiling, 2),
            "cpu_ratio": round(loader["per_core"] / ceiling, 3),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "local_first_epoch_clips_per_s": None if local_first is None else round(local_first, 2),
            "remote_first_epoch_clips_per_s": None if remote_first is None else round(remote_first, 2),
            "remote_vs_local": (None if remote_first is None
                                else round(remote_first / local_first, 3)),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
