"""The config tree: precedence, the promised error messages, and every shipped config."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from checkpoints.restore import check_compatible
from orchestration.cli import main as cli
from pretrain import config_loader
from pretrain.errors import UserError
from pretrain.model import TubeViTConfig, model_config
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


def test_objective_is_chosen_by_name_from_the_registered_ones(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).train.objective == "supervised"
    assert load_config(write(tmp_path, MINIMAL), ["train.objective=masked"]).train.objective == "masked"
    # the old name of supervised (configs of runs made before the rename) still loads
    old = load_config(write(tmp_path, MINIMAL), ["train.objective=classification"])
    assert old.train.objective == "supervised"
    msg = error_of(tmp_path, MINIMAL, ["train.objective=contrastive"])
    assert "'train.objective'" in msg and "supervised" in msg and "masked" in msg


def test_missing_required_key(tmp_path):
    doc = {k: v for k, v in MINIMAL.items() if k != "train"}
    msg = error_of(tmp_path, doc)
    assert "'train.steps'" in msg and "required" in msg


def test_cross_field_rules(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["train.cpu_offload=true", "train.zero_stage=2"])
    assert "train.cpu_offload" in msg and "zero_stage" in msg
    msg = error_of(tmp_path, MINIMAL, ["train.min_lr=1.0"])
    assert "train.min_lr" in msg and "train.lr" in msg
    # a warm-up longer than the run is clamped to it (issue 14 §11), with a one-line note
    cfg = load_config(write(tmp_path, MINIMAL), ["train.warmup_steps=50"])
    assert cfg.train.warmup_steps == cfg.train.steps


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


# ---- derivation: `base: other.yaml` ----------------------------------------------------


def test_a_config_derives_from_its_base_and_holds_only_what_differs(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.yaml").write_text(yaml.safe_dump(
        {**MINIMAL, "train": {"steps": 10, "lr": 1e-3, "betas": [0.8, 0.9]}}))
    (tmp_path / "bases" / "mid.yaml").write_text(yaml.safe_dump(
        {"base": "root.yaml", "train": {"lr": 2e-3}, "data": {"frames": 8}}))
    leaf = tmp_path / "leaf.yaml"   # the base path is relative to the deriving file
    leaf.write_text(yaml.safe_dump({"base": "bases/mid.yaml", "train": {"betas": [0.7, 0.8]}}))
    cfg = load_config(leaf, ["train.steps=12"])
    assert cfg.train.lr == pytest.approx(2e-3)           # mid beats root
    assert cfg.train.betas == [0.7, 0.8]                 # a list is replaced, not merged
    assert cfg.train.steps == 12                         # the command line beats every file
    assert cfg.data.frames == 8 and cfg.data.video_uri == "/tmp/v"   # sections merge by key
    assert cfg.model.name == "tubevit-ti"


def test_a_base_cycle_is_an_error_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {steps: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="derives from itself") as exc:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(exc.value) and "b.yaml" in str(exc.value)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(UserError, match="missing.yaml.*does not exist"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("derived,base", [("tubevit-l.yaml", "tubevit-b.yaml"),
                                          ("bootstrap-l.yaml", "bootstrap-h.yaml")])
def test_shipped_large_configs_derive_from_their_smaller_sibling(derived, base):
    text = (CONFIGS / derived).read_text()
    assert f"base: {base}" in text
    own, parent = load_config(CONFIGS / derived), load_config(CONFIGS / base)
    assert own.data.video_uri == parent.data.video_uri and own.train.steps == parent.train.steps
    assert own.checkpoint.uri != parent.checkpoint.uri
    assert own.tracking.experiment == derived.removesuffix(".yaml")


# ---- numbers, renamed keys ---------------------------------------------------------------


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.nan", "train.lr=inf",
                                      "train.grad_clip=-.inf", "data.fps=.inf",
                                      "model.drop_path_rate=nan"])
def test_nan_and_infinities_are_rejected_naming_the_key(tmp_path, override):
    msg = error_of(tmp_path, MINIMAL, [override])
    assert f"'{override.split('=')[0]}'" in msg and "finite" in msg


def test_nan_in_a_file_is_rejected(tmp_path):
    msg = error_of(tmp_path, {**MINIMAL, "train": {"steps": 10, "lr": float("nan")}})
    assert "'train.lr'" in msg and "finite" in msg


@dataclass
class _Section:
    RENAMED_KEYS = {"learning_rate": "lr"}
    lr: float = config_loader.config_field(0.1, "the rate", min=0.0)


@dataclass
class _Tree:
    opt: _Section = config_loader.config_field(factory=_Section)


def test_a_renamed_key_fails_naming_its_new_name():
    with pytest.raises(UserError, match="'opt.learning_rate' was renamed to 'opt.lr'"):
        config_loader.from_dict(_Tree, {"opt": {"learning_rate": 0.2}})
    assert config_loader.from_dict(_Tree, {"opt": {"lr": 0.2}}).opt.lr == pytest.approx(0.2)


# ---- the model section is the model family's config --------------------------------------


def test_model_fields_are_settable_from_yaml_and_the_command_line(tmp_path):
    doc = {**MINIMAL, "model": {"name": "tubevit-ti", "pos_embed": "learned", "pos_grid": [14, 14]}}
    cfg = load_config(write(tmp_path, doc), ["model.attn_drop_rate=0.1", "model.class_token=true"])
    assert isinstance(cfg.model, TubeViTConfig)
    assert (cfg.model.pos_embed, cfg.model.pos_grid, cfg.model.class_token) == ("learned", (14, 14), True)
    assert cfg.model.attn_drop_rate == pytest.approx(0.1)


def test_model_precedence_command_line_file_size_preset_default(tmp_path):
    doc = {**MINIMAL, "model": {"name": "tubevit-l", "depth": 6, "heads": 8}}
    cfg = load_config(write(tmp_path, doc), ["model.depth=4"])
    assert cfg.model.depth == 4                   # command line
    assert cfg.model.heads == 8                   # file
    assert cfg.model.dim == 1024                  # tubevit-l's preset
    assert cfg.model.drop_rate == 0.0             # dataclass default
    assert load_config(write(tmp_path, {k: v for k, v in MINIMAL.items() if k != "model"})
                       ).model.name == "tubevit-b"


def test_model_field_metadata_is_enforced_by_the_loader(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["model.depth=0"])
    assert "'model.depth'" in msg and ">= 1" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.drop_path_rate=1.0"])
    assert "'model.drop_path_rate'" in msg and "< 1.0" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.kernel_mode=shared"])
    assert "'model.kernel_mode'" in msg and "separate, interpolated" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.pos_embed=rope"])
    assert "'model.pos_embed'" in msg and "fixed, learned" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.tubes=[{kernel: [1, 8], stride: [8, 8, 8]}]"])
    assert "'model.tubes[0].kernel'" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.heads=5"])   # a cross-field rule: validate()
    assert "divisible by heads=5" in msg


def test_model_unknown_keys_and_names(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["model.widht=3"])
    assert "'model.widht'" in msg and "pos_embed" in msg and "attn_drop_rate" in msg
    msg = error_of(tmp_path, MINIMAL, ["model.name=vit-b"])
    assert "'model.name'" in msg and "tubevit-ti, tubevit-s, tubevit-b, tubevit-l, tubevit-h" in msg


def test_model_heads_come_from_the_data_not_the_file(tmp_path):
    msg = error_of(tmp_path, MINIMAL, ["model.num_classes={k400: 400}"])
    assert "'model.num_classes'" in msg and "cannot be set" in msg and "data" in msg
    assert "num_classes" not in to_dict(load_config(write(tmp_path, MINIMAL)))["model"]


# Written by TubeViTConfig.to_dict() at 427e247 (configs/smoke.yaml's model): what model files
# and checkpoint manifests of that version hold.
OLD_SMOKE_ARCHITECTURE = json.loads("""
{"attn_drop_rate": 0.0, "base_kernel": [8, 8, 8], "class_token": false, "depth": 3, "dim": 96,
 "drop_path_rate": 0.0, "drop_rate": 0.0, "gate_layer": null, "heads": 4, "in_chans": 3,
 "kernel_mode": "separate", "mlp_dim": 384, "norm_eps": 1e-06,
 "num_classes": {"imagenet": 1000, "kinetics": 400}, "pool_heads": null, "pos_embed": "fixed",
 "pos_grid": null, "qkv_bias": true, "skip_unfit_tubes": false,
 "tubes": [{"kernel": [1, 8, 8], "offset": [0, 0, 0], "s2d_axis": null, "s2d_factor": 1, "stride": [8, 8, 8]},
           {"kernel": [4, 8, 8], "offset": [0, 0, 0], "s2d_axis": null, "s2d_factor": 1, "stride": [4, 8, 8]},
           {"kernel": [8, 4, 4], "offset": [0, 4, 4], "s2d_axis": null, "s2d_factor": 1, "stride": [8, 8, 8]}]}
""")


def test_stored_architectures_of_the_previous_version_load_and_still_match():
    old = TubeViTConfig.from_dict(OLD_SMOKE_ARCHITECTURE)
    assert json.loads(old.to_json()) == OLD_SMOKE_ARCHITECTURE
    cfg = load_config(CONFIGS / "smoke.yaml").model
    now = json.loads(TubeViTConfig.to_json(
        model_config(cfg.name, **{k: getattr(cfg, k) for k in ("depth", "dim", "heads", "mlp_dim",
                                                                "tubes")},
                     num_classes={"kinetics": 400, "imagenet": 1000})))
    check_compatible(OLD_SMOKE_ARCHITECTURE, now, "old")        # a resume is accepted
    assert "name" not in now and "init_from" not in now


# ---- `pretrain config show | keys` ------------------------------------------------------


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert cli(["config", "show", str(path), "train.steps=7", "model.attn_drop_rate=0.2",
                "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown == to_dict(load_config(path, ["train.steps=7", "model.attn_drop_rate=0.2"]))
    assert shown["train"]["steps"] == 7 and shown["model"]["depth"] == 12
    assert cli(["config", "show", str(CONFIGS / "tubevit-l.yaml")]) == 0
    again = tmp_path / "again.yaml"       # the YAML output is a config giving the same experiment
    again.write_text(capsys.readouterr().out)
    assert to_dict(load_config(again)) == to_dict(load_config(CONFIGS / "tubevit-l.yaml"))
    assert cli(["config", "show", str(path), "train.lr=nan"]) == 2
    assert "'train.lr'" in capsys.readouterr().err


def test_config_keys_lists_every_key_with_type_default_and_help(capsys):
    assert cli(["config", "keys", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["keys"]}
    assert rows["train.lr"]["type"] == "number" and rows["train.lr"]["default"] == 5e-5
    assert "learning rate" in rows["train.lr"]["help"]
    assert {"model.pos_embed", "model.attn_drop_rate", "data.synthetic.videos",
            "checkpoint.uri", "bootstrap.freeze"} <= set(rows)
    assert "tubevit-h" in rows["model.name"]["help"]
    assert cli(["config", "keys", "model", "--model", "tubevit-l"]) == 0
    text = capsys.readouterr().out
    assert "model.depth  (integer, default 24)" in text and "model.pos_embed" in text
    assert "train.lr" not in text
    assert cli(["config", "keys", "modle"]) == 2
    assert "valid sections: model, data" in capsys.readouterr().err


def test_a_reader_that_stops_early_gets_no_traceback():
    # `pretrain config keys | head -3`: the reader is gone while the verb still prints (here
    # gone before it starts, so the write fails however large the pipe's buffer).
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "config", "keys"],
                          stdout=write_end, stderr=subprocess.PIPE, cwd=CONFIGS.parent,
                          timeout=120)
    os.close(write_end)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"Exception ignored" not in proc.stderr
