"""The masked autoencoder (pretrain/model/mae.py) on tiny VideoMAE and TubeViT encoders: the
encoder runs on the visible tokens only (FlopCounterMode agrees with count_masked_flops),
targets are each token's receptive-field pixels normalised per token, the loss reads the
masked tokens only, reconstructions keep the visible pixels, every parameter trains, and
the wrapper builds on meta, checkpoints activations and round-trips through a model file."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.errors import UserError
from pretrain.model import create_model, load_model, save_model
from pretrain.model.flops import blocks_flops, count_masked_flops
from pretrain.model.mae import DecoderConfig, MaskedAutoencoder
from pretrain.model.masking import mask_tokens

SMALL = dict(depth=2, dim=24, mlp_dim=48, heads=2, num_classes={"vid": 3, "img": 2})
DECODER = DecoderConfig(dim=12, depth=1, heads=2)
VIDEO = {"videomae-s": (2, 3, 4, 32, 32), "tubevit-s": (2, 3, 32, 64, 64)}
SCHEME = {"videomae-s": "tube", "tubevit-s": "aligned"}


def build(name: str, **decoder) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(create_model(name, **SMALL), DecoderConfig(**{**DECODER.__dict__, **decoder}))


def clip(name: str, seed: int = 1) -> torch.Tensor:
    return torch.randn(*VIDEO[name], generator=torch.Generator().manual_seed(seed))


def mask_of(mae, x, ratio=0.75, seed=0):
    name = "tube" if len(mae.encoder.token_groups(x.shape)) == 1 else "aligned"
    return mask_tokens(mae, x, ratio, name, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(VIDEO))
def test_encoder_sees_only_the_visible_tokens(name):
    mae = build(name).eval()
    x = clip(name)[:1]
    mask = mask_of(mae, x, 0.75)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        mae(x, mask)                                        # warm the caches
        with FlopCounterMode(display=False) as counter:
            mae(x, mask)
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    visible = int((~mask[0]).sum())
    encoder = sum(by_module[f"MaskedAutoencoder.encoder.blocks.{i}"] for i in range(len(mae.encoder.blocks)))
    assert encoder == sum(blocks_flops(mae.encoder.blocks, visible).values())
    n = mask.shape[1]
    assert encoder < sum(blocks_flops(mae.encoder.blocks, n).values()) / 3   # the saving is real
    ours = count_masked_flops(mae, tuple(x.shape[2:]), 0.75, SCHEME[name])
    assert ours["visible_tokens"] == visible
    if name == "videomae-s":   # one tube: the count is exact (TubeViT's heads: expected shares)
        assert ours["total"] == counter.get_total_flops()
    else:
        assert ours["total"] == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_targets_are_each_tokens_pixels_normalised_per_token():
    raw = build("videomae-s", norm_pix=False)
    x = clip("videomae-s")
    (g, t), = raw.token_targets(x)                           # (B, 2*2*2, 2*16*16*3)
    assert g == 0 and t.shape == (2, 8, 1536)
    # token (t=1, h=0, w=1): frames 2-3, rows 0-15, columns 16-31, laid out (t, h, w) then C
    region = x[:, :, 2:4, 0:16, 16:32].permute(0, 2, 3, 4, 1).reshape(2, -1)
    assert torch.equal(t[:, 1 * 4 + 0 * 2 + 1], region)
    normed = build("videomae-s")
    (_, n), = normed.token_targets(x)
    expected = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(n, expected)
    assert n.mean(-1).abs().max() < 1e-5 and (n.var(-1) - 1).abs().max() < 1e-3


def test_sparse_tube_targets_cover_the_combined_space_to_depth_extent():
    mae = build("tubevit-s", norm_pix=False)
    x = clip("tubevit-s")
    targets = dict(mae.token_targets(x))
    spec = mae.encoder.config.tubes[0]                       # 8x8x8 stride 16,32,32, s2d t x2
    assert spec.span == (16, 8, 8)
    # tube 1, token (t=1, h=1, w=0): frames 16-31, rows 32-39, columns 0-7
    nt, nh, nw = mae.encoder.token_groups(x.shape)[0][2]
    region = x[:, :, 16:32, 32:40, 0:8].permute(0, 2, 3, 4, 1).reshape(2, -1)
    assert torch.equal(targets[0][:, 1 * nh * nw + 1 * nw + 0], region)
    assert [t.shape[-1] for _, t in mae.token_targets(x)] == mae.encoder.group_target_sizes()


@pytest.mark.parametrize("name", list(VIDEO))
def test_loss_reads_the_masked_tokens_only(name):
    """The decoder's outputs at visible positions do not change the loss, a masked one does,
    and the loss is the mean over masked tokens of the per-token MSE to token_targets."""
    mae = build(name).eval()
    x = clip(name)
    mask = mask_of(mae, x)
    n_visible = int((~mask[0]).sum())
    captured = {}

    def perturb(where):
        def hook(module, args, out):
            out = out.clone()
            out[:, where] += 100.0
            captured["h"] = out
            return out
        return hook

    with torch.no_grad():
        base = mae(x, mask)
        handle = mae.decoder.norm.register_forward_hook(perturb(slice(0, n_visible)))
        assert mae(x, mask) == base
        handle.remove()
        handle = mae.decoder.norm.register_forward_hook(perturb(n_visible))
        assert mae(x, mask) != base
        handle.remove()
        handle = mae.decoder.norm.register_forward_hook(perturb(slice(0, 0)))
        mae(x, mask)
        handle.remove()
    # Independent recomputation: predictions of the masked tokens vs their targets.
    h = captured["h"][:, n_visible:]                                  # (B, n_m, d)
    masked_ids = [row.nonzero().squeeze(1) for row in mask]
    targets = {g: t for g, t in mae.token_targets(x)}
    starts, s = {}, 0
    for g, _, grid in mae.encoder.token_groups(x.shape):
        starts[g], s = s, s + math.prod(grid)
    errors = []
    for b, ids in enumerate(masked_ids):
        for j, i in enumerate(ids.tolist()):
            g = max(k for k in starts if starts[k] <= i)
            pred = mae.decoder.heads[g](h[b, j])
            errors.append((pred - targets[g][b, i - starts[g]]).square().mean())
    torch.testing.assert_close(base, torch.stack(errors).mean())


@pytest.mark.parametrize("name", list(VIDEO))
def test_reconstruction_keeps_visible_pixels_and_fills_masked_ones(name):
    mae = build(name).eval()
    x = clip(name)
    mask = mask_of(mae, x)
    with torch.no_grad():
        for head in mae.decoder.heads:                # predict 0 = each token's own mean
            head.weight.zero_(), head.bias.zero_()
    out = mae.reconstruct(x, mask)
    hidden = mae.masked_pixels(x, mask).expand_as(x)
    assert out.shape == x.shape and hidden.any() and (~hidden).any()
    assert torch.equal(out[~hidden], x[~hidden])
    if name == "videomae-s":                          # cubes do not overlap: a cube's mean
        b, i = mask.nonzero()[0].tolist()
        t, hw = divmod(i, 4)
        r, c = divmod(hw, 2)
        cube = (slice(None), slice(2 * t, 2 * t + 2), slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
        torch.testing.assert_close(out[b][cube], x[b][cube].mean().expand_as(x[b][cube]))
    img = torch.randn(2, 3, 32, 32)
    img_mask = mask_tokens(mae, img, 0.75, "random", torch.Generator().manual_seed(0))
    assert mae.reconstruct(img, img_mask).shape == img.shape


@pytest.mark.parametrize("name", list(VIDEO))
def test_every_parameter_takes_part_in_a_training_forward(name):
    mae = build(name).train()
    mae.set_all_parameters_in_forward(True)
    for x in (clip(name), torch.randn(2, 3, 32, 32)):
        mae.zero_grad(set_to_none=True)
        mae(x, mask_of(mae, x)).backward()
        missing = sorted(n for n, p in mae.named_parameters() if p.grad is None)
        assert not missing, f"{tuple(x.shape)}: no gradient for {missing}"
    # The encoder's trained parts get a real (non-zero) gradient from reconstruction.
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_meta_build_checkpointing_and_features():
    real = build("tubevit-s")
    with torch.device("meta"):
        meta = MaskedAutoencoder(create_model("tubevit-s", **SMALL), DECODER)
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert all(n.startswith(("encoder.", "decoder.")) for n, _ in real.named_parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    torch.manual_seed(0)
    real.init_weights()
    assert all(torch.equal(p, q) for p, q in zip(meta.parameters(), real.parameters()))

    x = clip("tubevit-s")[:1]
    mask = mask_of(real, x)

    def run():
        real.zero_grad(set_to_none=True)
        loss = real(x, mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in real.named_parameters() if p.grad is not None}

    loss, grads = run()
    real.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = run()
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    feats = real.features(x)
    assert feats.shape == (1, 24)
    torch.testing.assert_close(feats, real.encoder.forward_features(x).mean(1))
    assert {"decoder.mask_token", "decoder.norm.weight", "encoder.norm.bias"} <= real.no_weight_decay()
    assert "decoder.embed.weight" not in real.no_weight_decay()


def test_masked_autoencoder_round_trips_through_a_model_file(tmp_path):
    mae = build("videomae-s")
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    path = str(tmp_path / "mae.safetensors")
    save_model(mae, path)
    loaded = load_model(path)
    assert isinstance(loaded, MaskedAutoencoder) and loaded.config == mae.config
    assert loaded.decoder_config == mae.decoder_config
    a, b = mae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = clip("videomae-s")
    mask = mask_of(mae, x)
    with torch.no_grad():
        assert torch.equal(mae.eval()(x, mask), loaded.eval()(x, mask))


def test_bad_masks_are_user_errors():
    mae = build("videomae-s")
    x = clip("videomae-s")
    mask = mask_of(mae, x)
    uneven = mask.clone()
    uneven[0, mask[0].nonzero()[0]] = False
    with pytest.raises(UserError, match="same number of tokens"):
        mae(x, uneven)
    with pytest.raises(UserError, match="mask must be bool"):
        mae(x, mask[:, :-1])
    with pytest.raises(UserError, match="CLS token"):
        MaskedAutoencoder(create_model("tubevit-s", **SMALL, pos_embed="learned", pos_grid=(2, 2),
                                       class_token=True), DECODER)
