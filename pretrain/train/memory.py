"""Per-worker training memory estimate under DeepSpeed ZeRO (what `pretrain plan` prints).

Counts, for one data-parallel worker of N, training with AdamW (bytes; b = bytes of the
compute dtype: 2 for bf16/fp16, 4 for fp32; P = all parameters, P_t = trainable ones):

    parameters   b * P            / N at stage 3 (frozen ones are partitioned too)
    gradients    b * P_t          / N at stage >= 2 (frozen parameters have none); bf16 at
                                  stage 0 adds DeepSpeed's fp32 accumulation copy, 4 * P_t
    optimizer    K * P_t          / N at stage >= 1; K = 12 (fp32 master copy + Adam m, v):
                                  DeepSpeed keeps a separate fp32 partition at every stage
                                  >= 1 and in bf16/fp16; K = 8 for plain fp32 stage 0
    activations  saved for backward, below
    working      stage 3 only: gathered full parameters of the block being computed and the
                 one prefetched, 2 * b * (largest block)
    temporaries  stage >= 1: the optimizer step works on one flat fp32 partition, and AdamW's
                 update makes one temporary of that size, 4 * P_t / N; at stage 3 the
                 partition is stepped in sub-groups (train.zero3_sub_group_elements, 1e7),
                 4 * min(P_t / N, sub-group)
    buffers      the gradient reduce bucket, b * min(bucket, P_t) (our engine sets
                 `reduce_bucket_size` = train.zero_bucket_elements, 5e7 by default, where
                 DeepSpeed's own default is 5e8; on a GPU that whole buffer is
                 reserved: `touched_only=False` counts it whole); none for a single
                 stage-0 worker (nothing to reduce)
    overhead     a fixed allowance for the runtime (CUDA context / Python + torch + DeepSpeed)

Activations saved per trained transformer block, per sample, N tokens, width d, MLP width m
(pre-LN block, SDPA with a flash/memory-efficient kernel, so no N x N matrix is kept):
LN1 in, LN1 out, q/k/v, attention out, proj in, LN2 in, LN2 out (9 N d) + fc1 out and GELU
out (2 N m), times b. Blocks whose parameters are frozen and whose input needs no gradient
(the bootstrap's frozen prefix) save nothing. With activation checkpointing a trained block
keeps only its input (N d) and one block's full set is live again during its recompute.
One block's full set is always added as forward/backward workspace. Plus the input clip.

Factorised blocks save more per token: a block class may say how much
(`saved_per_token_d`, in units of d: ViViT model 3's 16, TimeSformer's 17; 9 by default),
and a model whose memory does not follow this per-block pattern counts its own activations
(`model.activation_bytes(size, micro_batch, bytes_per, activation_checkpointing)`: VTN,
whose chunked, checkpointed frame backbone keeps one chunk live whatever the clip length).
ViViT model 2's temporal encoder (a few blocks over one token per temporal index) is left out.

It is an estimate for planning (the ZeRO paper's accounting plus DeepSpeed's buffers), not
an allocator trace: fragmentation, the CPU allocator's caching and DeepSpeed's small
persistent parameters (< 1e5 elements, kept whole on every rank) are not modelled.
benchmarks/zero3_memory.py compares it with measured peaks.
"""
from __future__ import annotations

import math

from torch import nn

GIB = 1024 ** 3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())


def plan_memory(model: nn.Module, size: tuple[int, ...], *, micro_batch: int, workers: int = 1,
                zero_stage: int = 0, precision: str = "bf16", activation_checkpointing: bool = False,
                gate_layer: int | None = None, reduce_bucket: int = 50_000_000,
                sub_group: int = 10_000_000,
                touched_only: bool = True, overhead_gib: float = 1.0) -> dict:
    """Per-worker memory estimate in bytes (and GiB) for a model on a clip/image `size`.

    `gate_layer` = S freezes the bootstrap's prefix (tokenizer, positions, blocks[:S]);
    None trains everything. Works on a meta-device model.
    """
    from pretrain.model.bootstrap import frozen_prefix
    from pretrain.model.flops import token_count

    if precision not in DTYPE_BYTES:
        raise ValueError(f"precision {precision!r}: one of {', '.join(DTYPE_BYTES)}")
    b = DTYPE_BYTES[precision]
    N = workers
    named = list(model.named_parameters())
    total = sum(_numel(p) for _, p in named)
    trainable = sum(_numel(p) for n, p in named if gate_layer is None or not frozen_prefix(n, gate_layer))

    cfg = model.config
    tokens = token_count(model, size)
    d, m = cfg.dim, cfg.mlp_dim
    own = getattr(model, "activation_bytes", None)
    if own is not None:
        activations = own(size, micro_batch=micro_batch, bytes_per=b,
                          activation_checkpointing=activation_checkpointing)
    else:
        per_token_d = max((getattr(blk, "saved_per_token_d", 9) for blk in model.blocks), default=9)
        per_block = (per_token_d * tokens * d + 2 * tokens * m) * b    # bytes, one sample
        trained_blocks = cfg.depth - (gate_layer or 0)
        if activation_checkpointing:
            saved = trained_blocks * tokens * d * b
        else:
            saved = trained_blocks * per_block
        head = (2 * tokens * d + 2 * d) * b                             # pool k/v + pooled
        clip = 3 * math.prod(size) * b
        activations = micro_batch * (saved + per_block + head + clip)

    k_optim = 8 if (zero_stage == 0 and precision == "fp32") else 12
    params = b * total / (N if zero_stage >= 3 else 1)
    grads = b * trainable / (N if zero_stage >= 2 else 1)
    if zero_stage == 0 and precision == "bf16":   # DeepSpeed's BF16_Optimizer: fp32 grad copy
        grads += 4 * trainable
    optimizer = k_optim * trainable / (N if zero_stage >= 1 else 1)
    largest_block = max((sum(_numel(p) for p in blk.parameters()) for blk in model.blocks), default=0)
    working = 2 * b * largest_block if zero_stage >= 3 and N > 1 else 0
    partition = trainable / N
    temporaries = 4 * (min(partition, sub_group) if zero_stage >= 3 else partition) if zero_stage >= 1 else 0
    bucket = min(reduce_bucket, trainable) if touched_only else reduce_bucket
    buffers = b * bucket if trainable and (zero_stage > 0 or N > 1) else 0
    overhead = overhead_gib * GIB
    parts = {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations,
             "working": working, "temporaries": temporaries, "buffers": buffers, "overhead": overhead}
    total_bytes = sum(parts.values())
    return {
        "workers": N, "zero_stage": zero_stage, "micro_batch": micro_batch, "precision": precision,
        "activation_checkpointing": activation_checkpointing, "gate_layer": gate_layer,
        "tokens": tokens, "params_total": total, "params_trainable": trainable,
        "bytes": {k: int(v) for k, v in parts.items()} | {"total": int(total_bytes)},
        "gib": {k: round(v / GIB, 3) for k, v in parts.items()} | {"total": round(total_bytes / GIB, 3)},
    }


def verdict(plan: dict, device_gib: float) -> dict:
    """fits / headroom against a device of `device_gib` GiB."""
    total = plan["gib"]["total"]
    return {"device_memory_gib": device_gib, "fits": total <= device_gib,
            "headroom_gib": round(device_gib - total, 3)}

