"""The `data` section of the experiment config: which shards to stream and how to sample them.

Dataset URIs are local folders or fsspec URIs (gs://, s3://, file://) of folders written by
`pretrain prepare` (MDS shards + `labels.json`). A modality whose train URI is None is off.
Synthetic demo data (`pretrain prepare synthetic`) lives under one root with the layout
ROOT/video/train, ROOT/video/val, ROOT/image/train, ROOT/image/val.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pretrain.config_loader import config_field
from pretrain.errors import UserError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'10gb' -> 10_000_000_000; '512MiB' -> 536870912; a bare number is bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UserError(f"size '{text}' is not understood; write a number with an optional unit, "
                        "e.g. '500mb', '10gb', '2GiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass
class SyntheticConfig:
    """Demo data made on the fly when the configured URIs do not exist yet."""

    prepare_if_missing: bool = config_field(
        False, "if the dataset URIs under `root` are missing, write synthetic data there first")
    root: str | None = config_field(
        None, "root URI of the synthetic layout (ROOT/video/train, ROOT/video/val, "
        "ROOT/image/train, ROOT/image/val); the dataset URIs should point inside it")
    videos: int = config_field(800, "train videos to make", min=0)
    images: int = config_field(800, "train images to make", min=0)
    frames: int = config_field(32, "frames per synthetic video", min=2)
    size: int = config_field(64, "height and width of synthetic media in pixels", min=16)
    seed: int = config_field(0, "seed of the synthetic generator")
    image_style: str = config_field(
        "random", "synthetic images: random (any colours, sizes, places) or bright (a bright "
        "shape on a dark background, large and centred: learnable by a tiny ViT in a short "
        "demo; see pretrain/data/synthetic.py) or mono (bright in grey: no colour)",
        choices=("random", "bright", "mono"))
    video_style: str = config_field(
        "random", "synthetic videos: random (a small shape of any colour on any background, "
        "slow) or bright (a larger bright shape on a dark background, moving faster: learnable "
        "by a tiny ViT in a short demo; see pretrain/data/synthetic.py) or mono (bright in "
        "grey: no colour for a kNN monitor to read)",
        choices=("random", "bright", "mono"))


@dataclass
class DataConfig:
    """Shards to stream, how clips and images are sampled, and how modalities are mixed."""

    video_uri: str | None = config_field(
        None, "train video shards (folder written by `pretrain prepare video|synthetic`), local "
        "path or fsspec URI; None turns video off")
    video_eval_uri: str | None = config_field(
        None, "held-out video shards for eval (multi-view); None skips video eval")
    image_uri: str | None = config_field(
        None, "train image shards (folder written by `pretrain prepare image|synthetic`); None "
        "turns images off")
    image_eval_uri: str | None = config_field(
        None, "held-out image shards for eval; None skips image eval")
    video_dataset: str | None = config_field(
        None, "head name for the video dataset (e.g. kinetics400); None uses the name stored "
        "with the shards")
    image_dataset: str | None = config_field(
        None, "head name for the image dataset (e.g. imagenet); None uses the name stored with "
        "the shards")
    cache_dir: str = config_field(
        "~/.cache/tubevit/shards", "local cache for shards streamed from remote URIs (one "
        "subfolder per URI)")
    cache_limit: str | None = config_field(
        "20gb", "evict cached shards above this size per dataset (e.g. '10gb'); None keeps all")
    frames: int = config_field(16, "frames per training clip (T)", min=1)
    size: int = config_field(112, "clip height and width after cropping", min=16)
    frame_stride: int = config_field(
        2, "take every k-th decoded frame (ignored when `fps` is set)", min=1)
    fps: float | None = config_field(
        None, "sample clips at this frame rate instead of a fixed stride (e.g. 15)", min=0.1)
    image_size: int = config_field(224, "image height and width after cropping", min=16)
    video_ratio: float = config_field(
        0.5, "share of training steps that are video batches (the rest are image batches)",
        min=0.0, max=1.0)
    batch_size: int = config_field(8, "video clips per micro batch per worker (rank)", min=1)
    clips_per_video: int = config_field(
        1, "training clips cut from one decode of a video (repeated sampling, as in MAE-ST and "
        "VideoMAE V2): each clip has its own start inside a window of at most two clip spans and "
        "its own crop and flip, so a batch of batch_size clips comes from batch_size / "
        "clips_per_video videos (must divide batch_size). Benefit: the decode, the costliest "
        "part of loading, is paid once per k clips (near k x the clips per core). Cost: k x fewer "
        "distinct videos per batch (an epoch, every video once, is k x more steps), and a "
        "resize of each clip's crop for all but one clip per video. Eval ignores it", min=1)
    image_batch_size: int | None = config_field(
        None, "images per micro batch per rank; None uses batch_size", min=1)
    eval_batch_size: int = config_field(
        4, "clips (each with all its views) or images per eval batch per rank", min=1)
    num_workers: int = config_field(
        2, "decoding processes per rank and modality (0 decodes in the training process). Capped "
        "so that all local ranks' loader processes fit the machine's cores: each rank then gets "
        "cores // local ranks, split by the modalities' step shares (a modality left with 0 "
        "decodes in the training process)", min=0)
    video_crop_scale: float = config_field(
        0.4, "smallest area share of a random spatial crop of a training clip", min=0.01, max=1.0)
    image_crop_scale: float = config_field(
        0.08, "smallest area share of a random resized crop of a training image",
        min=0.01, max=1.0)
    hflip: bool = config_field(
        True, "random horizontal flips (never applied to datasets whose labels are "
        "direction-sensitive, e.g. the synthetic motion classes)")
    randaugment: bool = config_field(False, "RandAugment on training images")
    randaugment_ops: int = config_field(2, "RandAugment ops per image", min=1)
    randaugment_magnitude: int = config_field(10, "RandAugment magnitude (0-30)", min=0, max=30)
    shuffle_seed: int | None = config_field(
        None, "seed of the shard shuffle and of the modality mix; None uses the run seed")
    num_canonical_nodes: int | None = config_field(
        None, "streaming's canonical node count; fixes the global sample order across world "
        "sizes (None: streaming's default for the first run, then kept in the loader state)",
        min=1)
    eval_temporal_views: int = config_field(
        4, "temporal views per eval clip (uniformly spaced)", min=1)
    eval_spatial_views: int = config_field(
        3, "spatial views per eval clip (crops along the long side)", min=1)
    eval_frame_average: bool = config_field(
        False, "evaluate video frame by frame: every frame through the model as an image, the "
        "per-frame softmax averaged (the single-frame baseline; image-capable models only)")
    synthetic: SyntheticConfig = config_field(
        help="synthetic demo data made when missing", factory=SyntheticConfig)

    @property
    def image_micro_batch(self) -> int:
        return self.image_batch_size or self.batch_size

    def validate(self) -> None:
        if self.video_uri is None and self.image_uri is None:
            raise UserError("data: neither data.video_uri nor data.image_uri is set; set at least "
                            "one to a folder written by `pretrain prepare`")
        if self.cache_limit is not None:
            parse_bytes(self.cache_limit)
        if self.video_uri is not None and self.batch_size % self.clips_per_video:
            raise UserError(f"data.batch_size={self.batch_size} is not divisible by "
                            f"data.clips_per_video={self.clips_per_video}: a batch holds whole "
                            "videos' clips; make data.batch_size a multiple of "
                            "data.clips_per_video")
        if self.synthetic.prepare_if_missing and not self.synthetic.root:
            raise UserError("data.synthetic.prepare_if_missing is true but data.synthetic.root is "
                            "not set; set it to the folder/URI the dataset URIs point into")
