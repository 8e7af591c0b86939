"""Turn video/image files into MDS shards plus a label map (`pretrain prepare`).

Three phases, so that an interrupted run resumes cheaply and the output is deterministic:

1. Check every input in parallel (a process per core): read it and decode it fully once, to
   reject corrupt/truncated/empty/missing files and to record what sampling needs (fps, frame
   count, size). In the same decode pass the input is re-encoded to the training format
   (`store`, see pretrain/data/transcode.py) into the staging folder, named by a hash of its
   path. Results go to a journal in the staging folder, keyed by path, size, mtime and
   storage format; a re-run skips inputs already checked.
2. Write the MDS shards in manifest order from the usable inputs (the re-encoded bytes, or
   the input's own with `store=None`; deterministic bytes for the same input), into the
   staging folder.
3. Copy the folder to the output URI (local path or fsspec URI), files already there with the
   same size are skipped, and index.json goes last: a dataset without index.json is incomplete.

Unusable inputs are skipped and reported by file and reason, on stdout and in
prepare_report.json beside the shards.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain import storage
from pretrain.data import shards, transcode
from pretrain.data.media import BadMedia, probe_image, probe_video
from pretrain.errors import UserError


@dataclass(frozen=True)
class Item:
    """One input: where it is, its class name, and the key stored with the sample (default:
    the path; a caller writing from a temporary folder passes a stable one)."""

    path: str
    label: str
    key: str | None = None


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class PrepareResult:
    out_uri: str
    modality: str
    dataset: str
    written: int
    labels: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    shards: int = 0
    seconds: float = 0.0
    storage: str = transcode.ORIGINAL  # the stored format, in words

    def summary(self) -> str:
        lines = [f"{self.modality} dataset '{self.dataset}' -> {self.out_uri}: {self.written} "
                 f"written in {self.shards} shards, {len(self.skipped)} skipped, "
                 f"{len(self.labels)} classes, {self.seconds:.1f} s; stored as {self.storage}"]
        for s in self.skipped:
            lines.append(f"  skipped {s.path}: {s.reason}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = asdict(self)
        d["num_skipped"] = len(self.skipped)
        d["num_classes"] = len(self.labels)
        return d


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("TUBEVIT_CACHE_DIR", "~/.cache/tubevit"))


# ----------------------------------------------------------------------------- inputs


def read_manifest(csv_path: str) -> list[Item]:
    """Rows of a CSV with a header holding at least `path,label`; relative paths are taken
    relative to the CSV's folder."""
    if not os.path.isfile(csv_path):
        raise UserError(f"manifest '{csv_path}' does not exist; pass a CSV file with a header "
                        "row holding at least the columns path,label")
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise UserError(f"manifest '{csv_path}' has columns {cols or 'none'}; it needs a "
                            "header row with at least path,label")
        items = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("path"):
                continue
            p = row["path"]
            if "://" not in p and not os.path.isabs(p):
                p = os.path.join(base, p)
            items.append(Item(path=p, label=row["label"]))
    if not items:
        raise UserError(f"manifest '{csv_path}' has a header but no rows; add one row per file")
    return items


def scan_class_folders(root: str) -> list[Item]:
    """Files under ROOT/<class>/... labelled by their first-level folder name (sorted)."""
    if not os.path.isdir(root):
        raise UserError(f"folder '{root}' does not exist; pass a folder with one subfolder per "
                        "class holding its files")
    items = []
    for cls in sorted(os.listdir(root)):
        cdir = os.path.join(root, cls)
        if cls.startswith(".") or not os.path.isdir(cdir):
            continue
        for p in sorted(Path(cdir).rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                items.append(Item(path=str(p), label=cls))
    if not items:
        raise UserError(f"folder '{root}' has no files in class subfolders; expected "
                        "ROOT/<class name>/<file>")
    return items


def label_map(items: list[Item]) -> list[str]:
    """Sorted class names of all inputs (numerically when every name is an integer), so the
    map does not depend on which files turn out unusable."""
    names = {it.label for it in items}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ----------------------------------------------------------------------------- checking


def _fingerprint(path: str) -> str:
    try:
        if "://" in path:
            fs, p = storage.filesystem(path)
            info = fs.info(p)
            return f"{info.get('size')}:{info.get('mtime') or info.get('updated') or ''}"
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except (FileNotFoundError, OSError):
        return "missing"


def _stored_name(path: str, modality: str) -> str:
    """File name of an input's re-encoded bytes in the staging folder."""
    digest = hashlib.blake2s(path.encode(), digest_size=12).hexdigest()
    return f"{digest}.{'mp4' if modality == 'video' else 'jpg'}"


def _check(args: tuple) -> dict:
    """Probe one input and, with a storage format, re-encode it in the same decode pass into
    `media_dir`; runs in a pool process. Returns a journal record."""
    modality, path, min_frames, store, media_dir = args
    rec: dict = {"path": path, "fp": _fingerprint(path), "store": _store_tag(store)}
    try:
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise BadMedia("file not found") from None
        except IsADirectoryError:
            raise BadMedia("is a folder, not a file") from None
        except PermissionError:
            raise BadMedia("permission denied") from None
        stored = None
        if modality == "video":
            source = None
            if store is None:
                meta = probe_video(data)
            else:
                stored, meta, source = transcode.transcode_video_and_probe(data, store)
            if meta.num_frames < min_frames:
                raise BadMedia(f"only {meta.num_frames} frames; at least {min_frames} required")
            rec["meta"] = {"fps": meta.fps, "num_frames": meta.num_frames, "width": meta.width,
                           "height": meta.height, "duration": meta.duration}
            if source is not None:
                rec["meta"]["source_fps"] = source.fps
        elif store is None:
            w, h, _ = probe_image(data)
            rec["meta"] = {"width": w, "height": h}
        else:
            stored, w, h = transcode.transcode_image(data, store)
            rec["meta"] = {"width": w, "height": h}
        if stored is not None:
            name = _stored_name(path, modality)
            tmp = os.path.join(media_dir, f".{name}.{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(stored)
            os.replace(tmp, os.path.join(media_dir, name))  # whole or absent after a kill
            rec["stored"] = name
        rec["ok"] = True
    except BadMedia as exc:
        rec["ok"], rec["reason"] = False, str(exc)
    except Exception as exc:  # an unexpected library error is still a per-file problem
        rec["ok"], rec["reason"] = False, f"{exc.__class__.__name__}: {exc}"
    return rec


def _store_tag(store) -> str:
    return store.describe() if store is not None else transcode.ORIGINAL


def _check_all(modality: str, items: list[Item], journal_path: str, min_frames: int,
               workers: int, progress: bool, store, media_dir: str) -> dict[str, dict]:
    """Journal records by path, checking only inputs not already journalled unchanged (same
    fingerprint, same storage format, re-encoded bytes still staged)."""
    from tqdm import tqdm

    done: dict[str, dict] = {}
    if os.path.exists(journal_path):
        with open(journal_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption
                done[rec["path"]] = rec
    paths = sorted({it.path for it in items})
    tag = _store_tag(store)

    def current(p: str) -> bool:
        rec = done.get(p)
        return (rec is not None and rec.get("fp") == _fingerprint(p) and rec.get("store") == tag
                and (not rec.get("stored")
                     or os.path.exists(os.path.join(media_dir, rec["stored"]))))

    todo = [p for p in paths if not current(p)]
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc=f"check {modality}",
               unit="file", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with open(journal_path, "a", encoding="utf-8") as journal:
        args = [(modality, p, min_frames, store, media_dir) for p in todo]
        if workers <= 1 or len(todo) <= 4:
            results = map(_check, args)
            pool = None
        else:
            import multiprocessing as mp

            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
            results = pool.map(_check, args, chunksize=max(1, min(16, len(todo) // (4 * workers))))
        try:
            for rec in results:
                done[rec["path"]] = rec
                journal.write(json.dumps(rec) + "\n")
                journal.flush()
                bar.update(1)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            bar.close()
    return done


# ----------------------------------------------------------------------------- writing


def _staging_dir(out_uri: str, work_dir: str | None) -> str:
    if work_dir:
        return work_dir
    key = hashlib.blake2s(out_uri.encode(), digest_size=8).hexdigest()
    return os.path.join(cache_root(), "prepare", key)


def prepare(modality: str, items: list[Item], out_uri: str, *, dataset: str | None = None,
            labels: list[str] | None = None, workers: int | None = None,
            work_dir: str | None = None, min_frames: int = 1, shard_size: str = "64mb",
            hflip_ok: bool = True, progress: bool = True,
            store: transcode.VideoFormat | transcode.ImageFormat | None = None) -> PrepareResult:
    """Check, shard and upload `items` to `out_uri`; see the module docstring.

    `labels` fixes the label map (e.g. the train split's, for a val split); otherwise it is
    built from all items. Items with a label outside a given map are skipped. `store` is the
    training format to re-encode to (transcode.VIDEO / transcode.IMAGE, what `pretrain
    prepare video|image` uses unless --keep-original); None stores the input bytes as they
    are (synthetic data: its bytes are made reproducible by synthetic.py). `min_frames`
    applies to the stored frame count.
    """
    if modality not in ("video", "image"):
        raise UserError(f"modality '{modality}' is unknown; valid: video, image")
    t0 = time.monotonic()
    dataset = dataset or modality
    labels = list(labels) if labels is not None else label_map(items)
    index_of = {name: i for i, name in enumerate(labels)}
    if store is not None and not isinstance(
            store, transcode.VideoFormat if modality == "video" else transcode.ImageFormat):
        raise UserError(f"prepare {modality}: storage format {store!r} is not a "
                        f"{modality} format; pass transcode.{modality.upper()} or None")
    staging = _staging_dir(out_uri, work_dir)
    os.makedirs(staging, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    media_dir = os.path.join(staging, "media")
    os.makedirs(media_dir, exist_ok=True)

    records = _check_all(modality, items, os.path.join(staging, "journal.jsonl"), min_frames,
                         workers, progress, store, media_dir)

    skipped: list[Skipped] = []
    usable: list[tuple[Item, dict]] = []
    for it in items:
        rec = records[it.path]
        if not rec["ok"]:
            skipped.append(Skipped(it.path, rec["reason"]))
        elif it.label not in index_of:
            skipped.append(Skipped(it.path, f"label '{it.label}' is not in the label map"))
        else:
            usable.append((it, rec))

    mds_dir = os.path.join(staging, "mds")
    shutil.rmtree(mds_dir, ignore_errors=True)
    num_shards = written = 0
    if usable:
        num_shards, written = _write_mds(modality, usable, index_of, mds_dir, media_dir,
                                         shard_size, skipped, progress)
    os.makedirs(mds_dir, exist_ok=True)
    result = PrepareResult(out_uri=out_uri, modality=modality, dataset=dataset, written=written,
                           labels=labels, skipped=skipped, shards=num_shards,
                           storage=_store_tag(store))
    report = result.to_json()
    with open(os.path.join(mds_dir, shards.REPORT), "w") as f:
        json.dump(report, f, indent=1)
    if written:
        # Named only when re-encoded: datasets of original bytes (synthetic data included)
        # keep the labels.json they had before there was a choice.
        extra = {"storage": _store_tag(store)} if store is not None else {}
        doc = shards.label_doc(modality, dataset, labels, written, hflip_ok=hflip_ok, **extra)
        with open(os.path.join(mds_dir, shards.LABELS), "w") as f:
            json.dump(doc, f, indent=1)
    if written:
        _publish(mds_dir, out_uri)
    else:  # nothing usable: leave whatever is at out_uri alone, only add the report
        storage.write_bytes(storage.join(out_uri, shards.REPORT), json.dumps(report, indent=1).encode())
    shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    return result


def _write_mds(modality: str, usable: list[tuple[Item, dict]], index_of: dict[str, int],
               mds_dir: str, media_dir: str, shard_size: str, skipped: list[Skipped],
               progress: bool) -> tuple[int, int]:
    """(shards, samples) written from the journal records of the usable inputs."""
    from streaming import MDSWriter
    from tqdm import tqdm

    columns = shards.VIDEO_COLUMNS if modality == "video" else shards.IMAGE_COLUMNS
    reencoded = modality == "video" and any(rec.get("stored") for _, rec in usable)
    if reencoded:
        columns = {**columns, **shards.SOURCE_FPS_COLUMNS}
    written = 0
    with MDSWriter(out=mds_dir, columns=columns, size_limit=shard_size, compression=None) as writer:
        for it, rec in tqdm(usable, desc=f"write {modality}", unit="file", file=sys.stderr,
                            disable=not progress, dynamic_ncols=True):
            meta = rec["meta"]
            try:
                if rec.get("stored"):
                    with open(os.path.join(media_dir, rec["stored"]), "rb") as f:
                        data = f.read()
                else:
                    data = storage.read_bytes(it.path)
            except OSError as exc:
                skipped.append(Skipped(it.path, f"changed while preparing: {exc}"))
                continue
            sample = {modality: data, "label": index_of[it.label], "key": it.key or it.path,
                      **meta}
            if reencoded:   # a journal from before source_fps was recorded: the stored rate
                sample.setdefault("source_fps", meta["fps"])
            writer.write(sample)
            written += 1
    return len([n for n in os.listdir(mds_dir) if n.endswith(".mds")]), written


def _publish(mds_dir: str, out_uri: str) -> None:
    """Copy the staged folder to out_uri with index.json last; drop stale shards there."""
    index_local = os.path.join(mds_dir, shards.INDEX)
    fs, root = storage.filesystem(out_uri)
    index_remote = storage.join(root, shards.INDEX)
    try:
        if fs.exists(index_remote):
            fs.rm(index_remote)  # the folder is incomplete until the new index lands
        existing = fs.ls(root, detail=False) if fs.exists(root) else []
    except FileNotFoundError:
        existing = []
    staged = set(os.listdir(mds_dir))
    for path in existing:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("shard.") and name not in staged:
            fs.rm(path)
    held = os.path.join(os.path.dirname(mds_dir), shards.INDEX + ".held")
    if os.path.exists(index_local):
        os.replace(index_local, held)
    storage.upload_folder(mds_dir, out_uri)
    if os.path.exists(held):
        storage.put_file(fs, held, index_remote)
        fs.invalidate_cache()


def prepare_from_manifest(modality: str, manifest: str | None, folder: str | None, out_uri: str,
                          keep_original: bool = False, **kwargs) -> PrepareResult:
    """`pretrain prepare video|image`: the training format unless `keep_original`."""
    if bool(manifest) == bool(folder):
        raise UserError(f"prepare {modality}: pass exactly one of --manifest FILE.csv or "
                        "--folder DIR (one subfolder per class)")
    items = read_manifest(manifest) if manifest else scan_class_folders(folder)
    if not keep_original:
        kwargs.setdefault("store", transcode.VIDEO if modality == "video" else transcode.IMAGE)
    return prepare(modality, items, out_uri, **kwargs)
