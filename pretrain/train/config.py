"""The experiment config tree: one section per concern, loaded by pretrain/config_loader.py.

A config is a YAML file whose top-level sections map onto the dataclasses below (`model` is
the chosen model family's own config, pretrain/model/registry.py; `data` is owned by
pretrain.data, `checkpoint` by checkpoints, `bootstrap` by pretrain.model, `masked` by the
masked-modelling objective in pretrain/train/masked.py). Precedence:
`key.sub=value` overrides from the command line > the file (and the files it derives from
with `base: other.yaml`) > the model size preset named by `model.name` > the dataclass
defaults. Types, ranges, choices and unknown keys are checked by the loader, cross-field
rules by each section's `validate()`; every problem is a `UserError` naming the key.

    cfg = load_config("configs/smoke.yaml", ["train.steps=50", "train.zero_stage=3"])
    cfg.train.steps            # 50
    to_dict(cfg)               # plain nested dict (JSON/YAML-safe), round-trips via from_dict

`model.num_classes` is not a config key: the model gets one head per dataset of the `data`
section, decided when it is built (pretrain/train/worker.py build_model).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from checkpoints.config import CheckpointConfig
from pretrain.config_loader import (apply_overrides, config_field, describe, flatten, from_dict,
                                    read_config_file, to_dict, to_yaml)
from pretrain.data.config import DataConfig
from pretrain.errors import UserError
from pretrain.model.bootstrap_config import BootstrapConfig
from pretrain.model.family import ModelConfig
from pretrain.model.registry import model_config, presets
from pretrain.train.masked import MaskedConfig
from pretrain.train.objectives import ALIASES as OBJECTIVE_ALIASES
from pretrain.train.objectives import OBJECTIVES
from pretrain.train.objectives import canonical as canonical_objective

# The experiment API: the loader's functions applied to ExperimentConfig.
__all__ = ["ExperimentConfig", "apply_overrides", "describe", "flatten", "from_dict", "load_config",
           "to_dict", "to_yaml"]

DEFAULT_MODEL = "tubevit-b"


@dataclass
class TrainConfig:
    steps: int = config_field(help="optimizer steps to train for", min=1, required=True)
    zero_stage: int = config_field(
        2, "DeepSpeed ZeRO stage (0 = plain data parallel)", min=0, max=3)
    precision: Literal["fp32", "bf16", "fp16"] = config_field("bf16", "training precision")
    grad_accum_steps: int = config_field(1, "micro-batches per optimizer step", min=1)
    grad_clip: float = config_field(
        1.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    lr: float = config_field(5e-5, "peak learning rate (AdamW)", min=0.0)
    min_lr: float = config_field(0.0, "learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = config_field(0, "linear warm-up steps before the cosine decay", min=0)
    weight_decay: float = config_field(
        1e-3, "AdamW weight decay (skips model.no_weight_decay() params, biases and norms)",
        min=0.0)
    betas: list[float] = config_field(help="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = config_field(1e-8, "AdamW epsilon", min=0.0)
    zero_bucket_elements: int = config_field(
        50_000_000, "ZeRO communication bucket size in elements (reduce, all-gather, stage-3 "
        "prefetch); DeepSpeed's own 5e8 costs 2 GB of fp32 buffer per worker", min=1_000_000)
    zero3_sub_group_elements: int = config_field(
        10_000_000, "ZeRO-3: the optimizer steps its partition in sub-groups of this many "
        "elements; Adam's temporaries and the flattened gradient are at most this size "
        "(DeepSpeed's 1e9 default made them the whole partition)", min=100_000)
    cpu_offload: bool = config_field(
        False, "ZeRO-3 only: keep parameters and optimizer state in CPU memory")
    activation_checkpointing: bool = config_field(False, "recompute block activations in backward")
    objective: str = config_field(
        "supervised", "what the loss is (pretrain/train/objectives.py): supervised = "
        "cross-entropy through each dataset's head (the old name 'classification' is accepted); "
        "masked = masked autoencoding, settings in the 'masked' section",
        choices=(*OBJECTIVES, *OBJECTIVE_ALIASES))
    layer_decay: float = config_field(
        1.0, "layer-wise lr decay: blocks[i] learn at lr x layer_decay^(depth - i), the "
        "embedding one factor lower, heads and final norm at lr (1 = off; VideoMAE fine-tunes "
        "with 0.75)", min=0.0, max=1.0)
    seed: int = config_field(0, "seed for model init, data order and the image/video mix", min=0)
    log_every: int = config_field(
        10, "steps between metric log points (train/loss is the mean since the previous one)",
        min=1)
    eval_every: int = config_field(0, "steps between evaluations (0 = only at the end)", min=0)
    eval_at_end: bool = config_field(True, "evaluate after the last step")
    progress_every_s: float = config_field(
        10.0, "seconds between progress lines on the console", min=0.0)
    preemption_poll_steps: int = config_field(
        10, "under Ray Train: steps between checks for a node-drain notice (a barrier across "
        "ranks; on a notice, a checkpoint at once and training goes on; 0 = never check)", min=0)

    def __post_init__(self) -> None:
        self.objective = canonical_objective(self.objective)   # an old name -> today's

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"config key 'train.betas' is {self.betas}; it must be two numbers "
                            "in [0, 1), e.g. [0.9, 0.999]")
        if self.min_lr > self.lr:
            raise UserError(f"config key 'train.min_lr' ({self.min_lr}) is above 'train.lr' "
                            f"({self.lr}); the cosine decays from lr down to min_lr")
        if self.warmup_steps > self.steps:
            # A short run of a long config (`train.steps=20` on the command line) keeps working:
            # the warm-up spans the whole run instead.
            print(f"note: train.warmup_steps ({self.warmup_steps}) exceeds train.steps "
                  f"({self.steps}); warming up over all {self.steps} steps", file=sys.stderr)
            self.warmup_steps = self.steps
        if self.cpu_offload and self.zero_stage != 3:
            raise UserError(f"config key 'train.cpu_offload' needs 'train.zero_stage' 3 "
                            f"(it is {self.zero_stage}); set train.zero_stage=3 or cpu_offload=false")


@dataclass
class ResourcesConfig:
    workers: int | tuple[int, int] = config_field(
        1, "training processes (Ray Train workers / torchrun ranks); [min, max] = elastic: Ray "
        "Train runs the job on as many as the cluster holds in that range, shrinking when a node "
        "is lost and growing back when capacity returns, with the global batch of max workers "
        "(pretrain/train/elastic.py)", min=1)
    use_gpu: bool = config_field(False, "one GPU per worker (NCCL); false = CPU workers on gloo")
    cpus_per_worker: float = config_field(1.0, "CPUs Ray reserves per worker", min=0.0)
    threads_per_worker: int = config_field(
        0, "torch intra-op threads per worker (0 = cpus_per_worker)", min=0)
    accelerator: str = config_field(
        "auto", "accelerator name for the MFU peak table (e.g. H100, A100; auto = detect from "
        "the device name)")
    max_failures: int = config_field(
        0, "Ray Train restarts of the worker group after a failure", min=0)
    max_preemptions: int = config_field(
        -1, "Ray Train restarts of the worker group after a node preemption (drain), counted "
        "apart from max_failures; -1 = any number", min=-1)
    timeout_s: float = config_field(1800.0, "collective-operation timeout in seconds", min=1.0)
    elastic_resize_every_s: float = config_field(
        60.0, "elastic workers: seconds between Ray Train's checks for capacity to grow the "
        "group (each resize restarts it from the newest checkpoint)", min=0.0)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: resources.workers as a range, a fixed count as (n, n)."""
        w = self.workers
        return (w, w) if isinstance(w, int) else (int(w[0]), int(w[1]))

    @property
    def elastic(self) -> bool:
        """A [min, max] range with min < max (pretrain/train/elastic.py)."""
        lo, hi = self.worker_range
        return lo != hi

    @property
    def max_workers(self) -> int:
        """The most workers the job runs on (resources.workers, or its range's max)."""
        return self.worker_range[1]


@dataclass
class TrackingConfig:
    enabled: bool = config_field(True, "log to MLflow")
    required: bool = config_field(
        True, "a tracking server that cannot be reached at start stops the run before it "
        "trains (false: warn and log to sqlite:///mlflow.db in the working directory)")
    tracking_uri: str | None = config_field(
        None, "MLflow tracking URI (null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
        "working directory)")
    experiment: str = config_field("tubevit", "MLflow experiment name")
    run_name: str | None = config_field(None, "MLflow run name (null = config file name)")
    run_id: str | None = config_field(None, "continue this MLflow run instead of creating one")
    flush_every_s: float = config_field(5.0, "seconds between batched metric uploads", min=0.1)
    system_metrics_every_s: float = config_field(
        10.0, "seconds between samples of each node's CPU, memory, disk, network and GPU use, "
        "logged under system/node_<N>/ (pretrain/train/system_metrics.py); 0 = off", min=0.0)


@dataclass
class ExperimentConfig:
    model: ModelConfig = config_field(
        help="the model family's config, chosen by model.name",
        variants=presets, factory=lambda: model_config(DEFAULT_MODEL))
    data: DataConfig = config_field(factory=DataConfig)
    train: TrainConfig = config_field(factory=lambda: TrainConfig(steps=1))
    resources: ResourcesConfig = config_field(factory=ResourcesConfig)
    checkpoint: CheckpointConfig = config_field(factory=CheckpointConfig)
    tracking: TrackingConfig = config_field(factory=TrackingConfig)
    bootstrap: BootstrapConfig = config_field(factory=BootstrapConfig)
    masked: MaskedConfig = config_field(factory=MaskedConfig)

    def validate(self) -> None:
        from pretrain.train.elastic import check_worker_range

        check_worker_range(self.resources, self.data)   # across sections: workers x batches


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config file (and its bases), apply `key.sub=value` overrides, return the
    checked tree."""
    raw = read_config_file(path)
    apply_overrides(raw, overrides)
    return from_dict(ExperimentConfig, raw, source=str(path))
