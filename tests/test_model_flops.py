"""FLOP and parameter counting, cross-checked against torch's own FlopCounterMode."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import count_flops, count_params, create_model, dense_baseline_config, model_config
from pretrain.model.tubevit import TubeViT


@pytest.mark.parametrize("overrides,shape", [
    (dict(), (32, 64, 64)),
    (dict(), (64, 64)),                                           # image: 2D tube only
    (dict(tubes="charades", kernel_mode="interpolated"), (40, 64, 96)),  # its 32x8x8 needs 36
    (dict(skip_unfit_tubes=True), (16, 48, 48)),                  # tube 2 skipped
    (dict(tubes="dense-2x16x16"), (8, 64, 64)),
])
def test_flop_count_matches_torch_flop_counter(overrides, shape):
    torch.manual_seed(0)
    model = create_model("tubevit-ti", depth=2, dim=48, mlp_dim=96, heads=4, **overrides).eval()
    x = torch.randn(1, 3, *shape)
    # SDPA pinned to its math kernel: FlopCounterMode sees its two matmuls. The fused CPU
    # kernel that some CPUs (AVX512, and AVX2 with newer torch) dispatch to counts as 0 FLOPs.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, dataset="kinetics")                              # warm the position-embedding cache
        with FlopCounterMode(display=False) as counter:
            model(x, dataset="kinetics")
    ours = count_flops(model, shape, dataset="kinetics")
    assert ours["total"] == pytest.approx(counter.get_total_flops(), rel=1e-3)
    # The attention matmuls weigh more than the tolerance: a count without them would fail.
    assert ours["attention_matmul"] > 1e-3 * ours["total"]


def test_vit_b_count_matches_the_textbook_formula():
    with torch.device("meta"):
        model = create_model("tubevit-b")
    n, d, m, L = 539, 768, 3072, 12
    blocks = L * (2 * n * d * (3 * d + d + 2 * m) + 4 * n * n * d)
    tube_convs = 2 * 3 * d * (98 * 512 + 147 * 256 + 98 * 576 + 196 * 256)  # positions x kernel volume
    pool = 2 * d * d * 2 + 2 * n * d * 2 * d + 4 * n * d
    head = 2 * d * 400
    assert count_flops(model, (32, 224, 224))["total"] == blocks + tube_convs + pool + head


def test_dense_baseline_has_3136_tokens_and_far_more_flops():
    with torch.device("meta"):
        tubes = create_model("tubevit-b")
        dense = TubeViT(dense_baseline_config("tubevit-b"))
    sparse_f, dense_f = count_flops(tubes, (32, 224, 224)), count_flops(dense, (32, 224, 224))
    assert sparse_f["tokens"] == 539 and dense_f["tokens"] == 3136
    assert dense_f["total"] > 5 * sparse_f["total"]
    # Same backbone width and depth: only the tokenizer differs.
    assert count_params(dense.blocks) == count_params(tubes.blocks)
    assert model_config("tubevit-b").dim == dense.config.dim
