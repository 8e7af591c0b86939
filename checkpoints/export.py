"""Consolidated model weights from a sharded DeepSpeed checkpoint, with bounded memory.

The fp32 master weights live in the ZeRO optimizer shards next to Adam's moments (about 3x
the weights). Every shard is opened with `torch.load(mmap=True)`, so only the byte ranges of
the master weights are ever read (file-backed pages, not a RAM copy of the optimizer state),
and each parameter is assembled on its own from the slices the ranks hold:

- ZeRO-1/2: per parameter group, the ranks' flat fp32 partitions concatenated in rank order
  hold the parameters back to back (in `param_shapes` order).
- ZeRO-3: each parameter is split into world-size equal slices (the last one padded); rank
  r's flat fp32 groups hold its slice of every parameter back to back. Frozen parameters
  are not in the optimizer: their slices sit in each rank's model-state file
  (`frozen_param_fragments`).
- ZeRO-0: the module state dict in mp_rank_00_model_states.pt is already whole.

Buffers come from the module state dict. The result is written with
pretrain.model.save_state_dict and the architecture config from the manifest, so
pretrain.model.load_model reads it. The manifest's config is of whichever model family the
run trained (`stored_model_config`): a masked-pretraining checkpoint exports its whole
masked autoencoder (encoder + decoder, family "masked-autoencoder"); fine-tuning from the
file takes the encoder (pretrain.model.io.load_encoder).
"""
from __future__ import annotations

import glob
import math
import os
import re
import tempfile

import torch

from pretrain.errors import UserError

from . import safe_load
from .discovery import CheckpointInfo, resolve
from .restore import CheckpointDamaged, fetch, run_model_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _load(path: str) -> dict:
    return safe_load.load(path, mmap=True)   # weights_only: a checkpoint file runs no code


def _read_range(flats: list[torch.Tensor], start: int, n: int) -> torch.Tensor:
    """Elements [start, start+n) of the virtual concatenation of 1-D tensors `flats`."""
    out = torch.empty(n, dtype=torch.float32)
    filled, base = 0, 0
    for t in flats:
        size = t.numel()
        lo, hi = max(start, base), min(start + n, base + size)
        if lo < hi:
            out[filled:filled + hi - lo].copy_(t[lo - base:hi - base])
            filled += hi - lo
        base += size
        if base >= start + n:
            break
    if filled != n:
        raise UserError(f"checkpoint shards hold {filled} of the {n} values expected at offset {start}; "
                        "the checkpoint is damaged or not a ZeRO checkpoint of this model")
    return out


def _rank_of(path: str) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))


def consolidate(folder: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a local DeepSpeed checkpoint folder (one tag)."""
    optim_files = sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_*_optim_states.pt")), key=_rank_of)
    z3_models = sorted(glob.glob(os.path.join(folder, "zero_pp_rank_*_model_states.pt")), key=_rank_of)
    out: dict[str, torch.Tensor] = {}
    if z3_models:  # ZeRO-3
        models = [_load(f) for f in z3_models]
        flats = [list(_load(f)["optimizer_state_dict"]["fp32_flat_groups"]) for f in optim_files]
        world = len(flats)
        shapes = [(k, v) for group in models[0]["param_shapes"] for k, v in group.items()]
        offset = 0
        for name, shape in shapes:
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [_read_range(flats[r], offset, part) for r in range(world)]
            out[name] = torch.cat(pieces)[:numel].view(*shape)                  # (*shape)
            offset += part
        # Frozen parameters (requires_grad=False) have no optimizer state: every rank's
        # model-state file holds its equal slice of each one, in the same order.
        for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
            numel = math.prod(shape)
            frags = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
            out[name] = torch.cat(frags)[:numel].float().view(*shape)              # (*shape)
        module = models[0]["module"]
    else:
        model_file = os.path.join(folder, "mp_rank_00_model_states.pt")
        if not os.path.isfile(model_file):
            raise UserError(f"{folder} holds no DeepSpeed model states "
                            "(mp_rank_00_model_states.pt or zero_pp_rank_*_model_states.pt)")
        ms = _load(model_file)
        module = ms["module"]
        if optim_files and ms.get("param_shapes"):  # ZeRO-1/2: fp32 masters in the shards
            groups = [_load(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
                      for f in optim_files]
            for i, shapes in enumerate(ms["param_shapes"]):
                flats = [g[i] for g in groups]      # rank order = position in the flat vector
                offset = 0
                for name, shape in shapes.items():
                    numel = math.prod(shape)
                    out[name] = _read_range(flats, offset, numel).view(*shape)
                    offset += numel
            for name, frag in (ms.get("frozen_param_fragments") or {}).items():
                out[name] = frag.float().clone()
        else:  # ZeRO-0: the module state is complete
            for name, t in module.items():
                out[name] = t.float().clone()
        models = [ms]
    for name in models[0].get("buffer_names") or []:
        if name in module:
            out[name] = module[name].clone()
    for name, src in (models[0].get("shared_params") or {}).items():
        if src in out:
            out[name] = out[src]
    return out


def stored_model_config(d: dict, name: str | None = None):
    """The model config a manifest records. `name` (the run config's model.name, which every
    manifest `pretrain run` writes holds) says its family: ViViT, its factorised variants and
    TimeSformer share most keys, so the keys alone cannot tell them apart. Without a name (or
    when the named family does not read it: a masked run names its encoder), the one
    registered family whose keys it has (TubeViT's tubes, VideoMAE's tubelet, a masked
    autoencoder's encoder and decoder)."""
    from pretrain.model.registry import FAMILIES, family_named, stored_config

    named = family_named(name)
    if named is not None:
        try:
            return stored_config(named.key, d)
        except UserError:
            pass
    errors = []
    for family in FAMILIES:
        try:
            return family.config.from_dict(d)
        except UserError as exc:
            errors.append(f"{family.key}: {exc}")
    raise UserError("the model config is not one of a registered family (" + "; ".join(errors) + ")")


def export_checkpoint(uri: str, out: str, dtype: str = "fp32", local_dir: str | None = None) -> dict:
    """Write the model of checkpoint `uri` (a step folder or a run's root) to `out`.

    Returns a summary: source URI, step, tensors, params, bytes written."""
    from pretrain.model import model_from_config, save_state_dict

    if dtype not in DTYPES:
        raise UserError(f"export dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")
    info: CheckpointInfo = resolve(uri)
    manifest = info.manifest
    if not manifest.model_config:
        raise UserError(f"checkpoint {info.uri} records no model config in its manifest, so the "
                        "exported file could not describe the model; it was not written by "
                        "`pretrain run`")
    try:
        config = stored_model_config(manifest.model_config, run_model_name(manifest.config))
    except Exception as exc:
        raise UserError(f"checkpoint {info.uri} has a model config no model family reads "
                        f"({exc})") from None
    with tempfile.TemporaryDirectory(dir=local_dir, prefix="export-") as tmp:
        try:
            folder = fetch(info, tmp)
        except CheckpointDamaged as exc:
            raise CheckpointDamaged(f"{exc}. Export another step: `pretrain checkpoints list "
                                    f"{info.uri.rsplit('/', 1)[0]}` shows which ones verify") from None
        state = consolidate(folder)
        with torch.device("meta"):
            expected = set(model_from_config(config).state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(f"checkpoint {info.uri} does not match its model config: missing "
                            f"tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        target = DTYPES[dtype]
        state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
        save_state_dict(state, config, out, metadata={"source_checkpoint": info.uri,
                                                      "step": str(info.step), "dtype": dtype})
    params = sum(v.numel() for v in state.values())
    return {"checkpoint": info.uri, "step": info.step, "out": out, "dtype": dtype,
            "tensors": len(state), "params": params,
            "bytes": os.path.getsize(out) if os.path.exists(out) else None}
