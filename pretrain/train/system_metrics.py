"""Per-node system metrics in the job's MLflow run, beside the training metrics.

A slow run shows why: CPU and memory utilisation (compute or loader bound), network bytes
sent and received (object-storage reads, all-reduces, checkpoint uploads), disk usage (a
filling staging disk), and, on NVIDIA nodes, each GPU's utilisation, memory and power.

The sampling is MLflow's own SystemMetricsMonitor (psutil; pynvml for GPUs, skipped without
one): a daemon thread that samples every `tracking.system_metrics_every_s` seconds and logs
under `system/node_<N>/...` (e.g. `system/node_0/cpu_utilization_percentage`). One monitor
per node, in its local rank 0, since the figures are the machine's, not the process's. It
stops by itself when the run is no longer RUNNING, and at close().

Metric steps are the monitor's sample count, continued on resume (MLflow's resume_logging),
not training steps: read them against time in the MLflow UI.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def node_rank() -> int:
    """This process's node index: Ray Train sets NODE_RANK, torchrun GROUP_RANK."""
    for name in ("NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def is_node_leader() -> bool:
    """The one process per node that samples it (local rank 0; a lone process is one)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


class NodeMonitor:
    """Samples this node into `run_id` until close() (or until the run ends)."""

    def __init__(self, tracking_uri: str, run_id: str, every_s: float, node: int | None = None):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.node_id = f"node_{node_rank() if node is None else node}"
        # Quiet: MLflow logs "Started/Stopping monitoring" at INFO and "no GPU" on CPU nodes.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s,
                                             resume_logging=True, node_id=self.node_id,
                                             tracking_uri=tracking_uri)
        self._monitor.start()

    def close(self) -> None:
        """Stop sampling and send what is queued (waits at most one sampling interval)."""
        try:
            self._monitor.finish()
        except Exception as exc:   # the training's own result matters more than these
            log.warning("system metrics of %s: could not flush (%s)", self.node_id, exc)


def start_node_monitor(tracking_uri: str | None, run_id: str | None,
                       every_s: float) -> NodeMonitor | None:
    """A NodeMonitor when this process leads its node, tracking is on and sampling is
    asked for (every_s > 0); None otherwise. Never stops a run: a monitor that cannot start
    is one warning."""
    if not tracking_uri or not run_id or every_s <= 0 or not is_node_leader():
        return None
    try:
        return NodeMonitor(tracking_uri, run_id, every_s)
    except Exception as exc:
        log.warning("system metrics are off for this node: %s", exc)
        return None
