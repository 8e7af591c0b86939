"""What the model is trained to do: the seam between the training loop and the loss.

The loop asks an `Objective` for the loss of (model, batch) and, at eval points, for the
metrics of the held-out sets; it never knows which objective it runs. Two are registered
in `OBJECTIVES` (config key `train.objective`):

- `supervised`: cross-entropy through each dataset's head (`Supervised`, below); the name
  `classification` (what the key held before) is accepted as an alias;
- `masked`: masked autoencoding, VideoMAE's recipe (pretrain/train/masked.py).

An objective adds what it needs to the step (the masked one draws masks in its `loss`),
names its own metrics, says which splits an evaluation reads per modality
(`eval_splits`: "held_out", and "train" for a memory bank), whether the run evaluates
before its first step (`eval_at_start`) and which data it cannot train on (`check_data`).
Its resumable state (`state_dict`/`load_state_dict`, e.g. the mask RNG) travels in the
checkpoint's extra state.

Batches arrive as model input on the device (pretrain.train.device_batches): x, y, the
dataset (head) name; eval batches also `views` (views per clip, consecutive) and `valid`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.data.metadata import DataInfo
from pretrain.errors import UserError

SUPERVISED, MASKED = "supervised", "masked"
# Old names of objectives, still accepted (configs and MLflow config.yaml files of runs made
# before the rename say `train.objective: classification`).
ALIASES = {"classification": SUPERVISED}


class Objective(Protocol):
    eval_splits: tuple[str, ...]   # per modality: "held_out" and/or "train"
    eval_at_start: bool            # evaluate before the first step (step 0)
    pictures: dict[str, bytes]     # modality -> PNG made by the last evaluate (rank 0)

    def check_data(self, info: DataInfo) -> None:
        """UserError when the configured datasets cannot train this objective."""
        ...

    def masking(self) -> dict[str, tuple[float, str]] | None:
        """Modality -> (mask ratio, scheme) for the FLOP count of a sample; None: unmasked."""
        ...

    def loss(self, model, batch) -> torch.Tensor:
        """The scalar training loss of `batch` (on the device, differentiable)."""
        ...

    def evaluate(self, model, modality: str, splits: Mapping[str, Iterable], world: int,
                 step: int) -> dict[str, float]:
        """Metrics over one modality's eval splits (split -> batches; collective: every rank
        runs its own share, all ranks the same number of forwards). The model is in eval
        mode, without grad."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Supervised:
    """Supervised classification: cross-entropy through the batch's dataset head; eval
    metric `eval/<modality>_top1` (a video clip's prediction: the mean of its views'
    softmax; padding repeats, `valid=False`, run but do not count). With `frame_average`
    (data.eval_frame_average) a view's softmax is the mean of its frames' softmax, each
    frame run as an image: the single-frame baseline (pretrain/model/frame_average.py)."""

    eval_splits = ("held_out",)
    eval_at_start = False

    def __init__(self, frame_average: bool = False) -> None:
        self.pictures: dict[str, bytes] = {}
        self.frame_average = frame_average

    def _view_probs(self, model, batch) -> torch.Tensor:
        """(B*V, classes) softmax of each view."""
        if self.frame_average and batch.x.ndim == 5:
            from pretrain.model.frame_average import frame_average

            return frame_average(model, batch.x, dataset=batch.dataset)
        return model(batch.x, dataset=batch.dataset).float().softmax(-1)

    def check_data(self, info: DataInfo) -> None:
        missing = info.unlabelled   # samples stored without a label (pretrain prepare)
        if missing:
            uris = ", ".join(f"data.{m}_uri ({info.datasets[m]['name']})" for m in missing)
            raise UserError(f"train.objective is 'supervised' but {uris} holds samples without "
                            "a label (prepared from a manifest with an empty or missing label "
                            "column); a supervised run needs every sample labelled. Pretrain on "
                            "it with train.objective=masked, or prepare it with labels")

    def masking(self) -> None:
        return None

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(batch.x, dataset=batch.dataset)            # (B, classes)
        return F.cross_entropy(logits.float(), batch.y)

    def evaluate(self, model, modality: str, splits: Mapping[str, Iterable], world: int,
                 step: int = 0) -> dict[str, float]:
        stats = torch.zeros(2, dtype=torch.float64)   # correct, counted
        for batch in splits["held_out"]:
            probs = self._view_probs(model, batch)                                  # (B*V, C)
            probs = probs.view(len(batch.y), batch.views, -1).mean(1)               # (B, C)
            hit = (probs.argmax(-1) == batch.y).cpu()                               # (B,)
            valid = batch.valid.cpu() if batch.valid is not None else torch.ones_like(hit)
            stats[0] += (hit & valid.bool()).sum()
            stats[1] += valid.sum()
        if world > 1:
            dist.all_reduce(stats)
        correct, total = stats.tolist()
        return {f"eval/{modality}_top1": correct / total} if total else {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# Kept for code that imported the old name.
Classification = Supervised


def _masked(cfg, rank: int) -> Objective:
    from pretrain.train.masked import MaskedModelling

    if cfg is None:
        raise UserError("the masked objective needs the experiment config (its 'masked' section)")
    return MaskedModelling(cfg.masked, seed=cfg.train.seed, rank=rank)


# name -> factory(experiment config or None, rank)
OBJECTIVES: dict[str, Callable[[Any, int], Objective]] = {
    SUPERVISED: lambda cfg, rank: Supervised(
        frame_average=bool(cfg is not None and cfg.data.eval_frame_average)),
    MASKED: _masked,
}


def canonical(name: str) -> str:
    """The registered name of objective `name` (aliases resolved)."""
    return ALIASES.get(name, name)


def make_objective(name: str, cfg=None, rank: int = 0) -> Objective:
    """The objective called `name` (an alias is fine) for experiment config `cfg` on `rank`."""
    key = canonical(name)
    if key not in OBJECTIVES:
        raise UserError(f"unknown training objective {name!r}; valid: {', '.join(OBJECTIVES)} "
                        f"(also accepted: {', '.join(f'{a} = {n}' for a, n in ALIASES.items())})")
    return OBJECTIVES[key](cfg, rank)
