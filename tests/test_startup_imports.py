"""What the processes of a `pretrain run` import on the way to the first step.

Ray Train's controller is an actor of its own: it unpickles the backend config and runs the
backend's on_start / on_shutdown, while everything torch happens in the workers. torch
there would cost ~3 CPU-s on the path to the workers' start (orchestration/process_group.py).
"""
from __future__ import annotations

import os
import subprocess
import sys

import ray.cloudpickle as cloudpickle

from orchestration.process_group import BoundStoreTorchConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONTROLLER = """
import pickle, sys
config = pickle.loads(sys.stdin.buffer.read())
backend = config.backend_cls()
print(type(config).__name__, config.backend, config.timeout_s, config.to_dict()["init_method"],
      config.framework.name, backend.share_cuda_visible_devices)
heavy = sorted(m for m in ("torch", "deepspeed", "mlflow", "pretrain.train.engine")
               if m in sys.modules)
print("heavy:", ",".join(heavy) or "none")
"""


def test_the_controller_side_of_the_process_group_does_not_import_torch():
    data = cloudpickle.dumps(BoundStoreTorchConfig(backend="gloo", timeout_s=77))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", CONTROLLER], input=data, env=env,
                         capture_output=True, timeout=120, check=True).stdout.decode()
    assert out.splitlines() == ["BoundStoreTorchConfig gloo 77 env TORCH True", "heavy: none"]


def test_the_config_keeps_torch_configs_fields_and_the_workers_context():
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import TorchConfigContextManager

    ours, ray_s = BoundStoreTorchConfig(), TorchConfig()
    assert (ours.backend, ours.init_method, ours.timeout_s) == \
        (ray_s.backend, ray_s.init_method, ray_s.timeout_s)
    assert ours.train_func_context is TorchConfigContextManager
    assert ours.framework == ray_s.framework
    assert (ours.backend_cls.share_cuda_visible_devices
            == ray_s.backend_cls.share_cuda_visible_devices)
