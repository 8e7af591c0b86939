"""TubeViT fidelity to the paper (issue 13 §3): the bootstrap's width maps keep the tube
tokens' geometry across all tubes, space-to-depth over several axes, the paper's tube sets,
enlarging a trained model's kernels (the Charades route), unfit tubes, the interpolated-kernel
image kernel and the learned-position resampling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.errors import UserError
from pretrain.model import SparseTubeTokenizer, TubeSpec, count_tokens, create_model, resolve_tubes
from pretrain.model.bootstrap import (bootstrap, enlarge_model, shared_isometry, widen_by_s2d,
                                     width_projection)
from pretrain.model.tubes import CHARADES_KERNELS, enlarge_kernel, paper_tubes

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):   # tests/fixtures/threads.py
    yield


def timm_vit(dim, heads, depth=2):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                             num_classes=0).eval()


def small_model(dim=48, tubes="paper"):
    torch.manual_seed(1)
    model = create_model("tubevit-ti", depth=1, dim=dim, heads=4, mlp_dim=32, tubes=tubes,
                         num_classes={"v": 3}).eval()
    with torch.no_grad():
        for tube in model.tokenizer.tubes:
            tube.bias.normal_()
    return model


def tube_tokens(model, clip):
    """(N, dim) float64 tokens of every 3D tube (no image tube, no positions), tube order."""
    tok = model.tokenizer
    out = []
    with torch.no_grad():
        for i, grid in enumerate(tok.grids(tuple(clip.shape))):
            if i != tok.image_index and math.prod(grid):
                out.append(tok.tubes[i](clip, grid, tok._shared_kernel(i))[0].double())
    return torch.cat(out)


def gram(x):
    return x @ x.T


def old_per_factor_map(small, clip, d_to):
    """The earlier width map, recomputed: one fresh (D/S x d/S) block per S2D factor S."""
    out = []
    for i, spec in enumerate(small.config.tubes):
        if i == small.tokenizer.image_index:
            continue
        S = spec.s2d_factor
        q = torch.block_diag(*[width_projection(small.config.dim // S, d_to // S, 0)] * S)
        grid = small.tokenizer.grids(tuple(clip.shape))[i]
        with torch.no_grad():
            out.append(small.tokenizer.tubes[i](clip, grid)[0].double() @ q.T)
    return torch.cat(out)


# ---- 1. width maps ------------------------------------------------------------------------

@pytest.mark.parametrize("d_to,heads", [(80, 4), (192, 3)])
def test_isometry_keeps_the_gram_matrix_across_all_tubes(d_to, heads):
    small = small_model()
    clip = torch.randn(1, 3, 32, 64, 64)
    a = tube_tokens(small, clip)                                   # 3 tubes: S = 2, 4, 1
    big, meta = bootstrap(timm_vit(d_to, heads).state_dict(), small, 1, heads=heads, width_map="isometry")
    b = tube_tokens(big, clip)
    assert meta["width_map"] == f"shared-isometry (4 blocks) d=48 -> D={d_to}"
    assert [t.s2d_factor for t in big.config.tubes] == [t.s2d_factor for t in small.config.tubes]
    scale = gram(a).abs().max()
    assert (gram(b) - gram(a)).abs().max() < 1e-5 * scale          # float32 convolutions
    # The earlier per-factor map kept it only within one tube: across tubes it is far off.
    o = old_per_factor_map(small, clip, d_to)
    assert (gram(o) - gram(a)).abs().max() > 0.05 * scale


def test_auto_picks_isometry_for_non_integer_ratios_and_refuses_impossible_s2d():
    small = small_model()
    big, meta = bootstrap(timm_vit(80, 4).state_dict(), small, 1, heads=4)
    assert meta["width_map"].startswith("shared-isometry")
    with pytest.raises(UserError, match="width_map=s2d needs"):
        bootstrap(timm_vit(80, 4).state_dict(), small, 1, heads=4, width_map="s2d")
    q = shared_isometry(48, 80, 4, 0)
    torch.testing.assert_close(q.T @ q, torch.eye(48, dtype=torch.float64))


def test_space_to_depth_widening_ti_to_b_reuses_the_kernels_and_keeps_the_small_tokens():
    # Ti -> B is exactly 4x: the paper's space-to-depth, no new weights.
    small = small_model(dim=48)
    big, meta = bootstrap(timm_vit(192, 3).state_dict(), small, 1)
    assert meta["width_map"] == "space-to-depth x4 d=48 -> D=192"
    s_tubes, b_tubes = small.config.tubes, big.config.tubes
    assert [t.factors for t in b_tubes[:3]] == [(2, 2, 2), (1, 4, 4), (1, 2, 2)]
    torch.testing.assert_close(big.tokenizer.tubes[0].bias, small.tokenizer.tubes[0].bias.repeat(4))
    assert [t.kernel for t in b_tubes[:3]] == [t.kernel for t in s_tubes[:3]]
    assert [t.stride for t in b_tubes[:3]] == [t.stride for t in s_tubes[:3]]
    for i in range(3):
        assert torch.equal(big.tokenizer.tubes[i].weight, small.tokenizer.tubes[i].weight)
    clip = torch.randn(1, 3, 32, 96, 96)
    assert count_tokens(b_tubes, tuple(clip.shape[2:])) == count_tokens(s_tubes, tuple(clip.shape[2:]))
    a, b = tube_tokens(small, clip), tube_tokens(big, clip)
    # The first d channels of every large token are the small token (the outer neighbour group
    # at the small model's own positions).
    assert [t.s2d_outer for t in b_tubes[:3]] == [(1, 2, 2)] * 3
    kept = b[:, :48]
    torch.testing.assert_close(kept, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram(kept), gram(a), rtol=1e-6, atol=1e-3)  # across all tubes
    assert (gram(b) - 4 * gram(a)).abs().max() > 1.0       # the new samples do see new pixels


def test_space_to_depth_widening_on_a_spatially_constant_clip_scales_the_gram_by_k():
    # Solid-colour frames: every spatial neighbour sees the same pixels, so each large token
    # is its small token with every channel group repeated k times: Gram x k, same cosines.
    small = small_model(dim=48)
    big, _ = bootstrap(timm_vit(192, 3).state_dict(), small, 1)
    clip = torch.randn(1, 3, 32, 1, 1).expand(1, 3, 32, 192, 192).contiguous()
    inside = []                                     # tokens whose large span stays in the clip
    for i, spec in enumerate(big.config.tubes[:3]):
        grid = small.tokenizer.grids(tuple(clip.shape))[i]
        ok = torch.ones(grid, dtype=torch.bool)
        for ax in range(3):
            end = torch.arange(grid[ax]) * spec.stride[ax] + spec.offset[ax] + spec.span[ax]
            ok &= (end <= clip.shape[2 + ax]).view([-1 if j == ax else 1 for j in range(3)])
        inside.append(ok.flatten())
    keep = torch.cat(inside)
    a, b = tube_tokens(small, clip)[keep], tube_tokens(big, clip)[keep]
    assert keep.sum() > 20 and not keep.all()
    torch.testing.assert_close(gram(b), 4 * gram(a), rtol=1e-5, atol=1e-3)


def test_widen_by_s2d_prefers_square_spatial_splits():
    t1, t2, t3, _ = paper_tubes()
    assert widen_by_s2d(t3, 4).factors == (1, 2, 2)
    assert widen_by_s2d(t1, 4).factors == (2, 2, 2) and widen_by_s2d(t1, 4).s2d_axis == "thw"
    assert widen_by_s2d(widen_by_s2d(t1, 4), 4) is None           # no third neighbour level
    assert widen_by_s2d(t2, 2).factors == (2, 2, 2)          # not a square: on t (6 % 2 == 0)
    assert widen_by_s2d(TubeSpec((3, 3, 3), (3, 3, 3)), 4) is None


# ---- 2. space-to-depth axes ---------------------------------------------------------------

@pytest.mark.parametrize("axes,factor,split,outer", [("hw", 4, None, None), ("th", 4, None, None),
                                                     ("thw", 8, None, None), ("tw", 8, (2, 4), None),
                                                     ("tw", 8, (2, 4), (1, 1, 2))])
def test_multi_axis_space_to_depth_packs_neighbours_in_thw_order(axes, factor, split, outer):
    spec = TubeSpec((4, 4, 4), (8, 16, 16), (0, 0, 0), axes, factor, split, outer)
    f = spec.factors
    e = outer or (1, 1, 1)
    cs = spec.conv_stride
    tok = SparseTubeTokenizer([spec], dim=factor * 2)
    tok.init_weights()
    with torch.no_grad():
        tok.tubes[0].bias.normal_()
    x = torch.randn(1, 3, 16, 32, 32)
    grid = spec.grid((16, 32, 32))
    out = tok(x)                                                       # (1, n, dim)
    w, b = tok.tubes[0].weight, tok.tubes[0].bias
    for n, (it, ih, iw) in enumerate([(a, c, e) for a in range(grid[0]) for c in range(grid[1])
                                      for e in range(grid[2])]):
        parts = []
        # outer groups over the finer positions e, then the coarse ones f/e, each (t, h, w) order
        for ot in range(e[0]):
            for oh in range(e[1]):
                for ow in range(e[2]):
                    for jt in range(f[0] // e[0]):
                        for jh in range(f[1] // e[1]):
                            for jw in range(f[2] // e[2]):
                                mt, mh, mw = jt * e[0] + ot, jh * e[1] + oh, jw * e[2] + ow
                                t0, y0, x0 = it * 8 + mt * cs[0], ih * 16 + mh * cs[1], iw * 16 + mw * cs[2]
                                patch = F.pad(x, (0, 16, 0, 16, 0, 8))[:, :, t0:t0 + 4, y0:y0 + 4, x0:x0 + 4]
                                parts.append(F.conv3d(patch, w).flatten())
        torch.testing.assert_close(out[0, n], torch.cat(parts) + b)
    assert TubeSpec.from_dict(spec.to_dict()) == spec


def test_single_axis_specs_serialise_as_before_and_bad_splits_are_user_errors():
    old = {"kernel": [8, 8, 8], "offset": [0, 0, 0], "s2d_axis": "t", "s2d_factor": 2, "stride": [16, 32, 32]}
    assert TubeSpec.from_dict(old).to_dict() == old              # stored architectures unchanged
    assert TubeSpec((8, 8, 8), (16, 32, 32), s2d_axis="wh", s2d_factor=4).s2d_axis == "hw"
    for bad in [dict(s2d_axis="hw", s2d_factor=8),                # 8 is no square
                dict(s2d_axis="hw", s2d_factor=8, s2d_split=(2, 2)),
                dict(s2d_axis="hh", s2d_factor=4),
                dict(s2d_axis="t", s2d_factor=3)]:
        with pytest.raises(UserError):
            TubeSpec((8, 8, 8), (16, 32, 32), **bad)


# ---- 3. the paper's tube sets and the Charades route ----------------------------------------

def test_paper_sets_token_counts():
    assert count_tokens("paper-1", (32, 224, 224)) == 392      # 1x16x16 at 16^3: 2 x 14 x 14
    assert count_tokens("paper-2", (32, 224, 224)) == 784      # + 8x8x8 at 16^3: 2 x 14 x 14
    assert count_tokens("paper", (32, 224, 224)) == 539
    assert count_tokens("paper", (128, 224, 224)) == 2499      # the paper's tubes before enlarging
    assert count_tokens("charades", (128, 224, 224)) == 392 + 784 + 288 + 784
    assert count_tokens("charades-t16", (128, 224, 224)) == 1807
    charades, paper = resolve_tubes("charades"), resolve_tubes("paper-no-s2d")
    assert [t.kernel for t in charades] == list(CHARADES_KERNELS)
    assert [(t.stride, t.offset) for t in charades] == [(t.stride, t.offset) for t in paper]


def test_enlarge_kernel_keeps_a_constant_kernel_response_exactly():
    w = torch.randn(6, 3, 1, 1, 1, dtype=torch.float64).expand(6, 3, 8, 8, 8).contiguous()
    big = enlarge_kernel(w, (16, 16, 16))
    x = torch.randn(1, 3, 1, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(F.conv3d(x.expand(1, 3, 16, 16, 16), big),
                               F.conv3d(x.expand(1, 3, 8, 8, 8), w), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode,tubes", [("separate", "paper-no-s2d"), ("separate", "paper"),
                                        ("interpolated", "paper-no-s2d")])
def test_enlarge_model_is_the_paper_charades_route(mode, tubes):
    small = create_model("tubevit-ti", depth=1, dim=24, heads=2, mlp_dim=32, tubes=tubes, kernel_mode=mode,
                         num_classes={"v": 3}).eval()
    big = enlarge_model(small, "charades")
    assert [t.kernel for t in big.config.tubes] == list(CHARADES_KERNELS)
    assert [(t.stride, t.offset, t.factors) for t in big.config.tubes] == \
        [(t.stride, t.offset, t.factors) for t in small.config.tubes]
    if tubes == "paper-no-s2d":
        assert big.config.tubes == resolve_tubes("charades")
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    if mode == "separate":
        assert big.tokenizer.tubes[0].weight.shape[2:] == (16, 16, 16)
        # On a constant clip each enlarged tube responds about as the trained one did.
        clip = torch.full((1, 3, 40, 64, 64), 0.7)
        a, b = tube_tokens(small, clip), tube_tokens(big, clip)
        assert a.shape[1] == b.shape[1]
        ratio = b.norm(dim=1).mean() / a.norm(dim=1).mean()
        assert 0.5 < ratio < 2.0
    else:
        assert torch.equal(big.tokenizer.base_kernel, small.tokenizer.base_kernel)
    assert big(torch.randn(1, 3, 40, 64, 64)).shape == (1, 3)
    with pytest.raises(UserError, match="needs 4 kernel shapes"):
        enlarge_model(small, [(16, 16, 16)])


def test_cli_enlarges_a_model_file(tmp_path, capsys):
    import json

    from orchestration.cli import main
    from pretrain.model import load_model, save_model

    small = create_model("tubevit-ti", depth=1, dim=24, heads=2, mlp_dim=32, tubes="paper-no-s2d",
                         num_classes={"v": 3})
    save_model(small, str(tmp_path / "small.safetensors"))
    out = str(tmp_path / "charades.safetensors")
    assert main(["bootstrap", "--tubes-from", str(tmp_path / "small.safetensors"), "--enlarge-kernels",
                 "charades", "--out", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens_128x224x224"] == 2248
    assert load_model(out).config.tubes == resolve_tubes("charades")
    assert main(["bootstrap", "--tubes-from", str(tmp_path / "small.safetensors"), "--out", out]) == 2
    assert "--image-checkpoint" in capsys.readouterr().err


# ---- 5. interpolated kernels and learned positions ------------------------------------------

def test_interpolated_image_kernel_is_the_mean_of_base_frames_3_and_4_upsampled():
    # Documented (tubes.py): trilinear, align_corners=False, no rescaling.
    tok = SparseTubeTokenizer(resolve_tubes("paper-no-s2d"), dim=6, kernel_mode="interpolated")
    tok.init_weights()
    image_kernel = tok.kernel(tok.image_index)                         # (6, 3, 1, 16, 16)
    mid = tok.base_kernel[:, :, 3:5].mean(2)                           # (6, 3, 8, 8)
    expected = F.interpolate(mid, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(image_kernel[:, :, 0], expected, rtol=1e-5, atol=1e-6)


def test_stored_architectures_keep_their_keys():
    # A resume compares the stored architecture key by key: tubes without the new optional
    # space-to-depth keys, and the run-time unfit policy, must not appear in it.
    from pretrain.model import model_config
    from pretrain.model.tubevit import TubeViTConfig

    cfg = model_config("tubevit-ti", tubes="paper-s2d-h", unfit_tubes="error")
    d = cfg.to_dict()
    assert "unfit_tubes" not in d and "skip_unfit_tubes" in d
    assert all(set(t) == {"kernel", "stride", "offset", "s2d_axis", "s2d_factor"} for t in d["tubes"])
    again = TubeViTConfig.from_dict(d)
    assert again == cfg and again.unfit_tubes == "skip"       # a policy, not architecture
    wide = model_config("tubevit-ti", tubes=[widen_by_s2d(t, 4) for t in paper_tubes()[:3]] + paper_tubes()[3:])
    assert TubeViTConfig.from_dict(wide.to_dict()) == wide and "s2d_outer" in wide.to_dict()["tubes"][0]
