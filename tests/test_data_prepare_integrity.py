"""`pretrain prepare` keeps what it publishes true to its inputs: a re-run replaces what
changed, manifests in other encodings or with URLs get a clear answer, inputs outside the
manifest's folder are named, and manifests without labels prepare unlabelled datasets."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from orchestration.cli import main as cli
from pretrain.data import shards
from pretrain.data.config import DataConfig
from pretrain.data.metadata import DataInfo
from pretrain.data.prepare import Item, prepare, read_manifest
from pretrain.errors import UserError
from tests.fixtures.media import write_manifest


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUBEVIT_CACHE_DIR", str(tmp_path / "cache"))


def _samples(folder: str) -> list[tuple[str, int]]:
    from streaming import LocalDataset

    ds = LocalDataset(local=folder)
    return [(ds[i]["key"], int(ds[i]["label"])) for i in range(len(ds))]


def _shard_files(folder: str) -> set[str]:
    return {n for n in os.listdir(folder) if n.startswith("shard.")}


def test_rerun_after_a_label_change_replaces_same_size_shards(media_dir, tmp_path):
    """Issue 14 §6: the old publish kept files of equal size, so the labels never changed."""
    images = media_dir["images"]
    out = str(tmp_path / "out")
    kw = dict(progress=False, workers=1, shard_size="2kb")   # several small shards
    prepare("image", [Item(p, lbl) for p, lbl in images], out, **kw)
    before = _shard_files(out)
    assert len(before) > 3 and [lbl for _, lbl in _samples(out)] == \
        [["blue", "green", "red"].index(lbl) for _, lbl in images]

    swap = {"red": "blue", "blue": "red", "green": "green"}   # same map, other labels
    prepare("image", [Item(p, swap[lbl]) for p, lbl in images], out, **kw)
    assert _shard_files(out) == before        # the same shard names and sizes ...
    assert [lbl for _, lbl in _samples(out)] == \
        [["blue", "green", "red"].index(swap[lbl]) for _, lbl in images]   # ... new labels

    # Fewer inputs: the shards the new run does not write are gone, the index names the rest.
    prepare("image", [Item(p, lbl) for p, lbl in images[:3]], out, **kw)
    index = json.load(open(os.path.join(out, shards.INDEX)))
    assert _shard_files(out) == {s["raw_data"]["basename"] for s in index["shards"]}
    assert [k for k, _ in _samples(out)] == [p for p, _ in images[:3]]


def test_non_utf8_manifest_is_a_clear_error_or_read_with_its_encoding(media_dir, tmp_path,
                                                                      capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(media_dir["images"][0][0], folder / "café.jpg")
    manifest = folder / "latin1.csv"
    manifest.write_bytes("path,label\ncafé.jpg,rouge\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.csv' is not valid utf-8: line 2 .*"
                                        r"--manifest-encoding"):
        read_manifest(str(manifest))
    out = str(tmp_path / "out")
    assert cli(["prepare", "image", "--manifest", str(manifest), "--out", out, "--no-progress",
                "--manifest-encoding", "latin-1"]) == 0
    assert [k for k, _ in _samples(out)] == [str(folder / "café.jpg")]
    # UTF-8 written by a spreadsheet starts with a byte-order mark: still the header "path".
    bom = folder / "bom.csv"
    bom.write_bytes("\ufeffpath,label\ncafé.jpg,rouge\n".encode("utf-8"))
    assert [it.path for it in read_manifest(str(bom))] == [str(folder / "café.jpg")]
    with pytest.raises(UserError, match="encoding 'no-such-codec' is unknown"):
        read_manifest(str(bom), encoding="no-such-codec")


def test_url_schemes_are_refused_unless_allowed(media_dir, tmp_path):
    import fsspec

    manifest = write_manifest(str(tmp_path / "urls.csv"),
                              [(media_dir["images"][0][0], "a"),
                               ("memory://inputs/b.jpg", "b")])
    with pytest.raises(UserError, match=r"line 3: path 'memory://inputs/b.jpg' is a memory:// "
                                        r"URL.*--allow-scheme memory"):
        read_manifest(manifest)
    http = write_manifest(str(tmp_path / "http.csv"), [("http://127.0.0.1:9/x.jpg", "a")])
    assert cli(["prepare", "image", "--manifest", http, "--out", str(tmp_path / "o")]) == 2

    # Asked for: read through fsspec (its in-process memory filesystem here), and reported.
    fsspec.filesystem("memory").pipe("/inputs/b.jpg", open(media_dir["images"][1][0], "rb").read())
    try:
        items = read_manifest(manifest, allow_schemes=["memory"])
        out = str(tmp_path / "out")
        result = prepare("image", items, out, progress=False, workers=1, manifest=manifest)
    finally:
        fsspec.filesystem("memory").rm("/inputs", recursive=True)
    assert result.written == 2 and not result.skipped
    report = json.load(open(os.path.join(out, shards.REPORT)))
    assert report["read_from"] == {os.path.dirname(media_dir["images"][0][0]): 1,
                                   "memory://inputs": 1}


def test_inputs_outside_the_manifest_folder_are_named(media_dir, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(media_dir["images"][0][0], folder / "inside.jpg")
    outside = media_dir["images"][1:4]
    manifest = write_manifest(str(folder / "list.csv"), [("inside.jpg", "x")] + outside)
    out = str(tmp_path / "out")
    assert cli(["prepare", "image", "--manifest", manifest, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    elsewhere = sorted({os.path.dirname(p) for p, _ in outside})
    assert (f"note: 3 inputs read from outside the manifest's folder {folder}: "
            f"{elsewhere[0]} (" in printed)
    report = json.load(open(os.path.join(out, shards.REPORT)))
    assert report["manifest"] == manifest
    assert report["outside_manifest_folder"] == elsewhere
    assert report["read_from"][str(folder)] == 1
    assert sum(report["read_from"][f] for f in elsewhere) == 3


def test_manifests_without_labels_prepare_unlabelled_datasets(media_dir, tmp_path):
    images = [p for p, _ in media_dir["images"]]
    # No label column at all: every sample unlabelled, no classes.
    bare = tmp_path / "bare.csv"
    bare.write_text("path\n" + "\n".join(images) + "\n")
    out = str(tmp_path / "bare")
    assert cli(["prepare", "image", "--manifest", str(bare), "--out", out, "--no-progress"]) == 0
    assert [lbl for _, lbl in _samples(out)] == [shards.UNLABELLED] * len(images)
    info = shards.dataset_info(out)
    assert (info["labels"], info["num_classes"], info["num_unlabelled"], info["labelled"]) == \
        ([], 0, len(images), False)

    # Some rows labelled (a labelled subset, e.g. for the kNN monitor): their classes only.
    rows = [(p, "red" if i < 3 else "") for i, p in enumerate(images)]
    mixed = write_manifest(str(tmp_path / "mixed.csv"), rows)
    out2 = str(tmp_path / "mixed")
    assert cli(["prepare", "image", "--manifest", mixed, "--out", out2, "--no-progress"]) == 0
    assert [lbl for _, lbl in _samples(out2)] == [0, 0, 0] + [-1] * (len(images) - 3)
    doc = json.load(open(os.path.join(out2, shards.LABELS)))
    assert doc["labels"] == ["red"] and doc["unlabelled"] == len(images) - 3

    data = DataInfo.from_config(DataConfig(image_uri=out2, image_eval_uri=out))
    assert data.unlabelled == ["image"] and data.labelled is False
    assert data.datasets["image"]["labelled"] is False


def test_labelled_datasets_keep_their_label_map_bytes(media_dir, tmp_path):
    out = str(tmp_path / "out")
    prepare("image", [Item(p, lbl) for p, lbl in media_dir["images"]], out, progress=False,
            workers=1)
    doc = json.load(open(os.path.join(out, shards.LABELS)))
    assert "unlabelled" not in doc            # labels.json as written before unlabelled data
    info = shards.dataset_info(out)
    assert info["labelled"] is True and info["num_unlabelled"] == 0
    data = DataInfo.from_config(DataConfig(image_uri=out))
    assert data.labelled and data.unlabelled == []
