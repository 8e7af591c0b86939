"""Sparse video tubes: their geometry, the paper's tube sets, and the tokenizer module.

A tube is a 3D convolution over the raw RGB clip with its own kernel, a large stride and a
start offset (order t, h, w throughout). Its token grid follows valid-convolution arithmetic
after cropping the offset, per axis:

    n = floor((L - offset - kernel) / stride) + 1

so 32x224x224 with the paper's four tubes gives 98 + 147 + 98 + 196 = 539 tokens, an image
196, and 64x224x224 gives 1176.

Choices this module makes where the paper (Piergiovanni et al., CVPR 2023, section 3,
"Sparse Video Tubes") is silent:

- A tube that does not fit the clip (L < offset + kernel on some axis) contributes 0 tokens
  by default, with one warning naming it (`UnfitTubeWarning`, once per tokenizer, tube and
  clip size): e.g. the paper's tube 2, 16 frames deep at offset 4, needs 20 frames, so a
  16x224x224 clip gives 49 + 0 + 49 + 196 = 294 tokens, the arithmetic count. Position
  embeddings come from tube centres, so the remaining tokens keep their meaning. A skipped
  tube's kernel gets no gradient from such a clip; the warning says so. Strict mode (model
  config `unfit_tubes="error"`, or `video_grids(..., skip_unfit=False)`) makes it a
  `UserError` naming the tube, the clip size and the smallest clip every tube fits. The
  image tube must always fit.
- Images go through the "image tube": the first tube whose kernel is 1 frame deep and which
  has no space-to-depth (the paper's 1x16x16 patch embedding). Its weights are the same
  tensor the video path uses.
- Space-to-depth (S2D), factor S, with the paper's semantics: the conv outputs dim/S
  channels at a smaller stride on the S2D axes; the S neighbours that make up one token are
  concatenated (neighbour-major, neighbours in (t, h, w) lexicographic order) back to dim
  channels. Token count and width equal the plain tube's; each token sees a span of
  `kernel + (f-1) * stride/f` on an axis with factor f. `s2d_axis` names one or more axes
  ("t", "h", "w", "hw", "th", "thw", ...); S is split evenly over them (S = f**k: "hw" x4 is
  2x2) unless `s2d_split` gives one factor per named axis (e.g. "th" x8 split (2, 4)).
  Default of the paper's tube 2 ("4x spatial", 16x4x4): 2x2 over h and w. Why: space-to-depth
  on images is a 2D block operation (a b x b block -> b*b channels), the tube's kernel and
  strides are the same on h and w so a square footprint keeps it isotropic, and its span
  (20x20 px) stays inside a 224 px frame; the former h-only variant (span 28 x 4 px, reading
  past pixel 224) is the tube set "paper-s2d-h" (models trained with it store their tubes and
  load unchanged). Table 7c's "x4 spatio-temporal" is s2d_axis="th" (2 frames x 2 rows) or
  "thw" with an explicit split. When the last token's span runs past the end of the clip,
  the clip is zero-padded at the far end so the count stays the arithmetic one.
- Interpolated kernels: one learned base kernel (default 8x8x8, dim output channels) is
  trilinearly resized (align_corners=False, no antialiasing, no rescaling) to every tube's
  kernel shape, the image tube's included, so all tokenizer weights except the per-tube
  biases are shared. What that means for the image tube (1x16x16 from 8x8x8): in time the
  one output frame samples the base kernel's centre, i.e. the mean of base frames 3 and 4
  (0-based), not a sum or mean over all 8; in space it is the 2x bilinear upsampling. Its
  response to a static clip is therefore neither the 8x8x8 tube's nor 8x smaller; the scale
  is learned through the shared kernel in joint training, and changing the resize would
  change every trained interpolated model, so it stays (tests/test_tubevit_fidelity.py pins
  it). Enlarging a *trained* model's kernels (the paper's Charades route, `enlarge_kernel`)
  rescales by the volume ratio instead, because there the function must be kept. This mode
  cannot be combined with S2D (the shared kernel has dim output channels, S2D tubes dim/S).

The tube sets named after the paper (TUBE_SETS): "paper" (section 3.4's four tubes with
space-to-depth, 539 tokens at 32x224x224), "paper-no-s2d", "paper-1" (section 3.2: the 2D
patch 1x16x16 at stride 16x16x16, 392 tokens), "paper-2" (the two-tube core: that patch plus
an 8x8x8 tube, both stride 16x16x16, 784 tokens) and "charades" (the paper's route to its
Charades model: the four tubes' kernels enlarged to 16x16x16, 32x8x8, 4x32x32 and 1x16x16
with every stride and offset kept; 2248 tokens at 128x224x224; the 32x8x8 tube needs 36
frames). "charades-t16" is this project's earlier variant (the 32x8x8 tube at temporal stride
16 and offset (0, 4, 4): 1807 tokens at 128 frames, fits 32-frame clips); it is not the paper's.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.errors import UserError

AXES = ("t", "h", "w")


def _triple(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"tube {what} must be three integers (t, h, w), got {value!r}") from None
    if len(out) != 3:
        raise UserError(f"tube {what} must be three integers (t, h, w), got {value!r}")
    return out  # type: ignore[return-value]


def _s2d_axes(value) -> str | None:
    """s2d_axis as a canonical string of distinct axes in (t, h, w) order, or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not set(value) <= set(AXES) or len(set(value)) != len(value):
        raise UserError(f"tube s2d_axis must be None or one or more distinct axes of 't', 'h', 'w' "
                        f"(e.g. 't', 'hw', 'thw'), got {value!r}")
    return "".join(a for a in AXES if a in value)


@dataclass(frozen=True)
class TubeSpec:
    """One tube: kernel, stride and offset as (t, h, w), optional space-to-depth.

    Space-to-depth: `s2d_axis` one or more axes ("h", "hw", "thw", ...), `s2d_factor` the
    total factor S (channels per neighbour dim/S), split evenly over the axes unless
    `s2d_split` gives one factor per named axis (in t, h, w order). `s2d_outer` (e_t, e_h,
    e_w), each dividing that axis's factor f: the channel groups run over the e finer
    positions first, each group holding the token of this tube with factors f/e, so a
    k-fold space-to-depth widening (the bootstrap's, pretrain/model/bootstrap.py) lays every
    tube out as k copies of the small model's token layout. None = plain (t, h, w) order.
    """

    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    offset: tuple[int, int, int] = (0, 0, 0)
    s2d_axis: str | None = None  # one or more of 't', 'h', 'w'; None = no space-to-depth
    s2d_factor: int = 1
    s2d_split: tuple[int, ...] | None = None  # per named axis; None = S split evenly
    s2d_outer: tuple[int, int, int] | None = None  # outer neighbour factors (t, h, w); see below

    def __post_init__(self):
        # Lists (from JSON/YAML) become tuples so specs stay hashable and comparable.
        object.__setattr__(self, "kernel", _triple(self.kernel, "kernel"))
        object.__setattr__(self, "stride", _triple(self.stride, "stride"))
        object.__setattr__(self, "offset", _triple(self.offset, "offset"))
        object.__setattr__(self, "s2d_factor", int(self.s2d_factor))
        object.__setattr__(self, "s2d_axis", _s2d_axes(self.s2d_axis))
        if self.s2d_split is not None:
            object.__setattr__(self, "s2d_split", tuple(int(v) for v in self.s2d_split))
        if self.s2d_outer is not None:
            object.__setattr__(self, "s2d_outer", _triple(self.s2d_outer, "s2d_outer"))
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.offset) < 0:
            raise UserError(
                f"tube {self.describe()} is invalid: kernel and stride entries must be >= 1 "
                "and offsets >= 0"
            )
        if self.s2d_axis is None:
            if self.s2d_factor != 1 or self.s2d_split is not None or self.s2d_outer is not None:
                raise UserError(
                    f"tube {self.describe()}: s2d_factor={self.s2d_factor} needs an s2d_axis "
                    "('t', 'h', 'w' or several, e.g. 'hw'); use s2d_factor=1 for no space-to-depth"
                )
            return
        k = len(self.s2d_axis)
        if self.s2d_split is None:
            f = round(self.s2d_factor ** (1.0 / k))
            if f ** k != self.s2d_factor:
                raise UserError(
                    f"tube {self.describe()}: space-to-depth factor {self.s2d_factor} does not split "
                    f"evenly over the {k} axes {self.s2d_axis!r}; give s2d_split (one factor per axis)")
            split = (f,) * k
        else:
            split = self.s2d_split
            if len(split) != k or math.prod(split) != self.s2d_factor:
                raise UserError(
                    f"tube {self.describe()}: s2d_split {list(split)} needs one factor per axis of "
                    f"{self.s2d_axis!r} with product s2d_factor={self.s2d_factor}")
        for axis, f in zip(self.s2d_axis, split):
            a = AXES.index(axis)
            if f < 2 or self.stride[a] % f:
                raise UserError(
                    f"tube {self.describe()}: space-to-depth factor must be >= 2 and divide the "
                    f"stride on axis {axis} ({self.stride[a]}); got {f}"
                )
        if self.s2d_outer is not None and any(e < 1 or f % e for e, f in zip(self.s2d_outer, self.factors)):
            raise UserError(f"tube {self.describe()}: s2d_outer {list(self.s2d_outer)} must divide the "
                            f"per-axis space-to-depth factors {list(self.factors)}")

    # ---- geometry -------------------------------------------------------------------

    @property
    def factors(self) -> tuple[int, int, int]:
        """Space-to-depth factor per axis (t, h, w); (1, 1, 1) without space-to-depth."""
        if self.s2d_axis is None:
            return (1, 1, 1)
        k = len(self.s2d_axis)
        split = self.s2d_split or (round(self.s2d_factor ** (1.0 / k)),) * k
        per = dict(zip(self.s2d_axis, split))
        return tuple(per.get(a, 1) for a in AXES)  # type: ignore[return-value]

    @property
    def s2d_index(self) -> int | None:
        """The S2D axis index when there is exactly one (None without S2D or with several)."""
        return AXES.index(self.s2d_axis) if self.s2d_axis is not None and len(self.s2d_axis) == 1 else None

    def factor(self, axis: int) -> int:
        """Space-to-depth factor on `axis` (1 when the tube has none there)."""
        return self.factors[axis]

    @property
    def conv_stride(self) -> tuple[int, int, int]:
        """Stride the convolution itself runs at (f times smaller on an axis with S2D factor f)."""
        return tuple(s // f for s, f in zip(self.stride, self.factors))  # type: ignore[return-value]

    @property
    def span(self) -> tuple[int, int, int]:
        """Extent of input one token sees per axis (S2D: the S neighbours combined)."""
        return tuple(
            k + (f - 1) * cs for k, f, cs in zip(self.kernel, self.factors, self.conv_stride)
        )  # type: ignore[return-value]

    @property
    def min_size(self) -> tuple[int, int, int]:
        """Smallest clip (t, h, w) that yields one token."""
        return tuple(o + k for o, k in zip(self.offset, self.kernel))  # type: ignore[return-value]

    @property
    def is_2d(self) -> bool:
        """A 1-frame kernel without space-to-depth: usable on images."""
        return self.kernel[0] == 1 and self.s2d_axis is None

    def fits(self, size: tuple[int, int, int]) -> bool:
        return all(L >= m for L, m in zip(size, self.min_size))

    def grid(self, size: tuple[int, int, int], name: str = "tube") -> tuple[int, int, int]:
        """Token grid (nt, nh, nw) on a clip of `size` (t, h, w); UserError when it does not fit."""
        out = []
        for a, (length, o, k, s) in enumerate(zip(size, self.offset, self.kernel, self.stride)):
            if length < o + k:
                raise UserError(
                    f"{name} {self.describe()} does not fit a {'x'.join(map(str, size))} clip: "
                    f"on axis {AXES[a]} it needs at least offset + kernel = {o + k}, the clip has "
                    f"{length}"
                )
            out.append((length - o - k) // s + 1)
        return tuple(out)  # type: ignore[return-value]

    def centres(self, grid: tuple[int, int, int]) -> list[torch.Tensor]:
        """Per axis, the centre of each token's span in input units (frames, pixels)."""
        return [
            torch.arange(n, dtype=torch.float64) * s + o + span // 2
            for n, s, o, span in zip(grid, self.stride, self.offset, self.span)
        ]

    def describe(self) -> str:
        text = "x".join(map(str, self.kernel)) + " stride " + ",".join(map(str, self.stride))
        text += " offset " + ",".join(map(str, self.offset))
        if self.s2d_axis is not None:
            text += f" s2d {self.s2d_axis}x{self.s2d_factor}"
            if self.s2d_split is not None:
                text += "(" + ",".join(map(str, self.s2d_split)) + ")"
            if self.s2d_outer is not None:
                text += " outer " + "x".join(map(str, self.s2d_outer))
        return f"[{text}]"

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("kernel", "stride", "offset"):
            d[key] = list(d[key])
        for key in ("s2d_split", "s2d_outer"):   # earlier stored architectures have no such keys
            if d[key] is None:
                del d[key]
            else:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TubeSpec":
        allowed = {"kernel", "stride", "offset", "s2d_axis", "s2d_factor", "s2d_split", "s2d_outer"}
        unknown = set(d) - allowed
        if unknown:
            raise UserError(f"tube has unknown keys {sorted(unknown)}; valid keys: {sorted(allowed)}")
        return cls(**d)


# ---- the paper's tube sets --------------------------------------------------------------

def paper_tubes(patch: int = 16, s2d: bool = True, s2d_spatial: str = "hw") -> list[TubeSpec]:
    """The paper's four tubes (section 3.4, "Multi-Tube"), 2D patch tube last.

    `patch` changes the 2D tube's kernel and spatial stride (e.g. 14 for a ViT-H/14 image
    model being bootstrapped); `s2d=False` drops the main model's space-to-depth;
    `s2d_spatial` the axes of tube 2's x4 spatial space-to-depth ("hw": 2x2, the default,
    see the module docstring; "h": the earlier 4x along h only).
    """
    return [
        TubeSpec((8, 8, 8), (16, 32, 32), (0, 0, 0), "t" if s2d else None, 2 if s2d else 1),
        TubeSpec((16, 4, 4), (6, 32, 32), (4, 8, 8), s2d_spatial if s2d else None, 4 if s2d else 1),
        TubeSpec((4, 12, 12), (16, 32, 32), (0, 16, 16)),
        TubeSpec((1, patch, patch), (32, patch, patch), (0, 0, 0)),
    ]


def paper_core_tubes(n: int, patch: int = 16) -> list[TubeSpec]:
    """Sections 3.2 and 3.4 before the multi-tube model: the 2D patch 1xPxP at stride
    (16, P, P) (n=1), plus an 8x8x8 tube at stride 16x16x16 (n=2), 2D tube last."""
    image = TubeSpec((1, patch, patch), (16, patch, patch))
    return [image] if n == 1 else [TubeSpec((8, 8, 8), (16, 16, 16)), image]


# The paper's Charades tubes: the four tubes' kernels enlarged, in paper_tubes' order.
CHARADES_KERNELS = ((16, 16, 16), (32, 8, 8), (4, 32, 32), (1, 16, 16))


def enlarge_tubes(tubes: list[TubeSpec], kernels) -> list[TubeSpec]:
    """The same tubes (strides, offsets, space-to-depth) with new kernel shapes: the tube
    geometry of a model whose kernels `enlarge_kernel` resized (the paper's Charades route)."""
    kernels = [_triple(k, "kernel") for k in kernels]
    if len(kernels) != len(tubes):
        raise UserError(f"enlarging {len(tubes)} tubes needs {len(tubes)} kernel shapes, got {len(kernels)}")
    return [TubeSpec(k, t.stride, t.offset, t.s2d_axis, t.s2d_factor, t.s2d_split, t.s2d_outer)
            for t, k in zip(tubes, kernels)]


def charades_tubes() -> list[TubeSpec]:
    """The paper's Charades tubes: paper_tubes(s2d=False) with CHARADES_KERNELS, every
    stride and offset kept (128x224x224 -> 392 + 784 + 288 + 784 = 2248 tokens)."""
    return enlarge_tubes(paper_tubes(s2d=False), CHARADES_KERNELS)


def charades_t16_tubes() -> list[TubeSpec]:
    """This project's earlier Charades variant (not the paper's: the 32x8x8 tube at temporal
    stride 16, offset (0, 4, 4), so it fits 32-frame clips; 1807 tokens at 128 frames)."""
    return [
        TubeSpec((1, 16, 16), (32, 16, 16)),
        TubeSpec((16, 16, 16), (16, 32, 32)),
        TubeSpec((32, 8, 8), (16, 32, 32), (0, 4, 4)),
        TubeSpec((4, 32, 32), (16, 32, 32), (0, 16, 16)),
    ]


TUBE_SETS = {
    "paper": lambda: paper_tubes(),
    "paper-no-s2d": lambda: paper_tubes(s2d=False),
    "paper-s2d-h": lambda: paper_tubes(s2d_spatial="h"),
    "paper-2": lambda: paper_core_tubes(2),
    "paper-1": lambda: paper_core_tubes(1),
    "charades": charades_tubes,
    "charades-t16": charades_t16_tubes,
    # ViViT-style dense tubelets: the comparison baseline (no image tube).
    "dense-2x16x16": lambda: [TubeSpec((2, 16, 16), (2, 16, 16))],
}


def resolve_tubes(tubes) -> list[TubeSpec]:
    """A tube-set name, or a list of TubeSpec / dicts, as a list of TubeSpec."""
    if isinstance(tubes, str):
        if tubes not in TUBE_SETS:
            raise UserError(f"tube set {tubes!r} is unknown; valid names: {', '.join(TUBE_SETS)}")
        return TUBE_SETS[tubes]()
    out = [t if isinstance(t, TubeSpec) else TubeSpec.from_dict(dict(t)) for t in tubes]
    if not out:
        raise UserError("a model needs at least one tube; the paper's set is tubes='paper'")
    return out


def image_tube_index(tubes: list[TubeSpec]) -> int | None:
    """Index of the tube images go through: the first 1-frame tube without S2D."""
    return next((i for i, t in enumerate(tubes) if t.is_2d), None)


class UnfitTubeWarning(UserWarning):
    """A tube that does not fit the clip was skipped (it gives 0 tokens)."""


def unfit_tubes(tubes: list[TubeSpec], size: tuple[int, int, int]) -> list[int]:
    """Indices of the tubes that do not fit a (t, h, w) clip."""
    return [i for i, t in enumerate(tubes) if not t.fits(size)]


def unfit_message(tubes: list[TubeSpec], size: tuple[int, int, int], unfit: list[int]) -> str:
    clip = "x".join(map(str, size))
    smallest = "x".join(str(max(t.min_size[a] for t in tubes)) for a in range(3))
    names = "; ".join(f"tube {i + 1} of {len(tubes)} {tubes[i].describe()} needs at least "
                      f"{'x'.join(map(str, tubes[i].min_size))}" for i in unfit)
    return (f"skipping tubes that do not fit a {clip} clip (0 tokens, no gradient for their kernels "
            f"from such clips): {names}. The smallest clip all tubes fit is {smallest} (T x H x W); "
            "model.unfit_tubes=error makes this an error")


def video_grids(tubes: list[TubeSpec], size: tuple[int, int, int],
                skip_unfit: bool = False) -> list[tuple[int, int, int]]:
    """Token grid of every tube on a (t, h, w) clip, in tube order.

    A tube that does not fit is a UserError naming it, or with `skip_unfit` a (0, 0, 0) grid
    (the tokenizer warns about it; this function does not).
    """
    grids = []
    for i, tube in enumerate(tubes):
        if skip_unfit and not tube.fits(size):
            grids.append((0, 0, 0))
            continue
        try:
            grids.append(tube.grid(size, name=f"tube {i + 1} of {len(tubes)}"))
        except UserError as exc:
            smallest = "x".join(str(max(t.min_size[a] for t in tubes)) for a in range(3))
            raise UserError(f"{exc}; the smallest clip all tubes fit is {smallest} (T x H x W); "
                            "or set the model option unfit_tubes=skip (the default) "
                            "to drop tubes that do not fit") from None
    if not any(math.prod(g) for g in grids):
        raise UserError(f"no tube fits a {'x'.join(map(str, size))} clip; tubes: "
                        + ", ".join(t.describe() for t in tubes))
    return grids


def image_grid(tubes: list[TubeSpec], size: tuple[int, int]) -> tuple[int, int, int]:
    """Token grid (1, nh, nw) of an image of `size` (h, w) through the image tube."""
    idx = image_tube_index(tubes)
    if idx is None:
        raise UserError(
            "this model's tubes have no 2D tube (a 1-frame kernel without space-to-depth), so it "
            f"cannot take images; its tubes: {', '.join(t.describe() for t in tubes)}"
        )
    tube = tubes[idx]
    _, nh, nw = tube.grid((1 + tube.offset[0], *size), name=f"image tube {idx + 1}")
    return (1, nh, nw)


def count_tokens(tubes, size: tuple[int, ...], skip_unfit: bool = False) -> int:
    """Tokens for a clip (t, h, w) or an image (h, w); `tubes` is a list or tube-set name."""
    tubes = resolve_tubes(tubes)
    if len(size) == 2:
        return math.prod(image_grid(tubes, size))
    return sum(math.prod(g) for g in video_grids(tubes, tuple(size), skip_unfit))


def tube_pixel_index(spec: TubeSpec, grid: tuple[int, int, int], volume: torch.Tensor) -> torch.Tensor:
    """(N, V) ids of the pixels each token of a tube reads, t-major like the tokenizer.

    `volume` (T, H, W) holds a pixel id per input position; V = prod(spec.span), each row
    in (t, h, w) order of the token's span (the kernel, or with space-to-depth the S
    neighbours' combined extent). Positions past the clip end (an S2D tube's last token,
    which the tokenizer zero-pads) get id -1. Masked modelling reads a token's target
    pixels and writes its reconstruction back through these ids (pretrain/model/mae.py).
    """
    extent = [(n - 1) * s + span for n, s, span in zip(grid, spec.stride, spec.span)]
    (ot, oh, ow), (et, eh, ew) = spec.offset, extent
    clip = volume[ot:ot + et, oh:oh + eh, ow:ow + ew]
    short = [e - have for e, have in zip(extent, clip.shape)]
    if any(short):
        clip = F.pad(clip, (0, short[2], 0, short[1], 0, short[0]), value=-1)
    for axis, (span, stride) in enumerate(zip(spec.span, spec.stride)):
        clip = clip.unfold(axis, span, stride)          # (nt, nh, nw, st, sh, sw) at the end
    return clip.reshape(math.prod(grid), math.prod(spec.span))


# ---- the tokenizer -------------------------------------------------------------------------

class TubeConv(nn.Module):
    """One tube: crop the offset, convolve at the tube's conv stride, pack S2D neighbours.

    Holds its own kernel (`weight`, shape (dim/S, 3, kt, kh, kw)) unless the tokenizer shares
    an interpolated one, and always its own `bias` (dim,).
    """

    def __init__(self, spec: TubeSpec, dim: int, in_chans: int = 3, own_weight: bool = True):
        super().__init__()
        self.spec = spec
        self.dim = dim
        self.out_channels = dim // spec.s2d_factor
        self.in_chans = in_chans
        if own_weight:
            self.weight = nn.Parameter(torch.empty(self.out_channels, in_chans, *spec.kernel))
        else:
            self.register_parameter("weight", None)
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int] | None = None,
                shared_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Video x (B,C,T,H,W) with its token grid, or images x (B,C,H,W) -> (B, n, dim).

        The weights are read here, inside this module's own call, so hooks that gather
        parameters around a module's forward (DeepSpeed ZeRO-3) see them used.
        """
        weight = self.weight if self.weight is not None else shared_weight
        if x.ndim == 4:
            return self._forward_image(x, weight)
        spec = self.spec
        # Crop to exactly the input the tube reads, so the conv yields exactly the grid.
        extent = [(n * spec.factor(a) - 1) * cs + k
                  for a, (n, cs, k) in enumerate(zip(grid, spec.conv_stride, spec.kernel))]
        (ot, oh, ow), (et, eh, ew) = spec.offset, extent
        clip = x[:, :, ot:ot + et, oh:oh + eh, ow:ow + ew]  # (B, C, <=et, <=eh, <=ew)
        short = [e - have for e, have in zip(extent, clip.shape[2:])]
        if any(short):  # only an S2D tube's last token can run past the clip end
            clip = F.pad(clip, (0, short[2], 0, short[1], 0, short[0]))
        y = F.conv3d(clip, weight, None, stride=spec.conv_stride)  # (B, dim/S, nt*ft, nh*fh, nw*fw)
        if spec.s2d_axis is not None:
            # The S = ft*fh*fw neighbours of each token -> S channel groups, neighbour-major with
            # neighbours in (t, h, w) lexicographic order; width back to dim. With s2d_outer
            # (e per axis, the finer positions) the outer groups run over e first: each holds
            # the token of the same tube with factors f/e (see TubeSpec).
            (nt, nh, nw), (ft, fh, fw) = grid, spec.factors
            et, eh, ew = spec.s2d_outer or (1, 1, 1)
            b, c = y.shape[:2]
            y = y.reshape(b, c, nt, ft // et, et, nh, fh // eh, eh, nw, fw // ew, ew)
            y = y.permute(0, 4, 7, 10, 3, 6, 9, 1, 2, 5, 8).reshape(b, c * ft * fh * fw, nt, nh, nw)
        y = y + self.bias.view(1, -1, 1, 1, 1)
        return y.flatten(2).transpose(1, 2)                # (B, nt*nh*nw, dim), t-major

    def _forward_image(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        _, oh, ow = spec.offset
        _, sh, sw = spec.stride
        y = F.conv2d(x[:, :, oh:, ow:], weight[:, :, 0], self.bias, stride=(sh, sw))  # (B, dim, nh, nw)
        return y.flatten(2).transpose(1, 2)                # (B, nh*nw, dim)


class SparseTubeTokenizer(nn.Module):
    """Videos (B,3,T,H,W) -> all tubes' tokens concatenated in tube order; images (B,3,H,W)
    -> the image tube's tokens. Returns (B, N, dim) without position embedding."""

    def __init__(
        self,
        tubes: list[TubeSpec],
        dim: int,
        kernel_mode: str = "separate",
        base_kernel: tuple[int, int, int] = (8, 8, 8),
        in_chans: int = 3,
        skip_unfit: bool = False,
    ):
        super().__init__()
        self.skip_unfit = skip_unfit
        self._warned: set[tuple[int, int, int]] = set()   # clip sizes already warned about
        self.specs = list(tubes)
        self.dim = dim
        self.in_chans = in_chans
        self.kernel_mode = kernel_mode
        self.image_index = image_tube_index(self.specs)
        shared = kernel_mode == "interpolated"
        if shared:
            self.base_kernel = nn.Parameter(torch.empty(dim, in_chans, *base_kernel))
        else:
            self.register_parameter("base_kernel", None)
        self.tubes = nn.ModuleList(TubeConv(s, dim, in_chans, own_weight=not shared) for s in self.specs)

    def kernel(self, i: int) -> torch.Tensor:
        """Tube i's conv weight (dim/S, 3, kt, kh, kw): its own, or the resized shared kernel."""
        tube = self.tubes[i]
        return tube.weight if tube.weight is not None else self._shared_kernel(i)

    def _shared_kernel(self, i: int) -> torch.Tensor | None:
        """Interpolated mode: the base kernel trilinearly resized to tube i's shape."""
        if self.base_kernel is None:
            return None
        shape = self.tubes[i].spec.kernel
        if tuple(self.base_kernel.shape[2:]) == shape:
            return self.base_kernel
        return F.interpolate(self.base_kernel, size=shape, mode="trilinear", align_corners=False)

    def grids(self, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """Token grids for an input of shape (B, C, T, H, W) or (B, C, H, W), in token order."""
        if len(shape) == 4:
            return [image_grid(self.specs, tuple(shape[2:]))]
        size = tuple(shape[2:])
        grids = video_grids(self.specs, size, self.skip_unfit)
        if self.skip_unfit and size not in self._warned:
            self._warned.add(size)
            unfit = unfit_tubes(self.specs, size)
            if unfit:
                warnings.warn(unfit_message(self.specs, size, unfit), UnfitTubeWarning, stacklevel=2)
        return grids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (4, 5) or x.shape[1] != self.in_chans:
            raise UserError(
                f"model input has shape {tuple(x.shape)}; expected a video (B, {self.in_chans}, T, H, W) "
                f"or an image batch (B, {self.in_chans}, H, W)"
            )
        grids = self.grids(tuple(x.shape))
        if x.ndim == 4:
            i = self.image_index
            return self.tubes[i](x, None, self._shared_kernel(i))      # (B, N_img, dim)
        tokens = [tube(x, grid, self._shared_kernel(i))
                  for i, (tube, grid) in enumerate(zip(self.tubes, grids)) if math.prod(grid)]
        return torch.cat(tokens, dim=1)                                 # (B, N_vid, dim)

    @torch.no_grad()
    def init_weights(self) -> None:
        # LeCun normal on each kernel (fan_in = in_chans * kernel volume), as ViT patch embeds.
        # ds_shape: the full shape of a parameter DeepSpeed ZeRO-3 has already partitioned.
        fan_in = lambda w: math.prod(getattr(w, "ds_shape", w.shape)[1:])  # noqa: E731
        for i, tube in enumerate(self.tubes):
            if tube.weight is not None:
                w = tube.weight
                nn.init.trunc_normal_(w, std=1.0 / math.sqrt(fan_in(w)))
            nn.init.zeros_(tube.bias)
        if self.base_kernel is not None:
            nn.init.trunc_normal_(self.base_kernel, std=1.0 / math.sqrt(fan_in(self.base_kernel)))


# ---- enlarging a trained model's kernels (the paper's Charades route) -----------------------

def enlarge_kernel(weight: torch.Tensor, shape, rescale: bool = True) -> torch.Tensor:
    """A tube kernel (out, C, kt, kh, kw) trilinearly resized (align_corners=False) to `shape`.

    With `rescale` the result is multiplied by old volume / new volume, so a kernel that is
    constant over its extent gives exactly the same response on a constant clip (and any
    kernel about the same on smooth input): a trained model's tokens keep their scale. The
    interpolated kernel mode's own resize (SparseTubeTokenizer) does not rescale; see the
    module docstring.
    """
    shape = _triple(shape, "kernel")
    if tuple(weight.shape[2:]) == shape:
        return weight.clone()
    out = F.interpolate(weight.double(), size=shape, mode="trilinear", align_corners=False)
    if rescale:
        out = out * (math.prod(weight.shape[2:]) / math.prod(shape))
    return out.to(weight.dtype)
