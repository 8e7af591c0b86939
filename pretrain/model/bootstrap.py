"""Image-to-video bootstrapping (TubeViT paper, "Image-To-Video Scaling"): a large image ViT
+ a small TubeViT's tube kernels -> a large video TubeViT that starts out computing exactly
what the image ViT computed.

    small = load_model("tubevit-b.safetensors")                 # trained jointly, any width d
    model, meta = bootstrap(read_state_dict("vit_h14.pth"), small, gate_layer=24)
    save_model(model, "vit-h-video.safetensors", meta)           # what `pretrain bootstrap` does

What the bootstrapped model is made of:

- 2D tokens: the image ViT's own patch embedding (`tokenizer.tubes[i]`, kernel 1xPxP,
  spatial stride P; temporal stride and offset of the small model's image tube), its own
  learned position table and CLS token (`pos_embed="learned"`, see posembed.py), blocks and
  norms, in every timm layout image_vit_weights.py accepts: LayerScale (folded), norm_pre
  (config `norm_pre`, CLIP-style), the final norm on tokens (`norm`), after pooling
  (`fc_norm`: it becomes the token norm, as the attention pool after it is new) or none
  (config `final_norm: none`). So on images `forward_features` equals the image ViT's
  (timm's) exactly (with fc_norm: timm's fc_norm on each of its tokens).
- 3D tokens: the small model's non-image tubes, same geometry (kernels, strides, offsets,
  space-to-depth; with the space-to-depth width map a larger factor), their kernels reused
  without training, taken from width d to the large width D without new trained weights
  (width mapping, below). The small model's own 2D tube is not used.
- Gated skip at block S (`gate_layer`, 0-based): the output of `blocks[S]` gets
  `tanh(alpha) * z_0` added, z_0 = tokens + positions (the blocks' input), alpha = 0. With
  `blocks[S]` = `y_S + MLP(LN(y_S))`, `y_S = z_{S-1} + MSA(LN(z_{S-1}))`, that is exactly the
  paper's `z_S = MLP(LN(y_S)) + y_S + tanh(alpha) * z_0`.
- New, randomly initialised (seeded): the attention pool and one linear head per dataset.

Index convention: S counts blocks from 0. `freeze="prefix"` freezes the tokenizer, the
positions/CLS token, norm_pre (if any) and `blocks[:S]`; `blocks[S:]`, the gate, the final
norm, the pool and the heads train, i.e. the last `depth - S` blocks. The paper's "gate at the 26th of 32
layers" (1-based) is S=25 (7 trained blocks); its best bootstrap result trains "+8 layers
with the gate", which is S=24 on ViT-H (32 blocks) and what configs/bootstrap-h.yaml uses.

Width mapping d -> D (`width_map`, stored in the output file's metadata with its seed):

- "s2d" (the paper's: "space-to-depth to create tokens with the proper channel dimensions
  without needing new weights"), when D = k d for an integer k > 1 (Ti -> B is 4x): every 3D
  tube keeps its kernel, stride and offset, and its space-to-depth factor grows k-fold (k
  split 2x2-style over h and w when k is a square and the strides allow it, else on t, h or
  w): the conv runs at a k-times finer stride and k times as many neighbours are packed into
  one token, so the D/(k S) = d/S output channels of the small kernel are reused unchanged.
  The new factors are the tube's `s2d_outer` (tubes.py): the large token is k small-layout
  tokens side by side, the first being the small model's own token exactly (bias repeated k
  times). What is kept, for every tube alike: the first d channels of each large token are
  the small token, so the Gram matrix of tube tokens across all tubes restricted to them is
  the small model's exactly; on a spatially constant clip (every extra neighbour sees the
  same pixels) the whole large Gram matrix is k times the small one: same cosines across all
  tubes. The other channels are new samples of the same learned filters between the old
  ones, which is the paper's point.
- "isometry" for every other ratio (B -> H: 1280/768 is not an integer) or on request: ONE
  fixed, seeded, semi-orthogonal map Q (D x d, Q^T Q = I) applied to every tube's d-wide
  token, so the tube tokens' norms and mutual inner products are kept across all tubes (the
  Gram matrix of all tube tokens is unchanged). Q is block diagonal with m equal blocks q
  (D/m x d/m), m the least common multiple of the tubes' space-to-depth factors: then a tube
  with factor S sees the same (D/S x d/S) block map for each of its S neighbours, and Q is
  folded into its kernel (D/S outputs) and bias, so the file is an ordinary TubeViT with the
  small model's tube geometry. Needs d and D divisible by m. (The earlier version drew a
  different matrix per space-to-depth factor: an isometry within each tube, but inner
  products across tubes were not kept.) For D < d the same Q has orthonormal rows: an
  orthogonal projection, lossy but allowed.
- "identity" when D = d.
- "auto" (the default): s2d when D/d is an integer > 1 and every 3D tube's strides take the
  larger factor, identity when D = d, else isometry.

Charades (the paper's route, `enlarge_model`): a trained model's tube kernels enlarged by
trilinear interpolation to new shapes, strides and offsets kept (tubes.enlarge_kernel,
volume-rescaled); `pretrain bootstrap --tubes-from FILE --enlarge-kernels charades --out
FILE` writes it, with or without an image checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import struct
from typing import Any, Callable

import torch

from pretrain import storage
from pretrain.errors import UserError
from pretrain.model.bootstrap_config import BootstrapConfig
from pretrain.model.image_vit_weights import ImageViTSpec, inspect_timm, timm_to_tubevit
from pretrain.model.io import FORMAT, FORMAT_VERSION
from pretrain.model.tubes import (AXES, TubeSpec, enlarge_kernel, enlarge_tubes, image_tube_index,
                                  resolve_tubes)
from pretrain.model.tubevit import TubeViT, TubeViTConfig

WIDTH_MAPS = ("auto", "s2d", "isometry")

# New (not imported) parts of a bootstrapped model: initialised here, always trainable.
_NEW = re.compile(r"^(pool\.|heads\.|gate\.)")


# ---- width mapping ----------------------------------------------------------------------------

def width_projection(d_from: int, d_to: int, seed: int) -> torch.Tensor:
    """(d_to, d_from) semi-orthogonal float64 matrix, deterministic in (d_from, d_to, seed)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + d_from * 4099 + d_to)
    a = torch.randn(max(d_to, d_from), min(d_to, d_from), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)                                  # (max, min), orthonormal columns
    q = q * torch.sign(torch.diagonal(r))                      # unique: positive diag of r
    return q if d_to >= d_from else q.T                        # (d_to, d_from)


def shared_isometry(d_from: int, d_to: int, blocks: int, seed: int) -> torch.Tensor:
    """(d_to, d_from) block-diagonal semi-orthogonal float64 matrix: `blocks` copies of one
    width_projection(d_from/blocks, d_to/blocks, seed). Q^T Q = I when d_to >= d_from."""
    if d_from % blocks or d_to % blocks:
        raise UserError(f"bootstrap: the width map needs both widths divisible by {blocks} (the least "
                        f"common multiple of the tubes' space-to-depth factors); got {d_from} -> {d_to}")
    q = width_projection(d_from // blocks, d_to // blocks, seed)
    return torch.block_diag(*[q] * blocks)


def map_tube_width(weight: torch.Tensor, bias: torch.Tensor, s2d_factor: int, q: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tube's kernel (d/S, C, kt, kh, kw) and bias (d,) through the shared map q (D x d,
    block diagonal with S | its block count) -> (D/S, C, ...) and (D,) = q @ token.

    The bias is laid out neighbour-major like the packed channels; each neighbour's d/S
    channels map through the same leading (D/S x d/S) block of q.
    """
    S = s2d_factor
    d_to, d_from = q.shape
    if d_to % S or d_from % S:
        raise UserError(f"bootstrap: the large width {d_to} is not divisible by a tube's "
                        f"space-to-depth factor {S}")
    qn = q[: d_to // S, : d_from // S]
    if S > 1 and not torch.equal(q, torch.block_diag(*[qn] * S)):
        raise UserError(f"bootstrap: the shared width map's block count is not divisible by a tube's "
                        f"space-to-depth factor {S}")
    w = torch.einsum("oi,i...->o...", qn, weight.double())   # (D/S, C, kt, kh, kw)
    b = q @ bias.double()                                      # (D,) neighbour-major
    return w.to(weight.dtype), b.to(bias.dtype)


def widen_by_s2d(spec: TubeSpec, k: int) -> TubeSpec | None:
    """`spec` with its space-to-depth factor k times larger (the paper's width map for
    D = k d), or None when no split of k fits its strides. Prefers sqrt(k) on h and w."""
    if spec.s2d_outer is not None:     # widened once already: no third neighbour level
        return None
    r = math.isqrt(k)
    extras = ([(1, r, r)] if r * r == k and r > 1 else []) + [(k, 1, 1), (1, k, 1), (1, 1, k)]
    for extra in extras:
        new = tuple(f * e for f, e in zip(spec.factors, extra))
        if any(s % f for s, f in zip(spec.stride, new)):
            continue
        named = [(a, f) for a, f in zip(AXES, new) if f > 1]
        split = tuple(f for _, f in named)
        return TubeSpec(spec.kernel, spec.stride, spec.offset, "".join(a for a, _ in named),
                        math.prod(split), None if len(set(split)) == 1 else split, extra)
    return None


def widen_bias_by_s2d(bias: torch.Tensor, small: TubeSpec, large: TubeSpec) -> torch.Tensor:
    """The large tube's bias (D,): the small bias once per outer neighbour group (the large
    token is k copies of the small token layout, see TubeSpec.s2d_outer)."""
    return bias.repeat(large.s2d_factor // small.s2d_factor)


def choose_width_map(small: TubeViT, d_to: int, width_map: str = "auto") -> str:
    """The width map bootstrap() uses: "s2d", "isometry" or "identity" (see the docstring)."""
    sc = small.config
    i_img = image_tube_index(sc.tubes)
    if width_map not in WIDTH_MAPS:
        raise UserError(f"bootstrap: width map {width_map!r} is unknown; valid: {', '.join(WIDTH_MAPS)}")
    k, rest = divmod(d_to, sc.dim)
    fits = rest == 0 and k > 1 and all(widen_by_s2d(t, k) is not None
                                       for i, t in enumerate(sc.tubes) if i != i_img)
    if width_map == "s2d":
        if not fits:
            raise UserError(f"bootstrap: width_map=s2d needs the large width {d_to} to be an integer "
                            f"multiple k > 1 of the small one {sc.dim} and every 3D tube's strides to "
                            "take a k-times larger space-to-depth factor; use width_map=isometry")
        return "s2d"
    if width_map == "isometry":
        return "isometry"
    if d_to == sc.dim:
        return "identity"
    return "s2d" if fits else "isometry"


# ---- building ---------------------------------------------------------------------------------

def bootstrap_config(spec: ImageViTSpec, small: TubeViT, gate_layer: int,
                     num_classes: dict[str, int] | None = None, width_map: str = "auto") -> TubeViTConfig:
    """The bootstrapped model's architecture: the image ViT's shape, the small model's tubes."""
    sc = small.config
    i_small = image_tube_index(sc.tubes)
    if i_small is None:
        raise UserError("bootstrap: the small TubeViT has no 2D image tube, so there is no place for "
                        "the image ViT's patch embedding; train the small model with a tube set that "
                        "has one (e.g. tubes='paper')")
    if not 0 <= gate_layer < spec.depth:
        raise UserError(f"bootstrap: gate layer {gate_layer} is not a block of the {spec.depth}-block "
                        f"image ViT; valid: 0..{spec.depth - 1} (0-based; S trains blocks S..{spec.depth - 1})")
    if spec.in_chans != sc.in_chans:
        raise UserError(f"bootstrap: the image ViT takes {spec.in_chans} channels, the small TubeViT "
                        f"{sc.in_chans}")
    img = sc.tubes[i_small]
    P = spec.patch
    tubes = list(sc.tubes)
    if choose_width_map(small, spec.dim, width_map) == "s2d":
        k = spec.dim // sc.dim
        tubes = [t if i == i_small else widen_by_s2d(t, k) for i, t in enumerate(tubes)]
    tubes[i_small] = TubeSpec((1, P, P), (img.stride[0], P, P), (img.offset[0], 0, 0))
    return TubeViTConfig(
        depth=spec.depth, dim=spec.dim, mlp_dim=spec.mlp_dim, heads=spec.heads, tubes=tubes,
        kernel_mode="separate", num_classes=dict(num_classes or sc.num_classes),
        skip_unfit_tubes=sc.skip_unfit_tubes, unfit_tubes=sc.unfit_tubes, in_chans=sc.in_chans, qkv_bias=spec.qkv_bias,
        norm_eps=1e-6, gate_layer=gate_layer, pos_embed="learned", pos_grid=spec.grid,
        class_token=spec.class_token, norm_pre=spec.norm_pre,
        # fc_norm becomes the token norm before the (new) attention pool: image_vit_weights.py
        final_norm="none" if spec.final_norm == "none" else "tokens")


def bootstrap(image_state: dict[str, torch.Tensor], small: TubeViT, gate_layer: int, *,
              num_classes: dict[str, int] | None = None, heads: int | None = None,
              seed: int = 0, source: str = "image checkpoint",
              width_map: str = "auto") -> tuple[TubeViT, dict[str, str]]:
    """(bootstrapped model, metadata for its file). See the module docstring."""
    spec = inspect_timm(image_state, heads=heads, source=source)
    method = choose_width_map(small, spec.dim, width_map)
    config = bootstrap_config(spec, small, gate_layer, num_classes, method)
    config.validate()
    torch.manual_seed(seed)          # the new pool and heads
    model = TubeViT(config)
    i_img = image_tube_index(config.tubes)
    state = timm_to_tubevit(image_state, spec, i_img)
    tok = small.tokenizer
    small_tubes = small.config.tubes
    blocks = math.lcm(*[t.s2d_factor for i, t in enumerate(small_tubes) if i != i_img] or [1])
    q = shared_isometry(small.config.dim, config.dim, blocks, seed) if method == "isometry" else None
    for i, tube_spec in enumerate(config.tubes):
        if i == i_img:
            continue
        w, b = tok.kernel(i).detach(), tok.tubes[i].bias.detach()
        if method == "isometry":
            w, b = map_tube_width(w, b, small_tubes[i].s2d_factor, q)
        elif method == "s2d":
            b = widen_bias_by_s2d(b, small_tubes[i], tube_spec)
        state[f"tokenizer.tubes.{i}.weight"], state[f"tokenizer.tubes.{i}.bias"] = w.clone(), b.clone()
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(_NEW.match(k) for k in missing), (missing, unexpected)
    meta = {
        "bootstrap": "1",
        "image_vit": spec.describe(),
        "image_checkpoint": source,
        "tubes_from": json.dumps(small.config.to_dict(), sort_keys=True),
        "gate_layer": str(gate_layer),
        "gate_convention": "0-based block index S: blocks[S] output += tanh(alpha)*z0; freeze blocks[:S]",
        "width_map": f"{_width_map_name(method, small.config.dim, config.dim, blocks)} "
                     f"d={small.config.dim} -> D={config.dim}",
        "width_map_seed": str(seed),
    }
    return model, meta


def _width_map_name(method: str, d_from: int, d_to: int, blocks: int) -> str:
    if method == "s2d":
        return f"space-to-depth x{d_to // d_from}"
    if method == "isometry":
        return f"shared-isometry ({blocks} block{'s' if blocks > 1 else ''})"
    return method


def enlarge_model(model: TubeViT, kernels) -> TubeViT:
    """A trained TubeViT with its tube kernels enlarged by interpolation (the paper's route to
    its Charades model): `kernels` is one (t, h, w) shape per tube, in the model's tube order,
    or a tube-set name whose kernels are taken (e.g. "charades": 16x16x16, 32x8x8, 4x32x32,
    1x16x16 for the paper's four tubes). Strides, offsets and space-to-depth of the model's
    own tubes are kept; separate kernels go through tubes.enlarge_kernel (trilinear,
    volume-rescaled so a trained kernel keeps its response scale); in interpolated kernel mode
    the shared base kernel stays and only the tube shapes change. Every other tensor is
    copied."""
    if isinstance(kernels, str):
        kernels = [t.kernel for t in resolve_tubes(kernels)]
    tubes = enlarge_tubes(model.config.tubes, kernels)
    config = dataclasses.replace(model.config, tubes=tubes)
    config.validate()
    new = TubeViT(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, tube in enumerate(tubes):
        key = f"tokenizer.tubes.{i}.weight"
        if key in state:
            state[key] = enlarge_kernel(state[key], tube.kernel)
    new.load_state_dict(state)
    return new


# ---- freezing ---------------------------------------------------------------------------------

def frozen_prefix(name: str, gate_layer: int) -> bool:
    """Whether parameter `name` is in the frozen prefix: tokenizer, positions, norm_pre,
    blocks[:S] (norm_pre feeds the frozen blocks: training it would move their input)."""
    if name.startswith(("tokenizer.", "pos_embed.", "norm_pre.")):
        return True
    m = re.match(r"^blocks\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) < gate_layer


def apply_freeze(model: TubeViT, mode: str = "prefix", gate_layer: int | None = None) -> list[str]:
    """Set requires_grad per `mode` ("prefix" | "none"); returns the trainable parameter names."""
    gate_layer = model.config.gate_layer if gate_layer is None else gate_layer
    if mode not in ("prefix", "none"):
        raise UserError(f"bootstrap.freeze is {mode!r}; valid: prefix, none")
    if mode == "prefix" and gate_layer is None:
        raise UserError("bootstrap.freeze='prefix' needs a gate layer: the model file has none and "
                        "bootstrap.gate_layer is not set")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "none" or not frozen_prefix(name, gate_layer))
        if p.requires_grad:
            trainable.append(name)
    return trainable


# ---- loading for training ---------------------------------------------------------------------

def iter_model_file(path: str):
    """(metadata, generator of (name, tensor)) reading one tensor at a time, so a large file
    never sits in memory whole (local path or fsspec URI)."""
    try:
        f = storage.open_read(path)
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist") from None
    (n,) = struct.unpack("<Q", f.read(8))
    header_bytes = f.read(n)
    # The header alone (the tensors are read one at a time below): io's checks of the whole
    # file's length would read it all.
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise UserError(f"{path} is not a model file of this project") from None
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"{path} is not a model file of this project")
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32}

    def tensors():
        try:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                f.seek(8 + n + start)
                buf = bytearray(f.read(end - start))
                t = torch.frombuffer(buf, dtype=dtypes[info["dtype"]]) if buf else torch.empty(0, dtype=dtypes[info["dtype"]])
                yield name, t.reshape(info["shape"])
        finally:
            f.close()
    return meta, tensors()


def init_from_file(cfg: BootstrapConfig, num_classes: dict[str, int] | None = None, *,
                   build_context: Callable[[], Any] = contextlib.nullcontext,
                   gather: Callable[[list[torch.nn.Parameter]], Any] | None = None,
                   seed: int = 0) -> TubeViT:
    """The model of `cfg.init_from`, with heads for `num_classes` and `cfg.freeze` applied.

    Heads whose name and size match the file's are loaded; others are created fresh (seeded)
    and the file's extra heads dropped, so a bootstrapped file trains on any datasets.
    `cfg.gate_layer` may move the gate (only while the file's alpha is still 0).

    ZeRO-3 (from the training code, which owns DeepSpeed): `build_context()` wraps model
    construction (deepspeed.zero.Init: parameters are partitioned as they are made) and
    `gather([p])` makes one parameter whole and writable while it is loaded
    (GatheredParameters(..., modifier_rank=0)); tensors are read one at a time, so no rank
    ever holds the whole model.
    """
    path = cfg.init_from
    meta, tensors = iter_model_file(path)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a model file of this project")
    config = TubeViTConfig.from_dict(json.loads(meta["config"]))
    if num_classes:
        config.num_classes = dict(num_classes)
    moved = cfg.gate_layer is not None and cfg.gate_layer != config.gate_layer
    if cfg.gate_layer is not None:
        config.gate_layer = cfg.gate_layer
    config.validate()
    torch.manual_seed(seed)
    with build_context():
        model = TubeViT(config)
    params = dict(model.named_parameters())
    gather = gather or (lambda ps: contextlib.nullcontext())
    loaded = set()
    for name, tensor in tensors:
        if name == "gate.alpha" and moved and float(tensor) != 0.0:
            raise UserError(f"bootstrap.gate_layer={cfg.gate_layer} moves the gate of {path} (at "
                            f"{json.loads(meta['config'])['gate_layer']}), but its alpha is already "
                            f"trained ({float(tensor):.4g}); use the file's gate layer")
        p = params.get(name)
        shape = None if p is None else tuple(getattr(p, "ds_shape", p.shape))
        if name == "gate.alpha" and shape is not None:
            tensor = tensor.reshape(shape)   # files with the older 0-dim alpha
        if shape != tuple(tensor.shape):
            continue   # a dropped head, a resized head, or no gate in this config
        with gather([p]), torch.no_grad():
            if p.numel():   # non-empty: this rank holds it whole (always, without ZeRO-3)
                p.copy_(tensor)
        loaded.add(name)
    fresh = sorted(set(params) - loaded)
    not_new = [n for n in fresh if not _NEW.match(n)]
    if not_new:
        raise UserError(f"{path} lacks tensors its own config needs: {not_new[:5]}")
    for name in fresh:   # heads for new datasets, or a gate the file did not have
        p = params[name]
        with gather([p]), torch.no_grad():
            if p.numel():
                if name.endswith(".weight"):
                    torch.nn.init.trunc_normal_(p, std=0.02)
                else:
                    torch.nn.init.zeros_(p)
    apply_freeze(model, cfg.freeze, config.gate_layer)
    return model


def trainable_summary(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (full sizes, also under ZeRO-3)."""
    count = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731
    ps = list(model.parameters())
    return {"trainable": count(p for p in ps if p.requires_grad),
            "frozen": count(p for p in ps if not p.requires_grad)}

