"""The process group of Ray Train workers, with rank 0's rendezvous store bound to one address.

Ray Train's TorchConfig makes the group with torch's env:// rendezvous, whose TCPStore
listens on every interface. `BoundStoreTorchConfig` is the same config with a backend that
makes it through pretrain.train.engine.init_process_group instead: the store listens on
127.0.0.1 when all workers share one node, else on the master node's cluster address (the
address Ray reports for it). Everything else (backend choice, env vars such as LOCAL_RANK,
shutdown) stays Ray's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from pretrain.train import engine


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundStoreTorchConfig") -> None:
        import ray

        hosts = worker_group.execute(_node_address)
        host = engine.store_host(hosts[0], hosts)
        port = worker_group.execute_single(0, engine.free_port, host)
        worker_group.execute(_set_master, addr=host, port=port)
        if not isinstance(worker_group, V1WorkerGroup):   # LOCAL_RANK etc., as Ray's does
            worker_group.execute(_set_torch_distributed_env_vars)
        backend = backend_config.backend or "gloo"
        # positional: execute_single_async's own first parameter is called `rank`
        ray.get([worker_group.execute_single_async(
            i, engine.init_process_group, backend, host, port, i, len(worker_group),
            backend_config.timeout_s)
            for i in range(len(worker_group))])


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """TorchConfig whose process group's store listens on one address (see module doc)."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend
