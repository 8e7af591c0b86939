"""`pretrain checkpoints list URI [--json]`: the checkpoints under a run's checkpoint URI.

One row per step folder: step, commit time, size, world size, ZeRO stage, whether it is
committed, and for folders that cannot be loaded, why (no commit record, missing file,
size or checksum mismatch, corrupt manifest). Content is checked by default, cheaply
(checkpoints.integrity: the store's own crc32c, or one read of a local file); `--verify`
reads every byte and compares sha256; `--sizes-only` skips the content check.
"""
from __future__ import annotations

import datetime
import json

HELP = "Inspect sharded checkpoints in object storage (sub-verb: list)."


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="checkpoints_verb", metavar="SUBVERB")
    sub.required = True
    p = sub.add_parser("list", help="list checkpoints under URI (local folder or fsspec URI such as gs://bucket/run)",
                       description="List checkpoints under URI: step, time, size, world size, ZeRO "
                                   "stage, committed, and what is wrong with unloadable ones.")
    p.add_argument("uri", metavar="URI", help="checkpoint root (the run's checkpoint.uri)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--verify", "--verify-checksums", dest="verify", action="store_const",
                       const="full", default="checksum",
                       help="read every file and check its sha256 against the manifest (reads "
                            "all bytes; by default content is checked by crc32c, from the "
                            "store's metadata where it keeps one)")
    level.add_argument("--sizes-only", dest="verify", action="store_const", const="size",
                       help="check only that the files exist with the recorded sizes")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def run(args) -> int:
    from checkpoints.discovery import list_checkpoints

    infos = list_checkpoints(args.uri, verify=args.verify)
    rows = [i.summary() for i in infos]
    latest = next((i.uri for i in reversed(infos) if i.loadable), None)
    if args.json:
        print(json.dumps({"uri": args.uri, "verify": args.verify, "checkpoints": rows,
                          "latest_committed": latest}))
        return 0
    if not rows:
        print(f"no checkpoints under {args.uri}")
        return 0
    print(f"{'step':>10}  {'time (UTC)':<19}  {'size':>9}  {'world':>5}  {'stage':>5}  committed")
    for r in rows:
        when = (datetime.datetime.fromtimestamp(r["time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                if r["time"] else "-")
        state = "yes" if r["loadable"] else ("damaged" if r["committed"] else "no")
        print(f"{r['step']:>10}  {when:<19}  {_size(r['size_bytes']):>9}  {r['world_size'] or '-':>5}  "
              f"{'-' if r['zero_stage'] is None else r['zero_stage']:>5}  {state}")
        for problem in r["problems"]:
            print(f"{'':>12}! {problem}")
    print(f"latest committed: {latest or 'none'}")
    return 0
