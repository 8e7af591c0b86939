"""MLflow tracking: one run per job, metrics sent in batches from a background thread.

A synchronous `log_metric` to a server costs ~80 ms, more than a small training step, so
rank 0 only puts metrics on a queue (microseconds) and a daemon thread sends them with
`log_batch` every `flush_every_s`. Other ranks send no training metrics; each node's local
rank 0 samples its machine into the run (pretrain/train/system_metrics.py).

`mark()` ties the metrics to checkpoints: a checkpoint is committed only once every metric
logged before it was saved has reached the server. Otherwise a worker killed between a
commit and the next flush would lose those steps for good: the restarted run resumes after
them and never trains (or logs) them again.

Who creates the run: the driver (`pretrain run`) when there is one, so the run exists
before any worker starts and all restarts of the worker group log into it; standalone
(`torchrun`) rank 0 creates it. Either way the run id travels in `tracking.run_id` (or in
the checkpoint a standalone run resumes from). `open_tracking` makes that decision for a
training process and `Tracking.close` undoes what it opened.
"""
from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pretrain import storage
from pretrain.errors import UserError
from pretrain.train.config import ExperimentConfig, flatten, to_dict, to_yaml
from pretrain.train.system_metrics import NodeMonitor, start_node_monitor

MAX_BATCH = 1000      # MLflow's per-request limit for metrics
MAX_PARAMS = 100      # ... and for params
MAX_PARAM_LEN = 6000


def resolve_tracking_uri(uri: str | None) -> str:
    """Config value > $MLFLOW_TRACKING_URI > sqlite file in the working directory.

    Relative sqlite/file URIs are made absolute, because Ray workers do not necessarily run
    in the driver's working directory.
    """
    return storage.absolute(uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


# The start-up check of a tracking server: one request, no retries, a short timeout. MLflow's
# own defaults (7 retries with exponential back-off, 120 s per request) kept `pretrain run`
# silent for minutes against a server that was simply not there.
PROBE_TIMEOUT_S = 10
PROBE_ATTEMPTS = 2


def is_server(uri: str) -> bool:
    """A tracking URI that names a server (http/https/databricks), not a local store."""
    return uri.split("://", 1)[0] in ("http", "https", "databricks")


def probe(uri: str) -> str | None:
    """None when `uri` answers like an MLflow tracking server, else why not (one line).

    Local stores (sqlite, file) need no check. At most PROBE_ATTEMPTS x PROBE_TIMEOUT_S."""
    if not is_server(uri):
        return None
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)

    why = ""
    for _ in range(PROBE_ATTEMPTS):   # a second try only after a timeout (a busy server)
        with _env({MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0",
                   MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(PROBE_TIMEOUT_S)}):
            try:
                _client(uri).search_experiments(max_results=1)
                return None
            except Exception as exc:  # classified into one line below
                why = _one_line(exc)
        if not why.startswith("no answer"):
            break
    return why


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    code = re.search(r"error code (\d{3})", text)
    if code and code.group(1) in ("401", "403"):
        return (f"it refused our credentials (HTTP {code.group(1)}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if code:
        return ("it answers HTTP, but not as an MLflow tracking server (its REST API "
                f"/api/2.0/mlflow/experiments/search returned HTTP {code.group(1)})")
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer within {PROBE_TIMEOUT_S} s"
    if "Max retries exceeded" in text or "Connection refused" in text or "NewConnectionError" in text:
        return "nothing answers there (connection refused or host unreachable)"
    return f"{type(exc).__name__}: {storage.redact_text(text)[:300]}"


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def local_fallback_uri() -> str:
    """Where a run logs when its server is unreachable and tracking.required is false."""
    return storage.absolute("sqlite:///mlflow.db")


def usable_tracking_uri(tracking) -> str:
    """The tracking URI a run logs to (tracking: the config's `tracking` section), checked
    before anything trains: an unreachable server is a UserError within ~30 s, or, with
    `tracking.required: false`, a warning and the local fallback (local_fallback_uri)."""
    uri = resolve_tracking_uri(tracking.tracking_uri)
    storage.refuse_credentials(uri, "tracking.tracking_uri (or $MLFLOW_TRACKING_URI)")
    why = probe(uri)
    if why is None:
        return uri
    if not getattr(tracking, "required", True):
        fallback = local_fallback_uri()
        print(f"warning: MLflow at {uri} cannot be used ({why}); tracking.required is false, so "
              f"this run logs to {fallback} instead", file=sys.stderr, flush=True)
        return fallback
    raise UserError(
        f"MLflow tracking server {uri} cannot be used: {why}. Nothing was trained. Start the "
        "server (mlflow server --host 127.0.0.1 --port PORT) or fix tracking.tracking_uri / "
        "$MLFLOW_TRACKING_URI; to train anyway and log to a local sqlite file, set "
        "tracking.required=false; to not log at all, tracking.enabled=false.")


def start_run(cfg: ExperimentConfig, tracking_uri: str, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create (or reopen, when tracking.run_id is set) the job's run; log the resolved config
    as params and as `config.yaml`, and `tags` as run tags. Returns the run id."""
    client = _client(tracking_uri)
    if cfg.tracking.run_id:
        client.update_run(cfg.tracking.run_id, status="RUNNING")
        _set_tags(client, cfg.tracking.run_id, tags)
        return cfg.tracking.run_id
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or run_name, tags=tags or None)
    run_id = run.info.run_id
    log_config(client, run_id, cfg)
    return run_id


def _set_tags(client, run_id: str, tags: dict[str, str] | None) -> None:
    from mlflow.entities import RunTag

    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in sorted(tags.items())])


def log_config(client, run_id: str, cfg: ExperimentConfig) -> None:
    from mlflow.entities import Param

    flat = flatten(to_dict(cfg))
    flat.pop("tracking.run_id", None)  # set after the run exists; not a hyper-parameter
    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
    for i in range(0, len(params), MAX_PARAMS):
        client.log_batch(run_id, params=params[i:i + MAX_PARAMS])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


class MetricLogger:
    """Non-blocking metric sink for rank 0. `log()` enqueues; a thread batches and sends."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.flush_every_s = flush_every_s
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._warned = False
        self.sent = 0
        self.send_time_s = 0.0   # spent in the background thread, for the benchmark
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            self._q.put((k, float(v), ts, step))

    def mark(self) -> threading.Event:
        """An event set once every metric logged before this call has been sent (or given
        up on after retries): a checkpoint waits on it before it commits."""
        sent = threading.Event()
        if not self._thread.is_alive():
            sent.set()
        else:
            self._q.put(sent)
        return sent

    def close(self, timeout: float = 60.0) -> None:
        """Send everything still queued, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        from mlflow.entities import Metric

        client = _client(self.tracking_uri)
        pending: list = []
        marks: list[threading.Event] = []   # set once `pending` is sent
        last = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            try:
                item = self._q.get(timeout=0.2)
                while True:
                    if isinstance(item, threading.Event):
                        marks.append(item)
                        break    # flush now: a checkpoint is waiting
                    pending.append(Metric(*item))
                    if len(pending) >= MAX_BATCH:
                        break
                    item = self._q.get_nowait()
            except queue.Empty:
                pass
            due = time.monotonic() - last >= self.flush_every_s
            if pending and (due or stopping or marks or len(pending) >= MAX_BATCH):
                self._send(client, pending)
                pending, last = [], time.monotonic()
            if not pending:
                for m in marks:
                    m.set()
                marks = []
            if stopping and self._q.empty() and not pending:
                return

    def _send(self, client, metrics: list) -> None:
        t0 = time.perf_counter()
        for attempt in range(3):
            try:
                client.log_batch(self.run_id, metrics=metrics)
                self.sent += len(metrics)
                break
            except Exception as exc:  # a flaky server must not stop training
                if attempt == 2 and not self._warned:
                    print(f"warning: MLflow logging to {self.tracking_uri} failed ({exc}); "
                          f"{len(metrics)} metric values were not recorded", file=sys.stderr)
                    self._warned = True
                time.sleep(0.5 * (attempt + 1))
        self.send_time_s += time.perf_counter() - t0


class NullLogger:
    """Stand-in on ranks other than 0 and when tracking is off."""
    sent = 0
    send_time_s = 0.0

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def mark(self) -> threading.Event:
        done = threading.Event()
        done.set()
        return done

    def close(self, timeout: float = 0.0) -> None:
        pass


def last_logged_step(tracking_uri: str, run_id: str) -> int:
    """The highest step of train/loss already in the run (-1: none): a run restarted after
    a crash re-trains the steps since its last checkpoint, and must not log them again."""
    try:
        history = _client(tracking_uri).get_metric_history(run_id, "train/loss")
    except Exception as exc:  # tracking trouble must not stop training
        print(f"warning: could not read MLflow run {run_id} ({exc})", file=sys.stderr)
        return -1
    return max((m.step for m in history), default=-1)


class SkipLogged:
    """A metric logger that drops steps at or below `done` (already in the run)."""

    def __init__(self, inner: MetricLogger, done: int):
        self.inner, self.done = inner, done

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self.done:
            self.inner.log(metrics, step)

    def mark(self) -> threading.Event:
        return self.inner.mark()

    def close(self, timeout: float = 60.0) -> None:
        self.inner.close(timeout)

    @property
    def send_time_s(self) -> float:
        return self.inner.send_time_s


@dataclass
class Tracking:
    """One training process's side of MLflow: where metrics go, and what to undo at the end.

    `logger` is a NullLogger on ranks other than 0 and when tracking is off. `commit_gate`
    (rank 0, tracking on) is what a checkpoint waits on before it commits (see
    pretrain.train.checkpoint_hook)."""
    uri: str | None                      # None when tracking is off
    run_id: str | None
    logger: MetricLogger | SkipLogged | NullLogger
    owns_run: bool = False               # this process created the run: it ends it
    system: NodeMonitor | None = None    # this node's system metrics (its local rank 0)

    @property
    def commit_gate(self) -> Callable[[], threading.Event] | None:
        return None if isinstance(self.logger, NullLogger) else self.logger.mark

    def close(self, failed: bool = False) -> None:
        """Send what is queued; end the run if this process opened it."""
        if self.system is not None:
            self.system.close()
        self.logger.close()
        if self.owns_run and self.uri and self.run_id:
            try:
                end_run(self.uri, self.run_id, "FAILED" if failed else "FINISHED")
            except Exception as exc:  # must not hide the training's own error
                print(f"warning: could not end MLflow run {self.run_id} ({exc})", file=sys.stderr)


def open_tracking(cfg: ExperimentConfig, rank: int, resumed_run_id: str | None) -> Tracking:
    """Which run this process logs to, and its logger.

    The run is tracking.run_id (made by the driver), else the one recorded in the checkpoint
    being resumed, else (standalone, rank 0) a new one. A continued run already holds the
    steps up to its last log point, which a restart trains again: they are not logged twice.
    """
    run_id = cfg.tracking.run_id or resumed_run_id
    if not cfg.tracking.enabled:
        return Tracking(None, run_id, NullLogger())
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    every_s = cfg.tracking.system_metrics_every_s
    if rank != 0:   # a node's local rank 0 samples it, once the run is known
        return Tracking(uri, run_id, NullLogger(), system=start_node_monitor(uri, run_id, every_s))
    if not run_id:   # standalone: no driver made the run (nor checked its server)
        uri = usable_tracking_uri(cfg.tracking)
        run_id = start_run(cfg, uri, run_name=cfg.tracking.run_name)
        return Tracking(uri, run_id, MetricLogger(uri, run_id, cfg.tracking.flush_every_s),
                        owns_run=True, system=start_node_monitor(uri, run_id, every_s))
    logger = MetricLogger(uri, run_id, cfg.tracking.flush_every_s)
    return Tracking(uri, run_id, SkipLogged(logger, last_logged_step(uri, run_id)),
                    system=start_node_monitor(uri, run_id, every_s))
