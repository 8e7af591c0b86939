"""Tube geometry, token counts, space-to-depth and interpolated kernels."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from pretrain.errors import UserError
from pretrain.model import SparseTubeTokenizer, TubeSpec, count_tokens, create_model, resolve_tubes
from pretrain.model.tubes import UnfitTubeWarning


def arithmetic(tubes, size):
    """Independent count: n = floor((L - offset - k) / stride) + 1 per axis, summed over tubes."""
    return sum(math.prod((L - o - k) // s + 1 for L, o, k, s in zip(size, t.offset, t.kernel, t.stride))
               for t in resolve_tubes(tubes))


@pytest.mark.parametrize("tubes,size,expected", [
    ("paper", (32, 224, 224), 539),       # the paper's four tubes (its text says 559)
    ("paper", (64, 224, 224), 1176),
    ("paper", (224, 224), 196),           # an image: the 2D tube only
    ("paper-1", (32, 224, 224), 2 * 196),  # section 3.2: 1x16x16 at stride 16x16x16
    ("paper-2", (32, 224, 224), 2 * 196 + 2 * 196),  # section 3.4's core: + 8x8x8 at 16^3
    ("paper-s2d-h", (32, 224, 224), 539),
    ("charades", (128, 224, 224), 392 + 784 + 288 + 784),  # the paper's strides kept
    ("charades-t16", (128, 224, 224), 1807),
    ("charades-t16", (32, 224, 224), 196 + 98 + 49 + 72),
    ("dense-2x16x16", (32, 224, 224), 3136),
])
def test_token_counts_match_the_docs(tubes, size, expected):
    assert count_tokens(tubes, size) == expected


@pytest.mark.parametrize("tubes,size", [
    (tubes, size)
    for tubes in ("paper", "paper-no-s2d", "paper-1", "paper-2", "charades", "charades-t16")
    for size in ((32, 112, 112), (64, 160, 192), (20, 28, 28), (48, 256, 224))
    if not (tubes.startswith("charades") and size[0] < 36)  # its 32x8x8 tube at offset 4: 36 frames
])
def test_token_counts_follow_the_arithmetic(tubes, size):
    assert count_tokens(tubes, size) == arithmetic(tubes, size)


@pytest.mark.parametrize("tubes,size", [
    ("paper", (32, 224, 224)), ("paper", (32, 64, 64)), ("paper", (20, 28, 28)),
    ("paper", (64, 96, 128)), ("paper-no-s2d", (32, 64, 64)), ("charades", (40, 64, 80)),
    ("charades-t16", (32, 64, 80)), ("paper-2", (32, 48, 64)), ("paper-1", (16, 32, 32)),
])
def test_tokenizer_output_has_the_counted_tokens(tubes, size):
    tok = SparseTubeTokenizer(resolve_tubes(tubes), dim=12)
    tok.init_weights()
    out = tok(torch.randn(2, 3, *size))
    assert out.shape == (2, count_tokens(tubes, size), 12)
    assert tok(torch.randn(1, 3, *size[1:])).shape == (1, count_tokens(tubes, size[1:]), 12)


def test_a_tube_that_does_not_fit_is_a_clear_error():
    tok = SparseTubeTokenizer(resolve_tubes("paper"), dim=12)
    with pytest.raises(UserError) as err:
        tok(torch.randn(1, 3, 16, 112, 112))
    msg = str(err.value)
    assert "tube 2 of 4" in msg and "16x4x4" in msg and "16x112x112" in msg
    assert "at least offset + kernel = 20" in msg and "20x28x28" in msg
    with pytest.raises(UserError, match="image tube"):
        tok(torch.randn(1, 3, 12, 12))
    with pytest.raises(UserError, match=r"expected a video \(B, 3, T, H, W\)"):
        tok(torch.randn(1, 4, 32, 64, 64))


def test_skip_unfit_tubes_gives_the_arithmetic_count():
    # 16 frames: tube 2 (16 frames deep at offset 4) contributes floor(-4/6)+1 = 0 tokens.
    assert count_tokens("paper", (16, 224, 224), skip_unfit=True) == 49 + 0 + 49 + 196
    model = create_model("tubevit-ti", depth=1, dim=24, mlp_dim=24, heads=2, skip_unfit_tubes=True)
    with pytest.warns(UnfitTubeWarning):
        out = model.forward_features(torch.randn(1, 3, 16, 112, 112))
    assert out.shape == (1, count_tokens("paper", (16, 112, 112), True), 24)


def test_unfit_tubes_are_skipped_with_one_warning_by_default_and_strict_is_an_option():
    model = create_model("tubevit-ti", depth=1, dim=24, mlp_dim=24, heads=2)
    assert model.config.unfit_tubes == "skip" and "unfit_tubes" not in model.config.to_dict()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            out = model(torch.randn(1, 3, 16, 64, 64), dataset="kinetics")
    assert out.shape == (1, 400)
    unfit = [w for w in seen if issubclass(w.category, UnfitTubeWarning)]
    assert len(unfit) == 1                       # once, not per forward
    msg = str(unfit[0].message)
    assert "tube 2 of 4" in msg and "16x4x4" in msg and "16x64x64" in msg and "20x" in msg
    assert "tube 1 of 4" not in msg and "unfit_tubes=error" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a clip every tube fits: no warning
        model.forward_features(torch.randn(1, 3, 32, 64, 64))
    strict = create_model("tubevit-ti", depth=1, dim=24, mlp_dim=24, heads=2, unfit_tubes="error")
    with pytest.raises(UserError, match="tube 2 of 4"):
        strict.forward_features(torch.randn(1, 3, 16, 64, 64))
    with pytest.raises(UserError, match="unfit_tubes"):
        create_model("tubevit-ti", depth=1, unfit_tubes="maybe")


def test_images_need_a_2d_tube():
    tok = SparseTubeTokenizer(resolve_tubes("dense-2x16x16"), dim=12)
    with pytest.raises(UserError, match="no 2D tube"):
        tok(torch.randn(1, 3, 32, 32))


def test_space_to_depth_keeps_token_count_and_width():
    size = (32, 96, 96)
    plain = SparseTubeTokenizer(resolve_tubes("paper-no-s2d"), dim=16)
    s2d = SparseTubeTokenizer(resolve_tubes("paper"), dim=16)
    x = torch.randn(1, 3, *size)
    assert plain(x).shape == s2d(x).shape
    # An S2D tube's kernel has dim/S output channels.
    assert s2d.tubes[0].weight.shape == (8, 3, 8, 8, 8) and s2d.tubes[1].weight.shape == (4, 3, 16, 4, 4)


def test_space_to_depth_packs_neighbours_like_the_paper():
    # Tube 8x8x8, stride (16,32,32), x2 temporal: token (i, j, k) = [conv at t=16i | conv at t=16i+8].
    spec = TubeSpec((8, 8, 8), (16, 32, 32), (0, 0, 0), "t", 2)
    tok = SparseTubeTokenizer([spec], dim=6)
    tok.init_weights()
    with torch.no_grad():
        tok.tubes[0].bias.normal_()
    x = torch.randn(1, 3, 32, 64, 64)
    out = tok(x)                                                     # (1, 2*2*2, 6)
    w, b = tok.tubes[0].weight, tok.tubes[0].bias
    for ti in range(2):
        for hi in range(2):
            for wi in range(2):
                row = out[0, ti * 4 + hi * 2 + wi]
                parts = []
                for sub in range(2):
                    t0, y0, x0 = 16 * ti + 8 * sub, 32 * hi, 32 * wi
                    patch = x[:, :, t0:t0 + 8, y0:y0 + 8, x0:x0 + 8]
                    parts.append(F.conv3d(patch, w).flatten())      # (3,) channels
                torch.testing.assert_close(row, torch.cat(parts) + b)


def test_space_to_depth_pads_the_last_token_past_the_clip_end():
    # x4 S2D along h only (tube set paper-s2d-h) at stride 32, offset 8, kernel 4: the last
    # token reads pixels up to 228. The default 2x2 (h and w) stays inside: up to 220.
    spec = TubeSpec((16, 4, 4), (6, 32, 32), (4, 8, 8), "h", 4)
    assert spec.span == (16, 28, 4) and resolve_tubes("paper-s2d-h")[1] == spec
    tok = SparseTubeTokenizer([spec], dim=8)
    tok.init_weights()
    assert tok(torch.randn(1, 3, 32, 224, 224)).shape == (1, 3 * 7 * 7, 8)
    square = resolve_tubes("paper")[1]
    assert square.s2d_axis == "hw" and square.factors == (1, 2, 2) and square.span == (16, 20, 20)
    assert square.offset[1] + 6 * 32 + square.span[1] == 220


def test_interpolated_kernels_reach_every_tube_shape():
    tubes = resolve_tubes("charades")
    tok = SparseTubeTokenizer(tubes, dim=12, kernel_mode="interpolated")
    tok.init_weights()
    assert tok.base_kernel.shape == (12, 3, 8, 8, 8)
    assert all(t.weight is None for t in tok.tubes)
    for i, tube in enumerate(tubes):
        assert tok.kernel(i).shape == (12, 3, *tube.kernel)
    # 8x8x8 is the base itself; a stretched kernel stays a smooth resize of it.
    tok2 = SparseTubeTokenizer([TubeSpec((8, 8, 8), (8, 8, 8)), TubeSpec((16, 16, 16), (16, 16, 16))], 12, "interpolated")
    tok2.init_weights()
    assert tok2.kernel(0) is tok2.base_kernel
    assert torch.allclose(tok2.kernel(1).mean(), tok2.base_kernel.mean(), atol=1e-3)
    assert tok(torch.randn(1, 3, 40, 64, 64)).shape == (1, count_tokens(tubes, (40, 64, 64)), 12)


def test_interpolated_kernels_refuse_space_to_depth():
    with pytest.raises(UserError, match="paper-no-s2d"):
        create_model("tubevit-ti", kernel_mode="interpolated")
    create_model("tubevit-ti", depth=1, kernel_mode="interpolated", tubes="paper-no-s2d")


@pytest.mark.parametrize("bad", [
    dict(kernel=(8, 8, 8), stride=(16, 32, 32), s2d_axis="t", s2d_factor=3),   # 3 does not divide 16
    dict(kernel=(8, 8, 8), stride=(16, 32, 32), s2d_factor=2),                 # factor without axis
    dict(kernel=(8, 8, 8), stride=(16, 32, 32), s2d_axis="x", s2d_factor=2),
    dict(kernel=(0, 8, 8), stride=(16, 32, 32)),
    dict(kernel=(8, 8), stride=(16, 32, 32)),
])
def test_bad_tube_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        TubeSpec(**bad)


def test_tube_spec_round_trips_through_dicts():
    for spec in resolve_tubes("paper") + resolve_tubes("charades") + resolve_tubes("paper-s2d-h"):
        assert TubeSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserError, match="unknown keys"):
        TubeSpec.from_dict({"kernel": [1, 16, 16], "stride": [1, 16, 16], "padding": 0})
    with pytest.raises(UserError, match="valid names: paper"):
        resolve_tubes("paper-9")
