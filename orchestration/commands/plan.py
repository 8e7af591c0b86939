"""`pretrain plan`: token counts, parameters and forward GFLOPs of a model at a clip size.

The model is built on the meta device, so planning ViT-H allocates nothing. The summary is
assembled from sections (`SECTIONS`: functions args -> dict) merged in order, so further
planning (memory per worker, ZeRO stage, micro-batch) is one more section plus its flags in
`add_arguments`; the text output prints every key of the merged summary.
"""
from __future__ import annotations

import json

HELP = "Token counts, parameter count and forward GFLOPs of a model at a clip size (allocates nothing)."


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="tubevit-b",
                        help="model name: tubevit-ti, tubevit-s, tubevit-b, tubevit-l, tubevit-h (default tubevit-b)")
    parser.add_argument("--frames", type=int, default=32, help="clip length T in frames (default 32)")
    parser.add_argument("--size", type=int, default=224, help="clip and image side S in pixels (default 224)")
    parser.add_argument("--tubes", default=None,
                        help="tube set instead of the model's default: paper, paper-no-s2d, paper-2, paper-1, "
                             "charades, dense-2x16x16")
    parser.add_argument("--skip-unfit-tubes", action="store_true",
                        help="tubes that do not fit the clip give 0 tokens instead of an error")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _build_meta_model(args):
    import torch

    from pretrain.model import create_model

    overrides = {"skip_unfit_tubes": bool(args.skip_unfit_tubes)}
    if args.tubes:
        overrides["tubes"] = args.tubes
    with torch.device("meta"):
        return create_model(args.model, **overrides)


def model_section(args) -> dict:
    """Tokens, parameters and FLOPs of `args.model` at T x S x S (and an S x S image)."""
    import math

    from pretrain.errors import UserError
    from pretrain.model import count_flops, count_params, param_breakdown
    from pretrain.model.tubes import image_tube_index

    if args.frames < 1 or args.size < 1:
        raise UserError(f"--frames {args.frames} and --size {args.size} must both be positive integers, e.g. --frames 32 --size 224")
    model = _build_meta_model(args)
    cfg = model.config
    clip = (args.frames, args.size, args.size)
    video = count_flops(model, clip)
    grids = model.tokenizer.grids((1, cfg.in_chans, *clip))
    out = {
        "model": args.model,
        "frames": args.frames,
        "size": args.size,
        "video_tokens": video["tokens"],
        "tube_tokens": [math.prod(g) for g in grids],
        "tube_grids": [list(g) for g in grids],
        "params": count_params(model),
        "params_by_part": param_breakdown(model),
        "gflops_per_clip": round(video["total"] / 1e9, 3),
        "gflops_per_clip_by_part": {k: round(v / 1e9, 3) for k, v in video.items() if k not in ("tokens", "total")},
    }
    if image_tube_index(cfg.tubes) is not None:
        image = count_flops(model, (args.size, args.size))
        out.update(image_tokens=image["tokens"], gflops_per_image=round(image["total"] / 1e9, 3))
    else:  # e.g. the dense baseline has no 2D tube
        out.update(image_tokens=None, gflops_per_image=None)
    out["config"] = {
        "depth": cfg.depth, "dim": cfg.dim, "mlp_dim": cfg.mlp_dim, "heads": cfg.heads,
        "kernel_mode": cfg.kernel_mode, "heads_by_dataset": cfg.num_classes,
        "tubes": [t.describe() for t in cfg.tubes],
    }
    out["flops_convention"] = "forward, batch 1, multiply-add = 2 FLOPs, convs + linears + attention matmuls"
    return out


SECTIONS = [model_section]


def summarize(args) -> dict:
    summary: dict = {}
    for section in SECTIONS:
        summary.update(section(args))
    return summary


def _format(summary: dict) -> str:
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            lines.append(f"{key}: {value:,}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def run(args) -> int:
    summary = summarize(args)
    print(json.dumps(summary) if args.json else _format(summary))
    return 0
