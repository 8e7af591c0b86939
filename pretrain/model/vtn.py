"""VTN, the Video Transformer Network (Neimark et al., 2021): an image ViT embeds every frame,
a Longformer-style temporal encoder reads the frame embeddings, a 2-layer MLP head classifies.

    model = create_model("vtn-b")                      # pretrain.model.registry
    logits = model(video, dataset="kinetics")          # (B, 3, 64..256, 224, 224) -> (B, 400)
    logits = model(images, dataset="imagenet")         # images are one-frame clips

Registered as vtn-s/-b/-l/-h over the ViT ladder of registry.SIZES; the temporal encoder has
the backbone's width, heads and MLP width and `temporal_depth` = 3 blocks (VTN's).

- Frame backbone: the plain image ViT of this system (vit.py blocks, timm's names): a 2D
  patch embedding of one frame (the `SparseTubeTokenizer` with one 1 x p x p tube, as
  TimeSformer's and ViViT's uniform-frame-sampling tokenizer), a learned spatial position
  table (`pos_embed.space`, sized for `img_size`, resampled like ViViT's), a CLS token,
  `depth` blocks and a final norm (`spatial_norm`). A frame's embedding is its CLS output
  (`spatial_pool=token`) or the mean of its patch tokens (`mean`). The names are ViViT model
  2's spatial encoder's, so an image ViT maps onto VTN as onto vivit-fe.
- Long clips, bounded memory: the backbone runs over `frame_chunk` frames at a time (of the
  batch's B x T frames, in order; 0 = all at once). Chunking gives the same result as one
  pass (tests/test_model_vtn.py). With activation checkpointing (`set_grad_checkpointing`)
  each chunk is one checkpoint: training keeps only the pixels and the per-frame embeddings
  of the whole clip and recomputes one chunk's backbone at a time in backward, so the
  backbone's activation memory is that of `frame_chunk` frames whatever the clip length
  (`activation_bytes` below; measured on CPU, vtn-s at 112 px, chunk 16: what autograd saves
  is 2.4 / 9.7 / 19.3 MiB at 16 / 64 / 128 frames, the pixels, against 230 / 920 / 1840 MiB
  without checkpointing). Without checkpointing, chunking bounds only the peak of
  inference (no_grad: eval, the frame-average baseline); training saves every chunk's
  activations for backward. The temporal blocks are checkpointed per block.
- Temporal encoder: the frame embeddings plus a learned time table (`pos_embed.time`, sized
  for `num_frames`: shorter clips take its first entries, longer ones stretch it) after a
  prepended CLS token (`temporal_cls_token`), through `temporal_depth` blocks with Longformer
  attention: a frame attends to the frames within `attention_window // 2` on either side
  (Longformer's window w: w/2 each side) and to the CLS token; the CLS token attends to and
  is attended by every frame (global attention). `attention_window` is one width for every
  temporal block or one per block (VTN: smaller windows low, larger high). The window is a
  boolean mask on `scaled_dot_product_attention`; a window that covers the clip passes no
  mask. The masked SDPA computes the dense (1 + nt)^2 scores (a few hundred frames: cheap
  next to the backbone), which is what flops.py counts; a banded kernel would do
  (1 + nt)(w + 1) + nt of them.
- Head: per dataset a 2-layer MLP on the final-normed CLS token (Linear dim -> head_hidden,
  GELU, dropout, Linear -> classes), VTN's mlp_head.
- Images (B, C, H, W) are one-frame clips (the temporal encoder sees CLS + one frame).
- The masked objective is refused: the backbone encodes whole frames and pools each to one
  vector, so a flat list of visible tubelet tokens (what mae.py gives an encoder) has no
  frames to encode, and there is no per-token output to reconstruct from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config_loader import config_field
from pretrain.errors import UserError
from pretrain.model.vit import Attention, Block
from pretrain.model.vivit import SPATIAL_POOLS, ClassToken, FactorisedPositions, VideoTransformer, VideoViTConfig


@dataclass
class VTNConfig(VideoViTConfig):
    """VTN (frame ViT + Longformer temporal encoder); the `model` section for vtn-*."""

    tubelet: tuple[int, int, int] = config_field(
        (1, 16, 16), "patch (1, h, w) of the frame backbone's 2D patch embedding (VTN's backbone "
        "sees one frame: t must be 1)", min=1)
    num_frames: int = config_field(
        256, "clip length the learned time table is sized for (shorter clips use its first "
        "entries, longer ones stretch it)", min=1)
    temporal_depth: int = config_field(3, "blocks of the temporal (Longformer) encoder (VTN: 3)", min=1)
    attention_window: tuple[int, ...] = config_field(
        (32,), "Longformer window w of the temporal encoder, in frames (a frame attends to w/2 "
        "on each side, and to the CLS token): one value for every temporal block or one per block",
        min=0)
    frame_chunk: int = config_field(
        16, "frames the backbone encodes at a time (with activation checkpointing: one "
        "checkpoint each); 0 = all frames at once", min=0)
    spatial_pool: str = config_field(
        "token", "a frame's embedding: the backbone's CLS token (token) or the mean of its patch "
        "tokens (mean)", choices=SPATIAL_POOLS)
    head_hidden: int = config_field(0, "hidden width of the 2-layer MLP head; 0 = dim", min=0)

    def __post_init__(self):
        super().__post_init__()
        self.attention_window = tuple(int(v) for v in self.attention_window)

    @property
    def windows(self) -> tuple[int, ...]:
        """The window of every temporal block."""
        w = self.attention_window
        return w * self.temporal_depth if len(w) == 1 else w

    def validate(self) -> None:
        super().validate()
        if self.tubelet[0] != 1:
            raise UserError(f"model config: VTN's frame backbone embeds one frame at a time; "
                            f"tubelet={self.tubelet} needs t = 1, e.g. (1, 16, 16)")
        if len(self.attention_window) not in (1, self.temporal_depth):
            raise UserError(f"model config: attention_window={list(self.attention_window)} needs one "
                            f"window, or one per temporal block ({self.temporal_depth})")


def window_mask(frames: int, window: int, device=None) -> torch.Tensor | None:
    """(1 + frames, 1 + frames) bool, True = may attend; CLS first: global attention for it,
    frame i sees frames j with |i - j| <= window // 2. None when that is everything."""
    if window // 2 >= frames - 1:
        return None
    i = torch.arange(frames, device=device)
    mask = torch.ones(1 + frames, 1 + frames, dtype=torch.bool, device=device)
    mask[1:, 1:] = (i[:, None] - i[None, :]).abs() <= window // 2
    return mask


class MaskedAttention(Attention):
    """vit.Attention with an optional boolean attention mask (True = attend)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # 3 x (B, h, N, hd)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class LongformerBlock(Block):
    """A pre-LN block whose attention takes the window mask: forward(x, mask)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, attn_layer=MaskedAttention, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MlpHead(nn.Sequential):
    """VTN's classification head: Linear, GELU, dropout, Linear."""

    def __init__(self, dim: int, hidden: int, classes: int, drop: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, classes))


class VTN(VideoTransformer):
    """Frame ViT (chunked) -> frame embeddings + time table -> Longformer encoder -> MLP head."""

    def activation_bytes(self, size: tuple[int, ...], micro_batch: int = 1, bytes_per: int = 2,
                         activation_checkpointing: bool = False) -> int:
        """What `pretrain plan` counts as activations for VTN (the module function below:
        with checkpointing, one chunk's backbone at a time, whatever the clip length)."""
        return activation_bytes(self, size, micro_batch, bytes_per, activation_checkpointing)

    def __init__(self, config: VTNConfig):
        super().__init__(config)
        c = config
        self.pos_embed = FactorisedPositions(c.pos_grid, c.dim)   # .space: backbone, .time: temporal
        self.cls_token = ClassToken(c.dim) if c.spatial_pool == "token" else None
        self.blocks = self._blocks(Block, c.depth)                # the frame backbone
        self.spatial_norm = self._norm()
        self.temporal_cls_token = ClassToken(c.dim)
        self.temporal_blocks = self._blocks(LongformerBlock, c.temporal_depth)
        self.norm = self._norm()
        self._finish()

    def _finish(self) -> None:
        c = self.config
        self.head_drop = nn.Dropout(c.drop_rate)
        hidden = c.head_hidden or c.dim
        self.heads = nn.ModuleDict({name: MlpHead(c.dim, hidden, n, c.drop_rate)
                                    for name, n in c.num_classes.items()})
        self.init_weights()

    # ---- the frame backbone ----------------------------------------------------------------

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (F, C, 1, H, W) -> their embeddings (F, d)."""
        z = self.tokenizer(frames)                                              # (F, ns, d)
        (_, nh, nw), = self.tokenizer.grids(tuple(frames.shape))
        F_, ns, d = z.shape
        z = self.pos_drop(self.pos_embed.space(z.view(F_, 1, ns, d), (1, nh, nw)).view(F_, ns, d))
        if self.cls_token is not None:
            z = self.cls_token(z)                                              # (F, 1+ns, d)
        for block in self.blocks:
            z = block(z)
        z = self.spatial_norm(z)
        return z[:, 0] if self.cls_token is not None else z.mean(1)            # (F, d)

    def frame_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> (B, nt, d): every frame through the backbone, `frame_chunk` at a time."""
        clip = self.as_clip(x)
        B, C, T, H, W = clip.shape
        frames = clip.transpose(1, 2).reshape(B * T, C, 1, H, W)               # frame-major
        chunk = self.config.frame_chunk or B * T
        out = []
        for part in frames.split(chunk):
            if self.grad_checkpointing and torch.is_grad_enabled():
                out.append(checkpoint(self.encode_frames, part, use_reentrant=False))
            else:
                out.append(self.encode_frames(part))
        return torch.cat(out).view(B, T, -1)

    # ---- forward -----------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + nt, d): the temporal encoder's output after the final norm, CLS first."""
        h = self.frame_embeddings(x)                                          # (B, nt, d)
        B, nt, d = h.shape
        h = self.pos_embed.time(h.view(B, nt, 1, d), (nt, 1, 1)).view(B, nt, d)
        h = self.temporal_cls_token(self.pos_drop(h))                         # (B, 1+nt, d)
        masks = {w: window_mask(nt, w, h.device) for w in set(self.config.windows)}
        for block, w in zip(self.temporal_blocks, self.config.windows):
            h = self._run(block, h, masks[w])
        return self.norm(h)

    def group_target_sizes(self) -> list[int]:
        raise UserError("VTN cannot be masked-pretrained: its backbone encodes whole frames and pools "
                        "each frame to one vector, so the visible tokens of a masked clip (a flat "
                        "list, no frames) have nothing to encode or reconstruct; use vivit-* with "
                        "class_token=false, videomae-* or tubevit-*")


def activation_bytes(model: VTN, size: tuple[int, ...], micro_batch: int = 1, bytes_per: int = 2,
                     activation_checkpointing: bool = False) -> int:
    """Activations VTN keeps for backward on one worker (memory.py's per-block accounting,
    9 N d + 2 N m per pre-LN block), for a clip (T, H, W) or an image (H, W).

    Without checkpointing every backbone block of every frame is saved (chunking does not
    change that); with it, the clip's pixels and per-frame embeddings, plus one chunk's whole
    backbone live during its recompute. The temporal encoder (1 + T tokens) and one block's
    workspace are added either way."""
    c = model.config
    T = size[0] if len(size) == 3 else 1
    H, W = size[-2:]
    ns = (H // c.tubelet[1]) * (W // c.tubelet[2]) + int(model.cls_token is not None)
    d, m = c.dim, c.mlp_dim

    def per_block(tokens):
        return (9 * tokens * d + 2 * tokens * m) * bytes_per

    frames = micro_batch * T
    chunk = min(c.frame_chunk or frames, frames)
    temporal = micro_batch * (c.temporal_depth + 1) * per_block(1 + T)
    pixels = micro_batch * c.in_chans * T * H * W * bytes_per
    if activation_checkpointing:
        backbone = frames * d * bytes_per + chunk * (c.depth + 1) * per_block(ns)
        temporal = micro_batch * (c.temporal_depth * (1 + T) * d * bytes_per + 2 * per_block(1 + T))
    else:
        backbone = frames * (c.depth + 1) * per_block(ns)
    return int(pixels + backbone + temporal)


__all__ = ["VTN", "VTNConfig", "LongformerBlock", "MaskedAttention", "MlpHead", "activation_bytes",
           "window_mask"]
