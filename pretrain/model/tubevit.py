"""TubeViT: sparse tube tokenizer + fixed position embedding + pre-LN ViT + attention pool +
one linear head per dataset.

    model = create_model("tubevit-b")                  # pretrain.model.registry
    feats = model.forward_features(video)              # (B, 539, 768) for 32x224x224
    logits = model(video, dataset="kinetics")          # (B, 400)
    logits = model(images, dataset="imagenet")         # (B, 1000), same backbone

Meta-device pattern (torchtitan style), to plan or shard a large model without allocating:

    with torch.device("meta"):
        model = create_model("tubevit-h")
    model.to_empty(device="cpu")     # or the sharded / target device
    model.init_weights()             # every parameter is (re)initialised here

Gated skip for image-to-video bootstrapping (tubevit.md section 7): with
`gate_layer = s` (0-based index into `model.blocks`) the output of `blocks[s]` gets
`tanh(gate.alpha) * z_0` added, where z_0 is the block stack's input (tube tokens + position
embedding, after the input dropout). alpha starts at 0, so the gate changes nothing until it
trains. Freezing `tokenizer` and `blocks[:s]` is the bootstrap's business, not the model's
(pretrain/model/bootstrap.py; the paper's 1-based "layer 26 of 32" is s = 25).

Bootstrapped image ViTs keep their own learned positions: `pos_embed="learned"` with
`pos_grid` (and `class_token` when the image ViT has a CLS token, which then leads the token
sequence of forward_features as in timm); see posembed.LearnedPositionEmbedding. The default
`pos_embed="fixed"` is the paper's sin/cos embedding.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.errors import UserError
from pretrain.model.posembed import FixedPositionEmbedding, LearnedPositionEmbedding
from pretrain.model.tubes import SparseTubeTokenizer, TubeSpec, image_tube_index, resolve_tubes
from pretrain.model.vit import AttentionPool, Block, TanhGate

KERNEL_MODES = ("separate", "interpolated")
POS_EMBEDS = ("fixed", "learned")


@dataclass
class TubeViTConfig:
    """Architecture of a TubeViT; everything `load_model` needs to rebuild one."""

    depth: int = field(default=12, metadata={"help": "transformer blocks", "min": 1})
    dim: int = field(default=768, metadata={"help": "token width", "min": 6})
    mlp_dim: int = field(default=3072, metadata={"help": "MLP hidden width", "min": 1})
    heads: int = field(default=12, metadata={"help": "attention heads", "min": 1})
    tubes: list[TubeSpec] = field(
        default_factory=lambda: resolve_tubes("paper"),
        metadata={"help": "tube list, or a tube-set name: " + "paper, paper-no-s2d, paper-2, paper-1, "
                          "charades, dense-2x16x16"})
    kernel_mode: str = field(default="separate", metadata={"help": "separate | interpolated", "choices": KERNEL_MODES})
    base_kernel: tuple[int, int, int] = field(
        default=(8, 8, 8), metadata={"help": "shared kernel shape for kernel_mode=interpolated"})
    num_classes: dict[str, int] = field(
        default_factory=lambda: {"kinetics": 400, "imagenet": 1000},
        metadata={"help": "dataset name -> classes; one linear head each, first = default"})
    skip_unfit_tubes: bool = field(
        default=False, metadata={"help": "a tube that does not fit the clip gives 0 tokens instead of an error"})
    in_chans: int = field(default=3, metadata={"help": "input channels", "min": 1})
    qkv_bias: bool = True
    norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon", "min": 0.0})
    pool_heads: int | None = field(default=None, metadata={"help": "attention-pool heads (None = heads)"})
    drop_rate: float = field(default=0.0, metadata={"help": "dropout (input, MLP/proj, head)", "min": 0.0, "max": 1.0})
    attn_drop_rate: float = field(default=0.0, metadata={"help": "attention-probability dropout", "min": 0.0, "max": 1.0})
    drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth at the last block (linear ramp)", "min": 0.0, "max": 1.0})
    gate_layer: int | None = field(default=None, metadata={"help": "0-based block whose output gets tanh(alpha)*z_0 (bootstrap); None = no gate"})
    # Bootstrapped image ViTs (pretrain.model.bootstrap) keep their own learned positions.
    pos_embed: str = field(default="fixed", metadata={
        "help": "fixed (sin/cos of tube centres) | learned (an image ViT's 2D table, see posembed.py)",
        "choices": POS_EMBEDS})
    pos_grid: tuple[int, int] | None = field(
        default=None, metadata={"help": "learned table size (rows, cols) in patches; pos_embed=learned only"})
    class_token: bool = field(default=False, metadata={
        "help": "prepend a learned CLS token (image ViTs that have one); pos_embed=learned only"})

    def __post_init__(self):
        self.tubes = resolve_tubes(self.tubes)
        self.base_kernel = tuple(int(v) for v in self.base_kernel)
        self.num_classes = {str(k): int(v) for k, v in dict(self.num_classes).items()}
        if self.pos_grid is not None:
            self.pos_grid = tuple(int(v) for v in self.pos_grid)

    @property
    def patch_size(self) -> int | None:
        """Spatial kernel of the image tube (16 for the paper's tubes), None if it has none."""
        i = image_tube_index(self.tubes)
        return None if i is None else self.tubes[i].kernel[1]

    def validate(self) -> None:
        def bad(msg):
            raise UserError(f"model config: {msg}")
        for name in ("depth", "dim", "mlp_dim", "heads", "in_chans"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        if self.dim % self.heads:
            bad(f"dim={self.dim} must be divisible by heads={self.heads}")
        pool_heads = self.pool_heads or self.heads
        if self.dim % pool_heads:
            bad(f"dim={self.dim} must be divisible by pool_heads={pool_heads}")
        if self.dim < 6:
            bad(f"dim={self.dim} must be >= 6 (the position embedding uses 6 channels per frequency)")
        if self.kernel_mode not in KERNEL_MODES:
            bad(f"kernel_mode={self.kernel_mode!r}; valid: {', '.join(KERNEL_MODES)}")
        for i, tube in enumerate(self.tubes):
            if self.dim % tube.s2d_factor:
                bad(f"tube {i + 1} {tube.describe()}: dim={self.dim} must be divisible by its "
                    f"space-to-depth factor {tube.s2d_factor}")
            if self.kernel_mode == "interpolated" and tube.s2d_axis is not None:
                bad(f"kernel_mode='interpolated' shares one {self.dim}-channel kernel and cannot be "
                    f"combined with space-to-depth (tube {i + 1} {tube.describe()}); use tubes="
                    "'paper-no-s2d' or 'charades', or kernel_mode='separate'")
        if len(self.base_kernel) != 3 or min(self.base_kernel) < 1:
            bad(f"base_kernel={self.base_kernel} must be three positive integers")
        if not self.num_classes:
            bad("num_classes needs at least one dataset, e.g. {'kinetics': 400}")
        for name, n in self.num_classes.items():
            if not name or "." in name or n < 1:
                bad(f"num_classes entry {name!r}: {n} needs a non-empty name without '.' and >= 1 classes")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.gate_layer is not None and not 0 <= self.gate_layer < self.depth:
            bad(f"gate_layer={self.gate_layer} must be a block index in 0..{self.depth - 1} or None")
        if self.pos_embed not in POS_EMBEDS:
            bad(f"pos_embed={self.pos_embed!r}; valid: {', '.join(POS_EMBEDS)}")
        if self.pos_embed == "learned":
            if self.pos_grid is None or len(self.pos_grid) != 2 or min(self.pos_grid) < 1:
                bad(f"pos_embed='learned' needs pos_grid=(rows, cols) of positive integers, got {self.pos_grid}")
            if image_tube_index(self.tubes) is None:
                bad("pos_embed='learned' needs a 2D image tube (its patch grid indexes the table)")
        elif self.pos_grid is not None or self.class_token:
            bad("pos_grid and class_token belong to pos_embed='learned' (bootstrapped image ViTs); "
                "leave them unset with pos_embed='fixed'")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tubes"] = [t.to_dict() for t in self.tubes]
        d["base_kernel"] = list(self.base_kernel)
        d["pos_grid"] = None if self.pos_grid is None else list(self.pos_grid)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TubeViTConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise UserError(f"model config has unknown keys {sorted(unknown)}; valid keys: {', '.join(sorted(valid))}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


class TubeViT(nn.Module):
    def __init__(self, config: TubeViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.tokenizer = SparseTubeTokenizer(c.tubes, c.dim, c.kernel_mode, c.base_kernel, c.in_chans,
                                             c.skip_unfit_tubes)
        if c.pos_embed == "learned":
            self.pos_embed = LearnedPositionEmbedding(c.tubes, c.dim, c.pos_grid, c.class_token)
        else:
            self.pos_embed = FixedPositionEmbedding(c.tubes, c.dim)
        self.pos_drop = nn.Dropout(c.drop_rate)
        norm = lambda d: nn.LayerNorm(d, eps=c.norm_eps)  # noqa: E731
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, qkv_bias=c.qkv_bias, proj_drop=c.drop_rate,
                  attn_drop=c.attn_drop_rate, drop_path=dpr[i], norm_layer=norm)
            for i in range(c.depth)
        )
        self.gate = TanhGate() if c.gate_layer is not None else None
        self.norm = norm(c.dim)
        self.pool = AttentionPool(c.dim, c.pool_heads or c.heads, qkv_bias=c.qkv_bias)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.heads = nn.ModuleDict({name: nn.Linear(c.dim, n) for name, n in c.num_classes.items()})
        self.grad_checkpointing = False
        self.init_weights()

    # ---- API -------------------------------------------------------------------------

    @property
    def datasets(self) -> list[str]:
        return list(self.heads.keys())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Video (B,3,T,H,W) or image (B,3,H,W) -> tokens (B, N, dim) after the final norm."""
        tokens = self.tokenizer(x)                                         # (B, N, d)
        grids = self.tokenizer.grids(tuple(x.shape))
        if isinstance(self.pos_embed, LearnedPositionEmbedding):
            x = self.pos_drop(self.pos_embed(tokens, tuple(x.shape), grids))  # (B, [1+]N, d)
        else:
            pos = self.pos_embed(tuple(x.shape), grids, tokens.device, tokens.dtype)  # (N, d)
            x = self.pos_drop(tokens + pos)                                # (B, N, d)
        z0 = x
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)  # (B, N, d)
            if i == self.config.gate_layer:
                x = self.gate(x, z0)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        """(B, N, d) features -> (B, classes) logits of `dataset`'s head."""
        pooled = self.head_drop(self.pool(features))                      # (B, d)
        return self.heads[self._dataset(dataset)](pooled)

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        name = self._dataset(dataset)  # fail before the expensive part
        return self.forward_head(self.forward_features(x), name)

    def _dataset(self, dataset: str | None) -> str:
        if dataset is None:
            if len(self.heads) == 1:
                return self.datasets[0]
            raise UserError(f"this model has several heads; pass dataset= one of: {', '.join(self.datasets)}")
        if dataset not in self.heads:
            raise UserError(f"dataset {dataset!r} has no head in this model; its heads: {', '.join(self.datasets)}")
        return dataset

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: biases, norms, pool query, gate,
        learned positions and CLS token."""
        # ds_shape: the real shape of a parameter DeepSpeed ZeRO-3 has partitioned (flattened).
        return {n for n, p in self.named_parameters()
                if len(getattr(p, "ds_shape", p.shape)) <= 1 or n == "pool.query" or n.startswith("pos_embed.")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; deterministic under torch.manual_seed.

        Safe on meta tensors (a no-op there), so __init__ calls it and the meta pattern calls
        it again after `to_empty()`.
        """
        self.tokenizer.init_weights()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pool.query, std=0.02)
        if isinstance(self.pos_embed, LearnedPositionEmbedding):
            nn.init.trunc_normal_(self.pos_embed.grid, std=0.02)
            if self.pos_embed.cls_token is not None:
                nn.init.trunc_normal_(self.pos_embed.cls_token, std=1e-6)
                nn.init.trunc_normal_(self.pos_embed.cls_pos, std=0.02)
        if self.gate is not None:
            nn.init.zeros_(self.gate.alpha)
