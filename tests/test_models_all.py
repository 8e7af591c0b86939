"""Every registered model across its variant axes (the pattern of timm's tests/test_models.py).

The cases come from the registry (`list_models()`: tubevit-*, videomae-*, vivit-*, vivit-fe-*,
vivit-fsa-*, timesformer-*) crossed with the
variant axes (tube set, kernel mode, position embedding), so a model family registered later
joins the loop without an edit here; an axis applies to a family whose config has that field
(VideoMAE has none of them: one case). Each case is built
small (`SMALL`: 2 blocks, width 24) to keep the fast set fast; names whose small builds are
the same model (the TubeViT sizes differ only in the fields `SMALL` sets) run once, under the
first name. Which combinations exist is the config's decision: a case its validation rejects
is skipped with the config's own message, not left out by a list here.

Per case: built on the meta device it has the real build's parameters (and `to_empty()` +
`init_weights()` gives the real build's values); video and image forwards give one row of
logits per clip; every parameter gets a gradient (through all heads, and in every training
forward with `set_all_parameters_in_forward`); activation checkpointing changes neither
outputs nor gradients; a save/load round trip through a safetensors file is bit-exact.
"""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from pretrain.errors import UserError
from pretrain.model import create_model, list_models, load_model, model_config, read_metadata, save_model

SMALL = dict(depth=2, dim=24, mlp_dim=48, heads=2, num_classes={"vid": 3, "img": 2},
             # TimeSformer's init zeroes temporal_fc in blocks 2..: the temporal attention there
             # would get an exactly zero first gradient, which the gradient check reads as unwired
             # (tests/test_model_vivit.py checks that init).
             zero_init_temporal_fc=False)
AXES = {
    "tubes": ("paper", "charades", "paper-no-s2d"),
    "kernel_mode": ("separate", "interpolated"),
    # learned: the variant `pretrain bootstrap` writes (an image ViT's table, CLS token, gate)
    "pos_embed": ({"pos_embed": "fixed"},
                  {"pos_embed": "learned", "pos_grid": (2, 2), "class_token": True, "gate_layer": 1}),
}
BATCH = 1


def _variants():
    for tubes, kernel_mode, pos in itertools.product(*AXES.values()):
        yield f"{tubes}-{kernel_mode}-{pos['pos_embed']}", {"tubes": tubes, "kernel_mode": kernel_mode, **pos}


def _cases() -> list:
    """One pytest.param(name, overrides) per distinct small model; rejected ones skipped."""
    cases, seen = [], set()
    for name in list_models():
        fields = {f.name for f in dataclasses.fields(model_config(name))}
        for variant, axes in _variants():
            overrides = {k: v for k, v in {**SMALL, **axes}.items() if k in fields}
            try:
                cfg = model_config(name, **overrides)
                key = repr({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"})
            except UserError as exc:
                key = (variant, str(exc))
                marks = [pytest.mark.skip(reason=f"config rejects it: {exc}")]
            else:
                marks = []
            if key not in seen:
                seen.add(key)
                cases.append(pytest.param(name, overrides, id=f"{name}-{variant}", marks=marks))
    return cases


CASES = _cases()


def build(name: str, overrides: dict):
    torch.manual_seed(0)
    return create_model(name, **overrides)


def video_clip(model) -> torch.Tensor:
    """The smallest clip on which every tube yields tokens, (BATCH, C, T, H, W)."""
    specs = model.config.tubes
    size = [max(s.offset[a] + s.span[a] for s in specs) for a in range(3)]
    return torch.randn(BATCH, model.config.in_chans, *size, generator=torch.Generator().manual_seed(1))


def image_batch(model) -> torch.Tensor | None:
    """Images of 2x2 patches for a model with an image tube, else None."""
    patch = model.config.patch_size
    if patch is None:
        return None
    return torch.randn(BATCH, model.config.in_chans, 2 * patch, 2 * patch,
                       generator=torch.Generator().manual_seed(2))


def all_heads_loss(model, x: torch.Tensor) -> torch.Tensor:
    """A loss that reads every head (so every head parameter takes part)."""
    features = model.forward_features(x)
    return sum(model.forward_head(features, name).square().mean() for name in model.datasets)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,overrides", CASES)
def test_meta_build_has_the_real_parameters(name, overrides):
    real = build(name, overrides)
    with torch.device("meta"):
        meta = create_model(name, **overrides)
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape) for n, p in meta.named_parameters()] == \
        [(n, p.shape) for n, p in real.named_parameters()]
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    torch.manual_seed(0)
    real.init_weights()
    for (n, p), (_, q) in zip(meta.named_parameters(), real.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name,overrides", CASES)
def test_video_and_image_forward(name, overrides):
    model = build(name, overrides).eval()
    inputs = [x for x in (video_clip(model), image_batch(model)) if x is not None]
    with torch.no_grad():
        for x in inputs:
            features = model.forward_features(x)
            for dataset, classes in model.config.num_classes.items():
                logits = model.forward_head(features, dataset)
                assert logits.shape == (BATCH, classes), (tuple(x.shape), dataset)
                assert torch.isfinite(logits).all()
            assert torch.equal(model(x, dataset=model.datasets[0]), model.forward_head(features, model.datasets[0]))


@pytest.mark.parametrize("name,overrides", CASES)
def test_every_parameter_gets_a_gradient(name, overrides):
    model = build(name, overrides).train()
    names = [n for n, _ in model.named_parameters()]
    # Every parameter is used by a video through all heads ...
    all_heads_loss(model, video_clip(model)).backward()
    got = grads(model)
    for n in names:
        assert n in got and got[n].abs().sum() > 0, f"{n} got no gradient from a video batch"
    # ... and takes part in every training forward on the all-parameters path (ZeRO-3's):
    # a video through one head, an image (the video-only tubes idle) through another.
    model.set_all_parameters_in_forward(True)
    inputs = [x for x in (video_clip(model), image_batch(model)) if x is not None]
    for x, dataset in zip(inputs, [model.datasets[0], model.datasets[-1]]):
        model.zero_grad(set_to_none=True)
        model(x, dataset=dataset).square().mean().backward()
        missing = sorted(set(names) - set(grads(model)))
        assert not missing, f"{tuple(x.shape)} through {dataset}: no gradient for {missing}"


@pytest.mark.parametrize("name,overrides", CASES)
def test_activation_checkpointing_changes_nothing(name, overrides):
    # Dropout everywhere: the recomputed forward must replay the same random masks.
    model = build(name, {**overrides, "drop_rate": 0.1, "drop_path_rate": 0.2, "attn_drop_rate": 0.1}).train()
    x = video_clip(model)
    dataset = model.datasets[0]

    def run():
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        out = model(x, dataset=dataset)
        out.square().mean().backward()
        return out.detach(), grads(model)

    out_plain, g_plain = run()
    model.set_grad_checkpointing(True)
    out_ckpt, g_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name,overrides", CASES)
def test_save_load_round_trips_bit_exactly(name, overrides, tmp_path):
    model = build(name, overrides)
    with torch.no_grad():   # away from the initial values (the gate's alpha starts at 0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    path = str(tmp_path / "model.safetensors")
    save_model(model, path, metadata={"source": "unit-test"})
    loaded = load_model(path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(p.requires_grad for p in loaded.parameters())
    model.eval(), loaded.eval()
    x = video_clip(model)
    with torch.no_grad():
        assert torch.equal(model(x, dataset=model.datasets[0]), loaded(x, dataset=model.datasets[0]))
    meta = read_metadata(path)
    assert meta["source"] == "unit-test" and json.loads(meta["config"])["depth"] == overrides["depth"]
