"""VTN (pretrain/model/vtn.py) and the frame-average baseline (pretrain/model/frame_average.py):
tokens and shapes, the Longformer window (a frame outside it has no influence, the global CLS
token sees every frame), chunked backbone = one pass, gradients, checkpointing, model files,
images, FLOPs against torch's counter, the masked objective's refusal. Tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.errors import UserError
from pretrain.model import (MaskedAutoencoder, count_flops, count_params, create_model, frame_average, load_model,
                            save_model)
from pretrain.model.flops import longformer_matmul_flops
from pretrain.model.vit import DropPath
from pretrain.model.vtn import window_mask

SMALL = dict(depth=2, dim=24, mlp_dim=48, heads=2, num_frames=8, img_size=32, num_classes={"k": 3, "i": 2},
             temporal_depth=2, attention_window=(2,), frame_chunk=3)


def small(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_model("vtn-s", **{**SMALL, **overrides})


def clip(frames: int = 8, size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def test_vtn_b_figures():
    with torch.device("meta"):
        model = create_model("vtn-b", num_classes={"kinetics": 400})
    f64 = count_flops(model, (64, 224, 224))
    assert f64["tokens"] == 64 * 196
    assert count_params(model) / 1e6 == pytest.approx(108.16, abs=0.01)   # ViT-B + 3 blocks + time table + head
    # 64 frames of a ViT-B/16 (17.6 GMACs each) dominate; the temporal encoder is ~0.1%
    assert f64["total"] / 1e9 == pytest.approx(2250.87, abs=0.01)
    assert count_flops(model, (256, 224, 224))["total"] / 1e9 == pytest.approx(9003.81, abs=0.01)
    assert count_flops(model, (224, 224))["tokens"] == 196
    for size in ("s", "l", "h"):
        with torch.device("meta"):
            assert count_flops(create_model(f"vtn-{size}"), (16, 224, 224))["total"] > 0


def test_shapes_and_images():
    model = small().eval()
    with torch.no_grad():
        features = model.forward_features(clip())
        assert features.shape == (2, 1 + 8, 24)
        assert model(clip(), dataset="k").shape == (2, 3)
        image = torch.randn(2, 3, 32, 48)
        assert model.forward_features(image).shape == (2, 2, 24)
        torch.testing.assert_close(model(image, dataset="i"), model(image[:, :, None], dataset="i"), rtol=0, atol=0)
        assert model(clip(frames=12, size=48), dataset="k").shape == (2, 3)   # longer than the table


def test_window_mask():
    m = window_mask(6, 2)
    assert m[0].all() and m[:, 0].all()
    assert m[3, 2:5].tolist() == [True] * 3 and not m[3, 1] and not m[3, 5:].any()   # frame 2 sees 1..3
    assert window_mask(6, 10) is None


def _input_grads(model, h):
    """d(features)/d(frame embeddings) of every output token, via the temporal encoder only."""
    out = []
    for i in range(h.shape[1] + 1):
        x = h.clone().requires_grad_(True)
        y = model.temporal_cls_token(x)
        for block, w in zip(model.temporal_blocks, model.config.windows):
            y = block(y, window_mask(h.shape[1], w))
        y[:, i].square().sum().backward()
        out.append(x.grad.abs().sum((0, 2)) > 0)
    return torch.stack(out)   # (1 + nt, nt): output token -> which frames reach it


def test_a_frame_outside_the_window_has_no_influence_and_cls_sees_all():
    model = small(temporal_depth=1, attention_window=(2,)).eval()   # one layer, 1 frame each side
    h = torch.randn(1, 8, 24)
    reach = _input_grads(model, h)
    assert reach[0].all()                                           # global CLS: every frame
    for i in range(8):                                              # frame i: i-1..i+1 only
        assert reach[1 + i].tolist() == [abs(i - j) <= 1 for j in range(8)], i
    # Two layers of window 2: the receptive field grows by one frame each side per layer, plus
    # everything through the global CLS token of the first layer.
    model2 = small(temporal_depth=2, attention_window=(2, 4)).eval()
    reach2 = _input_grads(model2, h)
    assert reach2.all()      # the CLS of layer 1 has read every frame; layer 2 reads the CLS
    y = model2(clip(batch=1), dataset="k")
    assert torch.isfinite(y).all()


def test_chunked_backbone_equals_one_pass():
    model = small().eval()
    x = clip(frames=7)
    with torch.no_grad():
        chunked = model(x, dataset="k")
        model.config.frame_chunk = 0
        whole = model(x, dataset="k")
        model.config.frame_chunk = 1
        single = model(x, dataset="k")
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(single, whole, rtol=1e-6, atol=1e-6)


def test_every_parameter_gets_a_gradient_and_checkpointing_changes_nothing():
    model = small(drop_rate=0.1, drop_path_rate=0.2, attn_drop_rate=0.1).train()
    model.set_all_parameters_in_forward(True)
    x = clip(frames=8, batch=1)

    def run():
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        out = model(x, dataset="k")
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dropouts = [m for m in model.modules() if isinstance(m, (nn.Dropout, DropPath))]
    for m in dropouts:                                     # wiring first, without dropout
        m.eval()
    _, grads = run()
    for n, _ in model.named_parameters():
        assert n in grads, n
        if not n.startswith("heads.i."):                   # the idle head: there, with zeros
            assert grads[n].abs().sum() > 0, n
    for m in dropouts:
        m.train()
    out, grads = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_save_load_round_trip(tmp_path):
    model = small(attention_window=(2, 6), spatial_pool="mean").eval()
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    loaded = load_model(path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    x = clip(frames=5, size=48)
    with torch.no_grad():
        assert torch.equal(model(x, dataset="k"), loaded(x, dataset="k"))


def test_meta_build_then_init_and_no_weight_decay():
    real = small()
    with torch.device("meta"):
        model = create_model("vtn-s", **real.config.to_dict())
    model.to_empty(device="cpu")
    for m in (model, real):
        torch.manual_seed(0)
        m.init_weights()
    for (n, p), (_, q) in zip(model.named_parameters(), real.named_parameters()):
        assert torch.equal(p, q), n
    nwd = real.no_weight_decay()
    assert {"pos_embed.time.table", "pos_embed.space.table", "cls_token.token", "temporal_cls_token.token"} <= nwd
    assert "temporal_blocks.0.attn.qkv.weight" not in nwd


@pytest.mark.parametrize("x", [clip(frames=6, size=48, batch=1), torch.randn(1, 3, 32, 48)], ids=["clip", "image"])
def test_flop_count_matches_torch_flop_counter(x):
    model = small(attention_window=(2,)).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, dataset="k")
    assert count_flops(model, tuple(x.shape[2:]), dataset="k")["total"] == counter.get_total_flops()


def test_banded_count_is_smaller_than_dense():
    model = small(attention_window=(2,))
    dense = 2 * (2 * 9 * 9 * 24) * 2
    banded = longformer_matmul_flops(model, 8)
    assert banded == 2 * 2 * 2 * 24 * ((3 * 8 - 2) + 2 * 8 + 1) and banded < dense


def test_config_checks_and_masked_objective_refused():
    with pytest.raises(UserError, match="t = 1"):
        small(tubelet=(2, 16, 16))
    with pytest.raises(UserError, match="one per temporal block"):
        small(attention_window=(2, 4, 8))
    with pytest.raises(UserError, match="whole frames"):
        MaskedAutoencoder(small())


def test_frame_average_is_the_mean_of_per_frame_softmax():
    model = create_model("vivit-s", **{k: SMALL[k] for k in ("depth", "dim", "mlp_dim", "heads", "num_frames",
                                                              "img_size", "num_classes")}).eval()
    x = clip(frames=5)
    with torch.no_grad():
        got = frame_average(model, x, dataset="k", chunk=3)
        expect = torch.stack([model(x[:, :, t], dataset="k").softmax(-1) for t in range(5)]).mean(0)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
        assert torch.allclose(got.sum(-1), torch.ones(2))
        image = x[:, :, 0]
        torch.testing.assert_close(frame_average(model, image, dataset="k"), model(image, dataset="k").softmax(-1))
        assert frame_average(small().eval(), x, dataset="k").shape == (2, 3)   # any image-capable model


def _saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward outside any checkpoint (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, dataset="k")
    return sum(v for k, v in seen.items() if k not in params)


def test_checkpointed_chunks_keep_only_the_pixels():
    model = small(frame_chunk=4).train()
    plain = [_saved_bytes(model, clip(frames=t, batch=1)) for t in (8, 16)]
    model.set_grad_checkpointing(True)
    ckpt = [_saved_bytes(model, clip(frames=t, batch=1)) for t in (8, 16)]
    pixels_per_frame = 3 * 32 * 32 * 4
    assert ckpt[1] - ckpt[0] <= 8 * (pixels_per_frame + 4 * 24 * 4 * 4)   # pixels (+ per-frame vectors)
    assert plain[1] - plain[0] > 2 * (ckpt[1] - ckpt[0])               # every block of every frame
