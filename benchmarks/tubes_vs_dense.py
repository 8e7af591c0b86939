"""Sparse tubes vs dense tubelets: forward time of one 32x224x224 clip.

Compares TubeViT-B (the paper's four sparse tubes: 539 tokens) with the same-width,
same-depth ViT tokenised by dense ViViT-style 2x16x16 tubelets (3136 tokens, joint
space-time attention). Both run in this process with the same threads, batch 1, float32,
under torch.inference_mode, with `--warmup` untimed and `--reps` timed forwards each
(median reported, interleaved so background load hits both alike).

    python benchmarks/tubes_vs_dense.py [--reps 3] [--warmup 1] [--json]

`--json` prints one JSON object: tokens, GFLOPs (forward, multiply-add = 2, counted from the
layers by pretrain.model.count_flops), per-rep and median seconds per clip for each model,
threads, and `ratio` = dense median time / tube median time (higher = sparse tubes faster).
Median process CPU seconds are reported too: on a shared machine they move less than wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.report import print_result  # noqa: E402
from pretrain.model import count_flops, create_model, dense_baseline_config  # noqa: E402
from pretrain.model.tubevit import TubeViT  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tubevit-b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per model")
    parser.add_argument("--device", default="cpu", help="cpu (default) or e.g. cuda")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    models = {
        "tubes": create_model(args.model).eval().to(args.device),
        "dense": TubeViT(dense_baseline_config(args.model)).eval().to(args.device),
    }
    shape = (args.frames, args.size, args.size)
    clip = torch.randn(1, 3, *shape, device=args.device)
    sync = torch.cuda.synchronize if clip.is_cuda else (lambda: None)
    flops = {name: count_flops(m, shape) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            for _ in range(args.warmup):
                model.forward_features(clip)
        for _ in range(args.reps):
            for name, model in models.items():
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                model.forward_features(clip)
                sync()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": args.model,
        "clip": list(shape),
        "device": str(clip.device),
        "threads": torch.get_num_threads(),
        "tube_tokens": flops["tubes"]["tokens"],
        "dense_tokens": flops["dense"]["tokens"],
        "tube_gflops": round(flops["tubes"]["total"] / 1e9, 2),
        "dense_gflops": round(flops["dense"]["total"] / 1e9, 2),
        "tube_s_per_clip": round(median["tubes"], 4),
        "dense_s_per_clip": round(median["dense"], 4),
        "tube_s_reps": [round(t, 4) for t in times["tubes"]],
        "dense_s_reps": [round(t, 4) for t in times["dense"]],
        # CPU seconds of this process (all threads): less sensitive to other load on the box.
        "tube_cpu_s_per_clip": round(statistics.median(cpu["tubes"]), 4),
        "dense_cpu_s_per_clip": round(statistics.median(cpu["dense"]), 4),
        "flops_ratio": round(flops["dense"]["total"] / flops["tubes"]["total"], 2),
        "ratio": round(median["dense"] / median["tubes"], 2),
    }
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
