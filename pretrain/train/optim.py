"""AdamW parameter groups (weight decay, layer-wise lr decay) and the warm-up + cosine
learning-rate schedule.

Kept free of DeepSpeed so the plain-PyTorch reference in the tests (and the benchmark's
bare loop) builds exactly the same optimizer as the engine.
"""
from __future__ import annotations

import math
import re

import torch

# Parts of an encoder below its first block (layer 0 of the layer-wise decay): the tokenizer
# and positions of TubeViT, the patch embedding and CLS token of plain ViTs.
_EMBEDDING = re.compile(r"^(encoder\.)?(tokenizer|pos_embed|patch_embed|cls_token|pos_drop)\b")
_BLOCK = re.compile(r"^(encoder\.)?blocks\.(\d+)\.")


def layer_of(name: str, depth: int) -> int:
    """Layer index of parameter `name` for layer-wise lr decay: 0 = embedding (tokenizer,
    positions), i + 1 = blocks[i], depth + 1 = everything above the blocks (final norm,
    pool, heads, gate, and a masked-autoencoder decoder)."""
    if _EMBEDDING.match(name):
        return 0
    m = _BLOCK.match(name)
    return int(m.group(2)) + 1 if m else depth + 1


def encoder_depth(model: torch.nn.Module) -> int:
    """Blocks of the encoder: the number of distinct `blocks.<i>` (or `encoder.blocks.<i>`)."""
    found = {int(m.group(2)) for n, _ in model.named_parameters() if (m := _BLOCK.match(n))}
    return max(found) + 1 if found else 0


def param_groups(model: torch.nn.Module, weight_decay: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: decayed weights and the rest (no_weight_decay names, biases, norms), each
    split by layer when `layer_decay` < 1.

    1-D tensors (biases, LayerNorm scales, the bootstrap gate) are never decayed: decaying
    them only pulls normalisation towards zero.

    Layer-wise learning-rate decay (BEiT, MAE and VideoMAE fine-tuning; VideoMAE uses 0.75):
    a parameter of layer l (`layer_of`) learns at lr x layer_decay^(depth + 1 - l), so the
    heads and final norm train at the full rate and each block below a factor slower: the
    pretrained lower layers move least. Each group carries its factor as `lr_scale`, and
    its `lr` is already scaled (the schedule multiplies every group's own base lr).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = encoder_depth(model) if layer_decay < 1.0 else 0
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)   # ZeRO-3 partitions flatten parameters
        no_decay = len(shape) <= 1 or name in skip or any(name.startswith(s + ".") for s in skip)
        layer = layer_of(name, depth) if layer_decay < 1.0 else 0
        groups.setdefault((layer, no_decay), []).append(p)
    out = []
    for (layer, no_decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        scale = layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr_scale": scale})
    return out


def warmup_cosine(step: int, *, warmup: int, total: int, peak: float, final: float) -> float:
    """Learning rate at optimizer step `step` (0-based: the lr used for the step-th update)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, fused_cpu_adam: bool = False,
                    layer_decay: float = 1.0):
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:   # the factor only sets the group's lr: optimizer state stays as before
        g["lr"] = lr * g.pop("lr_scale")
    if fused_cpu_adam:  # ZeRO-3 offload on GPU: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    # foreach=False: the same element-wise update order on flat ZeRO partitions and on
    # per-parameter tensors, so engine and reference agree to float rounding.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float,
                    warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR returning a factor of each group's base lr (`lr` x the group's lr_scale): the
    warm-up + cosine shape of `warmup_cosine`, the same for every group."""
    def factor(step: int) -> float:
        return warmup_cosine(step, warmup=warmup_steps, total=total_steps, peak=lr,
                             final=min_lr) / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
