"""Training meters: loss, throughput, tokens, MFU, and where the step time went.

Each rank accumulates plain Python/tensor sums between log points (`IntervalTotals`); at a
log point (a step number every rank reaches) one all-reduce turns them into global
figures. Nothing here synchronises the accelerator per step: the loss stays a device
tensor until the log point. Token counts and FLOPs per sample (`sample_costs`) come from
the model's own counters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pretrain.data.metadata import DataInfo

# Dense peak FLOP/s per device for 16-bit (bf16; fp16 where a chip has no bf16) matmuls, from
# the vendor's data sheet, the dense (non-sparse) figure: NVIDIA's sheets print the 2:4
# sparsity number first (with a footnote), the dense one is half of it. Keys are matched as
# substrings of the device name, longest first, so a variant's key ("H100 PCIE") wins over
# its family's ("H100"). MFU is reported only for accelerators found here; `pretrain plan
# --accelerator` names them in lower case with '-' for ' ' (`accelerator_names`).
PEAK_FLOPS_16BIT = {
    "B200": 2250e12,     # HGX B200 data sheet: 36 PFLOPS BF16 sparse per 8 GPUs -> 2.25 PF dense per GPU
    "H200": 989e12,      # H200 SXM data sheet: 1,979 TFLOPS BF16 sparse
    "H200 NVL": 835e12,  # H200 NVL (PCIe card) data sheet: 1,671 TFLOPS BF16 sparse
    "H100": 989e12,      # H100 SXM data sheet: 1,979 TFLOPS BF16 sparse
    "H100 PCIE": 756e12,  # H100 PCIe data sheet: 1,513 TFLOPS BF16 sparse
    "H100 NVL": 835e12,  # H100 NVL data sheet: 1,671 TFLOPS BF16 sparse
    "A100": 312e12,      # A100 data sheet: 312 dense / 624 sparse, SXM and PCIe alike
    "L40S": 362e12,      # L40S data sheet: 362.05 dense / 733 sparse
    "L4": 121e12,        # L4 data sheet: 242 TFLOPS BF16 sparse
    "A10G": 70e12,       # AWS-only A10 variant: no public NVIDIA data sheet; the commonly quoted figure
    "V100": 125e12,      # V100 SXM2 data sheet, FP16 tensor (Volta has no bf16; PCIe: 112)
    "TPU V5E": 197e12,   # Google Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip
}
# fp32 training on Ampere+ uses TF32 tensor cores for matmuls (same sheets, dense figure).
PEAK_FLOPS_TF32 = {"H200": 494e12, "H100": 494e12, "H100 PCIE": 378e12, "A100": 156e12}


def accelerator_peak(setting: str, precision: str) -> tuple[str | None, float | None]:
    """(name, peak FLOP/s per device) from the config value or the detected device name."""
    name = setting
    if setting == "auto":
        if not torch.cuda.is_available():
            return None, None
        name = torch.cuda.get_device_name()
    table = PEAK_FLOPS_TF32 if precision == "fp32" else PEAK_FLOPS_16BIT
    upper = name.upper()
    for key in sorted(table, key=len, reverse=True):   # longest (most specific) match first
        if key in upper:
            return key, table[key]
    return name, None


def accelerator_names(precision: str = "bf16") -> list[str]:
    """The accelerators `named_peak` knows at `precision`, e.g. ['a100', 'h100', 'h100-pcie']."""
    table = PEAK_FLOPS_TF32 if precision == "fp32" else PEAK_FLOPS_16BIT
    return sorted(key.lower().replace(" ", "-") for key in table)


def named_peak(name: str, precision: str = "bf16") -> float:
    """Peak FLOP/s of the accelerator called `name` exactly (as `accelerator_names` spells it).

    Unlike `accelerator_peak` (which reads a device name and may match a family), an
    operator's choice must be one entry of the table, so 'h100' never silently means a PCIe card.
    """
    from pretrain.errors import UserError

    table = PEAK_FLOPS_TF32 if precision == "fp32" else PEAK_FLOPS_16BIT
    key = name.strip().upper().replace("-", " ")
    if key not in table:
        raise UserError(f"accelerator '{name}' has no {precision} peak in the table "
                        "(pretrain/train/metrics.py); valid names: "
                        f"{', '.join(accelerator_names(precision))}")
    return table[key]


def sample_costs(model, info: DataInfo,
                 masking: dict[str, tuple[float, str]] | None = None) -> dict[str, tuple[int, float]]:
    """modality -> (tokens per sample, training FLOPs per sample = 3 x forward).

    A masked autoencoder (pretrain/model/mae.py) needs `masking`: modality -> (mask ratio,
    scheme); its forward is the masked one (flops.count_masked_flops: encoder on the visible
    tokens, decoder on all), so a masked run's MFU counts the work it does, not the full
    model's. The token count stays the input's tokens.
    """
    from pretrain.model import count_flops, count_masked_flops
    from pretrain.model.mae import MaskedAutoencoder

    model = getattr(model, "module", model)
    masked = isinstance(model, MaskedAutoencoder)
    if masked and masking is None:
        raise ValueError("sample_costs of a MaskedAutoencoder needs masking={modality: (ratio, scheme)}")
    out = {}
    for modality, size in (("video", info.video_size), ("image", info.image_size)):
        if size is None:
            continue
        if masked:
            ratio, scheme = masking[modality]
            f = count_masked_flops(model, size, ratio, scheme)
        else:
            f = count_flops(model, size, info.dataset_of[modality])
        out[modality] = (f["tokens"], 3.0 * f["total"])
    return out


def skipped_samples(loader, world: int) -> float:
    """Undecodable samples the loader skipped so far, summed over ranks (collective)."""
    n = torch.tensor([float(loader.skipped_samples)], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(n)
    return n.item()


@dataclass
class IntervalTotals:
    """Sums over the steps since the previous log point, on one rank."""
    loss_sum: torch.Tensor | float = 0.0
    steps: int = 0           # steps in the loss mean (may include carried-over ones)
    timed_steps: int = 0     # steps run in this process since the window opened
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    data_wait_s: float = 0.0
    log_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    modality_code: int = 0   # order-sensitive hash of the step modalities (rank-agreement check)

    def add_step(self, loss: torch.Tensor, samples: int, tokens: int, flops: float,
                 modality: str) -> None:
        self.loss_sum = self.loss_sum + loss.detach().float()
        self.steps += 1
        self.timed_steps += 1
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.modality_code = (self.modality_code * 31 + (1 if modality == "video" else 2)) % 1000003

    def reduce(self, world_size: int, peak_flops: float | None, lr: float) -> dict[str, float]:
        """Global metrics for the window (collective: every rank calls it at the same step)."""
        elapsed = time.perf_counter() - self.start
        vec = torch.tensor([float(self.loss_sum), float(self.steps), float(self.samples),
                            float(self.tokens), self.flops], dtype=torch.float64)
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(vec)
        loss_sum, steps, samples, tokens, flops = vec.tolist()
        if dist.is_initialized() and world_size > 1:
            # max == min across ranks <=> every rank ran the same modality sequence.
            mx = torch.tensor([float(self.modality_code)], dtype=torch.float64)
            mn = mx.clone()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            dist.all_reduce(mn, op=dist.ReduceOp.MIN)
            if mx.item() != mn.item():
                raise RuntimeError("ranks ran different image/video step sequences; the joint "
                                   "mixer must be seeded identically on every rank")
        steps = max(steps, 1.0)
        step_time = elapsed / max(self.timed_steps, 1)
        out = {
            "train/loss": loss_sum / steps,
            "train/lr": lr,
            "perf/samples_per_sec": samples / elapsed,
            "perf/tokens_per_sec": tokens / elapsed,
            "perf/step_time_s": step_time,
            "perf/data_wait_share": self.data_wait_s / elapsed,
            "perf/log_share": self.log_s / elapsed,
        }
        if peak_flops:
            out["perf/mfu"] = flops / elapsed / (peak_flops * world_size)
        return out

    def carry(self, world_size: int) -> dict[str, float]:
        """The loss part of the window as global figures, for a checkpoint's extra state.

        Restoring it makes train/loss at the next log point independent of a resume in
        between (collective, like reduce)."""
        vec = torch.tensor([float(self.loss_sum), float(self.steps)], dtype=torch.float64)
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(vec)
        total, steps = vec.tolist()
        per_rank_steps = steps / world_size
        return {"loss_mean": total / steps if steps else 0.0, "steps": per_rank_steps}

    @classmethod
    def from_carry(cls, carried: dict | None) -> "IntervalTotals":
        w = cls()
        if carried and carried.get("steps"):
            w.steps = int(round(carried["steps"]))
            w.loss_sum = carried["loss_mean"] * w.steps
        return w
