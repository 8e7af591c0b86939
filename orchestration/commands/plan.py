"""`pretrain plan`: token counts, parameters and forward GFLOPs of a model at a clip size,
the memory one worker needs, and (with --accelerator) how many clips per second an
accelerator trains and how many CPU cores must decode to keep it fed.

The model is built on the meta device, so planning ViT-H allocates nothing. The summary is
assembled from sections (`SECTIONS`: functions args -> dict) merged in order, so further
planning (memory per worker, ZeRO stage, micro-batch) is one more section plus its flags in
`add_arguments`; the text output prints every key of the merged summary.
"""
from __future__ import annotations

import json

HELP = ("Token counts, parameter count and forward GFLOPs of a model at a clip size, memory per worker, "
        "and the decode cores an accelerator needs (allocates nothing).")


def add_arguments(parser) -> None:
    # The names live in pretrain/model/registry.py (an unknown one is answered with the list);
    # importing it here would load torch for every `pretrain --help`.
    parser.add_argument("--model", default="tubevit-b",
                        help="model size name, e.g. tubevit-ti or tubevit-l (default tubevit-b)")
    parser.add_argument("--frames", type=int, default=32, help="clip length T in frames (default 32)")
    parser.add_argument("--size", type=int, default=224, help="clip and image side S in pixels (default 224)")
    parser.add_argument("--tubes", default=None,
                        help="tube set instead of the model's default: paper, paper-no-s2d, paper-s2d-h, "
                             "paper-2, paper-1, charades, charades-t16, dense-2x16x16")
    parser.add_argument("--unfit-tubes", choices=("skip", "error"), default=None,
                        help="a tube that does not fit the clip: skip it with a warning (TubeViT's "
                             "default) or stop with an error")
    parser.add_argument("--skip-unfit-tubes", action="store_true",
                        help="the same as --unfit-tubes skip (kept for older scripts)")
    masked = parser.add_argument_group(
        "masked pretraining (pretrain/model/mae.py, the decoder at its defaults)")
    masked.add_argument("--mask-ratio", type=float, default=None, metavar="R",
                        help="share of a clip's tokens hidden, in (0, 1): gflops_per_clip becomes the "
                             "masked forward (encoder on visible tokens + decoder on all), adds "
                             "visible_tokens and decoder_params")
    masked.add_argument("--image-mask-ratio", type=float, default=0.75, metavar="R",
                        help="with --mask-ratio: share of an image's tokens hidden (default 0.75)")
    masked.add_argument("--mask-scheme", default=None,
                        help="with --mask-ratio: tube, random or aligned (default: the config's "
                             "auto, tube for one token grid such as videomae-*, aligned for "
                             "sparse tubes)")
    mem = parser.add_argument_group("memory per worker (pretrain/train/memory.py)")
    mem.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1)")
    mem.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                     help="DeepSpeed ZeRO stage (default 0)")
    mem.add_argument("--micro-batch", type=int, default=1, help="clips per worker per micro-step (default 1)")
    mem.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                     help="training precision (default bf16)")
    mem.add_argument("--activation-checkpointing", action="store_true",
                     help="recompute block activations in backward")
    mem.add_argument("--gate-layer", type=int, default=None, metavar="S",
                     help="bootstrap: freeze the tokenizer and blocks[:S] (0-based); default trains all")
    mem.add_argument("--device-memory", type=float, default=80.0, metavar="GiB",
                     help="memory of one device to check the estimate against (default 80)")
    feed = parser.add_argument_group(
        "data pipeline sizing: clips/s an accelerator trains and the decode cores that feed it")
    feed.add_argument("--accelerator", metavar="NAME",
                      help="accelerator whose data-sheet peak (dense, at --precision) sizes the "
                           "training rate, e.g. a100, h100, h100-pcie, h200 (the table is "
                           "pretrain/train/metrics.py)")
    feed.add_argument("--mfu", type=float, default=0.5,
                      help="model FLOPs utilisation to expect, in (0, 1] (default 0.5)")
    decode = feed.add_mutually_exclusive_group()
    decode.add_argument("--decode-rate", type=float, metavar="R",
                        help="training clips one CPU core decodes per second (needs --accelerator)")
    decode.add_argument("--measure-decode", metavar="DATASET_URI",
                        help="measure that rate here, on one core, from a prepared video dataset "
                             "(needs --accelerator)")
    feed.add_argument("--frame-stride", type=int, default=None, metavar="K",
                      help="clip frame stride for --measure-decode (default: data.frame_stride's "
                           "default)")
    feed.add_argument("--fps", type=float, default=None,
                      help="clip frame rate for --measure-decode, instead of --frame-stride "
                           "(data.fps)")
    feed.add_argument("--clips-per-video", type=int, default=1, metavar="K",
                      help="training clips cut from each decode for --measure-decode "
                           "(data.clips_per_video; default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _build_meta_model(args):
    import torch

    from pretrain.model import create_model

    overrides = {}
    if args.unfit_tubes or args.skip_unfit_tubes:
        overrides["unfit_tubes"] = "skip" if args.skip_unfit_tubes else args.unfit_tubes
    if args.tubes:
        overrides["tubes"] = args.tubes
    with torch.device("meta"):
        return create_model(args.model, **overrides)


def _build_meta_mae(args, model):
    import torch

    from pretrain.model.mae import MaskedAutoencoder

    with torch.device("meta"):
        return MaskedAutoencoder(model)


def masked_flops(args, model, size: tuple[int, ...]) -> dict | None:
    """count_masked_flops of `model` in a meta MaskedAutoencoder at --mask-ratio (None without)."""
    from pretrain.errors import UserError
    from pretrain.model import count_masked_flops

    if args.mask_ratio is None:
        if args.mask_scheme is not None:
            raise UserError("--mask-scheme applies to masked pretraining; add --mask-ratio R, e.g. 0.9")
        return None
    image = len(size) == 2
    ratio = args.image_mask_ratio if image else args.mask_ratio
    return count_masked_flops(_build_meta_mae(args, model), size, ratio,
                              "random" if image else args.mask_scheme)


def model_section(args) -> dict:
    """Tokens, parameters and FLOPs of `args.model` at T x S x S (and an S x S image)."""
    import math

    from pretrain.errors import UserError
    from pretrain.model import count_flops, count_params, param_breakdown

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
    if model.accepts_images:
        image = count_flops(model, (args.size, args.size))
        out.update(image_tokens=image["tokens"], gflops_per_image=round(image["total"] / 1e9, 3))
    else:  # e.g. the dense baseline has no 2D tube
        out.update(image_tokens=None, gflops_per_image=None)
    masked = masked_flops(args, model, clip)
    if masked is not None:
        out["mask_ratio"] = args.mask_ratio
        out["visible_tokens"] = masked["visible_tokens"]
        out["gflops_per_clip_full"] = out["gflops_per_clip"]
        out["gflops_per_clip"] = round(masked["total"] / 1e9, 3)
        out["gflops_per_clip_by_part"] = {k: round(masked[k] / 1e9, 3) for k in ("tokenizer", "encoder", "decoder")}
        mae = _build_meta_mae(args, model)
        out["decoder_params"] = count_params(mae.decoder)
        if model.accepts_images:
            image = masked_flops(args, model, (args.size, args.size))
            out.update(image_mask_ratio=args.image_mask_ratio, visible_image_tokens=image["visible_tokens"],
                       gflops_per_image=round(image["total"] / 1e9, 3))
    out["config"] = {
        "depth": cfg.depth, "dim": cfg.dim, "mlp_dim": cfg.mlp_dim, "heads": cfg.heads,
        "heads_by_dataset": cfg.num_classes, "tubes": [t.describe() for t in cfg.tubes],
    }
    if hasattr(cfg, "kernel_mode"):
        out["config"]["kernel_mode"] = cfg.kernel_mode
    out["flops_convention"] = "forward, batch 1, multiply-add = 2 FLOPs, convs + linears + attention matmuls"
    return out


def memory_section(args) -> dict:
    """Per-worker memory of training (params, grads, optimizer, activations) and a verdict."""
    from pretrain.errors import UserError
    from pretrain.train.memory import plan_memory, verdict

    for flag, value in (("--workers", args.workers), ("--micro-batch", args.micro_batch)):
        if value < 1:
            raise UserError(f"{flag} {value} must be a positive integer")
    if args.device_memory <= 0:
        raise UserError(f"--device-memory {args.device_memory} must be a positive number of GiB, e.g. 80")
    model = _build_meta_model(args)
    if args.gate_layer is not None and not 0 <= args.gate_layer < model.config.depth:
        raise UserError(f"--gate-layer {args.gate_layer} is not a block of {args.model}; valid: "
                        f"0..{model.config.depth - 1}")
    plan = plan_memory(model, (args.frames, args.size, args.size), micro_batch=args.micro_batch,
                       workers=args.workers, zero_stage=args.zero_stage, precision=args.precision,
                       activation_checkpointing=args.activation_checkpointing,
                       gate_layer=args.gate_layer, touched_only=False)
    out = {"memory_per_worker_gib": plan["gib"], "params_trainable": plan["params_trainable"]}
    out.update(verdict(plan, args.device_memory))
    out["memory_setup"] = {k: plan[k] for k in ("workers", "zero_stage", "micro_batch", "precision",
                                               "activation_checkpointing", "gate_layer")}
    return out


def feed_section(args) -> dict:
    """Clips (and images) per second one accelerator trains at --mfu of its peak, and the CPU
    cores per accelerator that decoding those clips needs (with --decode-rate or
    --measure-decode). Nothing without --accelerator."""
    from pretrain.errors import UserError
    from pretrain.model import count_flops
    from pretrain.train.metrics import named_peak

    decode_flag = ("--decode-rate" if args.decode_rate is not None
                   else "--measure-decode" if args.measure_decode else None)
    if args.accelerator is None:
        if decode_flag:
            raise UserError(f"{decode_flag} sizes decoding for an accelerator's training rate; add "
                            "--accelerator NAME (e.g. --accelerator h100)")
        return {}
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.5 for 50% of the peak")
    peak = named_peak(args.accelerator, args.precision)
    model = _build_meta_model(args)
    # Training costs 3 x forward: the backward pass is two matmuls per forward matmul.
    achieved = args.mfu * peak
    clip = (args.frames, args.size, args.size)
    clip_flops = (masked_flops(args, model, clip) or count_flops(model, clip))["total"]
    out = {"accelerator": args.accelerator, "accelerator_peak_tflops": round(peak / 1e12, 1),
           "mfu": args.mfu, "train_clips_per_s": round(achieved / (3 * clip_flops), 2)}
    if model.accepts_images:
        image = (args.size, args.size)
        image_flops = (masked_flops(args, model, image) or count_flops(model, image))["total"]
        out["train_images_per_s"] = round(achieved / (3 * image_flops), 2)
    else:
        out["train_images_per_s"] = None
    if decode_flag is None:
        return out
    if args.decode_rate is not None:
        if args.decode_rate <= 0:
            raise UserError(f"--decode-rate {args.decode_rate} must be a positive number of "
                            "clips per second per core, e.g. 7.5")
        rate = args.decode_rate
    else:
        rate = _measured_rate(args, out)
    out["decode_clips_per_s_per_core"] = round(rate, 2)
    out["decode_cores_per_accelerator"] = round(achieved / (3 * clip_flops) / rate, 1)
    return out


def _measured_rate(args, out: dict) -> float:
    from pretrain.data.config import DataConfig
    from pretrain.data.decode_rate import measure_decode
    from pretrain.errors import UserError

    stride = args.frame_stride if args.frame_stride is not None else DataConfig().frame_stride
    if stride < 1 or (args.fps is not None and args.fps <= 0):
        raise UserError(f"--frame-stride {stride} must be >= 1 and --fps, when given, > 0")
    if args.clips_per_video < 1:
        raise UserError(f"--clips-per-video {args.clips_per_video} must be >= 1")
    m = measure_decode(args.measure_decode, args.frames, args.size, stride, args.fps,
                       clips_per_video=args.clips_per_video)
    out["decode_measured"] = {"dataset": args.measure_decode, "clips": m["clips"],
                              "cpu_s": m["cpu_s"], "frame_stride": stride, "fps": args.fps,
                              "clips_per_video": args.clips_per_video}
    return m["clips_per_s_per_core"]


SECTIONS = [model_section, memory_section, feed_section]


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
