"""The names users' files depend on, written out (as torchtitan's test_state_dict_keys).

Model files and checkpoints store tensors by state-dict key, and checkpoints describe
themselves in a manifest. Renaming a module attribute or a manifest field would orphan every
file written before, and no other test would notice (they all save and load with the same
code). So the lists are spelled here: a change that fails this test needs a conversion for
old files, not an edit of the list.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints.layout import FileRecord, Manifest, RankMarker
from pretrain.model import create_model

OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-427e247" / "step_00000002"

# tubevit-ti, depth 1, width 24, the paper's tubes (the first two with space-to-depth).
TUBEVIT = [
    ("tokenizer.tubes.0.weight", (12, 3, 8, 8, 8)),
    ("tokenizer.tubes.0.bias", (24,)),
    ("tokenizer.tubes.1.weight", (6, 3, 16, 4, 4)),
    ("tokenizer.tubes.1.bias", (24,)),
    ("tokenizer.tubes.2.weight", (24, 3, 4, 12, 12)),
    ("tokenizer.tubes.2.bias", (24,)),
    ("tokenizer.tubes.3.weight", (24, 3, 1, 16, 16)),
    ("tokenizer.tubes.3.bias", (24,)),
    ("blocks.0.norm1.weight", (24,)),
    ("blocks.0.norm1.bias", (24,)),
    ("blocks.0.attn.qkv.weight", (72, 24)),
    ("blocks.0.attn.qkv.bias", (72,)),
    ("blocks.0.attn.proj.weight", (24, 24)),
    ("blocks.0.attn.proj.bias", (24,)),
    ("blocks.0.norm2.weight", (24,)),
    ("blocks.0.norm2.bias", (24,)),
    ("blocks.0.mlp.fc1.weight", (48, 24)),
    ("blocks.0.mlp.fc1.bias", (48,)),
    ("blocks.0.mlp.fc2.weight", (24, 48)),
    ("blocks.0.mlp.fc2.bias", (24,)),
    ("norm.weight", (24,)),
    ("norm.bias", (24,)),
    ("pool.query", (1, 1, 24)),
    ("pool.q.weight", (24, 24)),
    ("pool.q.bias", (24,)),
    ("pool.kv.weight", (48, 24)),
    ("pool.kv.bias", (48,)),
    ("pool.proj.weight", (24, 24)),
    ("pool.proj.bias", (24,)),
    ("heads.kinetics.weight", (5, 24)),
    ("heads.kinetics.bias", (5,)),
    ("heads.imagenet.weight", (3, 24)),
    ("heads.imagenet.bias", (3,)),
]

# What `pretrain bootstrap` writes: an image ViT's learned 2x2 position table and CLS token,
# the gate after block 0, and (here) one shared interpolated tube kernel.
BOOTSTRAPPED = [
    ("tokenizer.base_kernel", (24, 3, 8, 8, 8)),
    ("tokenizer.tubes.0.bias", (24,)),
    ("tokenizer.tubes.1.bias", (24,)),
    ("tokenizer.tubes.2.bias", (24,)),
    ("tokenizer.tubes.3.bias", (24,)),
    ("pos_embed.grid", (1, 4, 24)),
    ("pos_embed.cls_token", (1, 1, 24)),
    ("pos_embed.cls_pos", (1, 1, 24)),
    ("blocks.0.norm1.weight", (24,)),
    ("blocks.0.norm1.bias", (24,)),
    ("blocks.0.attn.qkv.weight", (72, 24)),
    ("blocks.0.attn.qkv.bias", (72,)),
    ("blocks.0.attn.proj.weight", (24, 24)),
    ("blocks.0.attn.proj.bias", (24,)),
    ("blocks.0.norm2.weight", (24,)),
    ("blocks.0.norm2.bias", (24,)),
    ("blocks.0.mlp.fc1.weight", (48, 24)),
    ("blocks.0.mlp.fc1.bias", (48,)),
    ("blocks.0.mlp.fc2.weight", (24, 48)),
    ("blocks.0.mlp.fc2.bias", (24,)),
    ("gate.alpha", (1,)),
    ("norm.weight", (24,)),
    ("norm.bias", (24,)),
    ("pool.query", (1, 1, 24)),
    ("pool.q.weight", (24, 24)),
    ("pool.q.bias", (24,)),
    ("pool.kv.weight", (48, 24)),
    ("pool.kv.bias", (48,)),
    ("pool.proj.weight", (24, 24)),
    ("pool.proj.bias", (24,)),
    ("heads.kinetics.weight", (5, 24)),
    ("heads.kinetics.bias", (5,)),
]

MANIFEST_KEYS = ["attempt", "config", "files", "format", "mlflow_run_id", "model_config", "step",
                 "time", "world_size", "zero_stage"]
MARKER_KEYS = ["attempt", "files", "rank", "step"]
FILE_RECORD_KEYS = ["crc32c", "rank", "sha256", "size"]   # crc32c: manifest format 2
FORMAT_1_FILE_RECORD_KEYS = ["rank", "sha256", "size"]


def keys_and_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_tubevit_state_dict_keys():
    with torch.device("meta"):
        model = create_model("tubevit-ti", depth=1, dim=24, mlp_dim=48, heads=2,
                             num_classes={"kinetics": 5, "imagenet": 3})
    assert keys_and_shapes(model) == TUBEVIT


def test_bootstrapped_tubevit_state_dict_keys():
    with torch.device("meta"):
        model = create_model("tubevit-ti", depth=1, dim=24, mlp_dim=48, heads=2, tubes="paper-no-s2d",
                             kernel_mode="interpolated", pos_embed="learned", pos_grid=(2, 2),
                             class_token=True, gate_layer=0, num_classes={"kinetics": 5})
    assert keys_and_shapes(model) == BOOTSTRAPPED


def test_checkpoint_manifest_and_marker_keys():
    record = FileRecord(size=1, sha256="0" * 64, rank=0)
    manifest = json.loads(Manifest(step=2, world_size=2, zero_stage=2, files={"f": record}).to_json())
    marker = json.loads(RankMarker(rank=0, step=2, attempt="a", files={"f": record}).to_json())
    assert sorted(manifest) == MANIFEST_KEYS
    assert sorted(marker) == MARKER_KEYS
    assert sorted(manifest["files"]["f"]) == sorted(marker["files"]["f"]) == FILE_RECORD_KEYS
    # ... which are the keys of a checkpoint written by main at 427e247, plus format 2's
    # crc32c per file (test_resume_old_checkpoint.py resumes that format-1 checkpoint).
    old_manifest = json.loads((OLD_CHECKPOINT / "COMMIT.json").read_text())
    old_marker = json.loads((OLD_CHECKPOINT / "markers" / "rank_00000.json").read_text())
    assert sorted(old_manifest) == MANIFEST_KEYS and sorted(old_marker) == MARKER_KEYS
    assert old_manifest["format"] == 1 and manifest["format"] == 2
    assert all(sorted(r) == FORMAT_1_FILE_RECORD_KEYS for r in old_manifest["files"].values())
