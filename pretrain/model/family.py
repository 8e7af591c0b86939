"""What the config of every model family shares: `ModelConfig`.

A family (TubeViT, VideoMAE, ViViT models 1-3, TimeSformer) is one dataclass deriving from
ModelConfig plus the nn.Module built from it, registered with its size names in
pretrain/model/registry.py. The experiment's `model` section *is* that dataclass: the config
loader (pretrain/config_loader.py) checks its fields' types and min/max/choices metadata, so
a field added to a family is settable from YAML and the command line with no second edit.

`name` and `init_from` say where a model comes from, not what it is: they are left out of
`to_dict()`, the architecture that model files and checkpoint manifests store and that a
resume compares, and out of equality (equal configs build the same network).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from pretrain import config_loader
from pretrain.config_loader import config_field
from pretrain.errors import UserError


@dataclass
class ModelConfig:
    name: str | None = config_field(
        None, "model size name: selects the family and its size preset (the defaults of "
        "`pretrain config keys model --model NAME`); null for a config rebuilt from a model "
        "file", compare=False)
    init_from: str | None = config_field(
        None, "start from this model file (safetensors, see load_model) instead of a fresh "
        "initialisation", compare=False)

    def validate(self) -> None:
        """Cross-field rules of the family (field types and ranges are the loader's)."""

    def to_dict(self) -> dict:
        """The architecture as plain JSON-safe values (model files, checkpoint manifests)."""
        d = config_loader.to_dict(self, derived=True)
        for name in _ORIGIN_FIELDS:
            d.pop(name)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild from `to_dict()` output, with every check of the config loader."""
        valid = [f.name for f in dataclasses.fields(cls) if f.name not in _ORIGIN_FIELDS]
        unknown = set(d) - set(valid)
        if unknown:  # a stored architecture never holds name/init_from
            raise UserError(f"model config has unknown keys {sorted(unknown)}; valid keys: "
                            f"{', '.join(sorted(valid))}")
        return config_loader.from_dict(cls, d, source="a stored model config", allow_derived=True)

    @classmethod
    def architecture_keys(cls) -> list[str]:
        """The fields that define the network (all but name and init_from)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _ORIGIN_FIELDS]


_ORIGIN_FIELDS = ("name", "init_from")
