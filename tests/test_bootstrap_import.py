"""Image ViT import (timm layout) and the image-to-video bootstrap, against timm itself.

Tiny random timm ViTs stand in for ViT-B/L/H (never downloaded): patch 16 and 14, with and
without a CLS token (and its position), norm_pre, no final norm, any width/depth; saved as
safetensors and .pth. Without timm those tests skip, and the norm layouts are also checked
against the project's own ViT (ViViT model 1 on one frame, in timm's names).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from orchestration.cli import main
from pretrain.errors import UserError
from pretrain.model import count_flops, create_model, load_model, read_metadata, save_model
from pretrain.model.bootstrap import (
    BootstrapConfig, apply_freeze, bootstrap, init_from_file, map_tube_width, shared_isometry, width_projection)
from pretrain.model.image_vit_weights import inspect_timm, read_state_dict
from pretrain.train.optim import build_optimizer



@pytest.fixture(autouse=True)
def _one_thread(one_thread):   # tests/fixtures/threads.py
    yield


SMALL_TUBES = [
    {"kernel": [1, 8, 8], "stride": [8, 8, 8]},                                   # image tube
    {"kernel": [4, 8, 8], "stride": [4, 8, 8]},                                   # 3D
    {"kernel": [8, 4, 4], "stride": [8, 16, 16], "offset": [0, 4, 4], "s2d_axis": "h", "s2d_factor": 2},
]


def small_tubevit(dim=48):
    torch.manual_seed(1)
    return create_model("tubevit-ti", depth=2, dim=dim, heads=2, mlp_dim=96, tubes=SMALL_TUBES,
                        num_classes={"vid": 4, "img": 3}).eval()


def timm_vit(patch=16, img=64, dim=192, depth=3, heads=3, **kw):
    pytest.importorskip("timm")   # only the tests that compare with timm need it
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                            mlp_ratio=4.0, num_classes=0, **kw).eval()
    with torch.no_grad():   # timm inits cls/pos tiny; make them matter in the comparison
        vit.pos_embed.normal_(0, 0.5)
        if vit.cls_token is not None:
            vit.cls_token.normal_(0, 0.5)
    return vit


VARIANTS = {
    "p16-cls": dict(patch=16, img=64),
    "p14-cls": dict(patch=14, img=56, dim=64, heads=4),
    "p16-no-cls": dict(patch=16, img=64, class_token=False, global_pool="avg", fc_norm=False),
    "p16-cls-no-embed-class": dict(patch=16, img=64, no_embed_class=True),
}


@pytest.mark.parametrize("variant,fmt", [(v, "safetensors") for v in VARIANTS] + [("p14-cls", "pth")])
def test_images_equal_timm_at_init_and_video_works(tmp_path, variant, fmt):
    kw = VARIANTS[variant]
    vit = timm_vit(**kw)
    path = str(tmp_path / f"vit.{fmt}")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    else:
        torch.save({"model": vit.state_dict()}, path)
    model, meta = bootstrap(read_state_dict(path), small_tubevit(), gate_layer=1,
                            heads=kw.get("heads"), source=path)
    model.eval()
    assert model.config.patch_size == kw["patch"] and model.config.class_token == (kw.get("class_token", True))
    images = torch.randn(2, 3, kw["img"], kw["img"])
    with torch.no_grad():
        ours, theirs = model.forward_features(images), vit.forward_features(images)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # video at once: the small model's 3D tubes + the image ViT's 2D tube, all heads
    video = torch.randn(2, 3, 8, kw["img"], kw["img"])
    feats = model.forward_features(video)
    n_video = count_flops(model, (8, kw["img"], kw["img"]))["tokens"]
    assert feats.shape == (2, n_video, model.config.dim) and torch.isfinite(feats).all()
    logits = model(video, dataset="vid")
    logits.sum().backward()
    assert logits.shape == (2, 4) and model.blocks[-1].mlp.fc2.weight.grad is not None
    # 48 -> 192 (p16) is exactly 4x: the paper's space-to-depth; 48 -> 64 (p14): the isometry
    expected = "space-to-depth x4" if kw.get("dim", 192) == 192 else "shared-isometry"
    assert meta["gate_layer"] == "1" and meta["width_map"].startswith(expected)


# timm's norm layouts around the blocks: norm_pre (CLIP-style; timm then has no patch bias)
# and no final norm (timm final_norm=False), alone, together and with fc_norm
NORM_LAYOUTS = {
    "norm-pre-cls": dict(pre_norm=True),
    "norm-pre-no-cls-fc-norm": dict(pre_norm=True, class_token=False, global_pool="avg"),
    "no-final-norm-cls": dict(final_norm=False),
    "no-final-norm-no-cls": dict(final_norm=False, class_token=False, global_pool="avg"),
    "norm-pre-and-no-final-norm": dict(pre_norm=True, final_norm=False),
}


def _check_norm_layout_bootstrap(state, reference, *, norm_pre, final_norm, tmp_path):
    """Bootstrap `state` (timm layout); on images the model computes `reference(images)`
    exactly, keeps doing so through a model file, freezes norm_pre with the prefix and runs
    video."""
    model, meta = bootstrap(state, small_tubevit(), gate_layer=1)
    model.eval()
    assert (model.config.norm_pre, model.config.final_norm) == (norm_pre, final_norm)
    assert ("norm.weight" in model.state_dict()) == (final_norm != "none")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.forward_features(images), reference(images)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()
    # the architecture (with the new fields) round-trips through a model file
    path = str(tmp_path / "boot.safetensors")
    save_model(model, path, meta)
    config = json.loads(read_metadata(path)["config"])
    assert config.get("norm_pre", False) == norm_pre and config.get("final_norm", "tokens") == final_norm
    again = load_model(path).eval()
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again.forward_features(images), ours)
    trainable = set(apply_freeze(model))   # norm_pre feeds the frozen blocks: frozen with them
    assert not {"norm_pre.weight", "norm_pre.bias"} & trainable and "blocks.1.norm1.weight" in trainable
    logits = model(torch.randn(2, 3, 8, 64, 64), dataset="vid")
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


@pytest.mark.parametrize("layout", list(NORM_LAYOUTS))
def test_norm_pre_and_no_final_norm_images_equal_timm(tmp_path, layout):
    kw = NORM_LAYOUTS[layout]
    vit = timm_vit(depth=2, **kw)
    with torch.no_grad():   # timm inits norms at ones/zeros: make each one matter
        for name, p in vit.named_parameters():
            if name.startswith(("norm_pre.", "norm.", "fc_norm.")):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.5)

    def reference(images):   # fc_norm becomes TubeViT's token norm (bootstrap.py docstring)
        return vit.fc_norm(vit.forward_features(images))

    _check_norm_layout_bootstrap(vit.state_dict(), reference, norm_pre=bool(kw.get("pre_norm")),
                                 final_norm="none" if kw.get("final_norm") is False else "tokens",
                                 tmp_path=tmp_path)


@pytest.mark.parametrize("norm_pre,final_norm", [(True, "tokens"), (False, "none"), (True, "none")])
def test_norm_layouts_equal_the_projects_own_vit(tmp_path, norm_pre, final_norm):
    """Without timm: ViViT model 1 on one frame is a plain image ViT with the same options;
    its weights under timm's names are what the bootstrap imports."""
    torch.manual_seed(2)
    vit = create_model("vivit-s", depth=2, dim=192, heads=3, mlp_dim=768, tubelet=(1, 16, 16), num_frames=1,
                       img_size=64, norm_pre=norm_pre, final_norm=final_norm, num_classes={"k": 3}).eval()
    with torch.no_grad():   # positions, CLS token and norms away from their init, so each matters
        for name, p in vit.named_parameters():
            if name.startswith(("pos_embed.", "cls_token.")) or "norm" in name:
                p.uniform_(0.5, 1.5) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.5)
    own = vit.state_dict()
    state = {"patch_embed.proj.weight": own["tokenizer.tubes.0.weight"][:, :, 0],
             "patch_embed.proj.bias": own["tokenizer.tubes.0.bias"],
             "pos_embed": own["pos_embed.table"],          # no CLS row: timm's no_embed_class
             "cls_token": own["cls_token.token"],
             **{k: v for k, v in own.items() if k.startswith(("blocks.", "norm_pre.", "norm."))}}
    _check_norm_layout_bootstrap(state, vit.forward_features, norm_pre=norm_pre, final_norm=final_norm,
                                 tmp_path=tmp_path)


def test_gate_formula_at_layer_s():
    """z_S = MLP(LN(y_S)) + y_S + tanh(alpha) z_0 with S the 0-based block index."""
    model, _ = bootstrap(timm_vit().state_dict(), small_tubevit(), gate_layer=1)
    model.eval()
    with torch.no_grad():
        model.gate.alpha.fill_(0.7)
        x = torch.randn(1, 3, 64, 64)
        z0 = model.pos_embed(model.tokenizer(x), tuple(x.shape), model.tokenizer.grids(tuple(x.shape)))
        z = z0
        for i, blk in enumerate(model.blocks):
            y = z + blk.attn(blk.norm1(z))
            z = blk.mlp(blk.norm2(y)) + y + (torch.tanh(torch.tensor(0.7)) * z0 if i == 1 else 0)
        torch.testing.assert_close(model.forward_features(x), model.norm(z))


@pytest.mark.parametrize("size", [(96, 128), (48, 48), (64, 64)])
def test_other_image_sizes_resample_the_table_like_timm(size):
    # timm with dynamic_img_size resamples its table per input (bicubic, antialiased): the
    # bootstrapped model must compute the same at every image size, larger and smaller.
    vit = timm_vit()
    model, _ = bootstrap(vit.state_dict(), small_tubevit(), gate_layer=1)
    model.eval()
    vit.dynamic_img_size = True
    vit.patch_embed.strict_img_size, vit.patch_embed.flatten = False, False
    from timm.layers import Format
    vit.patch_embed.output_fmt = Format.NHWC
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ours, theirs = model.forward_features(x), vit.forward_features(x)
    assert ours.shape == (1, 1 + (size[0] // 16) * (size[1] // 16), 192)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    video = model.forward_features(torch.randn(1, 3, 8, *size))            # 3D tubes read the grid
    assert torch.isfinite(video).all()


def test_width_map_is_a_deterministic_isometry():
    q = width_projection(48, 192, seed=0)
    assert q.shape == (192, 48)
    torch.testing.assert_close(q.T @ q, torch.eye(48, dtype=torch.float64))
    assert torch.equal(q, width_projection(48, 192, seed=0)) and not torch.equal(q, width_projection(48, 192, seed=1))
    assert width_projection(192, 48, 0).shape == (48, 192)   # narrowing: orthonormal rows
    small = small_tubevit()
    big, meta = bootstrap(timm_vit().state_dict(), small, gate_layer=1, width_map="isometry")
    again, _ = bootstrap(timm_vit().state_dict(), small, gate_layer=1, width_map="isometry")
    assert meta["width_map"] == "shared-isometry (2 blocks) d=48 -> D=192"
    clip = torch.randn(1, 3, 8, 64, 64)
    a, b = [], []
    for i in (1, 2):   # plain and space-to-depth tubes: norms and inner products, across tubes too
        grid = small.tokenizer.grids(tuple(clip.shape))[i]
        with torch.no_grad():
            a.append(small.tokenizer.tubes[i](clip, grid)[0])             # (n, 48)
            b.append(big.tokenizer.tubes[i](clip, grid)[0])               # (n, 192)
        assert torch.equal(big.tokenizer.tubes[i].weight, again.tokenizer.tubes[i].weight)
    a, b = torch.cat(a), torch.cat(b)
    torch.testing.assert_close(b @ b.T, a @ a.T, rtol=1e-4, atol=1e-4)
    q = shared_isometry(48, 192, 2, 0)
    w, bias = map_tube_width(torch.randn(24, 3, 2, 2, 2), torch.randn(48), 2, q)
    assert w.shape == (96, 3, 2, 2, 2) and bias.shape == (192,)
    with pytest.raises(UserError, match="not divisible by a tube's space-to-depth factor 3"):
        map_tube_width(torch.randn(16, 3, 2, 2, 2), torch.randn(48), 3, q)   # 2 blocks
    with pytest.raises(UserError, match="divisible by 2"):
        shared_isometry(48, 191, 2, 0)


def test_freeze_and_one_step_changes_only_trainable():
    model, _ = bootstrap(timm_vit(depth=4).state_dict(), small_tubevit(), gate_layer=2)
    trainable = set(apply_freeze(model))
    assert "blocks.2.attn.qkv.weight" in trainable and "gate.alpha" in trainable
    assert "heads.vid.weight" in trainable and "pool.query" in trainable and "norm.weight" in trainable
    assert not any(n.startswith(("tokenizer.", "pos_embed.", "blocks.0.", "blocks.1.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 64, 64), dataset="vid"),
                                             torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable - {"heads.img.weight", "heads.img.bias"}   # the idle head has no grad


def test_unknown_and_mismatching_layouts_name_the_keys():
    state = timm_vit().state_dict()
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.q_norm\.weight.*reg_token"):
        inspect_timm({**state, "blocks.0.attn.q_norm.weight": torch.ones(64), "reg_token": torch.zeros(1, 4, 192)})
    broken = dict(state)
    del broken["blocks.1.mlp.fc2.weight"], broken["norm.weight"]
    with pytest.raises(UserError, match=r"missing keys blocks\.1\.mlp\.fc2\.weight, norm\.weight"):
        inspect_timm(broken)
    with pytest.raises(UserError, match=r"blocks\.2\.attn\.proj\.weight \(192, 100\)"):
        inspect_timm({**state, "blocks.2.attn.proj.weight": torch.zeros(192, 100)})
    with pytest.raises(UserError, match="not a square grid"):
        inspect_timm({**state, "pos_embed": torch.zeros(1, 20, 192)})
    with pytest.raises(UserError, match="give the number of attention heads"):
        inspect_timm(timm_vit(dim=64, heads=4).state_dict())
    with pytest.raises(UserError, match="gate layer 3 is not a block"):
        bootstrap(state, small_tubevit(), gate_layer=3)


def test_prefixed_and_wrapped_checkpoints(tmp_path):
    vit = timm_vit()
    torch.save({"state_dict": {"module." + k: v for k, v in vit.state_dict().items()}}, tmp_path / "w.pth")
    spec = inspect_timm(read_state_dict(str(tmp_path / "w.pth")))
    assert (spec.depth, spec.dim, spec.patch, spec.grid, spec.class_token) == (3, 192, 16, (4, 4), True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        read_state_dict(str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(str(tmp_path / "nope.safetensors"))


def test_cli_bootstrap_writes_a_self_describing_file(tmp_path, capsys):
    vit = timm_vit()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    save_model(small_tubevit(), str(tmp_path / "small.safetensors"))
    out = str(tmp_path / "boot.safetensors")
    assert main(["bootstrap", "--image-checkpoint", str(tmp_path / "vit.safetensors"),
                 "--tubes-from", str(tmp_path / "small.safetensors"), "--gate-layer", "2",
                 "--out", out, "--num-classes", "k=5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trained_blocks"] == 1 and summary["datasets"] == {"k": 5}
    assert 0 < summary["trainable_params"] < summary["params"]
    meta = read_metadata(out)
    assert meta["width_map"] == "space-to-depth x4 d=48 -> D=192" and meta["gate_layer"] == "2"
    model = load_model(out).eval()
    config = json.loads(meta["config"])
    assert config["pos_embed"] == "learned" and config["pos_grid"] == [4, 4] and config["class_token"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), vit.forward_features(x), rtol=1e-5, atol=1e-5)
    assert main(["bootstrap", "--image-checkpoint", str(tmp_path / "vit.safetensors"),
                 "--tubes-from", str(tmp_path / "small.safetensors"), "--gate-layer", "9", "--out", out]) == 2
    assert "gate layer 9" in capsys.readouterr().err


def test_init_from_file_heads_gate_and_freeze(tmp_path):
    model, meta = bootstrap(timm_vit(depth=4).state_dict(), small_tubevit(), gate_layer=2)
    path = str(tmp_path / "boot.safetensors")
    save_model(model, path, meta)
    # new datasets: matching head kept, others fresh; the gate can move while alpha is 0
    got = init_from_file(BootstrapConfig(init_from=path, gate_layer=3), {"vid": 4, "new": 7})
    assert got.config.gate_layer == 3 and set(got.datasets) == {"vid", "new"}
    assert torch.equal(got.heads["vid"].weight, model.heads["vid"].weight)
    assert torch.equal(got.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)
    trainable = {n for n, p in got.named_parameters() if p.requires_grad}
    assert "blocks.2.norm1.weight" not in trainable and "blocks.3.norm1.weight" in trainable
    none = init_from_file(BootstrapConfig(init_from=path, freeze="none"))
    assert all(p.requires_grad for p in none.parameters())
    with torch.no_grad():
        model.gate.alpha.fill_(0.3)
    save_model(model, path, meta)
    with pytest.raises(UserError, match="alpha is already"):
        init_from_file(BootstrapConfig(init_from=path, gate_layer=1))


def test_old_zero_dim_gate_alpha_still_loads():
    model = create_model("tubevit-ti", depth=2, dim=48, heads=2, mlp_dim=96, tubes=SMALL_TUBES, gate_layer=1)
    state = model.state_dict()
    state["gate.alpha"] = torch.tensor(0.5)
    model.load_state_dict(state)
    assert model.gate.alpha.shape == (1,) and model.gate.alpha.item() == 0.5
