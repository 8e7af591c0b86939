"""The experiment config tree and its generic loader.

A config is a YAML file whose top-level sections map onto the dataclasses below (the
`data` section is owned by pretrain.data). Precedence: `key.sub=value` overrides from the
command line > the file > the dataclass defaults. The loader is generic: it walks the
dataclass fields, rejects unknown keys (naming the valid ones), checks types, ranges
(`metadata={"min": .., "max": ..}`) and choices (`Literal[...]`), then calls each section's
`validate()` for cross-field rules. Every problem is a `UserError` naming the key.

    cfg = load_config("configs/smoke.yaml", ["train.steps=50", "train.zero_stage=3"])
    cfg.train.steps            # 50
    to_dict(cfg)               # plain nested dict (JSON/YAML-safe), round-trips via from_dict
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from checkpoints.config import CheckpointConfig
from pretrain.bootstrap_config import BootstrapConfig
from pretrain.data.config import DataConfig
from pretrain.errors import UserError

MODEL_NAMES = ("tubevit-ti", "tubevit-s", "tubevit-b", "tubevit-l", "tubevit-h")


def _f(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
       max: float | None = None, required: bool = False, factory: Any = None):
    """A documented config field (help text, optional range, `required` = no default)."""
    meta = {"help": help}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if required:
        meta["required"] = True
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: Literal["tubevit-ti", "tubevit-s", "tubevit-b", "tubevit-l", "tubevit-h"] = _f(
        "tubevit-b", "model size (pretrain.model registry name)")
    depth: int | None = _f(None, "override the number of transformer layers", min=1)
    dim: int | None = _f(None, "override the token width", min=8)
    heads: int | None = _f(None, "override the number of attention heads", min=1)
    mlp_dim: int | None = _f(None, "override the MLP hidden width", min=8)
    tubes: str | list[dict[str, Any]] | None = _f(
        None, "tube set name (paper, paper-no-s2d, paper-2, paper-1, charades) or a list of "
        "{kernel, stride, offset, s2d_axis, s2d_factor}; null = the model's default")
    kernel_mode: Literal["separate", "interpolated"] = _f(
        "separate", "one kernel per tube, or one learned 8x8x8 kernel resized to every tube")
    skip_unfit_tubes: bool = _f(
        False, "give 0 tokens for a tube that does not fit the clip instead of an error "
        "(e.g. the paper's tubes on 16-frame clips)")
    drop_path_rate: float = _f(0.0, "stochastic depth rate", min=0.0, max=1.0)
    init_from: str | None = _f(None, "start from this model file (safetensors, see load_model)")

    def validate(self) -> None:
        if self.dim is not None and self.heads is not None and self.dim % self.heads:
            raise UserError(f"config keys 'model.dim' ({self.dim}) and 'model.heads' ({self.heads}) "
                            "do not fit: the width must be a multiple of the number of heads")

    def overrides(self) -> dict[str, Any]:
        """Keyword overrides for create_model (only the ones that are set)."""
        out = {k: getattr(self, k) for k in ("depth", "dim", "heads", "mlp_dim")
               if getattr(self, k) is not None}
        if self.tubes is not None:
            out["tubes"] = self.tubes
        out["drop_path_rate"] = self.drop_path_rate
        out["kernel_mode"] = self.kernel_mode
        out["skip_unfit_tubes"] = self.skip_unfit_tubes
        return out


@dataclass
class TrainConfig:
    steps: int = _f(help="optimizer steps to train for", min=1, required=True)
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (0 = plain data parallel)", min=0, max=3)
    precision: Literal["fp32", "bf16", "fp16"] = _f("bf16", "training precision")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    lr: float = _f(5e-5, "peak learning rate (AdamW)", min=0.0)
    min_lr: float = _f(0.0, "learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine decay", min=0)
    weight_decay: float = _f(1e-3, "AdamW weight decay (skips model.no_weight_decay() params, "
                             "biases and norms)", min=0.0)
    betas: list[float] = _f(help="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = _f(1e-8, "AdamW epsilon", min=0.0)
    zero_bucket_elements: int = _f(
        50_000_000, "ZeRO communication bucket size in elements (reduce, all-gather, stage-3 "
        "prefetch); DeepSpeed's own 5e8 costs 2 GB of fp32 buffer per worker", min=1_000_000)
    zero3_sub_group_elements: int = _f(
        10_000_000, "ZeRO-3: the optimizer steps its partition in sub-groups of this many "
        "elements; Adam's temporaries and the flattened gradient are at most this size "
        "(DeepSpeed's 1e9 default made them the whole partition)", min=100_000)
    cpu_offload: bool = _f(False, "ZeRO-3 only: keep parameters and optimizer state in CPU memory")
    activation_checkpointing: bool = _f(False, "recompute block activations in backward")
    seed: int = _f(0, "seed for model init, data order and the image/video mix", min=0)
    log_every: int = _f(10, "steps between metric log points (train/loss is the mean since "
                        "the previous one)", min=1)
    eval_every: int = _f(0, "steps between evaluations (0 = only at the end)", min=0)
    eval_at_end: bool = _f(True, "evaluate after the last step")
    progress_every_s: float = _f(10.0, "seconds between progress lines on the console", min=0.0)

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"config key 'train.betas' is {self.betas}; it must be two numbers "
                            "in [0, 1), e.g. [0.9, 0.999]")
        if self.min_lr > self.lr:
            raise UserError(f"config key 'train.min_lr' ({self.min_lr}) is above 'train.lr' "
                            f"({self.lr}); the cosine decays from lr down to min_lr")
        if self.warmup_steps > self.steps:
            raise UserError(f"config key 'train.warmup_steps' ({self.warmup_steps}) exceeds "
                            f"'train.steps' ({self.steps})")
        if self.cpu_offload and self.zero_stage != 3:
            raise UserError(f"config key 'train.cpu_offload' needs 'train.zero_stage' 3 "
                            f"(it is {self.zero_stage}); set train.zero_stage=3 or cpu_offload=false")


@dataclass
class ResourcesConfig:
    workers: int = _f(1, "training processes (Ray Train workers / torchrun ranks)", min=1)
    use_gpu: bool = _f(False, "one GPU per worker (NCCL); false = CPU workers on gloo")
    cpus_per_worker: float = _f(1.0, "CPUs Ray reserves per worker", min=0.0)
    threads_per_worker: int = _f(0, "torch intra-op threads per worker (0 = cpus_per_worker)",
                                 min=0)
    accelerator: str = _f("auto", "accelerator name for the MFU peak table (e.g. H100, A100; "
                          "auto = detect from the device name)")
    max_failures: int = _f(0, "Ray Train restarts of the worker group after a failure", min=0)
    timeout_s: float = _f(1800.0, "collective-operation timeout in seconds", min=1.0)


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow")
    tracking_uri: str | None = _f(None, "MLflow tracking URI (null = $MLFLOW_TRACKING_URI, else "
                                  "sqlite:///mlflow.db in the working directory)")
    experiment: str = _f("tubevit", "MLflow experiment name")
    run_name: str | None = _f(None, "MLflow run name (null = config file name)")
    run_id: str | None = _f(None, "continue this MLflow run instead of creating one")
    flush_every_s: float = _f(5.0, "seconds between batched metric uploads", min=0.1)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)


# ---------------------------------------------------------------------------------------
# Generic loading: dict -> typed tree, with the checks.


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config file, apply `key.sub=value` overrides, return the checked tree."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; give the path of a YAML file "
                        "such as configs/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections (model, data, "
                        f"train, ...), not a {type(raw).__name__}")
    apply_overrides(raw, overrides)
    return from_dict(ExperimentConfig, raw, source=str(path))


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set `a.b.c=value` items in a nested dict (value parsed as YAML: 3, 1e-4, true, [1,2])."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key.sub=value "
                            "(e.g. train.steps=100)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, "
                                "not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def from_dict(cls: type, raw: Any, prefix: str = "", source: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys, types, ranges and choices."""
    where = f" (in {source})" if source else ""
    section = prefix or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config key '{prefix}' must be a section (mapping) with keys "
                        f"{', '.join(_names(cls))}; got {raw!r}{where}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"config key '{full}' is unknown{hint}{where}; valid keys in "
                            f"{section}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], full, f.metadata, source)
        elif f.metadata.get("required"):
            raise UserError(f"config key '{full}' is required{where}: {f.metadata.get('help', '')}; "
                            f"set it in the file or with {full}=VALUE")
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, full, source)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(tp: Any, value: Any, key: str, meta: Any, source: str) -> Any:
    where = f" (in {source})" if source else ""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, meta, source)
            except UserError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise UserError(f"config key '{key}' has value {value!r} that is none of "
                        f"{_type_name(tp)}{where}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}' is {value!r}; valid choices: "
                            f"{', '.join(map(str, args))}{where}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list of {_type_name(args[0])}, "
                            f"got {value!r}{where}")
        return [_coerce(args[0], v, f"{key}[{i}]", meta, source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping of {_type_name(args[0])} to "
                            f"{_type_name(args[1])}, got {value!r}{where}")
        return {_coerce(args[0], k, f"{key} (a key)", {}, source):
                _coerce(args[1], v, f"{key}.{k}", meta, source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false, got {value!r}{where}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise UserError(f"config key '{key}' must be an integer, got {value!r}{where}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number, got {value!r}{where}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}' must be a string, got {value!r}{where}")
        return value
    else:
        raise TypeError(f"config field '{key}' has an unsupported type {tp!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = (f"between {lo} and {hi}" if lo is not None and hi is not None
               else f">= {lo}" if lo is not None else f"<= {hi}")
        raise UserError(f"config key '{key}' is {value}; it must be {rng}{where}")
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return {type(None): "null", int: "integer", float: "number", str: "string",
            bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------------------------------
# Out again: plain dicts, flattened params, YAML.


def to_dict(cfg: Any) -> dict:
    """The tree as plain nested dicts/lists (what from_dict reads back)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'steps': 3}} -> {'train.steps': 3} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf key: the reference for config writers."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key)
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else "(required)")
        rows.append((key, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
