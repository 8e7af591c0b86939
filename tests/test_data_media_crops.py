"""media.decode_crops (training clips: crop, scale, flip in one filter graph per clip) against
the whole-frame path it replaced (scale the frame so the crop becomes S x S, then cut it)."""
from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.media import BadMedia, Crop, decode_crops, decode_frames
from pretrain.data.synthetic import encode_mp4

W, H, FPS, N, S = 96, 64, 10, 6, 32


@pytest.fixture(scope="module")
def smooth_video() -> bytes:
    """Smooth gradients whose colour changes by ~25 levels per frame: an exact crop and one
    rounded to whole pixels of a scaled frame differ by little, a wrong frame, box or flip
    by much more."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    frames = np.stack([np.stack([xx * 1.5 + 25 * t, yy * 2.5, (xx + yy) * 0.8 + 25 * (N - t)],
                                -1) for t in range(N)])
    return encode_mp4(np.clip(frames, 0, 255).astype(np.uint8), FPS, "libx264")


def _old_path(data: bytes, indices: list[int], box, flip: bool) -> np.ndarray:
    """The replaced train_clip path: whole frames scaled so that `box` becomes S x S
    (decode_frames at that size), the S x S window cut, mirrored when `flip`."""
    x, y, w, h = box
    sw, sh = max(S, round(W * S / w)), max(S, round(H * S / h))
    x0, y0 = min(int(round(x * S / w)), sw - S), min(int(round(y * S / h)), sh - S)
    frames = np.stack(decode_frames(data, indices, FPS, (sw, sh)))[:, y0:y0 + S, x0:x0 + S]
    return frames[:, :, ::-1] if flip else frames


@pytest.mark.parametrize("box,flip", [((0, 0, W, H), False), ((10, 6, 50, 40), True),
                                      ((37, 15, 33, 47), False)])
def test_crops_match_the_whole_frame_path(smooth_video, box, flip):
    indices = [1, 2, 4, 5]
    out = np.zeros((1, len(indices), S, S, 3), np.uint8)
    decode_crops(smooth_video, FPS, [Crop(indices, box, flip)], S, out)
    diff = np.abs(out[0].astype(int) - _old_path(smooth_video, indices, box, flip))
    # Same pixels up to the old path's rounding of the box to whole scaled pixels ...
    assert diff.mean() < 2.5 and np.percentile(diff, 99) <= 8
    # ... far closer than to the neighbouring frames or to the mirror image.
    for wrong in (_old_path(smooth_video, [i - 1 for i in indices], box, flip),
                  _old_path(smooth_video, indices, box, not flip)):
        assert diff.mean() < 0.25 * np.abs(out[0].astype(int) - wrong).mean()


def test_clips_share_one_decode_and_repeat_frames(smooth_video):
    """Two clips with their own boxes and flips, repeated and unsorted indices (short videos
    loop): each clip equals its own single-clip decode, a repeated index the same pixels."""
    a, b = Crop([4, 5, 0, 1], (8, 4, 40, 40), True), Crop([2, 2, 3, 5], (50, 20, 46, 44), False)
    both = np.zeros((2, 4, S, S, 3), np.uint8)
    decode_crops(smooth_video, FPS, [a, b], S, both)
    for j, crop in enumerate((a, b)):
        alone = np.zeros((1, 4, S, S, 3), np.uint8)
        decode_crops(smooth_video, FPS, [crop], S, alone)
        assert np.array_equal(both[j], alone[0])
    assert np.array_equal(both[1, 0], both[1, 1])
    assert not np.array_equal(both[0, 0], both[0, 1])


def test_past_the_end_repeats_the_last_frame_and_garbage_is_bad_media(smooth_video):
    out = np.zeros((1, 3, S, S, 3), np.uint8)
    decode_crops(smooth_video, FPS, [Crop([5, 8, 9], (0, 0, W, H), False)], S, out)
    assert np.array_equal(out[0, 1], out[0, 0]) and np.array_equal(out[0, 2], out[0, 0])
    with pytest.raises(BadMedia):
        decode_crops(b"not a video at all", FPS, [Crop([0], (0, 0, W, H), False)], S, out)
