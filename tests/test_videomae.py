"""videomae-* (pretrain/model/videomae.py) against VideoMAE's figures: 1568 tokens at
16x224x224, parameters S 22M / B 87M / L 305M / H 633M, ViT-B 180 GMACs = 360 GFLOPs; its
position table is VideoMAE's 1D sin/cos; images are 2-frame clips; FLOPs agree with torch."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import count_flops, count_params, create_model
from pretrain.model.videomae import sinusoid_table

TABLE_M_PARAMS = {"videomae-s": 22, "videomae-b": 87, "videomae-l": 305, "videomae-h": 633}


@pytest.mark.parametrize("name,millions", TABLE_M_PARAMS.items())
def test_sizes_match_the_table(name, millions):
    with torch.device("meta"):
        model = create_model(name)
    assert round(count_params(model) / 1e6) == millions
    video = count_flops(model, (16, 224, 224))
    assert video["tokens"] == 1568
    assert count_flops(model, (224, 224))["tokens"] == 196
    if name == "videomae-b":   # 180 GMACs per view = 360 GFLOPs (multiply-add = 2)
        assert video["total"] / 1e9 == pytest.approx(360, rel=0.01)


def test_position_table_is_videomaes_sinusoid():
    table = sinusoid_table(10, 8)
    for n, j in ((3, 0), (3, 1), (7, 4), (9, 7)):
        angle = n / 10000 ** (2 * (j // 2) / 8)
        assert table[n, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle))


def test_image_is_a_two_frame_clip_and_flops_agree_with_torch():
    torch.manual_seed(0)
    model = create_model("videomae-s", depth=2, dim=24, mlp_dim=48, heads=2, num_classes={"k": 3}).eval()
    image = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(image), model(image[:, :, None].expand(-1, -1, 2, -1, -1)))
        assert model.forward_features(image).shape == (2, 6, 24)
        for x in (torch.randn(1, 3, 4, 32, 48), image[:1]):
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                model(x)
            assert count_flops(model, tuple(x.shape[2:]))["total"] == counter.get_total_flops()
