"""Ray Train driver: run the training function on a group of Ray workers.

    summary = run_job(cfg, config_name="smoke")

- Ray: joins `RAY_ADDRESS` when set, else starts an embedded local Ray bound to 127.0.0.1
  (dashboard on loopback, short temp dir: Ray's socket paths must stay under ~100 bytes).
- MLflow: the driver creates the job's one run and logs the resolved config (params +
  config.yaml) before any worker starts; the run id goes to the workers in the config, so
  restarts of the worker group (FailureConfig) keep logging into the same run.
- Progress: rank 0 sends its log-point figures to a zero-CPU sink actor (fire-and-forget,
  never waited on by training); the driver polls it and prints progress lines.
- The summary (final metrics, run id, last checkpoint) also travels through the sink: Ray
  Train V2 hands back only metrics attached to Ray checkpoints, and ours are not Ray's.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from pretrain.train.config import ExperimentConfig, to_dict
from pretrain.train.tracking import end_run, resolve_tracking_uri, start_run


def _train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker (module-level so Ray can pickle it by reference)."""
    import ray.train

    from pretrain.train.worker import train

    sink = config.pop("_sink")
    rank = ray.train.get_context().get_world_rank()

    def report(item: dict) -> None:
        if rank == 0:
            sink.put.remote(item)  # fire-and-forget: no round trip on the training path

    train(config, report=report, progress=False)


def _sink_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Sink:
        def __init__(self):
            self.items: list = []

        def put(self, item):
            self.items.append(item)

        def drain(self):
            out, self.items = self.items, []
            return out

    return Sink


def init_ray(cfg: ExperimentConfig) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; returns True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.resources.use_gpu else {}
    threads = cfg.resources.threads_per_worker or max(1, int(cfg.resources.cpus_per_worker))
    env["OMP_NUM_THREADS"] = str(threads)
    for key in ("MLFLOW_TRACKING_URI", "STORAGE_EMULATOR_HOST", "PYTHONPATH"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    runtime_env = {"env_vars": env}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env,
                 log_to_driver=True)
        return False
    temp = os.path.join(tempfile.gettempdir(), f"ray-{os.getuid()}-{os.getpid()}")
    need = cfg.resources.workers * cfg.resources.cpus_per_worker
    # The dashboard (loopback only) also serves the state API, which Ray Train V2's
    # placement-group cleaner polls; without it the console fills with its warnings.
    ray.init(
        address="local", include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=None, _node_ip_address="127.0.0.1",
        _temp_dir=temp, num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        num_gpus=None if cfg.resources.use_gpu else 0,
        runtime_env=runtime_env, log_to_driver=True, configure_logging=False,
    )
    return True


def run_job(cfg: ExperimentConfig, config_name: str = "run",
            on_progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train `cfg` on Ray; returns the summary dict (see pretrain.train.worker.train)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if cfg.tracking.enabled:
        cfg.tracking.tracking_uri = tracking_uri
        cfg.tracking.run_id = start_run(cfg, tracking_uri, run_name=config_name)
    started = init_ray(cfg)
    sink = _sink_actor().remote()
    status = "FAILED"
    summary: dict[str, Any] | None = None
    stop = threading.Event()

    def poll() -> None:
        nonlocal summary
        while True:
            done = stop.is_set()
            for item in ray.get(sink.drain.remote()):
                if "summary" in item:
                    summary = item["summary"]
                elif on_progress:
                    on_progress(item)
            if done:
                return
            stop.wait(1.0)

    poller = threading.Thread(target=poll, name="progress", daemon=True)
    poller.start()
    try:
        r = cfg.resources
        resources = {"CPU": r.cpus_per_worker}
        if r.use_gpu:
            resources["GPU"] = 1
        storage = os.path.join(tempfile.gettempdir(), "pretrain-ray-results")
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={**to_dict(cfg), "_sink": sink},
            torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo",
                                     timeout_s=int(r.timeout_s)),
            scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"{config_name}-{int(time.time())}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=r.max_failures)),
        )
        trainer.fit()
        status = "FINISHED"
    finally:
        stop.set()
        poller.join(30)
        if cfg.tracking.enabled and cfg.tracking.run_id:
            try:
                end_run(tracking_uri, cfg.tracking.run_id, status)
            except Exception as exc:  # the run's data is in; only its status is stale
                print(f"warning: could not mark MLflow run finished: {exc}", file=sys.stderr)
        if started:
            ray.shutdown()
    if summary is None:
        raise RuntimeError("training finished but rank 0 sent no summary")
    return summary
