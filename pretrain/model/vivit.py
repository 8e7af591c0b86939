"""ViViT (Arnab et al., ICCV 2021) models 1-3 and TimeSformer (Bertasius et al., ICML 2021):
video ViTs over dense tubelet tokens that differ in how attention covers space and time.

    model = create_model("vivit-b")                    # pretrain.model.registry
    feats = model.forward_features(video)              # (B, 1 + 3136, 768) for 32x224x224
    logits = model(video, dataset="kinetics")          # (B, 400)
    logits = model(images, dataset="imagenet")         # images are one-frame clips

Families (registered as <family>-s/-b/-l/-h over the ViT ladder of registry.SIZES):

- `vivit-*`, model 1, joint space-time attention: tubelet tokens (+ a CLS token) through a
  plain ViT. Tubelet t x h x w, default 2x16x16 (ViViT-B/16x2): 32x224x224 -> 16x14x14 =
  3136 tokens; tubelet=(1, 16, 16) is ViViT's "uniform frame sampling" (a 2D patch
  embedding of every frame). Cost O((nt nh nw)^2).
- `vivit-fe-*`, model 2, factorised encoder: the spatial encoder (`blocks`, depth L_s) runs
  over the tokens of one temporal index at a time and gives one representation per index
  (its CLS token, or with spatial_pool=mean the mean of its tokens); a temporal encoder
  (`temporal_blocks`, temporal_depth L_t = 4 as the paper's FE) runs over those nt
  representations plus a temporal CLS token, which is classified. More parameters than
  model 1 (L_s + L_t blocks), fewer FLOPs: O(nt (nh nw)^2 + nt^2).
- `vivit-fsa-*`, model 3, factorised self-attention: every block runs spatial MSA (tokens of
  one temporal index), then temporal MSA (tokens of one spatial index), then the MLP, each
  with its own LayerNorm and residual. No CLS token: ViViT leaves it out of model 3 (which
  spatial or temporal sequence would it join?) and classifies the mean of the tokens.
- `timesformer-*`, divided space-time attention, TimeSformer's own details: 2D patches
  (tubelet 1x16x16), time first, then space; the temporal branch ends in its own linear
  `temporal_fc` before joining the residual stream; in the spatial step every frame's
  sequence gets a copy of the CLS token and the CLS token's update is the mean over frames;
  positions are a spatial table plus a time table; TimeSformer's init zeroes `temporal_fc`
  in every block but the first (zero_init_temporal_fc), so at init blocks 2.. are space-only.
  TimeSformer-B at 8x224x224: 1568 tokens, 121.4M parameters with a 174-class head (see
  tests/test_model_vivit.py for why that head).

What they share (`VideoTransformer`):
- The tubelet embedding is a `SparseTubeTokenizer` with one dense tube (as VideoMAE), so the
  tokenizer, its FLOP count, the token order (t-major, then h, then w) and the masked-
  modelling geometry are TubeViT's code; plan prints the tubelet as the model's one tube.
- Learned position embeddings (ViViT and TimeSformer both learn theirs), a table sized for
  the clip in the config (`num_frames` x `img_size`^2). ViViT models 1 and 3 learn one entry
  per space-time token (3136 at 32x224x224, what ViViT's parameter counts include); model 2
  and TimeSformer learn a spatial table and a temporal one. Other clip sizes: space is
  resampled (bicubic, antialiased when shrinking, as timm resizes an image ViT's table:
  a larger image covers the same field of view at a finer grid); time takes the first nt
  entries of a shorter clip (frames are sampled at a fixed stride, so temporal index i is
  the same time offset in a short clip as in a long one) and stretches the table linearly
  for a longer one (TimeSformer resizes its time table too). A CLS token's position is
  folded into the learned token itself (a learned vector plus a learned position is one
  learned vector).
- Images (B, C, H, W) are one-frame videos, so joint image+video training works for every
  family: with a one-frame tubelet (TimeSformer, uniform frame sampling) an image is one
  frame; with t > 1 it is repeated t times, as VideoMAE does (equal to a 2D patch embedding
  whose kernel is the sum of the tubelet's temporal slices). Either way an image gives one
  temporal index with the positions of a clip's first index; in the factorised families
  its temporal attention attends over that one index (softmax over one key: the value
  projection only), and model 2's temporal encoder sees the CLS token and one index.
- Per-dataset linear heads on the pooled token (CLS after the final norm, or the mean of the
  tokens without one), the forward signature and training hooks of TubeViT and VideoMAE
  (set_all_parameters_in_forward for ZeRO-3, set_grad_checkpointing per block,
  no_weight_decay, init_weights after a meta-device build). Every parameter lives in a
  module whose own forward reads it (positions, CLS tokens included), so ZeRO-3's gather
  hooks see them used.

Image-ViT layouts (pretrain/model/inflate.py inflates a timm ViT into these families):
`norm_pre` (a LayerNorm before the first block, CLIP-style), `final_norm` (tokens: the
usual norm on every token; pooled: after pooling instead, timm's fc_norm; none) and, for
models 1 and TimeSformer, `pool` (mean: the mean of the tokens after the CLS token, timm's
global_pool=avg). All default off, and to_dict() leaves them out at their defaults, so every
earlier architecture is unchanged. norm_pre and final_norm are vit.py's (`ImageNorms`: the
same fields and code as TubeViT's, which the image-to-video bootstrap sets). LayerScale is
not a module here: the inflation folds it into the linear layers
(image_vit_weights.fold_layer_scale). A family that does not apply these options (VTN)
refuses them (`image_norms`).

Masked pretraining (pretrain/model/mae.py): model 1 without a CLS token (`class_token:
false`) is VideoMAE's encoder with learned positions, and MaskedAutoencoder wraps it the
same way (tube masking, the decoder's 1D sin/cos positions). With its CLS token mae.py
refuses it (the masked encoder runs on a subset of the tube tokens only). Models 2, 3 and
TimeSformer are refused with a UserError: their attention reshapes the tokens into the
full (nt, nh nw) grid, which a subset of visible tokens is not, and mae.py hands the
encoder the visible tokens as a flat list with no grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import config_loader
from pretrain.config_loader import config_field
from pretrain.errors import UserError
from pretrain.model.family import ModelConfig
from pretrain.model.tubes import SparseTubeTokenizer, TubeSpec, video_grids
from pretrain.model.videomae import sinusoid_table
from pretrain.model.vit import (IMAGE_NORM_DEFAULTS, Attention, Block, DropPath, ImageNorms, Mlp,
                                drop_defaults, final_norm_field, head_name, idle_heads, init_linear_and_norm,
                                norm_pre_field)

SPATIAL_POOLS = ("token", "mean")
POOLS = ("auto", "token", "mean")
# Fields added for inflated image ViTs (pretrain/model/inflate.py): left out of to_dict() at
# their defaults, so stored architectures and checkpoint manifests of earlier versions match.
_OPTIONAL_AT_DEFAULT = {**IMAGE_NORM_DEFAULTS, "pool": "auto"}


# ---- configs ---------------------------------------------------------------------------------

@dataclass
class VideoViTConfig(ModelConfig):
    """What the ViViT and TimeSformer configs share (not a family of its own)."""

    depth: int = config_field(12, "transformer blocks (model 2: of the spatial encoder)", min=1)
    dim: int = config_field(768, "token width (a multiple of heads)", min=1)
    mlp_dim: int = config_field(3072, "MLP hidden width", min=1)
    heads: int = config_field(12, "attention heads", min=1)
    tubelet: tuple[int, int, int] = config_field(
        (2, 16, 16), "tubelet (t, h, w): kernel and stride of the tubelet embedding; t = 1 is "
        "uniform frame sampling", min=1)
    num_frames: int = config_field(
        32, "clip length the learned position table is sized for (shorter clips use its first "
        "temporal entries, longer ones stretch it)", min=1)
    img_size: int = config_field(
        224, "frame side the learned position table is sized for (other sizes resample it)", min=1)
    num_classes: dict[str, int] = config_field(
        help="dataset name -> classes; one linear head each, first = default", min=1,
        derived="an experiment's heads are the data section's datasets, set when the model is built",
        factory=lambda: {"kinetics": 400, "imagenet": 1000})
    in_chans: int = config_field(3, "input channels", min=1)
    qkv_bias: bool = config_field(True, "bias in the attention's query/key/value projection")
    norm_eps: float = config_field(1e-6, "LayerNorm epsilon", min=0.0)
    drop_rate: float = config_field(0.0, "dropout (positions, MLP/proj, head)", min=0.0, less_than=1.0)
    attn_drop_rate: float = config_field(0.0, "attention-probability dropout", min=0.0,
                                         less_than=1.0)
    drop_path_rate: float = config_field(0.0, "stochastic depth at the last block (linear ramp "
                                         "from 0 at the first)", min=0.0, less_than=1.0)
    norm_pre: bool = norm_pre_field("model 2: before its spatial encoder")
    final_norm: str = final_norm_field("model 2: its spatial encoder's norm; the temporal encoder "
                                       "always norms its tokens")

    def to_dict(self) -> dict:
        """The architecture; the inflation fields only when set (see _OPTIONAL_AT_DEFAULT)."""
        return drop_defaults(super().to_dict(), _OPTIONAL_AT_DEFAULT)

    def __post_init__(self):
        self.tubelet = tuple(int(v) for v in self.tubelet)
        self.num_classes = {str(k): int(v) for k, v in dict(self.num_classes).items()}

    @property
    def tube(self) -> TubeSpec:
        return TubeSpec(self.tubelet, self.tubelet)

    @property
    def tubes(self) -> list[TubeSpec]:
        """The tubelet embedding as the tokenizer's one tube (what TubeViT-generic code reads)."""
        return [self.tube]

    @property
    def patch_size(self) -> int:
        return self.tubelet[1]

    @property
    def pos_grid(self) -> tuple[int, int, int]:
        """(nt, nh, nw): the token grid of a num_frames x img_size x img_size clip."""
        t, h, w = self.tubelet
        return (self.num_frames // t, self.img_size // h, self.img_size // w)

    def validate(self) -> None:
        if self.dim % self.heads:
            raise UserError(f"model config: dim={self.dim} must be divisible by heads={self.heads}")
        if min(self.pos_grid) < 1:
            raise UserError(f"model config: the tubelet {self.tubelet} does not fit a num_frames="
                            f"{self.num_frames} x img_size={self.img_size} clip (the size the "
                            "learned positions are made for)")
        if not self.num_classes:
            raise UserError("model config: num_classes needs at least one dataset, e.g. {'kinetics': 400}")
        for name in self.num_classes:
            if not name or "." in name:   # a head's name is part of parameter names
                raise UserError(f"model config: num_classes entry {name!r} needs a non-empty name without '.'")


@dataclass
class ViViTConfig(VideoViTConfig):
    """ViViT model 1 (joint space-time attention); the `model` section for vivit-*."""

    class_token: bool = config_field(
        True, "prepend a learned CLS token and classify it (ViViT); false: classify the mean of "
        "the tokens (needed for masked pretraining and for an exact inflated image ViT)")
    pool: str = config_field(
        "auto", "what is classified: auto (the CLS token with class_token, else the mean of the "
        "tokens), token (the CLS token) or mean (the mean of the non-CLS tokens, timm's "
        "global_pool=avg)", choices=POOLS)

    def validate(self) -> None:
        super().validate()
        if self.pool == "token" and not self.class_token:
            raise UserError("model config: pool=token needs class_token=true")


@dataclass
class ViViTFEConfig(VideoViTConfig):
    """ViViT model 2 (factorised encoder); the `model` section for vivit-fe-*."""

    temporal_depth: int = config_field(4, "blocks of the temporal encoder (ViViT FE: 4)", min=1)
    spatial_pool: str = config_field(
        "token", "one representation per temporal index: the spatial encoder's CLS token "
        "(token) or the mean of its tokens (mean)", choices=SPATIAL_POOLS)


@dataclass
class ViViTFSAConfig(VideoViTConfig):
    """ViViT model 3 (factorised self-attention); the `model` section for vivit-fsa-*."""


@dataclass
class TimeSformerConfig(VideoViTConfig):
    """TimeSformer (divided space-time attention); the `model` section for timesformer-*."""

    tubelet: tuple[int, int, int] = config_field(
        (1, 16, 16), "patch (t, h, w): kernel and stride of the patch embedding (TimeSformer: "
        "2D 16x16 patches of every frame)", min=1)
    num_frames: int = config_field(
        8, "clip length the learned time table is sized for (TimeSformer-B: 8; shorter clips "
        "use its first entries, longer ones stretch it)", min=1)
    zero_init_temporal_fc: bool = config_field(
        True, "TimeSformer's init: temporal_fc of every block but the first starts at zero, so "
        "those blocks start as space-only attention")
    pool: str = config_field(
        "auto", "what is classified: auto or token (the CLS token) or mean (the mean of the "
        "patch tokens, timm's global_pool=avg)", choices=POOLS)


# ---- positions and the CLS token --------------------------------------------------------------

def resample_positions(table: torch.Tensor, grid: tuple[int, int, int],
                       spans_time: bool, spans_space: bool) -> torch.Tensor:
    """A learned table (t, h, w, d) -> its entries for a token grid (nt, nh, nw).

    Axes the table does not span (size 1: TimeSformer's spatial table has no time axis, its
    time table no spatial ones) stay 1 and broadcast. Space is resampled bicubically,
    antialiased when shrinking (timm's rule for an image ViT at another size); time is cut to
    the first nt entries, or stretched linearly when the clip has more (module docstring)."""
    t, h, w, d = table.shape
    nt, nh, nw = grid
    dtype = table.dtype
    if spans_space and (nh, nw) != (h, w):
        x = table.permute(0, 3, 1, 2).float()                                   # (t, d, h, w)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=nh < h or nw < w)
        table = x.permute(0, 2, 3, 1).to(dtype)                                 # (t, nh, nw, d)
    if spans_time and nt < t:
        table = table[:nt]
    elif spans_time and nt > t:
        _, hh, ww, _ = table.shape
        x = table.permute(1, 2, 3, 0).reshape(hh * ww, d, t).float()            # (h*w, d, t)
        x = F.interpolate(x, size=nt, mode="linear", align_corners=False)       # (h*w, d, nt)
        table = x.reshape(hh, ww, d, nt).permute(3, 0, 1, 2).to(dtype)          # (nt, h, w, d)
    return table


class LearnedPositions(nn.Module):
    """A learned position table over a (t, h, w) token grid, added to tokens (B, nt, nh*nw, d).

    `table` (1, t*h*w, d), t-major like the tokens (timm's (1, N, d) layout). A size-1 axis
    of `grid` is one the table does not span (it is shared along that axis)."""

    def __init__(self, grid: tuple[int, int, int], dim: int):
        super().__init__()
        self.grid = tuple(int(v) for v in grid)
        self.spans_time = self.grid[0] > 1
        self.spans_space = self.grid[1] * self.grid[2] > 1
        self.table = nn.Parameter(torch.empty(1, math.prod(self.grid), dim))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        d = x.shape[-1]
        pos = resample_positions(self.table.view(*self.grid, d), grid, self.spans_time, self.spans_space)
        return x + pos.reshape(pos.shape[0], pos.shape[1] * pos.shape[2], d).to(x.dtype)  # (B, nt, ns, d)


class FactorisedPositions(nn.Module):
    """A spatial table (`space`, one entry per patch position) and a temporal one (`time`,
    one per temporal index): TimeSformer's pos_embed + time_embed, ViViT FE's two encoders."""

    def __init__(self, grid: tuple[int, int, int], dim: int):
        super().__init__()
        nt, nh, nw = grid
        self.space = LearnedPositions((1, nh, nw), dim)
        self.time = LearnedPositions((nt, 1, 1), dim)


class ClassToken(nn.Module):
    """Prepends one learned token to every sequence: (B, n, d) -> (B, 1 + n, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.empty(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


# ---- factorised blocks --------------------------------------------------------------------------

def _space_major(x: torch.Tensor, nt: int, ns: int) -> torch.Tensor:
    """(B, nt*ns, d) t-major -> (B*ns, nt, d): one sequence per spatial index."""
    B, _, d = x.shape
    return x.view(B, nt, ns, d).transpose(1, 2).reshape(B * ns, nt, d)


def _time_major(x: torch.Tensor, B: int, nt: int, ns: int) -> torch.Tensor:
    """(B*ns, nt, d) -> (B, nt*ns, d) t-major (the inverse of _space_major)."""
    return x.view(B, ns, nt, -1).transpose(1, 2).reshape(B, nt * ns, -1)


class FactorisedBlock(nn.Module):
    """ViViT model 3: y = z + MSA_s(LN(z)) per temporal index; u = y + MSA_t(LN(y)) per spatial
    index; out = u + MLP(LN(u)). Input and output (B, nt*ns, d), t-major.

    The spatial half keeps timm's names (norm1, attn, norm2, mlp), so an image ViT's block
    maps onto it and the temporal MSA is the new part (`temporal_norm`, `temporal_attn`)."""

    # What backward keeps per token, in units of d (pretrain/train/memory.py): a plain
    # block's 9 plus the temporal MSA's norm in/out, q, k, v, attention out and proj in.
    saved_per_token_d = 16

    def __init__(self, dim, num_heads, mlp_dim, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.temporal_norm = norm_layer(dim)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_dim, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        nt, ns = grid
        B, N, d = x.shape
        s = x.reshape(B * nt, ns, d)                                          # per temporal index
        x = x + self.drop_path(self.attn(self.norm1(s))).view(B, N, d)
        t = _space_major(x, nt, ns)                                           # per spatial index
        x = x + _time_major(self.drop_path(self.temporal_attn(self.temporal_norm(t))), B, nt, ns)
        return x + self.drop_path(self.mlp(self.norm2(x)))                    # (B, N, d)


class DividedBlock(nn.Module):
    """TimeSformer's divided space-time block on (B, 1 + nt*ns, d), CLS first, t-major.

    Time first: x_t = x + temporal_fc(MSA_t(LN(x))) per spatial index (the CLS token takes
    no part). Then space: each temporal index's tokens with a copy of the CLS token go
    through MSA_s(LN(.)); the patch tokens add their result, the CLS token adds the mean of
    its copies' results over the frames. Then the MLP. Names are TimeSformer's (norm1, attn,
    temporal_norm1, temporal_attn, temporal_fc, norm2, mlp), spatial half timm's."""

    # Per token, in units of d (pretrain/train/memory.py): model 3's 16 plus temporal_fc's input.
    saved_per_token_d = 17

    def __init__(self, dim, num_heads, mlp_dim, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_dim, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        nt, ns = grid
        B, _, d = x.shape
        cls, xt = x[:, :1], x[:, 1:]                                          # (B, 1, d), (B, N, d)
        # Time: the tokens of one spatial index, across frames.
        t = self.drop_path(self.temporal_attn(self.temporal_norm1(_space_major(xt, nt, ns))))
        xt = xt + self.temporal_fc(_time_major(t, B, nt, ns))                 # (B, N, d)
        # Space: each frame's tokens plus a copy of the CLS token.
        s = torch.cat([cls.expand(B, nt, d).reshape(B * nt, 1, d), xt.reshape(B * nt, ns, d)], dim=1)
        s = self.drop_path(self.attn(self.norm1(s)))                          # (B*nt, 1+ns, d)
        cls_res = s[:, 0].view(B, nt, d).mean(1, keepdim=True)                # (B, 1, d)
        x = torch.cat([cls + cls_res, xt + s[:, 1:].reshape(B, nt * ns, d)], dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))                    # (B, 1+N, d)


# ---- what the families share ----------------------------------------------------------------

class VideoTransformer(ImageNorms, nn.Module):
    """Tubelet tokens, heads, the forward signature and the training hooks of the four
    families; a subclass builds its positions and blocks, then calls `_finish()`."""

    accepts_images = True   # one-frame clips (as_clip)
    pooling = "token"       # "token": classify features[:, 0]; "mean": the mean of the tokens
    num_prefix_tokens = 0   # leading CLS tokens that "mean" pooling leaves out
    image_norms = False     # whether the subclass applies config.norm_pre and config.final_norm

    def __init__(self, config: VideoViTConfig):
        super().__init__()
        config_loader.check(config, source=f"the {type(self).__name__} config")
        if not self.image_norms and (config.norm_pre or config.final_norm != "tokens"):
            raise UserError(f"{type(self).__name__} does not implement model.norm_pre / model.final_norm "
                            "(the inflated image ViT layouts of ViViT and TimeSformer); leave them at "
                            "false / tokens")
        self.config = config
        self.tokenizer = SparseTubeTokenizer([config.tube], config.dim, in_chans=config.in_chans)
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.norm_pre = self._pre_norm()
        self.grad_checkpointing = False
        self.all_parameters_in_forward = False

    def _blocks(self, block_type, depth: int) -> nn.ModuleList:
        c = self.config
        dpr = [c.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm = lambda d: nn.LayerNorm(d, eps=c.norm_eps)  # noqa: E731
        return nn.ModuleList(
            block_type(c.dim, c.heads, c.mlp_dim, qkv_bias=c.qkv_bias, proj_drop=c.drop_rate,
                       attn_drop=c.attn_drop_rate, drop_path=dpr[i], norm_layer=norm)
            for i in range(depth))

    def _finish(self) -> None:
        """Heads last (module order = state-dict and init order), then the initialisation."""
        c = self.config
        self.head_drop = nn.Dropout(c.drop_rate)
        self.heads = nn.ModuleDict({name: nn.Linear(c.dim, n) for name, n in c.num_classes.items()})
        self.init_weights()

    @property
    def datasets(self) -> list[str]:
        return list(self.heads.keys())

    # ---- input ---------------------------------------------------------------------------

    def as_clip(self, x: torch.Tensor) -> torch.Tensor:
        """Video (B,C,T,H,W) unchanged; images (B,C,H,W) repeated to a tubelet-deep clip."""
        if x.ndim == 5:
            return x
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise UserError(f"model input has shape {tuple(x.shape)}; expected a video (B, "
                            f"{self.config.in_chans}, T, H, W) or an image batch (B, {self.config.in_chans}, H, W)")
        return x.unsqueeze(2).expand(-1, -1, self.config.tubelet[0], -1, -1)

    def _clip_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape) if len(shape) == 5 else (*shape[:2], self.config.tubelet[0], *shape[2:])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Input -> tubelet tokens (B, nt, nh*nw, d) without positions, and the grid (nt, nh, nw)."""
        clip = self.as_clip(x)
        grid = self.tokenizer.grids(tuple(clip.shape))[0]
        tokens = self.tokenizer(clip)                                          # (B, N, d), t-major
        return tokens.view(tokens.shape[0], grid[0], grid[1] * grid[2], -1), grid

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        """One block, its activations recomputed in backward when checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- forward -------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n, d) features -> (B, d): the CLS token (first), or the mean of the tokens after
        any CLS token; then the final norm when it is on the pooled token (final_norm=pooled)."""
        pooled = features[:, 0] if self.pooling == "token" else features[:, self.num_prefix_tokens:].mean(1)
        return self._pooled_norm(self.norm, pooled)

    def forward_head(self, features: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        return self.heads[self._dataset(dataset)](self.head_drop(self.pool_tokens(features)))

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        name = self._dataset(dataset)   # fail before the expensive part
        pooled = self.head_drop(self.pool_tokens(self.forward_features(x)))   # (B, d)
        logits = self.heads[name](pooled)
        if self.all_parameters_in_forward and self.training and torch.is_grad_enabled():
            # Only the other heads idle: images use every layer of these families.
            logits = logits + 0.0 * idle_heads(self.heads, name, pooled)
        return logits

    def set_all_parameters_in_forward(self, enable: bool = True) -> None:
        """Every parameter takes part in each training forward (the idle heads with zero weight)."""
        self.all_parameters_in_forward = enable

    def _dataset(self, dataset: str | None) -> str:
        return head_name(self.heads, dataset)

    # ---- token geometry (flops.py; the masked-modelling interface of ViViT) ---------------

    def token_groups(self, shape: tuple[int, ...]) -> list[tuple[int, TubeSpec, tuple[int, int, int]]]:
        """One group: the tubelet grid on the input (an image: on its tubelet-deep clip)."""
        return [(0, self.config.tube, video_grids([self.config.tube], tuple(self._clip_shape(shape)[2:]))[0])]

    def pixel_volume(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(T, H, W) pixel ids; an image's repeated frames share its ids."""
        if len(shape) == 5:
            return torch.arange(math.prod(shape[2:])).view(tuple(shape[2:]))
        ids = torch.arange(math.prod(shape[2:])).view(1, *shape[2:])
        return ids.expand(self.config.tubelet[0], -1, -1)

    def group_target_sizes(self) -> list[int]:
        # The first thing MaskedAutoencoder asks of an encoder: refuse here, with the reason.
        raise UserError(f"{type(self).__name__} cannot be masked-pretrained: its factorised attention "
                        "reshapes the tokens into the full (time, space) grid, which the visible "
                        "tokens are not; use vivit-* with class_token=false, videomae-* or tubevit-*")

    # ---- training hooks ------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Biases and norms (1-dim parameters), position tables and CLS tokens (as timm)."""
        return {n for n, p in self.named_parameters()
                if len(getattr(p, "ds_shape", p.shape)) <= 1 or n.startswith("pos_embed.")
                or n.endswith("cls_token.token")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter (no-op on meta tensors); deterministic under the seed.
        ViT's init: linears truncated normal 0.02, positions and CLS tokens 0.02 (ViViT's and
        TimeSformer's), tubelet kernels LeCun normal (the tokenizer's)."""
        self.tokenizer.init_weights()
        init_linear_and_norm(self)
        for m in self.modules():
            if isinstance(m, LearnedPositions):
                nn.init.trunc_normal_(m.table, std=0.02)
            elif isinstance(m, ClassToken):
                nn.init.trunc_normal_(m.token, std=0.02)


# ---- the four families -------------------------------------------------------------------------

class ViViT(VideoTransformer):
    """Model 1: joint space-time attention over all tubelet tokens (+ CLS)."""

    image_norms = True

    def __init__(self, config: ViViTConfig):
        super().__init__(config)
        c = config
        self.pos_embed = LearnedPositions(c.pos_grid, c.dim)
        self.cls_token = ClassToken(c.dim) if c.class_token else None
        self.pooling = c.pool if c.pool != "auto" else "token" if c.class_token else "mean"
        self.num_prefix_tokens = int(c.class_token)
        self.blocks = self._blocks(Block, c.depth)
        self.norm = self._final_norm()
        self._finish()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> (B, N, dim) tubelet tokens with their positions, t-major (no CLS)."""
        z, grid = self.embed(x)                                                # (B, nt, ns, d)
        return self.pos_drop(self.pos_embed(z, grid).flatten(1, 2))            # (B, N, d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, n, dim), all or any subset of `tokens(x)` -> (CLS +) norm_pre + blocks +
        final norm (on tokens; with final_norm=pooled it comes after pooling)."""
        if self.cls_token is not None:
            x = self.cls_token(x)                                              # (B, 1+n, d)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = self._run(block, x)
        return self._token_norm(self.norm, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, [1+]N, d) after the final norm (unless it is on the pooled token), CLS first
        when the model has one."""
        return self.encode(self.tokens(x))

    # Masked modelling (mae.py) with class_token=false: VideoMAE's geometry and decoder positions.
    def group_target_sizes(self) -> list[int]:
        return [self.config.in_chans * math.prod(self.config.tubelet)]

    def position_table(self, shape: tuple[int, ...], dim: int) -> torch.Tensor:
        """(N, dim) float64: the decoder's positions, VideoMAE's 1D sin/cos table at width `dim`."""
        return sinusoid_table(math.prod(self.token_groups(shape)[0][2]), dim)


class ViViTFE(VideoTransformer):
    """Model 2: spatial encoder per temporal index, one representation each, temporal encoder."""

    image_norms = True

    def __init__(self, config: ViViTFEConfig):
        super().__init__(config)
        c = config
        self.pos_embed = FactorisedPositions(c.pos_grid, c.dim)  # .space: spatial encoder, .time: temporal
        self.cls_token = ClassToken(c.dim) if c.spatial_pool == "token" else None
        self.blocks = self._blocks(Block, c.depth)               # the spatial encoder
        self.spatial_norm = self._final_norm()                   # config.final_norm applies here
        self.temporal_cls_token = ClassToken(c.dim)
        self.temporal_blocks = self._blocks(Block, c.temporal_depth)
        self.norm = self._norm()
        self._finish()

    def spatial_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nt, [1+]ns, d): the spatial encoder's output per temporal index (CLS first when
        spatial_pool=token), after its norm unless final_norm puts that on the pooled token."""
        z, (nt, nh, nw) = self.embed(x)                                        # (B, nt, ns, d)
        B, _, ns, d = z.shape
        z = self.pos_drop(self.pos_embed.space(z, (nt, nh, nw))).reshape(B * nt, ns, d)
        if self.cls_token is not None:
            z = self.cls_token(z)                                              # (B*nt, 1+ns, d)
        z = self.norm_pre(z)
        for block in self.blocks:
            z = self._run(block, z)
        z = self._token_norm(self.spatial_norm, z)
        return z.reshape(B, nt, z.shape[1], d)

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nt, d) -> (B, d): the temporal CLS token (the temporal encoder norms its tokens)."""
        return features[:, 0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nt, d): the temporal encoder's output, its CLS token first."""
        z = self.spatial_features(x)                                           # (B, nt, [1+]ns, d)
        B, nt, _, d = z.shape
        h = z[:, :, 0] if self.cls_token is not None else z.mean(2)            # (B, nt, d)
        h = self._pooled_norm(self.spatial_norm, h)
        h = self.pos_embed.time(h.view(B, nt, 1, d), (nt, 1, 1)).view(B, nt, d)
        h = self.temporal_cls_token(h)                                         # (B, 1+nt, d)
        for block in self.temporal_blocks:
            h = self._run(block, h)
        return self.norm(h)


class ViViTFSA(VideoTransformer):
    """Model 3: blocks of spatial MSA, temporal MSA, MLP; mean-pooled (no CLS token)."""

    image_norms = True

    pooling = "mean"

    def __init__(self, config: ViViTFSAConfig):
        super().__init__(config)
        c = config
        self.pos_embed = LearnedPositions(c.pos_grid, c.dim)
        self.blocks = self._blocks(FactorisedBlock, c.depth)
        self.norm = self._final_norm()
        self._finish()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) after the final norm, t-major."""
        z, (nt, nh, nw) = self.embed(x)
        z = self.norm_pre(self.pos_drop(self.pos_embed(z, (nt, nh, nw)).flatten(1, 2)))  # (B, N, d)
        for block in self.blocks:
            z = self._run(block, z, (nt, nh * nw))
        return self._token_norm(self.norm, z)


class TimeSformer(VideoTransformer):
    """Divided space-time attention (time first, temporal_fc, CLS averaged over frames)."""

    image_norms = True

    def __init__(self, config: TimeSformerConfig):
        super().__init__(config)
        c = config
        self.pos_embed = FactorisedPositions(c.pos_grid, c.dim)  # .space = pos_embed, .time = time_embed
        self.cls_token = ClassToken(c.dim)
        self.pooling = "mean" if c.pool == "mean" else "token"
        self.num_prefix_tokens = 1
        self.blocks = self._blocks(DividedBlock, c.depth)
        self.norm = self._final_norm()
        self._finish()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, d) after the final norm, CLS first, then t-major tokens."""
        z, grid = self.embed(x)                                                # (B, nt, ns, d)
        z = self.pos_embed.time(self.pos_embed.space(z, grid), grid)
        z = self.norm_pre(self.cls_token(self.pos_drop(z).flatten(1, 2)))     # (B, 1+N, d)
        nt, nh, nw = grid
        for block in self.blocks:
            z = self._run(block, z, (nt, nh * nw))
        return self._token_norm(self.norm, z)

    @torch.no_grad()
    def init_weights(self) -> None:
        """ViT's init, then TimeSformer's: the time table at zero (its time_embed starts at
        zeros) and, with zero_init_temporal_fc, temporal_fc zero in every block but the first."""
        super().init_weights()
        nn.init.zeros_(self.pos_embed.time.table)
        if self.config.zero_init_temporal_fc:
            for block in list(self.blocks)[1:]:
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)
