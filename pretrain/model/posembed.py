"""Fixed sin/cos position embedding of each token's tube centre (tubevit.md section 3).

A token's position is the centre of the input span its tube reads, in frames (t) and pixels
(y, x), stride and offset included: `index * stride + offset + span // 2` per axis, where the
span is the kernel (or, with space-to-depth, the S neighbours' combined extent).

Channel layout for width d, with F = d // 6 frequencies `w_j = 10000 ** (-6 j / d)`:

    [sin(t w) | cos(t w) | sin(y w) | cos(y w) | sin(x w) | cos(x w) | zeros(d - 6F)]

each block F channels wide. The zero remainder is what makes d = 1024 and d = 1280 work.
Image tokens use the image tube's first-frame centres (t = offset_t, usually 0), so an image
patch (i, j) gets exactly the embedding of the first-frame 2D-tube token of a video.
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.model.tubes import TubeSpec, image_tube_index


def sincos_embedding(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """coords (N, 3) as (t, y, x) in input units -> (N, dim) float64 embedding."""
    n_freq = dim // 6
    j = torch.arange(n_freq, dtype=torch.float64)
    freqs = 10000.0 ** (-6.0 * j / dim)                        # (F,)
    angles = coords.to(torch.float64)[:, :, None] * freqs      # (N, 3, F)
    parts = []
    for axis in range(3):
        parts += [torch.sin(angles[:, axis]), torch.cos(angles[:, axis])]  # (N, F) each
    out = torch.zeros(coords.shape[0], dim, dtype=torch.float64)
    out[:, : 6 * n_freq] = torch.cat(parts, dim=1)             # (N, 6F), rest stays zero
    return out


def tube_coords(spec: TubeSpec, grid: tuple[int, int, int]) -> torch.Tensor:
    """(nt*nh*nw, 3) centres of a tube's tokens, t-major like the tokenizer's flattening."""
    ct, cy, cx = spec.centres(grid)
    t, y, x = torch.meshgrid(ct, cy, cx, indexing="ij")       # (nt, nh, nw) each
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


def token_coords(tubes: list[TubeSpec], grids: list[tuple[int, int, int]], image: bool) -> torch.Tensor:
    """(N, 3) centres of all tokens in the tokenizer's order (for an image: the image tube)."""
    if image:
        return tube_coords(tubes[image_tube_index(tubes)], grids[0])
    return torch.cat([tube_coords(s, g) for s, g in zip(tubes, grids)], dim=0)


class FixedPositionEmbedding(nn.Module):
    """(N, dim) embedding for an input shape, cached per (shape, device, dtype).

    The cache is a plain dict, not a buffer: it is not saved in checkpoints, survives
    `to_empty()` (entries are keyed by device), and costs nothing after the first step of
    each clip size.
    """

    def __init__(self, tubes: list[TubeSpec], dim: int):
        super().__init__()
        self.tubes = list(tubes)
        self.dim = dim
        self._cache: dict[tuple, torch.Tensor] = {}

    def compute(self, grids: list[tuple[int, int, int]], image: bool) -> torch.Tensor:
        return sincos_embedding(token_coords(self.tubes, grids, image), self.dim)  # (N, dim) f64

    def forward(self, shape: tuple[int, ...], grids: list[tuple[int, int, int]],
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape[2:]), len(shape), str(device), dtype)
        emb = self._cache.get(key)
        if emb is None:
            emb = self.compute(grids, image=len(shape) == 4).to(device=device, dtype=dtype)
            self._cache[key] = emb
        return emb                                               # (N, dim)
