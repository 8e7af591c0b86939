"""The training function: one process of a data-parallel DeepSpeed job.

It runs the same way under Ray Train (the driver calls `train(config_dict, report=...)` in
each worker; Ray has made the process group) and standalone:

    python -m pretrain.train.launch --nproc-per-node 8 configs/tubevit-b.yaml train.steps=100
    deepspeed --num_gpus 8 --module pretrain.train.worker configs/tubevit-b.yaml
    torchrun --nproc_per_node 8 -m pretrain.train.worker configs/tubevit-b.yaml

(then it makes the process group itself from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
rank 0's store on 127.0.0.1 when the job is on one node, else on MASTER_ADDR. torchrun works
too, but its store lives in the torchrun process and listens on every interface; rank 0
warns about it). Nothing here imports Ray.

Step anatomy (every rank, same order): next batch from the joint loader, on the device (one
modality per micro-batch, the same modality on every rank because the mixer is seeded
identically) -> the objective's loss (supervised: forward through that dataset's head,
cross-entropy; masked: draw a mask, reconstruct the hidden tokens, see
pretrain/train/masked.py) -> engine.backward -> engine.step (DeepSpeed applies the optimizer at
the accumulation boundary). The loss stays on the device; figures are reduced across ranks
only at log points.
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

from pretrain.data.metadata import DataInfo
from pretrain.errors import UserError
from pretrain.process_env import set_torch_threads
from pretrain.train.checkpoint_hook import CheckpointHook, make_checkpoint_hook
from pretrain.train.config import ExperimentConfig, from_dict, load_config
from pretrain.train.device_batches import DeviceBatches, eval_batches, train_batches
from pretrain.train.elastic import rank_share, split
from pretrain.train.engine import (LOOPBACK, autocast_dtype, build_engine, device_for_rank,
                                   init_process_group)
from pretrain.train.evaluate import evaluate
from pretrain.train.metrics import IntervalTotals, accelerator_peak, sample_costs, skipped_samples
from pretrain.train.masked import training_model
from pretrain.train.objectives import Objective, Supervised, make_objective
from pretrain.train.recon_grid import log_png
from pretrain.train.preempt import StopAgreement, install_sigterm_handler, training
from pretrain.train.preemption_poll import PreemptionPoll
from pretrain.train.tracking import NullLogger, Tracking, open_tracking

Report = Callable[[dict[str, Any]], None]
SUPERVISED = Supervised()
# Seconds between asks of an external stop request (`should_stop`; under Ray the driver's
# flag, one actor call per ask). Every step asked it, ~1.5 actor calls a second per rank on
# the step_overhead model, each paid in the rank, the driver's sink actor and Ray's
# processes on the cores the ranks compute on; a stop asked for is seen within this long
# (the ranks still agree on the stop step every step, pretrain/train/preempt.py).
STOP_POLL_S = 1.0


def at_most_every(seconds: float, ask: Callable[[], bool] | None) -> Callable[[], bool] | None:
    """`ask`, called at most once per `seconds`; in between, its last answer (a True stays
    True)."""
    if ask is None:
        return None
    last = {"t": float("-inf"), "answer": False}

    def throttled() -> bool:
        now = time.monotonic()
        if not last["answer"] and now - last["t"] >= seconds:
            last["t"], last["answer"] = now, bool(ask())
        return last["answer"]
    return throttled


def init_distributed(cfg: ExperimentConfig) -> tuple[int, int]:
    """(rank, world_size); makes the process group unless Ray / the launcher already did."""
    if not dist.is_initialized():
        backend = "nccl" if cfg.resources.use_gpu and torch.cuda.is_available() else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _join_torchrun_store(backend, cfg.resources.timeout_s)
        else:
            _make_group(backend, cfg.resources.timeout_s)
    return dist.get_rank(), dist.get_world_size()


def _make_group(backend: str, timeout_s: float) -> None:
    """The group of ranks started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    (pretrain.train.launch, deepspeed; alone: one rank), over a store rank 0 serves on one
    address: loopback when the job is on one node, else MASTER_ADDR (never every interface,
    which torch's env:// rendezvous would do)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    port = int(os.environ.get("MASTER_PORT", "0"))   # 0: rank 0 of a job of one picks one
    if world > 1 and not port:
        raise UserError(f"rank {rank} of {world}: MASTER_PORT is not set; start the ranks with "
                        "`python -m pretrain.train.launch --nproc-per-node N CONFIG ...`")
    host = LOOPBACK if _one_node(world) else os.environ.get("MASTER_ADDR", LOOPBACK)
    init_process_group(backend, host, port, rank, world, timeout_s)


def _one_node(world: int) -> bool:
    """Whether every rank of the job runs on this node (as far as the launcher's env says:
    deepspeed's sets neither variable, and its MASTER_ADDR is then used as it is)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return world == 1 or os.environ.get("NNODES") == "1" or (local is not None and int(local) == world)


def _join_torchrun_store(backend: str, timeout_s: float) -> None:
    """Under torchrun the store is its agent's, made in the torchrun process: env:// joins it.
    We cannot bind it to one address, so rank 0 says so."""
    if os.environ.get("RANK") == "0":
        print("warning: torchrun's rendezvous store (in the torchrun process) listens on every "
              "network interface, whatever --master-addr says; `python -m pretrain.train.launch "
              "--nproc-per-node N CONFIG ...` keeps it on 127.0.0.1 on one node",
              file=sys.stderr, flush=True)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: ExperimentConfig, num_classes: dict[str, int]) -> torch.nn.Module:
    """The module this config trains: the encoder (one head per dataset; from a bootstrap
    file, from `model.init_from` or freshly initialised), wrapped for the objective (masked:
    with the decoder, pretrain/train/masked.py training_model)."""
    from pretrain.model import model_from_config
    from pretrain.model.io import load_encoder

    # A dataset without labels (masked pretraining only) still gets a head, of one class: the
    # encoder has one head per dataset whatever the objective, so its export fine-tunes like
    # any model file (load_encoder replaces heads whose size differs).
    num_classes = {name: max(n, 1) for name, n in num_classes.items()}
    if cfg.bootstrap.init_from:   # image-to-video bootstrap (pretrain/model/bootstrap.py)
        from pretrain.model.bootstrap import init_from_file
        from pretrain.train.engine import zero3_build_hooks
        encoder = init_from_file(cfg.bootstrap, num_classes, seed=cfg.train.seed,
                                 **zero3_build_hooks(cfg))
    elif cfg.model.init_from:
        # Any model file: a supervised export, or a masked-pretraining export whose decoder is
        # dropped; heads the file lacks for this config's datasets are created fresh.
        encoder = load_encoder(cfg.model.init_from, num_classes)
    else:
        encoder = model_from_config(cfg.model, num_classes)
    return training_model(encoder, cfg, pretrained=bool(cfg.bootstrap.init_from or cfg.model.init_from))


def train_micro_step(engine, batch, objective: Objective = SUPERVISED,
                     weight: float = 1.0) -> torch.Tensor:
    """Forward + backward of one micro-batch (already on the device) for `objective`; the
    optimizer steps at the accumulation boundary inside engine.step(). `weight` scales the
    loss backpropagated (elastic micro-batches of unequal size, pretrain/train/elastic.py).
    Returns the (device) loss, unweighted."""
    loss = objective.loss(engine, batch)
    engine.backward(loss if weight == 1.0 else loss * weight)
    engine.step()
    return loss


def train(config: ExperimentConfig | dict, *, report: Report | None = None,
          hook: CheckpointHook | None = None, progress: bool = True,
          should_stop: Callable[[], bool] | None = None,
          preemption_info: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Train per `config`; returns the summary (final metrics, run id, last checkpoint).

    `report(dict)` (optional) is called on rank 0 at log points and after evaluations: the
    Ray driver forwards these to its console. `hook`
    overrides the checkpoint hook from `make_checkpoint_hook`; `progress=False` silences
    rank 0's own console lines (the driver prints them instead). `should_stop()` (optional,
    cheap, polled every step on every rank) asks for an early stop; so do SIGTERM (see
    pretrain.train.preempt) and checkpoint.stop_after_step. An early stop happens at the
    same step on every rank, writes a final checkpoint and sets summary["stopped"].
    `preemption_info` (under Ray Train: ray.train.get_preemption_info; a barrier) is asked
    every train.preemption_poll_steps steps; a node-drain notice means a checkpoint at once,
    and training goes on (pretrain.train.preemption_poll).
    """
    cfg = config if isinstance(config, ExperimentConfig) else from_dict(ExperimentConfig, config)
    trainer = Trainer(cfg, report=report, hook=hook, progress=progress, should_stop=should_stop,
                      preemption_info=preemption_info)
    with training():   # SIGTERM from here on: stop at the next step, final checkpoint
        return trainer.train()


class Trainer:
    """One rank's training, in phases: `setup` -> `run` (the steps; log, eval and checkpoint
    at their intervals; an agreed early stop) -> `finish` (final eval, last checkpoint) ->
    `close` (always) -> `summarize`.

    The loss comes from the objective (pretrain.train.objectives); the loop does not know
    which one it runs. Collectives (log points, evals, saves, the stop check) happen at the
    same step on every rank.
    """

    def __init__(self, cfg: ExperimentConfig, *, report: Report | None = None,
                 hook: CheckpointHook | None = None, progress: bool = True,
                 should_stop: Callable[[], bool] | None = None,
                 preemption_info: Callable[[], Any] | None = None) -> None:
        self.cfg, self.hook, self.should_stop = cfg, hook, should_stop
        self.preemption_info = preemption_info
        self.report_to, self.show_progress = report, progress
        # What `close` releases: nothing until setup makes it.
        self.loader: DeviceBatches | None = None
        self.eval_loaders: dict[str, dict[str, DeviceBatches]] = {}   # modality -> split ->
        self.tracking = Tracking(None, None, NullLogger())
        self.finished = False

    def train(self) -> dict[str, Any]:
        """All phases; the summary. Teardown runs whatever happens before it."""
        try:
            self.setup()
            self.run()
            self.finish()
        finally:
            self.close()   # also on an exception: loaders, metric logger, an own MLflow run
        return self.summarize()

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Process group, model and engine, loader, resume point, tracking."""
        cfg = self.cfg
        set_torch_threads(cfg.resources)
        self.rank, self.world = init_distributed(cfg)
        self.device = device_for_rank()
        seed_everything(cfg.train.seed)   # same init on every rank

        self.info = DataInfo.from_config(cfg.data)   # the datasets' metadata, read once
        self.objective = make_objective(cfg.train.objective, cfg, self.rank)
        self.objective.check_data(self.info)
        # ownership of the checkpoint location first: its settle time passes while the
        # model builds, and a second job on it stops here, before building anything
        self.hook = self.hook or make_checkpoint_hook(cfg, self.rank, self.world)
        self.hook.claim()
        model = build_model(cfg, self.info.num_classes)
        self.engine, _, self.scheduler = build_engine(model, cfg, self.world)
        self.dtype = autocast_dtype(cfg)
        # modality -> (tokens, train FLOPs); a masked model's FLOPs are the masked forward's
        self.per_sample = sample_costs(model, self.info, self.objective.masking())
        _, self.peak = accelerator_peak(cfg.resources.accelerator, cfg.train.precision)

        # elastic workers: this rank's share of the global batch of max workers
        share = rank_share(cfg.resources, cfg.data, self.world)
        self.micro_batches = share.micro_batches
        self.loader = train_batches(share.data, self.info, self.rank, self.world, cfg.train.seed,
                                    device=self.device, dtype=self.dtype)
        self.start_step, extra = self.hook.maybe_resume(self.engine, self.loader)
        self.objective.load_state_dict(extra.get("objective") or {})   # e.g. the mask RNG
        self.totals = IntervalTotals.from_carry(extra.get("loss_window"))
        if self.start_step and self.rank == 0:
            print(f"resumed from {self.hook.last_committed} at step {self.start_step}",
                  file=sys.stderr, flush=True)
        self.stopper = StopAgreement(self.world, at_most_every(STOP_POLL_S, self.should_stop),
                                     cfg.checkpoint.stop_after_step)

        self.tracking = open_tracking(cfg, self.rank, extra.get("mlflow_run_id"))
        if self.tracking.commit_gate:   # a checkpoint commits after its steps' metrics
            self.hook.commit_gate = self.tracking.commit_gate
        self.progress = Progress(self.rank if self.show_progress else -1, cfg.train.steps,
                                 self.start_step, cfg.train.progress_every_s)
        self.report = self.report_to if self.rank == 0 else None
        self.preemption = PreemptionPoll(self.preemption_info, cfg.train.preemption_poll_steps,
                                         self.rank, self.report)
        self.last: dict[str, float] = {}
        self.step, self.stopped = self.start_step, False

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Optimizer steps from the one after the resume point to train.steps, or to the
        step at which all ranks agreed to stop."""
        t = self.cfg.train
        self.t_start = time.perf_counter()
        if self.start_step == 0 and self.objective.eval_at_start and (t.eval_every or t.eval_at_end):
            self.timed_eval(0)   # the baseline a self-supervised monitor rises from
        self.engine.train()
        for step in range(self.start_step + 1, t.steps + 1):
            self.step = step
            self.train_step()
            if step % t.log_every == 0 or step == t.steps:
                self.log_metrics(step)
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                self.timed_eval(step)
            self.hook.maybe_save(step, self.engine, self.loader, self.extra_state)
            if step < t.steps and self.preemption(step):   # a drain notice: save, go on
                self.preemption.checkpoint(step, self.hook, self.engine, self.loader,
                                           self.extra_state)
            if step < t.steps and self.stopper(step):
                self.stopped = True
                if self.rank == 0:
                    print(f"stopping at step {step}/{t.steps}: writing a final checkpoint",
                          file=sys.stderr, flush=True)
                return

    def timed_eval(self, step: int) -> None:
        """An eval point inside the run: its time is not counted as training throughput."""
        t0 = time.perf_counter()
        self.evaluate_and_log(step)
        self.engine.train()
        self.totals.start += time.perf_counter() - t0

    def train_step(self) -> None:
        """One optimizer step: grad_accum_steps loader batches (each one micro-batch, or
        several on an elastic group below max workers), each micro-batch timed and counted."""
        for _ in range(self.cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(self.loader)
            self.totals.data_wait_s += time.perf_counter() - t0
            for part, weight in split(batch, self.micro_batches):
                loss = train_micro_step(self.engine, part, self.objective, weight)
                if weight == 0.0:   # a padding repeat (elastic.split): not counted
                    continue
                n = len(part)
                tokens, flops = self.per_sample[part.modality]
                self.totals.add_step(loss, n, tokens * n, flops * n, part.modality)

    def log_metrics(self, step: int) -> None:
        """A log point (collective): the interval's totals reduced to metrics, then a new
        interval. `steps` in the totals counts micro-batches; loss is their mean."""
        t0 = time.perf_counter()
        # The top layer's lr (with train.layer_decay the lower layers' groups are scaled down).
        lr = max(self.scheduler.get_last_lr()) if self.scheduler is not None else self.cfg.train.lr
        metrics = self.totals.reduce(self.world, self.peak, lr)
        metrics["data/skipped_samples"] = skipped_samples(self.loader, self.world)
        self.tracking.logger.log(metrics, step)
        self.last.update(metrics)
        self.progress.update(step, metrics)
        if self.report:
            self.report({"step": step, **metrics})
        self.totals = IntervalTotals()
        self.totals.log_s += time.perf_counter() - t0

    def evaluate_and_log(self, step: int) -> None:
        """The objective's held-out metrics (collective: every rank runs the eval loaders);
        its pictures (masked: input / masked / reconstruction) go to MLflow as artifacts."""
        if not self.eval_loaders:
            for modality in self.info.held_out:   # built at the first eval, kept for the next
                self.eval_loaders[modality] = {split: self.eval_split(modality, split)
                                               for split in self.objective.eval_splits}
        ev = evaluate(self.engine, self.objective, self.eval_loaders, self.world, step)
        if self.rank == 0 and self.tracking.uri and self.tracking.run_id:
            for modality, png in self.objective.pictures.items():
                log_png(self.tracking.uri, self.tracking.run_id,
                        f"reconstructions/{modality}_step_{step:07d}.png", png)
        self.tracking.logger.log(ev, step)
        self.last.update(ev)
        self.progress.line(step, ev)
        if self.report:
            self.report({"step": step, **ev})

    def eval_split(self, modality: str, split: str) -> DeviceBatches:
        """One pass over `modality`'s held-out split ("held_out") or, for a memory bank, its
        training split read like held-out data (centre views, no augmentation; "train")."""
        if split == "held_out":
            return eval_batches(self.cfg.data, self.info, modality, self.rank, self.world,
                                device=self.device, dtype=self.dtype)
        from pretrain.data.loader import EvalLoader

        uri = getattr(self.cfg.data, f"{modality}_uri")
        return DeviceBatches(EvalLoader(self.cfg.data, modality, self.rank, self.world, uri=uri),
                             self.device, self.dtype)

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the engine and loader (collective: the hook calls
        it on every rank when it saves)."""
        return {"loss_window": self.totals.carry(self.world), "mlflow_run_id": self.tracking.run_id,
                "objective": self.objective.state_dict()}

    # -- finish and teardown -------------------------------------------------------------

    def finish(self) -> None:
        """Final evaluation (unless stopped early) and the last checkpoint."""
        if self.cfg.train.eval_at_end and not self.stopped:
            self.evaluate_and_log(self.step)
        self.checkpoint = self.hook.finish(self.step, self.engine, self.loader, self.extra_state)
        self.finished = True

    def close(self) -> None:
        """Release what setup made, whatever happened: the metric logger (after sending what
        is queued), an MLflow run this process opened, the loaders' processes and memory, and
        on a failure the checkpoint location's lease (a finished run's hook let go of it)."""
        try:
            self.tracking.close(failed=not self.finished)
        finally:
            try:
                if not self.finished and self.hook is not None:
                    self.hook.close()
            finally:
                splits = [loader for by_split in self.eval_loaders.values()
                          for loader in by_split.values()]
                for loader in [self.loader, *splits]:
                    if loader is not None:
                        loader.close()

    def summarize(self) -> dict[str, Any]:
        """The summary train() returns."""
        summary = {
            "mlflow_run_id": self.tracking.run_id,
            "tracking_uri": self.tracking.uri,
            "checkpoint": self.checkpoint,
            "steps": self.step,
            "stopped": self.stopped,
            "resumed_from_step": self.start_step or None,
            "world_size": self.world,
            "wall_s": time.perf_counter() - self.t_start,
            "metrics": dict(self.last),
            "logging_s": self.tracking.logger.send_time_s,
        }
        notices = getattr(self, "preemption", None) and self.preemption.notices
        if notices:
            summary["preemption_notices"] = list(notices)
        return summary


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
    launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (pretrain.train.launch,
    deepspeed, torchrun), or alone as a job of one."""
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if not argv:
        print("usage: python -m pretrain.train.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
        # as `pretrain run` does: a location with credentials in it is never recorded
        from pretrain import storage
        from pretrain.train.config import to_dict
        storage.refuse_credentials_in_tree(to_dict(cfg))
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
