"""`pretrain prepare video --ray` on a real local Ray head (two worker CPUs, 127.0.0.1) gives
what a local prepare of the same manifest gives, to a folder and to gs:// (the emulator), and
an interrupted run redoes only its unfinished chunks.

The Ray runs are `pretrain` processes, as an operator starts them: Ray reads its environment
when first imported, and this test process may have imported it already."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from orchestration.cli import main as cli
from pretrain import storage
from pretrain.data import shards
from tests.fixtures.media import write_manifest
from tests.fixtures.ray_nodes import ray_cluster
from tests.fixtures.servers import BIN


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUBEVIT_CACHE_DIR", str(tmp_path / "cache"))


REPORT_FIELDS = ("written", "labels", "skipped", "unlabelled", "storage", "read_from",
                 "manifest", "num_classes")


def _samples(folder: str) -> list[dict]:
    from streaming import LocalDataset

    ds = LocalDataset(local=folder)
    return [ds[i] for i in range(len(ds))]


def _prepare(args: list[str], env: dict) -> tuple[dict, str]:
    """`pretrain prepare video ARGS --json`: the summary's dataset and the process's stderr."""
    proc = subprocess.run([str(BIN / "pretrain"), "prepare", "video", *args, "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["datasets"]["video"], proc.stderr


@pytest.mark.slow
def test_prepare_on_ray_equals_local_to_a_folder_and_to_gcs(media_dir, gcs_bucket, tmp_path,
                                                           capsys):
    broken = media_dir["broken"]
    rows = (media_dir["videos"][:6] + [(broken["corrupt"], "left"), (broken["missing"], "up")]
            + [(media_dir["videos"][6][0], "")])               # one unlabelled input
    manifest = write_manifest(str(tmp_path / "videos.csv"), rows)
    common = ["--manifest", manifest, "--dataset", "moves"]
    local = str(tmp_path / "local")
    assert cli(["prepare", "video", *common, "--out", local, "--workers", "1", "--no-progress",
                "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["datasets"]["video"]
    assert expected["written"] == 7 and expected["unlabelled"] == 1
    assert len(expected["skipped"]) == 2
    want = _samples(local)

    on_ray, remote = str(tmp_path / "ray"), f"{gcs_bucket}/ray"
    with ray_cluster(num_cpus=2) as cluster:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(cluster["env"])   # its token; STORAGE_EMULATOR_HOST is set by gcs_bucket
        ray_args = common + ["--ray", "--address", cluster["address"], "--chunk-size", "2"]
        got, err = _prepare(ray_args + ["--out", on_ray], env)   # with its progress bar
        assert "prepare video on Ray" in err
        assert got["chunks"] == {"total": 5, "reused": 0}
        got_gcs, _ = _prepare(ray_args + ["--out", remote, "--no-progress"], env)

        # Interrupted: one chunk never published its index, the merge never happened (part 3
        # holds the two broken files only: no index, its report says it is done).
        os.remove(os.path.join(on_ray, "part-00002", shards.INDEX))
        os.remove(os.path.join(on_ray, shards.INDEX))
        resumed, _ = _prepare(ray_args + ["--out", on_ray, "--no-progress"], env)
        assert resumed["chunks"] == {"total": 5, "reused": 4}

    fs = storage.emulator_filesystem(os.environ["STORAGE_EMULATOR_HOST"])
    from_gcs = str(tmp_path / "from-gcs")
    fs.get(remote.removeprefix("gs://") + "/", from_gcs, recursive=True)
    for report, folder in ((got, on_ray), (got_gcs, from_gcs), (resumed, on_ray)):
        assert {k: report[k] for k in REPORT_FIELDS} == {k: expected[k] for k in REPORT_FIELDS}
        assert _samples(folder) == want            # every column of every sample, in order
        for name in (shards.LABELS, shards.REPORT):
            assert os.path.exists(os.path.join(folder, name))
        assert json.load(open(os.path.join(folder, shards.LABELS))) == \
            json.load(open(os.path.join(local, shards.LABELS)))
    assert shards.dataset_info(remote)["num_unlabelled"] == 1


def test_ray_needs_a_cluster_address(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = write_manifest(str(tmp_path / "m.csv"), [("a.mp4", "x")])
    args = ["prepare", "video", "--manifest", manifest, "--out", str(tmp_path / "o")]
    assert cli(args + ["--ray"]) == 2
    assert "set RAY_ADDRESS or pass --address" in capsys.readouterr().err
    assert cli(args + ["--address", "127.0.0.1:1"]) == 2
    assert "--address is the Ray cluster of --ray" in capsys.readouterr().err
