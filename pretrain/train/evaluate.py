"""Periodic evaluation: `eval/video_top1` (multi-view average) and `eval/image_top1`.

Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same
number of forwards even when the held-out set does not split evenly: before each batch the
ranks agree (one all-reduce) whether anyone still has data; a rank that has run out feeds
a dummy batch whose predictions are not counted.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.train import data_io
from pretrain.train.config import ExperimentConfig


@torch.no_grad()
def evaluate(engine, cfg: ExperimentConfig, rank: int, world: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    engine.eval()
    out: dict[str, float] = {}
    for modality, dataset in data_io.eval_sets(cfg.data).items():
        correct, total = _top1(engine, data_io.eval_batches(cfg.data, modality, rank, world),
                               dataset, world, device, dtype)
        if total:
            out[f"eval/{modality}_top1"] = correct / total
    return out


def _top1(engine, batches, dataset: str, world: int, device, dtype) -> tuple[float, float]:
    correct = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    it = iter(batches)
    dummy = None
    while True:
        batch = next(it, None)
        flag = torch.tensor([0.0 if batch is None else 1.0])
        if world > 1:
            dist.all_reduce(flag)
        if flag.item() == 0:
            break
        x, y = (batch if batch is not None else dummy)
        if dummy is None:
            dummy = (x[:1], y[:1])
        views = x.shape[1] if x.ndim == 6 else 1                  # (B, V, 3, T, H, W) video
        flat = x.reshape(-1, *x.shape[2:]) if x.ndim == 6 else x  # (B*V, 3, T, H, W) | (B, 3, H, W)
        logits = engine(flat.to(device, dtype=dtype), dataset=dataset).float()  # (B*V, C)
        probs = logits.softmax(-1).reshape(len(y), views, -1).mean(1)           # (B, C)
        if batch is not None:
            correct += (probs.argmax(-1).cpu() == y).sum()
            total += len(y)
    stats = torch.stack([correct, total])
    if world > 1:
        dist.all_reduce(stats)
    return stats[0].item(), stats[1].item()
