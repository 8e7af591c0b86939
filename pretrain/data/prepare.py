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
3. Publish the folder at the output URI (local path or fsspec URI), see `_publish`: a file
   already there is kept only when its bytes equal the staged file's (sha256, or the md5
   GCS states), shards of an earlier prepare that this one does not write are removed, and
   index.json goes last: a dataset without index.json is incomplete.

`prepare_part` runs the same phases for one chunk of a manifest into a part folder: what
`pretrain prepare --ray` runs as one Ray task (pretrain/data/prepare_ray.py).

Unusable inputs are skipped and reported by file and reason, on stdout and in
prepare_report.json beside the shards; for a manifest, the report also names the folders
its inputs were read from (`read_from`) and those outside the manifest's folder.

Labels: the class names of the rows form the label map (sorted). A row with an empty label,
or every row of a manifest without a label column, is unlabelled (for masked pretraining):
stored with label `shards.UNLABELLED` (-1), counted in labels.json's "unlabelled" (a key
written only when there are such samples, so labelled datasets keep their bytes).

Manifests: UTF-8 (a byte-order mark is fine) unless another encoding is named; paths are
local (absolute, or relative to the manifest's folder; file:// too); a URL scheme (gs://,
http://, ...) is read with fsspec only when the caller allows that scheme.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain import storage
from pretrain.data import shards, transcode
from pretrain.data.media import BadMedia, probe_image, probe_video
from pretrain.errors import UserError

# Folders of `prepare --ray`'s chunks inside a dataset folder: part-00000, part-00001, ...
PART_PREFIX = "part-"


@dataclass(frozen=True)
class Item:
    """One input: where it is, its class name ("" when it has none: stored unlabelled), and
    the key stored with the sample (default: the path; a caller writing from a temporary
    folder passes a stable one)."""

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
    unlabelled: int = 0                # samples written with no label (shards.UNLABELLED)
    manifest: str | None = None        # the CSV the inputs came from, when one did
    read_from: dict[str, int] = field(default_factory=dict)   # manifest's folder -> inputs
    outside_manifest_folder: list[str] = field(default_factory=list)  # of read_from's folders
    chunks: dict | None = None         # --ray: {"total": N, "reused": K} (finished before)

    def summary(self) -> str:
        unlabelled = f", {self.unlabelled} unlabelled" if self.unlabelled else ""
        lines = [f"{self.modality} dataset '{self.dataset}' -> {self.out_uri}: {self.written} "
                 f"written in {self.shards} shards, {len(self.skipped)} skipped, "
                 f"{len(self.labels)} classes{unlabelled}, {self.seconds:.1f} s; stored as "
                 f"{self.storage}"]
        if self.chunks:
            lines.append(f"  on Ray: {self.chunks['total']} chunks, {self.chunks['reused']} "
                         "reused from an earlier run")
        if self.outside_manifest_folder:
            base = os.path.dirname(os.path.abspath(self.manifest or "."))
            outside = self.outside_manifest_folder
            n = sum(self.read_from[f] for f in outside)
            named = ", ".join(f"{f} ({self.read_from[f]})" for f in outside[:5])
            more = len(outside) - 5
            lines.append(f"  note: {n} inputs read from outside the manifest's folder {base}: "
                         f"{named}" + (f" and {more} more folders (see {shards.REPORT})"
                                       if more > 0 else ""))
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


def read_manifest(csv_path: str, encoding: str = "utf-8",
                  allow_schemes: Collection[str] = ()) -> list[Item]:
    """Rows of a CSV with a header holding at least `path` (and usually `label`; a missing
    column or an empty cell means unlabelled). Relative paths are taken relative to the
    CSV's folder; a path with a URL scheme (other than file://) is refused unless its scheme
    is in `allow_schemes`."""
    if not os.path.isfile(csv_path):
        raise UserError(f"manifest '{csv_path}' does not exist; pass a CSV file with a header "
                        "row holding at least the columns path,label (label may be left out "
                        "for unlabelled data)")
    base = os.path.dirname(os.path.abspath(csv_path))
    text = _decode_manifest(csv_path, encoding)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "path" not in cols:
        raise UserError(f"manifest '{csv_path}' has columns {cols or 'none'}; it needs a "
                        "header row with at least path,label (label may be left out, or a "
                        "cell left empty, for unlabelled data)")
    allowed = {s.lower() for s in allow_schemes} | {"file"}
    items = []
    for row in reader:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if not row.get("path"):
            continue
        p = row["path"]
        if "://" in p:
            scheme = p.split("://", 1)[0].lower()
            if scheme not in allowed:
                raise UserError(
                    f"manifest '{csv_path}' line {reader.line_num}: path '{p}' is a "
                    f"{scheme}:// URL; inputs are local files unless URLs are allowed. To read "
                    f"such inputs through fsspec, pass --allow-scheme {scheme} (the report "
                    "names every folder read from)")
        elif not os.path.isabs(p):
            p = os.path.join(base, p)
        items.append(Item(path=p, label=row.get("label", "")))
    if not items:
        raise UserError(f"manifest '{csv_path}' has a header but no rows; add one row per file")
    return items


def _decode_manifest(csv_path: str, encoding: str) -> str:
    """The manifest's text; UserError naming the line of the first byte that is not valid in
    `encoding` (UTF-8 may start with a byte-order mark)."""
    data = Path(csv_path).read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except LookupError:
        raise UserError(f"manifest encoding '{encoding}' is unknown; pass a Python codec name "
                        "such as utf-8, latin-1 or cp1252") from None
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(
            f"manifest '{csv_path}' is not valid {encoding}: line {line} holds the byte(s) "
            f"{data[exc.start:exc.end]!r} ({exc.reason}). Save the CSV as UTF-8, or name its "
            "encoding with --manifest-encoding (for example latin-1 or cp1252; the paths are "
            "then read as that encoding decodes them)") from None


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
    """Sorted class names of all labelled inputs (numerically when every name is an
    integer), so the map does not depend on which files turn out unusable."""
    names = {it.label for it in items if it.label}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _folder_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "://" in path else os.path.dirname(path)


def _locations(items: list[Item], manifest: str | None) -> tuple[dict[str, int], list[str]]:
    """(folder -> inputs listed there, the folders outside the manifest's folder); nothing
    without a manifest (inputs a caller made, e.g. synthetic data in a temporary folder: the
    report stays the same from run to run)."""
    if manifest is None:
        return {}, []
    read_from = dict(sorted(Counter(_folder_of(it.path) for it in items).items()))
    base = os.path.dirname(os.path.abspath(manifest))
    outside = [f for f in read_from
               if "://" in f or not (f == base or f.startswith(base.rstrip(os.sep) + os.sep))]
    return read_from, outside


# ----------------------------------------------------------------------------- what and how


@dataclass(frozen=True)
class Spec:
    """What one prepare writes, the same for all of its inputs (and all chunks on Ray)."""

    modality: str
    labels: tuple[str, ...]
    store: transcode.VideoFormat | transcode.ImageFormat | None = None
    min_frames: int = 1
    shard_size: str = "64mb"

    @property
    def index_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def store_tag(self) -> str:
        return _store_tag(self.store)

    def digest(self, items: list[Item], fingerprints: dict[str, str]) -> str:
        """Hash of everything a chunk's bytes follow from: the rows (path, label, key, file
        fingerprint) and this spec. Equal digests: the part already written can be kept."""
        doc = {"spec": [self.modality, list(self.labels), self.store_tag, self.min_frames,
                        self.shard_size],
               "rows": [[it.path, it.label, it.key, fingerprints[it.path]] for it in items]}
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def make_spec(modality: str, items: list[Item], labels: list[str] | None = None,
              store=None, min_frames: int = 1, shard_size: str = "64mb") -> Spec:
    """The Spec of a prepare (UserError for an unknown modality or a format of the other)."""
    if modality not in ("video", "image"):
        raise UserError(f"modality '{modality}' is unknown; valid: video, image")
    if store is not None and not isinstance(
            store, transcode.VideoFormat if modality == "video" else transcode.ImageFormat):
        raise UserError(f"prepare {modality}: storage format {store!r} is not a "
                        f"{modality} format; pass transcode.{modality.upper()} or None")
    labels = list(labels) if labels is not None else label_map(items)
    return Spec(modality, tuple(labels), store, min_frames, shard_size)


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


def _check_all(spec: Spec, items: list[Item], journal_path: str, workers: int, progress: bool,
               media_dir: str) -> dict[str, dict]:
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
    tag = spec.store_tag

    def current(p: str) -> bool:
        rec = done.get(p)
        return (rec is not None and rec.get("fp") == _fingerprint(p) and rec.get("store") == tag
                and (not rec.get("stored")
                     or os.path.exists(os.path.join(media_dir, rec["stored"]))))

    todo = [p for p in paths if not current(p)]
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc=f"check {spec.modality}",
               unit="file", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with open(journal_path, "a", encoding="utf-8") as journal:
        args = [(spec.modality, p, spec.min_frames, spec.store, media_dir) for p in todo]
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


@dataclass
class Written:
    """What writing the shards of some inputs gave."""

    skipped: list[Skipped]
    shards: int = 0
    samples: int = 0
    unlabelled: int = 0


def _write(spec: Spec, items: list[Item], records: dict[str, dict], mds_dir: str,
           media_dir: str, progress: bool) -> Written:
    """Shards of the usable `items` (manifest order) in a fresh `mds_dir`; the others skipped
    with their reason."""
    index_of = spec.index_of
    out = Written(skipped=[])
    usable: list[tuple[Item, dict]] = []
    for it in items:
        rec = records[it.path]
        if not rec["ok"]:
            out.skipped.append(Skipped(it.path, rec["reason"]))
        elif it.label and it.label not in index_of:
            out.skipped.append(Skipped(it.path, f"label '{it.label}' is not in the label map"))
        else:
            usable.append((it, rec))
    shutil.rmtree(mds_dir, ignore_errors=True)
    if usable:
        _write_mds(spec, usable, mds_dir, media_dir, out, progress)
    os.makedirs(mds_dir, exist_ok=True)
    return out


def _write_mds(spec: Spec, usable: list[tuple[Item, dict]], mds_dir: str, media_dir: str,
               out: Written, progress: bool) -> None:
    from streaming import MDSWriter
    from tqdm import tqdm

    modality, index_of = spec.modality, spec.index_of
    columns = shards.VIDEO_COLUMNS if modality == "video" else shards.IMAGE_COLUMNS
    reencoded = modality == "video" and any(rec.get("stored") for _, rec in usable)
    if reencoded:
        columns = {**columns, **shards.SOURCE_FPS_COLUMNS}
    with MDSWriter(out=mds_dir, columns=columns, size_limit=spec.shard_size,
                   compression=None) as writer:
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
                out.skipped.append(Skipped(it.path, f"changed while preparing: {exc}"))
                continue
            label = index_of[it.label] if it.label else shards.UNLABELLED
            sample = {modality: data, "label": label, "key": it.key or it.path, **meta}
            if reencoded:   # a journal from before source_fps was recorded: the stored rate
                sample.setdefault("source_fps", meta["fps"])
            writer.write(sample)
            out.samples += 1
            out.unlabelled += label == shards.UNLABELLED
    out.shards = len([n for n in os.listdir(mds_dir) if n.endswith(".mds")])


def _staging_dir(out_uri: str, work_dir: str | None) -> str:
    if work_dir:
        return work_dir
    key = hashlib.blake2s(out_uri.encode(), digest_size=8).hexdigest()
    return os.path.join(cache_root(), "prepare", key)


def prepare(modality: str, items: list[Item], out_uri: str, *, dataset: str | None = None,
            labels: list[str] | None = None, workers: int | None = None,
            work_dir: str | None = None, min_frames: int = 1, shard_size: str = "64mb",
            hflip_ok: bool = True, progress: bool = True,
            store: transcode.VideoFormat | transcode.ImageFormat | None = None,
            manifest: str | None = None) -> PrepareResult:
    """Check, shard and publish `items` at `out_uri`; see the module docstring.

    `labels` fixes the label map (e.g. the train split's, for a val split); otherwise it is
    built from all items. Items with a label outside a given map are skipped; items without
    a label are stored unlabelled. `store` is the training format to re-encode to
    (transcode.VIDEO / transcode.IMAGE, what `pretrain prepare video|image` uses unless
    --keep-original); None stores the input bytes as they are (synthetic data: its bytes are
    made reproducible by synthetic.py). `min_frames` applies to the stored frame count.
    `manifest`: the CSV the items came from, for the report's note on inputs read from
    outside its folder.
    """
    t0 = time.monotonic()
    spec = make_spec(modality, items, labels, store, min_frames, shard_size)
    staging = _staging_dir(out_uri, work_dir)
    workers = workers or os.cpu_count() or 1
    media_dir = os.path.join(staging, "media")
    os.makedirs(media_dir, exist_ok=True)

    records = _check_all(spec, items, os.path.join(staging, "journal.jsonl"), workers,
                         progress, media_dir)
    mds_dir = os.path.join(staging, "mds")
    written = _write(spec, items, records, mds_dir, media_dir, progress)
    result = new_result(spec, items, out_uri, dataset, written, manifest)
    finish(result, spec, mds_dir, hflip_ok)
    shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    return result


def new_result(spec: Spec, items: list[Item], out_uri: str, dataset: str | None,
               written: Written, manifest: str | None) -> PrepareResult:
    read_from, outside = _locations(items, manifest)
    return PrepareResult(out_uri=out_uri, modality=spec.modality,
                         dataset=dataset or spec.modality, written=written.samples,
                         labels=list(spec.labels), skipped=written.skipped,
                         shards=written.shards, storage=spec.store_tag,
                         unlabelled=written.unlabelled, manifest=manifest, read_from=read_from,
                         outside_manifest_folder=outside)


def finish(result: PrepareResult, spec: Spec, staged: str, hflip_ok: bool,
           keep: Collection[str] = ()) -> None:
    """Add the report and the label map to the `staged` folder (holding the shards or, on
    Ray, the merged index) and publish it at result.out_uri; `keep`: part folders there that
    belong to it. With nothing written, only the report is added at the URI."""
    report = json.dumps(result.to_json(), indent=1)
    with open(os.path.join(staged, shards.REPORT), "w") as f:
        f.write(report)
    if not result.written:  # nothing usable: leave whatever is at the URI alone
        storage.write_bytes(storage.join(result.out_uri, shards.REPORT), report.encode())
        return
    # Named only when re-encoded (or unlabelled): datasets of original bytes (synthetic data
    # included) keep the labels.json they had before there was a choice.
    extra = {"storage": spec.store_tag} if spec.store is not None else {}
    if result.unlabelled:
        extra["unlabelled"] = result.unlabelled
    doc = shards.label_doc(spec.modality, result.dataset, list(spec.labels), result.written,
                           hflip_ok=hflip_ok, **extra)
    with open(os.path.join(staged, shards.LABELS), "w") as f:
        json.dump(doc, f, indent=1)
    _publish(staged, result.out_uri, keep)


# ----------------------------------------------------------------------------- one chunk


def prepare_part(spec: Spec, items: list[Item], part_uri: str) -> dict:
    """Check, shard and publish one chunk of a manifest at `part_uri` (a part folder of the
    dataset): one Ray task of `prepare --ray`. Returns the part's report (written, skipped,
    shards, unlabelled, digest, reused).

    A part published before for the same rows, files and spec (its report's digest, and its
    index.json when it holds samples) is kept as it is ("reused": true): an interrupted run
    redoes only the chunks it had not finished."""
    fingerprints = {p: _fingerprint(p) for p in {it.path for it in items}}
    digest = spec.digest(items, fingerprints)
    old = _read_json(storage.join(part_uri, shards.REPORT))
    if (old is not None and old.get("digest") == digest
            and (not old.get("written") or storage.exists(storage.join(part_uri, shards.INDEX)))):
        return {**old, "reused": True}
    with tempfile.TemporaryDirectory(prefix="tubevit-part-") as staging:
        media_dir = os.path.join(staging, "media")
        os.makedirs(media_dir)
        records = {p: _check((spec.modality, p, spec.min_frames, spec.store, media_dir))
                   for p in sorted(fingerprints)}
        mds_dir = os.path.join(staging, "mds")
        written = _write(spec, items, records, mds_dir, media_dir, progress=False)
        report = {"digest": digest, "written": written.samples, "shards": written.shards,
                  "unlabelled": written.unlabelled,
                  "skipped": [asdict(s) for s in written.skipped]}
        with open(os.path.join(mds_dir, shards.REPORT), "w") as f:
            json.dump(report, f, indent=1)
        _publish(mds_dir, part_uri)
    return {**report, "reused": False}


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours, or cut short: redo


# ----------------------------------------------------------------------------- publishing


def retract(out_uri: str) -> None:
    """Remove out_uri's index.json: the dataset there is incomplete from now on."""
    fs, root = storage.filesystem(out_uri)
    index = storage.join(root, shards.INDEX)
    try:
        if fs.exists(index):
            fs.rm(index)
    except FileNotFoundError:
        pass


def _publish(staged: str, out_uri: str, keep: Collection[str] = ()) -> None:
    """Make out_uri hold the files of the (flat) `staged` folder, index.json last.

    index.json there is removed first (the folder is incomplete until the new one lands);
    shards and part folders of an earlier prepare that are neither staged nor in `keep` are
    removed; a file already there is kept only when its bytes are the staged file's (same
    size and hash): a re-run after a label change writes shards of the same size with other
    bytes, which must replace the old ones. An interrupted publish resumes by the same rule.
    """
    retract(out_uri)
    fs, root = storage.filesystem(out_uri)
    staged_names = set(os.listdir(staged))
    try:
        existing = fs.ls(root, detail=False) if fs.exists(root) else []
    except FileNotFoundError:
        existing = []
    for path in existing:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(("shard.", PART_PREFIX)) and name not in staged_names | set(keep):
            fs.rm(path, recursive=True)
    fs.invalidate_cache()
    fs.makedirs(root, exist_ok=True)
    for name in sorted(staged_names - {shards.INDEX}):
        src, dst = os.path.join(staged, name), storage.join(root, name)
        if not _same_bytes(fs, dst, src):
            storage.put_file(fs, src, dst)
    if shards.INDEX in staged_names:
        storage.put_file(fs, os.path.join(staged, shards.INDEX), storage.join(root, shards.INDEX))
    fs.invalidate_cache()


def _same_bytes(fs, remote: str, local: str) -> bool:
    """Whether `remote` holds exactly the bytes of the local file: sizes, then the md5 an
    object store states (GCS's md5Hash: no download), else sha256 of both."""
    try:
        info = fs.info(remote)
    except FileNotFoundError:
        return False
    if info.get("type") == "directory" or info.get("size") != os.path.getsize(local):
        return False
    if info.get("md5Hash"):
        md5 = hashlib.md5()
        with open(local, "rb") as f:
            while chunk := f.read(storage.CHUNK):
                md5.update(chunk)
        return base64.b64decode(info["md5Hash"]) == md5.digest()
    return storage.sha256_file(remote, fs) == storage.sha256_file(local)


def prepare_from_manifest(modality: str, manifest: str | None, folder: str | None, out_uri: str,
                          keep_original: bool = False, manifest_encoding: str = "utf-8",
                          allow_schemes: Collection[str] = (), ray: bool = False,
                          chunk_size: int = 64, **kwargs) -> PrepareResult:
    """`pretrain prepare video|image`: the training format unless `keep_original`; with
    `ray`, as chunks of `chunk_size` inputs on the Ray cluster this process is connected to
    (pretrain/data/prepare_ray.py)."""
    if bool(manifest) == bool(folder):
        raise UserError(f"prepare {modality}: pass exactly one of --manifest FILE.csv or "
                        "--folder DIR (one subfolder per class)")
    items = (read_manifest(manifest, manifest_encoding, allow_schemes) if manifest
             else scan_class_folders(folder))
    if not keep_original:
        kwargs.setdefault("store", transcode.VIDEO if modality == "video" else transcode.IMAGE)
    if ray:
        from pretrain.data.prepare_ray import prepare_on_ray

        kwargs.pop("workers", None)      # the cluster's CPUs decide
        kwargs.pop("work_dir", None)     # each task stages in a temporary folder of its own
        return prepare_on_ray(modality, items, out_uri, chunk_size=chunk_size,
                              manifest=manifest, **kwargs)
    return prepare(modality, items, out_uri, manifest=manifest, **kwargs)
