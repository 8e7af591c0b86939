"""Named model sizes (tubevit.md section 5) and `create_model(name, **overrides)`."""
from __future__ import annotations

import dataclasses

from pretrain.errors import UserError
from pretrain.model.tubevit import TubeViT, TubeViTConfig

# name -> (depth, dim, mlp_dim, heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tubevit-ti": (12, 192, 768, 3),
    "tubevit-s": (12, 384, 1536, 6),
    "tubevit-b": (12, 768, 3072, 12),
    "tubevit-l": (24, 1024, 4096, 16),
    "tubevit-h": (32, 1280, 5120, 16),
}


def list_models() -> list[str]:
    return list(SIZES)


def model_config(name: str, **overrides) -> TubeViTConfig:
    """The config `create_model(name, **overrides)` would build, without building it.

    Overrides are TubeViTConfig fields; `tubes` may be a tube-set name ("paper",
    "charades", ...) or a list of TubeSpec / dicts.
    """
    if name not in SIZES:
        raise UserError(f"model {name!r} is unknown; valid names: {', '.join(SIZES)}")
    valid = [f.name for f in dataclasses.fields(TubeViTConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise UserError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    depth, dim, mlp_dim, heads = SIZES[name]
    cfg = TubeViTConfig(**{"depth": depth, "dim": dim, "mlp_dim": mlp_dim, "heads": heads, **overrides})
    cfg.validate()
    return cfg


def create_model(name: str, **overrides) -> TubeViT:
    """Build a named TubeViT (on the current default device; use `torch.device('meta')` to plan)."""
    return TubeViT(model_config(name, **overrides))


def dense_baseline_config(name: str = "tubevit-b", **overrides) -> TubeViTConfig:
    """Same size, dense ViViT-style 2x16x16 tubelets (3136 tokens on 32x224x224, joint
    attention): the baseline the sparse tubes are compared against. Video only."""
    return model_config(name, **{"tubes": "dense-2x16x16", **overrides})
