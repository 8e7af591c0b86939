"""The configured datasets' metadata (heads, class counts, sample counts), read once.

Every prepared dataset describes itself in its shard folder (`shards.dataset_info`: a read
from object storage per file). A training process reads all of its datasets once into a
`DataInfo` and hands that to everything that needs it: the model (heads and class counts),
the loaders, the evaluation. Loaders built from a config alone read what they need
themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pretrain import storage
from pretrain.data import shards
from pretrain.data.config import DataConfig
from pretrain.errors import UserError

log = logging.getLogger(__name__)

MODALITIES = ("video", "image")


def describe(cfg: DataConfig, modality: str, uri: str) -> dict:
    """`shards.dataset_info(uri)` plus "name", the head it trains (data.<modality>_dataset,
    else the dataset's own name); UserError when the URI holds the other modality."""
    info = shards.dataset_info(uri)
    if info["modality"] != modality:
        raise UserError(f"data.{modality}_uri '{uri}' holds a {info['modality']} dataset; point "
                        f"it at shards written by `pretrain prepare {modality}`")
    name = getattr(cfg, f"{modality}_dataset") or info["dataset"]
    return {**info, "name": name}


def configured_uris(cfg: DataConfig) -> dict[str, str]:
    """"video" | "image" | "video_eval" | "image_eval" -> URI, for the URIs that are set."""
    uris = {"video": cfg.video_uri, "image": cfg.image_uri,
            "video_eval": cfg.video_eval_uri, "image_eval": cfg.image_eval_uri}
    return {key: uri for key, uri in uris.items() if uri}


@dataclass(frozen=True)
class DataInfo:
    """What the configured datasets are, keyed "video", "image", "video_eval", "image_eval"
    (the URIs that are set): each `describe()`'s dict. The input sizes come from the config.

    A dataset prepared from a manifest without labels (or with some rows unlabelled) has
    "labelled": False, "num_unlabelled" > 0 and its class names (possibly none) in "labels";
    its unlabelled samples carry label shards.UNLABELLED (-1). A masked run trains on it; a
    supervised run refuses it (`labelled`, `unlabelled`)."""
    datasets: dict[str, dict]
    video_size: tuple[int, int, int] | None    # (T, H, W) of a training clip
    image_size: tuple[int, int] | None         # (H, W) of a training image

    @classmethod
    def from_config(cls, data: DataConfig) -> "DataInfo":
        """Read every configured dataset's metadata (UserError naming a bad URI)."""
        datasets = {key: describe(data, key.split("_")[0], uri)
                    for key, uri in configured_uris(data).items()}
        return cls(datasets,
                   (data.frames, data.size, data.size) if data.video_uri else None,
                   (data.image_size, data.image_size) if data.image_uri else None)

    @property
    def num_classes(self) -> dict[str, int]:
        """Head name -> classes, one head per training dataset."""
        return {d["name"]: d["num_classes"] for m, d in self.datasets.items() if m in MODALITIES}

    @property
    def dataset_of(self) -> dict[str, str]:
        """Modality -> head name, for the modalities with training data."""
        return {m: d["name"] for m, d in self.datasets.items() if m in MODALITIES}

    @property
    def unlabelled(self) -> list[str]:
        """Modalities whose training dataset has samples without a label."""
        return [m for m in MODALITIES if m in self.datasets
                and not self.datasets[m].get("labelled", True)]

    @property
    def labelled(self) -> bool:
        """Every training sample has a label (what supervised training needs)."""
        return not self.unlabelled

    @property
    def held_out(self) -> list[str]:
        """Modalities evaluated: held-out data and a head trained on that modality."""
        return [m for m in MODALITIES if f"{m}_eval" in self.datasets and m in self.datasets]


def ensure_datasets(cfg: DataConfig, prepare: bool = True) -> DataInfo:
    """Check every configured dataset URI before training; make synthetic data when asked.

    With data.synthetic.prepare_if_missing and `prepare=True` (call it so on one rank, then
    barrier), missing datasets under data.synthetic.root are written first. Returns their
    metadata. Raises UserError naming a missing/unreadable URI.
    """
    cfg.validate()
    syn = cfg.synthetic
    if prepare and syn.prepare_if_missing and syn.root:
        wanted = configured_uris(cfg).values()
        if any(not storage.exists(storage.join(u, shards.INDEX)) for u in wanted):
            from pretrain.data.synthetic import prepare_synthetic

            log.warning("preparing synthetic data under %s", syn.root)
            prepare_synthetic(syn.root, syn.videos, syn.images, seed=syn.seed, frames=syn.frames,
                              size=syn.size, image_style=syn.image_style,
                              video_style=syn.video_style)
    return DataInfo.from_config(cfg)
