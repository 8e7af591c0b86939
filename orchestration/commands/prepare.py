"""`pretrain prepare video|image|synthetic`: write MDS shards plus a label map.

    pretrain prepare video --manifest FILE.csv --out URI [--dataset kinetics400]
    pretrain prepare image --manifest FILE.csv --out URI      (or --folder DIR/<class>/<file>)
    pretrain prepare video --manifest FILE.csv --out gs://... --ray [--address HOST:PORT]
    pretrain prepare synthetic --out URI --videos N --images M

Videos and images are stored re-encoded for training (videos: H.264, short side 256, at most
15 fps, closed GOPs of 16 frames, no B-frames; images: JPEG, short side at most 320; the
reasons and measured figures are in pretrain/data/transcode.py); --keep-original stores the
input files' bytes instead. Synthetic data is stored as generated.

URI is a local path or any fsspec URI (gs://, s3://, file://). Unusable inputs are skipped and
listed with their reason (also in URI/prepare_report.json); the exit code is 1 only when
nothing could be written. Re-running into the same URI replaces what differs (shards are
compared by content) and removes shards the new run does not write.

The manifest's label column may be missing or have empty cells: those inputs are stored
unlabelled (label -1), for masked pretraining. Paths with a URL scheme (http://, gs://, ...)
are refused unless --allow-scheme names the scheme; inputs outside the manifest's folder are
named in the summary and the report.

--ray runs the check/re-encode/write phases as Ray tasks on the cluster at RAY_ADDRESS (or
--address), --chunk-size inputs per task, each chunk a part folder of URI (see
pretrain/data/prepare_ray.py); the same command again resumes, keeping finished chunks.
"""
from __future__ import annotations

import json
import os

HELP = "write image/video MDS shards (+ label map) from a CSV manifest, a class folder, or synthetic demo data"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND")
    sub.required = True
    for kind in ("video", "image"):
        p = sub.add_parser(kind, help=f"{kind} files listed in a CSV (path,label) or in class "
                                      "subfolders", description=f"Shard {kind} files.")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--manifest", help="CSV with a header holding at least path, usually "
                                            "label (paths absolute or relative to the CSV's "
                                            "folder; a missing or empty label: unlabelled)")
        src.add_argument("--folder", help="folder with one subfolder per class")
        p.add_argument("--out", required=True, help="output folder: local path or fsspec URI")
        p.add_argument("--dataset", help=f"dataset (head) name stored with the shards, e.g. "
                                         f"{'kinetics400' if kind == 'video' else 'imagenet'} "
                                         f"(default: {kind})")
        p.add_argument("--labels", help="reuse this label map (labels.json or a prepared dataset "
                                        "folder), e.g. the train split's when preparing val")
        p.add_argument("--workers", type=int, help="parallel checking processes (default: cores)")
        p.add_argument("--shard-size", default="64mb", help="shard size limit (default 64mb)")
        p.add_argument("--keep-original", action="store_true",
                       help="store the input files' bytes as they are instead of the training "
                            "format (" + ("H.264, short side <= 256, <= 15 fps, GOP 16, no "
                                          "B-frames" if kind == "video" else
                                          "JPEG quality 90, short side <= 320") + ")")
        if kind == "video":
            p.add_argument("--min-frames", type=int, default=1,
                           help="skip videos with fewer frames as stored (shorter clips loop; "
                                "default 1)")
            p.add_argument("--no-hflip", action="store_true",
                           help="mark labels as direction-sensitive: loaders never flip them")
        p.add_argument("--work-dir", help="staging folder (default under ~/.cache/tubevit); "
                                          "a re-run with the same one resumes")
        p.add_argument("--manifest-encoding", default="utf-8",
                       help="text encoding of the manifest (default utf-8; e.g. latin-1, cp1252)")
        p.add_argument("--allow-scheme", action="append", default=[], metavar="SCHEME",
                       help="read manifest paths with this URL scheme through fsspec (e.g. gs, "
                            "s3, http; repeatable); refused otherwise")
        p.add_argument("--ray", action="store_true",
                       help="run on the Ray cluster at RAY_ADDRESS or --address, one task per "
                            "chunk; --out must be reachable from every node (gs://, or a shared "
                            "filesystem)")
        p.add_argument("--address", help="with --ray: the cluster's address (default RAY_ADDRESS)")
        p.add_argument("--chunk-size", type=int, default=64,
                       help="with --ray: inputs per task (default 64)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p = sub.add_parser("synthetic", help="demo data: moving-shape clips classed by motion "
                                         "direction, static-shape images",
                       description="Write ROOT/video/{train,val} and ROOT/image/{train,val}.")
    p.add_argument("--out", required=True, help="root folder or fsspec URI")
    p.add_argument("--videos", type=int, default=800, help="train videos (val: a quarter more)")
    p.add_argument("--images", type=int, default=800, help="train images (val: a quarter more)")
    p.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    p.add_argument("--size", type=int, default=64, help="pixels per side (default 64, even)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-style", choices=("random", "bright"), default="random",
                   help="random: a shape of any colour on any background; bright: a large "
                   "bright shape on a dark background (what configs/smoke.yaml trains on)")
    p.add_argument("--video-style", choices=("random", "bright"), default="random",
                   help="random: a small shape of any colour on any background, slow; bright: a "
                   "larger bright shape on a dark background, faster (what configs/smoke.yaml "
                   "trains on)")
    p.add_argument("--workers", type=int, help="parallel processes (default: cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def run(args) -> int:
    from pretrain.errors import UserError

    if args.kind == "synthetic":
        from pretrain.data.synthetic import prepare_synthetic

        if args.videos < 0 or args.images < 0 or args.videos + args.images == 0:
            raise UserError("prepare synthetic: --videos and --images must be >= 0 and not both 0")
        if args.size % 2 or args.size < 16:
            raise UserError(f"prepare synthetic: --size {args.size} must be even and >= 16 "
                            "(h264 with yuv420p needs even sizes)")
        results = prepare_synthetic(args.out, args.videos, args.images, seed=args.seed,
                                    frames=args.frames, size=args.size, workers=args.workers,
                                    progress=not args.no_progress, image_style=args.image_style,
                                    video_style=args.video_style)
    else:
        from pretrain.data.prepare import prepare_from_manifest
        from pretrain.data.shards import read_labels

        labels = read_labels(args.labels) if args.labels else None
        extra = {}
        if args.kind == "video":
            extra = {"min_frames": args.min_frames, "hflip_ok": not args.no_hflip}
        if args.address and not args.ray:
            raise UserError("prepare: --address is the Ray cluster of --ray; pass --ray too")
        connected = _connect_ray(args.address) if args.ray else False
        try:
            result = prepare_from_manifest(
                args.kind, args.manifest, args.folder, args.out, dataset=args.dataset,
                labels=labels, workers=args.workers, work_dir=args.work_dir,
                shard_size=args.shard_size, progress=not args.no_progress,
                keep_original=args.keep_original, manifest_encoding=args.manifest_encoding,
                allow_schemes=args.allow_scheme, ray=args.ray, chunk_size=args.chunk_size,
                **extra)
        finally:
            if connected:
                import ray

                ray.shutdown()
        results = {args.kind: result}
    for r in results.values():
        print(r.summary())
    written = sum(r.written for r in results.values())
    if args.json:
        print(json.dumps({"written": written,
                          "skipped": sum(len(r.skipped) for r in results.values()),
                          "datasets": {k: r.to_json() for k, r in results.items()}}))
    return 0 if written else 1


_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # orchestration.driver.LOOPBACK_ONLY_ENV


def _connect_ray(address: str | None) -> bool:
    """Connect this process to the cluster at `address` or RAY_ADDRESS; True when it did
    (False: it already was)."""
    from orchestration import ray_env
    from pretrain.errors import UserError

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("prepare --ray runs on a Ray cluster: set RAY_ADDRESS or pass --address "
                        "HOST:PORT (the address `ray start --head` printed)")
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        # A head on loopback (started with orchestration.driver.LOOPBACK_ONLY_ENV=0): Ray
        # would otherwise swap 127.0.0.1 for this machine's external address, where nothing
        # listens. Ray reads it when imported, hence set first, and named here because
        # importing orchestration.driver imports ray.
        os.environ.setdefault(_LOOPBACK_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False,
                 runtime_env=ray_env.runtime_env({}, pass_env=ray_env.WORKER_PASS_ENV))
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"prepare --ray: cannot join a Ray cluster at '{address}' "
                        f"({exc.__class__.__name__}: {str(exc).strip().splitlines()[0]}); "
                        "check --address / RAY_ADDRESS and that the head is up") from None
    return True
