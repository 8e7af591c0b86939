"""Training and eval loaders over prepared shards (mosaicml-streaming + PyAV workers).

Training (`JointLoader`): one StreamingDataset per modality, each read by a torch DataLoader
with `num_workers` decoding processes. Every step yields one `Batch` of one modality; which
one is decided by a stateless function of (seed, step), so all ranks agree and a resumed run
continues the same sequence. Per modality the loader counts the global samples consumed in
the current epoch; its state (epoch, samples in epoch, canonical nodes, seed) is what
streaming's elastic deterministic partitioning needs to restart at exactly that point of the
global sample order, also on a different number of ranks (`num_canonical_nodes` fixes the
order, the sample count says where in it to continue).

Eval (`EvalLoader`): each rank reads every world_size-th sample of the held-out split, padded
so every rank runs the same number of batches (collectives in ZeRO-3 forwards need that);
padding repeats are marked `valid=False`. Video eval batches hold all Vt x Vs views of each
clip.

With data.clips_per_video = k > 1 a video sample yields k clips from one decode
(`samples.train_clips`): a video batch of batch_size clips is batch_size / k samples, and
everything that counts (streaming's partitioning, the position in the state) counts samples,
i.e. videos, so resumption and resizes work as with k = 1.

A stored sample that cannot be decoded is dropped from its batch and counted in
`skipped_samples` (never a crash); a batch left empty is replaced by the next one.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader, Dataset

from pretrain import storage
from pretrain.data import batch_buffers, shards, shared_memory, transforms
from pretrain.data.config import DataConfig, parse_bytes
from pretrain.data.media import BadMedia
from pretrain.data.metadata import DataInfo, describe
from pretrain.data.remote import cache_dir_for, make_stream
from pretrain.data.samples import (ClipSpec, ImageSpec, eval_clip, eval_image, sample_rng,
                                   train_clip, train_clips, train_image)
from pretrain.errors import UserError

log = logging.getLogger(__name__)
shared_memory.install()   # streaming's blocks closed when unused, not held until exit

# Errors that mean "this sample's bytes are bad", as opposed to bugs, which must surface.
try:
    import av

    SAMPLE_ERRORS: tuple = (BadMedia, OSError, ValueError, KeyError, EOFError, av.FFmpegError)
except (ImportError, AttributeError):
    SAMPLE_ERRORS = (BadMedia, OSError, ValueError, KeyError, EOFError)
# ... and that a sample cannot be read out of its shard at all: streaming raises IndexError
# for a sample past the end of a truncated shard.
SHARD_ERRORS: tuple = (*SAMPLE_ERRORS, IndexError)


def _unreadable(sample_id: int, exc: Exception) -> str:
    return f"sample {sample_id}: not readable from its shard ({type(exc).__name__}: {exc})"


@dataclass
class Batch:
    """One modality's micro batch.

    x: video (B, 3, T, H, W) or image (B, 3, H, W), uint8 RGB pixels (0-255), not yet
       normalised: `Batch.normalized(device, dtype)` gives the model input (float
       conversion and ImageNet mean/std on the device; the trainer's only way to move a
       batch, see pretrain.train.device_batches).
       Eval video batches hold all views: (B * views, 3, T, H, W), the views of a clip
       consecutive; average logits with `logits.view(B, views, -1).mean(1)`.
    y: (B,) class indices into the dataset's label map.
    sample_ids: (B,) sample index within the dataset (for checks and debugging).
    valid: eval only, (B,) False for padding repeats that must not count in metrics.
    skipped: corrupt samples dropped from this batch.
    """

    modality: str
    dataset: str
    x: torch.Tensor
    y: torch.Tensor
    sample_ids: torch.Tensor
    views: int = 1
    valid: torch.Tensor | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def normalized(self, device, dtype: torch.dtype = torch.float32) -> "Batch":
        """This batch on `device` with x as normalised `dtype` model input (y moved too)."""
        from pretrain.data.transforms import normalize

        return Batch(self.modality, self.dataset, normalize(self.x, device, dtype),
                     self.y.to(device, non_blocking=True), self.sample_ids, self.views,
                     None if self.valid is None else self.valid.to(device), self.skipped)


# ----------------------------------------------------------------------------- datasets


def clip_spec(cfg: DataConfig, hflip_ok: bool) -> ClipSpec:
    """The clip the config asks for (training and evaluation views); hflip only where the
    dataset allows it (its metadata's hflip_ok: labels that are directions do not)."""
    return ClipSpec(frames=cfg.frames, size=cfg.size, stride=cfg.frame_stride, fps=cfg.fps,
                    crop_scale=cfg.video_crop_scale, hflip=cfg.hflip and hflip_ok,
                    temporal_views=cfg.eval_temporal_views, spatial_views=cfg.eval_spatial_views)


def _image_spec(cfg: DataConfig, hflip_ok: bool) -> ImageSpec:
    ra = (cfg.randaugment_ops, cfg.randaugment_magnitude) if cfg.randaugment else None
    return ImageSpec(size=cfg.image_size, crop_scale=cfg.image_crop_scale,
                     hflip=cfg.hflip and hflip_ok, randaugment=ra)


class _TrainShards(StreamingDataset):
    """StreamingDataset that decodes and augments each sample in the loader worker.

    Video clips are written straight into their row of the buffer their batch travels in
    (`_BatchRows`, buffers of this process's `batch_buffers.BufferPool`): the collate then
    hands that buffer over as the batch, without the copy (and, in a worker, the copy into
    shared memory) that stacking finished clips costs.
    """

    def __init__(self, *, modality: str, spec, aug_seed: int, clips_per_video: int = 1,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.modality, self.spec, self.aug_seed = modality, spec, aug_seed
        self.clips_per_video = clips_per_video
        self.loader_id = batch_buffers.new_loader_id()  # the trainer's key for our buffers
        self._epoch = 0
        self._rows: _BatchRows | None = None

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, offset = super()._resume_incr_epoch()
        self._epoch = epoch  # this worker's epoch, for per-sample augmentation seeds
        return epoch, offset

    def __iter__(self):
        if self.modality == "video":
            if self._rows is None or self._rows.pool.pid != os.getpid():  # one pool a process
                k = self.clips_per_video
                shape = (self.batch_size,) + ((k,) if k > 1 else ()) + (
                    self.spec.frames, self.spec.size, self.spec.size, 3)
                self._rows = _BatchRows(batch_buffers.BufferPool(self.loader_id, shape))
            self._rows.restart()  # a new epoch starts a batch
        yield from super().__iter__()

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        # the row first, whatever happens to the sample: later samples keep their rows
        row = self._rows.next() if self.modality == "video" and self._rows else None
        try:
            raw = super().get_item(sample_id, retry)
        except SHARD_ERRORS as exc:   # a damaged shard: skipped and counted like bad bytes
            return {"skip": _unreadable(sample_id, exc), "id": int(sample_id)}
        rng = sample_rng(self.aug_seed, self._epoch, int(sample_id))
        try:
            if self.modality == "video" and self.clips_per_video > 1:
                x = train_clips(raw, self.spec, rng, self.clips_per_video,
                                out=None if row is None else row.array)  # (k, 3, T, S, S)
            elif self.modality == "video":
                x = train_clip(raw, self.spec, rng, out=None if row is None else row.array)
            else:
                x = train_image(raw, self.spec, rng)
        except SAMPLE_ERRORS as exc:
            return {"skip": f"{raw.get('key', sample_id)}: {exc}", "id": int(sample_id)}
        return {"x": x, "y": int(raw["label"]), "id": int(sample_id), "row": row}


@dataclass
class _Row:
    buffer: batch_buffers.Buffer   # the batch buffer, (batch, ...) channels-last clips
    index: int
    array: object                  # numpy view of the buffer's row, where the clip is decoded


class _BatchRows:
    """Where consecutive samples of one loader process write their clips: sample i of each
    run of `batch` samples goes to row i of a buffer taken from the pool for that run
    (DataLoader batches a worker's consecutive samples). `_collate` checks the rows before
    trusting them (see `_batch_buffer`)."""

    def __init__(self, pool: batch_buffers.BufferPool) -> None:
        self.pool, self.batch = pool, pool.shape[0]
        self.buffer: batch_buffers.Buffer | None = None
        self.index = self.batch

    def restart(self) -> None:
        """A new epoch: a batch left unfinished by the last one (drop_last) never left."""
        if self.buffer is not None and self.index < self.batch:
            self.buffer.release()
        self.buffer, self.index = None, self.batch

    def next(self) -> _Row:
        if self.index == self.batch:
            self.buffer, self.index = self.pool.take(), 0
        row = _Row(self.buffer, self.index, self.buffer.pixels[self.index].numpy())
        self.index += 1
        return row


def _batch_buffer(samples: list[dict]) -> batch_buffers.Buffer | None:
    """The batch buffer when the samples are exactly its rows 0..n-1, in order (no
    sample skipped, the batch aligned with the rows); else None and the clips are stacked."""
    rows = [s.get("row") for s in samples]
    if not rows or any(r is None for r in rows):
        return None
    buffer = rows[0].buffer
    if buffer.shape[0] != len(rows) or any(
            r.buffer is not buffer or r.index != i for i, r in enumerate(rows)):
        return None
    return buffer


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, straight into shared memory inside a loader worker (as torch's default
    collate does), so sending the batch to the trainer process copies nothing more."""
    first = tensors[0]
    out = batch_buffers.shared_block(len(tensors) * first.numel())
    return torch.stack(tensors, out=out.view(len(tensors), *first.shape))


def _collate(samples: list[dict], x: torch.Tensor | None = None) -> dict:
    """The batch: x (the samples' stacked unless given), and y, ids and valid as numpy
    arrays: they are pickled with the batch, where tensors would each travel as a
    shared-memory block of their own. `_tensors` makes them tensors in the trainer."""
    good = [s for s in samples if "x" in s]
    if x is None and good:
        x = _stack([s["x"] for s in good])
    return {
        "x": x,
        "y": np.array([s["y"] for s in good], dtype=np.int64),
        "ids": np.array([s["id"] for s in good], dtype=np.int64),
        "valid": np.array([s.get("valid", True) for s in good], dtype=bool),
        "skipped": [s["skip"] for s in samples if "skip" in s],
    }


def _collate_video(samples: list[dict]) -> dict:
    """`_collate` for training clips: x channels last, (B, [k,] T, S, S, 3), the batch
    buffer itself when the clips fill it in order, else the clips stacked (a sample was
    skipped) and the buffer free again."""
    buffer = _batch_buffer(samples)
    if buffer is not None:
        return _collate(samples, batch_buffers.handoff(buffer))
    good = [s for s in samples if "x" in s]
    x = _stack([s["x"].movedim(-4, -1) for s in good]) if good else None  # channels last
    for buffer in {id(s["row"].buffer): s["row"].buffer
                   for s in samples if s.get("row") is not None}.values():
        buffer.release()
    return _collate(samples, x)


def _tensors(raw: dict, clips: int | None = None) -> dict:
    """A collated batch as the trainer uses it: y, ids and valid as tensors; for training
    clips (`clips` per video) x channels first, (B * clips, 3, T, S, S), a video's clips in
    consecutive rows, its label and id repeated."""
    x, repeat = raw["x"], clips or 1
    if clips is not None and x is not None:  # views: the batch stays where it is
        x = transforms.channels_first(x)      # (B, [k,] 3, T, S, S)
        if clips > 1:
            x = x.flatten(0, 1)
    out = {key: torch.from_numpy(np.repeat(raw[key], repeat)) for key in ("y", "ids", "valid")}
    return {**raw, "x": x, **out}


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_workers(num_workers: int, shares: dict[str, float], local_world_size: int,
                 cores: int) -> dict[str, int]:
    """Decode processes per modality for one rank.

    `num_workers` per modality is the request. When all ranks' loader processes on this
    machine would outnumber its cores, each rank gets cores // local_world_size (at least 1)
    split by the modalities' step shares, largest share first: decoding more processes than
    cores only makes them fight the training processes for the same cores. A modality left
    with 0 decodes in the training process (cheap for a rarely drawn modality).
    """
    want = {m: num_workers for m in shares}
    budget = max(1, cores // max(1, local_world_size))
    if num_workers == 0 or sum(want.values()) <= budget:
        return want
    total = sum(shares.values()) or 1.0
    exact = {m: budget * shares[m] / total for m in shares}
    out = {m: min(num_workers, int(exact[m])) for m in shares}
    # Hand out what flooring left, to the largest remainders (ties: larger share first).
    for m in sorted(shares, key=lambda m: (exact[m] - int(exact[m]), shares[m]), reverse=True):
        if sum(out.values()) >= budget:
            break
        if out[m] < num_workers:
            out[m] += 1
    return out


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one decoding process per core; no intra-op threads on top


def _set_world_env(rank: int, world_size: int, local_rank: int | None,
                   local_world_size: int | None) -> tuple[int, int]:
    """streaming reads the world from RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE: make them
    agree with the arguments (a launcher may already have set them)."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    env_ws = os.environ.get("WORLD_SIZE")
    if env_ws is not None and int(env_ws) != world_size:
        raise UserError(f"loader world_size={world_size} but the environment says "
                        f"WORLD_SIZE={env_ws}; pass the launcher's world size")
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world_size))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_world_size))
    return local_rank, local_world_size


def _refresh_cache(uri: str, cache_dir: str, local_rank: int) -> None:
    """Drop a remote dataset's cache when its index changed (the dataset was re-prepared)."""
    if not storage.is_remote(uri) or local_rank != 0:
        return
    local = cache_dir_for(uri, cache_dir)
    cached = os.path.join(local, shards.INDEX)
    if os.path.exists(cached):
        try:
            fresh = storage.read_bytes(storage.join(uri, shards.INDEX))
        except Exception:
            return
        with open(cached, "rb") as f:
            if f.read() != fresh:
                shutil.rmtree(local, ignore_errors=True)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _cache_limit(cfg: DataConfig) -> int | None:
    return parse_bytes(cfg.cache_limit) if cfg.cache_limit else None


# More samples than any worker's epoch holds: streaming's prepare/ready threads never wait.
WHOLE_EPOCH = 1 << 40


def predownload_window(uri: str, batch_size: int) -> int:
    """Samples that streaming's prepare/ready threads may run ahead of the reader, per loader
    worker. Always passed: left out, streaming picks 8 x batch_size and says so in a log line
    per dataset and process. Remote shards: 8 batches (at least 64 samples) ahead. Local
    shards need no download: the threads run through the epoch's ids at once and exit,
    instead of waking every 7 ms in every loader process for the whole epoch."""
    return max(8 * batch_size, 64) if storage.is_remote(uri) else WHOLE_EPOCH


class _ModalityStream:
    """One modality's endless sequence of training batches with an exact position."""

    def __init__(self, modality: str, uri: str, info: dict, cfg: DataConfig, batch_size: int,
                 world_size: int, nodes: int, local_rank: int, seed: int, ncn: int,
                 workers: int) -> None:
        self.modality, self.uri = modality, uri
        clips = cfg.clips_per_video if modality == "video" else 1
        self.clips = clips if modality == "video" else None  # for `_tensors`
        # Samples (videos or images) per rank per batch: what streaming partitions and the
        # position counts; a batch holds `clips` training inputs per sample.
        self.batch_size, self.world_size = batch_size // clips, world_size
        self.dataset_name, self.num_classes = info["name"], info["num_classes"]
        if info["num_samples"] < self.batch_size * world_size:
            raise UserError(f"dataset '{uri}' has {info['num_samples']} samples, fewer than one "
                            f"global batch ({self.batch_size} x {world_size} ranks); lower "
                            "data.batch_size or prepare more data")
        spec = (clip_spec(cfg, info["hflip_ok"]) if modality == "video"
                else _image_spec(cfg, info["hflip_ok"]))
        _refresh_cache(uri, cfg.cache_dir, local_rank)
        _barrier()
        self.ds = _TrainShards(
            modality=modality, spec=spec, aug_seed=seed, clips_per_video=clips,
            streams=[make_stream(uri, cfg.cache_dir)], shuffle=True, shuffle_seed=seed,
            shuffle_algo="py1e", shuffle_block_size=max(4_000_000 // ncn, 1 << 18),
            num_canonical_nodes=ncn, batch_size=self.batch_size, cache_limit=_cache_limit(cfg),
            predownload=predownload_window(uri, self.batch_size))
        self.workers = workers
        self.loader = DataLoader(
            self.ds, batch_size=self.batch_size, num_workers=workers,
            collate_fn=_collate_video if modality == "video" else _collate,
            drop_last=True, persistent_workers=workers > 0, worker_init_fn=_worker_init,
            prefetch_factor=4 if workers > 0 else None)
        self.epoch = 0
        self.sample_in_epoch = 0  # global samples consumed this epoch, all ranks together
        self.num_canonical_nodes = ncn
        self.shuffle_seed = seed
        self.initial_physical_nodes = nodes
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        # Always restate the position: streaming then starts exactly here, whatever its own
        # shared epoch counter says (it is shared by all ranks and workers of the node).
        self.ds.num_canonical_nodes = self.num_canonical_nodes
        self.ds.shuffle_seed = self.shuffle_seed
        self.ds.shuffle_block_size = max(4_000_000 // self.num_canonical_nodes, 1 << 18)
        self.ds.initial_physical_nodes = self.initial_physical_nodes
        self.ds.next_epoch = self.epoch
        self.ds.load_state_dict(self.streaming_state())
        self._it = iter(self.loader)

    def next(self) -> dict:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                raw = next(self._it)
            except StopIteration:
                self.epoch += 1
                self.sample_in_epoch = 0
                self._it = None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError(f"dataset '{self.uri}' yields no full batch in an epoch")
                continue
            self.sample_in_epoch += self.batch_size * self.world_size
            return _tensors(raw, self.clips)

    def streaming_state(self) -> dict:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                "num_canonical_nodes": self.num_canonical_nodes,
                "shuffle_seed": self.shuffle_seed,
                "initial_physical_nodes": self.initial_physical_nodes}

    def load(self, st: dict) -> None:
        self.epoch = int(st["epoch"])
        self.sample_in_epoch = int(st["sample_in_epoch"])
        self.num_canonical_nodes = int(st["num_canonical_nodes"])
        self.shuffle_seed = int(st["shuffle_seed"])
        self.initial_physical_nodes = st.get("initial_physical_nodes")
        self._it = None  # restart streaming at the loaded position

    def close(self) -> None:
        self._it = None
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        batch_buffers.forget(self.ds.loader_id)
        shared_memory.release(self.ds)


def _mix_is_video(seed: int, step: int, ratio: float) -> bool:
    return random.Random(f"mix:{seed}:{step}").random() < ratio


class JointLoader:
    """Endless iterator of training `Batch`es, one modality per batch, mixed by video_ratio.

    Construct on every rank at the same time (streaming syncs local ranks). `seed` seeds the
    shard shuffle, the modality mix and augmentation unless data.shuffle_seed is set. `info`:
    the datasets' metadata when the caller has read it already (else read here).
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: int = 0, *,
                 info: DataInfo | None = None, local_rank: int | None = None,
                 local_world_size: int | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        local_rank, local_world_size = _set_world_env(rank, world_size, local_rank,
                                                      local_world_size)
        nodes = max(1, world_size // local_world_size)
        self.seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else seed
        ncn = cfg.num_canonical_nodes or nodes
        self.step = 0
        self.skipped_samples = 0
        self.skip_reasons: list[str] = []  # the most recent few, for logs
        self.streams: dict[str, _ModalityStream] = {}
        active = {}
        for modality, uri, bs in (("video", cfg.video_uri, cfg.batch_size),
                                  ("image", cfg.image_uri, cfg.image_micro_batch)):
            if uri is None or (modality == "video" and cfg.video_ratio == 0 and cfg.image_uri) \
                    or (modality == "image" and cfg.video_ratio == 1 and cfg.video_uri):
                continue
            active[modality] = (uri, bs)
        shares = {m: (cfg.video_ratio if m == "video" else 1 - cfg.video_ratio)
                  if len(active) > 1 else 1.0 for m in active}
        self.workers = plan_workers(cfg.num_workers, shares, local_world_size, usable_cores())
        if self.workers != {m: cfg.num_workers for m in active} and rank == 0:
            log.info("data.num_workers=%d per modality would put more loader processes than "
                     "cores (%d) on this machine with %d local ranks; using %s per rank",
                     cfg.num_workers, usable_cores(), local_world_size, self.workers)
        for modality, (uri, bs) in active.items():
            meta = info.datasets[modality] if info else describe(cfg, modality, uri)
            self.streams[modality] = _ModalityStream(modality, uri, meta, cfg, bs, world_size,
                                                     nodes, local_rank, self.seed, ncn,
                                                     self.workers[modality])

    @property
    def heads(self) -> dict[str, int]:
        """Dataset (head) name -> number of classes, for the modalities this loader yields."""
        return {s.dataset_name: s.num_classes for s in self.streams.values()}

    def modality_at(self, step: int) -> str:
        if len(self.streams) == 1:
            return next(iter(self.streams))
        return "video" if _mix_is_video(self.seed, step, self.cfg.video_ratio) else "image"

    def __iter__(self) -> "JointLoader":
        return self

    def __next__(self) -> Batch:
        while True:
            modality = self.modality_at(self.step)
            stream = self.streams[modality]
            raw = stream.next()
            self.step += 1
            if raw["skipped"]:
                self.skipped_samples += len(raw["skipped"])
                self.skip_reasons = (self.skip_reasons + raw["skipped"])[-20:]
                for reason in raw["skipped"]:
                    log.warning("skipped corrupt %s sample %s", modality, reason)
            if raw["x"] is None:
                continue  # every sample of this batch was corrupt: take the next step's batch
            return Batch(modality=modality, dataset=stream.dataset_name, x=raw["x"], y=raw["y"],
                         sample_ids=raw["ids"], skipped=len(raw["skipped"]))

    def state_dict(self) -> dict:
        """Position after the last batch returned; identical on every rank (save rank 0's)."""
        return {"version": 1, "step": self.step, "seed": self.seed,
                "skipped_samples": self.skipped_samples,
                "streams": {m: s.streaming_state() for m, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise UserError(f"loader state version {state.get('version')} is not supported "
                            "(expected 1); it was not written by this JointLoader")
        missing = set(self.streams) - set(state["streams"])
        if missing and state["step"] > 0:
            raise UserError(f"loader state has no position for {sorted(missing)}; the run was "
                            "saved with a different set of modalities (data.video_uri / "
                            "data.image_uri / data.video_ratio)")
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        for modality, st in state["streams"].items():
            if modality in self.streams:
                self.streams[modality].load(st)

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


# ----------------------------------------------------------------------------- eval


class _EvalShards(StreamingDataset):
    pass


def eval_indices(n: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(sample index, counts) for this rank: every world_size-th sample, then repeats marked
    False so that all ranks get ceil(n / world_size) items."""
    per_rank = math.ceil(n / world_size)
    mine = list(range(rank, n, world_size))
    items = [(i, True) for i in mine]
    while len(items) < per_rank:
        items.append((mine[len(items) % len(mine)] if mine else 0, False))
    return items


class _EvalView(Dataset):
    """This rank's share of a held-out split, padded to the same length on every rank."""

    def __init__(self, ds: StreamingDataset, modality: str, spec, image_size: int,
                 rank: int, world_size: int) -> None:
        self.ds, self.modality, self.spec, self.image_size = ds, modality, spec, image_size
        self.items = eval_indices(ds.num_samples, rank, world_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        sample_id, valid = self.items[i]
        try:
            raw = self.ds.get_item(sample_id)
        except SHARD_ERRORS as exc:
            return self._placeholder(sample_id, 0, _unreadable(sample_id, exc))
        try:
            if self.modality == "video":
                x = eval_clip(raw, self.spec)  # (V, 3, T, S, S)
            else:
                x = eval_image(raw, self.image_size)  # (3, S, S)
        except SAMPLE_ERRORS as exc:
            return self._placeholder(sample_id, int(raw["label"]),
                                     f"{raw.get('key', sample_id)}: {exc}")
        return {"x": x, "y": int(raw["label"]), "id": sample_id, "valid": valid}

    def _placeholder(self, sample_id: int, label: int, reason: str) -> dict:
        """A sample that could not be read: zeros in its place, not counted. The batch keeps
        its shape (all ranks must run the same forwards)."""
        shape = ((self.spec.temporal_views * self.spec.spatial_views, 3, self.spec.frames,
                  self.spec.size, self.spec.size) if self.modality == "video"
                 else (3, self.image_size, self.image_size))
        return {"x": torch.zeros(shape, dtype=torch.uint8), "y": label, "id": sample_id,
                "valid": False, "skip": reason}


def _collate_eval(samples: list[dict]) -> dict:
    out = _collate([{k: v for k, v in s.items() if k != "skip"} for s in samples])
    out["skipped"] = [s["skip"] for s in samples if "skip" in s]
    return out


class EvalLoader:
    """One pass over a held-out split per `iter()`; see the module docstring.

    Video batches: x (B * Vt * Vs, 3, T, S, S) with `views = Vt * Vs`; image batches:
    x (B, 3, S, S). `valid` marks samples that count (False: padding repeat or corrupt).
    `info`: the datasets' metadata when the caller has read it already (else read here).
    """

    def __init__(self, cfg: DataConfig, modality: str, rank: int = 0, world_size: int = 1, *,
                 uri: str | None = None, info: DataInfo | None = None,
                 local_rank: int | None = None, local_world_size: int | None = None) -> None:
        configured = uri is None   # the config's held-out set, which `info` describes
        uri = uri or getattr(cfg, f"{modality}_eval_uri")
        if uri is None:
            raise UserError(f"no eval data for {modality}: set data.{modality}_eval_uri")
        local_rank, local_world_size = _set_world_env(rank, world_size, local_rank,
                                                      local_world_size)
        meta = (info.datasets[f"{modality}_eval"] if info and configured
                else describe(cfg, modality, uri))
        self.modality, self.uri, self.dataset_name = modality, uri, meta["name"]
        self.num_samples = meta["num_samples"]
        self.skipped_samples = 0
        spec = clip_spec(cfg, False) if modality == "video" else None
        self.views = cfg.eval_temporal_views * cfg.eval_spatial_views if modality == "video" else 1
        _refresh_cache(uri, cfg.cache_dir, local_rank)
        _barrier()
        self.ds = _EvalShards(streams=[make_stream(uri, cfg.cache_dir)], shuffle=False,
                              cache_limit=_cache_limit(cfg),
                              predownload=predownload_window(uri, cfg.eval_batch_size))
        self.view = _EvalView(self.ds, modality, spec, cfg.image_size, rank, world_size)
        self.loader = DataLoader(self.view, batch_size=cfg.eval_batch_size, shuffle=False,
                                 num_workers=plan_workers(cfg.num_workers, {modality: 1.0},
                                                          local_world_size,
                                                          usable_cores())[modality],
                                 collate_fn=_collate_eval,
                                 worker_init_fn=_worker_init)

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        shared_memory.release(self.ds)

    def __iter__(self) -> Iterator[Batch]:
        for raw in map(_tensors, self.loader):
            self.skipped_samples += len(raw["skipped"])
            x = raw["x"]
            if self.modality == "video":
                x = x.flatten(0, 1)  # (B, V, 3, T, S, S) -> (B*V, 3, T, S, S)
            yield Batch(modality=self.modality, dataset=self.dataset_name, x=x, y=raw["y"],
                        sample_ids=raw["ids"], views=self.views, valid=raw["valid"],
                        skipped=len(raw["skipped"]))
