"""AdamW parameter groups and the warm-up + cosine learning-rate schedule.

Kept free of DeepSpeed so the plain-PyTorch reference in the tests (and the benchmark's
bare loop) builds exactly the same optimizer as the engine.
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and the rest (no_weight_decay names, biases, norms).

    1-D tensors (biases, LayerNorm scales, the bootstrap gate) are never decayed: decaying
    them only pulls normalisation towards zero.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(name.startswith(s + ".") for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, *, warmup: int, total: int, peak: float, final: float) -> float:
    """Learning rate at optimizer step `step` (0-based: the lr used for the step-th update)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, fused_cpu_adam: bool = False):
    groups = param_groups(model, weight_decay)
    if fused_cpu_adam:  # ZeRO-3 offload on GPU: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    # foreach=False: the same element-wise update order on flat ZeRO partitions and on
    # per-parameter tensors, so engine and reference agree to float rounding.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float,
                    warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR returning a factor of the group's base lr (every group's base is `lr`)."""
    def factor(step: int) -> float:
        return warmup_cosine(step, warmup=warmup_steps, total=total_steps, peak=lr,
                             final=min_lr) / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
