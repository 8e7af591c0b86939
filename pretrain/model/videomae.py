"""VideoMAE's backbone (Tong et al., NeurIPS 2022): a plain ViT over dense 2x16x16 cubes.

    model = create_model("videomae-b")                 # pretrain.model.registry
    feats = model.forward_features(video)              # (B, 1568, 768) for 16x224x224
    logits = model(video, dataset="kinetics")          # mean-pool + fc_norm + linear head

- Cube embedding: one 3D convolution, kernel = stride = `tubelet` (2, 16, 16): 8x14x14 = 1568
  tokens on 16x224x224. It is a `SparseTubeTokenizer` with a single dense tube, so the
  tokenizer, its FLOP count and the masked-modelling geometry are TubeViT's code.
- Joint space-time attention over all tokens: the same pre-LN `Block`s as TubeViT.
- Position embedding: VideoMAE's fixed 1D sin/cos table over the flattened (t-major) token
  index, `angle(n, j) = n / 10000 ** (2 * (j // 2) / d)`, sin on even channels, cos on odd
  ones (VideoMAE's `get_sinusoid_encoding_table`). It is a function of the token index only,
  as in VideoMAE, so another clip size gets the table of its own token count.
- Head: mean over tokens, then `fc_norm` (LayerNorm), then one linear head per dataset, as
  VideoMAE fine-tunes. `forward_features` ends with the final `norm` (the pretraining
  encoder's output, what the masked autoencoder's decoder reads); VideoMAE's fine-tuning
  model replaces that norm by fc_norm after pooling, here both are kept so one module serves
  pretraining and fine-tuning without renaming weights.
- Images: a cube is 2 frames deep, so an image (B, C, H, W) is repeated to a 2-frame clip
  (VideoMAE-style image handling; it equals a 2D patch embedding whose kernel is the sum of
  the two temporal slices). An image gives 14x14 = 196 tokens at 224 px with the positions of
  a clip's first cube slice. `tubelet[0] == 1` takes the image as a single frame instead.

Sizes (registry): S/B/L/H are the ViT ladder; at 16x224x224 the parameter counts are about
22M / 87M / 305M / 633M and ViT-B's forward 180 GMACs = 360 GFLOPs (flops.py's convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import config_loader
from pretrain.config_loader import config_field
from pretrain.errors import UserError
from pretrain.model.family import ModelConfig
from pretrain.model.tubes import SparseTubeTokenizer, TubeSpec, video_grids
from pretrain.model.vit import Block, head_name, idle_heads, init_linear_and_norm


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) float64: VideoMAE's 1D sin/cos table of positions 0..n-1."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]                     # (n, 1)
    j = torch.arange(dim, dtype=torch.float64)
    angles = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (n, dim)
    out = angles.clone()
    out[:, 0::2] = torch.sin(angles[:, 0::2])
    out[:, 1::2] = torch.cos(angles[:, 1::2])
    return out


@dataclass
class VideoMAEConfig(ModelConfig):
    """Architecture of a VideoMAE backbone; the experiment's `model` section for videomae-*."""

    depth: int = config_field(12, "transformer blocks", min=1)
    dim: int = config_field(768, "token width (a multiple of heads)", min=1)
    mlp_dim: int = config_field(3072, "MLP hidden width", min=1)
    heads: int = config_field(12, "attention heads", min=1)
    tubelet: tuple[int, int, int] = config_field(
        (2, 16, 16), "cube (t, h, w): kernel and stride of the cube embedding", min=1)
    num_classes: dict[str, int] = config_field(
        help="dataset name -> classes; one linear head each, first = default", min=1,
        derived="an experiment's heads are the data section's datasets, set when the model is built",
        factory=lambda: {"kinetics": 400, "imagenet": 1000})
    in_chans: int = config_field(3, "input channels", min=1)
    qkv_bias: bool = config_field(True, "bias in the attention's query/key/value projection")
    norm_eps: float = config_field(1e-6, "LayerNorm epsilon", min=0.0)
    drop_rate: float = config_field(0.0, "dropout (MLP/proj, head)", min=0.0, less_than=1.0)
    attn_drop_rate: float = config_field(0.0, "attention-probability dropout", min=0.0,
                                         less_than=1.0)
    drop_path_rate: float = config_field(0.0, "stochastic depth at the last block (linear ramp "
                                         "from 0 at the first)", min=0.0, less_than=1.0)

    def __post_init__(self):
        self.tubelet = tuple(int(v) for v in self.tubelet)
        self.num_classes = {str(k): int(v) for k, v in dict(self.num_classes).items()}

    @property
    def tube(self) -> TubeSpec:
        return TubeSpec(self.tubelet, self.tubelet)

    @property
    def tubes(self) -> list[TubeSpec]:
        """The cube embedding as the tokenizer's one tube (what TubeViT-generic code reads)."""
        return [self.tube]

    @property
    def patch_size(self) -> int:
        return self.tubelet[1]

    def validate(self) -> None:
        if self.dim % self.heads:
            raise UserError(f"model config: dim={self.dim} must be divisible by heads={self.heads}")
        if not self.num_classes:
            raise UserError("model config: num_classes needs at least one dataset, e.g. {'kinetics': 400}")
        for name in self.num_classes:
            if not name or "." in name:
                raise UserError(f"model config: num_classes entry {name!r} needs a non-empty name without '.'")


class MeanPool(nn.Module):
    """Mean over tokens, then LayerNorm (VideoMAE's fc_norm): (B, N, d) -> (B, d)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(x.mean(1))


class VideoMAE(nn.Module):
    def __init__(self, config: VideoMAEConfig):
        super().__init__()
        config_loader.check(config, source="the VideoMAE config")
        self.config = c = config
        self.tokenizer = SparseTubeTokenizer([c.tube], c.dim, in_chans=c.in_chans)
        norm = lambda d: nn.LayerNorm(d, eps=c.norm_eps)  # noqa: E731
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, qkv_bias=c.qkv_bias, proj_drop=c.drop_rate,
                  attn_drop=c.attn_drop_rate, drop_path=dpr[i], norm_layer=norm)
            for i in range(c.depth))
        self.norm = norm(c.dim)
        self.pool = MeanPool(c.dim, c.norm_eps)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.heads = nn.ModuleDict({name: nn.Linear(c.dim, n) for name, n in c.num_classes.items()})
        self.grad_checkpointing = False
        self.all_parameters_in_forward = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.init_weights()

    @property
    def datasets(self) -> list[str]:
        return list(self.heads.keys())

    # ---- input ---------------------------------------------------------------------------

    accepts_images = True   # repeated to a cube-deep clip (as_clip)

    def as_clip(self, x: torch.Tensor) -> torch.Tensor:
        """Video (B,C,T,H,W) unchanged; images (B,C,H,W) repeated to a cube-deep clip."""
        if x.ndim == 5:
            return x
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise UserError(f"model input has shape {tuple(x.shape)}; expected a video (B, "
                            f"{self.config.in_chans}, T, H, W) or an image batch (B, {self.config.in_chans}, H, W)")
        return x.unsqueeze(2).expand(-1, -1, self.config.tubelet[0], -1, -1)

    def _clip_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape) if len(shape) == 5 else (*shape[:2], self.config.tubelet[0], *shape[2:])

    # ---- forward -------------------------------------------------------------------------

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> (B, N, dim) cube tokens plus the fixed 1D sin/cos table."""
        t = self.tokenizer(self.as_clip(x))                                # (B, N, d)
        key = (t.shape[1], str(t.device), t.dtype)
        pos = self._pos_cache.get(key)
        if pos is None:
            pos = self._pos_cache[key] = sinusoid_table(t.shape[1], self.config.dim).to(t.device, t.dtype)
        return t + pos                                                      # (B, N, d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, n, dim), all or any subset of `tokens(x)` -> after blocks and final norm."""
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.tokens(x))

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool(features)

    def forward_head(self, features: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        return self.heads[self._dataset(dataset)](self.head_drop(self.pool(features)))

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        name = self._dataset(dataset)
        pooled = self.head_drop(self.pool(self.forward_features(x)))       # (B, d)
        logits = self.heads[name](pooled)
        if self.all_parameters_in_forward and self.training and torch.is_grad_enabled():
            logits = logits + 0.0 * idle_heads(self.heads, name, pooled)
        return logits

    def set_all_parameters_in_forward(self, enable: bool = True) -> None:
        """Every parameter takes part in each training forward (the idle heads with zero weight)."""
        self.all_parameters_in_forward = enable

    def _dataset(self, dataset: str | None) -> str:
        return head_name(self.heads, dataset)

    # ---- the masked-modelling interface (pretrain/model/mae.py) -------------------------

    def token_groups(self, shape: tuple[int, ...]) -> list[tuple[int, TubeSpec, tuple[int, int, int]]]:
        """One group: the cube grid on the input (an image: on its 2-frame clip)."""
        return [(0, self.config.tube, video_grids([self.config.tube], tuple(self._clip_shape(shape)[2:]))[0])]

    def pixel_volume(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(T, H, W) pixel ids; an image's repeated frames share its ids."""
        if len(shape) == 5:
            return torch.arange(math.prod(shape[2:])).view(tuple(shape[2:]))
        ids = torch.arange(math.prod(shape[2:])).view(1, *shape[2:])
        return ids.expand(self.config.tubelet[0], -1, -1)

    def group_target_sizes(self) -> list[int]:
        return [self.config.in_chans * math.prod(self.config.tubelet)]

    def position_table(self, shape: tuple[int, ...], dim: int) -> torch.Tensor:
        """(N, dim) float64: the decoder's positions, VideoMAE's 1D table at width `dim`."""
        n = math.prod(self.token_groups(shape)[0][2])
        return sinusoid_table(n, dim)

    # ---- training hooks --------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Biases and norms (1-dim parameters)."""
        return {n for n, p in self.named_parameters() if len(getattr(p, "ds_shape", p.shape)) <= 1}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter (no-op on meta tensors); deterministic under the seed."""
        self.tokenizer.init_weights()
        init_linear_and_norm(self)
