"""The model families and their named sizes; `create_model(name, **overrides)`.

A family is a config dataclass (deriving from family.ModelConfig) and the module built from
it, registered below with its size presets. A size name selects the family and the preset:
`model.name: tubevit-l` in a config file, `create_model("tubevit-l")` in code. The experiment
config (pretrain/train/config.py) reads the families from here, so a family added to
FAMILIES is usable from YAML and the command line with no edit there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from pretrain import config_loader
from pretrain.errors import UserError
from pretrain.model.family import ModelConfig
from pretrain.model.mae import MaskedAutoencoder, MaskedAutoencoderConfig
from pretrain.model.tubevit import TubeViT, TubeViTConfig
from pretrain.model.videomae import VideoMAE, VideoMAEConfig
from pretrain.model.vivit import (TimeSformer, TimeSformerConfig, ViViT, ViViTConfig, ViViTFE, ViViTFEConfig,
                                  ViViTFSA, ViViTFSAConfig)
from pretrain.model.vtn import VTN, VTNConfig


@dataclass(frozen=True)
class ModelFamily:
    config: type[ModelConfig]
    model: Callable[[Any], Any]           # config -> nn.Module
    sizes: dict[str, dict[str, Any]]      # size name -> preset config values
    key: str = "tubevit"                  # the family's name in model files (`family_key`)


# TubeViT sizes, the ViT ladder (the paper's B, L and H plus the small ones):
# name -> (depth, dim, mlp_dim, heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tubevit-ti": (12, 192, 768, 3),
    "tubevit-s": (12, 384, 1536, 6),
    "tubevit-b": (12, 768, 3072, 12),
    "tubevit-l": (24, 1024, 4096, 16),
    "tubevit-h": (32, 1280, 5120, 16),
}

# VideoMAE (pretrain/model/videomae.py): the same ladder over dense 2x16x16 cubes.
VIDEOMAE_SIZES: dict[str, tuple[int, int, int, int]] = {
    "videomae-s": (12, 384, 1536, 6),
    "videomae-b": (12, 768, 3072, 12),
    "videomae-l": (24, 1024, 4096, 16),
    "videomae-h": (32, 1280, 5120, 16),
}


# ViViT models 1-3 and TimeSformer (pretrain/model/vivit.py): the same ladder for each
# family, over its own tokens (ViViT: 2x16x16 tubelets; TimeSformer: 16x16 patches per
# frame). The papers' ViViT-H is ViT-H/14 (tubelet=(2, 14, 14)); the ladder keeps 16 as
# tubevit-h and videomae-h do.
VIVIT_FAMILIES: tuple[str, ...] = ("vivit", "vivit-fe", "vivit-fsa", "timesformer")
VIVIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    f"{family}-{size}": SIZES[f"tubevit-{size}"] for family in VIVIT_FAMILIES for size in ("s", "b", "l", "h")}

# VTN (pretrain/model/vtn.py): the frame backbone on the same ladder; the temporal encoder has
# its width, heads and MLP width (temporal_depth 3, VTN's).
VTN_SIZES: dict[str, tuple[int, int, int, int]] = {f"vtn-{size}": SIZES[f"tubevit-{size}"] for size in ("s", "b", "l", "h")}


def _presets(sizes: dict[str, tuple[int, int, int, int]]) -> dict[str, dict[str, Any]]:
    return {name: dict(zip(("depth", "dim", "mlp_dim", "heads"), size)) for name, size in sizes.items()}


FAMILIES: list[ModelFamily] = [
    ModelFamily(TubeViTConfig, TubeViT, _presets(SIZES), key="tubevit"),
    ModelFamily(VideoMAEConfig, VideoMAE, _presets(VIDEOMAE_SIZES), key="videomae"),
    *(ModelFamily(config, model, _presets({n: v for n, v in VIVIT_SIZES.items() if n.rsplit("-", 1)[0] == key}),
                  key=key)
      for key, config, model in (("vivit", ViViTConfig, ViViT), ("vivit-fe", ViViTFEConfig, ViViTFE),
                                 ("vivit-fsa", ViViTFSAConfig, ViViTFSA),
                                 ("timesformer", TimeSformerConfig, TimeSformer))),
    ModelFamily(VTNConfig, VTN, _presets(VTN_SIZES), key="vtn"),
    # A masked autoencoder (an encoder of the families above + decoder) has no size names:
    # it is built around a model (pretrain/model/mae.py); registered so model files rebuild it.
    ModelFamily(MaskedAutoencoderConfig, MaskedAutoencoder.from_config, {}, key="masked-autoencoder"),
]


def presets() -> dict[str, tuple[type[ModelConfig], dict[str, Any]]]:
    """Every size name -> (its family's config class, its preset values), in listing order."""
    return {name: (family.config, preset) for family in FAMILIES
            for name, preset in family.sizes.items()}


def list_models() -> list[str]:
    return list(presets())


def family_of(config: ModelConfig) -> ModelFamily:
    for family in FAMILIES:
        if type(config) is family.config:
            return family
    raise UserError(f"{type(config).__name__} is not a registered model family's config; "
                    f"registered: {', '.join(f.config.__name__ for f in FAMILIES)}")


def family_named(name: str | None) -> ModelFamily | None:
    """The family a size name belongs to ("vivit-fsa-b" -> vivit-fsa; every size of a family
    is the same family), None for no name or one no family registers. What a run config's
    model.name says its model is: export and resume read a checkpoint's family this way."""
    for family in FAMILIES:
        if name in family.sizes:
            return family
    return None


def family_key(config: ModelConfig) -> str:
    """The name model files store for `config`'s family (metadata "family")."""
    return family_of(config).key


def stored_config(family: str | None, d: dict) -> ModelConfig:
    """Rebuild a stored architecture dict (ModelConfig.to_dict) of the family called `family`;
    None = "tubevit" (files written before model files named their family)."""
    key = family or "tubevit"
    for fam in FAMILIES:
        if fam.key == key:
            return fam.config.from_dict(d)
    raise UserError(f"model family {key!r} is unknown; registered: {', '.join(f.key for f in FAMILIES)}")


def model_config(name: str, **overrides) -> ModelConfig:
    """The config `create_model(name, **overrides)` would build, without building it.

    Overrides are fields of the family's config (TubeViT: `tubes` may be a tube-set name
    such as "paper" or "charades", or a list of TubeSpec / dicts); they are checked like
    config-file keys."""
    table = presets()
    if name not in table:
        raise UserError(f"model {name!r} is unknown; valid names: {', '.join(table)}")
    cls, preset = table[name]
    valid = cls.architecture_keys()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise UserError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(valid)}")
    return config_loader.from_dict(cls, {**preset, **overrides, "name": name},
                                   source=f"create_model({name!r})", allow_derived=True)


def model_from_config(config: ModelConfig, num_classes: dict[str, int] | None = None):
    """The module of `config`'s family, on the current default device (`torch.device('meta')`
    to plan without allocating). `num_classes` (dataset -> classes, from the data) replaces
    the config's heads: an experiment's heads are its data's datasets."""
    if num_classes is not None:
        config = dataclasses.replace(config, num_classes=num_classes)
    return family_of(config).model(config)


def create_model(name: str, **overrides):
    """Build a named model (on the current default device; use `torch.device('meta')` to plan)."""
    return model_from_config(model_config(name, **overrides))


def dense_baseline_config(name: str = "tubevit-b", **overrides) -> TubeViTConfig:
    """Same size, dense ViViT-style 2x16x16 tubelets (3136 tokens on 32x224x224, joint
    attention): the baseline the sparse tubes are compared against. Video only."""
    return model_config(name, **{"tubes": "dense-2x16x16", **overrides})
