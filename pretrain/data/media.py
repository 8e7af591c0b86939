"""Decoding encoded media with PyAV (video) and Pillow (images).

Video clips are decoded straight from the encoded bytes stored in the shards. Only the frames
a clip needs are converted to RGB, and the conversion does the resize in the same swscale pass,
which is much cheaper than converting at full size and resizing after:

- `decode_frames` (evaluation views, checks): whole frames at one output size
  (`VideoFrame.reformat`);
- `decode_crops` (training clips): each clip's random crop box is cut from the decoded frame
  (libavfilter's crop: pointer arithmetic, no copy), scaled to S x S in YUV, mirrored when
  the clip is flipped and converted to RGB, one filter graph per clip, written into the
  caller's array. Only the S x S pixels a clip keeps are ever converted: scaling whole frames so that
  the crop became S x S converted 2-6x more pixels (and most training crops zoom in), and
  cropping, flipping and reordering them afterwards cost numpy copies (a flipped copy of
  packed RGB is the slowest of them).

Determinism: `decode_frames` pixels depend only on (bytes, indices, fps, out_size), not on
the process, on earlier calls, or on timing: decoding is single-threaded and the one swscale
context per process runs with one thread and is reconfigured for each size (checked by
tests/test_data_determinism.py). `decode_crops` builds its filter graphs per call, with one
thread each, so its pixels depend only on its arguments too. They are bit-identical on the same CPU family and FFmpeg
build; FAST_BILINEAR's SIMD paths are not bit-exact across CPU families. Equal pixels from
two copies of a dataset also need equal bytes: see pretrain/data/synthetic.py for how
synthetic data is made reproducible.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Sequence

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


def _frames_at(data: bytes, indices: Sequence[int], fps: float) -> Iterator[tuple[int, object]]:
    """(position in `indices`, decoded frame) for each of the sorted, unique frame indices.

    Index i means the frame shown at time i / fps from the stream start: the first frame at
    or after (i / fps - half a frame). A stream that ends before the last index (fewer
    frames than the stored count promised) repeats the last frame it gave rather than fail.
    """
    container, stream = _open(data)
    try:
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        half = 0.5 / fps
        targets = [i / fps for i in indices]
        if targets[0] > 1.0:
            # Seek lands on the keyframe at or before the target; decode forward from there.
            container.seek(int((start + targets[0] - half) / stream.time_base), stream=stream,
                           backward=True, any_frame=False)
        j = 0
        last = prev = None  # the last frame yielded, the last frame decoded
        for frame in container.decode(stream):
            t = (frame.time if frame.time is not None else 0.0) - start
            while j < len(targets) and t >= targets[j] - half:
                yield j, frame
                last = frame
                j += 1
            if j == len(targets):
                return
            prev = frame
        if prev is None:
            raise BadMedia(f"no frames decoded for clip at indices {indices[0]}..{indices[-1]}")
        for k in range(j, len(targets)):
            yield k, last if last is not None else prev
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
    width, height = out_size if out_size else (None, None)
    try:
        return [_rgb(frame, width, height) for _, frame in _frames_at(data, indices, fps)]
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadMedia(f"decoding failed ({exc.__class__.__name__}: {exc})") from None


@dataclass(frozen=True)
class Crop:
    """One training clip to cut from a decode: `indices` (T frame indices, any order, repeats
    allowed), `box` (x, y, w, h) in stored pixels, mirrored when `flip`."""

    indices: Sequence[int]
    box: tuple[int, int, int, int]
    flip: bool


def decode_crops(data: bytes, fps: float, crops: Sequence[Crop], size: int,
                 out: np.ndarray) -> None:
    """Decode the union of the crops' frames once and write clip j's frame t, its box scaled
    to size x size in RGB, into out[j, t]: `out` is uint8 (len(crops), T, size, size, 3).

    Frame indices follow `decode_frames`. Each clip has its own filter graph
    (crop -> scale -> hflip -> rgb24, one thread): the crop selects the box without copying,
    so only the size x size output pixels are scaled and converted.
    """
    where: dict[int, list[tuple[int, int]]] = {}  # frame index -> [(clip, t)]
    for j, crop in enumerate(crops):
        for t, i in enumerate(crop.indices):
            where.setdefault(int(i), []).append((j, t))
    unique = sorted(where)
    if not unique:
        return
    graphs: list = [None] * len(crops)
    try:
        for pos, frame in _frames_at(data, unique, fps):
            for j, t in where[unique[pos]]:
                if graphs[j] is None:
                    graphs[j] = _crop_graph(frame, crops[j], size)
                dst = out[j, t]
                if not dst.flags.writeable:
                    raise ValueError("decode_crops needs a writable output array")
                graphs[j].push(frame)
                _copy_rgb(graphs[j].vpull(), dst)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadMedia(f"decoding failed ({exc.__class__.__name__}: {exc})") from None


def _crop_graph(frame, crop: Crop, size: int):
    import av.filter

    x, y, w, h = crop.box
    graph = av.filter.Graph()
    graph.threads = 1  # one process per core: no slice threads on top
    # Scale in YUV 4:2:0, then convert to RGB unscaled: swscale's scaling RGB output is
    # its slow path; this way costs less than converting the whole stored frame (measured
    # 6-9 vs 12 ms per 32 frames of a 456x256 source, 224 crops). FAST_BILINEAR, as `_rgb`:
    # half of BILINEAR's cost; random-crop training tolerates its slight aliasing on strong
    # down-scaling. The flip runs on the scaled planes, before the conversion.
    nodes = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                              time_base=frame.time_base or Fraction(1, 1000)),
             graph.add("crop", f"{w}:{h}:{x}:{y}:exact=1"),
             graph.add("scale", f"{size}:{size}:flags=fast_bilinear:threads=1"),
             graph.add("format", "yuv420p")]
    if crop.flip:
        nodes.append(graph.add("hflip"))
    nodes += [graph.add("format", "rgb24"), graph.add("buffersink")]
    graph.link_nodes(*nodes).configure()
    return graph


def _copy_rgb(frame, dst: np.ndarray) -> None:
    """An rgb24 frame's pixels into dst (H, W, 3), one copy (rows padded to line_size)."""
    plane = frame.planes[0]
    h, w = dst.shape[:2]
    rows = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)
    np.copyto(dst, rows[:, :w * 3].reshape(h, w, 3))


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
