"""Masked pretraining's training pieces that need no process group: the config (objective,
the `masked` section, the shipped masked configs), the masked objective's loss and its
resumable mask RNG, layer-wise lr decay, fine-tuning from a masked export (`load_encoder`,
`model.init_from`), the reconstruction PNG, and a supervised run refusing unlabelled data.
(The masked run end to end, with stop/resume, is tests/test_masked_train_run.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.data.metadata import DataInfo
from pretrain.errors import UserError
from pretrain.model import create_model, load_model, save_model
from pretrain.model.io import load_encoder, read_metadata
from pretrain.model.mae import DecoderConfig, MaskedAutoencoder
from pretrain.train.config import ExperimentConfig, from_dict, load_config, to_dict
from pretrain.train.masked import MaskedModelling, training_model
from pretrain.train.objectives import make_objective
from pretrain.train.optim import build_optimizer, layer_of, param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TUBES = [{"kernel": [1, 8, 8], "stride": [8, 8, 8]}, {"kernel": [4, 8, 8], "stride": [4, 8, 8]}]


def _encoder(num_classes=None, depth=2):
    torch.manual_seed(0)
    return create_model("tubevit-ti", num_classes=num_classes or {"vid": 4, "img": 3}, depth=depth,
                        dim=48, heads=2, mlp_dim=96, tubes=TUBES)


def _mae(**kw):
    return MaskedAutoencoder(_encoder(**kw), DecoderConfig(dim=32, depth=1, heads=2))


class _Batch:
    def __init__(self, x, y=None, views=1, valid=None, dataset="vid"):
        self.x, self.views, self.valid, self.dataset = x, views, valid, dataset
        self.y = y if y is not None else torch.zeros(len(x) // views, dtype=torch.long)

    def __len__(self):
        return len(self.y)


# ---- config --------------------------------------------------------------------------------


def test_smoke_masked_config_is_smoke_yaml_masked_with_the_same_architecture():
    masked, smoke = load_config(CONFIGS / "smoke-masked.yaml"), load_config(CONFIGS / "smoke.yaml")
    assert masked.train.objective == "masked" and smoke.train.objective == "supervised"
    assert to_dict(masked)["model"] == to_dict(smoke)["model"]   # smoke.yaml fine-tunes its export
    assert masked.masked.scheme in ("random", "aligned")         # sparse tubes: no tube masking
    assert 0 < masked.masked.video_ratio < 1 and masked.masked.decoder.depth < masked.model.depth
    assert masked.checkpoint.uri != smoke.checkpoint.uri
    assert masked.resources.workers == 2 and not masked.resources.use_gpu


def test_smoke_masked_configs_read_smoke_yamls_data_in_grey():
    """Both smoke masked configs demonstrate on smoke.yaml's clips and images drawn in the grey
    "mono" palette (same counts, sizes and sampling; no colour for the kNN monitor's nearest
    neighbours to agree on, pretrain/data/synthetic.py), in a root of their own so smoke.yaml's
    shards stay as they are. smoke-videomae.yaml repeats the section, so it can drift when
    smoke.yaml's changes."""
    smoke = to_dict(load_config(CONFIGS / "smoke.yaml"))["data"]
    keys = ("frames", "frame_stride", "size", "image_size")
    for name in ("smoke-masked.yaml", "smoke-videomae.yaml"):
        data = to_dict(load_config(CONFIGS / name))["data"]
        assert {k: data[k] for k in keys} == {k: smoke[k] for k in keys}, name
        syn = data["synthetic"]
        assert syn["video_style"] == syn["image_style"] == "mono", name
        assert {**syn, "video_style": "bright", "image_style": "bright",
                "root": smoke["synthetic"]["root"]} == smoke["synthetic"], name
        for uri in ("video_uri", "video_eval_uri", "image_uri", "image_eval_uri"):
            assert data[uri] == smoke[uri].replace(smoke["synthetic"]["root"], syn["root"]), (name, uri)
        assert syn["root"] != smoke["synthetic"]["root"], name


def test_masked_configs_resolve_and_build_their_masked_model():
    for name in ("smoke-masked.yaml", "smoke-videomae.yaml", "videomae-b.yaml", "tubevit-b-masked.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.train.objective == "masked", name
        with torch.device("meta"):
            from pretrain.model import model_from_config
            model = training_model(model_from_config(cfg.model, {"data": 10}), cfg)
        assert isinstance(model, MaskedAutoencoder), name
    vb = load_config(CONFIGS / "videomae-b.yaml")
    assert vb.model.name == "videomae-b" and vb.data.frames == 16 and vb.masked.video_ratio == 0.9
    assert vb.masked.scheme == "tube"


def test_layer_decay_and_masked_section_keys_are_checked(tmp_path):
    base = {"model": {"name": "tubevit-ti"}, "data": {"video_uri": "v"}, "train": {"steps": 10}}
    with pytest.raises(UserError, match="'train.layer_decay'"):
        from_dict(ExperimentConfig, {**base, "train": {"steps": 10, "layer_decay": 1.5}})
    with pytest.raises(UserError, match="'masked.scheme'.*auto, tube, random, aligned"):
        from_dict(ExperimentConfig, {**base, "masked": {"scheme": "blocks"}})
    with pytest.raises(UserError, match="masked.video_ratio"):
        from_dict(ExperimentConfig, {**base, "masked": {"video_ratio": 0.0}})
    with pytest.raises(UserError, match="'masked.decoder.depth'"):
        from_dict(ExperimentConfig, {**base, "masked": {"decoder": {"depth": 0}}})


# ---- the masked objective -------------------------------------------------------------------


def test_masked_loss_and_the_mask_rng_resumes_from_its_state():
    cfg = load_config(CONFIGS / "smoke-masked.yaml").masked
    model = _mae()
    x = torch.randn(2, 3, 8, 16, 16)
    batch = _Batch(x)
    straight = MaskedModelling(cfg, seed=3, rank=0)
    losses = [straight.loss(model, batch).item() for _ in range(3)]
    assert len(set(losses)) == 3                       # a new mask every micro-batch
    resumed = MaskedModelling(cfg, seed=3, rank=0)
    resumed.load_state_dict(straight.state_dict() | {"draws": 2})
    assert resumed.loss(model, batch).item() == losses[2]      # the same third mask
    assert resumed.state_dict() == {"draws": 3}
    other_rank = MaskedModelling(cfg, seed=3, rank=1)
    assert other_rank.loss(model, batch).item() != losses[0]   # ranks draw their own masks


def test_activation_checkpointing_recomputes_every_block_and_changes_no_gradient_bit():
    """train.activation_checkpointing on a masked run (build_engine calls
    set_grad_checkpointing): encoder and decoder blocks run again in backward, and the
    gradients are the ones without it, bit for bit (the masked run test resumes with it on
    and compares losses exactly)."""
    from pretrain.model.masking import mask_tokens

    model = _mae()
    x = torch.randn(2, 3, 8, 16, 16)
    mask = mask_tokens(model, x, 0.75, "aligned", torch.Generator().manual_seed(0))
    calls = []
    for i, block in enumerate((model.encoder.blocks[0], model.decoder.blocks[0])):
        # the forward itself: torch's recompute skips module hooks
        block.forward = lambda *args, i=i, forward=block.forward: (calls.append(i), forward(*args))[1]
    grads = {}
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enabled)
        calls.clear()
        model(x, mask).backward()
        grads[enabled] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert sorted(calls) == ([0, 1] if not enabled else [0, 0, 1, 1]), (enabled, calls)
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])


def test_masked_loss_is_the_models_reconstruction_error_of_the_drawn_mask():
    from pretrain.model.masking import mask_tokens
    from pretrain.train.masked import mask_seed

    cfg = load_config(CONFIGS / "smoke-masked.yaml").masked
    model = _mae()
    objective = make_objective("masked", load_config(CONFIGS / "smoke-masked.yaml"), rank=0)
    for x in (torch.randn(2, 3, 8, 16, 16), torch.randn(2, 3, 16, 16)):
        draw = objective.draws
        got = objective.loss(model, _Batch(x))
        g = torch.Generator().manual_seed(mask_seed(0, 0, draw))
        ratio = cfg.video_ratio if x.ndim == 5 else cfg.image_ratio
        mask = mask_tokens(model, x, ratio, cfg.scheme, g)
        torch.testing.assert_close(got, model(x, mask))


def test_masked_eval_gives_knn_top1_recon_loss_and_a_png():
    cfg = load_config(CONFIGS / "smoke-masked.yaml")
    objective = make_objective("masked", cfg)
    model = _mae().eval()
    g = torch.Generator().manual_seed(1)
    # Two classes the random encoder already separates: bright vs dark clips.
    def clips(n, label_of):
        y = torch.tensor([label_of(i) for i in range(n)])
        x = torch.randn(n, 3, 8, 16, 16, generator=g) * 0.1 + (y.view(-1, 1, 1, 1, 1) * 4.0 - 2.0)
        return x, y
    bx, by = clips(8, lambda i: i % 2)
    qx, qy = clips(4, lambda i: (i + 1) % 2)
    by[0] = -1   # unlabelled: left out of the bank
    splits = {"train": [_Batch(bx, by)],
              "held_out": [_Batch(qx.repeat_interleave(2, 0), qy, views=2,
                                  valid=torch.tensor([True, True, True, False]))]}
    with torch.no_grad():
        out = objective.evaluate(model, "video", splits, world=1)
    assert out["eval/knn_video_top1"] == 1.0
    assert out["eval/video_recon_loss"] > 0
    png = objective.pictures["video"]
    assert png.startswith(b"\x89PNG")


def test_visible_pixels_follow_the_tube_geometry():
    from pretrain.train.recon_grid import grid_array, visible_pixels

    model = _mae()
    enc = model.encoder
    x = torch.zeros(1, 3, 8, 16, 16)
    groups = enc.token_groups(tuple(x.shape))       # 2D tube: 1x2x2 grid, 3D tube: 2x2x2 grid
    n = sum(g[2][0] * g[2][1] * g[2][2] for g in groups)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, 0] = False                              # only the first 2D-tube token is visible
    seen = visible_pixels(enc, tuple(x.shape), mask)
    assert seen.shape == (1, 8, 16, 16)
    assert seen[0, 0, :8, :8].all() and seen.sum() == 64      # its kernel: frame 0, 8x8 pixels
    array = grid_array(x, seen, x)
    assert array.shape == (3 * (16 + 2) - 2, 8 * (16 + 2) - 2, 3)


def test_visible_pixels_of_an_image_through_two_frame_cubes():
    """VideoMAE's cubes are 2 frames deep, so an image runs as a 2-frame clip: its map is
    still one frame (smoke-videomae.yaml's first image eval failed on a 2-frame map)."""
    from pretrain.train.recon_grid import grid_array, visible_pixels

    enc = create_model("videomae-s", depth=1, dim=24, heads=2, mlp_dim=48, tubelet=(2, 8, 8),
                       num_classes={"img": 3})
    x = torch.zeros(2, 3, 16, 16)                   # 2x2 patches
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[:, 3] = False                              # the bottom-right patch is visible
    seen = visible_pixels(enc, tuple(x.shape), mask)
    assert seen.shape == (2, 1, 16, 16)
    assert seen[:, 0, 8:, 8:].all() and seen.sum() == 2 * 64
    assert grid_array(x, seen, x).shape == (2 * 3 * (16 + 2) - 2, 16, 3)


# ---- layer-wise lr decay --------------------------------------------------------------------


def test_layer_decay_scales_each_blocks_lr_and_keeps_the_old_groups_without_it():
    model = _encoder(depth=3)
    assert layer_of("tokenizer.tubes.0.weight", 3) == 0 and layer_of("pos_embed.grid", 3) == 0
    assert layer_of("blocks.0.attn.qkv.weight", 3) == 1 and layer_of("blocks.2.mlp.fc1.bias", 3) == 3
    assert layer_of("heads.vid.weight", 3) == 4 and layer_of("norm.weight", 3) == 4
    assert layer_of("encoder.blocks.1.norm1.weight", 3) == 2
    assert layer_of("decoder.blocks.0.attn.qkv.weight", 3) == 4   # the decoder is on top
    # Without decay: the two groups of before (decayed first), nothing else.
    plain = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in plain] == [0.05, 0.0]
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                          layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["heads.vid.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["blocks.2.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(params["blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** 3)
    assert lr_of[id(params["tokenizer.tubes.1.weight"])] == pytest.approx(1e-3 * 0.5 ** 4)
    assert wd_of[id(params["blocks.0.attn.qkv.weight"])] == 0.05
    assert wd_of[id(params["blocks.0.attn.qkv.bias"])] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    assert all("lr_scale" not in g for g in opt.param_groups)


def test_the_schedule_keeps_each_groups_scale():
    from pretrain.train.optim import build_scheduler

    model = _encoder(depth=2)
    opt = build_optimizer(model, lr=1.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                          layer_decay=0.5)
    sched = build_scheduler(opt, lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=10)
    first = sched.get_last_lr()                    # warm-up step 0: 1/4 of each group's base
    assert max(first) == pytest.approx(0.25) and min(first) == pytest.approx(0.25 * 0.5 ** 3)


# ---- fine-tuning from a masked export -------------------------------------------------------


def test_a_masked_export_loads_whole_and_as_an_encoder_with_new_heads(tmp_path):
    mae = _mae()
    path = str(tmp_path / "masked.safetensors")
    save_model(mae, path)
    assert read_metadata(path)["family"] == "masked-autoencoder"
    whole = load_model(path)
    assert isinstance(whole, MaskedAutoencoder)
    saved = mae.state_dict()
    assert all(torch.equal(t, saved[k]) for k, t in whole.state_dict().items())
    torch.manual_seed(5)
    enc = load_encoder(path, {"vid": 4, "kinetics": 7})
    assert type(enc).__name__ == "TubeViT" and sorted(enc.datasets) == ["kinetics", "vid"]
    for name, t in enc.state_dict().items():
        if not name.startswith("heads.kinetics"):
            assert torch.equal(t, mae.encoder.state_dict()[name]), name
    assert not any(k.startswith("decoder") for k in enc.state_dict())
    assert enc.heads["kinetics"].weight.shape == (7, 48)
    assert enc.heads["kinetics"].weight.std() > 0          # initialised, not left empty
    assert sorted(load_encoder(path).datasets) == sorted(mae.encoder.datasets)  # the file's heads


def test_init_from_a_masked_export_builds_a_supervised_model_or_a_new_decoder(tmp_path):
    from pretrain.train.worker import build_model

    mae = _mae()
    path = str(tmp_path / "masked.safetensors")
    save_model(mae, path)
    doc = {"model": {"name": "tubevit-ti", "depth": 2, "dim": 48, "heads": 2, "mlp_dim": 96,
                     "tubes": TUBES, "init_from": path},
           "data": {"video_uri": "v"}, "train": {"steps": 10}}
    supervised = build_model(from_dict(ExperimentConfig, doc), {"smoke_video": 4})
    assert supervised.datasets == ["smoke_video"]
    assert torch.equal(supervised.blocks[1].mlp.fc1.weight, mae.encoder.blocks[1].mlp.fc1.weight)
    doc["train"]["objective"] = "masked"
    doc["masked"] = {"decoder": {"dim": 32, "depth": 2, "heads": 2}}
    again = build_model(from_dict(ExperimentConfig, doc), {"smoke_video": 4})
    assert isinstance(again, MaskedAutoencoder) and len(again.decoder.blocks) == 2
    assert torch.equal(again.encoder.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)


def test_bootstrap_takes_its_tubes_from_a_masked_export(tmp_path):
    from pretrain.model.bootstrap import bootstrap

    mae = MaskedAutoencoder(create_model("tubevit-ti", depth=1, dim=48, heads=2, mlp_dim=96,
                                         tubes=[{"kernel": [1, 16, 16], "stride": [4, 16, 16]},
                                                {"kernel": [4, 8, 8], "stride": [4, 8, 8]}]),
                            DecoderConfig(dim=32, depth=1, heads=2))
    path = str(tmp_path / "small.safetensors")
    save_model(mae, path)
    small = load_encoder(path)
    image_vit = {"patch_embed.proj.weight": torch.randn(64, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(64),
                 "pos_embed": torch.zeros(1, 5, 64), "cls_token": torch.zeros(1, 1, 64),
                 "norm.weight": torch.ones(64), "norm.bias": torch.zeros(64)}
    for k, shape in {"norm1.weight": (64,), "norm1.bias": (64,), "attn.qkv.weight": (192, 64),
                     "attn.qkv.bias": (192,), "attn.proj.weight": (64, 64), "attn.proj.bias": (64,),
                     "norm2.weight": (64,), "norm2.bias": (64,), "mlp.fc1.weight": (128, 64),
                     "mlp.fc1.bias": (128,), "mlp.fc2.weight": (64, 128), "mlp.fc2.bias": (64,)}.items():
        image_vit[f"blocks.0.{k}"] = torch.randn(shape) * 0.02
    model, _ = bootstrap(image_vit, small, gate_layer=0, heads=2)
    assert model.config.dim == 64 and len(model.config.tubes) == 2


# ---- data a supervised run cannot use --------------------------------------------------------


def test_a_supervised_run_on_unlabelled_data_is_a_clear_error_and_a_masked_one_is_fine():
    info = DataInfo({"video": {"name": "clips", "num_classes": 0, "labelled": False},
                     "image": {"name": "img", "num_classes": 3}}, (8, 16, 16), (16, 16))
    with pytest.raises(UserError, match="data.video_uri.*without a label.*train.objective=masked"):
        make_objective("supervised").check_data(info)
    cfg = load_config(CONFIGS / "smoke-masked.yaml")
    make_objective("masked", cfg).check_data(info)
