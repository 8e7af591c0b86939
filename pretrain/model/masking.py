"""Which tokens a masked autoencoder hides: bool masks (B, N), True = masked.

    mask = mask_tokens(model, x, ratio=0.9, scheme="tube", generator=g)   # (B, N) bool

Every sample hides the same number of tokens (so the encoder's visible tokens form a dense
(B, n_visible, d) tensor): `masked_count` says how many. The count rounds down like VideoMAE
(`int(ratio * n)`), clamped so at least one token is masked and one stays visible.

Schemes (`MASK_SCHEMES`), for videos:
- "tube": VideoMAE's tube masking for dense cube tokens: one random spatial mask of
  `int(ratio * nh * nw)` positions, repeated along time, so a hidden patch cannot be copied
  from the next frame. Needs a tokenizer with a single token grid (videomae-*, or a TubeViT
  with tubes=dense-2x16x16); other tokenizers are a UserError naming the scheme.
- "random": each token independently (a random permutation per sample; MAE-ST's choice).
- "aligned": for TubeViT's sparse tubes, where tokens of different tubes overlap in the
  clip: the clip is cut into cells (per axis the largest stride of any tube, e.g. 32 frames
  x 32 x 32 pixels for the paper's tubes), cells are ranked at random, and tokens are masked
  in the order of their centre's cell rank (random order inside a cell) until the count is
  reached. The hidden cells are thus hidden in every tube, which "random" does not do: a
  region hidden in one tube is often visible through another tube's overlapping token.
- "auto" (the config default): "tube" for a tokenizer with one token grid, "aligned" for
  sparse tubes (`default_scheme`).
Images (x.ndim == 4) always get random patch masking whatever the scheme (OmniMAE).

Aligned vs random for sparse tubes was measured on configs/smoke-masked.yaml (800 steps,
mask 0.75, kNN top-1 of the frozen encoder at each eval point; README "Masked pretraining"):
the two are within one or two held-out clips of each other at every point, so the
measurement does not separate them at that size. "auto" takes "aligned" because only it
hides what it hides: under "random" a hidden region is most often read through another
tube's overlapping token (tests/test_masking.py counts it), which a larger model can copy
instead of predicting.

Determinism: the mask depends only on the generator's state and the input's shape; it is
drawn on the generator's device (normally the CPU) and moved to x's device, so a resumed run
that restores the generator state (`generator.get_state()`) draws the same masks.
"""
from __future__ import annotations

import math

import torch

from pretrain.errors import UserError
from pretrain.model.posembed import tube_coords

MASK_SCHEMES: tuple[str, ...] = ("auto", "tube", "random", "aligned")


def _encoder(model):
    """The family model behind a MaskedAutoencoder, a DDP/DeepSpeed wrapper, or itself."""
    model = getattr(model, "module", model)
    return getattr(model, "encoder", model)


def check_ratio(ratio: float) -> None:
    if not 0.0 < float(ratio) < 1.0:
        raise UserError(f"mask ratio {ratio} must be in (0, 1), e.g. 0.9 for videos, 0.75 for images")


def check_scheme(scheme: str) -> None:
    if scheme not in MASK_SCHEMES:
        raise UserError(f"mask scheme {scheme!r} is unknown; valid: {', '.join(MASK_SCHEMES)}")


def _count(n: int, ratio: float) -> int:
    return min(max(int(ratio * n), 1), n - 1) if n > 1 else 0


def masked_count(model, shape: tuple[int, ...], ratio: float, scheme: str) -> int:
    """Tokens one sample of input `shape` (B, C, [T,] H, W) hides under `scheme`."""
    check_ratio(ratio)
    scheme = resolve_scheme(model, shape, scheme)
    groups = _encoder(model).token_groups(tuple(shape))
    if len(shape) == 5 and scheme == "tube":
        (_, _, (nt, nh, nw)), = _single_grid(groups, model)
        return nt * _count(nh * nw, ratio)
    return _count(sum(math.prod(g) for _, _, g in groups), ratio)


def visible_count(model, shape: tuple[int, ...], ratio: float, scheme: str) -> int:
    """Tokens the encoder sees for one sample of input `shape`."""
    n = sum(math.prod(g) for _, _, g in _encoder(model).token_groups(tuple(shape)))
    return n - masked_count(model, shape, ratio, scheme)


def _single_grid(groups, model):
    if len(groups) != 1:
        raise UserError(f"mask scheme 'tube' repeats one spatial mask along time and needs a "
                        f"tokenizer with one token grid (videomae-*, or tubes=dense-2x16x16); this "
                        f"{type(_encoder(model)).__name__} has {len(groups)} tubes: use 'random' or 'aligned'")
    return groups


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: True at the k lowest scores of each row (scores are distinct)."""
    order = scores.argsort(dim=1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order[:, :k], True)


def mask_tokens(model, x: torch.Tensor, ratio: float, scheme: str,
                generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool mask of `model`'s tokens for input x, True = masked, a fixed count per sample."""
    check_ratio(ratio)
    shape = tuple(x.shape)
    scheme = resolve_scheme(model, shape, scheme)
    groups = _encoder(model).token_groups(shape)
    n = sum(math.prod(g) for _, _, g in groups)
    k = masked_count(model, shape, ratio, scheme)
    B, dev = shape[0], generator.device
    if x.ndim == 4 or scheme == "random":
        mask = _top(torch.rand(B, n, generator=generator, device=dev), k)
    elif scheme == "tube":
        (_, _, (nt, nh, nw)), = groups
        spatial = _top(torch.rand(B, nh * nw, generator=generator, device=dev), k // nt)  # (B, nh*nw)
        mask = spatial.repeat(1, nt)                           # t-major tokens: same mask each t
    else:
        cells, n_cells = _cells(groups)                        # (N,) cell of each token
        rank = torch.rand(B, n_cells, generator=generator, device=dev).argsort(1).argsort(1)  # (B, cells)
        inside = torch.rand(B, n, generator=generator, device=dev)                # order in a cell
        mask = _top(rank[:, cells].to(torch.float64) + inside.to(torch.float64), k)
    return mask.to(x.device)


def _cells(groups) -> tuple[torch.Tensor, int]:
    """Cell index of every token's centre; cell size per axis = the largest tube stride."""
    cell = [max(spec.stride[a] for _, spec, _ in groups) for a in range(3)]
    coords = torch.cat([tube_coords(spec, grid) for _, spec, grid in groups])   # (N, 3) t, y, x
    idx = (coords // torch.tensor(cell, dtype=coords.dtype)).long()           # (N, 3)
    dims = (idx.max(0).values + 1).tolist()
    flat = (idx[:, 0] * dims[1] + idx[:, 1]) * dims[2] + idx[:, 2]
    used, cells = torch.unique(flat, return_inverse=True)
    return cells, len(used)


def default_scheme(model, shape: tuple[int, ...]) -> str:
    """What "auto" means for `model`: 'tube' for a single token grid (VideoMAE's default),
    else 'aligned' (sparse tubes; the module docstring says why)."""
    return "tube" if len(_encoder(model).token_groups(tuple(shape))) == 1 else "aligned"


def resolve_scheme(model, shape: tuple[int, ...], scheme: str) -> str:
    """`scheme` checked, with "auto" replaced by `default_scheme`."""
    check_scheme(scheme)
    return default_scheme(model, shape) if scheme == "auto" else scheme
