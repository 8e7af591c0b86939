"""Parameter and forward-FLOP counts, read off the model's actual layers.

FLOPs are for one sample (batch 1), forward only, multiply-add = 2 FLOPs, counting the
matrix work: tube convolutions (at the conv's own stride and channel count, so S2D is
counted as it runs), every nn.Linear with the real token count, the two attention matmuls
(QK^T and AV: 2 * 2 * N^2 * d per block), the attention pool and the selected head.
Elementwise work (LayerNorm, GELU, softmax, residual adds, biases, the cached position
embedding, the interpolation of shared kernels) is left out: it is < 1% at these sizes and is
also what `torch.utils.flop_counter.FlopCounterMode` leaves out, which the tests cross-check
against.

Masked pretraining (`count_masked_flops`): the encoder on the visible tokens, the decoder on
all of them; what `pretrain plan --mask-ratio` reports and a masked run's MFU counts.

Works on a model built on the meta device, so ViT-H can be counted without allocating it.
"""
from __future__ import annotations

import math

from torch import nn

from pretrain.model.vit import AttentionPool


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    # ds_numel: the full size of a parameter DeepSpeed ZeRO-3 has partitioned.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def param_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level part (tokenizer, blocks, norm, pool, heads, gate)."""
    return {name: count_params(child) for name, child in model.named_children() if count_params(child)}


def _linear(layer: nn.Linear, tokens: int) -> int:
    return 2 * tokens * layer.in_features * layer.out_features


def _input_shape(model, size: tuple[int, ...]) -> tuple[int, ...]:
    return (1, model.config.in_chans, *size)


def _tokenizer_flops(model, size: tuple[int, ...]) -> tuple[int, int]:
    """(tokens, FLOPs) of the tube convolutions that run on an input of `size`."""
    tokens = flops = 0
    for g, _, grid in model.token_groups(_input_shape(model, size)):
        conv = model.tokenizer.tubes[g]
        # S2D runs the conv at S times the positions with 1/S of the channels.
        positions = math.prod(grid) * conv.spec.s2d_factor
        flops += 2 * positions * conv.out_channels * conv.in_chans * math.prod(conv.spec.kernel)
        tokens += math.prod(grid)
    return tokens, flops


def token_count(model, size: tuple[int, ...]) -> int:
    """Tokens the blocks see for one input of `size` ((T, H, W) or (H, W)), CLS included."""
    return (sum(math.prod(g) for _, _, g in model.token_groups(_input_shape(model, size)))
            + int(getattr(model.config, "class_token", False)))


def blocks_flops(blocks, n: int) -> dict[str, int]:
    """Attention projections, the two attention matmuls and the MLP of `blocks` on n tokens."""
    out = {"attention_linear": 0, "attention_matmul": 0, "mlp": 0}
    for block in blocks:
        attn = block.attn
        out["attention_linear"] += _linear(attn.qkv, n) + _linear(attn.proj, n)
        width = attn.qkv.out_features // 3
        out["attention_matmul"] += 2 * (2 * n * n * width)  # QK^T and AV
        out["mlp"] += sum(_linear(m, n) for m in block.mlp.modules() if isinstance(m, nn.Linear))
    return out


def count_flops(model, size: tuple[int, ...], dataset: str | None = None) -> dict[str, int]:
    """Forward FLOPs of one sample: `size` is (T, H, W) for a clip or (H, W) for an image.

    Works for every family with a tube tokenizer (TubeViT, VideoMAE). Returns {"tokens",
    "tokenizer", "attention_linear", "attention_matmul", "mlp", "pool", "head", "total"};
    `dataset` picks the head (default: the first).
    """
    n, tokenizer = _tokenizer_flops(model, size)
    n += int(getattr(model.config, "class_token", False))   # + CLS token
    out = {"tokens": n, "tokenizer": tokenizer, **blocks_flops(model.blocks, n)}
    pool = model.pool
    if isinstance(pool, AttentionPool):
        out["pool"] = (_linear(pool.q, 1) + _linear(pool.kv, n) + 2 * (2 * n * pool.q.out_features)
                       + _linear(pool.proj, 1))
    else:   # VideoMAE's mean + LayerNorm: elementwise only
        out["pool"] = 0
    out["head"] = _linear(model.heads[model._dataset(dataset) if dataset else model.datasets[0]], 1)
    out["total"] = sum(v for k, v in out.items() if k != "tokens")
    return out


def count_masked_flops(mae, size: tuple[int, ...], ratio: float, scheme: str | None = None) -> dict[str, int]:
    """Forward FLOPs of one masked-pretraining sample (pretrain/model/mae.py): the tube
    convolutions on the whole input, the encoder's blocks on the visible tokens, the decoder's
    embedding on the visible tokens, its blocks on all tokens and each tube's output head on
    that tube's share of the masked tokens (its expected count; exact for one tube). No
    classification pool or head. `scheme` defaults to masking.default_scheme(encoder, size).

    Returns {"tokens", "visible_tokens", "tokenizer", "encoder", "decoder", "total"}.
    """
    from pretrain.model.masking import default_scheme, visible_count

    enc = mae.encoder
    shape = _input_shape(enc, size)
    scheme = scheme or default_scheme(enc, shape)
    n, tokenizer = _tokenizer_flops(enc, size)
    visible = visible_count(enc, shape, ratio, scheme)
    masked = n - visible
    dec = mae.decoder
    heads = sum(2 * masked * math.prod(grid) / n * dec.heads[g].in_features * dec.heads[g].out_features
                for g, _, grid in enc.token_groups(shape))
    out = {"tokens": n, "visible_tokens": visible, "tokenizer": tokenizer,
           "encoder": sum(blocks_flops(enc.blocks, visible).values()),
           "decoder": _linear(dec.embed, visible) + sum(blocks_flops(dec.blocks, n).values()) + round(heads)}
    out["total"] = out["tokenizer"] + out["encoder"] + out["decoder"]
    return out


def gflops(model, size: tuple[int, ...], dataset: str | None = None) -> float:
    return count_flops(model, size, dataset)["total"] / 1e9
