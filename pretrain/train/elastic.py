"""Elastic worker counts keep the run's global batch: `resources.workers: [min, max]`.

Ray Train (ScalingConfig(num_workers=(min, max))) may run an elastic job on any number of
workers W in [min, max]: it starts with what the cluster can hold, restarts the group on
fewer workers when a node is lost, and on more when capacity returns; every start resumes
from the newest committed checkpoint. For the run to stay the same run whatever W is, its
batch is defined at max workers:

- the global batch of a modality is G = data.batch_size (data.image_batch_size) x max;
- at W workers each rank loads G / W samples per loader step: the loader's global sample
  order depends only on the seed, so the samples of step k are the same for every W
  (pretrain/data/loader.py, tests/test_data_elastic.py), and a run that shrank and grew
  back has seen exactly the samples an uninterrupted one would have;
- each rank feeds its G / W samples to the model in ceil(max / W) micro-batches of at most
  data.batch_size, so per-rank memory stays what the config was sized for. DeepSpeed
  accumulates them (gradient_accumulation_steps x that many) and divides each micro
  batch's loss by the count; a micro-batch of a different size gets its loss reweighted so
  the step's gradient is the mean over the global batch, as at max workers.

G / W must be a whole number for every W Ray may choose, so the config is checked for every
count in the range (`check_worker_range`). A fixed worker count is left as it always was:
data.batch_size per rank, one micro-batch per loader step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.data.config import DataConfig
    from pretrain.data.loader import Batch
    from pretrain.train.config import ResourcesConfig


def _global_batches(data: "DataConfig", max_workers: int) -> dict[str, int]:
    """Modality -> its global batch at max workers (per-rank batch x max)."""
    return {"video": data.batch_size * max_workers,
            "image": data.image_micro_batch * max_workers}


def check_worker_range(resources: "ResourcesConfig", data: "DataConfig") -> None:
    """A UserError unless every worker count of an elastic range splits the global batches
    into whole per-rank batches (video ones into whole videos: data.clips_per_video)."""
    lo, hi = resources.worker_range
    if lo > hi:
        raise UserError(f"config key 'resources.workers' is [{lo}, {hi}]; an elastic range is "
                        "[min, max] with min <= max")
    if lo == hi:
        return
    bad = [w for w in range(lo, hi + 1) if not _splits(data, hi, w)]
    if not bad:
        return
    # The per-rank batch that makes every count work: G = b x max must be a multiple of
    # every w (times the video unit), so b must be a multiple of lcm(...) / gcd(lcm, max).
    need = math.lcm(*(w * data.clips_per_video for w in range(lo, hi + 1)))
    step = need // math.gcd(need, hi)
    # ... or the widest range down from max that these batch sizes allow
    widest = min(m for m in range(lo, hi + 1)
                 if all(_splits(data, hi, w) for w in range(m, hi + 1)))
    raise UserError(
        f"config key 'resources.workers' is [{lo}, {hi}]: Ray may run the job on any count in "
        f"that range, and the global batch (data.batch_size {data.batch_size} and "
        f"data.image_batch_size {data.image_micro_batch} x {hi} workers) does not split evenly "
        f"over {', '.join(map(str, bad))} workers. Use batch sizes that are multiples of "
        f"{step}, or resources.workers=[{widest}, {hi}] (the widest range these batch sizes "
        "allow)")


def _splits(data: "DataConfig", max_workers: int, world: int) -> bool:
    """Whether `world` workers split the global batches into whole per-rank batches (video
    ones into whole videos: data.clips_per_video clips each)."""
    unit = {"video": data.clips_per_video, "image": 1}
    return all(g % world == 0 and (g // world) % unit[m] == 0
               for m, g in _global_batches(data, max_workers).items())


@dataclasses.dataclass(frozen=True)
class RankShare:
    """What one rank of a W-worker group does per loader step."""
    data: "DataConfig"      # the loader's config: per-rank batch sizes G / W
    micro_batches: int      # model micro-batches each loader batch is split into


def rank_share(resources: "ResourcesConfig", data: "DataConfig", world: int) -> RankShare:
    """This rank's share of the global batch at `world` workers (module docstring)."""
    lo, hi = resources.worker_range
    if lo == hi:
        return RankShare(data, 1)
    if not lo <= world <= hi:
        raise UserError(f"the job runs on {world} workers, outside resources.workers "
                        f"[{lo}, {hi}]")
    check_worker_range(resources, data)
    batches = _global_batches(data, hi)
    per_rank = dataclasses.replace(data, batch_size=batches["video"] // world,
                                   image_batch_size=batches["image"] // world)
    return RankShare(per_rank, math.ceil(hi / world))


def micro_batches_per_step(resources: "ResourcesConfig", world: int) -> int:
    """Model micro-batches per loader batch at `world` workers (DeepSpeed accumulates them)."""
    lo, hi = resources.worker_range
    return 1 if lo == hi else math.ceil(hi / world)


def split(batch: "Batch", parts: int) -> list[tuple["Batch", float]]:
    """`batch` as `parts` micro-batches, each with the weight that makes DeepSpeed's
    mean-of-micro-losses the mean over the whole batch: parts x len(part) / len(batch).
    A batch with fewer samples than parts (corrupt ones dropped) repeats its last part at
    weight 0, so every rank still runs the same number of forwards (ZeRO-3 gathers in them)."""
    if parts == 1:
        return [(batch, 1.0)]
    n = len(batch)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            out.append((_rows(batch, a, b), parts * (b - a) / n))
    while len(out) < parts:
        out.append((out[-1][0], 0.0))
    return out


def _rows(batch: "Batch", a: int, b: int) -> "Batch":
    """Samples a..b of a training batch (one view per sample)."""
    return dataclasses.replace(batch, x=batch.x[a:b], y=batch.y[a:b],
                               sample_ids=batch.sample_ids[a:b],
                               skipped=batch.skipped if a == 0 else 0)
