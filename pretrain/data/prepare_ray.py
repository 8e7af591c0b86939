"""`pretrain prepare video|image --ray`: the same prepare, as Ray tasks on a cluster.

    result = prepare_on_ray("video", items, "gs://bucket/k400/train", chunk_size=64)

The caller has connected this process to the cluster (`ray.init`; the CLI does it with
RAY_ADDRESS or --address). The manifest is cut into chunks of `chunk_size` rows, in order;
each chunk is one Ray task (one CPU) running `prepare.prepare_part`: it checks and
re-encodes its inputs, writes their shards and publishes them as the part folder
OUT/part-NNNNN (its own index.json last). This process then merges the parts' indexes into
OUT/index.json (mosaicml-streaming's `merge_index`: shard basenames become
part-NNNNN/shard.NNNNN.mds) and writes labels.json and prepare_report.json beside it, as a
local prepare does, index.json last.

Same content as a local prepare of the same manifest: the label map is made once here from
all rows, samples keep manifest order (chunks in order, rows in order inside a chunk), the
bytes of a sample are the local prepare's (same checks, same deterministic re-encode), the
report lists the same skipped files. Only the shard files differ (per part, not global).

Resuming: a part whose report carries the digest of its rows, their files' fingerprints and
the spec (`Spec.digest`) and whose index.json exists is reused by its task without redoing
anything; a run stopped part-way redoes only unfinished chunks. OUT/index.json is removed at
the start and written only when every chunk has finished, so a dataset is never read half
made.

Storage: every task writes OUT directly, so OUT must be a location every node reaches: an
object store URI (gs://, s3://), or a local path on a filesystem all nodes share (a local
path is fine on a one-machine cluster).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time

from pretrain import storage
from pretrain.data import prepare as P
from pretrain.data import shards
from pretrain.errors import UserError


def part_name(i: int) -> str:
    return f"{P.PART_PREFIX}{i:05d}"


def prepare_on_ray(modality: str, items: list[P.Item], out_uri: str, *, chunk_size: int = 64,
                   dataset: str | None = None, labels: list[str] | None = None,
                   min_frames: int = 1, shard_size: str = "64mb", hflip_ok: bool = True,
                   progress: bool = True, store=None,
                   manifest: str | None = None) -> P.PrepareResult:
    """Prepare `items` at `out_uri` on the connected Ray cluster; see the module docstring.
    Arguments as `prepare.prepare`'s; `chunk_size`: inputs per task."""
    import ray
    from tqdm import tqdm

    if chunk_size < 1:
        raise UserError(f"prepare --ray: --chunk-size {chunk_size} must be >= 1")
    if not ray.is_initialized():
        raise UserError("prepare --ray: this process is not connected to a Ray cluster; set "
                        "RAY_ADDRESS or pass --address HOST:PORT")
    t0 = time.monotonic()
    out_uri = storage.absolute(out_uri)     # tasks do not run in this working directory
    items = [P.Item(storage.absolute(it.path), it.label, it.key) for it in items]
    spec = P.make_spec(modality, items, labels, store, min_frames, shard_size)
    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    names = [part_name(i) for i in range(len(chunks))]
    P.retract(out_uri)

    task = ray.remote(num_cpus=1)(P.prepare_part)
    spec_ref = ray.put(spec)
    pending = {task.remote(spec_ref, chunk, storage.join(out_uri, name)): i
               for i, (chunk, name) in enumerate(zip(chunks, names))}
    reports: list[dict | None] = [None] * len(chunks)
    failed: dict[int, str] = {}
    bar = tqdm(total=len(items), desc=f"prepare {modality} on Ray", unit="file",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=min(len(pending), 64), timeout=1.0)
            for ref in done:
                i = pending.pop(ref)
                try:
                    reports[i] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the others go on: they are kept
                    failed[i] = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1]}"
                bar.update(len(chunks[i]))
    finally:
        bar.close()
    if failed:
        first = min(failed)
        raise UserError(
            f"prepare --ray: {len(failed)} of {len(chunks)} chunks failed, the first "
            f"({names[first]}, manifest rows {first * chunk_size + 1}-"
            f"{first * chunk_size + len(chunks[first])}): {failed[first]}. The finished chunks "
            f"are kept at {out_uri}; run the same command again to redo only the others")

    written = P.Written(skipped=[P.Skipped(**s) for r in reports for s in r["skipped"]],
                        shards=sum(r["shards"] for r in reports),
                        samples=sum(r["written"] for r in reports),
                        unlabelled=sum(r["unlabelled"] for r in reports))
    result = P.new_result(spec, items, out_uri, dataset, written, manifest)
    result.chunks = {"total": len(chunks), "reused": sum(bool(r["reused"]) for r in reports)}
    with tempfile.TemporaryDirectory(prefix="tubevit-merge-") as staged:
        with_samples = [name for name, r in zip(names, reports) if r["written"]]
        if with_samples:
            _merge_indexes(out_uri, with_samples, staged)
        P.finish(result, spec, staged, hflip_ok, keep=names)
    result.seconds = time.monotonic() - t0
    return result


def _merge_indexes(out_uri: str, parts: list[str], staged: str) -> None:
    """staged/index.json listing the shards of every part folder, in `parts` order.

    streaming's merge_index does the merging; its downloader would insist on Google
    credentials for gs:// (pretrain/data/remote.py), so the parts' indexes are fetched with
    fsspec first and merged as local files."""
    from streaming.base.util import merge_index

    with tempfile.TemporaryDirectory(prefix="tubevit-indexes-") as tmp:
        local = []
        for name in parts:
            path = os.path.join(tmp, name, shards.INDEX)
            storage.download(storage.join(out_uri, name, shards.INDEX), path)
            local.append(path)
        with _quiet_root_logging():
            merge_index(local, staged, keep_local=True)


@contextlib.contextmanager
def _quiet_root_logging():
    """merge_index announces its temporary folder with `logging.warning` on the root logger,
    which would also install a root handler for good: neither reaches the operator."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
