"""Periodic evaluation: `eval/video_top1` (multi-view average) and `eval/image_top1`.

Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same
number of forwards: the eval loader pads each rank's share to the same length with
repeats marked `valid=False`, which are run but not counted. Video batches hold all views
of each clip (consecutive); a clip's prediction is the mean of its views' softmax.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.train import data_io
from pretrain.train.config import ExperimentConfig


@torch.no_grad()
def evaluate(engine, cfg: ExperimentConfig, rank: int, world: int, device: torch.device,
             dtype: torch.dtype, loaders: dict | None = None) -> dict[str, float]:
    """{"eval/video_top1": .., "eval/image_top1": ..} over the held-out sets (collective).

    `loaders` caches the eval loaders between calls (modality -> loader)."""
    engine.eval()
    out: dict[str, float] = {}
    loaders = {} if loaders is None else loaders
    for modality in data_io.eval_sets(cfg.data):
        if modality not in loaders:
            loaders[modality] = data_io.eval_loader(cfg.data, modality, rank, world)
        correct, total = _top1(engine, loaders[modality], device, dtype, world)
        if total:
            out[f"eval/{modality}_top1"] = correct / total
    return out


def _top1(engine, loader, device, dtype, world: int) -> tuple[float, float]:
    stats = torch.zeros(2, dtype=torch.float64)   # correct, counted
    for batch in loader:
        x = data_io.to_device(batch, device, dtype).x                    # (B*V, 3, T, H, W) | (B, 3, H, W)
        logits = engine(x, dataset=batch.dataset).float()                # (B*V, C)
        probs = logits.softmax(-1).view(len(batch.y), batch.views, -1).mean(1)  # (B, C)
        hit = (probs.argmax(-1).cpu() == batch.y)                        # (B,)
        valid = batch.valid if batch.valid is not None else torch.ones_like(hit)
        stats[0] += (hit & valid.bool().cpu()).sum()
        stats[1] += valid.sum()
    if world > 1:
        dist.all_reduce(stats)
    return stats[0].item(), stats[1].item()
