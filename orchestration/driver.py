"""Ray Train driver: run the training function on a group of Ray workers.

    summary = run_job(cfg, config_name="smoke")

- Ray: joins `RAY_ADDRESS` when set, else starts an embedded local Ray bound to 127.0.0.1
  (dashboard on loopback, short temp dir: Ray's socket paths must stay under ~100 bytes).
- MLflow: the driver checks the server first (one short probe: an unusable server is a
  UserError within seconds, or the local fallback with tracking.required=false), creates
  the job's one run and logs the resolved config (params + config.yaml) while Ray starts,
  before any worker starts; the run id goes to the workers in the config, so restarts of
  the worker group (FailureConfig) keep logging into the same run. Any failure once the run
  exists, Ray's own start included, ends it FAILED.
- Process group: Ray Train's, except that rank 0's rendezvous store listens on loopback on
  one node and on its cluster address on several (orchestration/process_group.py).
- Progress: rank 0 sends its log-point figures to a zero-CPU sink actor (fire-and-forget,
  never waited on by training); the driver polls it and prints progress lines. With
  `on_console`, what our code in a worker prints or logs travels the same way
  (orchestration/console.py: WorkerConsole), so the caller can show it while the workers'
  whole output (Ray forwards it) goes elsewhere.
- The summary (final metrics, run id, last checkpoint) is the training function's return
  value on rank 0, which Ray Train hands back as `Result.return_value`.
- Resume: when checkpoint.uri holds a committed checkpoint, the driver checks it against
  this config's model (a mismatch is a UserError before any worker starts) and continues
  the MLflow run recorded in it; the workers load it (pretrain.train.checkpoint_hook). Ray Train's
  own checkpoints are not used: after a worker failure (FailureConfig) the restarted group
  resumes from our newest committed checkpoint the same way.
- Node drain (a spot reclaim): the workers poll Ray Train's preemption notice every
  train.preemption_poll_steps steps, checkpoint at once and train on
  (pretrain/train/preemption_poll.py); rank 0 reports each notice, which the driver prints
  ("preemption notice N: ...") and counts. When the node goes, Ray Train restarts the
  group (FailureConfig.max_preemption_failures = resources.max_preemptions) and it resumes
  from our newest checkpoint; the driver prints "worker group restart N" and the summary
  carries "preemptions" and "restarts".
- Elastic workers (`resources.workers: [min, max]`): ScalingConfig(num_workers=(min, max));
  Ray Train starts the group on as many workers as the cluster holds, restarts it on fewer
  when a node is lost (a failure, FailureConfig) and on more when capacity returns (checked
  every resources.elastic_resize_every_s). Each start resumes from our newest checkpoint
  with the global batch of max workers (pretrain/train/elastic.py); the driver prints the
  size of each restart and the summary lists them ("world_sizes").
- Stop: SIGTERM to this process (Ray Jobs' `stop`, a preempted node) sets a flag in the
  sink actor, which every worker polls without blocking each step; a worker that gets
  SIGTERM itself sets its own flag. The ranks agree on a step, write a final checkpoint
  and return, so fit() returns normally and the summary says "stopped".
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable

from orchestration import ray_env
from orchestration.process_group import BoundStoreTorchConfig
from pretrain.data.metadata import DataInfo
from pretrain.errors import UserError
from pretrain.process_env import config_env
from pretrain.train.config import ExperimentConfig, to_dict
from pretrain.train.tracking import end_run, start_run, usable_tracking_uri

log = logging.getLogger(__name__)

# Set to "0" before ray is imported, Ray keeps a 127.0.0.1 node address instead of swapping in
# the machine's external one: every server of a local cluster then listens on loopback only.
# (Named for its original use, allowing clusters on Windows/macOS; "0" makes a one-machine
# cluster that other nodes cannot join.)
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _train_loop_per_worker(config: dict) -> dict:
    """Runs in every Ray Train worker (module-level so Ray can pickle it by reference)."""
    import ray.train

    from pretrain.train.worker import train

    from orchestration.console import WorkerConsole

    sink = config.pop("_sink")
    forward = config.pop("_console", False)
    rank = ray.train.get_context().get_world_rank()
    console = None
    if forward:   # our lines of this worker also go to the driver's console, via the sink
        console = WorkerConsole(lambda lines: sink.put.remote({"console": lines, "rank": rank}),
                                rank, wait=lambda ref: ray.get(ref, timeout=10)).__enter__()
    try:
        # The training function runs in a thread of the worker actor; signal handlers can
        # only be set from its main thread, which is idle while training runs: ask it to.
        try:
            me = ray.get_runtime_context().current_actor
            ray.get(me.execute.remote(_install_worker_sigterm), timeout=60)
        except Exception as exc:  # training still works; only worker SIGTERM is not graceful
            print(f"warning: no graceful SIGTERM handling in worker {rank}: {exc}",
                  file=sys.stderr)

        def report(item: dict) -> None:
            if rank == 0:
                sink.put.remote(item)  # fire-and-forget: no round trip on the training path

        # the driver counts restarts of the group and the sizes it ran at (elastic workers)
        report({"group_start": time.time(),
                "world_size": ray.train.get_context().get_world_size()})
        return train(config, report=report, progress=False, should_stop=_DriverStop(sink),
                     preemption_info=ray.train.get_preemption_info)
    finally:
        if console is not None:
            console.close()   # its last lines reach the sink before fit() returns


def _install_worker_sigterm() -> bool:
    from pretrain.train.preempt import install_sigterm_handler

    return install_sigterm_handler()


class _DriverStop:
    """The driver's stop flag, polled without waiting: at most one request in flight."""

    def __init__(self, sink):
        self.sink, self.ref, self.stop = sink, None, False

    def __call__(self) -> bool:
        import ray

        if not self.stop:
            if self.ref is None:
                self.ref = self.sink.stop_requested.remote()
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                self.stop, self.ref = bool(ray.get(self.ref)), None
        return self.stop


def _sink_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Sink:
        def __init__(self):
            self.items: list = []
            self.stop = False

        def request_stop(self):
            self.stop = True

        def stop_requested(self):
            return self.stop

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
    runtime_env = ray_env.runtime_env(config_env(cfg.resources), pass_env=ray_env.WORKER_PASS_ENV)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env,
                 log_to_driver=True)
        return False
    temp = os.path.join(tempfile.gettempdir(), f"ray-{os.getuid()}-{os.getpid()}")
    need = cfg.resources.max_workers * cfg.resources.cpus_per_worker
    # The dashboard (loopback only) also serves the state API, which Ray Train V2's
    # placement-group cleaner polls; without it the console fills with its warnings.
    # No prestarted workers: Ray would start one idle worker process per CPU for this
    # driver, which none of ours uses (the training workers and Ray Train's actors ask for
    # their own runtime_env or come later, and get new processes); each costs ~1 CPU-s
    # while the job's own processes start on the same cores.
    ray.init(
        address="local", include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=None, _node_ip_address="127.0.0.1",
        _temp_dir=temp, num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        num_gpus=None if cfg.resources.use_gpu else 0,
        runtime_env=runtime_env, log_to_driver=True, configure_logging=False,
        _system_config={"prestart_worker_first_driver": False},
    )
    return True


def run_job(cfg: ExperimentConfig, config_name: str = "run",
            on_progress: Callable[[dict], None] | None = None,
            data_info: DataInfo | None = None,
            tags: dict[str, str] | None = None,
            on_console: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train `cfg` on Ray; returns the summary dict (see pretrain.train.worker.train).
    `data_info`: the datasets' metadata when the caller has read it already; `tags`: MLflow
    run tags (`pretrain submit --tag`); `on_console`: gets the lines our code in the workers
    prints or logs (rank 0's as they are, others' as "[rank N] ...")."""
    import ray

    # Before anything starts: the resume point (a mismatch is a UserError) and the MLflow
    # server (unreachable: a UserError within ~30 s, or the local fallback). SIGTERM still has
    # its default action here: nothing is trained yet, so nothing is lost by dying.
    resume = resume_point(cfg, data_info)
    tracking_uri = None
    if cfg.tracking.enabled:
        tracking_uri = usable_tracking_uri(cfg.tracking)
        cfg.tracking.tracking_uri = tracking_uri
    # While Ray starts (ray.init mostly waits for the processes it starts: its dashboard,
    # then its raylet), a thread creates the MLflow run and logs the config (MLflow's import
    # and a new sqlite store's migrations: ~4 CPU-s), then imports Ray Train (~2 CPU-s).
    # One thread, in that order: two threads importing the same packages at once can make
    # Python's import locks report a false deadlock. Both are done before any worker starts.
    pool = ThreadPoolExecutor(1, thread_name_prefix="before-workers")
    before_workers = pool.submit(_before_workers, cfg, resume, tracking_uri, config_name, tags)
    pool.shutdown(wait=False)   # the thread ends with its one task
    term = threading.Event()
    previous = _on_sigterm(term)
    ray_before = ray.is_initialized()
    status = "FAILED"   # what the MLflow run ends as unless training returns normally
    summary: dict[str, Any] | None = None
    stop = threading.Event()
    poller: threading.Thread | None = None
    # Everything from here on, Ray's start included, ends the MLflow run in `finally`.
    try:
        try:
            init_ray(cfg)
        finally:
            wait([before_workers])   # the run exists (or failed) before anything goes on
        before_workers.result()   # re-raises its failure: this job's, as before Ray started
        if resume is not None:
            print(f"resuming from {resume.uri} (step {resume.step}"
                  + (f", MLflow run {cfg.tracking.run_id}" if cfg.tracking.run_id else "") + ")",
                  file=sys.stderr, flush=True)
        _on_sigterm(term)   # ray.init replaces the SIGTERM handler with its own
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        # On the driver's node: the sink must outlive any worker node (a lost node, an
        # elastic shrink), and it dies with the driver's node only when the job does too.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        sink = _sink_actor().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        counts = {"group_start": 0, "preemption": 0, "world_sizes": [], "notices": []}

        def poll() -> None:
            asked = False
            while True:
                done = stop.is_set()
                if term.is_set() and not asked:
                    sink.request_stop.remote()
                    asked = True
                for item in ray.get(sink.drain.remote()):
                    if "console" in item:
                        if on_console:
                            prefix = f"[rank {item['rank']}] " if item.get("rank") else ""
                            on_console("\n".join(prefix + line for line in item["console"]))
                    elif "group_start" in item or "preemption" in item:
                        _count(item, counts)
                    elif on_progress:
                        on_progress(item)
                if done:
                    return
                stop.wait(0.25 if not asked else 1.0)

        poller = threading.Thread(target=poll, name="progress", daemon=True)
        poller.start()
        r = cfg.resources
        resources = {"CPU": r.cpus_per_worker}
        if r.use_gpu:
            resources["GPU"] = 1
        storage = os.path.join(tempfile.gettempdir(), "pretrain-ray-results")
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={**to_dict(cfg), "_sink": sink, "_console": on_console is not None},
            torch_config=BoundStoreTorchConfig(backend="nccl" if r.use_gpu else "gloo",
                                               timeout_s=int(r.timeout_s)),
            # a [min, max] range: elastic (pretrain/train/elastic.py keeps the global batch)
            scaling_config=ScalingConfig(num_workers=r.worker_range if r.elastic else r.workers,
                                         use_gpu=r.use_gpu,
                                         resources_per_worker=resources,
                                         elastic_resize_monitor_interval_s=r.elastic_resize_every_s),
            run_config=RunConfig(name=f"{config_name}-{int(time.time())}", storage_path=storage,
                                 failure_config=FailureConfig(
                                     max_failures=r.max_failures,
                                     max_preemption_failures=r.max_preemptions)),
        )
        try:
            summary = trainer.fit().return_value
        except Exception as exc:
            user = _user_error_in(exc)
            if user is not None:
                raise UserError(str(user)) from None
            raise
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        stop.set()
        if poller is not None:
            poller.join(30)
        if summary is not None and summary.get("stopped"):
            status = "KILLED"   # interrupted; a resume sets it RUNNING again
        if cfg.tracking.enabled and cfg.tracking.run_id:
            try:
                end_run(tracking_uri, cfg.tracking.run_id, status)
            except Exception as exc:  # the run's data is in; only its status is stale
                print(f"warning: could not mark MLflow run finished: {exc}", file=sys.stderr)
        if not ray_before and ray.is_initialized():
            ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if summary is None:
        raise RuntimeError("training finished but rank 0 returned no summary")
    summary["preemptions"] = counts["preemption"]
    summary["restarts"] = max(counts["group_start"] - 1, 0)
    summary["world_sizes"] = counts["world_sizes"]   # one per group start: [2, 1, 2] elastic
    if counts["notices"]:   # all of the job's, not only those of the last group's rank 0
        summary["preemption_notices"] = counts["notices"]
    return summary


def _before_workers(cfg: ExperimentConfig, resume, tracking_uri: str | None, config_name: str,
                    tags: dict[str, str] | None) -> None:
    """The job's MLflow run when tracking is on (continued from the resume point's, when this
    server has it; its id goes into cfg.tracking.run_id), then Ray Train's modules imported."""
    if cfg.tracking.enabled:
        if resume is not None and not cfg.tracking.run_id:
            cfg.tracking.run_id = _continued_run(resume, tracking_uri)
        cfg.tracking.run_id = start_run(cfg, tracking_uri, run_name=config_name, tags=tags)
    import ray.train.torch  # noqa: F401  (run_job's imports of it are then instant)


def _count(item: dict, counts: dict) -> None:
    """A worker group start or a drain notice from rank 0: counted and kept (the group's size,
    the notice), one line each (after the first start). `pretrain status` reads these lines
    back from a job's log."""
    if "group_start" in item:
        counts["group_start"] += 1
        counts["world_sizes"].append(item.get("world_size"))
        if counts["group_start"] > 1:
            print(f"worker group restart {counts['group_start'] - 1}: resuming from the newest "
                  f"checkpoint on {item.get('world_size')} worker(s)", file=sys.stderr, flush=True)
        return
    from pretrain.train.preemption_poll import describe

    notice = item["preemption"]
    counts["preemption"] += 1
    counts["notices"].append(notice)
    print(describe(notice, notice.get("step", 0), prefix=f"preemption notice {counts['preemption']}"),
          file=sys.stderr, flush=True)


def _on_sigterm(term: threading.Event):
    """Route SIGTERM to `term` (main thread only); returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame) -> None:
        if not term.is_set():
            print("SIGTERM received: the workers stop at the next step and write a final "
                  "checkpoint", file=sys.stderr, flush=True)
        term.set()

    return signal.signal(signal.SIGTERM, handler)


def check_lease(cfg: ExperimentConfig) -> None:
    """LeaseHeld (a UserError) when another live job holds checkpoint.uri's lease: `pretrain
    run` checks it before it prepares data or starts Ray, so a second job on the URI is
    refused in seconds instead of once its workers built their models. Only a read:
    rank 0 still claims the lease (checkpoints.lease) and is the rule; a lease taken between
    this check and that claim is found there."""
    if not cfg.checkpoint.uri:
        return
    from checkpoints.lease import Lease, LeaseHeld

    try:
        Lease(str(cfg.checkpoint.uri).rstrip("/"), attempt="driver-check",
              timeout_s=cfg.checkpoint.lease_timeout_s,
              take_over=cfg.checkpoint.take_over_lease).check()
    except LeaseHeld:
        raise
    except Exception as exc:   # storage trouble is rank 0's to report, as it always was
        log.debug("lease check of %s skipped: %s", cfg.checkpoint.uri, exc)


def resume_point(cfg: ExperimentConfig, data_info: DataInfo | None = None):
    """The committed checkpoint this run will resume from (CheckpointInfo), or None.

    Checked here, before Ray starts, against the model this config builds: resuming into
    another model family (model.name) or a different architecture is a UserError naming the
    families or listing the differing keys."""
    if not cfg.checkpoint.uri or not cfg.checkpoint.resume:
        return None
    from checkpoints.discovery import resume_candidates
    from checkpoints.restore import built_from_name, check_compatible

    # the one the workers will load first: checkpoint.resume_from, else the newest that
    # verifies (the workers move on to an older one only if this one breaks while fetched)
    info = next(resume_candidates(cfg.checkpoint.uri, cfg.checkpoint.resume_from), None)
    if info is None:
        return None
    current = expected_model_config(cfg, data_info)
    if current is not None:
        # current is None for models from a file, so cfg.model.name is what builds this one
        check_compatible(info.manifest.model_config, current, info.uri,
                         saved_name=built_from_name(info.manifest.config), current_name=cfg.model.name)
    return info


def expected_model_config(cfg: ExperimentConfig,
                          data_info: DataInfo | None = None) -> dict[str, Any] | None:
    """The architecture config the workers will build (on the meta device: no memory).
    None for models that come from a file (the workers check those when they load).
    Its heads come from `data_info` (read from storage when not given)."""
    if cfg.model.init_from or cfg.bootstrap.init_from:
        return None
    import torch

    from checkpoints.manager import model_config_of
    from pretrain.train.worker import build_model

    num_classes = (data_info or DataInfo.from_config(cfg.data)).num_classes
    with torch.device("meta"):
        model = build_model(cfg, num_classes)   # the objective's model (masked: with decoder)
    return model_config_of(model)


def _continued_run(info, tracking_uri: str) -> str | None:
    """The MLflow run recorded in checkpoint `info`, if this tracking server has it."""
    from mlflow.tracking import MlflowClient

    run_id = info.manifest.mlflow_run_id
    if not run_id:
        return None
    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception:
        print(f"warning: checkpoint {info.uri} belongs to MLflow run {run_id}, which "
              f"{tracking_uri} does not have; logging to a new run", file=sys.stderr)
        return None
    return run_id


def _user_error_in(exc: BaseException) -> BaseException | None:
    """A UserError raised in a worker, found inside Ray Train's failure wrappers."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return None
