"""Clip and image sampling: which frames, which crop, and normalisation.

Frame indices are chosen from the stored metadata (fps, frame count) so that decoding only
touches the frames a clip needs. Videos shorter than a clip's span loop from their start
(frame index modulo the frame count), so every clip has exactly T frames.

Loader workers stop at uint8 pixels (training clips from `media.decode_crops`, channels
last, seen channels first through `channels_first`; eval views through `clip_tensor`;
images through `image_tensor`): batches cross processes and the host-device link at a
quarter of float32's size, and workers do no float work. The training side calls
`normalize(x, device, dtype)` when it moves a batch.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def frame_step(src_fps: float, target_fps: float | None, stride: int,
               original_fps: float | None = None) -> float:
    """Stored frames between consecutive clip frames: stored/target fps, or the stride.

    The stride counts frames of the video as it was recorded (`original_fps`), so that a clip
    covers the same seconds whether prepare kept the file or re-encoded it at a lower rate:
    stride 2 of a 30 fps original stored at 15 fps is one stored frame."""
    if target_fps:
        return max(src_fps / target_fps, 1e-6)
    return float(stride) * src_fps / (original_fps or src_fps)


def clip_indices(start: float, frames: int, step: float, num_frames: int) -> list[int]:
    """T frame indices from `start`, `step` apart, looping past the end of short videos."""
    return [int(math.floor(start + i * step)) % num_frames for i in range(frames)]


def train_start(rng: random.Random, frames: int, step: float, num_frames: int) -> float:
    """A random temporal crop: a start frame such that the clip fits when it can."""
    span = (frames - 1) * step + 1
    room = num_frames - span
    return rng.uniform(0, room) if room > 0 else 0.0


def eval_starts(views: int, frames: int, step: float, num_frames: int) -> list[float]:
    """`views` uniformly spaced clip starts covering the whole video (the paper's 4 views)."""
    span = (frames - 1) * step + 1
    room = max(num_frames - span, 0.0)
    if views == 1:
        return [room / 2]
    return [room * v / (views - 1) for v in range(views)]


def random_resized_box(rng: random.Random, width: int, height: int, min_scale: float,
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of a random crop of area share [min_scale, 1] and aspect in `ratio`."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    side = min(width, height)  # fallback: the central square
    return (width - side) // 2, (height - side) // 2, side, side


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the short side scaled to `size`, aspect kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def spatial_offsets(views: int, width: int, height: int, size: int) -> list[tuple[int, int]]:
    """`views` size x size crops spread along the long side (left/centre/right for 3)."""
    if views == 1:
        return [((width - size) // 2, (height - size) // 2)]
    out = []
    for v in range(views):
        f = v / (views - 1)
        if width >= height:
            out.append((int(round((width - size) * f)), (height - size) // 2))
        else:
            out.append(((width - size) // 2, int(round((height - size) * f))))
    return out


def clip_tensor(frames: np.ndarray, x0: int, y0: int, size: int, flip: bool = False,
                out: np.ndarray | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames -> uint8 (3, T, size, size): the size x size window at
    (x0, y0), mirrored when `flip`. Crop, flip and the layout change are one strided copy;
    pixels stay uint8 (the trainer normalises on its device, see `normalize`)."""
    if out is None:
        out = np.empty((3, frames.shape[0], size, size), dtype=np.uint8)
    window = frames[:, y0:y0 + size, x0:x0 + size]  # (T, S, S, 3) view
    if flip:
        window = window[:, :, ::-1]
    np.copyto(out, window.transpose(3, 0, 1, 2))  # (3, T, S, S)
    return torch.from_numpy(out)


def channels_first(clips: torch.Tensor) -> torch.Tensor:
    """uint8 (..., T, H, W, 3) channels-last clips -> the (..., 3, T, H, W) view of them (no
    copy; `normalize` makes the model input contiguous on the device)."""
    return clips.movedim(-1, -4)


def image_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, H, W), contiguous."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


_MEAN = torch.tensor(MEAN)
_STD = torch.tensor(STD)
_AFFINE: dict = {}  # (device, dtype) -> (scale, shift) per channel, x_norm = pixel * scale + shift


def normalize(x: torch.Tensor, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32, non_blocking: bool = True) -> torch.Tensor:
    """Loader pixels -> model input, on `device`: uint8 (B, 3, T, H, W) or (B, 3, H, W) in
    any memory layout -> contiguous `dtype`, ImageNet mean/std normalised.

    The uint8 tensor crosses to the device first (4x fewer bytes than float32), then the
    conversion and the affine run there. The affine is computed in float32 and cast to
    `dtype` at the end, so bf16/fp16 inputs round once. A floating-point `x` is taken as
    already normalised and only moved and cast (so callers may pass either).
    """
    device = torch.device(device) if device is not None else x.device
    x = x.to(device, non_blocking=non_blocking)  # keeps the loader's strides: no host copy
    if x.is_floating_point():
        return x.to(dtype, memory_format=torch.contiguous_format)
    key = (device, x.dim())
    affine = _AFFINE.get(key)
    if affine is None:
        shape = (1, 3) + (1,) * (x.dim() - 2)  # broadcast over batch, time and space
        scale = (1.0 / (255.0 * _STD)).view(shape).to(device)
        shift = (-_MEAN / _STD).view(shape).to(device)
        affine = _AFFINE[key] = (scale, shift)
    # The cast also makes the layout contiguous (training clips arrive channels last), then
    # the affine runs in place: two passes over the float tensor in all.
    out = x.to(torch.float32, memory_format=torch.contiguous_format)
    out = torch.addcmul(affine[1], out, affine[0], out=out)
    return out if dtype == torch.float32 else out.to(dtype)
