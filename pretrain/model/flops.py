"""Parameter and forward-FLOP counts, read off the model's actual layers.

FLOPs are for one sample (batch 1), forward only, multiply-add = 2 FLOPs, counting the
matrix work: tube convolutions (at the conv's own stride and channel count, so S2D is
counted as it runs), every nn.Linear with the real token count, the two attention matmuls
(QK^T and AV: 2 * 2 * N^2 * d per block), the attention pool and the selected head.
Elementwise work (LayerNorm, GELU, softmax, residual adds, biases, the cached position
embedding, the interpolation of shared kernels) is left out: it is < 1% at these sizes and is
also what `torch.utils.flop_counter.FlopCounterMode` leaves out, which the tests cross-check
against.

Works on a model built on the meta device, so ViT-H can be counted without allocating it.
"""
from __future__ import annotations

import math

from torch import nn

from pretrain.model.tubes import image_grid, video_grids
from pretrain.model.tubevit import TubeViT


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    # ds_numel: the full size of a parameter DeepSpeed ZeRO-3 has partitioned.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def param_breakdown(model: TubeViT) -> dict[str, int]:
    """Parameters per top-level part (tokenizer, blocks, norm, pool, heads, gate)."""
    return {name: count_params(child) for name, child in model.named_children() if count_params(child)}


def _linear(layer: nn.Linear, tokens: int) -> int:
    return 2 * tokens * layer.in_features * layer.out_features


def count_flops(model: TubeViT, size: tuple[int, ...], dataset: str | None = None) -> dict[str, int]:
    """Forward FLOPs of one sample: `size` is (T, H, W) for a clip or (H, W) for an image.

    Returns {"tokens", "tokenizer", "attention_linear", "attention_matmul", "mlp", "pool",
    "head", "total"}; `dataset` picks the head (default: the first).
    """
    tok = model.tokenizer
    if len(size) == 2:
        grids = [image_grid(tok.specs, tuple(size))]
        convs = [tok.tubes[tok.image_index]]
    else:
        grids = video_grids(tok.specs, tuple(size), tok.skip_unfit)
        convs = list(tok.tubes)
    n = sum(math.prod(g) for g in grids) + int(model.config.class_token)  # + CLS token
    out = {"tokens": n, "tokenizer": 0, "attention_linear": 0, "attention_matmul": 0, "mlp": 0}
    for conv, grid in zip(convs, grids):
        # S2D runs the conv at S times the positions with 1/S of the channels.
        positions = math.prod(grid) * conv.spec.s2d_factor
        out["tokenizer"] += 2 * positions * conv.out_channels * conv.in_chans * math.prod(conv.spec.kernel)
    for block in model.blocks:
        attn = block.attn
        out["attention_linear"] += _linear(attn.qkv, n) + _linear(attn.proj, n)
        width = attn.qkv.out_features // 3
        out["attention_matmul"] += 2 * (2 * n * n * width)  # QK^T and AV
        out["mlp"] += sum(_linear(m, n) for m in block.mlp.modules() if isinstance(m, nn.Linear))
    pool = model.pool
    out["pool"] = _linear(pool.q, 1) + _linear(pool.kv, n) + 2 * (2 * n * pool.q.out_features) + _linear(pool.proj, 1)
    out["head"] = _linear(model.heads[model._dataset(dataset) if dataset else model.datasets[0]], 1)
    out["total"] = sum(v for k, v in out.items() if k != "tokens")
    return out


def gflops(model: TubeViT, size: tuple[int, ...], dataset: str | None = None) -> float:
    return count_flops(model, size, dataset)["total"] / 1e9
