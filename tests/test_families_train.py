"""Every video model family trains under the real trainer: 2 ranks (gloo, one process each),
DeepSpeed ZeRO-2 and ZeRO-3, the joint loader on synthetic clips and images, 20 steps per
family and stage; then its final checkpoint is exported (`pretrain export`'s function,
which consolidates ZeRO-3 shards) and the file rebuilds that family (load_model).

This is pretrain.train.worker.train as the Ray workers run it (without Ray: the families do
not change the orchestration, which the pretrain-run tests cover), each family at a tiny
width, in one pair of processes so DeepSpeed and torch are imported once. Checks per family
and stage: 20 steps on both ranks with a finite loss, on the joint schedule (video_ratio
0.6: 20 steps without an image step have probability 4e-5, and every family takes images
as one-frame clips), and the export is that family (ViViT and TimeSformer share their
config keys: the manifest's model.name tells them apart). Families are read from the
registry, so a family added there is trained here too (with its tiny-size fit in FIT when
its defaults do not fit 8x32x32 clips).
"""
from __future__ import annotations

import math

import pytest

from tests.fixtures.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_world_env")]

STEPS = 20
STAGES = (2, 3)
TINY = {"depth": 1, "dim": 48, "heads": 2, "mlp_dim": 96}
# Per family: what makes its tiny size fit 8x32x32 clips and 32 px images.
FIT = {
    "tubevit": {"tubes": [{"kernel": [1, 8, 8], "stride": [8, 8, 8]},
                          {"kernel": [4, 8, 8], "stride": [4, 8, 8]}]},
    "videomae": {"tubelet": [2, 8, 8]},
    "vivit": {"tubelet": [2, 8, 8], "num_frames": 8, "img_size": 32},
    "vivit-fe": {"tubelet": [2, 8, 8], "num_frames": 8, "img_size": 32, "temporal_depth": 1},
    "vivit-fsa": {"tubelet": [2, 8, 8], "num_frames": 8, "img_size": 32},
    "timesformer": {"tubelet": [1, 8, 8], "num_frames": 8, "img_size": 32},
    "vtn": {"tubelet": [1, 8, 8], "num_frames": 8, "img_size": 32, "temporal_depth": 1,
            "attention_window": [4], "frame_chunk": 4},   # a window and chunks smaller than a clip
}


def family_models() -> list[tuple[str, str]]:
    """(family key, its smallest size name) for every trainable registered family."""
    from pretrain.model.registry import FAMILIES

    return [(f.key, next(iter(f.sizes))) for f in FAMILIES if f.sizes]


def _model_section(key: str, name: str) -> dict:
    from pretrain.model.registry import model_config

    fields = set(type(model_config(name)).__dataclass_fields__)
    wanted = {**TINY, **FIT.get(key, {})}
    return {"name": name, **{k: v for k, v in wanted.items() if k in fields}}


def _train_every_family(rank: int, world: int, root: str, work: str) -> dict:
    import torch.distributed as dist

    from checkpoints.export import export_checkpoint
    from pretrain.model import load_model
    from pretrain.train.config import ExperimentConfig, from_dict
    from pretrain.train.worker import train

    out = {}
    for key, name in family_models():
        for stage in STAGES:
            ckpt = f"{work}/{key}-zero{stage}"
            cfg = from_dict(ExperimentConfig, {
                "model": _model_section(key, name),
                "data": {"video_uri": f"{root}/video/train", "image_uri": f"{root}/image/train",
                         "frames": 8, "frame_stride": 1, "size": 32, "image_size": 32,
                         "batch_size": 2, "image_batch_size": 2, "video_ratio": 0.6,
                         "num_workers": 0, "cache_dir": f"{root}/cache-{key}"},
                "train": {"steps": STEPS, "zero_stage": stage, "precision": "fp32", "lr": 1e-3,
                          "warmup_steps": 2, "log_every": 5, "eval_every": 0,
                          "eval_at_end": False},
                "checkpoint": {"uri": ckpt, "every_steps": STEPS},
                "tracking": {"enabled": False},
            }, source=f"the {key} training test")
            summary = train(cfg, progress=False)
            result = {"steps": summary["steps"], "loss": summary["metrics"].get("train/loss")}
            dist.barrier()
            if rank == 0:
                export_checkpoint(ckpt, f"{ckpt}.safetensors")
                result["exported"] = type(load_model(f"{ckpt}.safetensors")).__name__
            out[key, stage] = result
    return out


@pytest.mark.timeout(900)
def test_every_family_trains_at_zero2_and_zero3_on_two_ranks_and_exports(small_synthetic, tmp_path):
    from pretrain.model.registry import FAMILIES

    classes = {f.key: f.model.__name__ for f in FAMILIES}
    rank0, rank1 = run_ranks(_train_every_family, 2, str(small_synthetic), str(tmp_path),
                             timeout=800)
    families = {key for key, _ in family_models()}
    assert {"vivit", "vivit-fe", "vivit-fsa", "timesformer", "vtn", "videomae", "tubevit"} <= families
    assert set(rank0) == {(key, stage) for key in families for stage in STAGES}
    for (key, stage), result in rank0.items():
        assert result["steps"] == STEPS and rank1[key, stage]["steps"] == STEPS, (key, stage, result)
        assert result["loss"] is not None and math.isfinite(result["loss"]), (key, stage, result)
        assert result["exported"] == classes[key], (key, stage, result)
