"""Self-describing model files: safetensors whose metadata holds the architecture config.

Metadata (all strings, as safetensors requires):
    format          "tubevit-pretrain"
    format_version  "1"
    config          the family config's to_json() (TubeViTConfig, VideoMAEConfig, ...)
    family          the registry's family key ("tubevit", "videomae", "masked-autoencoder");
                    files without it are TubeViTs (written before other families existed)
    ...             anything the writer adds (e.g. source checkpoint, bootstrap gate layer)

`load_model` rebuilds the model from the file alone (local path or any fsspec URI).
Tensors are stored exactly as they are in the state dict (dtype included), so a round trip
is bit-exact.

A masked-pretraining export (family "masked-autoencoder": encoder `encoder.*` + decoder
`decoder.*`, pretrain/model/mae.py) loads whole with `load_model`; `load_encoder` gives the
encoder alone, the decoder dropped, with heads for the datasets it is to train on (what
fine-tuning from it, `model.init_from`, and `pretrain bootstrap --tubes-from` need).
"""
from __future__ import annotations

import dataclasses
import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pretrain import storage
from pretrain.errors import UserError
from pretrain.model.family import ModelConfig
from pretrain.model.registry import family_key, family_of, model_from_config, stored_config

FORMAT = "tubevit-pretrain"
FORMAT_VERSION = "1"
MASKED_FAMILY = "masked-autoencoder"
ENCODER_PREFIX = "encoder."


def save_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a state dict + its architecture config (for writers without a model object,
    e.g. export from a sharded checkpoint). `path` is a local path or fsspec URI."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, config=config.to_json(),
                family=family_key(config))
    # safetensors wants contiguous, unshared CPU tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    storage.write_bytes(path, st_save(tensors, metadata=meta))


def save_model(model: torch.nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `model`'s weights and config to `path` (local or fsspec URI): any registered
    family's model (TubeViT, VideoMAE, a MaskedAutoencoder)."""
    model = getattr(model, "module", model)      # DDP / DeepSpeed engines wrap the model
    model = getattr(model, "_orig_mod", model)   # and so does torch.compile
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise UserError(f"save_model needs a model of a registered family (TubeViT, VideoMAE, "
                        f"MaskedAutoencoder), got {type(model).__name__}")
    family_of(config)   # a UserError for a config no family registers
    save_state_dict(model.state_dict(), config, path, metadata)


def _read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"model file {path} is a folder; give the .safetensors file written by "
                        "pretrain export / bootstrap (e.g. out/model.safetensors)") from None


def _truncated(path: str, have: int, need: int) -> UserError:
    return UserError(f"model file {path} is truncated: {have} bytes of the {need} its header "
                     "describes (an interrupted copy, download or write); copy or export it again")


def _header_metadata(data: bytes, path: str) -> dict[str, str]:
    not_ours = (f"{path} is not a model file written by pretrain export/bootstrap/save_model "
                f"(expected a safetensors file with metadata format={FORMAT!r})")
    if len(data) < 8:
        raise UserError(not_ours)
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 and data[8:9] == b"{":   # a header cut short
        raise _truncated(path, len(data), 8 + n)
    try:
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except Exception:
        raise UserError(not_ours) from None
    if len(data) < 8 + n + end:
        raise _truncated(path, len(data), 8 + n + end)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(not_ours)
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has model format version {meta.get('format_version')!r}; this "
                        f"code reads version {FORMAT_VERSION}")
    return meta


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a model file (config JSON included), without building the model."""
    return _header_metadata(_read(path), path)


def file_config(meta: dict[str, str]) -> ModelConfig:
    """The architecture config stored in a model file's metadata."""
    return stored_config(meta.get("family"), json.loads(meta["config"]))


def is_masked(meta: dict[str, str]) -> bool:
    """Whether a model file holds a masked autoencoder (encoder + decoder)."""
    return meta.get("family") == MASKED_FAMILY


def load_model(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model from a file written by save_model (local path or fsspec URI)."""
    data = _read(path)
    meta = _header_metadata(data, path)
    config = file_config(meta)
    with torch.device("meta"):
        model = model_from_config(config)
    try:
        state = st_load(data)
    except Exception as exc:  # safetensors' own check of what the header says vs the bytes
        raise UserError(f"model file {path} is damaged ({exc}); copy or export it again") from None
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


def load_encoder(path: str, num_classes: dict[str, int] | None = None,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """The classifier model of a model file, with one head per dataset of `num_classes`.

    A masked-pretraining export gives its encoder (the decoder is dropped); any other file its
    model. Heads of the file whose name and size match are kept; others are dropped, and
    datasets without one get a new head initialised like a fresh model's (under the caller's
    torch seed). `num_classes=None` keeps the file's heads. Every other tensor must be in
    the file (a UserError names what is missing)."""
    data = _read(path)
    meta = _header_metadata(data, path)
    config = file_config(meta)
    try:
        state = st_load(data)
    except Exception as exc:  # safetensors' own check of what the header says vs the bytes
        raise UserError(f"model file {path} is damaged ({exc}); copy or export it again") from None
    if is_masked(meta):
        config = stored_config(config.encoder_family, config.encoder)
        state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if num_classes is not None:
        config = dataclasses.replace(config, num_classes=dict(num_classes))
    model = model_from_config(config)          # fresh: the new heads keep this init
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = sorted(k for k in set(own) - set(kept) if not k.startswith("heads."))
    if missing:
        raise UserError(f"{path} lacks tensors its own encoder config needs: {missing[:5]}")
    model.load_state_dict(kept, strict=False)
    return model.to(device)
