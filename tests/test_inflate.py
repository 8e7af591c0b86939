"""Image ViT -> video model by inflation (pretrain/model/inflate.py), against timm itself.

Tiny random timm ViTs (never downloaded) of every accepted layout: class token or not,
global pool token or avg (fc_norm), patch 14 and 16, LayerScale, norm_pre, no patch bias.
The consequence checked: on a clip of one repeated frame, the inflated model's tokens at
every temporal index are the image ViT's tokens (timm's forward_features).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from orchestration.cli import main  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.model import load_model, read_metadata, save_model  # noqa: E402
from pretrain.model.bootstrap import bootstrap  # noqa: E402
from pretrain.model.image_vit_weights import fold_layer_scale, inspect_timm  # noqa: E402
from pretrain.model.inflate import inflate  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):   # tests/fixtures/threads.py
    yield


def timm_vit(patch=16, img=32, dim=32, depth=2, heads=2, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                            mlp_ratio=2.0, num_classes=0, **kw).eval()
    with torch.no_grad():   # timm inits these near 0 or 1: make every tensor matter
        for name, p in vit.named_parameters():
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.uniform_(0.5, 1.5)
            elif name.startswith(("pos_embed", "cls_token")) or "norm" in name:
                p.normal_(0, 0.5)
    return vit


LAYOUTS = {
    "p16-cls-token": dict(),
    "p16-no-cls-avg-fc-norm": dict(class_token=False, global_pool="avg"),
    "p14-no-cls-avg-norm": dict(patch=14, img=28, class_token=False, global_pool="avg", fc_norm=False),
    "p16-cls-layerscale-no-embed-class": dict(init_values=0.1, no_embed_class=True),
    # CLIP-style: norm_pre, and timm then builds the patch embedding without a bias
    "p16-no-cls-norm-pre-no-patch-bias": dict(class_token=False, global_pool="avg", pre_norm=True,
                                              init_values=0.3),
    "p16-cls-no-final-norm": dict(final_norm=False),
    "p16-cls-no-biases": dict(qkv_bias=False, proj_bias=False),
    "p16-cls-avg-fc-norm": dict(global_pool="avg"),
}


def boring(img, frames=4):
    """(1, 3, H, W) image and the clip of that frame repeated `frames` times."""
    torch.manual_seed(3)
    image = torch.randn(1, 3, img, img)
    return image, image.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


def per_index(features, nt, prefix):
    """(B, prefix + nt*ns, d) t-major -> (B, nt, ns, d) without the CLS token."""
    x = features[:, prefix:]
    return x.reshape(x.shape[0], nt, -1, x.shape[-1])


@pytest.mark.parametrize("embed_init", ["inflate", "central"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["vivit", "vivit-fe", "vivit-fsa", "timesformer", "vtn"])
def test_boring_video_gives_the_image_tokens_at_every_temporal_index(family, layout, embed_init):
    kw = dict(LAYOUTS[layout])
    img = kw.get("img", 32)
    vit = timm_vit(**kw)
    cls = vit.cls_token is not None
    if family == "vtn" and (kw.get("pre_norm") or kw.get("final_norm") is False):
        with pytest.raises(UserError, match=r"norm_pre\.weight|neither norm\.weight nor fc_norm\.weight"):
            inflate(vit.state_dict(), family, tubelet=1, heads=2)
        return
    model, meta = inflate(vit.state_dict(), family, embed_init=embed_init, tubelet=1 if family == "vtn" else 2,
                          num_frames=4, heads=2)
    model.eval()
    exact = json.loads(meta["exact_on_repeated_frames"])
    image, clip = boring(img)
    with torch.no_grad():
        theirs = vit.forward_features(image)                      # (1, [1+]ns, d)
        if family == "vtn":
            ours = model.frame_embeddings(clip)                   # (1, 4, d): one per frame
            pooled = theirs[:, 0] if cls else theirs.mean(1)
            assert exact == isinstance(vit.fc_norm, torch.nn.Identity)
            if exact:
                for i in range(4):
                    torch.testing.assert_close(ours[:, i], pooled, rtol=1e-4, atol=1e-4)
        elif family == "vivit-fe":
            ours = model.spatial_features(clip)                   # (1, nt, [1+]ns, d)
            assert ours.shape[1] == 2
            for i in range(2):
                torch.testing.assert_close(ours[:, i], theirs, rtol=1e-4, atol=1e-4)
        else:
            feats = model.forward_features(clip)
            prefix = int(family == "timesformer" or (family == "vivit" and cls))
            ours = per_index(feats, 2, prefix)
            if exact:
                for i in range(2):
                    torch.testing.assert_close(ours[:, i], theirs[:, int(cls):], rtol=1e-4, atol=1e-4)
                if prefix:
                    torch.testing.assert_close(feats[:, 0], theirs[:, 0], rtol=1e-4, atol=1e-4)
            else:   # the documented inexact cases: a CLS token the video model weighs differently
                assert (family, cls) in {("vivit", True), ("vivit-fsa", True), ("timesformer", False)}
        logits = model(clip, dataset="kinetics")
    if family != "vtn":
        assert exact == (family == "vivit-fe" or (family == "timesformer") == cls)
    assert torch.isfinite(logits).all()


def test_a_moving_clip_uses_the_temporal_parts():
    """Zero-initialised temporal attention still trains: its gradient is not zero."""
    vit = timm_vit(class_token=False, global_pool="avg")
    for family, name in (("vivit-fsa", "blocks.0.temporal_attn.proj.weight"),
                         ("timesformer", "blocks.0.temporal_fc.weight")):
        model, _ = inflate(vit.state_dict(), family, num_frames=4, heads=2)
        model.train()
        model(torch.randn(2, 3, 4, 32, 32), dataset="kinetics").sum().backward()
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0


def test_layerscale_import_equals_timm_on_images():
    vit = timm_vit(init_values=0.2, depth=3)
    state = vit.state_dict()
    spec = inspect_timm(state, heads=2)
    assert spec.layer_scale and not any("gamma" in k for k in fold_layer_scale(state))
    model, _ = inflate(state, "vivit", heads=2, tubelet=1, num_frames=1)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(image), vit.forward_features(image),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(init_values=0.2), dict(class_token=False, global_pool="avg")])
def test_the_tubevit_bootstrap_takes_layerscale_and_fc_norm(kw):
    vit = timm_vit(dim=192, heads=3, depth=2, img=64, **kw)
    torch.manual_seed(1)
    from pretrain.model import create_model
    small = create_model("tubevit-ti", depth=1, dim=48, heads=2, mlp_dim=96, num_classes={"v": 4},
                         tubes=[{"kernel": [1, 8, 8], "stride": [8, 8, 8]},
                                {"kernel": [4, 8, 8], "stride": [4, 8, 8]}]).eval()
    model, _ = bootstrap(vit.state_dict(), small, gate_layer=1)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = vit.forward_features(image)
        if vit.fc_norm is not torch.nn.Identity and not isinstance(vit.fc_norm, torch.nn.Identity):
            theirs = vit.fc_norm(theirs)     # TubeViT's token norm is the fc_norm (docstring)
        torch.testing.assert_close(model.eval().forward_features(image), theirs, rtol=1e-5, atol=1e-5)


def test_unmappable_layouts_are_refused_naming_the_tensor():
    state = timm_vit().state_dict()
    with pytest.raises(UserError, match=r"reg_token"):
        inflate({**state, "reg_token": torch.zeros(1, 4, 32)}, "vivit", heads=2)
    with pytest.raises(UserError, match=r"blocks\.1\.attn\.q_norm\.weight"):
        inflate({**state, "blocks.1.attn.q_norm.weight": torch.ones(16)}, "vivit", heads=2)
    with pytest.raises(UserError, match=r"fc_norm\.weight"):
        inflate({**state, "fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32)}, "vivit", heads=2)
    with pytest.raises(UserError, match=r"blocks\.0\.ls2\.gamma \(7,\)"):
        inflate({**state, "blocks.0.ls2.gamma": torch.ones(7)}, "vivit", heads=2)
    with pytest.raises(UserError, match=r"missing keys norm_pre\.bias"):
        inflate({**state, "norm_pre.weight": torch.ones(32)}, "vivit", heads=2)
    with pytest.raises(UserError, match="not an inflatable family"):
        inflate(state, "tubevit", heads=2)
    with pytest.raises(UserError, match="VTN's frame backbone embeds one frame"):
        inflate(state, "vtn", heads=2, tubelet=2)
    # the families that do not implement the image-layout options say so
    from pretrain.model import create_model
    with pytest.raises(UserError, match="does not implement model.norm_pre"):
        create_model("vtn-s", depth=1, norm_pre=True)
    # one reading of the layout for every family: TubeViT's bootstrap maps norm_pre too
    # (tests/test_bootstrap_import.py), only VTN refuses it (test above)
    clip_like = timm_vit(class_token=False, global_pool="avg", pre_norm=True).state_dict()
    assert inspect_timm(clip_like, heads=2).norm_pre


def test_cli_inflates_to_a_file_load_model_reads(tmp_path, capsys):
    vit = timm_vit(class_token=False, global_pool="avg", init_values=0.5)
    src = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, src)
    out = str(tmp_path / "vivit.safetensors")
    assert main(["bootstrap", "--image-checkpoint", src, "--video-model", "vivit", "--embed-init", "central",
                 "--tubelet", "2", "--num-frames", "4", "--heads", "2", "--num-classes", "k=5",
                 "--out", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["video_model"] == "vivit" and summary["tubelet"] == [2, 16, 16]
    assert summary["exact_on_repeated_frames"] is True and summary["datasets"] == {"k": 5}
    meta = read_metadata(out)
    assert meta["family"] == "vivit" and meta["embed_init"] == "central"
    model = load_model(out).eval()
    image, clip = boring(32)
    with torch.no_grad():
        ours = per_index(model.forward_features(clip), 2, 0)
        torch.testing.assert_close(ours[:, 1], vit.forward_features(image), rtol=1e-4, atol=1e-4)
    # round trip of a file with the new config fields, and a refusal with exit code 2
    save_model(model, str(tmp_path / "again.safetensors"))
    assert json.loads(read_metadata(str(tmp_path / "again.safetensors"))["config"])["final_norm"] == "pooled"
    assert main(["bootstrap", "--image-checkpoint", src, "--video-model", "vivit", "--gate-layer", "1",
                 "--out", out]) == 2
    assert "--gate-layer" in capsys.readouterr().err


def test_stored_vivit_architectures_are_unchanged_by_the_new_fields():
    """norm_pre / final_norm / pool are left out of to_dict() at their defaults, so files and
    checkpoint manifests written before them match and load."""
    from pretrain.model.registry import model_config, stored_config

    for name in ("vivit-s", "vivit-fe-s", "vivit-fsa-s", "timesformer-s", "vtn-s"):
        d = model_config(name).to_dict()
        assert not {"norm_pre", "final_norm", "pool"} & set(d)
        assert stored_config(name.rsplit("-", 1)[0], d) == model_config(name)
    d = model_config("vivit-s", final_norm="pooled", pool="mean").to_dict()
    assert d["final_norm"] == "pooled" and d["pool"] == "mean"


@pytest.mark.parametrize("family", ["timesformer", "vtn", "vivit-fe", "vivit-fsa"])
def test_cli_every_family(tmp_path, capsys, family):
    vit = timm_vit(init_values=0.5)
    src = str(tmp_path / "vit.pth")
    torch.save({"model": vit.state_dict()}, src)
    out = str(tmp_path / f"{family}.safetensors")
    assert main(["bootstrap", "--image-checkpoint", src, "--video-model", family, "--num-frames", "4",
                 "--heads", "2", "--out", out]) == 0
    assert "inflated" in capsys.readouterr().out
    model = load_model(out).eval()
    assert read_metadata(out)["family"] == family
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 4, 32, 32), dataset="kinetics")).all()
