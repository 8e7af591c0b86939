"""Training-step time and MFU of TubeViT-B/L/H on one accelerator, with the options that matter.

    python benchmarks/mfu.py --json                                   # GPU: B, L, H, all options
    python benchmarks/mfu.py --device cpu --models tubevit-ti --frames 8 --size 64 --batch 2 --json

Needs only torch and the model package (no DeepSpeed, Ray, MLflow). One step = forward,
cross-entropy, backward, AdamW step, with bf16 autocast (fp32 master weights, the usual AMP
setup) unless `--precision fp32`. For every model and every option set in `--options`
(comma list; each a '+'-joined subset of: math, flash, compile, ckpt):

    math     SDPA restricted to the math kernel (materialises the N x N attention matrix)
    flash    SDPA restricted to the flash-attention kernel (GPU; on CPU the fused CPU kernel)
    compile  torch.compile(model)
    ckpt     activation checkpointing of every block

Figures per run: median step time over `--steps` timed steps (after `--warmup`), model
FLOPs per step = 3 x forward FLOPs (pretrain.model.count_flops: counted from the layers,
multiply-add = 2 FLOPs; backward = 2 x forward), MFU = model FLOP/s / peak, with the peak
measured here as the best bf16 (or fp32) dense matmul throughput (`matmul_peak_tflops`), and
also against the data-sheet peak when the device is in the table. With ckpt the hardware does
one more forward (HFU = 4/3 MFU), which MFU does not count. `ratio` = the best MFU against the
measured matmul peak (higher is better).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_result  # noqa: E402

DEFAULT_BATCH = {"tubevit-ti": 64, "tubevit-s": 48, "tubevit-b": 32, "tubevit-l": 16, "tubevit-h": 8}
DATASHEET_16BIT = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
OPTIONS = ("math", "flash", "compile", "ckpt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best dense n x n matmul throughput in FLOP/s (2 n^3 per matmul)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def sdpa_context(options: set[str]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "math" in options:
        return sdpa_kernel(SDPBackend.MATH)
    if "flash" in options:
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return nullcontext()


def run_one(name: str, options: set[str], args, device: torch.device) -> dict:
    from pretrain.model import count_flops, create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes={"video": 400}, skip_unfit_tubes=True).to(device)
    clip = (args.frames, args.size, args.size)
    fwd = count_flops(model, clip)
    if "ckpt" in options:
        model.set_grad_checkpointing(True)
    step_model = torch.compile(model) if "compile" in options else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = args.batch or DEFAULT_BATCH.get(name, 8)
    x = torch.randn(batch, 3, *clip, device=device)
    y = torch.randint(0, 400, (batch,), device=device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext())

    def step():
        with amp, sdpa_context(options):
            loss = F.cross_entropy(step_model(x, dataset="video").float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    model_flops = 3 * fwd["total"] * batch
    out = {"model": name, "options": "+".join(sorted(options)) or "default", "batch": batch,
           "tokens_per_clip": fwd["tokens"], "step_s": round(step_s, 5),
           "clips_per_s": round(batch / step_s, 2), "model_tflops_per_step": round(model_flops / 1e12, 4),
           "achieved_tflops": round(model_flops / step_s / 1e12, 4), "achieved_flops_per_s": model_flops / step_s,
           "loss": round(loss.item(), 4)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="tubevit-b,tubevit-l,tubevit-h")
    p.add_argument("--model", dest="models", help="alias of --models")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="clips per step (default per model: B 32, L 16, H 8)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--options", default=None,
                   help="comma list of option sets, e.g. 'math,flash,flash+compile,flash+compile+ckpt' "
                        "(default: that on GPU, 'flash' on CPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=None, help="default 8192 on GPU, 512 on CPU")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    option_sets = (args.options or ("math,flash,flash+compile,flash+compile+ckpt" if device.type == "cuda" else "flash"))
    sets = []
    for item in option_sets.split(","):
        opts = {o for o in item.split("+") if o and o != "default"}
        unknown = opts - set(OPTIONS)
        if unknown or {"math", "flash"} <= opts:
            p.error(f"option set {item!r}: use a '+'-joined subset of {', '.join(OPTIONS)} (math or flash, not both)")
        sets.append(opts)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n = args.matmul_size or (8192 if device.type == "cuda" else 512)
    peak = matmul_peak(device, dtype, n)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sheet = next((v for k, v in DATASHEET_16BIT.items() if k in name.upper()), None) if args.precision == "bf16" else None
    runs = []
    for model in args.models.split(","):
        for opts in sets:
            try:
                r = run_one(model, opts, args, device)
            except torch.cuda.OutOfMemoryError:
                r = {"model": model, "options": "+".join(sorted(opts)), "error": "out of memory"}
                torch.cuda.empty_cache()
            if "step_s" in r:
                achieved = r.pop("achieved_flops_per_s")
                r["mfu"] = round(achieved / peak, 4)
                r["hfu"] = round(achieved / peak * (4 / 3 if "ckpt" in opts else 1.0), 4)
                if sheet:
                    r["mfu_datasheet"] = round(achieved / sheet, 4)
            runs.append(r)
            if not args.json:
                print(json.dumps(r), flush=True)
    mfus = [r["mfu"] for r in runs if "mfu" in r]
    result = {"device": name, "precision": args.precision, "clip": [args.frames, args.size, args.size],
              "matmul_peak_tflops": round(peak / 1e12, 3), "datasheet_peak_tflops": sheet and sheet / 1e12,
              "flops_convention": "model FLOPs = 3 x counted forward (multiply-add = 2), per step",
              "runs": runs, "ratio": max(mfus) if mfus else 0.0}
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
