"""Periodic evaluation over the held-out sets, with the metrics the objective names
(classification: `eval/video_top1`, `eval/image_top1`).

Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same
number of forwards: the eval loaders pad each rank's share to the same length with repeats
marked `valid=False`, which are run but not counted (see pretrain.data.loader.EvalLoader).
"""
from __future__ import annotations

from typing import Iterable

import torch

from pretrain.train.objectives import Objective


@torch.no_grad()
def evaluate(model, objective: Objective, loaders: dict[str, Iterable], world: int
             ) -> dict[str, float]:
    """The objective's metrics over every held-out set (modality -> batches on the device;
    collective). Leaves the model in eval mode: the caller switches back to training."""
    model.eval()
    out: dict[str, float] = {}
    for modality, batches in loaders.items():
        out.update(objective.evaluate(model, modality, batches, world))
    return out
