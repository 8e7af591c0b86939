"""A picture of masked modelling: input / what the encoder saw / reconstruction, as a PNG.

    png = recon_grid(x, visible, recon)          # bytes of one PNG
    log_png(tracking_uri, run_id, "reconstructions/video_step_0000400.png", png)

One band per sample, three rows each: the input, the input with every pixel no visible
token reads greyed out, the reconstruction. A video shows its frames left to right; an
image is one frame. Pixels are model input (ImageNet mean/std normalised) and are mapped
back to 0-255 for the picture.

`visible_pixels(encoder, shape, mask)` derives the "what the encoder saw" map from the
model's own token geometry (`token_groups`, `pixel_volume`; pretrain/model/tubes.py
tube_pixel_index), so it is right for sparse tubes, space-to-depth tubes and dense cubes
alike.
"""
from __future__ import annotations

import io
import sys

import numpy as np
import torch

from pretrain.data.transforms import MEAN, STD
from pretrain.model.tubes import tube_pixel_index

GREY = 128
GAP = 2   # pixels between frames and between samples


def visible_pixels(encoder, shape: tuple[int, ...], mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W) bool (an image: T = 1): True where some visible token reads the pixel.
    `mask` (B, N) bool, True = masked, in the encoder's token order."""
    volume = encoder.pixel_volume(tuple(shape))                              # (T', H, W) ids
    visible = ~mask.cpu()
    # Sized by the input's own pixels, not by the volume: a VideoMAE cube is 2 frames deep, so
    # an image's volume repeats its one frame, both copies holding the same pixel ids.
    frames = shape[2] if len(shape) == 5 else 1
    out = torch.zeros(mask.shape[0], frames * shape[-2] * shape[-1], dtype=torch.bool)
    start = 0
    for _, spec, grid in encoder.token_groups(tuple(shape)):   # tubes differ in extent V
        ids = tube_pixel_index(spec, grid, volume)                            # (N_g, V)
        for b in range(mask.shape[0]):
            seen = ids[visible[b, start:start + ids.shape[0]]].reshape(-1)
            out[b, seen[seen >= 0]] = True
        start += ids.shape[0]
    return out.view(mask.shape[0], frames, shape[-2], shape[-1])


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Model input (B, 3, T, H, W) or (B, 3, H, W) -> uint8 (B, T, H, W, 3)."""
    x = x.detach().float().cpu()
    if x.ndim == 4:
        x = x.unsqueeze(2)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1, 1)
    rgb = ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(0, 2, 3, 4, 1).numpy()


def grid_array(x: torch.Tensor, visible: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """uint8 (rows, cols, 3): per sample the input, the masked input and the reconstruction,
    each a row of its frames."""
    inp, rec = _pixels(x), _pixels(recon)
    seen = inp.copy()
    seen[~visible.cpu().numpy()] = GREY
    B, T, H, W, _ = inp.shape
    rows, cols = B * 3 * (H + GAP) - GAP, T * (W + GAP) - GAP
    canvas = np.full((rows, cols, 3), 255, dtype=np.uint8)
    for b in range(B):
        for r, panel in enumerate((inp, seen, rec)):
            top = (b * 3 + r) * (H + GAP)
            for t in range(T):
                left = t * (W + GAP)
                canvas[top:top + H, left:left + W] = panel[b, t]
    return canvas


def png_bytes(array: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def recon_grid(x: torch.Tensor, visible: torch.Tensor, recon: torch.Tensor) -> bytes:
    """PNG of `grid_array`, enlarged so that small clips (32 px) show at 128 px."""
    array = grid_array(x, visible, recon)
    return png_bytes(array, scale=max(1, 128 // max(x.shape[-1], 1)))


def log_png(tracking_uri: str, run_id: str, artifact_path: str, png: bytes) -> None:
    """Store `png` as artifact `artifact_path` of the MLflow run (warns, never raises: a
    picture must not stop training)."""
    import os
    import tempfile

    from mlflow.tracking import MlflowClient

    folder, name = os.path.split(artifact_path)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(png)
            MlflowClient(tracking_uri).log_artifact(run_id, path, folder or None)
    except Exception as exc:
        print(f"warning: could not log {artifact_path} to MLflow run {run_id} ({exc})",
              file=sys.stderr)
