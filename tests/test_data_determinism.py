"""Same seed -> same bytes -> same pixels: what remote == local and exact resumption rest on."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pretrain.data.media import decode_frames, probe_video
from pretrain.data.synthetic import (SYNTHETIC_CODEC, VIDEO_CLASSES, _moving_shape_clip,
                                     encode_mp4, prepare_synthetic)


def _clips(n: int, size: int = 32) -> list[np.ndarray]:
    return [_moving_shape_clip(np.random.default_rng([0, 0, 0, i]), VIDEO_CLASSES[i % 4], 8, size)
            for i in range(n)]


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_synthetic_encoding_is_reproducible_call_to_call():
    # libx264 gave some of these clips a different bitstream on a fraction of calls, more so
    # after other allocations had churned the heap; repeat with churn in between.
    clips = _clips(24)
    first = [_digest(encode_mp4(c, 16, SYNTHETIC_CODEC)) for c in clips]
    for rep in range(3):
        junk = [np.empty(4096 * (k + 1), np.uint8) for k in range(rep * 7)]  # heap churn
        again = [_digest(encode_mp4(clips[i], 16, SYNTHETIC_CODEC)) for i in reversed(range(24))]
        assert again[::-1] == first
        del junk


@pytest.mark.parametrize("style", ["random", "bright"])
def test_prepare_synthetic_twice_writes_identical_datasets(tmp_path, monkeypatch, style):
    monkeypatch.setenv("TUBEVIT_CACHE_DIR", str(tmp_path / "cache"))
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    for root in roots:
        prepare_synthetic(root, videos=12, images=8, frames=8, size=32, workers=1,
                          image_style=style, video_style=style)

    def files(root: str) -> dict[str, str]:
        out = {}
        for split in ("video/train", "video/val", "image/train", "image/val"):
            folder = os.path.join(root, split)
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                if name == "prepare_report.json":  # names its own output folder
                    report = json.loads(data)
                    report.pop("out_uri")
                    data = json.dumps(report, sort_keys=True).encode()
                out[f"{split}/{name}"] = _digest(data)
        return out

    a, b = files(roots[0]), files(roots[1])
    assert any(k.endswith(".mds") for k in a)
    assert a == b


_DECODE_SCRIPT = """
import sys, hashlib, numpy as np
from pretrain.data.media import decode_frames
data = open(sys.argv[1], "rb").read()
sizes = [tuple(map(int, s.split("x"))) for s in sys.argv[2:]]
for w, h in sizes:
    frames = np.stack(decode_frames(data, list(range(8)), 16.0, (w, h)))
    print(hashlib.sha1(frames.tobytes()).hexdigest())
"""


def test_decode_gives_the_same_pixels_in_another_process(tmp_path):
    # Loader workers decode in their own processes, each with its own scaler state and
    # its own history of output sizes; the pixels must not depend on either.
    data = encode_mp4(_clips(1)[0], 16, SYNTHETIC_CODEC)
    assert probe_video(data).num_frames == 8
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    sizes = [(32, 32), (48, 40), (37, 53), (32, 32), (64, 64)]
    here = [_digest(np.stack(decode_frames(data, list(range(8)), 16.0, s)).tobytes())
            for s in sizes]
    args = [f"{w}x{h}" for w, h in reversed(sizes)]  # other order: other scaler history
    out = subprocess.run([sys.executable, "-c", _DECODE_SCRIPT, str(path), *args],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    there = out.stdout.split()[::-1]
    assert there == here
