"""The config tree: precedence, the promised error messages, and every shipped config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.errors import UserError
from pretrain.train.config import (ExperimentConfig, flatten, from_dict, load_config, to_dict,
                                   to_yaml)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = {
    "model": {"name": "tubevit-ti"},
    "data": {"video_uri": "/tmp/v", "image_uri": "/tmp/i"},
    "train": {"steps": 10},
}


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def error_of(tmp_path, doc, overrides=()) -> str:
    with pytest.raises(UserError) as exc:
        load_config(write(tmp_path, doc), list(overrides))
    return str(exc.value)


def test_defaults_file_and_overrides_precedence(tmp_path):
    doc = {**MINIMAL, "train": {"steps": 10, "lr": 1e-3}}
    cfg = load_config(write(tmp_path, doc), ["train.lr=2e-3", "resources.workers=4"])
    assert cfg.train.steps == 10                 # file
    assert cfg.train.lr == pytest.approx(2e-3)   # CLI beats file
    assert cfg.resources.workers == 4            # CLI beats default
    assert cfg.train.zero_stage == 2             # default
    assert isinstance(cfg.train.lr, float)


def test_required_keys_exist_with_their_meaning(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.zero_stage=3", "checkpoint.uri=/tmp/ck",
                                                 "checkpoint.every_steps=5"])
    assert (cfg.train.steps, cfg.train.zero_stage, cfg.resources.workers) == (10, 3, 1)
    assert (cfg.checkpoint.uri, cfg.checkpoint.every_steps) == ("/tmp/ck", 5)


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "train": {"steps": 10, "stpes": 3}})
    assert "'train.stpes'" in msg and "unknown" in msg
    assert "steps" in msg and "zero_stage" in msg   # the valid keys are listed
    assert "did you mean 'steps'" in msg


def test_unknown_section(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "trian": {}})
    assert "'trian'" in msg and "model, data, train, resources, checkpoint, tracking" in msg


def test_unknown_key_from_override(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["resources.gpus=8"])
    assert "'resources.gpus'" in msg and "workers" in msg


def test_bad_type(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["train.steps=many"])
    assert "'train.steps'" in msg and "must be an integer" in msg and "'many'" in msg
    msg = error_of(tmp_path, MINIMAL, ["train.activation_checkpointing=3"])
    assert "'train.activation_checkpointing'" in msg and "true or false" in msg


def test_out_of_range(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["train.zero_stage=4"])
    assert "'train.zero_stage'" in msg and "between 0 and 3" in msg
    msg = error_of(tmp_path, MINIMAL, ["resources.workers=0"])
    assert "'resources.workers'" in msg and ">= 1" in msg


def test_bad_choice(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["train.precision=fp8"])
    assert "'train.precision'" in msg and "fp32, bf16, fp16" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.name=tubevit-xl"])
    assert "'model.name'" in msg and "tubevit-ti" in msg and "tubevit-h" in msg


def test_missing_required_key(tmp_path):
    doc = {k: v for k, v in MINIMAL.items() if k != "train"}
    msg = error_of(tmp_path, doc)
    assert "'train.steps'" in msg and "required" in msg


def test_cross_field_rules(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["train.cpu_offload=true", "train.zero_stage=2"])
    assert "train.cpu_offload" in msg and "zero_stage" in msg
    msg = error_of(tmp_path, MINIMAL, ["train.warmup_steps=50"])
    assert "train.warmup_steps" in msg


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="key.sub=value"):
        load_config(write(tmp_path, MINIMAL), ["train.steps"])
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_and_flatten(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.betas=[0.8, 0.9]"])
    again = from_dict(ExperimentConfig, yaml.safe_load(to_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(to_dict(cfg))
    assert flat["train.steps"] == 10 and flat["train.betas"] == [0.8, 0.9]
    assert flat["data.synthetic.videos"] == cfg.data.synthetic.videos


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_state_their_command(path):
    cfg = load_config(path)
    assert cfg.train.steps >= 1
    # big_vision style: every config says how to run it.
    assert f"pretrain run configs/{path.name}" in path.read_text()


def test_gpu_configs_are_real_scale():
    for name, model in (("tubevit-b.yaml", "tubevit-b"), ("tubevit-l.yaml", "tubevit-l")):
        cfg = load_config(CONFIGS / name)
        assert cfg.model.name == model
        assert cfg.resources.use_gpu and cfg.resources.workers >= 8
        assert cfg.data.video_uri.startswith("gs://") and cfg.data.image_uri.startswith("gs://")
        assert cfg.checkpoint.uri.startswith("gs://")
        assert cfg.train.precision == "bf16"


def test_smoke_config_is_small():
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert cfg.resources.workers == 2 and cfg.train.zero_stage == 2
    assert not cfg.resources.use_gpu
    assert cfg.data.synthetic.prepare_if_missing
