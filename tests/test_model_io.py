"""Self-describing safetensors model files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from pretrain.errors import UserError
from pretrain.model import create_model, load_model, read_metadata, save_model


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(kernel_mode="interpolated", tubes="charades", gate_layer=1, num_classes={"k700": 700}),
])
def test_save_load_round_trips_bit_exactly(tmp_path, overrides):
    torch.manual_seed(0)
    model = create_model("tubevit-ti", depth=2, dim=48, mlp_dim=96, heads=4, **overrides)
    if model.gate is not None:
        with torch.no_grad():
            model.gate.alpha.fill_(0.25)
    path = tmp_path / "model.safetensors"
    save_model(model, str(path), metadata={"source": "unit-test"})
    loaded = load_model(str(path))
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(p.requires_grad for p in loaded.parameters())
    x = torch.randn(1, 3, 32, 64, 64)
    dataset = model.datasets[0]
    model.eval(), loaded.eval()
    assert torch.equal(model(x, dataset=dataset), loaded(x, dataset=dataset))
    meta = read_metadata(str(path))
    assert meta["source"] == "unit-test" and json.loads(meta["config"])["depth"] == 2


def test_load_from_an_fsspec_uri_and_bf16_stays_bf16():
    model = create_model("tubevit-ti", depth=1).to(torch.bfloat16)
    save_model(model, "memory://models/ti.safetensors")
    loaded = load_model("memory://models/ti.safetensors")
    assert loaded.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_files_that_are_not_ours_are_user_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="plain.safetensors is not a model file"):
        load_model(str(plain))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="notes.txt is not a model file"):
        load_model(str(text))
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
