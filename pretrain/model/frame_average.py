"""The lecture's "very strong baseline": an image model evaluated frame by frame on a clip,
its per-frame predictions averaged (single-frame CNNs with averaged predictions, here any
image-capable model of this system: `model.accepts_images`).

    probs = frame_average(model, clip, dataset="kinetics")   # (B, 3, T, H, W) -> (B, classes)

Each of the T frames goes through `model(frames, dataset)` as an image (B*T, 3, H, W), `chunk`
frames at a time (bounded memory on long clips); the result is the mean over frames of each
frame's softmax (a probability vector per clip, like Supervised.evaluate's view average).
"""
from __future__ import annotations

import torch

from pretrain.errors import UserError


def frame_average(model, clip: torch.Tensor, dataset: str | None = None, chunk: int = 64) -> torch.Tensor:
    """(B, C, T, H, W) clip -> (B, classes) float32: mean over its T frames of the softmax of
    `model` on each frame alone. An image batch (B, C, H, W) is one frame."""
    if not getattr(model, "accepts_images", True):
        raise UserError(f"{type(model).__name__} does not take images, so it cannot be evaluated frame by "
                        "frame (frame_average)")
    if clip.ndim == 4:
        clip = clip.unsqueeze(2)
    if clip.ndim != 5:
        raise UserError(f"frame_average takes a clip (B, C, T, H, W) or images (B, C, H, W); got {tuple(clip.shape)}")
    if chunk < 1:
        raise UserError(f"frame_average: chunk={chunk} must be >= 1")
    B, C, T, H, W = clip.shape
    frames = clip.transpose(1, 2).reshape(B * T, C, H, W)                    # clip-major, then frame
    probs = torch.cat([model(part, dataset=dataset).float().softmax(-1) for part in frames.split(chunk)])
    return probs.view(B, T, -1).mean(1)                                      # (B, classes)
