"""The loaders as the trainer sees them: batches that arrive as model input on the device.

This is the one place a batch reaches the device: `DeviceBatches` wraps a pretrain.data
loader and hands out each batch `normalized(device, dtype)` (uint8 pixels cross to the
device, a quarter of float32's bytes, and are converted there). The training step, the
objectives and the evaluation receive batches already on the device and move nothing.
"""
from __future__ import annotations

import torch

from pretrain.data.config import DataConfig
from pretrain.data.metadata import DataInfo


class DeviceBatches:
    """A loader whose batches arrive normalised, as `dtype` on `device`.

    Iterating it iterates the loader (the joint loader endlessly, an eval loader one pass
    per `iter()`); `next()` takes the joint loader's next batch. Everything else
    (state_dict, load_state_dict, close, skipped_samples, heads, ...) is the wrapped
    loader's. It reads no batch ahead, so its state is exactly the loader's state after the
    last batch returned (checkpoints stay exact).
    """

    def __init__(self, loader, device: torch.device, dtype: torch.dtype) -> None:
        self.loader, self.device, self.dtype = loader, device, dtype

    def __iter__(self):
        return (batch.normalized(self.device, self.dtype) for batch in self.loader)

    def __next__(self):
        return next(self.loader).normalized(self.device, self.dtype)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def train_batches(data: DataConfig, info: DataInfo, rank: int, world: int, seed: int, *,
                  device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceBatches:
    """Endless Batch(modality, dataset, x, y) on the device, one modality per batch, the
    same modality sequence on every rank; has state_dict()/load_state_dict()/close()."""
    from pretrain.data.loader import JointLoader

    loader = JointLoader(data, rank=rank, world_size=world, seed=seed, info=info)
    return DeviceBatches(loader, device, dtype)


def eval_batches(data: DataConfig, info: DataInfo, modality: str, rank: int, world: int, *,
                 device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceBatches:
    """This rank's share of `modality`'s held-out set (one pass per `iter()`), on the
    device, padded so every rank runs the same number of batches (ZeRO-3 forwards are
    collective). Batches: x (B*views, ...), y (B,), valid (B,)."""
    from pretrain.data.loader import EvalLoader

    loader = EvalLoader(data, modality, rank=rank, world_size=world, info=info)
    return DeviceBatches(loader, device, dtype)
