"""What the training loop needs from pretrain.data, in one place.

Head names and class counts come from the prepared datasets (`dataset_info`), or from the
config's `video_dataset` / `image_dataset` names; token counts and FLOPs per sample from the
model's own counters, for tokens/s and MFU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.data.config import DataConfig


@dataclass
class DataInfo:
    num_classes: dict[str, int]            # head name -> classes
    dataset_of: dict[str, str]             # modality -> head name
    video_size: tuple[int, int, int] | None
    image_size: tuple[int, int] | None

    @classmethod
    def from_config(cls, data: DataConfig) -> "DataInfo":
        from pretrain.data.shards import dataset_info

        num_classes, dataset_of = {}, {}
        for modality, uri, name in (("video", data.video_uri, data.video_dataset),
                                    ("image", data.image_uri, data.image_dataset)):
            if not uri:
                continue
            info = dataset_info(uri)
            head = name or info["dataset"]
            num_classes[head] = info["num_classes"]
            dataset_of[modality] = head
        return cls(num_classes, dataset_of,
                   (data.frames, data.size, data.size) if data.video_uri else None,
                   (data.image_size, data.image_size) if data.image_uri else None)


def sample_costs(model, info: DataInfo) -> dict[str, tuple[int, float]]:
    """modality -> (tokens per sample, training FLOPs per sample = 3 x forward)."""
    from pretrain.model import count_flops

    out = {}
    for modality, size in (("video", info.video_size), ("image", info.image_size)):
        if size is None:
            continue
        f = count_flops(model, size, info.dataset_of[modality])
        out[modality] = (f["tokens"], 3.0 * f["total"])
    return out


def to_device(batch, device: torch.device, dtype: torch.dtype = torch.float32):
    """The loader's batch as model input: x uint8 pixels -> normalised `dtype` on `device`
    (the conversion runs on the device; a quarter of float32's bytes cross to it), y moved."""
    return batch.normalized(device, dtype)


class DeviceBatches:
    """The joint loader, yielding batches already moved and normalised (`to_device`).

    Everything else (state_dict, load_state_dict, close, skipped_samples, heads, ...) is the
    wrapped loader's. It reads no batch ahead, so its state is exactly the loader's state
    after the last batch returned (checkpoints stay exact).
    """

    def __init__(self, loader, device: torch.device, dtype: torch.dtype) -> None:
        self.loader, self.device, self.dtype = loader, device, dtype

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self):
        return to_device(next(self.loader), self.device, self.dtype)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def train_loader(data: DataConfig, rank: int, world: int, seed: int, *,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
    """Endless iterator of Batch(modality, dataset, x, y), one modality per batch, the same
    modality sequence on every rank; has state_dict()/load_state_dict().

    x arrives normalised, as `dtype` on `device` (default: this rank's device, float32; the
    loop's own `.to(device, dtype)` is then a no-op or a cast on the device)."""
    from pretrain.data.loader import JointLoader
    from pretrain.train.engine import device_for_rank

    loader = JointLoader(data, rank=rank, world_size=world, seed=seed)
    return DeviceBatches(loader, device if device is not None else device_for_rank(), dtype)


def eval_sets(data: DataConfig) -> dict[str, str]:
    """modality -> head name, for the modalities with held-out data."""
    info = DataInfo.from_config(data)
    return {m: info.dataset_of[m] for m, uri in (("video", data.video_eval_uri),
                                                   ("image", data.image_eval_uri))
            if uri and m in info.dataset_of}


def eval_loader(data: DataConfig, modality: str, rank: int, world: int):
    """This rank's share of the held-out set, padded so every rank runs the same number of
    batches (ZeRO-3 forwards are collective). Batches: x (B*views, ...), y (B,), valid (B,)."""
    from pretrain.data.loader import EvalLoader

    return EvalLoader(data, modality, rank=rank, world_size=world)


def skipped_samples(loader, world: int) -> float:
    """Undecodable samples skipped so far, summed over ranks (collective)."""
    n = torch.tensor([float(getattr(loader, "skipped_samples", 0))], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(n)
    return n.item()
