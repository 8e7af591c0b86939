"""Synthetic demo data (`pretrain prepare synthetic`): classes that need time to tell apart.

Videos: one shape (square or disc) drifts across a noisy background. The class is the
direction of motion: left, right, up or down (chance is 25%). Motion wraps around the frame
edges (toroidal), and the start position is uniform, so the position of the shape in any
single frame is uniform whatever the class: one frame carries no information, two frames do.
Horizontal flips would swap left and right, so the label map marks these datasets
`hflip_ok: false` and the loader never flips them. Two styles (`video_style`):
- "random" (the default, and the only style before it existed): any colours (shape darker or
  lighter than its background), radius S/10..S/5, 0.75..1.5 px per frame at S = 32 (speed
  scales with S). The smoke config's tiny ViT sat at chance for ~900 steps on it and needed
  2400 steps in all (video and image) to pass its held-out checks.
- "bright": a bright shape on a dark background (fixed contrast polarity, hue still random,
  as the "bright" images), radius S/6..S/4, 1.0..1.5 px per frame at S = 32: at frame stride
  2 the shape moves 6..9 px, most of an 8-px patch, across the 4 sampled frames of the smoke
  model's [4, 8, 8] motion tube. The same tiny ViT reaches 0.91-0.99 held-out top-1 after
  150 video steps and 1.0 by 300 (configs/smoke.yaml: 600 steps at video_ratio 0.5, three
  seeds).
- "mono": "bright" without colour: a light grey shape (level 220) on a dark grey background
  (level 40, the same pixel noise), sizes and speeds as "bright". For the masked smoke
  configs, whose kNN monitor votes by the nearest pooled features: on "bright" clips those
  neighbours share the background's hue (0.89 of 640 clips), a signal the label ignores,
  so the monitor read colour and not motion; with one palette the nearest clips differ only
  in shape, size, place, speed and direction.

Images: one static shape on a noisy background; the class is the kind of shape (circle,
square, triangle, cross) (chance 25%). Two styles (`image_style`):
- "random" (the default, and the only style before it existed): any colours, radius S/8..S/4,
  anywhere in the frame. A shape darker or lighter than its background in any hue makes the
  class a colour-invariant contrast feature that a small ViT from scratch (8-px patches on
  32 px, the smoke config) does not find within a demo's few hundred image steps; with a few
  hundred images it memorises each image's colours instead (train loss falls, held-out top-1
  stays at chance, issue 15).
- "bright": a bright shape on a dark background (fixed contrast polarity, hue still random),
  radius S/4..0.36 S, centred within S/8: the shape fills a few patches and its outline
  decides the class. The same tiny ViT reaches ~0.9 held-out top-1 in 600 image steps, and
  0.93-0.97 in 300 when it learns them beside "bright" clips (configs/smoke.yaml).
- "mono": "bright" in the fixed grey palette of the "mono" clips (same reason).

Layout under ROOT: video/train, video/val, image/train, image/val (each a prepared dataset).

Determinism: `prepare_synthetic` with the same arguments writes byte-identical shards, so a
copy prepared in a bucket and one prepared on local disk give the same pixels for the same
sample ids (and a resumed run sees the pixels the interrupted one saw). What that takes:
- per-sample generators seeded by (seed, modality, split, index), never by worker order;
- videos encoded by FFmpeg's own MPEG-4 Part 2 encoder (`SYNTHETIC_CODEC`), single-threaded,
  with the bitexact flags, from YUV frames converted on one thread. Not libx264: the x264
  bundled with PyAV 18 (core 165) can encode the same frames into different bitstreams from
  one call to the next (on an AVX-512 host, depending on the heap state left by earlier
  work; it changes the decoded pixels by up to ~20 levels), so two prepares of the same seed
  occasionally differed in a few clips;
- sample keys relative to the generated folder (not the random scratch path);
- PNG images from Pillow (deterministic for the same pixels).
"""
from __future__ import annotations

import io
import math
import os
import shutil
import tempfile

import numpy as np

from pretrain import storage
from pretrain.data.prepare import Item, PrepareResult, cache_root, prepare
from pretrain.errors import UserError

VIDEO_CLASSES = ["left", "right", "up", "down"]
IMAGE_CLASSES = ["circle", "square", "triangle", "cross"]
VIDEO_DATASET = "synthetic_video"
IMAGE_DATASET = "synthetic_image"
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(base + noise, 0, 255)  # (S, S, 3) float


VIDEO_STYLES = ("random", "bright", "mono")
_MONO_BACKGROUND, _MONO_SHAPE = 40, 220   # grey levels of the "mono" styles


def _bright_palette(rng: np.random.Generator, size: int, style: str):
    """(background (S, S, 3) float, shape colour (3,)) of the "bright" and "mono" styles, clips
    and images alike: a bright colour on a dark noisy background, or the fixed greys."""
    if style == "mono":
        bg = np.clip(_MONO_BACKGROUND + rng.normal(0, 12, (size, size, 3)), 0, 255)
        return bg, np.full(3, _MONO_SHAPE)
    bg = np.clip(rng.integers(0, 80, 3) + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return bg, rng.integers(170, 256, 3)   # >= 90 levels above the background per channel


def _moving_shape_clip(rng: np.random.Generator, cls: str, frames: int, size: int,
                       style: str = "random") -> np.ndarray:
    """uint8 (T, S, S, 3): a shape drifting in direction `cls`, wrapping at the edges, in
    `style` (module docstring). "random" draws exactly what it always drew (old datasets and
    checkpoints regenerate byte-identical)."""
    if style in ("bright", "mono"):
        bg, colour = _bright_palette(rng, size, style)
        r = int(rng.integers(size // 6, size // 4 + 1))
    else:
        bg = _background(rng, size)
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - bg.mean((0, 1))).sum() < 150:  # keep the shape visible
            colour = rng.integers(0, 256, 3)
        r = int(rng.integers(size // 10, size // 5))
    yy, xx = np.mgrid[:size, :size]
    if rng.random() < 0.5:
        mask = (np.abs(yy - size // 2) <= r) & (np.abs(xx - size // 2) <= r)
    else:
        mask = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= r * r
    # drawn after the shape, as "random" always did: its clips stay byte-identical
    if style in ("bright", "mono"):
        speed = rng.uniform(1.0, 1.5) * size / 32
    else:
        speed = rng.uniform(1.5, 3.0) * size / 64
    dy, dx = _DIRECTIONS[cls]
    y0, x0 = rng.uniform(0, size, 2)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        shift_y = int(round(y0 + dy * speed * t)) % size
        shift_x = int(round(x0 + dx * speed * t)) % size
        m = np.roll(mask, (shift_y, shift_x), axis=(0, 1))
        frame = bg.copy()
        frame[m] = colour
        out[t] = frame.astype(np.uint8)
    return out


IMAGE_STYLES = ("random", "bright", "mono")


def _static_shape_image(rng: np.random.Generator, cls: str, size: int,
                        style: str = "random") -> np.ndarray:
    """uint8 (S, S, 3): one shape of class `cls` in `style` (module docstring). "random" draws
    exactly what it always drew (old datasets and checkpoints regenerate byte-identical)."""
    if style in ("bright", "mono"):
        bg, colour = _bright_palette(rng, size, style)
        r = rng.uniform(size / 4, size * 0.36)
        cy, cx = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    else:
        bg = _background(rng, size)
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - bg.mean((0, 1))).sum() < 150:
            colour = rng.integers(0, 256, 3)
        r = rng.uniform(size / 8, size / 4)
        cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    if cls == "circle":
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif cls == "square":
        mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    elif cls == "triangle":  # apex up
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:  # cross
        w = r / 3
        mask = ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    img = bg.copy()
    img[mask] = colour
    return img.astype(np.uint8)


SYNTHETIC_CODEC = "mpeg4"  # bit-reproducible, unlike libx264 (see the module docstring)
_MPEG4_QSCALE = 2  # MPEG-4 quantiser scale 2: near-lossless, the shapes keep crisp edges


def encode_mp4(frames: np.ndarray, fps: int, codec: str = "libx264") -> bytes:
    """Encode uint8 (T, H, W, 3) frames as an mp4 (H and W even for yuv420p).

    Encoding is single-threaded with the bitexact flags (no timing-dependent threading, no
    library version strings in the file). With codec="mpeg4" the bytes are a function of
    the frames alone; libx264 is not reproducible call to call (module docstring).
    """
    import av
    from av.video.reformatter import VideoReformatter

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        options = {"flags": "+bitexact"}
        if codec == "libx264":
            options.update(preset="veryfast", crf="18")
        elif codec == "mpeg4":
            options.update(flags="+bitexact+qscale",
                           global_quality=str(_MPEG4_QSCALE * 118))  # FF_QP2LAMBDA = 118
        stream.options = options
        # Convert to yuv420p here, on one thread: left to PyAV, the conversion inside
        # encode() would use swscale's automatic thread count.
        to_yuv = VideoReformatter()
        for f in frames:
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            yuv = to_yuv.reformat(rgb, format="yuv420p", threads=1)
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _make_one(args) -> str:
    kind, split, i, seed, frames, size, fps, folder, image_style, video_style = args
    rng = np.random.default_rng([seed, 0 if kind == "video" else 1, 0 if split == "train" else 1, i])
    if kind == "video":
        cls = VIDEO_CLASSES[i % len(VIDEO_CLASSES)]
        data = encode_mp4(_moving_shape_clip(rng, cls, frames, size, video_style), fps,
                          SYNTHETIC_CODEC)
        path = os.path.join(folder, f"{i:06d}_{cls}.mp4")
    else:
        from PIL import Image

        cls = IMAGE_CLASSES[i % len(IMAGE_CLASSES)]
        buf = io.BytesIO()
        Image.fromarray(_static_shape_image(rng, cls, size, image_style)).save(buf, format="PNG")
        data = buf.getvalue()
        path = os.path.join(folder, f"{i:06d}_{cls}.png")
    with open(path, "wb") as f:
        f.write(data)
    return path


def prepare_synthetic(out_uri: str, videos: int, images: int, seed: int = 0, *, frames: int = 32,
                      size: int = 64, fps: int = 16, val_fraction: float = 0.25,
                      workers: int | None = None, progress: bool = False,
                      work_dir: str | None = None,
                      image_style: str = "random",
                      video_style: str = "random") -> dict[str, PrepareResult]:
    """Write synthetic train/val splits under out_uri (video/train, video/val, image/train,
    image/val); a modality with count 0 is left out. Deterministic for a seed.
    `image_style`: one of IMAGE_STYLES, `video_style`: one of VIDEO_STYLES (module docstring).

    Returns the PrepareResult of each split, keyed "video/train" etc.
    """
    if image_style not in IMAGE_STYLES:
        raise UserError(f"synthetic image_style {image_style!r} is not known; valid: "
                        f"{', '.join(IMAGE_STYLES)}")
    if video_style not in VIDEO_STYLES:
        raise UserError(f"synthetic video_style {video_style!r} is not known; valid: "
                        f"{', '.join(VIDEO_STYLES)}")
    workers = workers or os.cpu_count() or 1
    os.makedirs(cache_root(), exist_ok=True)
    scratch = work_dir or tempfile.mkdtemp(prefix="synthetic-", dir=cache_root())
    results = {}
    try:
        for kind, count, classes, dataset in (("video", videos, VIDEO_CLASSES, VIDEO_DATASET),
                                              ("image", images, IMAGE_CLASSES, IMAGE_DATASET)):
            if count <= 0:
                continue
            val = max(len(classes), int(math.ceil(count * val_fraction)))
            for split, n in (("train", count), ("val", val)):
                folder = os.path.join(scratch, kind, split)
                os.makedirs(folder, exist_ok=True)
                args = [(kind, split, i, seed, frames, size, fps, folder, image_style,
                         video_style) for i in range(n)]
                paths = _map(_make_one, args, workers)
                # Keys relative to the scratch folder: the same dataset gets the same bytes.
                items = [Item(p, classes[i % len(classes)], key=os.path.relpath(p, scratch))
                         for i, p in enumerate(paths)]
                results[f"{kind}/{split}"] = prepare(
                    kind, items, storage.join(out_uri, kind, split), dataset=dataset,
                    labels=classes, workers=workers, progress=progress,
                    work_dir=os.path.join(scratch, "stage", kind, split),
                    hflip_ok=(kind == "image"))
    finally:
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return results


def _map(fn, args: list, workers: int) -> list:
    if workers <= 1 or len(args) < 16:
        return [fn(a) for a in args]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(fn, args, chunksize=max(1, len(args) // (4 * workers))))
