"""The training function: one process of a data-parallel DeepSpeed job.

It runs the same way under Ray Train (the driver calls `train(config_dict, report=...)` in
each worker; Ray has made the process group) and standalone:

    torchrun --nproc_per_node 8 -m pretrain.train.worker configs/tubevit-b.yaml train.steps=100
    deepspeed --num_gpus 8 --module pretrain.train.worker configs/tubevit-b.yaml

(then it makes the process group itself from RANK / WORLD_SIZE / MASTER_ADDR). Nothing here
imports Ray.

Step anatomy (every rank, same order): next batch from the joint loader (one modality per
micro-batch, the same modality on every rank because the mixer is seeded identically) ->
forward through that dataset's head -> cross-entropy -> engine.backward -> engine.step
(DeepSpeed applies the optimizer at the accumulation boundary). The loss stays on the
device; figures are reduced across ranks only at log points.
"""
from __future__ import annotations

import datetime
import os
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.train import data_io
from pretrain.train.config import ExperimentConfig, from_dict, load_config
from pretrain.train.engine import autocast_dtype, build_engine, device_for_rank
from pretrain.train.evaluate import evaluate
from pretrain.train.hooks import CheckpointHook, make_checkpoint_hook
from pretrain.train.metrics import Window, accelerator_peak
from pretrain.train.preempt import StopAgreement, install_sigterm_handler, training
from pretrain.train.tracking import (MetricLogger, NullLogger, end_run, resolve_tracking_uri,
                                     start_run)

Report = Callable[[dict[str, Any]], None]


def init_distributed(cfg: ExperimentConfig) -> tuple[int, int]:
    """(rank, world_size); makes the process group unless Ray / the launcher already did."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if cfg.resources.use_gpu and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.resources.timeout_s))
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: ExperimentConfig, num_classes: dict[str, int]) -> torch.nn.Module:
    from pretrain.model import load_model, model_from_config

    if cfg.bootstrap.init_from:   # image-to-video bootstrap (pretrain/model/bootstrap.py)
        from pretrain.model.bootstrap import init_from_file
        from pretrain.train.engine import zero3_build_hooks
        return init_from_file(cfg.bootstrap, num_classes, seed=cfg.train.seed, **zero3_build_hooks(cfg))
    if cfg.model.init_from:
        model = load_model(cfg.model.init_from)
        missing = set(num_classes) - set(model.datasets)
        if missing:
            raise ValueError(f"model file {cfg.model.init_from} has no head for {sorted(missing)}")
        return model
    return model_from_config(cfg.model, num_classes)


def train_micro_step(engine, batch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Forward + backward of one micro-batch; the optimizer steps at the accumulation
    boundary inside engine.step(). Returns the (device) loss."""
    x = batch.x.to(device, dtype=dtype, non_blocking=True)   # (B,3,T,H,W) | (B,3,H,W)
    y = batch.y.to(device, non_blocking=True)                # (B,)
    logits = engine(x, dataset=batch.dataset)                # (B, classes)
    loss = F.cross_entropy(logits.float(), y)
    engine.backward(loss)
    engine.step()
    return loss


def train(config: ExperimentConfig | dict, *, report: Report | None = None,
          hook: CheckpointHook | None = None, progress: bool = True,
          should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train per `config`; returns the summary (final metrics, run id, last checkpoint).

    `report(dict)` (optional) is called on rank 0 at log points, after evaluations and once
    at the end with {"summary": ...}: the Ray driver forwards these to its console. `hook`
    overrides the checkpoint hook from `make_checkpoint_hook`; `progress=False` silences
    rank 0's own console lines (the driver prints them instead). `should_stop()` (optional,
    cheap, polled every step on every rank) asks for an early stop; so do SIGTERM (see
    pretrain.train.preempt) and checkpoint.stop_after_step. An early stop happens at the
    same step on every rank, writes a final checkpoint and sets summary["stopped"].
    """
    cfg = config if isinstance(config, ExperimentConfig) else from_dict(ExperimentConfig, config)
    with training():   # SIGTERM from here on: stop at the next step, final checkpoint
        return _train(cfg, report, hook, progress, should_stop)


def _train(cfg: ExperimentConfig, report: Report | None, hook: CheckpointHook | None,
           progress: bool, should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    threads = cfg.resources.threads_per_worker or max(1, int(cfg.resources.cpus_per_worker))
    torch.set_num_threads(threads)
    rank, world = init_distributed(cfg)
    device = device_for_rank()
    seed_everything(cfg.train.seed)   # same init on every rank

    info = data_io.DataInfo.from_config(cfg.data)
    model = build_model(cfg, info.num_classes)
    engine, _, scheduler = build_engine(model, cfg, world)
    dtype = autocast_dtype(cfg)
    per_sample = data_io.sample_costs(model, info)   # modality -> (tokens, train FLOPs)
    _, peak = accelerator_peak(cfg.resources.accelerator, cfg.train.precision)

    loader = data_io.train_loader(cfg.data, rank, world, cfg.train.seed, device=device, dtype=dtype)
    hook = hook or make_checkpoint_hook(cfg, rank, world)
    start_step, extra = hook.maybe_resume(engine, loader)
    window = Window.from_carry(extra.get("loss_window"))
    if start_step and rank == 0:
        print(f"resumed from {hook.last_committed} at step {start_step}", file=sys.stderr,
              flush=True)
    stopper = StopAgreement(world, should_stop, cfg.checkpoint.stop_after_step)

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_id = cfg.tracking.run_id or extra.get("mlflow_run_id")
    logger: MetricLogger | NullLogger = NullLogger()
    own_run = False
    if cfg.tracking.enabled:
        if rank == 0 and not run_id:   # standalone: no driver made the run
            run_id = start_run(cfg, tracking_uri, run_name=cfg.tracking.run_name)
            own_run = True
        if rank == 0:
            logger = MetricLogger(tracking_uri, run_id, cfg.tracking.flush_every_s)
            hook.commit_gate = logger.mark   # a checkpoint commits after its steps' metrics
            if not own_run:   # a continued run: never log a step twice
                logger = SkipLogged(logger, last_logged_step(tracking_uri, run_id))

    def extra_state() -> dict[str, Any]:   # collective: called by the hook on every rank
        return {"loss_window": window.carry(world), "mlflow_run_id": run_id}

    last: dict[str, float] = {}
    eval_loaders: dict = {}
    progress = Progress(rank if progress else -1, cfg.train.steps, start_step,
                        cfg.train.progress_every_s)
    report = report if rank == 0 else None

    def evaluate_and_log(step: int) -> None:   # collective: every rank runs the eval loaders
        ev = evaluate(engine, cfg, rank, world, device, dtype, eval_loaders)
        logger.log(ev, step)
        last.update(ev)
        progress.line(step, ev)
        if report:
            report({"step": step, **ev})

    batches = iter(loader)
    step = start_step
    stopped = False
    engine.train()
    t_job = time.perf_counter()
    for step in range(start_step + 1, cfg.train.steps + 1):
        for _ in range(cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait_s += time.perf_counter() - t0
            loss = train_micro_step(engine, batch, device, dtype)
            n = len(batch.y)
            tokens, flops = per_sample[batch.modality]
            window.add_step(loss, n, tokens * n, flops * n, batch.modality)
        # `steps` in the window counts micro-batches; loss is their mean.
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.train.lr
            metrics = window.reduce(world, peak, lr)
            metrics["data/skipped_samples"] = data_io.skipped_samples(loader, world)
            logger.log(metrics, step)
            last.update(metrics)
            progress.update(step, metrics)
            if report:
                report({"step": step, **metrics})
            window = Window()
            window.log_s += time.perf_counter() - t0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            t0 = time.perf_counter()
            evaluate_and_log(step)
            engine.train()
            window.start += time.perf_counter() - t0   # eval time is not training throughput
        hook.maybe_save(step, engine, loader, extra_state)
        if step < cfg.train.steps and stopper(step):
            stopped = True
            if rank == 0:
                print(f"stopping at step {step}/{cfg.train.steps}: writing a final checkpoint",
                      file=sys.stderr, flush=True)
            break
    if cfg.train.eval_at_end and not stopped:
        evaluate_and_log(step)
    checkpoint = hook.finish(step, engine, loader, extra_state)
    logger.close()
    if own_run:
        end_run(tracking_uri, run_id)
    for ld in [loader, *eval_loaders.values()]:
        if hasattr(ld, "close"):
            ld.close()
    summary = {
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri if cfg.tracking.enabled else None,
        "checkpoint": checkpoint,
        "steps": step,
        "stopped": stopped,
        "resumed_from_step": start_step or None,
        "world_size": world,
        "wall_s": time.perf_counter() - t_job,
        "metrics": {k: v for k, v in last.items()},
        "logging_s": logger.send_time_s,
    }
    if report:
        report({"summary": summary})
    return summary


def last_logged_step(tracking_uri: str, run_id: str) -> int:
    """The highest step of train/loss already in the run (-1: none): a run restarted after
    a crash re-trains the steps since its last checkpoint, and must not log them again."""
    from mlflow.tracking import MlflowClient

    try:
        history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, "train/loss")
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

    def close(self, timeout: float = 60.0) -> None:
        self.inner.close(timeout)

    @property
    def send_time_s(self) -> float:
        return self.inner.send_time_s


class Progress:
    """Console lines from rank 0: step, loss, samples/s, eta (stderr, so --json's stdout
    stays machine-readable)."""

    def __init__(self, rank: int, total: int, start: int, every_s: float):
        self.on = rank == 0
        self.total, self.start, self.every_s = total, start, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, step: int, m: dict[str, float]) -> None:
        now = time.perf_counter()
        if not self.on or (now - self.last < self.every_s and step != self.total):
            return
        self.last = now
        done = step - self.start
        eta = (now - self.t0) / done * (self.total - step) if done else 0.0
        print(f"step {step}/{self.total}  loss {m['train/loss']:.4f}  "
              f"{m['perf/samples_per_sec']:.1f} samples/s  eta {_fmt(eta)}", file=sys.stderr, flush=True)

    def line(self, step: int, m: dict[str, float]) -> None:
        if self.on:
            text = "  ".join(f"{k} {v:.4f}" for k, v in m.items())
            print(f"step {step}/{self.total}  {text}", file=sys.stderr, flush=True)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m pretrain.train.worker CONFIG [key=value ...]` under a
    launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun, deepspeed)."""
    import json

    from pretrain.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if not argv:
        print("usage: python -m pretrain.train.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
        install_sigterm_handler()   # torchrun forwards SIGTERM to its ranks
        summary = train(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        print(json.dumps(summary))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
