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

Gated skip for image-to-video bootstrapping (TubeViT paper, "Image-To-Video Scaling"): with
`gate_layer = s` (0-based index into `model.blocks`) the output of `blocks[s]` gets
`tanh(gate.alpha) * z_0` added, where z_0 is the block stack's input (tube tokens + position
embedding, after the input dropout and norm_pre). alpha starts at 0, so the gate changes
nothing until it trains. Freezing `tokenizer` and `blocks[:s]` is the bootstrap's business, not the model's
(pretrain/model/bootstrap.py; the paper's 1-based "layer 26 of 32" is s = 25).

Bootstrapped image ViTs keep their own learned positions: `pos_embed="learned"` with
`pos_grid` (and `class_token` when the image ViT has a CLS token, which then leads the token
sequence of forward_features as in timm); see posembed.LearnedPositionEmbedding. The default
`pos_embed="fixed"` is the paper's sin/cos embedding. They also keep their norms: `norm_pre`
(a LayerNorm before the first block, CLIP-style) and `final_norm` (tokens: the usual norm on
every token; pooled: on the attention pool's output instead; none), vit.py's ImageNorms, the
same fields and code as the vivit.py families'. Both default to the paper's model (no
pre-norm, a token norm) and are left out of to_dict() there, so earlier architectures match.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import config_loader
from pretrain.config_loader import config_field
from pretrain.errors import UserError
from pretrain.model.family import ModelConfig
from pretrain.model.posembed import (FixedPositionEmbedding, LearnedPositionEmbedding, sincos_embedding,
                                     tube_coords)
from pretrain.model.tubes import (TUBE_SETS, SparseTubeTokenizer, TubeSpec, image_grid, image_tube_index,
                                  resolve_tubes)
from pretrain.model.vit import (IMAGE_NORM_DEFAULTS, AttentionPool, Block, ImageNorms, TanhGate,
                                drop_defaults, final_norm_field, head_name, idle_heads,
                                init_linear_and_norm, norm_pre_field)

KERNEL_MODES = ("separate", "interpolated")
POS_EMBEDS = ("fixed", "learned")
UNFIT_POLICIES = ("skip", "error")


@dataclass
class TubeViTConfig(ModelConfig):
    """Architecture of a TubeViT; everything `load_model` needs to rebuild one.

    Also the experiment's `model` section when `model.name` is a TubeViT size: every field
    is a config key (`pretrain config keys model`), checked by pretrain/config_loader.py
    against its metadata; `validate()` holds the rules that involve several fields.
    """

    depth: int = config_field(12, "transformer blocks", min=1)
    dim: int = config_field(768, "token width (a multiple of heads; the fixed position "
                            "embedding uses 6 channels per frequency)", min=6)
    mlp_dim: int = config_field(3072, "MLP hidden width", min=1)
    heads: int = config_field(12, "attention heads", min=1)
    # A tube-set name is resolved to its list of TubeSpec on construction.
    tubes: str | list[TubeSpec] = config_field(
        help="tube-set name (" + ", ".join(TUBE_SETS) + ") or a list of {kernel, stride, "
        "offset, s2d_axis, s2d_factor[, s2d_split]} with (t, h, w) triples; s2d_axis one or "
        "more of t, h, w (e.g. 'hw')",
        factory=lambda: resolve_tubes("paper"))
    kernel_mode: str = config_field(
        "separate", "one kernel per tube, or one learned kernel (base_kernel) resized to every "
        "tube", choices=KERNEL_MODES)
    base_kernel: tuple[int, int, int] = config_field(
        (8, 8, 8), "shared kernel shape (t, h, w) for kernel_mode=interpolated", min=1)
    num_classes: dict[str, int] = config_field(
        help="dataset name -> classes; one linear head each, first = default", min=1,
        derived="an experiment's heads are the data section's datasets (data.video_dataset / "
        "data.image_dataset, else the names stored with the shards), set when the model is built",
        factory=lambda: {"kinetics": 400, "imagenet": 1000})
    unfit_tubes: str = config_field(
        "skip", "a tube that does not fit the clip (e.g. the paper's 16x4x4 tube at offset 4 on "
        "16-frame clips): skip = 0 tokens from it, with one warning naming it; error = a "
        "UserError (strict). A run-time policy: not part of the stored architecture",
        choices=UNFIT_POLICIES, compare=False)
    skip_unfit_tubes: bool = config_field(
        False, "earlier switch, kept so stored architectures load: true skips unfit tubes even "
        "with unfit_tubes=error; false defers to unfit_tubes")
    in_chans: int = config_field(3, "input channels", min=1)
    qkv_bias: bool = config_field(True, "bias in the attention's query/key/value projection")
    norm_eps: float = config_field(1e-6, "LayerNorm epsilon", min=0.0)
    pool_heads: int | None = config_field(None, "attention-pool heads (null = heads)", min=1)
    drop_rate: float = config_field(0.0, "dropout (input, MLP/proj, head)", min=0.0, less_than=1.0)
    attn_drop_rate: float = config_field(0.0, "attention-probability dropout", min=0.0,
                                         less_than=1.0)
    drop_path_rate: float = config_field(0.0, "stochastic depth at the last block (linear ramp "
                                         "from 0 at the first)", min=0.0, less_than=1.0)
    gate_layer: int | None = config_field(
        None, "0-based block whose output gets tanh(alpha)*z_0 (image-to-video bootstrap); "
        "null = no gate", min=0)
    # Bootstrapped image ViTs (pretrain.model.bootstrap) keep their own learned positions.
    pos_embed: str = config_field(
        "fixed", "fixed (sin/cos of tube centres) | learned (an image ViT's 2D table, see "
        "posembed.py)", choices=POS_EMBEDS)
    pos_grid: tuple[int, int] | None = config_field(
        None, "learned table size (rows, cols) in patches; pos_embed=learned only", min=1)
    class_token: bool = config_field(
        False, "prepend a learned CLS token (image ViTs that have one); pos_embed=learned only")
    # Bootstrapped image ViTs' norm layouts (vit.ImageNorms); defaults = the paper's model.
    norm_pre: bool = norm_pre_field("TubeViT: the blocks' input, so also the gate's z_0")
    final_norm: str = final_norm_field(
        "TubeViT: pooled = on the attention pool's output; the bootstrap maps timm's fc_norm to "
        "tokens, see image_vit_weights.py")

    def __post_init__(self):
        self.tubes = resolve_tubes(self.tubes)
        self.base_kernel = tuple(int(v) for v in self.base_kernel)
        self.num_classes = {str(k): int(v) for k, v in dict(self.num_classes).items()}
        if self.pos_grid is not None:
            self.pos_grid = tuple(int(v) for v in self.pos_grid)

    @property
    def skips_unfit(self) -> bool:
        """Whether a tube that does not fit the clip is skipped (else a UserError)."""
        return self.skip_unfit_tubes or self.unfit_tubes == "skip"

    def to_dict(self) -> dict:
        """The architecture; `unfit_tubes` is a run-time policy and stays out, tubes without
        s2d_split / s2d_outer have no such keys, and norm_pre / final_norm are left out at their
        defaults (stored architectures and checkpoint manifests of earlier versions have none
        of these, and a resume compares them)."""
        d = drop_defaults(super().to_dict(), IMAGE_NORM_DEFAULTS)
        d.pop("unfit_tubes", None)
        # TubeSpec's own form: optional space-to-depth keys only when set, as stored before
        d["tubes"] = [t.to_dict() for t in self.tubes]
        return d

    @property
    def patch_size(self) -> int | None:
        """Spatial kernel of the image tube (16 for the paper's tubes), None if it has none."""
        i = image_tube_index(self.tubes)
        return None if i is None else self.tubes[i].kernel[1]

    def validate(self) -> None:
        def bad(msg):
            raise UserError(f"model config: {msg}")
        if self.dim % self.heads:
            bad(f"dim={self.dim} must be divisible by heads={self.heads}")
        pool_heads = self.pool_heads or self.heads
        if self.dim % pool_heads:
            bad(f"dim={self.dim} must be divisible by pool_heads={pool_heads}")
        for i, tube in enumerate(self.tubes):
            if self.dim % tube.s2d_factor:
                bad(f"tube {i + 1} {tube.describe()}: dim={self.dim} must be divisible by its "
                    f"space-to-depth factor {tube.s2d_factor}")
            if self.kernel_mode == "interpolated" and tube.s2d_axis is not None:
                bad(f"kernel_mode='interpolated' shares one {self.dim}-channel kernel and cannot be "
                    f"combined with space-to-depth (tube {i + 1} {tube.describe()}); use tubes="
                    "'paper-no-s2d' or 'charades', or kernel_mode='separate'")
        if not self.num_classes:
            bad("num_classes needs at least one dataset, e.g. {'kinetics': 400}")
        for name in self.num_classes:
            if not name or "." in name:  # a head's name is part of parameter names
                bad(f"num_classes entry {name!r} needs a non-empty name without '.'")
        if self.gate_layer is not None and self.gate_layer >= self.depth:
            bad(f"gate_layer={self.gate_layer} must be a block index in 0..{self.depth - 1} or None")
        if self.pos_embed == "learned":
            if self.pos_grid is None:
                bad(f"pos_embed='learned' needs pos_grid=(rows, cols) of positive integers, got {self.pos_grid}")
            if image_tube_index(self.tubes) is None:
                bad("pos_embed='learned' needs a 2D image tube (its patch grid indexes the table)")
        elif self.pos_grid is not None or self.class_token:
            bad("pos_grid and class_token belong to pos_embed='learned' (bootstrapped image ViTs); "
                "leave them unset with pos_embed='fixed'")



class TubeViT(ImageNorms, nn.Module):
    def __init__(self, config: TubeViTConfig):
        super().__init__()
        config_loader.check(config, source="the TubeViT config")
        self.config = config
        c = config
        self.tokenizer = SparseTubeTokenizer(c.tubes, c.dim, c.kernel_mode, c.base_kernel, c.in_chans,
                                             c.skips_unfit)
        if c.pos_embed == "learned":
            self.pos_embed = LearnedPositionEmbedding(c.tubes, c.dim, c.pos_grid, c.class_token)
        else:
            self.pos_embed = FixedPositionEmbedding(c.tubes, c.dim)
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.norm_pre = self._pre_norm()
        norm = lambda d: nn.LayerNorm(d, eps=c.norm_eps)  # noqa: E731
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, qkv_bias=c.qkv_bias, proj_drop=c.drop_rate,
                  attn_drop=c.attn_drop_rate, drop_path=dpr[i], norm_layer=norm)
            for i in range(c.depth)
        )
        self.gate = TanhGate() if c.gate_layer is not None else None
        self.norm = self._final_norm()
        self.pool = AttentionPool(c.dim, c.pool_heads or c.heads, qkv_bias=c.qkv_bias)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.heads = nn.ModuleDict({name: nn.Linear(c.dim, n) for name, n in c.num_classes.items()})
        self.grad_checkpointing = False
        self.all_parameters_in_forward = False   # see set_all_parameters_in_forward
        self.init_weights()

    # ---- API -------------------------------------------------------------------------

    @property
    def datasets(self) -> list[str]:
        return list(self.heads.keys())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Video (B,3,T,H,W) or image (B,3,H,W) -> tokens (B, N, dim) after the final norm
        (unless final_norm puts it after pooling or there is none)."""
        return self.encode(self.tokens(x))

    # ---- the masked-modelling interface (pretrain/model/mae.py) -------------------------
    # tokens / encode split forward_features so an encoder can run on a subset of tokens;
    # token_groups / pixel_volume / group_target_sizes / position_table describe each
    # token's geometry (one group per tube) for masks, pixel targets and decoder positions.

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> (B, N, dim) tube tokens with their position embedding (and input dropout)."""
        tokens = self.tokenizer(x)                                         # (B, N, d)
        grids = self.tokenizer.grids(tuple(x.shape))
        if isinstance(self.pos_embed, LearnedPositionEmbedding):
            return self.pos_drop(self.pos_embed(tokens, tuple(x.shape), grids))  # (B, [1+]N, d)
        pos = self.pos_embed(tuple(x.shape), grids, tokens.device, tokens.dtype)  # (N, d)
        return self.pos_drop(tokens + pos)                                 # (B, N, d)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, n, dim), all or any subset of `tokens(x)` -> after norm_pre, blocks and
        the final norm (on tokens)."""
        x = self.norm_pre(x)   # per token, so a subset of the tokens gets what it would whole
        z0 = x
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)  # (B, n, d)
            if i == self.config.gate_layer:
                x = self.gate(x, z0)
        return self._token_norm(self.norm, x)

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, d) encoded tokens -> (B, d): the classification pooling (attention pool),
        then the final norm when it is on the pooled token (final_norm=pooled)."""
        return self._pooled_norm(self.norm, self.pool(features))

    def token_groups(self, shape: tuple[int, ...]) -> list[tuple[int, TubeSpec, tuple[int, int, int]]]:
        """(group, tube geometry, grid) per tube that yields tokens, in token order; geometry
        in the units of `pixel_volume(shape)`. Group = tube index (an image: the image tube,
        read as one frame)."""
        if len(shape) == 4:
            i = self.tokenizer.image_index
            spec = self.config.tubes[i]
            one_frame = dataclasses.replace(spec, offset=(0, *spec.offset[1:]))
            return [(i, one_frame, image_grid(self.config.tubes, tuple(shape[2:])))]
        grids = self.tokenizer.grids(tuple(shape))
        return [(i, spec, g) for i, (spec, g) in enumerate(zip(self.config.tubes, grids)) if math.prod(g)]

    def pixel_volume(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(T, H, W) id of each input pixel position (flat index into T*H*W, an image: H*W)."""
        size = (1, *shape[2:]) if len(shape) == 4 else tuple(shape[2:])
        return torch.arange(math.prod(size)).view(size)

    def group_target_sizes(self) -> list[int]:
        """Pixel values per token of each group (tube): channels x span volume."""
        return [self.config.in_chans * math.prod(spec.span) for spec in self.config.tubes]

    def position_table(self, shape: tuple[int, ...], dim: int) -> torch.Tensor:
        """(N, dim) float64 fixed sin/cos embedding of every token's tube centre at width
        `dim` (the decoder's positions; the encoder's own is `pos_embed`)."""
        groups = self.token_groups(shape)
        return torch.cat([sincos_embedding(tube_coords(spec, grid), dim) for _, spec, grid in groups])

    def forward_head(self, features: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        """(B, N, d) features -> (B, classes) logits of `dataset`'s head."""
        pooled = self.head_drop(self.pool_tokens(features))               # (B, d)
        return self.heads[self._dataset(dataset)](pooled)

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        name = self._dataset(dataset)  # fail before the expensive part
        if not (self.all_parameters_in_forward and self.training and torch.is_grad_enabled()):
            return self.forward_head(self.forward_features(x), name)
        pooled = self.head_drop(self.pool_tokens(self.forward_features(x)))  # (B, d)
        logits = self.heads[name](pooled)                                 # (B, classes)
        idle = idle_heads(self.heads, name, pooled)
        if x.ndim == 4:                              # image: the video-only tubes are idle
            idle = idle + self.tokenizer(x.new_zeros(self._smallest_clip())).sum()
        return logits + 0.0 * idle

    def set_all_parameters_in_forward(self, enable: bool = True) -> None:
        """In training, let every parameter take part in each forward, the idle ones with a
        zero contribution (the other datasets' heads on the pooled features; on images, the
        tubes on the smallest clip), so every parameter gets a gradient, zero if idle.

        Why: one dataset per micro-batch leaves the other heads (and on images the 3-D tubes)
        unused. DeepSpeed ZeRO-1/2 fill zeros for those, but ZeRO-3 (0.19) reuses the
        parameter's previous gradient partition, so an image step would apply the last video
        step's tube gradient again (tests/test_train_zero_equivalence.py). The extra work is
        one small linear per other head and the tube convolutions on one minimal clip.
        """
        self.all_parameters_in_forward = enable

    @property
    def accepts_images(self) -> bool:
        """Whether images (B, C, H, W) go through: the tubes include a 2D image tube."""
        return self.tokenizer.image_index is not None

    def _smallest_clip(self) -> tuple[int, int, int, int, int]:
        """(1, C, T, H, W): the smallest clip on which every tube yields a token."""
        specs = self.tokenizer.specs
        thw = (max(s.offset[a] + s.span[a] for s in specs) for a in range(3))
        return (1, self.config.in_chans, *thw)

    def _dataset(self, dataset: str | None) -> str:
        return head_name(self.heads, dataset)

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
        init_linear_and_norm(self)
        nn.init.trunc_normal_(self.pool.query, std=0.02)
        if isinstance(self.pos_embed, LearnedPositionEmbedding):
            nn.init.trunc_normal_(self.pos_embed.grid, std=0.02)
            if self.pos_embed.cls_token is not None:
                nn.init.trunc_normal_(self.pos_embed.cls_token, std=1e-6)
                nn.init.trunc_normal_(self.pos_embed.cls_pos, std=0.02)
        if self.gate is not None:
            nn.init.zeros_(self.gate.alpha)
