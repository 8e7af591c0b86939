"""Per-step costs the training loop keeps off its steps: the ZeRO-1/2 bucket sized to the
model, and the external stop request asked at most once a second."""
from __future__ import annotations

from pretrain.train.config import ExperimentConfig, from_dict
from pretrain.train.engine import deepspeed_config
from pretrain.train.worker import at_most_every


def cfg(**train):
    return from_dict(ExperimentConfig, {"model": {"name": "tubevit-ti"},
                                        "data": {"video_uri": "v", "batch_size": 4},
                                        "train": {"steps": 10, **train}})


def test_zero2_buckets_capped_at_the_model_size():
    # a bucket above the model only made DeepSpeed allocate (and page-fault) it every step
    z2 = deepspeed_config(cfg(zero_stage=2, zero_bucket_elements=50_000_000), 2, 5_100_000)
    assert z2["zero_optimization"]["reduce_bucket_size"] == 5_100_032      # 256-aligned
    assert z2["zero_optimization"]["allgather_bucket_size"] == 5_100_032
    # an odd parameter count: DeepSpeed asserts the all-gather bucket is even
    odd = deepspeed_config(cfg(zero_stage=2, zero_bucket_elements=50_000_000), 2, 12_345)
    assert odd["zero_optimization"]["allgather_bucket_size"] % 2 == 0
    assert 12_345 <= odd["zero_optimization"]["allgather_bucket_size"] < 12_345 + 256
    big = deepspeed_config(cfg(zero_stage=1, zero_bucket_elements=2_000_000), 2, 5_100_000)
    assert big["zero_optimization"]["reduce_bucket_size"] == 2_000_000
    # unknown model size (and ZeRO-3, whose buckets bound its gathers): the configured size
    assert deepspeed_config(cfg(zero_stage=2), 2)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    z3 = deepspeed_config(cfg(zero_stage=3, zero_bucket_elements=20_000_000), 2, 5_100_000)
    assert z3["zero_optimization"]["reduce_bucket_size"] == 20_000_000


def test_stop_request_asked_at_most_every_interval():
    now = [0.0]
    asked = []

    def ask():
        asked.append(now[0])
        return now[0] >= 2.5

    import pretrain.train.worker as worker
    clock = worker.time.monotonic
    worker.time.monotonic = lambda: now[0]
    try:
        poll = at_most_every(1.0, ask)
        answers = []
        for step in range(40):            # 0.1 s steps
            now[0] = step * 0.1
            answers.append(poll())
    finally:
        worker.time.monotonic = clock
    assert len(asked) == 4                      # at 0, 1, 2 and 3 s; True from 3 s on
    assert answers.index(True) == 30 and all(answers[30:])
    assert at_most_every(1.0, None) is None     # no external request: StopAgreement skips it
