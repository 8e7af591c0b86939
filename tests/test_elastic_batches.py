"""Elastic worker counts keep the global batch (pretrain/train/elastic.py): the config's
range is checked for every count Ray may choose, each count gets its per-rank share and
micro-batch count, and the weighted micro-batches give the gradient of the whole batch."""
from __future__ import annotations

import pytest
import torch

from pretrain.data.config import DataConfig
from pretrain.data.loader import Batch
from pretrain.errors import UserError
from pretrain.train.config import ResourcesConfig, load_config
from pretrain.train.elastic import check_worker_range, micro_batches_per_step, rank_share, split


def _data(**kw) -> DataConfig:
    return DataConfig(video_uri="v", image_uri="i", **kw)


def test_a_range_in_the_config_is_elastic_and_a_count_is_not(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["resources.workers=[1, 2]"])
    assert cfg.resources.worker_range == (1, 2) and cfg.resources.max_workers == 2
    assert cfg.resources.elastic
    cfg = load_config("configs/smoke.yaml", ["resources.workers=2"])
    assert cfg.resources.worker_range == (2, 2) and cfg.resources.max_workers == 2
    assert not cfg.resources.elastic


@pytest.mark.parametrize("workers, says", [
    ("[3, 1]", "min <= max"),
    ("[0, 2]", ">= 1"),
    ("[1, 2, 3]", "list of 2"),
])
def test_a_bad_range_is_a_clear_error(workers, says):
    with pytest.raises(UserError, match="resources.workers") as err:
        load_config("configs/smoke.yaml", [f"resources.workers={workers}"])
    assert says in str(err.value)


def test_counts_that_do_not_split_the_global_batch_are_named_with_a_fix():
    # batch 16 x max 4 = 64: 3 workers would need 21.33 samples each
    with pytest.raises(UserError) as err:
        check_worker_range(ResourcesConfig(workers=(2, 4)), _data(batch_size=16))
    msg = str(err.value)
    assert "over 3 workers" in msg and "multiples of 3" in msg
    assert "resources.workers=[4, 4]" in msg   # 3 breaks any range below 4 here
    with pytest.raises(UserError, match=r"resources.workers=\[5, 6\]"):   # 30 splits over
        check_worker_range(ResourcesConfig(workers=(2, 6)), _data(batch_size=5))  # 5, 6; not 4
    # the suggested fix works
    check_worker_range(ResourcesConfig(workers=(2, 4)), _data(batch_size=12))
    # videos split into whole videos: 2 clips per video, 3 workers of 4 x 6 = 24 -> 8 each
    check_worker_range(ResourcesConfig(workers=(3, 4)), _data(batch_size=6, clips_per_video=2))
    # 2 x 3 = 6 clips: 3 per rank at 2 workers, one and a half videos
    with pytest.raises(UserError, match="over 2 workers"):
        check_worker_range(ResourcesConfig(workers=(2, 3)), _data(batch_size=2, clips_per_video=2))


def test_each_count_gets_its_share_of_the_same_global_batch():
    res, data = ResourcesConfig(workers=(1, 4)), _data(batch_size=12, image_batch_size=24)
    for world, per_video, per_image, micro in ((4, 12, 24, 1), (3, 16, 32, 2), (2, 24, 48, 2),
                                               (1, 48, 96, 4)):
        share = rank_share(res, data, world)
        assert (share.data.batch_size, share.data.image_micro_batch) == (per_video, per_image)
        assert share.micro_batches == micro == micro_batches_per_step(res, world)
        # no micro-batch is larger than the config's per-rank batch (memory stays as sized)
        assert -(-per_video // micro) <= data.batch_size
    with pytest.raises(UserError, match="outside"):
        rank_share(res, data, 5)
    # a fixed count is as it always was
    fixed = rank_share(ResourcesConfig(workers=2), data, 2)
    assert fixed.data is data and fixed.micro_batches == 1


def test_deepspeed_accumulates_the_extra_micro_batches():
    from pretrain.train.engine import deepspeed_config

    cfg = load_config("configs/smoke.yaml", ["resources.workers=[1, 2]", "train.grad_accum_steps=3"])
    assert deepspeed_config(cfg, 2)["gradient_accumulation_steps"] == 3
    assert deepspeed_config(cfg, 1)["gradient_accumulation_steps"] == 6


def _batch(n: int) -> Batch:
    return Batch("video", "d", torch.randn(n, 3, 2, 4, 4), torch.randint(0, 4, (n,)),
                 torch.arange(n))


@pytest.mark.parametrize("n, parts", [(16, 2), (16, 3), (7, 4), (2, 3)])
def test_weighted_micro_batches_give_the_whole_batch_gradient(n, parts):
    """DeepSpeed divides each micro-batch's loss by the accumulation count; with split's
    weights the summed gradient is the gradient of the mean loss over the whole batch."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 4)
    batch = _batch(n)

    def loss_of(b: Batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(layer(b.x.flatten(1)), b.y)

    loss_of(batch).backward()
    whole = layer.weight.grad.clone()
    layer.weight.grad = None
    pieces = split(batch, parts)
    assert len(pieces) == parts            # every rank runs the same number of forwards
    assert sorted(i for b, w in pieces if w for i in b.sample_ids.tolist()) == list(range(n))
    for part, weight in pieces:
        (loss_of(part) * weight / parts).backward()
    torch.testing.assert_close(layer.weight.grad, whole)
