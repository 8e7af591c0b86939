"""Turning one stored sample into a training or eval tensor (runs in loader workers).

Outputs are uint8 pixels, channels first ((3, T, S, S) clips, (3, S, S) images); the
trainer normalises them on its device (`transforms.normalize`). Training clips are stored
channels last ((T, S, S, 3) in memory, a permuted view in shape): each decoded frame is
then one contiguous copy into its place, and the channel reorder happens on the device, in
the same pass as the float conversion.

Augmentation randomness is seeded by (seed, epoch, sample id), not by worker state, so the
same sample gets the same crop whatever the number of workers or ranks, and a resumed run
reproduces the uninterrupted one exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.data import transforms as T
from pretrain.data.media import BadMedia, Crop, decode_crops, decode_frames, decode_image


@dataclass(frozen=True)
class ClipSpec:
    frames: int
    size: int
    stride: int
    fps: float | None
    crop_scale: float
    hflip: bool
    temporal_views: int = 1
    spatial_views: int = 1


@dataclass(frozen=True)
class ImageSpec:
    size: int
    crop_scale: float
    hflip: bool
    randaugment: tuple[int, int] | None  # (ops, magnitude)


def sample_rng(seed: int, epoch: int, sample_id: int) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{sample_id}")


def _frame_step(raw: dict, spec: ClipSpec) -> float:
    """Stored frames between clip frames; `source_fps` (datasets prepare re-encoded at a
    lower frame rate) keeps frame_stride in the original's frames, that is, in time."""
    fps = float(raw["fps"])
    return T.frame_step(fps, spec.fps, spec.stride, float(raw.get("source_fps") or fps))


def _clip_frames(raw: dict, spec: ClipSpec, start: float) -> list[int]:
    step = _frame_step(raw, spec)
    return T.clip_indices(start, spec.frames, step, int(raw["num_frames"]))


def _gather(raw: dict, indices: list[int], out_size: tuple[int, int] | None) -> np.ndarray:
    """uint8 (len(indices), H, W, 3), decoding each distinct frame once."""
    unique = sorted(set(indices))
    frames = decode_frames(raw["video"], unique, float(raw["fps"]), out_size)
    if len(unique) == len(indices) and unique == list(indices):
        return np.stack(frames)
    pos = {i: k for k, i in enumerate(unique)}
    return np.stack([frames[pos[i]] for i in indices])


def train_clip(raw: dict, spec: ClipSpec, rng: random.Random,
               out: np.ndarray | None = None) -> torch.Tensor:
    """Random temporal crop, random resized crop, optional flip -> uint8 (3, T, S, S).

    The pixels are stored channels last: the result is a (3, T, S, S) view of `out`, uint8
    (T, S, S, 3), which the loader may pass (a row of its batch buffer, so the clip is
    written once, straight where the trainer receives it); a new array when None.
    """
    n = int(raw["num_frames"])
    if n <= 0:
        raise BadMedia("stored frame count is 0")
    step = _frame_step(raw, spec)
    start = T.train_start(rng, spec.frames, step, n)
    indices = _clip_frames(raw, spec, start)
    box = T.random_resized_box(rng, int(raw["width"]), int(raw["height"]), spec.crop_scale)
    flip = spec.hflip and rng.random() < 0.5
    if out is None:
        out = np.empty((spec.frames, spec.size, spec.size, 3), dtype=np.uint8)
    decode_crops(raw["video"], float(raw["fps"]), [Crop(indices, box, flip)], spec.size,
                 out[None])
    return T.channels_first(torch.from_numpy(out))  # (3, T, S, S) view


# Repeated sampling (data.clips_per_video = k): the k clips of one video start inside one
# window of at most REPEAT_WINDOW clip spans, placed at random in the video. One decode of the
# union of their frames then seeks once and decodes forward at most 1.5 spans (plus the GOP
# before the first frame), instead of k seeks anywhere in the video: drawing the k starts over
# the whole video (MAE-ST) would cost up to k decodes' worth of seeking and decoding. Inside
# the window each clip's offset is drawn independently, in whole frame steps: clips that
# overlap in time then share decoded frames, where a fraction of a step apart (no
# augmentation to speak of) they would need disjoint frames, up to k x as many.
# 1.5, not 2: on a 10 s 640x360 x264 source (T=32, stride 2, 224 px, one core) k=2 gave
# 21 clips/s at 1.5 spans and 17 at 2 (k=1: 12.5); clips still start up to half a span
# (~1 s there) apart.
REPEAT_WINDOW = 1.5


def train_clips(raw: dict, spec: ClipSpec, rng: random.Random, k: int,
                out: np.ndarray | None = None) -> torch.Tensor:
    """k training clips of one video from one decode -> uint8 (k, 3, T, S, S).

    Each clip has its own start (inside the shared window, see REPEAT_WINDOW), its own random
    resized crop and its own flip, all drawn from `rng` (the sample's seeded generator, so a
    resumed run cuts the same clips). Frames are decoded once; each clip's crop is scaled to
    S x S from the decoded frames (`media.decode_crops`). Channels last as in `train_clip`:
    a view of `out`, uint8 (k, T, S, S, 3).
    """
    n = int(raw["num_frames"])
    if n <= 0:
        raise BadMedia("stored frame count is 0")
    step = _frame_step(raw, spec)
    span = (spec.frames - 1) * step + 1
    window = min(REPEAT_WINDOW * span, float(n))
    first = rng.uniform(0, n - window) if n > window else 0.0
    max_offset = int(max(window - span, 0.0) // step)  # in frame steps
    w, h = int(raw["width"]), int(raw["height"])
    crops = []
    for _ in range(k):
        start = first + step * rng.randint(0, max_offset)
        box = T.random_resized_box(rng, w, h, spec.crop_scale)
        flip = spec.hflip and rng.random() < 0.5
        crops.append(Crop(T.clip_indices(start, spec.frames, step, n), box, flip))
    if out is None:
        out = np.empty((k, spec.frames, spec.size, spec.size, 3), dtype=np.uint8)
    decode_crops(raw["video"], float(raw["fps"]), crops, spec.size, out)
    return T.channels_first(torch.from_numpy(out))  # (k, 3, T, S, S) view


def eval_clip(raw: dict, spec: ClipSpec) -> torch.Tensor:
    """All views of one clip: uint8 (Vt * Vs, 3, T, S, S), temporal view major."""
    n = int(raw["num_frames"])
    step = _frame_step(raw, spec)
    starts = T.eval_starts(spec.temporal_views, spec.frames, step, n)
    per_view = [T.clip_indices(s, spec.frames, step, n) for s in starts]
    w, h = T.short_side_size(int(raw["width"]), int(raw["height"]), spec.size)
    frames = _gather(raw, [i for v in per_view for i in v], (w, h))  # (Vt*T, h, w, 3)
    frames = frames.reshape(len(per_view), spec.frames, h, w, 3)
    offsets = T.spatial_offsets(spec.spatial_views, w, h, spec.size)
    out = np.empty((len(per_view) * len(offsets), 3, spec.frames, spec.size, spec.size),
                   dtype=np.uint8)  # (V, 3, T, S, S)
    for tv in range(len(per_view)):
        for sv, (x0, y0) in enumerate(offsets):
            T.clip_tensor(frames[tv], x0, y0, spec.size, out=out[tv * len(offsets) + sv])
    return torch.from_numpy(out)


_randaugment_cache: dict = {}


def train_image(raw: dict, spec: ImageSpec, rng: random.Random) -> torch.Tensor:
    """Random resized crop, optional flip and RandAugment -> uint8 (3, S, S)."""
    from PIL import Image

    img = decode_image(raw["image"])
    x, y, w, h = T.random_resized_box(rng, img.width, img.height, spec.crop_scale)
    img = img.resize((spec.size, spec.size), Image.BILINEAR, box=(x, y, x + w, y + h))
    if spec.hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if spec.randaugment:
        img = _randaugment(img, spec.randaugment, rng)
    return T.image_tensor(np.asarray(img))


def _randaugment(img, params: tuple[int, int], rng: random.Random):
    from torchvision.transforms import RandAugment

    aug = _randaugment_cache.get(params)
    if aug is None:
        aug = _randaugment_cache[params] = RandAugment(num_ops=params[0], magnitude=params[1])
    # torchvision draws from torch's global RNG: seed it from this sample's generator.
    state = torch.random.get_rng_state()
    torch.manual_seed(rng.getrandbits(63))
    try:
        return aug(img)
    finally:
        torch.random.set_rng_state(state)


def eval_image(raw: dict, size: int) -> torch.Tensor:
    """Resize the short side to size / 0.875, centre crop size x size -> uint8 (3, S, S)."""
    from PIL import Image

    img = decode_image(raw["image"])
    w, h = T.short_side_size(img.width, img.height, int(round(size / 0.875)))
    img = img.resize((w, h), Image.BILINEAR)
    x0, y0 = (w - size) // 2, (h - size) // 2
    img = img.crop((x0, y0, x0 + size, y0 + size))
    return T.image_tensor(np.asarray(img))
