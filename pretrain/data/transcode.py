"""Training-ready storage: what `pretrain prepare video|image` stores instead of the originals.

Videos as uploaded (x264 with a GOP of 250 and B-frames, 360p-1080p, 24-60 fps) make every
training clip seek to a keyframe up to ~8 s back and decode forward at full resolution.
Prepare therefore re-encodes each video once, in the pass that checks it
(`media.probe_video(on_frame=...)`), to `VIDEO`:

- short side 256 (never upscaled): training crops are 224 px and eval resizes the short side
  to 256 (224 / 0.875); a larger stored frame is decoded and thrown away on every clip.
- at most 15 fps (never raised): the configs that train on real video sample clips at
  `data.fps: 15` (32 frames = 2.1 s), so a 30 fps source's every other frame was decoded
  only to be skipped.
- closed GOPs of 16 frames (about 1 s at 15 fps), no scene-cut keyframes, no B-frames: a
  clip's decode starts at most 15 frames before its first frame (half a 32-frame clip), and
  frames come out of the decoder in order, with no delay. Measured (below, 640x360 source):
  GOP 8 stores 40% more bytes (0.221 vs 0.158 GB/hour) for ~10% more clips/s (24.8 vs
  22.2); GOP 32 saves 22% (0.124) for ~17% fewer clips/s (18.5).
- H.264 from the libx264 in PyAV's wheels, `tune=fastdecode` (no CABAC, no deblocking
  filter, no weighted prediction: the decoder's costliest steps), yuv420p, CRF 23 (the
  CRF trade is below), preset veryfast (transcoding costs 0.05-0.1 CPU s per second of
  video, less than the check's full decode of a 720p source).
- deterministic: one encoder thread, fixed options, bitexact container flags, frames
  scaled on one thread, x264's AVX-512 routines off (`_x264_asm_cap`); the same input
  gives the same bytes (tests/test_data_transcode.py).
  The synthetic demo data keeps its own encoder and its original bytes (synthetic.py).

Images go to `IMAGE`: short side at most 320 (never upscaled) and JPEG at quality 90 with
4:2:0 chroma. Eval resizes the short side to 256 and training crops to 224: 320 keeps a
whole-frame crop a downscale and a crop of half the short side within 1.4x of 224. The
image choice is not measured here: images decode an order of magnitude faster than clips.

Clip timing: the stored stream is re-timed onto a constant grid k / fps_out, and output frame
k is the source frame shown at that time (the first one at or after k / fps_out minus half a
source frame: the rule `media.decode_frames` applies to stored indices). The stored fps,
frame count and duration are those of the stored stream, so with `data.fps` set a clip
covers the same seconds as it did on the original. `data.frame_stride` counts stored frames:
a 30 fps source stored at 15 fps with stride 2 spans twice the seconds it did before; sample
real video with `data.fps` (as configs/*.yaml do), or keep the originals (`--keep-original`).

Measured on a 2-core machine shared with other work (clip rates vary by about 20% from run
to run), with `python -c "from pretrain.data.transcode import measure; measure()"`: 10 s,
30 fps sources made with PyAV and x264 defaults (preset medium, CRF 23, GOP 250, B-frames)
of a camera panning over a textured scene (static grain of sigma 10 levels, hard to
compress) with two objects moving across it; training clips of 32 frames at 15 fps (stride
2 at 30 fps), random crop resized to 224 by `samples.train_clip`, 30 clips per figure:

    source     stored       GB/hour orig -> stored  PSNR at stored size  clips/s/core orig -> stored  transcode
    640x360    456x256@15   0.232 -> 0.158          33.8 dB              7.3 -> 22.2 (3.0x)          0.05 CPU s per s
    1280x720   456x256@15   0.717 -> 0.183          31.6 dB              2.3 -> 20.1 (8.6x)          0.10 CPU s per s

PSNR is over RGB, against the source frame shown at the same time scaled to the stored size
with the same (area) scaler; the grain costs most of it (CRF 20: 34.7 dB at 0.249 GB/hour,
CRF 26: 32.8 dB at 0.104, on the 640x360 source). Uploads from real cameras carry more bits
than these sources (1-5 Mbit/s at 720p is 0.45-2.3 GB/hour), so the stored format saves
more there; the stored rate depends on the content, not on the source's bit rate.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from pretrain.data.media import BadMedia, VideoMeta, decode_image, probe_video


@dataclass(frozen=True)
class VideoFormat:
    """How prepare re-encodes videos (see the module docstring for the numbers' reasons)."""

    short_side: int = 256
    max_fps: float = 15.0
    gop: int = 16
    crf: int = 23
    preset: str = "veryfast"

    def describe(self) -> str:
        return (f"h264 short side <= {self.short_side}, <= {self.max_fps:g} fps, closed GOP "
                f"{self.gop}, no B-frames, tune fastdecode, crf {self.crf}, preset "
                f"{self.preset}, yuv420p")


@dataclass(frozen=True)
class ImageFormat:
    short_side: int = 320
    quality: int = 90

    def describe(self) -> str:
        return f"jpeg short side <= {self.short_side}, quality {self.quality}"


VIDEO = VideoFormat()
IMAGE = ImageFormat()
ORIGINAL = "original bytes"  # what the report says when nothing is re-encoded


class EncodeError(Exception):
    """The encoder failed on frames that decoded fine (not the input's fault)."""


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the short side scaled down to `short_side` (never up), both even."""
    short = min(width, height)
    scale = short_side / short if short > short_side else 1.0
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    if scale == 1.0:  # keep the source pixels; only drop an odd last row/column
        w, h = max(2, width - width % 2), max(2, height - height % 2)
    return w, h


def _x264_asm_cap() -> str:
    """x264's option capping its routines at AVX2 on a CPU with AVX-512, else ''.

    The libx264 of PyAV's wheels (core 165) gives different bytes for one input from run to
    run when it uses its AVX-512 routines: on an AMD EPYC with AVX-512 (2026-11-30) the same
    video transcoded three times in one process differed in about one run of three, and two
    prepares of the test codec zoo differed in most runs; capped at AVX2, none did in 16
    runs, at no measurable speed cost. Other CPUs (no AVX-512, or not x86) keep what x264
    detects. Linux's /proc/cpuinfo says whether the CPU has AVX-512; elsewhere nothing is
    capped."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return ""
    return ":asm=AVX2" if "avx512f" in flags and "avx2" in flags else ""


_X264_ASM = _x264_asm_cap()


class _Encoder:
    """Fed every decoded source frame in display order; writes the stored mp4."""

    def __init__(self, fmt: VideoFormat):
        self.fmt = fmt
        self.buf = io.BytesIO()
        self.container = None
        self.stream = None
        self.count = 0  # stored frames written
        self.seen = 0  # source frames received
        self.first_time: float | None = None

    def _start(self, frame, stream_fps: float) -> None:
        from av.video.reformatter import VideoReformatter

        cap = Fraction(self.fmt.max_fps).limit_denominator(1001)
        src = Fraction(stream_fps).limit_denominator(1001) if stream_fps > 0 else cap
        self.rate = min(src, cap)
        self.src_fps = float(src)
        self.width, self.height = output_size(frame.width, frame.height, self.fmt.short_side)
        self.container = av.open(self.buf, mode="w", format="mp4",
                                 options={"fflags": "+bitexact"})
        stream = self.container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.codec_context.thread_count = 1
        g = self.fmt.gop
        stream.options = {
            "preset": self.fmt.preset, "tune": "fastdecode", "crf": str(self.fmt.crf),
            "flags": "+bitexact",
            "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0:bframes=0:open-gop=0:"
                           "threads=1:sliced-threads=0:lookahead-threads=1" + _X264_ASM,
        }
        self.stream = stream
        self.scaler = VideoReformatter()

    def __call__(self, frame, stream_fps: float) -> None:
        if self.stream is None:
            self._start(frame, stream_fps)
        t = frame.time if frame.time is not None else self.seen / self.src_fps
        if self.first_time is None:
            self.first_time = t
        t -= self.first_time
        self.seen += 1
        half = 0.5 / self.src_fps
        scaled = None
        # Stored frame k shows time k / rate: the first source frame at or after it (less
        # half a source frame), as decode_frames picks stored indices.
        while float(self.count / self.rate) <= t + half:
            if scaled is None:
                scaled = self.scaler.reformat(frame, width=self.width, height=self.height,
                                              format="yuv420p", interpolation="AREA", threads=1)
            scaled.pts = self.count
            scaled.time_base = 1 / self.rate
            self._mux(self.stream.encode(scaled))
            self.count += 1

    def _mux(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)

    def finish(self) -> bytes:
        try:
            self._mux(self.stream.encode())
            self.container.close()
        except av.FFmpegError as exc:
            raise EncodeError(f"encoding failed ({exc.__class__.__name__}: {exc})") from None
        return self.buf.getvalue()


def transcode_video(data: bytes, fmt: VideoFormat = VIDEO) -> tuple[bytes, VideoMeta]:
    """Check the video (`probe_video`: BadMedia when unusable) and re-encode it in the same
    decode pass. Returns the stored bytes and their metadata (fps, frames, size, duration of
    the stored stream)."""
    stored, meta, _ = transcode_video_and_probe(data, fmt)
    return stored, meta


def transcode_video_and_probe(data: bytes,
                              fmt: VideoFormat = VIDEO) -> tuple[bytes, VideoMeta, VideoMeta]:
    """`transcode_video` plus the metadata of the original (its fps is what frame strides
    count in)."""
    enc = _Encoder(fmt)

    def on_frame(frame, stream_fps):
        try:
            enc(frame, stream_fps)
        except av.FFmpegError as exc:  # not a decode error: keep probe_video from calling it one
            raise EncodeError(f"encoding failed ({exc.__class__.__name__}: {exc})") from None

    source = probe_video(data, on_frame=on_frame)
    out = enc.finish()
    fps = float(enc.rate)
    return out, VideoMeta(fps=fps, num_frames=enc.count, width=enc.width, height=enc.height,
                          duration=enc.count / fps, codec="h264"), source


def transcode_image(data: bytes, fmt: ImageFormat = IMAGE) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height): the image decoded fully (BadMedia when it cannot be),
    its short side scaled down to fmt.short_side (never up)."""
    from PIL import Image

    if not data:
        raise BadMedia("empty file")
    img = decode_image(data)
    short = min(img.width, img.height)
    if short > fmt.short_side:
        scale = fmt.short_side / short
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC, reducing_gap=None)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=fmt.quality, subsampling="4:2:0", optimize=False)
    return buf.getvalue(), img.width, img.height


# ----------------------------------------------------------------------------- measuring


def camera_like_source(width: int, height: int, fps: int = 30, seconds: float = 10.0,
                       seed: int = 0) -> bytes:
    """An mp4 encoded as uploads are (x264 defaults: preset medium, GOP 250, B-frames) of a
    camera panning over a textured scene with two objects moving across it."""
    rng = np.random.default_rng(seed)
    # Scene: smooth colour blobs plus fine texture, twice the frame width to pan across.
    sh, sw = height, width * 2
    coarse = rng.integers(0, 256, (sh // 32 + 2, sw // 32 + 2, 3)).astype(np.float32)
    yy = np.linspace(0, coarse.shape[0] - 1.001, sh)
    xx = np.linspace(0, coarse.shape[1] - 1.001, sw)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
    c = coarse
    scene = ((1 - fy) * ((1 - fx) * c[y0][:, x0] + fx * c[y0][:, x0 + 1])
             + fy * ((1 - fx) * c[y0 + 1][:, x0] + fx * c[y0 + 1][:, x0 + 1]))
    scene = np.clip(scene + rng.normal(0, 10, scene.shape), 0, 255).astype(np.uint8)
    n = int(round(fps * seconds))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(n):
            pan = int(round((sw - width) * 0.5 * (1 - np.cos(np.pi * t / n))))
            img = scene[:, pan:pan + width].copy()
            for k, colour in enumerate(((230, 40, 40), (40, 40, 230))):
                r = height // 8
                cx = int((t * (4 + 3 * k) + width * k / 2) % width)
                cy = int(height / 2 + height / 4 * np.sin(t / (15 + 10 * k)))
                img[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = colour
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _all_rgb(data: bytes, size: tuple[int, int]) -> list[np.ndarray]:
    from av.video.reformatter import VideoReformatter

    scaler = VideoReformatter()
    with av.open(io.BytesIO(data)) as c:
        return [scaler.reformat(f, width=size[0], height=size[1], format="rgb24",
                                interpolation="AREA", threads=1).to_ndarray()
                for f in c.decode(video=0)]


def psnr_at_training_size(original: bytes, stored: bytes, meta: VideoMeta,
                          src_fps: float) -> float:
    """PSNR (dB, RGB) of the stored frames against the source frames shown at the same
    times, the source scaled to the stored size with the same scaler."""
    size = (meta.width, meta.height)
    ref = _all_rgb(original, size)
    got = _all_rgb(stored, size)
    half = 0.5 / src_fps
    mse = []
    for k, frame in enumerate(got):
        i = min(len(ref) - 1, int(np.ceil((k / meta.fps - half) * src_fps - 1e-9)))
        mse.append(np.mean((frame.astype(np.float64) - ref[i]) ** 2))
    return float(10 * np.log10(255 ** 2 / max(np.mean(mse), 1e-12)))


def clips_per_core_second(data: bytes, meta: VideoMeta, clips: int = 12, seed: int = 0) -> float:
    """Training clips (32 frames at 15 fps, random 224 crop, `samples.train_clip`) per CPU
    second on one core."""
    import time

    from pretrain.data.samples import ClipSpec, sample_rng, train_clip

    spec = ClipSpec(frames=32, size=224, stride=2, fps=15.0, crop_scale=0.4, hflip=True)
    raw = {"video": data, "fps": meta.fps, "num_frames": meta.num_frames,
           "width": meta.width, "height": meta.height}
    train_clip(raw, spec, sample_rng(seed, 0, -1))  # warm up (reformatter, code paths)
    t0 = time.process_time()
    for i in range(clips):
        train_clip(raw, spec, sample_rng(seed, 0, i))
    return clips / (time.process_time() - t0)


def measure(shapes=((640, 360), (1280, 720)), fmt: VideoFormat = VIDEO, seconds: float = 10.0,
            fps: int = 30, clips: int = 30) -> list[dict]:
    """The figures in the module docstring: per source shape, bytes per hour of video
    (original and stored), PSNR at the stored size, clips/s per core, transcode seconds."""
    import time

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for w, h in shapes:
        orig = camera_like_source(w, h, fps, seconds)
        src = probe_video(orig)
        t0 = time.process_time()
        stored, meta = transcode_video(orig, fmt)
        cost = time.process_time() - t0
        hours = src.duration / 3600
        row = {"source": f"{w}x{h}@{fps}", "stored": f"{meta.width}x{meta.height}@{meta.fps:g}",
               "gb_per_hour_original": len(orig) / hours / 1e9,
               "gb_per_hour_stored": len(stored) / hours / 1e9,
               "psnr_db": psnr_at_training_size(orig, stored, meta, src.fps),
               "clips_per_s_per_core_original": clips_per_core_second(orig, src, clips),
               "clips_per_s_per_core_stored": clips_per_core_second(stored, meta, clips),
               "transcode_cpu_s_per_video_s": cost / src.duration}
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
    return rows
