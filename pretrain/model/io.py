"""Self-describing model files: safetensors whose metadata holds the architecture config.

Metadata (all strings, as safetensors requires):
    format          "tubevit-pretrain"
    format_version  "1"
    config          TubeViTConfig.to_json()
    ...             anything the writer adds (e.g. source checkpoint, bootstrap gate layer)

`load_model` rebuilds the model from the file alone (local path or any fsspec URI).
Tensors are stored exactly as they are in the state dict (dtype included), so a round trip
is bit-exact.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pretrain import storage
from pretrain.errors import UserError
from pretrain.model.tubevit import TubeViT, TubeViTConfig

FORMAT = "tubevit-pretrain"
FORMAT_VERSION = "1"


def save_state_dict(state_dict: dict[str, torch.Tensor], config: TubeViTConfig, path: str,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a state dict + its architecture config (for writers without a model object,
    e.g. export from a sharded checkpoint). `path` is a local path or fsspec URI."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, config=config.to_json())
    # safetensors wants contiguous, unshared CPU tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    storage.write_bytes(path, st_save(tensors, metadata=meta))


def save_model(model: TubeViT, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `model`'s weights and config to `path` (local or fsspec URI)."""
    model = getattr(model, "module", model)      # DDP / DeepSpeed engines wrap the model
    model = getattr(model, "_orig_mod", model)   # and so does torch.compile
    if not isinstance(model, TubeViT):
        raise UserError(f"save_model needs a TubeViT, got {type(model).__name__}")
    save_state_dict(model.state_dict(), model.config, path, metadata)


def _read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist") from None


def _header_metadata(data: bytes, path: str) -> dict[str, str]:
    not_ours = (f"{path} is not a model file written by pretrain export/bootstrap/save_model "
                f"(expected a safetensors file with metadata format={FORMAT!r})")
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
    except Exception:
        raise UserError(not_ours) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(not_ours)
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has model format version {meta.get('format_version')!r}; this "
                        f"code reads version {FORMAT_VERSION}")
    return meta


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a model file (config JSON included), without building the model."""
    return _header_metadata(_read(path), path)


def load_model(path: str, device: str | torch.device = "cpu") -> TubeViT:
    """Rebuild a model from a file written by save_model (local path or fsspec URI)."""
    data = _read(path)
    meta = _header_metadata(data, path)
    config = TubeViTConfig.from_dict(json.loads(meta["config"]))
    with torch.device("meta"):
        model = TubeViT(config)
    state = st_load(data)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{path} does not match its own config: missing tensors {missing[:5]}, "
                        f"unexpected tensors {unexpected[:5]}")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:  # shapes that contradict the stored config
        raise UserError(f"{path} does not match its own config: {str(exc).splitlines()[-1].strip()}") from None
    return model.to(device)
