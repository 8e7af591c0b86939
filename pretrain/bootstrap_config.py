"""Config section `bootstrap` (image-to-video bootstrapping, pretrain/model/bootstrap.py).

Kept apart from the model package so the config tree (pretrain/train/config.py) loads
without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.errors import UserError


@dataclass
class BootstrapConfig:
    """Start training from a `pretrain bootstrap` model file, with its prefix frozen."""

    init_from: str | None = field(default=None, metadata={
        "help": "model file written by `pretrain bootstrap` (local path or fsspec URI); null = no bootstrap"})
    freeze: Literal["prefix", "none"] = field(default="prefix", metadata={
        "help": "prefix: freeze the tokenizer, positions and blocks before the gate layer (train "
                "blocks from the gate layer on, the gate, final norm, pool and heads); none: train all"})
    gate_layer: int | None = field(default=None, metadata={
        "help": "0-based block of the gated skip and first trained block; null = the file's", "min": 0})

    def validate(self) -> None:
        if self.init_from is None and self.gate_layer is not None:
            raise UserError("config key 'bootstrap.gate_layer' is set but 'bootstrap.init_from' is not; "
                            "give the model file written by `pretrain bootstrap`")
