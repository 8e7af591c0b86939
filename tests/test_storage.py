"""pretrain.storage: joining, reading, hashing, atomic writes and path resolution (local disk
and fsspec's in-memory filesystem; the GCS emulator is exercised by test_data_remote.py and
test_checkpoints_store.py)."""
from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from pretrain import storage


@pytest.mark.parametrize("base, parts, expected", [
    ("gs://bucket/run", ("step_1", "COMMIT.json"), "gs://bucket/run/step_1/COMMIT.json"),
    ("gs://bucket/run/", ("/step_1/", "x"), "gs://bucket/run/step_1/x"),
    ("gs://bucket", ("", "x"), "gs://bucket/x"),                 # empty parts are skipped
    ("gs://", ("bucket", "x"), "gs://bucket/x"),                 # a bare protocol keeps its //
    ("file:///", ("tmp",), "file:///tmp"),
    ("/data/shards", ("train", "index.json"), "/data/shards/train/index.json"),
    ("/data/shards//", ("index.json",), "/data/shards/index.json"),
    ("/", ("tmp", "x"), "/tmp/x"),
    ("relative/dir", ("a/b",), "relative/dir/a/b"),
    ("bucket/run", ("step_00000010",), "bucket/run/step_00000010"),   # inside a filesystem
    ("gs://bucket/run/", (), "gs://bucket/run"),
])
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


def test_filesystem_paths_have_no_trailing_slash_and_uri_of_gives_them_back(tmp_path):
    fs, path = storage.filesystem(str(tmp_path) + "/")
    assert storage.is_local(fs) and path == str(tmp_path)
    assert storage.uri_of(fs, path) == str(tmp_path)
    fs, path = storage.filesystem("memory://bucket/run/")
    assert not storage.is_local(fs) and not path.endswith("/")
    assert storage.uri_of(fs, path).startswith("memory://") and storage.uri_of(fs, path).endswith("bucket/run")


def test_unknown_protocol_is_a_user_error_naming_it():
    from pretrain.errors import UserError

    with pytest.raises(UserError, match="protocol 'nosuchproto'"):
        storage.filesystem("nosuchproto://x/y")


@pytest.mark.parametrize("root", ["local", "memory"])
def test_write_read_exists_round_trip(tmp_path, root):
    base = str(tmp_path) if root == "local" else f"memory://{uuid.uuid4().hex}"
    uri = storage.join(base, "deep", "folder", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"abc\n")                      # parent folders are created
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"abc\n"
    with storage.open_read(uri) as f:
        f.seek(1)
        assert f.read() == b"bc\n"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing"))


def test_sha256_matches_hashlib_local_and_in_a_filesystem(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "CHUNK", 1000)             # several chunks, a partial last one
    data = os.urandom(4321)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert storage.sha256_file(str(path)) == expected
    fs, p = storage.filesystem(f"memory://{uuid.uuid4().hex}/f.bin")
    fs.pipe_file(p, data)
    assert storage.sha256_file(p, fs) == expected
    local = tmp_path / "copy" / "f.bin"
    assert storage.get_file(fs, p, str(local)) == expected  # hashed while downloading
    assert local.read_bytes() == data


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(RuntimeError):
        with storage.atomic_local_file(str(target)) as f:
            f.write(b"half of it")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert os.listdir(target.parent) == []                  # no temporary left either
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_local_file(str(target)) as f:
            f.write(b"new but unfinished")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"                    # the previous file stays whole
    assert os.listdir(target.parent) == ["model.safetensors"]


def test_put_file_of_an_unreadable_source_leaves_nothing(tmp_path):
    fs, dst = storage.filesystem(str(tmp_path / "dst" / "x"))
    with pytest.raises(FileNotFoundError):
        storage.put_file(fs, str(tmp_path / "no-such-file"), dst)
    assert not os.path.exists(dst)
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    storage.put_file(fs, str(src), dst)
    assert open(dst, "rb").read() == b"payload"


def test_upload_folder_and_download(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"1")
    (src / "sub" / "b").write_bytes(b"22")
    remote = f"memory://{uuid.uuid4().hex}/data"
    assert storage.upload_folder(str(src), remote) == ["a", os.path.join("sub", "b")]
    assert storage.upload_folder(str(src), remote) == []     # same sizes: nothing again
    local = tmp_path / "back" / "b"
    assert storage.download(storage.join(remote, "sub", "b"), str(local)) == \
        hashlib.sha256(b"22").hexdigest()
    assert local.read_bytes() == b"22"


def test_absolute_anchors_relative_paths_and_sqlite_files_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    assert storage.absolute("runs/ck") == os.path.join(here, "runs", "ck")
    assert storage.absolute("runs/ck", cwd="/elsewhere") == "/elsewhere/runs/ck"
    assert storage.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert storage.absolute("/abs/../path") == "/path"
    assert storage.absolute("gs://bucket/x") == "gs://bucket/x"
    assert storage.absolute("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert storage.absolute("sqlite:///mlflow.db") == "sqlite:///" + os.path.join(here, "mlflow.db")
    assert storage.absolute("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_absolute_locations_changes_location_keys_only():
    tree = {"data": {"video_uri": "data/v", "cache_dir": "cache", "batch_size": 4,
                     "synthetic": {"root": "syn", "enabled": True}},
            "checkpoint": {"uri": "gs://b/run", "local_dir": "/tmp/x"},
            "model": {"name": "tubevit-b", "init_from": None},
            "tracking": {"tracking_uri": "sqlite:///m.db", "experiment": "relative-looking"}}
    out = storage.absolute_locations(tree, "/w")
    assert out == {"data": {"video_uri": "/w/data/v", "cache_dir": "/w/cache", "batch_size": 4,
                            "synthetic": {"root": "/w/syn", "enabled": True}},
                   "checkpoint": {"uri": "gs://b/run", "local_dir": "/tmp/x"},
                   "model": {"name": "tubevit-b", "init_from": None},
                   "tracking": {"tracking_uri": "sqlite:////w/m.db", "experiment": "relative-looking"}}
    assert tree["data"]["video_uri"] == "data/v"            # the input is not changed


def test_with_retries_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "done"

    assert storage.with_retries("op", flaky, retries=5, base_delay=0.001) == "done"
    assert len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.with_retries("op", missing, retries=5, base_delay=0.001)
    assert len(calls) == 1
