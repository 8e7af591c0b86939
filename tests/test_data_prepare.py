"""`pretrain prepare`: real mp4s (several codecs, sizes, rates) plus broken inputs."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from orchestration.cli import main as cli
from pretrain.data import shards
from pretrain.data.prepare import Item, prepare, read_manifest
from pretrain.data.transcode import VIDEO
from pretrain.errors import UserError
from tests.fixtures.media import write_manifest


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUBEVIT_CACHE_DIR", str(tmp_path / "cache"))


def _digest(folder: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n.startswith(("shard.", "index", "labels"))}


def test_prepare_video_skips_broken_and_reports(media_dir, tmp_path, capsys):
    broken = media_dir["broken"]
    rows = media_dir["videos"] + [(p, "left") for p in broken.values()]
    manifest = write_manifest(str(tmp_path / "videos.csv"), rows)
    out = str(tmp_path / "out")
    rc = cli(["prepare", "video", "--manifest", manifest, "--out", out, "--dataset", "moves",
              "--no-progress", "--json", "--workers", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == len(media_dir["videos"])
    assert summary["datasets"]["video"]["storage"] == VIDEO.describe()  # the CLI's default
    reasons = {s["path"]: s["reason"] for s in summary["datasets"]["video"]["skipped"]}
    assert set(reasons) == set(broken.values())
    assert "not found" in reasons[broken["missing"]]
    assert "empty" in reasons[broken["empty"]]
    assert "no video stream" in reasons[broken["audio_only"]]
    assert "truncated" in reasons[broken["truncated"]] or "corrupt" in reasons[broken["truncated"]]
    report = json.load(open(os.path.join(out, shards.REPORT)))
    assert report["num_skipped"] == len(broken)

    info = shards.dataset_info(out)
    assert info == {"num_classes": 4, "labels": ["down", "left", "right", "up"],
                    "num_samples": len(media_dir["videos"]), "modality": "video",
                    "dataset": "moves", "hflip_ok": True, "num_unlabelled": 0, "labelled": True}


def test_stored_metadata_matches_the_files(media_dir, tmp_path):
    from streaming import LocalDataset

    out = str(tmp_path / "out")
    items = [Item(p, lbl) for p, lbl in media_dir["videos"]]
    prepare("video", items, out, progress=False, workers=1)
    ds = LocalDataset(local=out)
    by_key = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    for path, _ in media_dir["videos"]:
        name = os.path.basename(path)
        codec, wh, fps, = name.split("_")[1:4]
        w, h = map(int, wh.split("x"))
        s = by_key[path]
        assert (s["width"], s["height"]) == (w, h)
        assert s["fps"] == pytest.approx(int(fps.removesuffix("fps.mp4")), rel=0.01)
        assert s["num_frames"] > 0 and s["video"] == open(path, "rb").read()


def test_nothing_usable_exits_nonzero_and_keeps_out_untouched(media_dir, tmp_path, capsys):
    manifest = write_manifest(str(tmp_path / "bad.csv"),
                              [(p, "x") for p in media_dir["broken"].values()])
    out = tmp_path / "out"
    rc = cli(["prepare", "video", "--manifest", manifest, "--out", str(out), "--no-progress"])
    assert rc == 1
    assert "5 skipped" in capsys.readouterr().out
    assert not (out / shards.INDEX).exists() and (out / shards.REPORT).exists()
    with pytest.raises(UserError, match=str(out)):
        shards.dataset_info(str(out))


def test_output_is_deterministic_and_labels_can_be_reused(media_dir, tmp_path):
    items = [Item(p, lbl) for p, lbl in media_dir["videos"]]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare("video", items, a, progress=False, workers=2)
    prepare("video", items, b, progress=False, workers=1)
    assert _digest(a) == _digest(b)
    # A val split missing a class keeps the train split's label map.
    val = [it for it in items if it.label != "down"]
    c = str(tmp_path / "c")
    prepare("video", val, c, labels=shards.read_labels(a), progress=False, workers=1)
    assert shards.dataset_info(c)["labels"] == shards.dataset_info(a)["labels"]


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_from_journal(media_dir, tmp_path, monkeypatch):
    import pretrain.data.prepare as P

    items = [Item(p, lbl) for p, lbl in media_dir["videos"]]
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    calls = []
    resumed = False
    real = P._check

    def flaky(args):
        nonlocal resumed
        calls.append(args[1])
        if len(calls) == 3 and not resumed:
            raise _Killed  # the run dies part-way through checking
        return real(args)

    monkeypatch.setattr(P, "_check", flaky)
    with pytest.raises(_Killed):
        prepare("video", items, out, work_dir=work, progress=False, workers=1)
    assert not os.path.exists(os.path.join(out, shards.INDEX))
    calls.clear()
    resumed = True
    result = prepare("video", items, out, work_dir=work, progress=False, workers=1)
    assert result.written == len(items)
    assert len(calls) == len(items) - 2  # the two checked before the interruption are reused


def test_images_from_csv_and_class_folders(media_dir, tmp_path, capsys):
    rows = media_dir["images"] + [(media_dir["broken_image"], "red")]
    manifest = write_manifest(str(tmp_path / "images.csv"), rows)
    rc = cli(["prepare", "image", "--manifest", manifest, "--out", str(tmp_path / "csv"),
              "--no-progress", "--dataset", "colours"])
    assert rc == 0
    assert "broken.jpg: not a readable image" in capsys.readouterr().out
    info = shards.dataset_info(str(tmp_path / "csv"))
    assert info["num_samples"] == 12 and info["labels"] == ["blue", "green", "red"]
    rc = cli(["prepare", "image", "--folder", media_dir["image_folder"],
              "--out", str(tmp_path / "folder"), "--no-progress"])
    assert rc == 0
    info = shards.dataset_info(str(tmp_path / "folder"))
    assert info["num_samples"] == 12 and info["dataset"] == "image" and info["num_classes"] == 3


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.mp4,x\n")
    with pytest.raises(UserError, match="bad.csv.*path,label"):
        read_manifest(str(bad))
    assert cli(["prepare", "video", "--manifest", str(tmp_path / "nope.csv"),
                "--out", str(tmp_path / "o")]) == 2


def test_synthetic_layout(tmp_path):
    out = str(tmp_path / "syn")
    rc = cli(["prepare", "synthetic", "--out", out, "--videos", "8", "--images", "8",
              "--no-progress", "--frames", "8", "--size", "32"])
    assert rc == 0
    for kind in ("video", "image"):
        for split in ("train", "val"):
            info = shards.dataset_info(os.path.join(out, kind, split))
            assert info["modality"] == kind and info["num_classes"] == 4
    assert shards.dataset_info(os.path.join(out, "video", "train"))["hflip_ok"] is False
    assert shards.dataset_info(os.path.join(out, "video", "val"))["num_samples"] == 4


@pytest.mark.parametrize("modality", ["image", "video"])
def test_synthetic_style_from_the_command_line(tmp_path, modality):
    """--image-style / --video-style write what prepare_synthetic(image_style= / video_style=)
    writes, and "bright" differs from the default "random"."""
    from pretrain.data.synthetic import prepare_synthetic

    videos, images = (4, 0) if modality == "video" else (0, 8)

    def samples(folder):
        from streaming import LocalDataset

        return [s[modality] for s in LocalDataset(local=os.path.join(folder, modality, "train"))]

    for style in ("bright", "random"):
        out = str(tmp_path / f"cli-{style}")
        args = ["prepare", "synthetic", "--out", out, "--videos", str(videos), "--images",
                str(images), "--no-progress", "--size", "32", "--frames", "8", "--workers", "1"]
        assert cli(args + ([f"--{modality}-style", style] if style == "bright" else [])) == 0
        lib = str(tmp_path / f"lib-{style}")
        prepare_synthetic(lib, videos, images, frames=8, size=32, workers=1, progress=False,
                          **{f"{modality}_style": style})
        assert samples(out) == samples(lib)
    assert samples(str(tmp_path / "cli-bright")) != samples(str(tmp_path / "cli-random"))
