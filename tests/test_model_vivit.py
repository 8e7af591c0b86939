"""ViViT models 1-3 and TimeSformer (pretrain/model/vivit.py) against their papers' figures,
their factorisations, FLOPs against torch's counter, images, checkpointing, model files and
the masked objective. The registry-wide checks (meta build, gradients, save/load on the
smallest clip) are tests/test_models_all.py's; here the models are small but see a grid of
several temporal and spatial indices.

Published figures (papers' "FLOPs" are multiply-adds; ours count 2 per multiply-add):
- ViViT, Table 4 (ViViT-B, 16x2 tubelets, 32x224x224, Kinetics-400 head): model 1 88.9M /
  455.2 GMACs, model 2 (FE) 115.1M / 284.4, model 3 (FSA) 117.3M / 372.3. We count 88.95M /
  903.0 GFLOPs, 115.06M / 566.7, 117.32M / 742.2: parameters within 0.1M, FLOPs within 1%
  (the rest: elementwise work we leave out).
- TimeSformer, Table 1: divided space-time 121.4M parameters (space-only 85.9M, axial
  156.8M). All three agree, to 0.05M, with TimeSformer's layers plus a 174-class head
  (Something-Something-v2, the table's other dataset): 121.39M here; a Kinetics-400 head
  gives 121.57M, no head 121.26M. Its cost, 0.59 TFLOPs (GMACs) for 3 views of 8x224x224:
  196.7 GMACs a view = 393.3 GFLOPs; we count 391.7.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.errors import UserError
from pretrain.model import (MaskedAutoencoder, count_flops, count_masked_flops, count_params, create_model,
                            load_model, mask_tokens, save_model)
from pretrain.model.vit import DropPath
from pretrain.model.vivit import DividedBlock, FactorisedBlock, resample_positions

FAMILIES = ("vivit", "vivit-fe", "vivit-fsa", "timesformer")
# Small, with a table for 4x32x32 clips: vivit grid 2x2x2, timesformer 4x2x2.
SMALL = dict(depth=2, dim=24, mlp_dim=48, heads=2, num_frames=4, img_size=32, num_classes={"k": 3, "i": 2})
VARIANTS = [("vivit", {}), ("vivit", {"class_token": False}), ("vivit", {"tubelet": (1, 16, 16)}),
            ("vivit-fe", {}), ("vivit-fe", {"spatial_pool": "mean", "temporal_depth": 1}),
            ("vivit-fsa", {}), ("timesformer", {}), ("timesformer", {"tubelet": (2, 16, 16)})]
IDS = [f"{f}-{'-'.join(map(str, o.values())) or 'default'}" for f, o in VARIANTS]
CORE = [v for v in VARIANTS if not v[1]] + [("vivit", {"class_token": False})]   # the slower tests
CORE_IDS = [IDS[VARIANTS.index(v)] for v in CORE]


def small(family: str, seed: int = 0, **overrides):
    """A small model; TimeSformer without its zero temporal_fc init unless asked (a zero layer
    gives the temporal attention behind it an exactly zero first gradient)."""
    if family == "timesformer":
        overrides = {"zero_init_temporal_fc": False, **overrides}
    torch.manual_seed(seed)
    return create_model(f"{family}-s", **{**SMALL, **overrides})


def meta(name: str, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def clip(frames: int = 4, size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the papers' figures (meta builds: nothing allocated) --------------------------------------

K400 = {"kinetics": 400}


@pytest.mark.parametrize("name,size,tokens,m_params,gflops", [
    ("vivit-b", (32, 224, 224), 3136, 88.9, 2 * 455.2),
    ("vivit-fe-b", (32, 224, 224), 3136, 115.1, 2 * 284.4),
    ("vivit-fsa-b", (32, 224, 224), 3136, 117.3, 2 * 372.3),
    ("timesformer-b", (8, 224, 224), 1568, None, 2 * 590 / 3),
])
def test_b_models_match_their_papers(name, size, tokens, m_params, gflops):
    model = meta(name, num_classes=K400)
    f = count_flops(model, size)
    assert f["tokens"] == tokens
    if m_params is not None:
        assert count_params(model) / 1e6 == pytest.approx(m_params, abs=0.1)
    assert f["total"] / 1e9 == pytest.approx(gflops, rel=0.01)
    assert count_flops(model, size[1:])["tokens"] == 196          # an image: one temporal index


def test_timesformer_b_has_121_4m_parameters():
    model = meta("timesformer-b", num_classes={"ssv2": 174})       # see the module docstring
    assert count_params(model) / 1e6 == pytest.approx(121.4, abs=0.1)
    # Space-only TimeSformer (85.9M) is this minus every temporal part of the blocks.
    temporal = sum(p.numel() for n, p in model.named_parameters() if ".temporal_" in n)
    time_table = model.pos_embed.time.table.numel()
    assert (count_params(model) - temporal - time_table) / 1e6 == pytest.approx(85.9, abs=0.1)


def test_factorised_encoder_has_more_parameters_and_fewer_flops_than_model_1():
    size = (32, 224, 224)
    m1, m2, m3 = (meta(n, num_classes=K400) for n in ("vivit-b", "vivit-fe-b", "vivit-fsa-b"))
    assert count_params(m2) > count_params(m1) and count_flops(m2, size)["total"] < count_flops(m1, size)["total"]
    assert count_flops(m3, size)["total"] < count_flops(m1, size)["total"]
    # The attention matmuls are what the factorisations save: O(N^2) -> O(nt ns^2 + ns nt^2).
    assert count_flops(m1, size)["attention_matmul"] > 10 * count_flops(m3, size)["attention_matmul"]


def test_tubelet_and_uniform_frame_sampling_token_counts():
    assert count_flops(meta("vivit-b"), (32, 224, 224))["tokens"] == 16 * 14 * 14
    assert count_flops(meta("vivit-b", tubelet=(1, 16, 16)), (32, 224, 224))["tokens"] == 32 * 196
    assert count_flops(meta("vivit-b", tubelet=(4, 32, 32)), (30, 224, 200))["tokens"] == 7 * 7 * 6


@pytest.mark.parametrize("family", FAMILIES)
def test_every_size_builds_on_meta(family):
    for size in ("s", "b", "l", "h"):
        model = meta(f"{family}-{size}")
        assert all(p.is_meta for p in model.parameters())
        assert count_flops(model, (16, 224, 224))["total"] > 0


# ---- FLOPs against torch's counter -----------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", VARIANTS, ids=IDS)
def test_flop_count_matches_torch_flop_counter(family, overrides):
    model = small(family, **overrides).eval()
    for x in (clip(frames=6, size=48, batch=1), torch.randn(1, 3, 32, 48)):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, dataset="k")
        ours = count_flops(model, tuple(x.shape[2:]), dataset="k")
        assert ours["total"] == counter.get_total_flops(), tuple(x.shape)


# ---- the factorisations ---------------------------------------------------------------------------

def _changed(block, x, grid, token, cls: bool):
    """Which output tokens change when input `token` (a patch token, t-major) changes."""
    y = x.clone()
    y[:, token + int(cls)] += torch.randn(x.shape[-1])     # not a constant: LayerNorm would remove it
    with torch.no_grad():
        diff = (block(y, grid) - block(x, grid)).abs().sum((0, 2))
    return (diff > 1e-6).tolist()


@pytest.mark.parametrize("block_type,cls", [(FactorisedBlock, False), (DividedBlock, True)])
def test_factorised_attention_mixes_one_axis_at_a_time(block_type, cls):
    torch.manual_seed(0)
    nt, ns, d = 3, 4, 8
    block = block_type(d, 2, 16).eval()
    x = torch.randn(1, int(cls) + nt * ns, d)
    token = 1 * ns + 2                                      # t = 1, s = 2
    expect_t = [int(cls) * [False] + [i // ns == 1 for i in range(nt * ns)]]
    expect_s = [int(cls) * [False] + [i % ns == 2 for i in range(nt * ns)]]
    with torch.no_grad():                                   # spatial attention off: time only
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
    assert _changed(block, x, (nt, ns), token, cls) == expect_s[0]
    torch.manual_seed(0)
    block = block_type(d, 2, 16).eval()
    with torch.no_grad():                                   # temporal attention off: space only
        out = block.temporal_fc if block_type is DividedBlock else block.temporal_attn.proj
        out.weight.zero_()
        out.bias.zero_()
    got = _changed(block, x, (nt, ns), token, cls)
    if cls:   # TimeSformer: the CLS token reads every frame's spatial attention
        assert got[0] and got[1:] == expect_t[0][1:]
    else:
        assert got == expect_t[0]


def test_timesformer_init_zeroes_temporal_fc_but_the_first():
    model = small("timesformer", zero_init_temporal_fc=True)
    fc = [b.temporal_fc.weight for b in model.blocks]
    assert fc[0].abs().sum() > 0 and all(w.abs().sum() == 0 for w in fc[1:])
    assert model.pos_embed.time.table.abs().sum() == 0       # TimeSformer's time_embed starts at 0
    model(clip(), dataset="k").square().mean().backward()   # the zeroed layers still learn
    assert all(b.temporal_fc.weight.grad.abs().sum() > 0 for b in model.blocks)


def test_positions_crop_time_stretch_time_and_resample_space():
    table = torch.randn(4, 3, 3, 5)
    assert torch.equal(resample_positions(table, (4, 3, 3), True, True), table)
    assert torch.equal(resample_positions(table, (2, 3, 3), True, True), table[:2])   # shorter clip
    assert resample_positions(table, (8, 3, 3), True, True).shape == (8, 3, 3, 5)
    assert resample_positions(table, (1, 6, 2), True, True).shape == (1, 6, 2, 5)
    space = torch.randn(1, 3, 3, 5)                          # no time axis: broadcast over frames
    assert resample_positions(space, (7, 3, 3), False, True).shape == (1, 3, 3, 5)


# ---- images, gradients, checkpointing, model files ------------------------------------------------

@pytest.mark.parametrize("family,overrides", VARIANTS, ids=IDS)
def test_images_are_one_temporal_index(family, overrides):
    model = small(family, **overrides).eval()
    image = torch.randn(2, 3, 32, 48)
    t = model.config.tubelet[0]
    with torch.no_grad():
        as_clip = model(image[:, :, None].expand(-1, -1, t, -1, -1), dataset="i")
        torch.testing.assert_close(model(image, dataset="i"), as_clip, rtol=0, atol=0)
        assert model(image, dataset="i").shape == (2, 2)


@pytest.mark.parametrize("family,overrides", CORE, ids=CORE_IDS)
def test_every_parameter_gets_a_gradient_and_checkpointing_changes_nothing(family, overrides):
    model = small(family, **overrides, drop_rate=0.1, drop_path_rate=0.2, attn_drop_rate=0.1).train()
    model.set_all_parameters_in_forward(True)
    x = clip(frames=6, batch=1)                              # longer than the table: stretched
    dropouts = [m for m in model.modules() if isinstance(m, (nn.Dropout, DropPath))]

    def run():
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        out = model(x, dataset="k")
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for m in dropouts:      # wiring first: a dropped residual branch would leave a zero gradient
        m.eval()
    _, grads = run()
    for n, p in model.named_parameters():
        if n.startswith("heads.i."):                          # the idle head: there, with zeros
            assert n in grads
        else:
            assert n in grads and grads[n].abs().sum() > 0, n
    for m in dropouts:      # then dropout everywhere: the recompute must replay the same masks
        m.train()
    out, grads = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=IDS)
def test_save_load_round_trip(family, overrides, tmp_path):
    model = small(family, **overrides).eval()
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    loaded = load_model(path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    x = clip(frames=2, size=48)                               # shorter and larger than the table
    with torch.no_grad():
        assert torch.equal(model(x, dataset="k"), loaded(x, dataset="k"))


def test_meta_build_then_init_gives_the_real_model():
    for family in FAMILIES:
        real = small(family)
        with torch.device("meta"):
            model = create_model(f"{family}-s", **real.config.to_dict())
        model.to_empty(device="cpu")
        for m in (model, real):
            torch.manual_seed(0)
            m.init_weights()
        for (n, p), (_, q) in zip(model.named_parameters(), real.named_parameters()):
            assert torch.equal(p, q), (family, n)


# ---- the masked objective --------------------------------------------------------------------

def test_model_1_without_cls_is_masked_pretrainable():
    mae = MaskedAutoencoder(small("vivit", class_token=False))
    x = clip()
    mask = mask_tokens(mae, x, 0.75, "tube", torch.Generator().manual_seed(0))
    loss = mae(x, mask)
    loss.backward()
    assert torch.isfinite(loss) and mae.encoder.pos_embed.table.grad.abs().sum() > 0
    f = count_masked_flops(mae, (4, 32, 32), 0.75)
    assert f["tokens"] == 8 and f["visible_tokens"] == 2


@pytest.mark.parametrize("family,overrides,reason", [
    ("vivit", {}, "CLS"), ("vivit-fe", {}, "grid"), ("vivit-fsa", {}, "grid"), ("timesformer", {}, "grid")])
def test_the_others_are_refused_with_the_reason(family, overrides, reason):
    with pytest.raises(UserError, match=reason):
        MaskedAutoencoder(small(family, **overrides))


# ---- pretrain plan --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,frames,tokens,gflops", [
    ("vivit-b", 32, 3136, 903.05), ("vivit-fe-b", 32, 3136, 566.68),
    ("vivit-fsa-b", 32, 3136, 742.19), ("timesformer-b", 8, 1568, 391.66)])
def test_plan_prints_the_figures(capsys, name, frames, tokens, gflops):
    import json

    from orchestration.cli import main

    assert main(["plan", "--model", name, "--frames", str(frames), "--size", "224", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["video_tokens"] == tokens and out["image_tokens"] == 196
    assert out["gflops_per_clip"] == pytest.approx(gflops, abs=0.01)
    assert out["memory_per_worker_gib"]["total"] > 0 and out["config"]["tubes"]
