"""The training format `pretrain prepare` stores: size, frame rate, GOP, no B-frames, clip
timing against the original, determinism, resume, images, --keep-original."""
from __future__ import annotations

import hashlib
import io
import json
import os

import av
import numpy as np
import pytest

from orchestration.cli import main as cli
from pretrain.data import shards
from pretrain.data import transforms as T
from pretrain.data.media import decode_frames, probe_video
from pretrain.data.prepare import Item, prepare
from pretrain.data.transcode import (IMAGE, VIDEO, ImageFormat, VideoFormat, output_size,
                                     transcode_image, transcode_video)
from tests.fixtures.media import write_manifest

SMALL = VideoFormat(short_side=32, max_fps=15, gop=8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUBEVIT_CACHE_DIR", str(tmp_path / "cache"))


def numbered_video(frames: int, fps: int, width: int = 64, height: int = 48) -> bytes:
    """x264 defaults (B-frames, long GOP); frame i is flat grey 6 * i + 10, so a decoded
    frame tells which source frame it shows."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 6 * i + 10, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def source_frame(rgb: np.ndarray) -> int:
    return int(round((float(rgb.mean()) - 10) / 6))


def packets(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as c:
        return [(p.pts, p.dts, p.is_keyframe) for p in c.demux(video=0) if p.size]


def test_format_size_fps_gop_and_no_b_frames():
    src = numbered_video(40, 30, 96, 64)
    assert any(pts != dts for pts, dts, _ in packets(src))  # the source reorders (B-frames)
    out, meta = transcode_video(src, SMALL)
    assert (meta.width, meta.height, meta.fps, meta.num_frames) == (48, 32, 15.0, 20)
    assert meta.duration == pytest.approx(40 / 30)
    assert probe_video(out) == meta  # the stored metadata is the stored stream's
    pk = packets(out)
    assert [k for k, (_, _, key) in enumerate(pk) if key] == [0, 8, 16]  # closed GOPs of 8
    assert all(pts == dts for pts, dts, _ in pk)  # decode order = display order: no B-frames
    with av.open(io.BytesIO(out)) as c:
        ctx = c.streams.video[0].codec_context
        assert (ctx.name, ctx.format.name) == ("h264", "yuv420p")


def test_never_upscales_or_raises_the_frame_rate():
    src = numbered_video(12, 10, 30, 22)
    _, meta = transcode_video(src, SMALL)
    assert (meta.width, meta.height, meta.fps, meta.num_frames) == (30, 22, 10.0, 12)
    assert output_size(1280, 720, 256) == (456, 256)
    assert output_size(360, 640, 256) == (256, 456)
    assert output_size(201, 101, 256) == (200, 100)  # yuv420p needs even sizes


@pytest.mark.parametrize("src_fps", [30, 25])
def test_clips_cover_the_same_seconds_as_on_the_original(src_fps):
    """With data.fps = 15 a clip of the stored stream shows the source frames that the same
    clip of the original shows (up to the floor/round of a non-integer frame step)."""
    src = numbered_video(40, src_fps)
    out, meta = transcode_video(src, SMALL)
    orig = probe_video(src)
    assert meta.fps == 15.0 and meta.duration == pytest.approx(orig.duration, abs=1 / 15)
    for start_s in (0.0, 0.4, 0.8):  # clip starts on the stored 15 fps grid
        o_step = T.frame_step(orig.fps, 15.0, 2)
        s_step = T.frame_step(meta.fps, 15.0, 2)
        o_idx = T.clip_indices(start_s * orig.fps, 6, o_step, orig.num_frames)
        s_idx = T.clip_indices(start_s * meta.fps, 6, s_step, meta.num_frames)
        want = [source_frame(f) for f in decode_frames(src, o_idx, orig.fps)]
        got = [source_frame(f) for f in decode_frames(out, s_idx, meta.fps)]
        tol = 0 if src_fps % 15 == 0 else 1
        assert np.abs(np.array(got) - np.array(want)).max() <= tol, (start_s, got, want)
        assert want == o_idx  # the numbered source decodes to its own frame numbers


def test_frame_stride_counts_frames_of_the_original(tmp_path):
    """data.frame_stride (no data.fps) is defined on the recorded video: stride 2 of a 30 fps
    original stored at 15 fps steps one stored frame, and an eval clip of the stored sample
    shows the source frames the same clip of the original shows (within one frame: the
    clip's centre start rounds on different grids)."""
    from streaming import LocalDataset

    from pretrain.data import samples

    src = numbered_video(40, 30)
    path = tmp_path / "numbered.mp4"
    path.write_bytes(src)
    prepare("video", [Item(str(path), "a")], str(tmp_path / "out"), workers=1,
            work_dir=str(tmp_path / "work"), progress=False, store=SMALL)
    stored = LocalDataset(local=str(tmp_path / "out"))[0]
    assert (stored["fps"], stored["source_fps"]) == (15.0, 30.0)
    spec = samples.ClipSpec(frames=6, size=32, stride=2, fps=None, crop_scale=1.0, hflip=False)
    assert samples._frame_step(stored, spec) == 1.0
    orig = probe_video(src)
    original = {"video": src, "fps": orig.fps, "num_frames": orig.num_frames,
                "width": orig.width, "height": orig.height}

    def shown(raw):
        clip = samples.eval_clip(raw, spec)[0].numpy()  # (3, T, S, S)
        return np.array([source_frame(clip[:, t].transpose(1, 2, 0)) for t in range(6)])

    want, got = shown(original), shown(stored)
    assert np.all(np.diff(want) == 2)  # the original clip: every 2nd recorded frame
    assert np.abs(got - want).max() <= 1, (got, want)


def test_same_input_same_bytes():
    src = numbered_video(30, 30)
    a, _ = transcode_video(src, SMALL)
    transcode_video(numbered_video(20, 24, 80, 48), VIDEO)  # other work in between
    b, _ = transcode_video(src, SMALL)
    assert a == b


def _digest(folder: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n.startswith(("shard.", "index", "labels"))}


def test_prepare_stores_the_training_format_deterministically(media_dir, tmp_path, capsys):
    """The codec zoo through the CLI's default: stored metadata is the stored stream's,
    two prepares (1 and 2 processes) give the same shard bytes, the report names the format."""
    from streaming import LocalDataset

    manifest = write_manifest(str(tmp_path / "v.csv"), media_dir["videos"])
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    for out, workers in zip(outs, ("1", "2")):
        assert cli(["prepare", "video", "--manifest", manifest, "--out", out,
                    "--no-progress", "--workers", workers]) == 0
    assert "stored as " + VIDEO.describe() in capsys.readouterr().out
    assert _digest(outs[0]) == _digest(outs[1])
    assert json.load(open(os.path.join(outs[0], shards.REPORT)))["storage"] == VIDEO.describe()
    assert json.load(open(os.path.join(outs[0], shards.LABELS)))["storage"] == VIDEO.describe()
    ds = LocalDataset(local=outs[0])
    assert len(ds) == len(media_dir["videos"])
    for i in range(len(ds)):
        s = ds[i]
        src = probe_video(open(s["key"], "rb").read())
        meta = probe_video(s["video"])
        assert (s["fps"], s["num_frames"], s["width"], s["height"]) == (
            meta.fps, meta.num_frames, meta.width, meta.height)
        assert meta.codec == "h264" and meta.fps == min(src.fps, 15.0)
        assert (meta.width, meta.height) == (src.width, src.height)  # small: never upscaled
        assert s["duration"] == pytest.approx(src.duration, abs=1 / 15)


def test_keep_original_stores_the_input_bytes(media_dir, tmp_path, capsys):
    from streaming import LocalDataset

    manifest = write_manifest(str(tmp_path / "v.csv"), media_dir["videos"][:2])
    out = str(tmp_path / "o")
    assert cli(["prepare", "video", "--manifest", manifest, "--out", out, "--no-progress",
                "--keep-original"]) == 0
    assert "stored as original bytes" in capsys.readouterr().out
    assert "storage" not in json.load(open(os.path.join(out, shards.LABELS)))  # as before
    ds = LocalDataset(local=out)
    for i in range(len(ds)):
        assert ds[i]["video"] == open(ds[i]["key"], "rb").read()


class _Killed(Exception):
    pass


def test_interrupted_transcoding_resumes_from_journal(media_dir, tmp_path, monkeypatch):
    import pretrain.data.prepare as P

    items = [Item(p, lbl) for p, lbl in media_dir["videos"]]
    ref = str(tmp_path / "ref")
    prepare("video", items, ref, progress=False, workers=1, store=SMALL)
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    calls, real = [], P._check
    killed = False

    def flaky(args):
        nonlocal killed
        calls.append(args[1])
        if len(calls) == 3 and not killed:
            killed = True
            raise _Killed
        return real(args)

    monkeypatch.setattr(P, "_check", flaky)
    with pytest.raises(_Killed):
        prepare("video", items, out, work_dir=work, progress=False, workers=1, store=SMALL)
    assert len(os.listdir(os.path.join(work, "media"))) == 2  # staged, keyed like the journal
    calls.clear()
    prepare("video", items, out, work_dir=work, progress=False, workers=1, store=SMALL)
    assert len(calls) == len(items) - 2
    assert _digest(out) == _digest(ref)
    # A journal of another storage format is not reused.
    work2 = str(tmp_path / "work2")
    with pytest.raises(_Killed):
        killed = False
        calls.clear()
        prepare("video", items, str(tmp_path / "o2"), work_dir=work2, progress=False,
                workers=1)
    calls.clear()
    prepare("video", items, str(tmp_path / "o2"), work_dir=work2, progress=False, workers=1,
            store=SMALL)
    assert len(calls) == len(items)


def test_images_downscaled_to_jpeg_never_upscaled(tmp_path, capsys, media_dir):
    from PIL import Image
    from streaming import LocalDataset

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), np.uint8)).save(
        buf, format="PNG")
    data, w, h = transcode_image(buf.getvalue(), ImageFormat(short_side=40, quality=90))
    assert (w, h) == (60, 40) and Image.open(io.BytesIO(data)).format == "JPEG"
    data, w, h = transcode_image(buf.getvalue(), IMAGE)
    assert (w, h) == (150, 100)
    assert transcode_image(buf.getvalue(), IMAGE)[0] == data

    rows = media_dir["images"] + [(media_dir["broken_image"], "red")]
    manifest = write_manifest(str(tmp_path / "i.csv"), rows)
    for flag, fmt in (([], "JPEG"), (["--keep-original"], None)):
        out = str(tmp_path / f"o{len(flag)}")
        assert cli(["prepare", "image", "--manifest", manifest, "--out", out,
                    "--no-progress"] + flag) == 0
        printed = capsys.readouterr().out
        assert "broken.jpg: not a readable image" in printed
        assert f"stored as {IMAGE.describe() if fmt else 'original bytes'}" in printed
        ds = LocalDataset(local=out)
        assert len(ds) == len(media_dir["images"])
        for i in range(len(ds)):
            img = Image.open(io.BytesIO(ds[i]["image"]))
            assert (img.width, img.height) == (ds[i]["width"], ds[i]["height"])
            if fmt:
                assert img.format == fmt
            else:
                assert ds[i]["image"] == open(ds[i]["key"], "rb").read()
