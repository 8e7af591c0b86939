"""The TubeViT model API: shapes, heads, gradients, meta init, sizes, gate. (What every
registered model must do, activation checkpointing and file round trips included, is in
test_models_all.py.)"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.errors import UserError
from pretrain.model import SIZES, TubeViTConfig, count_params, create_model, list_models, model_config

TINY = dict(depth=2, dim=48, mlp_dim=96, heads=4)
CLIP = (2, 3, 32, 64, 64)     # 44 tokens with the paper's tubes
IMAGES = (2, 3, 64, 64)       # 16 tokens


def tiny(**overrides):
    torch.manual_seed(0)
    return create_model("tubevit-ti", **{**TINY, **overrides})


def test_forward_shapes_and_heads_by_dataset():
    model = tiny()
    video, images = torch.randn(CLIP), torch.randn(IMAGES)
    assert model.forward_features(video).shape == (2, 44, 48)
    assert model.forward_features(images).shape == (2, 16, 48)
    assert model(video, dataset="kinetics").shape == (2, 400)
    assert model(images, dataset="imagenet").shape == (2, 1000)
    assert model.forward_head(model.forward_features(images), "kinetics").shape == (2, 400)
    with pytest.raises(UserError, match="its heads: kinetics, imagenet"):
        model(video, dataset="ssv2")
    with pytest.raises(UserError, match="pass dataset= one of"):
        model(video)
    one_head = tiny(num_classes={"k700": 700})
    assert one_head(video).shape == (2, 700)


def grads_after(model, x, dataset):
    model.zero_grad(set_to_none=True)
    model(x, dataset=dataset).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [dict(gate_layer=1), dict(kernel_mode="interpolated", tubes="paper-no-s2d")])
def test_every_parameter_learns_from_video_and_the_shared_ones_from_images(overrides):
    model = tiny(**overrides).train()
    grads = grads_after(model, torch.randn(CLIP), "kinetics")
    for name, g in grads.items():
        if name.startswith("heads.imagenet"):
            assert g is None, name
        else:
            assert g is not None and g.abs().sum() > 0, f"{name} got no gradient from a video batch"
    grads = grads_after(model, torch.randn(IMAGES), "imagenet")
    image_tube = f"tokenizer.tubes.{model.tokenizer.image_index}."
    for name, g in grads.items():
        video_only = (name.startswith("tokenizer.tubes.") and not name.startswith(image_tube)) or name.startswith("heads.kinetics")
        if video_only:
            assert g is None, f"{name} got a gradient from an image batch"
        else:
            assert g is not None and g.abs().sum() > 0, f"{name} got no gradient from an image batch"


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_builds_on_meta_and_runs_shapes(name):
    with torch.device("meta"):
        model = create_model(name)
        feats = model.forward_features(torch.empty(1, 3, 32, 224, 224))
    assert feats.shape == (1, 539, SIZES[name][1])
    assert all(p.is_meta for p in model.parameters())


def test_tubevit_h_on_meta_has_the_papers_parameter_order():
    with torch.device("meta"):
        model = create_model("tubevit-h")
    n = count_params(model)
    # Paper: 635M. Ours adds the attention pool (6.6M) and two heads (K400 + IN-1k, 1.8M).
    assert 620e6 < n < 660e6, n
    assert len(model.blocks) == 32 and model.blocks[0].attn.qkv.weight.shape == (3 * 1280, 1280)
    with torch.device("meta"):
        b = create_model("tubevit-b")
    assert 85e6 < count_params(b) < 95e6  # paper: 90M


def test_meta_build_then_init_gives_a_fully_initialised_model():
    overrides = dict(depth=2, gate_layer=0)
    with torch.device("meta"):
        meta = create_model("tubevit-ti", **overrides)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.init_weights()
    ref = create_model("tubevit-ti", **overrides)
    torch.manual_seed(7)
    ref.init_weights()
    for (name, p), (_, q) in zip(meta.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(meta.blocks[1].norm1.weight, torch.ones(192))
    assert meta.gate.alpha.item() == 0.0
    out = meta(torch.randn(1, 3, 32, 64, 64), dataset="kinetics")
    assert torch.isfinite(out).all()


def test_gate_at_zero_changes_nothing_and_trains():
    plain = tiny()
    gated = tiny(gate_layer=1)
    state = plain.state_dict()
    missing, unexpected = gated.load_state_dict(state, strict=False)
    assert missing == ["gate.alpha"] and not unexpected
    x = torch.randn(CLIP)
    torch.testing.assert_close(gated(x, dataset="kinetics"), plain(x, dataset="kinetics"), rtol=0, atol=0)
    with torch.no_grad():
        gated.gate.alpha.fill_(0.5)
    assert not torch.allclose(gated(x, dataset="kinetics"), plain(x, dataset="kinetics"))


def test_no_weight_decay_names_biases_norms_query_and_gate():
    model = tiny(gate_layer=0)
    nwd = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert nwd <= names.keys()
    for expected in ("pool.query", "gate.alpha", "norm.weight", "blocks.0.norm1.bias", "blocks.1.attn.qkv.bias",
                     "tokenizer.tubes.0.bias", "heads.kinetics.bias"):
        assert expected in nwd
    for decayed in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "tokenizer.tubes.0.weight", "heads.imagenet.weight"):
        assert decayed not in nwd


def test_block_matches_timm_with_copied_weights():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from functools import partial

    from pretrain.model.vit import Block
    torch.manual_seed(0)
    ours = Block(48, 4, 96, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref = timm_vit.Block(48, 4, mlp_ratio=2.0, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 10, 48)
    # Both through SDPA's math kernel: which fused kernel a CPU dispatches to must not matter.
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(ours(x), ref(x))


def test_create_model_rejects_unknown_names_and_options():
    with pytest.raises(UserError, match="valid names: tubevit-ti, tubevit-s, tubevit-b, tubevit-l, tubevit-h"):
        create_model("tubevit-xl")
    with pytest.raises(UserError, match="unknown option.*width.*valid: depth"):
        model_config("tubevit-b", width=3)
    with pytest.raises(UserError, match="divisible by heads"):
        model_config("tubevit-b", heads=7)
    with pytest.raises(UserError, match="gate_layer=12"):
        model_config("tubevit-b", gate_layer=12)
    names = [n for n in list_models() if n.startswith(("tubevit-", "videomae-"))]   # other families too
    assert names == ["tubevit-ti", "tubevit-s", "tubevit-b", "tubevit-l", "tubevit-h",
                     "videomae-s", "videomae-b", "videomae-l", "videomae-h"]


def test_config_round_trips_through_dicts():
    cfg = model_config("tubevit-s", tubes="charades", kernel_mode="interpolated", gate_layer=3,
                       num_classes={"k400": 400}, drop_path_rate=0.1)
    again = TubeViTConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.patch_size == 16
    with pytest.raises(UserError, match="unknown keys"):
        TubeViTConfig.from_dict({**cfg.to_dict(), "patch": 16})


@pytest.mark.parametrize("overrides", [dict(gate_layer=0), dict(kernel_mode="interpolated", tubes="charades")])
def test_parameters_are_used_only_inside_their_own_modules_forward(overrides):
    # What DeepSpeed ZeRO-3 relies on: a parameter is gathered by a hook around the forward of
    # the module that owns it and released afterwards. Emulate that with empty tensors.
    model = tiny(**overrides).eval()
    full = {p: p.data for p in model.parameters()}
    for p in full:
        p.data = torch.empty(0)

    def gather(module, *_):
        for p in module.parameters(recurse=False):
            p.data = full[p]

    def release(module, *_):
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0)

    for m in model.modules():
        m.register_forward_pre_hook(gather)
        m.register_forward_hook(release)
    with torch.no_grad():
        # 40 frames: every tube fits (the paper's Charades 32x8x8 tube at offset 4 needs 36)
        assert model(torch.randn(1, 3, 40, 64, 64), dataset="kinetics").shape == (1, 400)
        assert model(torch.randn(1, 3, 64, 64), dataset="imagenet").shape == (1, 1000)


def test_image_vit_norm_layouts():
    """norm_pre / final_norm (vit.ImageNorms, as the vivit families): a LayerNorm before the
    blocks, and the last norm on the tokens, on the attention pool's output or none. Left out
    of the stored architecture at their defaults, so older ones load as the paper's model."""
    torch.manual_seed(0)
    base = tiny().eval()
    assert not {"norm_pre", "final_norm"} & set(base.config.to_dict())
    assert TubeViTConfig.from_dict(base.config.to_dict()) == base.config
    x = torch.randn(*CLIP)
    for norm_pre, final_norm in ((True, "tokens"), (False, "pooled"), (True, "none")):
        model = tiny(norm_pre=norm_pre, final_norm=final_norm).eval()
        stored = model.config.to_dict()
        assert (stored.get("norm_pre", False), stored.get("final_norm", "tokens")) == (norm_pre, final_norm)
        assert TubeViTConfig.from_dict(stored) == model.config
        state = {k: v for k, v in base.state_dict().items() if k in model.state_dict()}
        if norm_pre:   # away from the identity-like init, so it matters
            state["norm_pre.weight"] = torch.rand(base.config.dim) + 0.5
            state["norm_pre.bias"] = torch.randn(base.config.dim)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            z = model.tokens(x)
            z = model.norm_pre(z) if norm_pre else z
            for block in model.blocks:
                z = block(z)
            tokens = base.norm(z) if final_norm == "tokens" else z
            pooled = base.norm(model.pool(tokens)) if final_norm == "pooled" else model.pool(tokens)
            assert torch.equal(model.forward_features(x), tokens)
            assert torch.equal(model.pool_tokens(tokens), pooled)
            assert torch.equal(model(x, dataset="kinetics"), model.heads["kinetics"](pooled))
