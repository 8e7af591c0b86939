"""The environment of a training process: which accelerator DeepSpeed drives and how many
CPU threads torch and OpenMP use. Decided here and nowhere else; orchestration/ray_env.py
hands the same variables to the processes Ray starts.

DeepSpeed picks its accelerator once, when it is first imported: from DS_ACCELERATOR, else by
probing for CUDA. A machine without a GPU, or a CPU config on a machine with one, must
therefore say "cpu" in the environment before anything imports DeepSpeed; that is why these
are environment variables rather than arguments.
"""
from __future__ import annotations

import os

ACCELERATOR = "DS_ACCELERATOR"
THREADS = "OMP_NUM_THREADS"


def machine_has_gpu() -> bool:
    """An NVIDIA driver is loaded here (its control device exists); checked without
    importing torch, so it is cheap enough for the CLI's start."""
    return os.path.exists("/dev/nvidiactl")


def default_accelerator() -> None:
    """At the CLI's start, before any config is read: without a GPU DeepSpeed runs on the
    CPU, unless DS_ACCELERATOR already says otherwise."""
    if ACCELERATOR not in os.environ and not machine_has_gpu():
        os.environ[ACCELERATOR] = "cpu"


def threads_per_worker(resources) -> int:
    """torch / OpenMP threads of one training worker: resources.threads_per_worker, else one
    per CPU the worker reserves."""
    return resources.threads_per_worker or max(1, int(resources.cpus_per_worker))


def process_env(use_gpu: bool, threads: int | None = None) -> dict[str, str]:
    """The variables a training process needs: the CPU accelerator unless the config uses
    GPUs (a GPU config leaves DeepSpeed's own detection alone), and its thread count."""
    env = {} if use_gpu else {ACCELERATOR: "cpu"}
    if threads:
        env[THREADS] = str(threads)
    return env


def config_env(resources) -> dict[str, str]:
    """process_env of a config's `resources` section."""
    return process_env(resources.use_gpu, threads_per_worker(resources))


def apply(env: dict[str, str]) -> None:
    """Put `env` into this process's environment; variables the user set already win."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def set_torch_threads(resources) -> None:
    """This worker's intra-op thread count (OMP_NUM_THREADS is read only at start-up, so a
    process that is already running sets torch's directly)."""
    import torch

    torch.set_num_threads(threads_per_worker(resources))


def uses_cpu() -> bool:
    """This process trains on the CPU: DS_ACCELERATOR says so, or there is no CUDA device."""
    if os.environ.get(ACCELERATOR) == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def cpu_tool_env() -> dict[str, str]:
    """The environment for a DeepSpeed tool run as a subprocess that works on the CPU only
    (checkpoint conversion): this process's, with the CPU accelerator unless one is set."""
    return {**os.environ, ACCELERATOR: os.environ.get(ACCELERATOR, "cpu")}
