"""Masks of masked autoencoding (pretrain/model/masking.py): shapes and counts per modality
and tokenizer, tube masks repeated along time, aligned masks hiding whole regions in every
tube, determinism under the generator's state, and the errors."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.errors import UserError
from pretrain.model import create_model
from pretrain.model.masking import MASK_SCHEMES, _cells, mask_tokens, masked_count, visible_count

SMALL = dict(depth=1, dim=24, mlp_dim=48, heads=2, num_classes={"vid": 3})


@pytest.fixture(scope="module")
def videomae():
    return create_model("videomae-s", **SMALL)


@pytest.fixture(scope="module")
def tubevit():
    return create_model("tubevit-s", **SMALL)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheme", MASK_SCHEMES)
def test_videomae_masks_have_a_fixed_count_per_sample(videomae, scheme):
    x = torch.zeros(3, 3, 8, 64, 64)                          # 4 x 4 x 4 = 64 cube tokens
    mask = mask_tokens(videomae, x, 0.9, scheme, gen())
    assert mask.dtype == torch.bool and mask.shape == (3, 64)
    per_frame = int(0.9 * 16)
    expected = 4 * per_frame if scheme in ("tube", "auto") else int(0.9 * 64)
    assert mask.sum(1).tolist() == [expected] * 3
    assert masked_count(videomae, x.shape, 0.9, scheme) == expected
    assert visible_count(videomae, x.shape, 0.9, scheme) == 64 - expected
    assert not torch.equal(mask[0], mask[1])                  # each sample its own mask


def test_tube_mask_repeats_one_spatial_mask_along_time(videomae):
    x = torch.zeros(4, 3, 8, 64, 64)
    mask = mask_tokens(videomae, x, 0.75, "tube", gen(3)).view(4, 4, 16)   # (B, nt, nh*nw)
    assert (mask == mask[:, :1]).all()
    # A random mask at the same ratio does not repeat along time (the test can fail).
    rand = mask_tokens(videomae, x, 0.75, "random", gen(3)).view(4, 4, 16)
    assert not (rand == rand[:, :1]).all()


@pytest.mark.parametrize("model_name", ["videomae", "tubevit"])
@pytest.mark.parametrize("scheme", MASK_SCHEMES)
def test_images_get_random_patch_masks_whatever_the_scheme(model_name, scheme, request):
    model = request.getfixturevalue(model_name)
    x = torch.zeros(2, 3, 64, 64)                              # 4 x 4 = 16 patches
    mask = mask_tokens(model, x, 0.75, scheme, gen())
    assert mask.shape == (2, 16) and mask.sum(1).tolist() == [12, 12]
    assert torch.equal(mask, mask_tokens(model, x, 0.75, "random", gen()))


@pytest.mark.parametrize("scheme", ["random", "aligned"])
def test_tubevit_masks_cover_all_tubes_tokens(tubevit, scheme):
    x = torch.zeros(2, 3, 32, 64, 64)
    n = sum(math.prod(g) for _, _, g in tubevit.token_groups(x.shape))
    mask = mask_tokens(tubevit, x, 0.9, scheme, gen())
    assert mask.shape == (2, n) and mask.sum(1).tolist() == [int(0.9 * n)] * 2


def test_aligned_masks_hide_whole_cells_in_every_tube(tubevit):
    """Tokens are masked cell by cell: at most one cell per sample is partly masked, while
    random per-token masks leave many cells partly visible through some tube."""
    x = torch.zeros(8, 3, 32, 96, 96)
    groups = tubevit.token_groups(x.shape)
    cells, n_cells = _cells(groups)
    # The cells hold tokens of several tubes (else "every tube" would say nothing).
    group_of = torch.cat([torch.full((math.prod(g),), i) for i, (_, _, g) in enumerate(groups)])
    assert all(len(set(group_of[cells == c].tolist())) >= 3 for c in range(n_cells))

    def partly_masked_cells(mask):
        out = []
        for row in mask:
            masked = torch.zeros(n_cells).index_add_(0, cells, row.float())
            total = torch.zeros(n_cells).index_add_(0, cells, torch.ones_like(row, dtype=torch.float))
            out.append(int(((masked > 0) & (masked < total)).sum()))
        return out

    aligned = mask_tokens(tubevit, x, 0.5, "aligned", gen(1))
    assert max(partly_masked_cells(aligned)) <= 1
    assert min(partly_masked_cells(mask_tokens(tubevit, x, 0.5, "random", gen(1)))) > 1


def test_auto_is_tube_for_one_token_grid_and_aligned_for_sparse_tubes(videomae, tubevit):
    for model, clip, scheme in ((videomae, torch.zeros(2, 3, 8, 64, 64), "tube"),
                                (tubevit, torch.zeros(2, 3, 32, 64, 64), "aligned")):
        assert torch.equal(mask_tokens(model, clip, 0.75, "auto", gen(5)),
                           mask_tokens(model, clip, 0.75, scheme, gen(5)))
        assert masked_count(model, clip.shape, 0.75, "auto") == masked_count(model, clip.shape, 0.75, scheme)


def test_masks_are_a_function_of_the_generator_state(tubevit):
    x = torch.zeros(2, 3, 32, 64, 64)
    g = gen(7)
    mask_tokens(tubevit, x, 0.9, "aligned", g)
    state = g.get_state()                                       # what a checkpoint stores
    later = [mask_tokens(tubevit, x, 0.9, "aligned", g) for _ in range(2)]
    resumed = torch.Generator()
    resumed.set_state(state)
    again = [mask_tokens(tubevit, x, 0.9, "aligned", resumed) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(later, again))
    assert not torch.equal(later[0], later[1])


def test_mask_errors_name_the_problem(tubevit, videomae):
    x = torch.zeros(1, 3, 32, 64, 64)
    with pytest.raises(UserError, match="mask scheme 'tube'.*4 tubes.*'random' or 'aligned'"):
        mask_tokens(tubevit, x, 0.9, "tube", gen())
    with pytest.raises(UserError, match="mask scheme 'blocks' is unknown; valid: auto, tube, random, aligned"):
        mask_tokens(videomae, x, 0.9, "blocks", gen())
    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match=f"mask ratio {ratio} must be in \\(0, 1\\)"):
            mask_tokens(videomae, x, ratio, "tube", gen())
