"""Video transformers bootstrapped from an image ViT by inflation (ViViT sec. 3.5; I3D).

    model, meta = inflate(read_state_dict("vit_b16.pth"), "vivit", embed_init="inflate")
    save_model(model, "vivit-b-inflated.safetensors", meta)     # what `pretrain bootstrap
                                                                # --video-model vivit` does

The image ViT is a timm state dict of any layout image_vit_weights.py accepts (class token
or not, patch 14 or 16, LayerScale folded into its linear layers, norm_pre, fc_norm or
norm). The video model is one of vivit.py's families or VTN at the image model's width, depth,
MLP width and heads, its patch size and its position grid (img_size = grid x patch):

- Tubelet embedding (t x P x P, t = `tubelet`, default the family's): the image's P x P
  filter E inflated along time, "inflate" = E/t at every one of the t frames (I3D), or
  "central" = E at frame t // 2 and zero elsewhere (ViViT's central frame init). On a clip
  of one repeated frame both give the image's patch embedding exactly.
- Positions: the image's table repeated along time (models 1 and 3: one entry per
  space-time token, every temporal index gets the image's grid); models 2 and TimeSformer
  keep a spatial table (the image's) and a temporal one (TimeSformer: zeros, its own init,
  so the tokens are exactly the image's; model 2: fresh, it feeds the new temporal encoder).
  A CLS token's position is folded into the token (vivit.py keeps no separate CLS position).
- Blocks: the image's blocks (`norm1`, `attn`, `norm2`, `mlp`), as the spatial part of the
  factorised blocks. Temporal attention is zero-initialised so that it adds nothing at the
  start: model 3's `temporal_attn` and TimeSformer's temporal branch start as copies of the
  block's spatial norm and attention (TimeSformer's own inflation) with a zero output
  projection (model 3: `temporal_attn.proj`; TimeSformer: `temporal_fc`, in every block).
  Not all of the temporal attention is zero: with zero query/key/value weights too, the
  value would be zero and no gradient would ever reach the projection's weight or the
  attention (only its bias would train).
- norm_pre, the final norm (on tokens, or after pooling as fc_norm) and the pooling
  (`--global-pool`, read off the layout when not given: avg with fc_norm or without a CLS
  token) carry over as config fields. Model 2's spatial encoder is the image model (its
  spatial_norm takes the final norm; spatial_pool is token with a CLS token, else mean); its
  temporal encoder, temporal CLS token and temporal positions are new.
- VTN (`vtn`): its frame backbone has model 2's spatial encoder's names and is inflated the
  same way (tubelet 1: one frame, so both embed inits are the image's filter); its time
  table, Longformer temporal encoder, temporal CLS token and MLP heads are new. vtn.py's
  backbone has a token norm and no pre-norm: an fc_norm becomes that token norm (a frame's
  embedding is then the mean of normed tokens, not the norm of the mean: the blocks are
  exact, the pooled embedding is not, and it feeds a new temporal encoder), and norm_pre or
  a missing final norm are refused (inflate those into vivit-fe).
- New, seeded: the heads (one per dataset of `num_classes`), and the parts above marked new.

What is exact on a clip of one repeated frame ("boring video"), each temporal index of the
output against the image ViT's tokens (timm's forward_features):
- vivit without a CLS token (joint attention over nt copies of each key and value is the
  same softmax average), vivit-fsa (no CLS token by design; temporal attention adds zero),
  vivit-fe's spatial encoder (`spatial_features`) with or without a CLS token, and
  timesformer with the image's CLS token (every frame's copy of it sees the same frame, so
  the mean of its updates is the image's update); vtn's frame embeddings (`frame_embeddings`:
  the CLS token, or the mean of the tokens) with a token norm.
- Not exact, by construction: vivit with a CLS token (one CLS among nt copies of each patch
  token weighs 1/nt of what it did), vivit-fsa from an image ViT with a CLS token (model 3
  has none: it is dropped), timesformer from one without (its CLS token is new), vtn from
  one with fc_norm (above).
`meta["exact_on_repeated_frames"]` says which case a file is.
"""
from __future__ import annotations

import json

import torch

from pretrain.errors import UserError
from pretrain.model.image_vit_weights import ImageViTSpec, image_tensors, inspect_timm
from pretrain.model.vivit import (TimeSformer, TimeSformerConfig, ViViT, ViViTConfig, ViViTFE,
                                  ViViTFEConfig, ViViTFSA, ViViTFSAConfig)
from pretrain.model.vtn import VTN, VTNConfig

# family (registry key) -> (config class, model class)
FAMILIES = {
    "vivit": (ViViTConfig, ViViT),
    "vivit-fe": (ViViTFEConfig, ViViTFE),
    "vivit-fsa": (ViViTFSAConfig, ViViTFSA),
    "timesformer": (TimeSformerConfig, TimeSformer),
    "vtn": (VTNConfig, VTN),
}
EMBED_INITS = ("inflate", "central")
GLOBAL_POOLS = ("token", "avg")


# ---- the video model's architecture ----------------------------------------------------------

def inflated_config(spec: ImageViTSpec, family: str, *, tubelet: int | None = None,
                    num_frames: int | None = None, num_classes: dict[str, int] | None = None,
                    global_pool: str | None = None):
    """The config of `family` at the image ViT's shape (see the module docstring)."""
    if family not in FAMILIES:
        raise UserError(f"--video-model {family!r} is not an inflatable family; valid: {', '.join(FAMILIES)}")
    if spec.grid[0] != spec.grid[1]:
        raise UserError(f"the image ViT's position grid is {spec.grid[0]}x{spec.grid[1]}; the video "
                        "families' learned positions are made for square frames (img_size)")
    pool = global_pool or spec.global_pool
    if pool not in GLOBAL_POOLS:
        raise UserError(f"global pool {pool!r} is unknown; valid: {', '.join(GLOBAL_POOLS)}")
    if pool == "token" and not spec.class_token:
        raise UserError("global pool token needs a CLS token, and the image ViT has no cls_token")
    config_cls, _ = FAMILIES[family]
    defaults = config_cls()
    t = defaults.tubelet[0] if tubelet is None else int(tubelet)
    norms = dict(norm_pre=spec.norm_pre, final_norm=spec.final_norm)
    if family == "vtn":   # vtn.py's backbone: one frame, a token norm, no pre-norm
        if t != 1:
            raise UserError(f"--tubelet {t}: VTN's frame backbone embeds one frame at a time (tubelet 1)")
        if spec.norm_pre:
            raise UserError("the image ViT's norm_pre.weight (a LayerNorm before the first block) cannot be "
                            "mapped onto VTN, whose backbone has no pre-norm; inflate it into vivit-fe "
                            "(the same factorisation: a per-frame spatial encoder, then a temporal one)")
        if spec.final_norm == "none":
            raise UserError("the image ViT has neither norm.weight nor fc_norm.weight; VTN's backbone "
                            "norm (spatial_norm) would have no counterpart: inflate it into vivit-fe")
        norms = {}        # fc_norm becomes the token norm (module docstring)
    fields = dict(depth=spec.depth, dim=spec.dim, mlp_dim=spec.mlp_dim, heads=spec.heads,
                  tubelet=(t, spec.patch, spec.patch), img_size=spec.grid[0] * spec.patch,
                  num_frames=defaults.num_frames if num_frames is None else int(num_frames),
                  in_chans=spec.in_chans, qkv_bias=spec.qkv_bias, norm_eps=1e-6, **norms)
    if num_classes:
        fields["num_classes"] = dict(num_classes)
    if family == "vivit":
        fields.update(class_token=spec.class_token, pool="mean" if pool == "avg" else "auto")
    elif family == "timesformer":
        fields.update(pool="mean" if pool == "avg" else "auto", zero_init_temporal_fc=True)
    elif family in ("vivit-fe", "vtn"):
        fields.update(spatial_pool="token" if spec.class_token else "mean")
    config = config_cls(**fields)
    config.validate()
    return config


def exact_on_repeated_frames(spec: ImageViTSpec, family: str) -> bool:
    """Whether every temporal index of the inflated model's tokens equals the image ViT's on
    a clip of one repeated frame (model 2: its spatial encoder's)."""
    return {"vivit": not spec.class_token, "vivit-fsa": not spec.class_token,
            "vivit-fe": True, "timesformer": spec.class_token, "vtn": spec.final_norm == "tokens"}[family]


# ---- the weights --------------------------------------------------------------------------------

def inflate_patch_kernel(weight: torch.Tensor, t: int, embed_init: str) -> torch.Tensor:
    """(D, C, P, P) image filter -> (D, C, t, P, P) tubelet filter: E/t at every frame
    ("inflate") or E at frame t // 2, zeros elsewhere ("central")."""
    if embed_init == "inflate":
        return weight.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    if embed_init == "central":
        out = weight.new_zeros(weight.shape[0], weight.shape[1], t, *weight.shape[2:])
        out[:, :, t // 2] = weight
        return out
    raise UserError(f"--embed-init {embed_init!r} is unknown; valid: {', '.join(EMBED_INITS)}")


def inflated_state(src: dict[str, torch.Tensor], spec: ImageViTSpec, family: str, config,
                   embed_init: str) -> dict[str, torch.Tensor]:
    """The video model's tensors taken from the image ViT (`src` = image_tensors(...)); what
    is not here stays as the fresh model made it (heads, model 2's temporal encoder)."""
    t = config.tubelet[0]
    nt = config.pos_grid[0]
    out = {"tokenizer.tubes.0.weight": inflate_patch_kernel(src["patch.weight"], t, embed_init),
           "tokenizer.tubes.0.bias": src["patch.bias"]}
    grid = src["pos.grid"]                                                     # (1, gh*gw, D)
    if family in ("vivit", "vivit-fsa"):
        out["pos_embed.table"] = grid.repeat(1, nt, 1)                         # (1, nt*gh*gw, D), t-major
    else:
        out["pos_embed.space.table"] = grid
        if family == "timesformer":
            out["pos_embed.time.table"] = torch.zeros(1, nt, grid.shape[2], dtype=grid.dtype)
    has_cls = {"vivit": config.class_token if family == "vivit" else False, "vivit-fsa": False,
               "vivit-fe": getattr(config, "spatial_pool", None) == "token", "timesformer": True,
               "vtn": getattr(config, "spatial_pool", None) == "token"}[family]
    if has_cls and spec.class_token:
        out["cls_token.token"] = src["cls.token"] + src["cls.pos"]             # (1, 1, D)
    for key, value in src.items():
        if key.startswith("blocks.") or key.startswith("norm_pre."):
            out[key] = value
    final = "spatial_norm" if family in ("vivit-fe", "vtn") else "norm"
    if spec.final_norm != "none":
        out[f"{final}.weight"], out[f"{final}.bias"] = src["final_norm.weight"], src["final_norm.bias"]
    for i in range(spec.depth):
        b = f"blocks.{i}."
        if family == "vivit-fsa":
            for part in ("weight", "bias"):
                out[b + f"temporal_norm.{part}"] = src[b + f"norm1.{part}"]
            out[b + "temporal_attn.qkv.weight"] = src[b + "attn.qkv.weight"]
            if spec.qkv_bias:
                out[b + "temporal_attn.qkv.bias"] = src[b + "attn.qkv.bias"]
            out[b + "temporal_attn.proj.weight"] = torch.zeros_like(src[b + "attn.proj.weight"])
            out[b + "temporal_attn.proj.bias"] = torch.zeros_like(src[b + "attn.proj.bias"])
        elif family == "timesformer":
            for part in ("weight", "bias"):
                out[b + f"temporal_norm1.{part}"] = src[b + f"norm1.{part}"]
                out[b + f"temporal_attn.proj.{part}"] = src[b + f"attn.proj.{part}"]
                out[b + f"temporal_fc.{part}"] = torch.zeros_like(src[b + f"attn.proj.{part}"])
            out[b + "temporal_attn.qkv.weight"] = src[b + "attn.qkv.weight"]
            if spec.qkv_bias:
                out[b + "temporal_attn.qkv.bias"] = src[b + "attn.qkv.bias"]
    return out


def inflate(image_state: dict[str, torch.Tensor], family: str, *, embed_init: str = "inflate",
            tubelet: int | None = None, num_frames: int | None = None,
            num_classes: dict[str, int] | None = None, heads: int | None = None,
            global_pool: str | None = None, seed: int = 0,
            source: str = "image checkpoint") -> tuple[torch.nn.Module, dict[str, str]]:
    """(inflated video model, metadata for its file). See the module docstring."""
    if embed_init not in EMBED_INITS:
        raise UserError(f"--embed-init {embed_init!r} is unknown; valid: {', '.join(EMBED_INITS)}")
    spec = inspect_timm(image_state, heads=heads, source=source)
    config = inflated_config(spec, family, tubelet=tubelet, num_frames=num_frames,
                             num_classes=num_classes, global_pool=global_pool)
    torch.manual_seed(seed)              # the new parts: heads, model 2's temporal encoder
    model = FAMILIES[family][1](config)
    state = inflated_state(image_tensors(image_state, spec), spec, family, config, embed_init)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if unexpected or wrong:   # a bug here, not a user's layout: inspect_timm checked that
        raise AssertionError(f"inflation mapped tensors the model does not have: {unexpected[:5]} {wrong[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    meta = {
        "inflated": "1",
        "image_vit": spec.describe(),
        "image_checkpoint": source,
        "video_model": family,
        "embed_init": embed_init,
        "tubelet": "x".join(map(str, config.tubelet)),
        "global_pool": global_pool or spec.global_pool,
        "exact_on_repeated_frames": json.dumps(exact_on_repeated_frames(spec, family)),
        "new_tensors": ", ".join(sorted(set(own) - set(state))),
        "seed": str(seed),
    }
    return model, meta
