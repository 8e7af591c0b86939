"""Per-worker peak memory of training steps of a bootstrapped TubeViT: ZeRO-3 on 2 CPU
workers vs one unsharded worker, against the plan (pretrain/train/memory.py).

    python benchmarks/zero3_memory.py --json                       # bootstrapped ViT-H/14
    python benchmarks/zero3_memory.py --model tubevit-b --json     # a smaller stand-in

The model is what `pretrain bootstrap` makes of a ViT-H/14 image ViT with TubeViT-B's tubes
(random weights: memory does not depend on them): learned 16x16 position table, CLS token,
gate at block `--gate-layer` (default depth - 8), frozen prefix as in configs/bootstrap-h.yaml.
Each run is a fresh process tree that goes through the training code itself
(pretrain.train.worker.build_model -> init_from_file, engine.build_engine, train_micro_step),
fp32 on CPU (gloo), `--steps` training steps (default 2: the first records ZeRO-3's module
trace, the second is the steady state that prefetches by it) on micro-batches of
`--micro-batch` clips of `--frames` x `--size`^2; `step_s` is the fastest step:

- unsharded: 1 worker, ZeRO stage 0 (the whole model, its gradients and Adam state in one
  process);
- sharded: 2 workers, ZeRO-3 (built partitioned with zero.Init, loaded one tensor at a time);
- with --zero3-single also ZeRO-3 on 1 worker: DeepSpeed's ZeRO machinery (fp32 master
  copy, flat gradient partition, reduce bucket) without anything to shard over, which
  isolates what sharding itself saves (`ratio_vs_zero3_1worker`).

The memory settings come from the ViT-H bootstrap config (`--config`, default
configs/bootstrap-h.yaml): train.precision (bf16), train.zero_bucket_elements and
train.zero3_sub_group_elements; `--precision` and `--set train.KEY=VALUE` override them.
Peak RSS per worker = the process's resident high-water mark (VmHWM, includes the
runtime) over building and training, with glibc told to return freed large buffers
(MALLOC_MMAP_THRESHOLD_, see main()). `ratio` = unsharded peak / max sharded per-worker peak
(higher is better; goal >= 1.6). `training_steps_peak_gib` / `ratio_training_steps` count
only the training steps (the high-water mark restarts once the engine is built): building
an unsharded bf16 model makes it in fp32 first, a spike the steps never see again.
The plan's figures use the measured runtime baseline (RSS after imports and process-group
setup) as its overhead and count only the touched part of DeepSpeed's reduce bucket, as RSS
does.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_result  # noqa: E402
from tests.fixtures.net import free_port  # noqa: E402

# image ViT each TubeViT size stands in for: (depth, dim, mlp, heads, patch)
IMAGE_VITS = {
    "tubevit-ti": (12, 192, 768, 3, 16),
    "tubevit-s": (12, 384, 1536, 6, 16),
    "tubevit-b": (12, 768, 3072, 12, 16),
    "tubevit-l": (24, 1024, 4096, 16, 16),
    "tubevit-h": (32, 1280, 5120, 16, 14),    # ViT-H/14
}
NUM_CLASSES = {"kinetics400": 400}


def bootstrapped_config(name: str, gate_layer: int | None, image_size: int = 224):
    from pretrain.model import create_model
    from pretrain.model.bootstrap import bootstrap_config
    from pretrain.model.image_vit_weights import ImageViTSpec

    depth, dim, mlp, heads, patch = IMAGE_VITS[name]
    spec = ImageViTSpec(depth=depth, dim=dim, mlp_dim=mlp, heads=heads, patch=patch,
                        grid=(image_size // patch, image_size // patch), class_token=True,
                        cls_has_pos=True, qkv_bias=True, in_chans=3)
    with torch.device("meta"):
        small = create_model("tubevit-b", num_classes=NUM_CLASSES, skip_unfit_tubes=True)
    return bootstrap_config(spec, small, depth - 8 if gate_layer is None else gate_layer, NUM_CLASSES)


def _make_file(_rank: int, name: str, gate_layer: int | None, path: str) -> None:
    """Write a bootstrapped model file (random weights) without extra in-memory copies."""
    from safetensors.torch import save_file

    from pretrain.model import TubeViT
    from pretrain.model.io import FORMAT, FORMAT_VERSION

    torch.set_num_threads(1)
    config = bootstrapped_config(name, gate_layer)
    torch.manual_seed(0)
    model = TubeViT(config)
    save_file(model.state_dict(), path, metadata={"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "config": config.to_json()})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM: the process's resident high-water mark since start or the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(rank: int, world: int, port: int, stage: int, args: dict, path: str, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    torch.set_num_threads(1)
    sys.stdout = sys.stderr   # DeepSpeed's prints: the parent's JSON stays stdout's only line
    import deepspeed  # noqa: F401  (imported before the baseline, as in a training worker)
    import torch.distributed as dist

    from pretrain.train.config import ExperimentConfig, apply_overrides, from_dict
    from pretrain.train.engine import build_engine
    from pretrain.train.worker import build_model, train_micro_step

    dist.init_process_group("gloo", rank=rank, world_size=world)
    baseline = _rss_bytes()
    cfg = from_dict(ExperimentConfig, apply_overrides({
        "data": {"video_uri": "unused", "image_uri": "unused", "batch_size": args["micro_batch"]},
        "train": {"steps": args["steps"], "zero_stage": stage, "precision": args["precision"],
                  "lr": 1e-5},
        "bootstrap": {"init_from": path, "freeze": "prefix"}}, args["overrides"]))
    t0 = time.perf_counter()
    model = build_model(cfg, NUM_CLASSES)
    engine, _, _ = build_engine(model, cfg, world)
    built = time.perf_counter() - t0
    build_peak = _peak_rss_bytes()
    reset = _reset_peak_rss()   # from here on: the training steps' own peak
    g = torch.Generator().manual_seed(rank)
    batch = type("Batch", (), {})()
    batch.modality, batch.dataset = "video", "kinetics400"
    batch.x = torch.randn(args["micro_batch"], 3, args["frames"], args["size"], args["size"], generator=g)
    batch.y = torch.randint(0, 400, (args["micro_batch"],), generator=g)
    dtype = torch.bfloat16 if args["precision"] == "bf16" else torch.float32
    batch.x = batch.x.to(dtype)   # model input as the trainer's loader delivers it
    losses, times = [], []
    for _ in range(args["steps"]):   # step 1 on: DeepSpeed prefetches by the recorded trace
        t0 = time.perf_counter()
        losses.append(train_micro_step(engine, batch).item())
        times.append(time.perf_counter() - t0)
    loss, step = losses[0], min(times)
    step_peak = _peak_rss_bytes() if reset else None
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "peak_rss_bytes": max(build_peak, step_peak or 0),
                   "build_peak_rss_bytes": build_peak, "step_peak_rss_bytes": step_peak,
                   "baseline_rss_bytes": baseline, "loss": loss,
                   "build_s": round(built, 2), "step_s": round(step, 2)}, f)
    dist.destroy_process_group()


def measure(world: int, stage: int, args: dict, path: str, tmp: str) -> list[dict]:
    out = os.path.join(tmp, f"run-{world}-{stage}")
    mp.start_processes(_worker, args=(world, free_port(), stage, args, path, out), nprocs=world,
                       join=True, start_method="spawn")
    return [json.load(open(f"{out}.{r}")) for r in range(world)]


MEMORY_KEYS = ("precision", "zero_bucket_elements", "zero3_sub_group_elements")


def _memory_settings(path: str) -> list[str]:
    """train.KEY=VALUE overrides for the memory settings `path` sets."""
    import yaml

    with open(path) as f:
        train = (yaml.safe_load(f) or {}).get("train") or {}
    return [f"train.{k}={train[k]}" for k in MEMORY_KEYS if k in train]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tubevit-h", choices=sorted(IMAGE_VITS))
    p.add_argument("--gate-layer", type=int, default=None, help="default: depth - 8 (train the last 8 blocks)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2,
                   help="training steps per run; the peak covers all of them (the first step "
                        "records ZeRO-3's module trace, later ones prefetch by it)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "bootstrap-h.yaml"),
                   help="experiment config whose memory settings the runs use")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="training precision (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. train.zero_bucket_elements=20000000")
    p.add_argument("--zero3-single", action="store_true",
                   help="also run ZeRO-3 on one worker (the same code path with nothing to shard over)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    os.environ["DS_ACCELERATOR"] = "cpu"
    # glibc's dynamic mmap threshold keeps freed large buffers (ZeRO-3 gathers and frees every
    # layer's parameters) in the heap, so RSS would count memory that is no longer in use.
    # A fixed threshold returns them to the OS; set for both runs, before the workers start.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    from pretrain.model import TubeViT
    from pretrain.train.memory import GIB, plan_memory
    from pretrain.train.config import ExperimentConfig, apply_overrides, from_dict

    a.overrides = _memory_settings(a.config) + a.overrides
    if a.precision:
        a.overrides.append(f"train.precision={a.precision}")
    train = from_dict(ExperimentConfig, apply_overrides(   # what the runs will use
        {"data": {"video_uri": "unused"}, "train": {"steps": a.steps}}, list(a.overrides))).train
    a.precision = train.precision
    args = {"frames": a.frames, "size": a.size, "micro_batch": a.micro_batch, "steps": a.steps,
            "precision": a.precision, "overrides": a.overrides}
    config = bootstrapped_config(a.model, a.gate_layer)
    with torch.device("meta"):
        meta_model = TubeViT(config)
    with tempfile.TemporaryDirectory(prefix="zero3-mem-") as tmp:
        path = os.path.join(tmp, "bootstrapped.safetensors")
        mp.start_processes(_make_file, args=(a.model, a.gate_layer, path), nprocs=1, join=True,
                           start_method="spawn")
        unsharded = measure(1, 0, args, path, tmp)
        sharded = measure(2, 3, args, path, tmp)
        zero3_alone = measure(1, 3, args, path, tmp) if a.zero3_single else None

    def plan(workers, stage, baseline):
        return plan_memory(meta_model, (a.frames, a.size, a.size), micro_batch=a.micro_batch, workers=workers,
                           zero_stage=stage, precision=a.precision, gate_layer=config.gate_layer,
                           reduce_bucket=train.zero_bucket_elements,
                           sub_group=train.zero3_sub_group_elements,
                           touched_only=True, overhead_gib=baseline / GIB)["gib"]

    gib = lambda b: round(b / GIB, 3)  # noqa: E731
    u_peak = unsharded[0]["peak_rss_bytes"]
    s_peak = max(r["peak_rss_bytes"] for r in sharded)
    result = {
        "model": f"bootstrapped {a.model} (image ViT depth/dim/patch {IMAGE_VITS[a.model][0]}/"
                 f"{IMAGE_VITS[a.model][1]}/{IMAGE_VITS[a.model][4]}, TubeViT-B tubes)",
        "gate_layer": config.gate_layer,
        "params": sum(p.numel() for p in meta_model.parameters()),
        "clip": [a.frames, a.size, a.size], "micro_batch": a.micro_batch, "precision": a.precision,
        "steps": a.steps, "config": a.config, "overrides": a.overrides,
        "unsharded_peak_gib": gib(u_peak),
        "sharded_peak_gib_per_worker": [gib(r["peak_rss_bytes"]) for r in sharded],
        "training_steps_peak_gib": {
            "unsharded": gib(unsharded[0]["step_peak_rss_bytes"] or 0),
            "sharded": [gib(r["step_peak_rss_bytes"] or 0) for r in sharded]},
        "baseline_rss_gib": {"unsharded": gib(unsharded[0]["baseline_rss_bytes"]),
                             "sharded": [gib(r["baseline_rss_bytes"]) for r in sharded]},
        "plan_unsharded_gib": plan(1, 0, unsharded[0]["baseline_rss_bytes"]),
        "plan_sharded_gib": plan(2, 3, max(r["baseline_rss_bytes"] for r in sharded)),
        "loss": {"unsharded": unsharded[0]["loss"], "sharded": sharded[0]["loss"]},
        "step_s": {"unsharded": unsharded[0]["step_s"], "sharded": max(r["step_s"] for r in sharded)},
        "ratio": round(u_peak / s_peak, 3),
    }
    if unsharded[0]["step_peak_rss_bytes"]:   # the same, counting only the training steps
        result["ratio_training_steps"] = round(
            unsharded[0]["step_peak_rss_bytes"] / max(r["step_peak_rss_bytes"] for r in sharded), 3)
    if zero3_alone:   # same DeepSpeed ZeRO-3 code path, nothing to shard over: sharding's own effect
        result["zero3_1worker_peak_gib"] = gib(zero3_alone[0]["peak_rss_bytes"])
        result["ratio_vs_zero3_1worker"] = round(zero3_alone[0]["peak_rss_bytes"] / s_peak, 3)
        result["plan_zero3_1worker_gib"] = plan(1, 3, zero3_alone[0]["baseline_rss_bytes"])
    result["plan_sharded_total_gib_by_workers"] = {
        n: plan(n, 3, max(r["baseline_rss_bytes"] for r in sharded))["total"] for n in (2, 4, 8, 16)}
    result["plan_ratio"] = round(result["plan_unsharded_gib"]["total"] / result["plan_sharded_gib"]["total"], 3)
    print_result(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
