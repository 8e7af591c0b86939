"""Periodic evaluation, with the metrics the objective names (supervised: `eval/video_top1`,
`eval/image_top1` on the held-out sets; masked: kNN top-1 with a memory bank from the train
split, and the held-out reconstruction loss).

Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same
number of forwards: the eval loaders pad each rank's share to the same length with repeats
marked `valid=False`, which are run but not counted (see pretrain.data.loader.EvalLoader).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from pretrain.train.objectives import Objective


@torch.no_grad()
def evaluate(model, objective: Objective, loaders: Mapping[str, Mapping[str, Iterable]],
             world: int, step: int = 0) -> dict[str, float]:
    """The objective's metrics over every modality (modality -> split -> batches on the
    device, the splits `objective.eval_splits` names; collective). Leaves the model in eval
    mode: the caller switches back to training."""
    model.eval()
    out: dict[str, float] = {}
    for modality, splits in loaders.items():
        out.update(objective.evaluate(model, modality, splits, world, step))
    return out
