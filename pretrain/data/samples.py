"""Turning one stored sample into a training or eval tensor (runs in loader workers).

Outputs are uint8 pixels, channels first ((3, T, S, S) clips, (3, S, S) images); the
trainer normalises them on its device (`transforms.normalize`).

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
from pretrain.data.media import BadMedia, decode_frames, decode_image


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


def train_clip(raw: dict, spec: ClipSpec, rng: random.Random) -> torch.Tensor:
    """Random temporal crop, random resized crop, optional flip -> uint8 (3, T, S, S)."""
    n = int(raw["num_frames"])
    if n <= 0:
        raise BadMedia("stored frame count is 0")
    step = _frame_step(raw, spec)
    start = T.train_start(rng, spec.frames, step, n)
    indices = _clip_frames(raw, spec, start)
    w, h = int(raw["width"]), int(raw["height"])
    box = T.random_resized_box(rng, w, h, spec.crop_scale)
    sw, sh, x0, y0 = T.scaled_frame_size(box, w, h, spec.size)
    frames = _gather(raw, indices, (sw, sh))  # (T, sh, sw, 3)
    flip = spec.hflip and rng.random() < 0.5
    return T.clip_tensor(frames, x0, y0, spec.size, flip)  # (3, T, S, S) uint8


# Repeated sampling (data.clips_per_video = k): the k clips of one video start inside one
# window of at most REPEAT_WINDOW clip spans, placed at random in the video. One decode of the
# union of their frames then seeks once and decodes forward at most 1.5 spans (plus the GOP
# before the first frame), instead of k seeks anywhere in the video: drawing the k starts over
# the whole video (MAE-ST) would cost up to k decodes' worth of seeking and decoding. Inside
# the window each clip's offset is drawn independently, in whole frame steps: clips that
# overlap in time then share frames (one conversion serves both), where a fraction of a step
# apart (no augmentation to speak of) they would need disjoint frames, up to k x as many.
# 1.5, not 2: on a 10 s 640x360 x264 source (T=32, stride 2, 224 px, one core) k=2 gave
# 21 clips/s at 1.5 spans and 17 at 2 (k=1: 12.5); clips still start up to half a span
# (~1 s there) apart.
REPEAT_WINDOW = 1.5


def train_clips(raw: dict, spec: ClipSpec, rng: random.Random, k: int) -> torch.Tensor:
    """k training clips of one video from one decode -> uint8 (k, 3, T, S, S).

    Each clip has its own start (inside the shared window, see REPEAT_WINDOW), its own random
    resized crop and its own flip, all drawn from `rng` (the sample's seeded generator, so a
    resumed run cuts the same clips). Frames are decoded once, at the scale of the clip whose
    crop needs the most pixels (so no clip is upsampled); that clip's window is cut as
    `train_clip` cuts one, the others' crops are shrunk to S x S from the same frames.
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
    clips = []  # (frame indices, crop box in source pixels, flip)
    for _ in range(k):
        start = first + step * rng.randint(0, max_offset)
        box = T.random_resized_box(rng, w, h, spec.crop_scale)
        flip = spec.hflip and rng.random() < 0.5
        clips.append((T.clip_indices(start, spec.frames, step, n), box, flip))
    scaled = [T.scaled_frame_size(box, w, h, spec.size) for _, box, _ in clips]
    dw, dh = max(s[0] for s in scaled), max(s[1] for s in scaled)
    unique = sorted({i for indices, _, _ in clips for i in indices})
    decoded = dict(zip(unique, decode_frames(raw["video"], unique, float(raw["fps"]),
                                             (dw, dh))))  # frame index -> (dh, dw, 3)
    out = np.empty((k, 3, spec.frames, spec.size, spec.size), dtype=np.uint8)
    for j, ((indices, (x, y, bw, bh), flip), (sw, sh, x0, y0)) in enumerate(zip(clips, scaled)):
        if (sw, sh) == (dw, dh):
            x, y, bw, bh = x0, y0, spec.size, spec.size  # the window at the decode's scale
        else:  # the crop box in the decoded frames' pixels (at least one, inside the frame)
            fx, fy = dw / w, dh / h
            x, y = min(int(round(x * fx)), dw - 1), min(int(round(y * fy)), dh - 1)
            bw = max(1, min(int(round(bw * fx)), dw - x))
            bh = max(1, min(int(round(bh * fy)), dh - y))
        # Copy only the crop of each frame: (T, bh, bw, 3).
        frames = np.stack([decoded[i][y:y + bh, x:x + bw] for i in indices])
        if (bw, bh) == (spec.size, spec.size):
            T.clip_tensor(frames, 0, 0, spec.size, flip, out=out[j])
        else:
            T.resized_clip_tensor(frames, spec.size, flip, out[j])
    return torch.from_numpy(out)


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
