"""Bounded waits, clear failures and what listens where (issue 14 §8-§14), with real parts:
closed ports, a local HTTP server that is not MLflow or Ray, real model files cut short, a
real Ray that fails to start, real TCPStores and a real Ray Train process group."""
from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from orchestration.cli import main as cli
from pretrain import storage
from pretrain.errors import UserError
from pretrain.model import create_model, load_model, save_model
from pretrain.train import engine, tracking
from pretrain.train.config import TrackingConfig, load_config
from tests.fixtures.net import free_port

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


@contextlib.contextmanager
def not_mlflow_nor_ray():
    """A plain static-file HTTP server on 127.0.0.1 (answers 404 / 501 to API calls)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def listening(pid: int, port: int) -> set[str]:
    """The addresses process `pid` listens on at `port`."""
    return {c.laddr.ip for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


# ---------------------------------------------------------------------------------------
# §8 an MLflow server that cannot be used


def test_closed_port_is_a_clear_error_naming_the_way_out():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        tracking.usable_tracking_uri(TrackingConfig(tracking_uri=uri))
    text = str(err.value)
    assert uri in text and "nothing answers there" in text and "Nothing was trained" in text
    assert "tracking.required=false" in text


def test_a_server_that_is_not_mlflow_is_named_so():
    with not_mlflow_nor_ray() as url:
        with pytest.raises(UserError, match="answers HTTP, but not as an MLflow tracking server"):
            tracking.usable_tracking_uri(TrackingConfig(tracking_uri=url))


def test_not_required_falls_back_to_a_local_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    got = tracking.usable_tracking_uri(TrackingConfig(tracking_uri=uri, required=False))
    assert got == f"sqlite:///{tmp_path}/mlflow.db"
    err = capsys.readouterr().err
    assert "warning" in err and uri in err and got in err


def test_local_stores_need_no_server(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    assert tracking.usable_tracking_uri(TrackingConfig(tracking_uri=uri)) == uri


def test_pretrain_run_stops_before_preparing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    code = cli(["run", SMOKE, f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
                f"data.synthetic.root={data}", f"data.video_uri={data}/video/train"])
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert code == 2 and "cannot be used: nothing answers there" in err
    assert "Traceback" not in err and not data.exists()


def test_pretrain_run_refuses_a_held_checkpoint_uri_before_preparing_anything(tmp_path,
                                                                              monkeypatch, capsys):
    """Another live job's lease on checkpoint.uri: `pretrain run` says so in one paragraph
    before it prepares data or starts Ray (rank 0's claim stays the rule, see
    tests/test_checkpoint_restore_lease.py); a lease its holder stopped renewing does not
    stop it here."""
    from checkpoints.lease import LEASE, LeaseRecord

    monkeypatch.chdir(tmp_path)
    data, ckpt = tmp_path / "data", tmp_path / "ck"
    ckpt.mkdir()
    now = time.time()
    (ckpt / LEASE).write_bytes(LeaseRecord("elsewhere:42:live", "ray:98", "elsewhere", 42, now,
                                           now, 300.0).to_json())
    args = ["run", SMOKE, "tracking.enabled=false", f"checkpoint.uri={ckpt}",
            f"data.synthetic.root={data}", f"data.video_uri={data}/video/train"]
    code = cli(args)
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert code == 2 and "is in use by another job: elsewhere:42:live" in err
    assert "checkpoint.take_over_lease=true" in err
    assert "Traceback" not in err and not data.exists()

    from orchestration.driver import check_lease
    from pretrain.train.config import load_config

    cfg = load_config(SMOKE, [f"checkpoint.uri={ckpt}"])
    take_over = load_config(SMOKE, [f"checkpoint.uri={ckpt}", "checkpoint.take_over_lease=true"])
    check_lease(take_over)                         # asked to take it over: not stopped here
    (ckpt / LEASE).write_bytes(LeaseRecord("elsewhere:42:gone", "ray:97", "elsewhere", 42,
                                           now - 900, now - 900, 300.0).to_json())
    check_lease(cfg)                               # stopped renewing: taken over later


@pytest.mark.slow
def test_sigterm_ends_pretrain_run_while_it_waits_for_mlflow(tmp_path):
    """A real `pretrain run` process against a port that accepts and never answers: SIGTERM
    ends it at once (nothing is trained yet, so nothing is lost)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with socket.socket() as silent:          # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestration.cli", "run", SMOKE,
             f"tracking.tracking_uri=http://127.0.0.1:{silent.getsockname()[1]}"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not silent_has_client(silent) and time.monotonic() < deadline:
                assert proc.poll() is None
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == -signal.SIGTERM   # not ignored while it waits
        finally:
            proc.kill()
            proc.wait()


def silent_has_client(sock: socket.socket) -> bool:
    """A connection waits in `sock`'s backlog (the probe has started)."""
    port = sock.getsockname()[1]
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in psutil.net_connections("tcp"))


# ---------------------------------------------------------------------------------------
# §9 the MLflow run ends FAILED when Ray cannot start


@pytest.mark.slow
def test_ray_failing_to_start_ends_the_mlflow_run(tmp_path, monkeypatch):
    import tempfile

    from mlflow.tracking import MlflowClient

    from orchestration import driver

    # A real failure of ray.init: its socket paths under this temp folder are too long.
    long = tmp_path / ("t" * 120)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(SMOKE, [f"tracking.tracking_uri={uri}", "checkpoint.uri=null"])
    with pytest.raises(Exception, match="path length"):
        driver.run_job(cfg, config_name="ray-fails")
    run = MlflowClient(uri).get_run(cfg.tracking.run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "ray-fails"


# ---------------------------------------------------------------------------------------
# §10 files and addresses that are not what they should be


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "ti.safetensors"
    save_model(create_model("tubevit-ti", depth=1, dim=48, heads=2, mlp_dim=96), str(path))
    return path


def test_truncated_model_files_and_folders_are_user_errors(model_file, tmp_path):
    data = model_file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    for keep in (len(data) - 1, len(data) // 2, 8 + n // 2):   # tensors, header cut short
        cut = tmp_path / f"cut-{keep}.safetensors"
        cut.write_bytes(data[:keep])
        with pytest.raises(UserError, match=f"cut-{keep}.safetensors is truncated: {keep} bytes"):
            load_model(str(cut))
    with pytest.raises(UserError, match="is a folder; give the .safetensors file"):
        load_model(str(tmp_path))
    assert isinstance(load_model(str(model_file)), torch.nn.Module)


def test_bootstrap_tubes_from_a_truncated_file_is_one_paragraph(model_file, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_file.read_bytes()[:-100])
    code = cli(["bootstrap", "--image-checkpoint", str(model_file), "--tubes-from", str(cut),
                "--gate-layer", "1", "--out", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert code == 2 and "cut.safetensors is truncated" in err and "Traceback" not in err


def test_an_address_that_is_another_http_server_is_named_so(capsys):
    with not_mlflow_nor_ray() as url:
        code = cli(["list", "--address", url])
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert code == 2 and "answers HTTP but is not a Ray dashboard" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------
# §11 a short run of a long config


def test_warmup_longer_than_the_run_is_clamped_with_a_note(capsys):
    cfg = load_config(SMOKE, ["train.steps=20"])
    assert cfg.train.warmup_steps == 20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.warmup_steps (40) exceeds train.steps (20)" in err
    assert load_config(SMOKE, ["train.steps=100"]).train.warmup_steps == 40


# ---------------------------------------------------------------------------------------
# §12 the process group's store


def test_rank0_store_listens_on_the_address_it_is_given_only():
    from datetime import timedelta

    import torch.distributed as dist

    ours = engine.rendezvous_store("127.0.0.1", 0, rank=0, world_size=2, timeout_s=30)
    client = engine.rendezvous_store("127.0.0.1", ours.port, rank=1, world_size=2, timeout_s=30)
    ours.set("k", "v")
    assert client.get("k") == b"v"
    assert listening(os.getpid(), ours.port) == {"127.0.0.1"}
    # torch's own server store, for contrast: every interface, whatever host it was given
    theirs = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    assert listening(os.getpid(), theirs.port) & {"::", "0.0.0.0"}


def test_store_host_is_loopback_on_one_node_and_the_cluster_address_on_several():
    assert engine.store_host("10.0.0.5", ["10.0.0.5", "10.0.0.5"]) == "127.0.0.1"
    assert engine.store_host("10.0.0.5", ["10.0.0.5", "10.0.0.6"]) == "10.0.0.5"


STORE_JOB = """
import os, psutil
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from orchestration.process_group import BoundStoreTorchConfig

def report():
    import ray.train, torch.distributed as dist
    dist.barrier()
    if ray.train.get_context().get_world_rank() == 0:
        port = int(os.environ["MASTER_PORT"])
        ips = sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
        print("STORE", os.environ["MASTER_ADDR"], *ips, flush=True)
    dist.barrier()

TorchTrainer(report, torch_config=BoundStoreTorchConfig(backend="gloo", timeout_s=120),
             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(storage_path=os.environ["RESULTS"])).fit()
"""


@pytest.mark.slow
def test_ray_train_workers_share_a_store_on_loopback(ray_head, tmp_path, monkeypatch):
    """Two Ray Train workers in a job on the shared one-node head: their process group works
    and rank 0's store listens on 127.0.0.1 only."""
    from orchestration.ray_jobs import JobsClient

    for key, value in ray_head["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    script = tmp_path / "store_job.py"
    script.write_text(STORE_JOB)
    client = JobsClient(ray_head["dashboard"])
    client.submit(name="store-bind", entrypoint=f"{sys.executable} {script}", metadata={},
                  runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                            "RESULTS": str(tmp_path / "results")}})
    deadline = time.monotonic() + 300
    while client.resolve("store-bind").status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    logs = client.logs("store-bind")
    assert client.resolve("store-bind").status == "SUCCEEDED", logs[-3000:]
    reports = [line.split("STORE", 1)[1].split() for line in logs.splitlines() if "STORE" in line]
    # (MASTER_ADDR, then every address the store listens on); Ray may echo a worker's line
    assert reports and all(r == ["127.0.0.1", "127.0.0.1"] for r in reports), logs[-3000:]


# ---------------------------------------------------------------------------------------
# §13 credentials inside URIs


def test_credentials_in_uris_are_found_and_redacted():
    assert storage.credentials_in("https://alice:s3cret@mlflow.example.com/x")
    assert storage.credentials_in("https://TOKEN@host")
    assert storage.credentials_in("s3://KEY:SECRET@bucket/path")
    assert not storage.credentials_in("gs://bucket/path") and not storage.credentials_in("/a@b")
    assert not storage.credentials_in("postgresql://reader@db/mlflow")   # a name, no secret
    assert storage.redact_text("see https://a:b@h/x and s3://K:S@bkt") == \
        "see https://***@h/x and s3://***@bkt"


def test_pretrain_run_refuses_credentials_before_anything_happens(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli(["run", SMOKE, "checkpoint.uri=s3://AKIDEXAMPLE:hunter2@bucket/ckpt"])
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert code == 2 and "'checkpoint.uri' holds credentials" in err
    assert "hunter2" not in err and "AKIDEXAMPLE" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://u:pw@mlflow.example.com")
    with pytest.raises(UserError, match=r"MLFLOW_TRACKING_URI\) holds credentials"):
        tracking.usable_tracking_uri(TrackingConfig())
    assert not (tmp_path / "data").exists()


def test_the_torchrun_entry_refuses_credentials_too(tmp_path, monkeypatch, capsys):
    """`python -m pretrain.train.worker` (under torchrun) checks the config as `pretrain run`
    does, before any process group or data exists."""
    from pretrain.train.worker import main as worker_main

    monkeypatch.chdir(tmp_path)
    code = worker_main([SMOKE, "checkpoint.uri=s3://AKIDEXAMPLE:hunter2@bucket/ckpt"])
    err = capsys.readouterr().err.replace("\n  ", " ")
    assert code == 2 and "'checkpoint.uri' holds credentials" in err and "hunter2" not in err
    assert not (tmp_path / "data").exists()
