"""Masked pretraining vs supervised training: time of one training step of the same model.

One step = forward + backward + AdamW update, batch `--batch` clips of `--frames` x
`--size` x `--size`, float32, in this process with the same threads:
- supervised: the model's classification forward through one head, cross-entropy;
- masked: the same model as the encoder of a MaskedAutoencoder (pretrain/model/mae.py, the
  decoder at its defaults: width 384, 4 blocks), a fresh mask of `--mask-ratio` per step
  (`--scheme`, default masking.default_scheme: tube for one token grid, else aligned), the
  reconstruction loss.
Each has its own optimizer, the trainer's update as ZeRO (stage >= 1) runs it on one worker
(`ZeroUpdate`): pretrain.train.optim.build_optimizer's AdamW (foreach=False) over one flat
fp32 partition per parameter group, gradients copied in and parameters copied back.
Before, the benchmark stepped torch's AdamW(foreach=True) over the 200-odd parameter tensors,
an update the trainer never runs and the slowest on CPU (videomae-b, 95M parameters, one
process at load 8-13: foreach per-tensor 13-27 s, foreach=False per-tensor 7-9 s, the flat
foreach=False partition 2.7-2.8 s, torch's fused=True 0.7-2.3 s).
`--warmup` steps each untimed, then `--reps` timed steps each, interleaved so background
load hits both alike; medians reported.

    python benchmarks/masked_step.py [--model videomae-b] [--frames 16] [--reps 3] [--json]

`--json` prints one JSON object: tokens, visible tokens, training GFLOPs per clip (3 x the
forward counted by pretrain.model.count_flops / count_masked_flops), per-rep and median
seconds per step of each, their process CPU seconds and update seconds (the copies and the
AdamW step), `flops_ratio`, `fwd_bwd_ratio` (the steps without their update: the same work
in both, which the mask cannot shrink and which narrows the step ratio) and `ratio` =
supervised median / masked median (VideoMAE reports about 3.2x at mask 0.9 from its
asymmetric design).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.report import print_result  # noqa: E402
from pretrain.model import count_flops, count_masked_flops, create_model  # noqa: E402
from pretrain.model.mae import MaskedAutoencoder  # noqa: E402
from pretrain.model.masking import default_scheme, mask_tokens  # noqa: E402
from pretrain.train.optim import build_optimizer  # noqa: E402


class ZeroUpdate:
    """The trainer's optimizer update of `model` as DeepSpeed ZeRO (stage >= 1) runs it on one
    worker: build_optimizer's AdamW and parameter groups, each group's parameters held as one
    flat fp32 partition that the optimizer steps (what ZeRO hands its optimizer), the
    gradients flattened into it before and the parameters copied back from it after."""

    def __init__(self, model: torch.nn.Module):
        self.optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.05, betas=(0.9, 0.95),
                                         eps=1e-8)
        self.params = [group["params"] for group in self.optimizer.param_groups]
        for group, params in zip(self.optimizer.param_groups, self.params):
            flat = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_()
            group["params"] = [flat]      # no state yet: nothing keyed by the old tensors

    def zero_grad(self) -> None:
        for params in self.params:
            for p in params:
                p.grad = None

    def step(self) -> None:
        for group, params in zip(self.optimizer.param_groups, self.params):
            flat = group["params"][0]
            # zeros for parameters outside this forward (other heads), as in ZeRO's buffer
            flat.grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                   for p in params])
        self.optimizer.step()
        with torch.no_grad():
            for group, params in zip(self.optimizer.param_groups, self.params):
                for p, value in zip(params, group["params"][0].split([p.numel() for p in params])):
                    p.copy_(value.view_as(p))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="videomae-b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mask-ratio", type=float, default=0.9)
    parser.add_argument("--scheme", default=None, help="tube, random or aligned (default: tube for "
                        "one token grid, else aligned)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per objective")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per objective")
    parser.add_argument("--device", default="cpu", help="cpu (default) or e.g. cuda")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(args.model).train().to(args.device)
    mae = MaskedAutoencoder(model).train().to(args.device)
    shape = (args.frames, args.size, args.size)
    clip = torch.randn(args.batch, 3, *shape, device=args.device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=args.device)
    dataset = model.datasets[0]
    scheme = args.scheme or default_scheme(model, tuple(clip.shape))
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if clip.is_cuda else (lambda: None)
    optim = {"supervised": ZeroUpdate(model), "masked": ZeroUpdate(mae)}

    def supervised():
        return F.cross_entropy(model(clip, dataset=dataset), labels)

    def masked():
        return mae(clip, mask_tokens(mae, clip, args.mask_ratio, scheme, generator))

    steps = {"supervised": supervised, "masked": masked}

    def step(name) -> float:
        """One step; returns the seconds of its optimizer update (the rest is fwd + bwd)."""
        optim[name].zero_grad()
        steps[name]().backward()
        sync()
        start = time.perf_counter()
        optim[name].step()
        sync()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in steps}
    update: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for name in steps:
        for _ in range(args.warmup):
            step(name)
    for _ in range(args.reps):
        for name in steps:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            update[name].append(step(name))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    full = count_flops(model, shape, dataset)
    part = count_masked_flops(mae, shape, args.mask_ratio, scheme)
    median = {name: statistics.median(t) for name, t in times.items()}
    # forward + backward alone: the step minus its update (the same work in both, which
    # narrows the step ratio).
    fwd_bwd = {name: statistics.median(t - u for t, u in zip(times[name], update[name])) for name in steps}
    result = {
        "model": args.model,
        "clip": list(shape),
        "batch": args.batch,
        "mask_ratio": args.mask_ratio,
        "scheme": scheme,
        "device": str(clip.device),
        "threads": torch.get_num_threads(),
        "tokens": full["tokens"],
        "visible_tokens": part["visible_tokens"],
        "supervised_train_gflops": round(3 * full["total"] / 1e9, 2),
        "masked_train_gflops": round(3 * part["total"] / 1e9, 2),
        "supervised_s_per_step": round(median["supervised"], 4),
        "masked_s_per_step": round(median["masked"], 4),
        "supervised_s_reps": [round(t, 4) for t in times["supervised"]],
        "masked_s_reps": [round(t, 4) for t in times["masked"]],
        # CPU seconds of this process (all threads): less sensitive to other load on the box.
        "supervised_cpu_s_per_step": round(statistics.median(cpu["supervised"]), 4),
        "masked_cpu_s_per_step": round(statistics.median(cpu["masked"]), 4),
        "supervised_update_s": round(statistics.median(update["supervised"]), 4),
        "masked_update_s": round(statistics.median(update["masked"]), 4),
        "flops_ratio": round(full["total"] / part["total"], 2),
        "fwd_bwd_ratio": round(fwd_bwd["supervised"] / fwd_bwd["masked"], 2),
        "ratio": round(median["supervised"] / median["masked"], 2),
    }
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
