"""Fixed sin/cos position embedding of tube centres (TubeViT paper, section 3)."""
import math

import pytest
import torch

from pretrain.model import create_model, resolve_tubes, video_grids
from pretrain.model.posembed import FixedPositionEmbedding, sincos_embedding, token_coords
from pretrain.model.tubes import image_grid


def embed(tubes, size, dim):
    tubes = resolve_tubes(tubes)
    pe = FixedPositionEmbedding(tubes, dim)
    if len(size) == 2:
        grids = [image_grid(tubes, size)]
        shape = (1, 3, *size)
    else:
        grids = video_grids(tubes, size)
        shape = (1, 3, *size)
    return pe(shape, grids, torch.device("cpu"), torch.float32)


def test_centres_include_stride_offset_and_s2d_span():
    tubes = resolve_tubes("paper")
    coords = token_coords(tubes, video_grids(tubes, (32, 224, 224)), image=False)  # (539, 3)
    # Tube 1, 8x8x8 with x2 temporal S2D: combined span 16 frames -> t centres 8, 24.
    assert coords[:98, 0].unique().tolist() == [8.0, 24.0]
    assert coords[:7, 2].tolist() == [4.0 + 32 * j for j in range(7)]
    # Tube 3, 4x12x12 at offset (0,16,16): t = 16i + 2, y = 32i + 16 + 6.
    t3 = coords[98 + 147:98 + 147 + 98]
    assert t3[:, 0].unique().tolist() == [2.0, 18.0]
    assert t3[:7, 2].tolist() == [22.0 + 32 * j for j in range(7)]
    # The 2D tube: t = 0, y = 16i + 8, x = 16j + 8.
    t4 = coords[-196:]
    assert t4[:, 0].unique().tolist() == [0.0]
    assert t4[15].tolist() == [0.0, 24.0, 24.0]


@pytest.mark.parametrize("frames", [32, 64])
def test_image_tokens_equal_first_frame_2d_video_tokens(frames):
    dim = 192
    video = embed("paper", (frames, 224, 224), dim)
    image = embed("paper", (224, 224), dim)
    tubes = resolve_tubes("paper")
    grids = video_grids(tubes, (frames, 224, 224))
    start = sum(math.prod(g) for g in grids[:3])              # the 2D tube's block, t-major
    assert image.shape == (196, dim)
    assert torch.equal(video[start:start + 196], image)
    # y = 16 i + 8, x = 16 j + 8, t = 0
    expect = sincos_embedding(torch.tensor([[0.0, 16 * i + 8, 16 * j + 8] for i in range(14) for j in range(14)]), dim)
    torch.testing.assert_close(image, expect.float())


@pytest.mark.parametrize("dim", [192, 768, 1024, 1280])
def test_widths_fill_six_channels_per_frequency_and_zero_the_rest(dim):
    emb = embed("paper", (32, 224, 224), dim).double()        # (539, dim)
    n_freq = dim // 6
    assert emb.shape == (539, dim) and torch.isfinite(emb).all()
    assert (emb[:, 6 * n_freq:] == 0).all()
    assert (emb[:, :6 * n_freq].abs().sum(0) > 0).all()       # no dead channel before the remainder
    # Channel blocks: sin t | cos t | sin y | cos y | sin x | cos x, frequency 10000**(-6j/d).
    coords = token_coords(resolve_tubes("paper"), video_grids(resolve_tubes("paper"), (32, 224, 224)), False)
    j = 5
    w = 10000.0 ** (-6 * j / dim)
    for block, (fn, axis) in enumerate([(torch.sin, 0), (torch.cos, 0), (torch.sin, 1),
                                        (torch.cos, 1), (torch.sin, 2), (torch.cos, 2)]):
        torch.testing.assert_close(emb[:, block * n_freq + j], fn(coords[:, axis] * w), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dim", [192, 1280])
@pytest.mark.parametrize("tubes", ["paper", "charades"])
def test_distinct_centres_get_distinct_embeddings(tubes, dim):
    tubes = resolve_tubes(tubes)
    grids = video_grids(tubes, (40, 224, 224))     # the Charades 32x8x8 tube needs 36 frames
    coords = token_coords(tubes, grids, image=False)
    emb = sincos_embedding(coords, dim)
    exact = "donot_use_mm_for_euclid_dist"
    same_centre = torch.cdist(coords, coords, compute_mode=exact) == 0
    same_emb = torch.cdist(emb, emb, compute_mode=exact) < 1e-6
    assert torch.equal(same_centre, same_emb)
    assert len(coords.unique(dim=0)) > 1


def test_embedding_is_cached_per_shape_device_dtype(monkeypatch):
    model = create_model("tubevit-ti", depth=1, dim=24, mlp_dim=24, heads=2)
    calls = []
    original = model.pos_embed.compute
    monkeypatch.setattr(model.pos_embed, "compute", lambda *a, **k: calls.append(1) or original(*a, **k))
    video = torch.randn(1, 3, 32, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            model.forward_features(video)
        assert len(calls) == 1
        model.forward_features(torch.randn(2, 3, 32, 64, 64))   # batch size does not matter
        assert len(calls) == 1
        model.forward_features(torch.randn(1, 3, 64, 64))       # an image is another entry
        model.forward_features(torch.randn(1, 3, 32, 96, 96))
        assert len(calls) == 3
        model.double().forward_features(video.double())
        assert len(calls) == 4
