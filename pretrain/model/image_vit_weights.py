"""Image-ViT weights of other libraries mapped onto this project's names: the one place that
knows their layouts.

Today one layout: timm's `VisionTransformer` (vit_*_patch16/14_*, DeiT, DeiT-III, AugReg,
CLIP-style ViTs, ...), as a plain state dict in a safetensors file or a torch
`.pth`/`.pt`/`.bin` file (also wrapped as {"state_dict": ...}, {"model": ...} or
{"module": ...}, keys optionally prefixed "module." or "model."), local or any fsspec URI.
The keys and what they become:

    timm                               shape                 TubeViT
    patch_embed.proj.weight            (D, C, P, P)          tokenizer.tubes[i].weight  (D, C, 1, P, P)
    patch_embed.proj.bias              (D,)                  tokenizer.tubes[i].bias    (zero if absent)
    pos_embed                          (1, [1+]gh*gw, D)     pos_embed.grid (1, gh*gw, D) [+ pos_embed.cls_pos]
    cls_token                          (1, 1, D)             pos_embed.cls_token          (optional)
    blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}   same names
                                                             (absent output biases: zero)
    blocks.N.ls1.gamma, ls2.gamma      (D,)                  folded into attn.proj / mlp.fc2 (below)
    norm.{weight,bias}                 (D,)                  norm.*
    fc_norm.{weight,bias}              (D,)                  norm.* (below)
    norm_pre.{weight,bias}             (D,)                  norm_pre.* (config norm_pre=true)
    head.*, head_drop.*, attn_pool.*                         dropped (the image classifier)

i = the image tube of the TubeViT (`image_tube_index`). With a CLS token timm's pos_embed
either has a CLS entry (the original layout: 1 + gh*gw rows) or not (`no_embed_class`,
DeiT-3: gh*gw rows; our cls_pos is then zero, which is the same function). The grid is
taken as square unless given.

LayerScale (DeiT-III, many ViT-H checkpoints: `x + gamma * branch(x)`) is folded into the
branch's last linear layer: gamma * (W x + b) = (diag(gamma) W) x + gamma b, computed in
float64. The function is the image ViT's exactly (up to float rounding); what is not kept
is the parametrisation (training continues on the folded weights, without a separate
gamma), so the model code needs no LayerScale module. `fold_layer_scale` does it.

The final norm: timm has `norm` on every token (global_pool token, or avg with
fc_norm=False), or `fc_norm` on the pooled token instead (global_pool avg, the default
with avg), or neither (final_norm=False). `ImageViTSpec.final_norm` says which ("tokens",
"pooled", "none"). TubeViT and the video families of vivit.py reproduce all three (their
`final_norm` config field) and `norm_pre` (a LayerNorm before the first block, CLIP-style;
config `norm_pre`): the same fields and code for both (vit.ImageNorms). The inflation is
pretrain/model/inflate.py; the TubeViT bootstrap (bootstrap.py) maps norm_pre and "none"
as they are, and fc_norm onto TubeViT's token norm before its attention pool (the pool and
heads are new, so "norm after pooling" has no trained counterpart to keep; the blocks are
exact). VTN's backbone has no such options, and inflate.py refuses those layouts for it.

Anything else (register tokens, q/k norms, both norm and fc_norm, non-square patches) is a
layout this code does not reproduce exactly, so it is refused with a UserError naming the
keys rather than silently changing what the image ViT computes.

Attention heads are not in a state dict; `heads=None` takes the standard count for the
width (ViT-Ti 3, S 6, B 12, L/H 16).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import torch

from pretrain import storage
from pretrain.errors import UserError

# width -> attention heads of the standard ViT sizes (timm / the ViT and DeiT papers)
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}

_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")
_LAYER_SCALE = ("ls1.gamma", "ls2.gamma")          # LayerScale: folded (module docstring)
# qkv_bias=False models have no qkv bias; proj_bias=False ones no output biases (zero: exact)
_ZERO_IF_ABSENT = ("attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")
_OPTIONAL_BLOCK_PARTS = {"attn.qkv.bias", *_ZERO_IF_ABSENT, *_LAYER_SCALE}
_TOP = {"patch_embed.proj.weight", "pos_embed"}
_OPTIONAL_TOP = {"patch_embed.proj.bias", "cls_token", "norm.weight", "norm.bias", "fc_norm.weight",
                 "fc_norm.bias", "norm_pre.weight", "norm_pre.bias"}
_DROPPED = re.compile(r"^(head|head_drop|attn_pool)\.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ImageViTSpec:
    """The architecture of an image ViT as read off its weights."""

    depth: int
    dim: int
    mlp_dim: int
    heads: int
    patch: int
    grid: tuple[int, int]        # position table rows, cols (patches)
    class_token: bool
    cls_has_pos: bool            # pos_embed has a CLS row (timm's no_embed_class=False)
    qkv_bias: bool
    in_chans: int
    layer_scale: bool = False    # blocks have ls1/ls2.gamma (folded on import)
    norm_pre: bool = False       # a LayerNorm before the first block
    final_norm: str = "tokens"   # "tokens" (norm), "pooled" (fc_norm) or "none"
    patch_bias: bool = True      # patch_embed.proj.bias present (CLIP-style ViTs have none)

    @property
    def global_pool(self) -> str:
        """timm's likely global_pool ("token" or "avg"): not in a state dict, so read off the
        layout: fc_norm or no CLS token means avg."""
        return "avg" if self.final_norm == "pooled" or not self.class_token else "token"

    @property
    def image_size(self) -> tuple[int, int]:
        """The resolution the position table was trained at (pixels)."""
        return (self.grid[0] * self.patch, self.grid[1] * self.patch)

    def describe(self) -> str:
        return (f"ViT depth {self.depth}, width {self.dim}, MLP {self.mlp_dim}, {self.heads} heads, "
                f"patch {self.patch}, {self.grid[0]}x{self.grid[1]} positions"
                f"{', CLS token' if self.class_token else ''}"
                f"{', LayerScale' if self.layer_scale else ''}{', norm_pre' if self.norm_pre else ''}"
                f"{', fc_norm' if self.final_norm == 'pooled' else ''}"
                f"{', no final norm' if self.final_norm == 'none' else ''}")


# ---- reading --------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch (.pth/.pt/.bin) file, local path or fsspec URI."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"image checkpoint {path} does not exist") from None
    if path.endswith(".safetensors"):
        from safetensors.torch import load as st_load
        try:
            return st_load(data)
        except Exception as exc:
            raise UserError(f"image checkpoint {path} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"image checkpoint {path} is neither a safetensors file (by its name) nor a "
                        f"torch state dict readable with weights_only=True ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"image checkpoint {path} does not hold a state dict (name -> tensor); "
                        "expected timm's VisionTransformer.state_dict(), possibly under 'state_dict'/'model'")
    return dict(obj)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ---- the timm layout ------------------------------------------------------------------------

def inspect_timm(state: dict[str, torch.Tensor], heads: int | None = None,
                 grid: tuple[int, int] | None = None, source: str = "image checkpoint") -> ImageViTSpec:
    """Check that `state` is a timm ViT this project reproduces exactly and read its shape.

    UserError names the unknown, missing or mis-shaped keys.
    """
    state = _strip_prefix(state)
    blocks: dict[int, set[str]] = {}
    unknown = []
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m and (m.group(2) in _BLOCK_PARTS or m.group(2) in _LAYER_SCALE):
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif key in _TOP or key in _OPTIONAL_TOP or _DROPPED.match(key):
            continue
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{source} has keys outside the timm ViT layout this importer maps exactly: "
                        f"{_names(unknown)}; supported: patch_embed.proj.*, pos_embed, cls_token, "
                        f"blocks.N.{{{', '.join(_BLOCK_PARTS + _LAYER_SCALE)}}}, norm.*, fc_norm.*, "
                        "norm_pre.*, head.*/attn_pool.* (dropped). Register tokens and q/k norms are not "
                        "supported")
    missing = sorted(_TOP - set(state))
    for name in ("norm", "fc_norm", "norm_pre"):     # optional LayerNorms: both halves or neither
        halves = [f"{name}.weight" in state, f"{name}.bias" in state]
        if any(halves) and not all(halves):
            missing.append(f"{name}.{'bias' if halves[0] else 'weight'}")
    depth = max(blocks) + 1 if blocks else 0
    for i in range(depth):
        gone = set(_BLOCK_PARTS) - _OPTIONAL_BLOCK_PARTS - blocks.get(i, set())
        missing += [f"blocks.{i}.{p}" for p in sorted(gone)]
    if missing or depth == 0:
        raise UserError(f"{source} is not a complete timm ViT: missing keys {_names(missing or ['blocks.0.*'])}")
    has_qkv_bias = {"attn.qkv.bias" in blocks[i] for i in range(depth)}
    if len(has_qkv_bias) != 1:
        raise UserError(f"{source}: only some blocks have attn.qkv.bias; all or none must")
    if "norm.weight" in state and "fc_norm.weight" in state:
        raise UserError(f"{source}: has both norm.weight and fc_norm.weight (a norm on every token and "
                        "another after pooling); timm builds one or the other, and this importer maps "
                        "one final norm")
    final_norm = "tokens" if "norm.weight" in state else "pooled" if "fc_norm.weight" in state else "none"
    norm_pre = "norm_pre.weight" in state

    pw = state["patch_embed.proj.weight"]
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise UserError(f"{source}: patch_embed.proj.weight has shape {tuple(pw.shape)}; expected "
                        "(width, channels, P, P) with a square patch")
    dim, in_chans, patch = pw.shape[0], pw.shape[1], pw.shape[2]
    mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    expected = {k: (dim,) for k in ("patch_embed.proj.bias", "norm.weight", "norm.bias", "fc_norm.weight",
                                      "fc_norm.bias", "norm_pre.weight", "norm_pre.bias") if k in state}
    for i in range(depth):
        b = f"blocks.{i}."
        expected.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,),
            b + "norm2.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim), b + "attn.proj.weight": (dim, dim),
            b + "mlp.fc1.weight": (mlp_dim, dim), b + "mlp.fc2.weight": (dim, mlp_dim)})
        for part, shape in (("attn.proj.bias", (dim,)), ("mlp.fc1.bias", (mlp_dim,)), ("mlp.fc2.bias", (dim,))):
            if b + part in state:
                expected[b + part] = shape
        if has_qkv_bias == {True}:
            expected[b + "attn.qkv.bias"] = (3 * dim,)
        for part in _LAYER_SCALE:
            if b + part in state:
                expected[b + part] = (dim,)
    class_token = "cls_token" in state
    if class_token:
        expected["cls_token"] = (1, 1, dim)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {v})" for k, v in expected.items()
             if tuple(state[k].shape) != v]
    if wrong:
        raise UserError(f"{source}: tensors whose shapes do not fit a width-{dim} ViT: {_names(wrong)}")

    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise UserError(f"{source}: pos_embed has shape {tuple(pos.shape)}; expected (1, tokens, {dim})")
    rows = pos.shape[1]
    cls_has_pos = False
    if grid is None:
        side = math.isqrt(rows)
        if class_token and side * side != rows and math.isqrt(rows - 1) ** 2 == rows - 1:
            side, cls_has_pos = math.isqrt(rows - 1), True
        if side * side not in (rows, rows - int(cls_has_pos)) or side == 0:
            raise UserError(f"{source}: pos_embed has {rows} rows, not a square grid"
                            f"{' (+1 CLS row)' if class_token else ''}; pass the grid (rows, cols) explicitly")
        grid = (side, side)
    else:
        grid = (int(grid[0]), int(grid[1]))
        n = grid[0] * grid[1]
        cls_has_pos = class_token and rows == n + 1
        if rows != n + int(cls_has_pos):
            raise UserError(f"{source}: pos_embed has {rows} rows but grid {grid} needs {n}"
                            f"{' or ' + str(n + 1) + ' (with a CLS row)' if class_token else ''}")
    if heads is None:
        if dim not in STANDARD_HEADS:
            raise UserError(f"{source}: width {dim} is not a standard ViT width "
                            f"({', '.join(map(str, STANDARD_HEADS))}); give the number of attention heads")
        heads = STANDARD_HEADS[dim]
    if dim % heads:
        raise UserError(f"{source}: width {dim} is not divisible by {heads} attention heads")
    layer_scale = any(f"blocks.{i}.{p}" in state for i in range(depth) for p in _LAYER_SCALE)
    return ImageViTSpec(depth=depth, dim=dim, mlp_dim=mlp_dim, heads=heads, patch=patch, grid=grid,
                        class_token=class_token, cls_has_pos=cls_has_pos,
                        qkv_bias=has_qkv_bias == {True}, in_chans=in_chans, layer_scale=layer_scale,
                        norm_pre=norm_pre, final_norm=final_norm,
                        patch_bias="patch_embed.proj.bias" in state)


def fold_layer_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every LayerScale gamma folded into the linear layer whose output it
    scales (ls1 -> attn.proj, ls2 -> mlp.fc2) and removed; other tensors as they are.

    x + gamma * (W h + b) = x + (diag(gamma) W) h + gamma b, in float64, stored in W's dtype."""
    state = _strip_prefix(state)
    out = {k: v for k, v in state.items() if not _is_layer_scale(k)}
    for key, gamma in state.items():
        if not _is_layer_scale(key):
            continue
        prefix = key[: -len("ls1.gamma")]
        layer = prefix + ("attn.proj" if key.endswith("ls1.gamma") else "mlp.fc2")
        g = gamma.double()
        w, b = state[layer + ".weight"], state.get(layer + ".bias")
        out[layer + ".weight"] = (g[:, None] * w.double()).to(w.dtype)          # (D, in)
        if b is not None:
            out[layer + ".bias"] = (g * b.double()).to(b.dtype)                # (D,)
    return out


def _is_layer_scale(key: str) -> bool:
    m = _BLOCK_KEY.match(key)
    return bool(m) and m.group(2) in _LAYER_SCALE


def image_tensors(state: dict[str, torch.Tensor], spec: ImageViTSpec) -> dict[str, torch.Tensor]:
    """The image ViT's tensors in one normal form, whatever its layout (call `inspect_timm`
    first for `spec`): LayerScale folded, prefixes stripped, head dropped, and

        patch.weight (D, C, P, P), patch.bias (D,) (zeros when the checkpoint has none),
        pos.grid (1, gh*gw, D), cls.token (1, 1, D) and cls.pos (1, 1, D) (zeros when the
        table has no CLS row) with a CLS token, blocks.N.* (timm's names),
        final_norm.{weight,bias} unless spec.final_norm == "none" (norm or fc_norm),
        norm_pre.{weight,bias} with spec.norm_pre."""
    state = fold_layer_scale(state)
    for i in range(spec.depth):     # proj_bias=False: the missing output biases are zero
        for part in _ZERO_IF_ABSENT:
            key = f"blocks.{i}.{part}"
            if key not in state:
                weight = state[key[: -len("bias")] + "weight"]
                state[key] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    pw = state["patch_embed.proj.weight"]
    out = {"patch.weight": pw,
           "patch.bias": state.get("patch_embed.proj.bias", torch.zeros(pw.shape[0], dtype=pw.dtype))}
    pos = state["pos_embed"]                                                   # (1, [1+]n, D)
    if spec.class_token:
        out["cls.token"] = state["cls_token"]
        out["cls.pos"] = pos[:, :1] if spec.cls_has_pos else torch.zeros_like(pos[:, :1])
        pos = pos[:, 1:] if spec.cls_has_pos else pos
    out["pos.grid"] = pos                                                      # (1, n, D)
    norm = {"tokens": "norm", "pooled": "fc_norm"}.get(spec.final_norm)
    for key, value in state.items():
        if key.startswith("blocks."):
            out[key] = value
        elif norm and key.startswith(norm + "."):
            out["final_norm." + key[len(norm) + 1:]] = value
        elif key.startswith("norm_pre."):
            out[key] = value
    return out


def timm_to_tubevit(state: dict[str, torch.Tensor], spec: ImageViTSpec,
                    image_tube: int) -> dict[str, torch.Tensor]:
    """The image ViT's tensors under TubeViT names (call `inspect_timm` first for `spec`).

    `image_tube` is the index of the TubeViT's 2D tube in `tokenizer.tubes`. The model's
    config carries the norm layout (bootstrap.bootstrap_config): norm_pre.* with norm_pre,
    no norm.* with final_norm none.
    """
    src = image_tensors(state, spec)
    out: dict[str, torch.Tensor] = {}
    t = f"tokenizer.tubes.{image_tube}."
    out[t + "weight"] = src["patch.weight"].unsqueeze(2)                      # (D, C, 1, P, P)
    out[t + "bias"] = src["patch.bias"]                                       # (D,)
    if spec.class_token:
        out["pos_embed.cls_token"] = src["cls.token"]                         # (1, 1, D)
        out["pos_embed.cls_pos"] = src["cls.pos"]                             # (1, 1, D)
    out["pos_embed.grid"] = src["pos.grid"]                                    # (1, n, D)
    for key, value in src.items():
        if key.startswith(("blocks.", "norm_pre.")):
            out[key] = value
        elif key.startswith("final_norm."):                                    # norm or fc_norm
            out["norm." + key[len("final_norm."):]] = value
    return out


def _names(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
