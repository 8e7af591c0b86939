"""Self-describing safetensors model files. (The bit-exact round trip of every registered
model is in test_models_all.py.)"""
import pytest
import torch
from safetensors.torch import save_file

from pretrain.errors import UserError
from pretrain.model import create_model, load_model, save_model


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
