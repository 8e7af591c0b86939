"""Fixed sin/cos position embedding of each token's tube centre (TubeViT paper,
section 3: a fixed sine/cosine embedding that accounts for each tube's stride and offset).

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
import torch.nn.functional as F
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


class LearnedPositionEmbedding(nn.Module):
    """A bootstrapped image ViT's own learned 2D position table, used for every tube.

    Config `pos_embed="learned"` (written by `pretrain bootstrap`). Parameters, in the
    layout timm uses (so the image ViT's tensors load unchanged):

        grid       (1, gh*gw, dim)  the image ViT's patch position table (row-major)
        cls_token  (1, 1, dim)      only with class_token: the CLS token
        cls_pos    (1, 1, dim)      only with class_token: its position (zeros when the
                                    image ViT gave the CLS token none, timm no_embed_class)

    Where a token sits: first the table is resampled to the image tube's token grid on this
    input (n_h x n_w patches) exactly as timm resamples a ViT's table for another image size
    (`timm.layers.resample_abs_pos_embed`: F.interpolate, bicubic, antialiased,
    align_corners=False, in float32; nothing at the table's own size). A token then reads that
    grid at its spatial centre in patch units, `g = c / P - 0.5` per axis (P the image tube's
    patch), bilinearly, clamped at the border. Image patch (i, j) lands exactly on grid entry
    (i, j), so images at any size get timm's own positions (forward_features equals a timm ViT
    with dynamic_img_size=True, tests/test_bootstrap_import.py); the 3D tubes' off-grid
    centres are read bilinearly between those entries.

    Time: the image ViT has no notion of it, so video tokens also get the fixed sin/cos
    embedding of their time centre relative to the first frame, `E(t) - E(t0)` in the t
    channels of the fixed layout (zero elsewhere). It is zero for images and first-frame
    tokens, so images are untouched, and it lets the trainable layers tell frames apart.

    The gather indices and weights are cached per input shape; the table itself is read in
    every forward (inside this module's call, so ZeRO-3 gathers it).
    """

    def __init__(self, tubes: list[TubeSpec], dim: int, grid: tuple[int, int], class_token: bool):
        super().__init__()
        self.tubes = list(tubes)
        self.dim = dim
        self.table = (int(grid[0]), int(grid[1]))
        self.image = self.tubes[image_tube_index(self.tubes)]
        self.grid = nn.Parameter(torch.empty(1, self.table[0] * self.table[1], dim))
        if class_token:
            self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
            self.cls_pos = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.register_parameter("cls_token", None)
            self.register_parameter("cls_pos", None)
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def image_grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(n_h, n_w): the image tube's token grid on this input's frame size."""
        return tuple((length - self.image.offset[1 + a] - self.image.kernel[1 + a]) // self.image.stride[1 + a] + 1
                     for a, length in enumerate(shape[-2:]))  # type: ignore[return-value]

    def lookup(self, shape: tuple[int, ...], grids: list[tuple[int, int, int]]):
        """(index (N, 4) into the resampled grid, bilinear weights (N, 4), time embedding (N, dim)), float64."""
        image = len(shape) == 4
        coords = token_coords(self.tubes, grids, image)                         # (N, 3) t, y, x
        n_grid = self.image_grid(shape)
        idx_parts, w_parts = [], []
        for axis, n in enumerate(n_grid):
            patch = self.image.stride[1 + axis]
            g = (coords[:, 1 + axis] / patch - 0.5).clamp(0, n - 1)            # (N,) grid units
            lo = g.floor()
            idx_parts.append((lo.long(), (lo + 1).clamp(max=n - 1).long()))
            w_parts.append(g - lo)                                              # (N,) in [0, 1)
        (y0, y1), (x0, x1) = idx_parts
        fy, fx = w_parts
        gw = n_grid[1]
        index = torch.stack([y0 * gw + x0, y0 * gw + x1, y1 * gw + x0, y1 * gw + x1], dim=1)   # (N, 4)
        weight = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], dim=1)  # (N, 4)
        t = coords.clone()
        t[:, 1:] = 0.0
        t0 = torch.zeros_like(t)
        t0[:, 0] = self.image.offset[0] + self.image.kernel[0] // 2
        time = sincos_embedding(t, self.dim) - sincos_embedding(t0, self.dim)  # (N, dim), 0 on y/x channels
        return index, weight, time

    def resampled(self, n_grid: tuple[int, int]) -> torch.Tensor:
        """The table at the image grid `n_grid` (n_h*n_w, dim), as timm's resample_abs_pos_embed."""
        table = self.grid[0]                                                     # (gh*gw, dim)
        if tuple(n_grid) == self.table:
            return table
        gh, gw = self.table
        grid = table.float().reshape(1, gh, gw, self.dim).permute(0, 3, 1, 2)    # (1, dim, gh, gw)
        grid = F.interpolate(grid, size=tuple(n_grid), mode="bicubic", antialias=True, align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(-1, self.dim).to(table.dtype)    # (n_h*n_w, dim)

    def forward(self, tokens: torch.Tensor, shape: tuple[int, ...],
                grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """tokens (B, N, dim) -> tokens + positions, CLS first when present: (B, [1+]N, dim)."""
        key = (tuple(shape[2:]), len(shape), str(tokens.device), tokens.dtype)
        cached = self._cache.get(key)
        if cached is None:
            index, weight, time = self.lookup(shape, grids)
            cached = (index.to(tokens.device), weight.to(tokens.device, tokens.dtype),
                      time.to(tokens.device, tokens.dtype))
            self._cache[key] = cached
        index, weight, time = cached
        table = self.resampled(self.image_grid(shape))                           # (n_h*n_w, dim)
        pos = (table[index] * weight.unsqueeze(-1).to(table.dtype)).sum(1)       # (N, dim)
        x = tokens + (pos.to(tokens.dtype) + time)                               # (B, N, dim)
        if self.cls_token is not None:
            cls = (self.cls_token + self.cls_pos).to(x.dtype).expand(x.shape[0], -1, -1)  # (B, 1, dim)
            x = torch.cat([cls, x], dim=1)                                       # (B, 1+N, dim)
        return x
