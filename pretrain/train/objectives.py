"""What the model is trained to do: the seam between the training loop and the loss.

The loop asks an `Objective` for the loss of (model, batch) and, at eval points, for the
metrics of the held-out sets; it never knows which objective it runs. An objective adds
what it needs to the step (a masked-modelling objective would mask and reconstruct in its
`loss`) and names its own metrics. Registered by name in `OBJECTIVES`; `make_objective`
builds one (UserError for an unknown name).

Batches arrive as model input on the device (pretrain.train.device_batches): x, y, the
dataset (head) name; eval batches also `views` (views per clip, consecutive) and `valid`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.errors import UserError


class Objective(Protocol):
    def loss(self, model, batch) -> torch.Tensor:
        """The scalar training loss of `batch` (on the device, differentiable)."""
        ...

    def evaluate(self, model, modality: str, batches: Iterable, world: int) -> dict[str, float]:
        """Metrics over one held-out set (collective: every rank runs its own share, all
        ranks the same number of forwards). The model is in eval mode, without grad."""
        ...


class Classification:
    """Supervised classification: cross-entropy through the batch's dataset head; eval
    metric `eval/<modality>_top1` (a video clip's prediction: the mean of its views'
    softmax; padding repeats, `valid=False`, run but do not count)."""

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(batch.x, dataset=batch.dataset)            # (B, classes)
        return F.cross_entropy(logits.float(), batch.y)

    def evaluate(self, model, modality: str, batches: Iterable, world: int) -> dict[str, float]:
        stats = torch.zeros(2, dtype=torch.float64)   # correct, counted
        for batch in batches:
            logits = model(batch.x, dataset=batch.dataset).float()                 # (B*V, C)
            probs = logits.softmax(-1).view(len(batch.y), batch.views, -1).mean(1)  # (B, C)
            hit = (probs.argmax(-1) == batch.y).cpu()                               # (B,)
            valid = batch.valid.cpu() if batch.valid is not None else torch.ones_like(hit)
            stats[0] += (hit & valid.bool()).sum()
            stats[1] += valid.sum()
        if world > 1:
            dist.all_reduce(stats)
        correct, total = stats.tolist()
        return {f"eval/{modality}_top1": correct / total} if total else {}


OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "classification": Classification,
}


def make_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"unknown training objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]()
