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

ViViT models 1-3 and TimeSformer (vivit.py) are counted per factorisation from their blocks:
each attention's projections on the tokens it runs over and its two matmuls per sequence
(model 1: one sequence of all tokens; model 2: nt spatial sequences of nh*nw (+ CLS) in the
spatial encoder, one of nt + 1 in the temporal one; model 3: nt spatial sequences of nh*nw
and nh*nw temporal ones of nt; TimeSformer: nh*nw temporal sequences of nt, its temporal_fc
on all tokens, nt spatial sequences of 1 + nh*nw, the MLP on all tokens + CLS). Their
"tokens" are the space-time tokens (the papers' 3136, 1568), CLS tokens not included.

VTN (vtn.py): the frame backbone on nt sequences of nh*nw (+ CLS) tokens (chunking changes
the batching, not the work), its temporal encoder on one sequence of 1 + nt, and the 2-layer
MLP head. The Longformer window is a mask on scaled_dot_product_attention, which computes the
dense (1 + nt)^2 scores: that is counted (and is what FlopCounterMode sees); a banded kernel
would need (1 + nt)(w + 1) + nt of them per block (`longformer_matmul_flops`), which at
64-256 frames is a small fraction of a percent of the backbone either way.

Works on a model built on the meta device, so ViT-H can be counted without allocating it.
"""
from __future__ import annotations

import math

from torch import nn

from pretrain.model.vit import AttentionPool, Block
from pretrain.model.vivit import DividedBlock, FactorisedBlock, VideoTransformer, ViViTFE
from pretrain.model.vtn import VTN


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
    n = sum(math.prod(g) for _, _, g in model.token_groups(_input_shape(model, size)))
    if isinstance(model, VideoTransformer):
        return n + int(getattr(model, "cls_token", None) is not None)
    return n + int(getattr(model.config, "class_token", False))


def _attention(attn, sequences: int, length: int) -> tuple[int, int]:
    """(projection FLOPs, matmul FLOPs) of one attention layer over `sequences` independent
    sequences of `length` tokens each."""
    tokens = sequences * length
    width = attn.qkv.out_features // 3
    return (_linear(attn.qkv, tokens) + _linear(attn.proj, tokens),
            sequences * 2 * (2 * length * length * width))   # QK^T and AV


def _mlp(block, tokens: int) -> int:
    return sum(_linear(m, tokens) for m in block.mlp.modules() if isinstance(m, nn.Linear))


def blocks_flops(blocks, n: int, sequences: int = 1) -> dict[str, int]:
    """Attention projections, the two attention matmuls and the MLP of plain (joint
    attention) `blocks` on `sequences` independent sequences of n tokens."""
    out = {"attention_linear": 0, "attention_matmul": 0, "mlp": 0}
    for block in blocks:
        linear, matmul = _attention(block.attn, sequences, n)
        out["attention_linear"] += linear
        out["attention_matmul"] += matmul
        out["mlp"] += _mlp(block, sequences * n)
    return out


def _factorised_blocks_flops(blocks, nt: int, ns: int) -> dict[str, int]:
    """ViViT model 3's and TimeSformer's blocks on an nt x ns token grid (vivit.py)."""
    out = {"attention_linear": 0, "attention_matmul": 0, "mlp": 0}
    n = nt * ns
    for block in blocks:
        if isinstance(block, FactorisedBlock):      # spatial MSA, temporal MSA, MLP; no CLS
            parts = [_attention(block.attn, nt, ns), _attention(block.temporal_attn, ns, nt)]
            mlp_tokens = n
        elif isinstance(block, DividedBlock):       # time (no CLS) + temporal_fc, space (+ CLS copy)
            parts = [_attention(block.temporal_attn, ns, nt), (_linear(block.temporal_fc, n), 0),
                     _attention(block.attn, nt, 1 + ns)]
            mlp_tokens = 1 + n
        else:
            raise TypeError(f"no FLOP count for a {type(block).__name__}")
        out["attention_linear"] += sum(p[0] for p in parts)
        out["attention_matmul"] += sum(p[1] for p in parts)
        out["mlp"] += _mlp(block, mlp_tokens)
    return out


def longformer_matmul_flops(model: VTN, frames: int) -> int:
    """The attention matmuls VTN's temporal encoder would need with a banded (Longformer)
    kernel at `frames` frames: per block, each frame's scores with the frames in its window and
    the CLS token, the CLS token's with everything (QK^T and AV). flops.py counts the dense
    masked SDPA that runs (module docstring); this is the figure a banded kernel would reach."""
    width = model.config.dim
    total = 0
    for w in model.config.windows:
        half = w // 2
        pairs = sum(min(i + half, frames - 1) - max(i - half, 0) + 1 for i in range(frames))
        pairs += 2 * frames + 1                     # frames <-> CLS, CLS <-> CLS
        total += 2 * (2 * pairs * width)
    return total


def _video_transformer_flops(model, size: tuple[int, ...], dataset: str | None) -> dict[str, int]:
    """count_flops of the ViViT / TimeSformer / VTN families, per factorisation."""
    n, tokenizer = _tokenizer_flops(model, size)
    (_, _, (nt, nh, nw)), = model.token_groups(_input_shape(model, size))
    ns = nh * nw
    out = {"tokens": n, "tokenizer": tokenizer}
    if isinstance(model, VTN):                  # frame backbone per frame, temporal on 1 + nt
        spatial = blocks_flops(model.blocks, ns + int(model.cls_token is not None), sequences=nt)
        temporal = blocks_flops(model.temporal_blocks, nt + 1)
        out.update({k: spatial[k] + temporal[k] for k in spatial})
        out["pool"] = 0
        head = model.heads[model._dataset(dataset) if dataset else model.datasets[0]]
        out["head"] = sum(_linear(m, 1) for m in head.modules() if isinstance(m, nn.Linear))
        out["total"] = sum(v for k, v in out.items() if k != "tokens")
        return out
    if isinstance(model, ViViTFE):
        spatial = blocks_flops(model.blocks, ns + int(model.cls_token is not None), sequences=nt)
        temporal = blocks_flops(model.temporal_blocks, nt + 1)
        out.update({k: spatial[k] + temporal[k] for k in spatial})
    elif all(isinstance(b, Block) for b in model.blocks):   # model 1: joint attention
        out.update(blocks_flops(model.blocks, n + int(model.cls_token is not None)))
    else:
        out.update(_factorised_blocks_flops(model.blocks, nt, ns))
    out["pool"] = 0   # the CLS token or a mean: no matrix work
    out["head"] = _linear(model.heads[model._dataset(dataset) if dataset else model.datasets[0]], 1)
    out["total"] = sum(v for k, v in out.items() if k != "tokens")
    return out


def count_flops(model, size: tuple[int, ...], dataset: str | None = None) -> dict[str, int]:
    """Forward FLOPs of one sample: `size` is (T, H, W) for a clip or (H, W) for an image.

    Works for every family with a tube tokenizer (TubeViT, VideoMAE, ViViT 1-3, TimeSformer, VTN).
    Returns {"tokens", "tokenizer", "attention_linear", "attention_matmul", "mlp", "pool",
    "head", "total"}; `dataset` picks the head (default: the first).
    """
    if isinstance(model, VideoTransformer):
        return _video_transformer_flops(model, size, dataset)
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
