"""The DeepSpeed engine built from the experiment config.

Imports DeepSpeed lazily: its import probes the accelerator, which must already be fixed
(`DS_ACCELERATOR=cpu` on machines without a GPU, see pretrain/process_env.py) by the time
this runs.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

from pretrain.process_env import uses_cpu
from pretrain.train.config import ExperimentConfig
from pretrain.train.elastic import micro_batches_per_step
from pretrain.train.optim import build_optimizer, build_scheduler


# ---- the process group's rendezvous store ------------------------------------------------
#
# torch's own rendezvous (env://, tcp://) starts rank 0's TCPStore on every interface (`::`),
# whatever MASTER_ADDR says: on a machine whose Ray, dashboard and MLflow listen on loopback
# only, the store was the one port open to the network. Here rank 0 binds the socket itself,
# to one address, and hands it to the store (TCPStore's master_listen_fd).

LOOPBACK = "127.0.0.1"


def store_host(master_addr: str, worker_hosts: list[str]) -> str:
    """The address rank 0's store listens on: loopback when every worker runs on one node
    (nothing outside it needs the store), else the master node's cluster address."""
    return LOOPBACK if len(set(worker_hosts)) <= 1 else master_addr


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening: the store's server socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def free_port(host: str) -> int:
    """A port free on `host` now (the store's rank 0 binds it moments later)."""
    with listening_socket(host, 0) as sock:
        return sock.getsockname()[1]


def rendezvous_store(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """The c10d TCPStore of a process group: rank 0 serves it on `host` only (not on every
    interface), the other ranks connect to it there."""
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    sock = listening_socket(host, port)
    port = sock.getsockname()[1]          # the one chosen when `port` was 0
    # detach: the store's server owns the descriptor from now on (the socket object's
    # finalizer would otherwise close it under the server).
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                         wait_for_workers=False, master_listen_fd=sock.detach())


def init_process_group(backend: str, host: str, port: int, rank: int, world_size: int,
                       timeout_s: float) -> None:
    """torch.distributed's default process group over rendezvous_store(...)."""
    from datetime import timedelta

    import torch.distributed as dist

    if backend == "nccl":   # a hung collective fails the step instead of hanging it (as Ray's)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    store = rendezvous_store(host, port, rank, world_size, timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def micro_batch_size(cfg: ExperimentConfig) -> int:
    """Per-rank micro-batch size DeepSpeed is told about (the video batch size).

    DeepSpeed only uses it for its own throughput printouts and batch-size arithmetic;
    image and video batches may differ in size and the loop counts real samples itself.
    """
    return cfg.data.batch_size


BUCKET_ALIGN = 256   # a bucket capped at the model's size is a multiple of this (deepspeed_config)


def deepspeed_config(cfg: ExperimentConfig, world_size: int,
                     trainable_elements: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of `cfg` on `world_size` ranks. `trainable_elements` (the
    model's trainable parameter count, when known) caps the ZeRO-1/2 buckets; see below."""
    t = cfg.train
    mbs = micro_batch_size(cfg)
    # elastic workers: fewer ranks split their larger share into more micro-batches
    accum = t.grad_accum_steps * micro_batches_per_step(cfg.resources, world_size)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mbs * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,           # our own metrics, not DeepSpeed's log lines
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": t.zero_stage,
            # Joint training: the head of the other dataset (and, on image steps, the 3-D
            # tubes) get no gradient; ZeRO must fill zeros instead of waiting for them.
            "ignore_unused_parameters": True,
            "reduce_bucket_size": t.zero_bucket_elements,
        },
    }
    if t.zero_stage in (1, 2):
        # ZeRO-1/2 allocate the reduce bucket afresh (torch.empty of the whole bucket size)
        # at every backward. A bucket larger than the model buys nothing (the gradients
        # still go out in one reduce) but costs a fresh allocation above glibc's 32 MB mmap
        # ceiling at every step, paid in page faults when the gradients are copied in: with
        # the 5e7-element default and a 5.1e6-parameter model, 6,000 minor faults and ~45 ms
        # of kernel time per step and rank on a CPU worker; capped, ~200-1,700 and ~30 ms
        # (benchmarks/step_overhead.py's model). Same reduces, same results.
        # Rounded up to a multiple of BUCKET_ALIGN: ZeRO-1/2 asserts the all-gather bucket
        # is a multiple of its alignment factor (2 elements), and a model's count may be odd.
        bucket = t.zero_bucket_elements
        if trainable_elements:
            bucket = min(bucket, -(-trainable_elements // BUCKET_ALIGN) * BUCKET_ALIGN)
        ds["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True,
                                        "reduce_scatter": True, "reduce_bucket_size": bucket,
                                        "allgather_bucket_size": bucket})
    if t.zero_stage == 3:
        ds["zero_optimization"].update({
            "overlap_comm": False,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
            "stage3_prefetch_bucket_size": t.zero_bucket_elements,
            # DeepSpeed keeps a gathered parameter whole while it is reused within the next
            # `max_reuse_distance` elements of the module trace and up to `max_live_parameters`
            # elements in all; its 1e9 defaults exceed a whole ViT-H, so from the second step
            # on (when the trace is known) every block gathered in forward stayed whole until
            # its backward: the unsharded model in every worker. Bound both by the bucket.
            "stage3_max_live_parameters": t.zero_bucket_elements,
            "stage3_max_reuse_distance": t.zero_bucket_elements,
            "sub_group_size": t.zero3_sub_group_elements,
        })
        if t.cpu_offload:
            ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": cfg.resources.use_gpu}
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu",
                                                            "pin_memory": cfg.resources.use_gpu}
            # On CPU-only machines torch.optim.AdamW is the CPU optimizer already.
            ds["zero_force_ds_cpu_optimizer"] = cfg.resources.use_gpu
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500}
    return ds


def zero3_build_hooks(cfg: ExperimentConfig) -> dict[str, Any]:
    """Hooks for building a model from a file at ZeRO-3 (pretrain.model.bootstrap.init_from_file):
    parameters are partitioned as they are created and loaded one at a time, so no rank ever
    holds the whole model. Empty (plain construction) at other stages."""
    if cfg.train.zero_stage != 3:
        return {}
    import deepspeed
    import torch.distributed as dist

    ds = deepspeed_config(cfg, dist.get_world_size())
    ds.pop("train_batch_size")   # zero.Init checks it against deepspeed.comm's world, not yet set up
    return {"build_context": lambda: deepspeed.zero.Init(config_dict_or_path=ds),
            "gather": lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)}


def gather_with_all_gather_single() -> None:
    """Make deepspeed.comm gather with `torch.distributed.all_gather_single`.

    DeepSpeed 0.19 picks `all_gather_into_tensor` for its flat all-gathers (ZeRO's parameter
    all-gather after every step), which torch 2.14 deprecates in favour of
    `all_gather_single` (same arguments; the old name only warns and calls it): every rank
    printed a FutureWarning. Its backend dispatches through one attribute, pointed here at
    the new name when torch has it (call once deepspeed.comm is set up)."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    single = getattr(dist, "all_gather_single", None)
    cdb = ds_comm.cdb
    if single is not None and cdb is not None and getattr(
            cdb, "all_gather_function", None) is getattr(dist, "all_gather_into_tensor", None):
        cdb.all_gather_function = single


def build_engine(model: torch.nn.Module, cfg: ExperimentConfig, world_size: int):
    """(engine, optimizer, scheduler) for `model` on the already-initialised process group."""
    import deepspeed

    t = cfg.train
    model.set_all_parameters_in_forward(True)   # ZeRO-3 and one dataset per micro-batch
    if t.activation_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    offload_on_gpu = t.cpu_offload and cfg.resources.use_gpu
    optimizer = build_optimizer(model, lr=t.lr, weight_decay=t.weight_decay,
                                betas=(t.betas[0], t.betas[1]), eps=t.eps,
                                fused_cpu_adam=offload_on_gpu, layer_decay=t.layer_decay)
    scheduler = build_scheduler(optimizer, lr=t.lr, min_lr=t.min_lr,
                                warmup_steps=t.warmup_steps, total_steps=t.steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, trainable), dist_init_required=False)
    gather_with_all_gather_single()
    return engine, optimizer, scheduler


def autocast_dtype(cfg: ExperimentConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]


def device_for_rank() -> torch.device:
    """The accelerator device of this process (CPU when DS_ACCELERATOR=cpu / no GPU)."""
    if uses_cpu():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)
