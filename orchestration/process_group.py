"""The process group of Ray Train workers, with rank 0's rendezvous store bound to one address.

Ray Train's TorchConfig makes the group with torch's env:// rendezvous, whose TCPStore
listens on every interface. `BoundStoreTorchConfig` is the same config with a backend that
makes it through pretrain.train.engine.init_process_group instead: the store listens on
127.0.0.1 when all workers share one node, else on the master node's cluster address (the
address Ray reports for it). Everything else (backend choice, env vars such as LOCAL_RANK,
CUDA device sharing, the train function's context, shutdown) stays Ray's.

Importing this module does not import torch, and neither does unpickling the config: Ray
Train's controller (an actor of its own) unpickles the config and runs the backend's
on_start / on_shutdown, but everything torch happens in the workers. So the config derives
from Ray's torch-free BackendConfig with TorchConfig's fields, rather than from TorchConfig
(whose module imports torch: ~3 CPU-s in the controller, on the path to the workers' start),
and every function the workers run is one of this module's, importing torch, Ray's torch
backend and pretrain.train.engine in the worker when it runs. `_BoundStoreBackend` mirrors
ray.train.torch.config._TorchBackend (Ray 2.60) apart from the store.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from ray.train.backend import Backend, BackendConfig


# ---- run in the workers (by reference: the controller needs only this module) ------------

def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _store_host(master: str, hosts: list[str]) -> str:
    from pretrain.train import engine

    return engine.store_host(master, hosts)


def _free_port(host: str) -> int:
    from pretrain.train import engine

    return engine.free_port(host)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_torch_env() -> None:
    """LOCAL_RANK, RANK, WORLD_SIZE, ... as Ray's torch backend sets them."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _init_process_group(backend: str, host: str, port: int, rank: int, world_size: int,
                        timeout_s: float) -> None:
    from pretrain.train import engine

    engine.init_process_group(backend, host, port, rank, world_size, timeout_s)


def _shutdown_torch(destroy_process_group: bool = False) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


# ---- run in Ray Train's controller -------------------------------------------------------

def _is_v1(worker_group) -> bool:
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup

    return isinstance(worker_group, V1WorkerGroup)


class _BoundStoreBackend(Backend):
    share_cuda_visible_devices: bool = True   # as Ray's torch backend

    def on_start(self, worker_group, backend_config: "BoundStoreTorchConfig") -> None:
        import ray

        hosts = worker_group.execute(_node_address)
        host = worker_group.execute_single(0, _store_host, hosts[0], hosts)
        port = worker_group.execute_single(0, _free_port, host)
        worker_group.execute(_set_master, addr=host, port=port)
        if not _is_v1(worker_group):   # LOCAL_RANK etc., as Ray's does
            worker_group.execute(_set_torch_env)
        backend = backend_config.backend or "gloo"
        # positional: execute_single_async's own first parameter is called `rank`
        ray.get([worker_group.execute_single_async(
            i, _init_process_group, backend, host, port, i, len(worker_group),
            backend_config.timeout_s)
            for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config) -> None:
        import ray
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)

        futures = worker_group.execute_async(_shutdown_torch,
                                             destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logging.getLogger(__name__).warning(
                "Torch process group shutdown timed out after %s seconds", timeout_s)

    def on_training_start(self, worker_group, backend_config) -> None:
        if _is_v1(worker_group):
            worker_group.execute(_set_torch_env)


@dataclass
class BoundStoreTorchConfig(BackendConfig):
    """Ray's TorchConfig (same fields and defaults), whose process group's store listens on
    one address (see module doc)."""

    backend: Optional[str] = None
    init_method: str = "env"   # kept for TorchConfig's interface: the store is always ours
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _BoundStoreBackend

    @property
    def train_func_context(self):
        # read where the trainer is built (the driver, which has torch); runs in the workers
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method,
                "timeout_s": self.timeout_s}
