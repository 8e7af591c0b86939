"""Pre-LN ViT building blocks: Attention, Mlp, DropPath, Block, AttentionPool, TanhGate; what
every family does with its per-dataset heads (`head_name`, `idle_heads`); and the image-ViT
norm layouts an imported image ViT may have (`ImageNorms`: timm's norm_pre and final norm).

Submodule names follow timm's `vision_transformer.py` (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2), so an image ViT's weights map onto `blocks.N.*` without renaming, and a
Block takes its layer types as arguments instead of being subclassed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config_loader import config_field
from pretrain.errors import UserError


class Attention(nn.Module):
    """Global multi-head self-attention over all tokens (no factorisation)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # 3 x (B, h, N, hd)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # (B, h, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)                             # (B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """y = x + MSA(LN(x)); z = y + MLP(LN(y))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        act_layer=nn.GELU,
        attn_layer=Attention,
        mlp_layer=Mlp,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, mlp_dim, act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))   # (B, N, d)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))    # (B, N, d)
        return x


class TanhGate(nn.Module):
    """The bootstrap's gated skip: z_s = block_s(...) + tanh(alpha) * z_0, alpha init 0.

    At alpha = 0 the model computes exactly what it computed without the gate. alpha has
    shape (1,), not (): DeepSpeed ZeRO-3 cannot partition 0-dim parameters (files written
    with a 0-dim alpha still load).
    """

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "alpha"
        if key in state_dict and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.alpha) * z0


class AttentionPool(nn.Module):
    """One learned query attends over all tokens (no CLS token): (B, N, d) -> (B, d)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.query).reshape(1, 1, self.num_heads, self.head_dim)   # (1, 1, h, hd)
        q = q.transpose(1, 2).expand(B, -1, -1, -1)                          # (B, h, 1, hd)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim)      # (B, N, 2, h, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                           # 2 x (B, h, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)                         # (B, h, 1, hd)
        return self.proj(out.reshape(B, C))                                   # (B, d)


@torch.no_grad()
def init_linear_and_norm(module: nn.Module) -> None:
    """ViT init of every Linear (truncated normal, std 0.02; zero bias) and LayerNorm (ones,
    zeros) inside `module`, in module order (so a seed gives the same weights)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def head_name(heads: nn.ModuleDict, dataset: str | None) -> str:
    """The dataset whose head a forward uses: `dataset`, or the only one when None; a
    UserError naming the heads otherwise (before any expensive work)."""
    if dataset is None:
        if len(heads) == 1:
            return next(iter(heads))
        raise UserError(f"this model has several heads; pass dataset= one of: {', '.join(heads)}")
    if dataset not in heads:
        raise UserError(f"dataset {dataset!r} has no head in this model; its heads: {', '.join(heads)}")
    return dataset


def idle_heads(heads: nn.ModuleDict, used: str, pooled: torch.Tensor) -> torch.Tensor:
    """The other datasets' heads on `pooled`, summed: a training forward adds this with weight
    0 so every head gets a (zero) gradient. ZeRO-3 would otherwise reuse an idle head's stale
    gradient partition (TubeViT.set_all_parameters_in_forward says more)."""
    return sum((h(pooled).sum() for n, h in heads.items() if n != used), pooled.new_zeros(()))


# ---- image-ViT norm layouts (timm's norm_pre and final norm) ----------------------------------
# What an imported timm ViT (pretrain/model/image_vit_weights.py) may have around its blocks:
# a LayerNorm before the first block (norm_pre, CLIP-style) and its last norm on every token
# (norm), on the pooled token (fc_norm) or none. The families that import image ViTs (TubeViT
# by bootstrap.py, the vivit.py families by inflate.py) take the same two config fields and
# build them with ImageNorms, so both reproduce every layout the same way.

FINAL_NORMS = ("tokens", "pooled", "none")
# Left out of to_dict() at these values: stored architectures and checkpoint manifests written
# before the fields existed then match (a resume compares them) and load with the defaults.
IMAGE_NORM_DEFAULTS = {"norm_pre": False, "final_norm": "tokens"}


def norm_pre_field(note: str = ""):
    """The `norm_pre` config field; `note` says where the family puts it."""
    return config_field(
        False, "a LayerNorm on the tokens (+ CLS, + positions) before the first block (timm's "
        f"norm_pre, CLIP-style image ViTs{'; ' + note if note else ''})")


def final_norm_field(note: str = ""):
    """The `final_norm` config field; `note` says what the family's choices mean for it."""
    return config_field(
        "tokens", "the last LayerNorm: on every output token (tokens, timm's norm), on the pooled "
        "token instead (pooled, timm's fc_norm with global_pool=avg), or none"
        f"{' (' + note + ')' if note else ''}", choices=FINAL_NORMS)


def drop_defaults(d: dict, defaults: dict) -> dict:
    """`d` without the keys of `defaults` that hold their default value (see IMAGE_NORM_DEFAULTS)."""
    return {k: v for k, v in d.items() if k not in defaults or v != defaults[k]}


class ImageNorms:
    """Mixed into a model whose config has dim, norm_eps, norm_pre and final_norm: builds and
    applies the norms of FINAL_NORMS and norm_pre (TubeViT, vivit.VideoTransformer)."""

    config: object

    def _norm(self) -> nn.LayerNorm:
        return nn.LayerNorm(self.config.dim, eps=self.config.norm_eps)

    def _pre_norm(self) -> nn.Module:
        """timm's norm_pre: a LayerNorm, or an Identity (no parameters, no state) unless asked
        for, so models without it keep their state dicts."""
        return self._norm() if self.config.norm_pre else nn.Identity()

    def _final_norm(self) -> nn.Module:
        """The image side's last norm (config.final_norm): a LayerNorm, or Identity for none."""
        return nn.Identity() if self.config.final_norm == "none" else self._norm()

    def _token_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`norm` on every token when final_norm is "tokens"; else the tokens as they are."""
        return norm(x) if self.config.final_norm == "tokens" else x

    def _pooled_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`norm` on a pooled token when final_norm is "pooled" (timm's fc_norm)."""
        return norm(x) if self.config.final_norm == "pooled" else x
