"""Local paths and fsspec URIs behind one small API: the only module that opens storage.

Data, checkpoints, model files and `prepare` all reach files through here, so they agree on
how a location is turned into a filesystem, how paths are joined, how a file is written
without a reader ever seeing half of it, and how a file is hashed.

- A location is a local path (~ expanded, relative to the working directory) or any fsspec
  URI (gs://, s3://, file://, memory://, ...); the local disk is the default.
- gs:// talks to the GCS emulator when STORAGE_EMULATOR_HOST is set (anonymous credentials:
  gcsfs would otherwise look for Google credentials the emulator does not need), else to
  real GCS with Google's default credentials.
- Two levels: functions taking a location (`read_bytes(uri)`, `write_bytes(uri, data)`, ...)
  and, for callers that work inside one folder many times (checkpoints), functions taking
  the (filesystem, path) pair that `filesystem(uri)` returns. Paths inside a filesystem
  carry no protocol and no trailing slash; `uri_of` turns one back into a location.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pretrain.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 8 << 20          # bytes per read when copying or hashing large files


# ---- locations ----------------------------------------------------------------------------

def is_remote(uri: str) -> bool:
    """A URI other than the local disk (file:// is local)."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The absolute local path of a local path or file:// URI (user ~ expanded)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(os.path.expanduser(uri)).absolute())


def absolute(location: str, cwd: str | os.PathLike | None = None) -> str:
    """`location` made independent of the working directory.

    A relative local path (~ expanded) is anchored at `cwd` (default: the current one), and
    so is the file of a relative MLflow sqlite:/// URI (sqlite:////abs is absolute already).
    Other URIs and absolute paths come back as they are. Ray workers and jobs do not run
    where the user typed the command, so locations are anchored before they are handed on.
    """
    if location.startswith("sqlite:///"):
        return "sqlite:///" + absolute(location[len("sqlite:///"):], cwd)
    if "://" in location:
        return location
    path = os.path.expanduser(location)
    return os.path.abspath(os.path.join(cwd if cwd is not None else os.getcwd(), path))


# Config keys that hold locations: data.video_uri, data.cache_dir, data.synthetic.root,
# checkpoint.uri, checkpoint.local_dir, model.init_from, tracking.tracking_uri, ...
_LOCATION_KEY = re.compile(r"(uri|root|dir|path|_from)$")


def absolute_locations(tree: dict, cwd: str | os.PathLike | None = None) -> dict:
    """A copy of a config tree with every location (by key name, see _LOCATION_KEY) made
    absolute with `absolute`."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = absolute_locations(value, cwd)
        elif isinstance(value, str) and value and _LOCATION_KEY.search(key):
            out[key] = absolute(value, cwd)
        else:
            out[key] = value
    return out


# ---- credentials in URIs --------------------------------------------------------------------
#
# A location with credentials in it (https://user:password@host/..., s3://KEY:SECRET@bucket)
# would be copied into everything that records a location: MLflow params and config.yaml,
# checkpoint manifests (COMMIT.json), a job's runtime env, rendered manifests and printed
# summaries. The project refuses such locations instead of redacting each of those places
# (one check at the start rather than a redaction every writer must remember); credentials
# go in the environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or
# MLFLOW_TRACKING_TOKEN for MLflow; Google / AWS default credentials for buckets), and on a
# cluster in a Kubernetes secret referenced by the profile (kubernetes.secret_env).

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
CREDENTIALS_HOWTO = (
    "Pass credentials through the environment instead: MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for MLflow, the cloud's default "
    "credentials (GOOGLE_APPLICATION_CREDENTIALS, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
    "for buckets; on a cluster, reference a Kubernetes secret in the profile "
    "(kubernetes.secret_env: [{env: MLFLOW_TRACKING_PASSWORD, secret: NAME, key: KEY}]), "
    "so the value is never written into configs, manifests, MLflow or checkpoints.")


def credentials_in(text: str) -> bool:
    """`text` holds a URI with credentials: a password (scheme://user:pass@...) or, for
    http(s), any user part (https://TOKEN@host)."""
    for m in _USERINFO.finditer(text):
        scheme = m.group("scheme")[:-3].lower()
        if ":" in m.group("userinfo") or scheme in ("http", "https"):
            return True
    return False


def redact_text(text: str) -> str:
    """`text` with the user part of every URI in it replaced by ***."""
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def refuse_credentials(value: str, what: str) -> None:
    """UserError when `value` (named `what`, e.g. a config key) holds credentials in a URI."""
    if isinstance(value, str) and credentials_in(value):
        raise UserError(f"{what} holds credentials inside a URI ({redact_text(value)}); they "
                        f"would be stored wherever the location is recorded. {CREDENTIALS_HOWTO}")


def refuse_credentials_in_tree(tree: dict, prefix: str = "config key ") -> None:
    """refuse_credentials for every string in a nested config tree, named by its dotted key."""
    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str):
            refuse_credentials(node, f"{prefix}'{path}'")
    walk(tree, "")


def join(base: str, *parts: str) -> str:
    """`base` and `parts` joined by single slashes, for URIs and local paths alike.

    join("gs://b/run/", "step_1", "/x") == "gs://b/run/step_1/x"; empty parts are skipped;
    a root keeps its slashes: join("/", "a") == "/a", join("gs://", "b") == "gs://b".
    """
    head = base.rstrip("/")
    if not head or head.endswith(":"):      # "/", "gs://", "file:///": the root itself
        head = base
    segments = [p.strip("/") for p in parts if p and p.strip("/")]
    if not segments:
        return head
    return head + ("" if head.endswith("/") else "/") + "/".join(segments)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI; the path has no
    trailing slash."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), local_path(uri)
    protocol = uri.split("://", 1)[0]
    try:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if protocol in ("gs", "gcs") and emulator:
            fs = emulator_filesystem(emulator)
        else:
            fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise UserError(f"storage URI '{uri}' uses protocol '{protocol}', which fsspec cannot open "
                        f"here ({exc}); use a local path, file://, gs:// or another installed "
                        "fsspec protocol") from None
    path = fs._strip_protocol(uri)
    return fs, path.rstrip("/") or path


def emulator_filesystem(url: str, project: str = "emulator") -> fsspec.AbstractFileSystem:
    """gcsfs on a GCS emulator at `url` (anonymous: the emulator needs no credentials).

    gcsfs's JSON-API client itself, not the class fsspec registers for gs://: since gcsfs
    2026.x that is ExtendedGcsFileSystem, which asks Google's gRPC storage-control API for
    each bucket's layout (zonal, hierarchical) before using it. An emulator serves the JSON
    API only, so every such lookup ran into its 30-60 s timeout, and a failed lookup is not
    cached: every operation paid it again."""
    from gcsfs.core import GCSFileSystem

    if not url.startswith("http"):
        url = "http://" + url
    return GCSFileSystem(token="anon", endpoint_url=url, project=project)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A location a user can paste back (gs://bucket/x rather than bucket/x)."""
    if is_local(fs):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path}"


# ---- whole files by location ---------------------------------------------------------------

def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False


def read_bytes(uri: str) -> bytes:
    """The whole file at `uri` (FileNotFoundError when there is none)."""
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def open_read(uri: str) -> BinaryIO:
    """The file at `uri` opened for reading in chunks (seekable; the caller closes it)."""
    fs, path = filesystem(uri)
    return fs.open(path, "rb", block_size=CHUNK)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` whole or not at all (parent folders are created)."""
    fs, path = filesystem(uri)
    write_atomic(fs, path, data)


def download(uri: str, local: str) -> str:
    """Copy the file at `uri` to the local path `local` atomically; returns its sha256."""
    fs, path = filesystem(uri)
    return get_file(fs, path, local)


def upload_folder(local_dir: str, uri: str) -> list[str]:
    """Copy every file under local_dir to uri, skipping files already there with the same size.

    Returns the names uploaded. Used by `prepare` so that an interrupted upload resumes.
    """
    fs, root = filesystem(uri)
    uploaded = []
    names = sorted(str(p.relative_to(local_dir)) for p in Path(local_dir).rglob("*") if p.is_file())
    for name in names:
        src = os.path.join(local_dir, name)
        dst = join(root, name.replace(os.sep, "/"))
        try:
            if fs.exists(dst) and fs.size(dst) == os.path.getsize(src):
                continue
        except FileNotFoundError:
            pass
        fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        put_file(fs, src, dst)
        uploaded.append(name)
    fs.invalidate_cache()
    return uploaded


# ---- files inside a filesystem --------------------------------------------------------------

@contextlib.contextmanager
def atomic_local_file(path: str, durable: bool = True) -> Iterator[BinaryIO]:
    """A local file written through a temporary name and renamed into place on success: a
    reader sees the whole file or none of it, and a failed write leaves nothing behind.
    `durable` also flushes it to disk first (commit records, uploads; not cache downloads)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small object so that readers see all of it or nothing."""
    if is_local(fs):
        with atomic_local_file(path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)   # object stores publish an object only when it is complete


def put_file(fs: fsspec.AbstractFileSystem, local: str, remote: str) -> None:
    """Copy one local file to `remote`; a reader never sees a torn file on a local target."""
    if is_local(fs):
        with open(local, "rb") as src, atomic_local_file(remote) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    else:
        fs.put_file(local, remote)  # published only when its upload completes


def get_file(fs: fsspec.AbstractFileSystem, remote: str, local: str) -> str:
    """Download `remote` to the local path `local` atomically; returns the sha256 of the
    bytes read (hashed on the way, not read twice)."""
    with fs.open(remote, "rb", block_size=CHUNK) as src, atomic_local_file(local, durable=False) as dst:
        return _sha256(src, copy_to=dst)


def sha256_file(path: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """sha256 (hex) of a file: a local path, or a path inside `fs`."""
    if fs is None:
        with open(path, "rb") as f:
            return _sha256(f)
    with fs.open(path, "rb", block_size=CHUNK) as f:
        return _sha256(f)


def _sha256(src: BinaryIO, copy_to: BinaryIO | None = None) -> str:
    h = hashlib.sha256()
    while chunk := src.read(CHUNK):
        h.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return h.hexdigest()


# ---- transient errors -----------------------------------------------------------------------

def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network hiccups, timeouts, 5xx/408/429 — not missing files or 4xx."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
        return False
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and 400 <= code < 500 and code not in (408, 429):
        return False
    return True


def with_retries(what: str, fn: Callable[[], T], retries: int, base_delay: float = 0.5,
                 max_delay: float = 30.0) -> T:
    """Run fn, retrying transient failures with jittered exponential back-off."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # classified below; non-transient ones propagate at once
            if attempt >= retries or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** attempt) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        exc, attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1
