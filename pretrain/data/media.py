"""Decoding encoded media with PyAV (video) and Pillow (images).

Video clips are decoded straight from the encoded bytes stored in the shards. Only the frames
a clip needs are converted to RGB, and the conversion does the resize in the same swscale pass
(`VideoFrame.reformat`), which is much cheaper than converting at full size and resizing after.

Determinism: `decode_frames` pixels depend only on (bytes, indices, fps, out_size), not on
the process, on earlier calls, or on timing: decoding is single-threaded and the one swscale
context per process runs with one thread and is reconfigured for each size (checked by
tests/test_data_determinism.py). They are bit-identical on the same CPU family and FFmpeg
build; FAST_BILINEAR's SIMD paths are not bit-exact across CPU families. Equal pixels from
two copies of a dataset also need equal bytes: see pretrain/data/synthetic.py for how
synthetic data is made reproducible.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import av
import numpy as np


class BadMedia(Exception):
    """An input file or stored sample that cannot be decoded; str(exc) is the reason."""


@dataclass(frozen=True)
class VideoMeta:
    fps: float
    num_frames: int
    width: int
    height: int
    duration: float
    codec: str


def _open(data: bytes):
    if not data:
        raise BadMedia("empty file")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadMedia(f"not a readable media container, corrupt or truncated "
                       f"({exc.__class__.__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise BadMedia("no video stream")
    stream = container.streams.video[0]
    # One thread per decode: loaders run one process per core, so codec threads would only
    # oversubscribe the cores.
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    return container, stream


def _rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(data: bytes,
                on_frame: Callable[[av.VideoFrame, float], None] | None = None) -> VideoMeta:
    """Decode every frame once to validate the file and count frames exactly.

    Raises BadMedia for empty, corrupt or truncated files and files without a video stream.
    A file whose decoder reports errors part-way is rejected rather than silently shortened.
    `on_frame(frame, stream_fps)` sees every decoded frame in display order (stream_fps is
    the container's rate, 0.0 when it has none): prepare transcodes in this same pass
    (pretrain/data/transcode.py), so each input is decoded once.
    """
    container, stream = _open(data)
    try:
        stream_fps = _rate(stream)
        count = 0
        first = last = None
        width = height = 0
        try:
            for frame in container.decode(stream):
                if first is None:
                    first = frame.time
                    width, height = frame.width, frame.height
                last = frame.time
                count += 1
                if on_frame is not None:
                    on_frame(frame, stream_fps)
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise BadMedia(f"decoding failed after {count} frames ({exc.__class__.__name__}: "
                           f"{exc}); the file is corrupt or truncated") from None
        if count == 0:
            raise BadMedia("video stream has no decodable frames")
        fps = _rate(stream)
        if fps <= 0:
            span = (last or 0.0) - (first or 0.0)
            fps = (count - 1) / span if count > 1 and span > 0 else 25.0
        # A truncated file can still decode cleanly up to the cut; compare with the container's
        # own frame count when it has one.
        declared = stream.frames
        if declared and count < declared * 0.9:
            raise BadMedia(f"only {count} of {declared} declared frames decode; the file is "
                           "truncated")
        duration = count / fps
        return VideoMeta(fps=fps, num_frames=count, width=width, height=height,
                         duration=duration, codec=stream.codec_context.name)
    finally:
        container.close()


def decode_frames(data: bytes, indices: Sequence[int], fps: float,
                  out_size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Frames at the given (sorted, unique) indices as RGB uint8 arrays (H, W, 3).

    Index i means the frame shown at time i / fps from the stream start. When `out_size`
    (width, height) is given, frames are scaled to it during the RGB conversion.
    """
    if not len(indices):
        return []
    container, stream = _open(data)
    try:
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        half = 0.5 / fps
        targets = [i / fps for i in indices]
        first_t = targets[0]
        if first_t > 1.0:
            # Seek lands on the keyframe at or before the target; decode forward from there.
            container.seek(int((start + first_t - half) / stream.time_base), stream=stream,
                           backward=True, any_frame=False)
        width, height = out_size if out_size else (None, None)
        out: list[np.ndarray] = []
        j = 0
        prev = None
        for frame in container.decode(stream):
            t = (frame.time if frame.time is not None else 0.0) - start
            # The first frame at or after (target - half a frame) is the one shown at target.
            while j < len(targets) and t >= targets[j] - half:
                out.append(_rgb(frame, width, height))
                j += 1
            if j == len(targets):
                break
            prev = frame
        if j < len(targets):
            if prev is None:
                raise BadMedia(f"no frames decoded for clip at indices {indices[0]}..{indices[-1]}")
            # Fewer frames than the stored count promised: repeat the last one rather than fail.
            last = out[-1] if out else _rgb(prev, width, height)
            out.extend(last for _ in range(len(targets) - j))
        return out
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadMedia(f"decoding failed ({exc.__class__.__name__}: {exc})") from None
    finally:
        container.close()


_reformatter: tuple[int, object] | None = None  # (pid, VideoReformatter)


def _rgb(frame, width, height) -> np.ndarray:
    """RGB uint8 (H, W, 3), scaled to (width, height) when given, in one swscale pass."""
    global _reformatter
    # One reformatter per process: `frame.reformat` builds a new swscale context (scaling
    # filters included) for every frame object, which costs more than the scaling itself.
    # Keyed by pid: a context inherited through fork (loader workers) can deadlock.
    # FAST_BILINEAR costs half of BILINEAR; it skips the pre-filter, so strong down-scaling
    # aliases a little, which random-crop training tolerates.
    if _reformatter is None or _reformatter[0] != os.getpid():
        from av.video.reformatter import VideoReformatter

        _reformatter = (os.getpid(), VideoReformatter())
    return _reformatter[1].reformat(frame, width=width, height=height, format="rgb24",
                                    interpolation="FAST_BILINEAR", threads=1).to_ndarray()


def probe_image(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) of an encoded image; BadMedia when it cannot be fully decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadMedia("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.width, img.height, (img.format or "unknown").lower()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadMedia(f"not a readable image ({exc.__class__.__name__}: {exc})") from None


def decode_image(data: bytes):
    """A PIL RGB image; BadMedia when the bytes are not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadMedia(f"not a readable image ({exc.__class__.__name__}: {exc})") from None
