"""Config section `bootstrap`: start training from a model file written by `pretrain bootstrap`
(image-to-video bootstrapping, pretrain/model/bootstrap.py), with its prefix frozen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config_loader import config_field
from pretrain.errors import UserError


@dataclass
class BootstrapConfig:
    """Start training from a `pretrain bootstrap` model file, with its prefix frozen."""

    init_from: str | None = config_field(
        None, "model file written by `pretrain bootstrap` (local path or fsspec URI); null = no "
        "bootstrap")
    freeze: Literal["prefix", "none"] = config_field(
        "prefix", "prefix: freeze the tokenizer, positions and blocks before the gate layer (train "
        "blocks from the gate layer on, the gate, final norm, pool and heads); none: train all")
    gate_layer: int | None = config_field(
        None, "0-based block of the gated skip and first trained block; null = the file's", min=0)

    def validate(self) -> None:
        if self.init_from is None and self.gate_layer is not None:
            raise UserError("config key 'bootstrap.gate_layer' is set but 'bootstrap.init_from' is not; "
                            "give the model file written by `pretrain bootstrap`")
