"""`pretrain bootstrap --image-checkpoint PATH --tubes-from FILE.safetensors --gate-layer S
--out FILE.safetensors`: a large image ViT + a small TubeViT's tubes -> a video TubeViT file.

The image checkpoint is a timm ViT state dict (safetensors or .pth, local or fsspec URI;
layout: pretrain/model/image_vit_weights.py); the small model is any file `pretrain export` wrote. The
small model may also be a masked-pretraining export (`pretrain export` of a
`train.objective: masked` run): its encoder's tubes are used and its decoder dropped. The
output is an ordinary self-describing model file (load_model reads it) whose metadata also
records the bootstrap (image ViT, small model config, gate layer and its 0-based
convention, width mapping and seed). Train it with a config's `bootstrap.init_from`
(configs/bootstrap-*.yaml). Method and choices: pretrain/model/bootstrap.py.

`--width-map auto|s2d|isometry` picks how the small model's tube tokens are widened to the
image ViT's width (auto: the paper's space-to-depth when the ratio is an integer, else one
shared isometry). `--enlarge-kernels SET|TxHxW,...` first enlarges the small model's tube
kernels by interpolation, strides and offsets kept (the paper's route to its Charades model,
e.g. `--enlarge-kernels charades`); without --image-checkpoint that enlarged model is the
output.

`pretrain bootstrap --image-checkpoint PATH --video-model FAMILY [--embed-init
inflate|central] [--tubelet T] [--num-frames N] --out FILE` instead inflates the image ViT
into a ViViT model 1/2/3, TimeSformer or VTN (FAMILY: vivit, vivit-fe, vivit-fsa,
timesformer, vtn) at its width, depth and heads (ViViT sec. 3.5, I3D): positions repeated along time,
tubelet filters inflated (E/t at every frame) or central-frame, temporal attention
zero-initialised. Method, accepted layouts and what is exact: pretrain/model/inflate.py.
"""
from __future__ import annotations

import json

HELP = ("Make a video model from an image ViT (timm layout): a TubeViT with a small TubeViT's tube "
        "kernels (--tubes-from), or an inflated ViViT / TimeSformer / VTN (--video-model).")


def add_arguments(parser) -> None:
    parser.add_argument("--image-checkpoint", default=None, metavar="PATH",
                        help="timm ViT weights: .safetensors or .pth/.pt/.bin, local path or fsspec URI "
                             "(required unless --enlarge-kernels alone is wanted)")
    parser.add_argument("--tubes-from", default=None, metavar="FILE.safetensors",
                        help="small TubeViT model file (from `pretrain export`, supervised or masked "
                             "pretraining) whose 3D tube kernels are reused (the TubeViT bootstrap)")
    parser.add_argument("--video-model", default=None, metavar="FAMILY",
                        help="inflate the image ViT into this family instead: vivit, vivit-fe, vivit-fsa, "
                             "timesformer, vtn (pretrain/model/inflate.py)")
    parser.add_argument("--embed-init", default="inflate", choices=("inflate", "central"),
                        help="--video-model: tubelet filters from the image's patch filter E: E/t at every "
                             "frame (inflate, default) or E at the central frame, zero elsewhere")
    parser.add_argument("--tubelet", type=int, default=None, metavar="T",
                        help="--video-model: tubelet depth in frames (default the family's: 2, "
                             "timesformer and vtn 1); height and width are the image ViT's patch")
    parser.add_argument("--num-frames", type=int, default=None, metavar="N",
                        help="--video-model: clip length the position table is made for (default the "
                             "family's: 32, timesformer 8, vtn 256)")
    parser.add_argument("--global-pool", default=None, choices=("token", "avg"),
                        help="--video-model: what the image ViT classified, the CLS token or the mean of "
                             "the tokens (not in a state dict; default: avg with fc_norm or without a "
                             "CLS token, else token)")
    parser.add_argument("--gate-layer", default=None, type=int, metavar="S",
                        help="0-based block index S: the gated skip is added to blocks[S]'s output; "
                             "blocks[:S] and the tokenizer are frozen in training (ViT-H, 32 blocks: "
                             "S=24 trains the last 8)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors",
                        help="output model file (local path or fsspec URI)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads of the image ViT (default: the standard count for its width)")
    parser.add_argument("--num-classes", default=None, metavar="NAME=N[,NAME=N]",
                        help="heads of the new model (default: the small model's datasets; "
                             "--video-model: the family's default heads)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the width mapping and the new pool/heads (default 0)")
    parser.add_argument("--width-map", default="auto", choices=("auto", "s2d", "isometry"),
                        help="small -> large tube token width: auto (default: space-to-depth when the "
                             "large width is an integer multiple, else one shared isometry), s2d, isometry")
    parser.add_argument("--enlarge-kernels", default=None, metavar="SET|TxHxW,...",
                        help="enlarge the small model's tube kernels by interpolation first (strides and "
                             "offsets kept): a tube-set name whose kernels are taken (charades: "
                             "16x16x16,32x8x8,4x32x32,1x16x16) or one TxHxW per tube; alone (no "
                             "--image-checkpoint) it writes the enlarged model")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def _kernels(text: str):
    from pretrain.errors import UserError
    from pretrain.model.tubes import TUBE_SETS

    if text in TUBE_SETS:
        return text
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--enlarge-kernels item {item!r} is not TxHxW (e.g. 16x16x16) and "
                            f"{text!r} is not a tube-set name ({', '.join(TUBE_SETS)})")
        out.append(tuple(int(p) for p in parts))
    return out


def _enlarge_only(args, small) -> int:
    from pretrain.model import count_tokens, save_model
    from pretrain.model.bootstrap import enlarge_model

    model = enlarge_model(small, _kernels(args.enlarge_kernels))
    save_model(model, args.out, {"enlarged_from": args.tubes_from,
                                 "enlarge_kernels": args.enlarge_kernels})
    tubes = model.config.tubes
    summary = {"out": args.out, "tubes": [t.describe() for t in tubes],
               "tokens_128x224x224": count_tokens(tubes, (128, 224, 224), skip_unfit=True)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"enlarged the tube kernels of {args.tubes_from} -> {args.out}: "
              + ", ".join(summary["tubes"]))
    return 0


def _num_classes(text: str | None) -> dict[str, int] | None:
    from pretrain.errors import UserError

    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, n = item.partition("=")
        if not sep or not name.strip() or not n.strip().isdigit() or int(n) < 1:
            raise UserError(f"--num-classes item {item!r} is not NAME=N with N >= 1 "
                            "(e.g. --num-classes kinetics400=400,imagenet1k=1000)")
        out[name.strip()] = int(n)
    return out


def _inflate(args) -> int:
    from pretrain.errors import UserError
    from pretrain.model import count_params, save_model
    from pretrain.model.image_vit_weights import read_state_dict
    from pretrain.model.inflate import inflate

    given = [opt for opt, value in (("--tubes-from", args.tubes_from), ("--gate-layer", args.gate_layer),
                                    ("--enlarge-kernels", args.enlarge_kernels),
                                    ("--width-map", None if args.width_map == "auto" else args.width_map))
             if value is not None]
    if given:
        raise UserError(f"pretrain bootstrap --video-model inflates an image ViT on its own; "
                        f"{', '.join(given)} belong to the TubeViT bootstrap (--tubes-from)")
    if args.image_checkpoint is None:
        raise UserError("pretrain bootstrap --video-model needs --image-checkpoint PATH (a timm ViT)")
    image_state = read_state_dict(args.image_checkpoint)
    model, meta = inflate(image_state, args.video_model, embed_init=args.embed_init, tubelet=args.tubelet,
                          num_frames=args.num_frames, num_classes=_num_classes(args.num_classes),
                          heads=args.heads, global_pool=args.global_pool, seed=args.seed,
                          source=args.image_checkpoint)
    del image_state
    save_model(model, args.out, meta)
    c = model.config
    summary = {
        "out": args.out,
        "image_vit": meta["image_vit"],
        "video_model": args.video_model,
        "depth": c.depth, "dim": c.dim, "heads": c.heads,
        "tubelet": list(c.tubelet), "num_frames": c.num_frames, "img_size": c.img_size,
        "embed_init": args.embed_init,
        "exact_on_repeated_frames": meta["exact_on_repeated_frames"] == "true",
        "params": count_params(model),
        "datasets": c.num_classes,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        exact = "exactly" if summary["exact_on_repeated_frames"] else "not exactly (a CLS token; see inflate.py)"
        print(f"inflated {meta['image_vit']} into {args.video_model} -> {args.out}\n"
              f"  tubelet {'x'.join(map(str, c.tubelet))} ({args.embed_init}), positions for "
              f"{c.num_frames}x{c.img_size}x{c.img_size}; {summary['params'] / 1e6:.2f}M params; heads: "
              f"{c.num_classes}\n  on a clip of one repeated frame it computes the image ViT's tokens {exact}")
    return 0


def run(args) -> int:
    from pretrain.errors import UserError
    from pretrain.model import TubeViT, count_params, save_model
    from pretrain.model.bootstrap import apply_freeze, bootstrap, trainable_summary
    from pretrain.model.image_vit_weights import read_state_dict
    from pretrain.model.io import load_encoder

    if args.video_model is not None:
        return _inflate(args)
    if args.tubes_from is None:
        raise UserError("pretrain bootstrap needs --tubes-from FILE (a small TubeViT: the TubeViT bootstrap) "
                        "or --video-model FAMILY (inflate the image ViT into vivit, vivit-fe, vivit-fsa, "
                        "timesformer or vtn)")
    if args.image_checkpoint is None and args.enlarge_kernels is None:
        raise UserError("pretrain bootstrap needs --image-checkpoint PATH (a timm ViT) and --gate-layer S, "
                        "or --enlarge-kernels SET to only enlarge the --tubes-from model's kernels")
    if args.image_checkpoint is not None and args.gate_layer is None:
        raise UserError("pretrain bootstrap --image-checkpoint needs --gate-layer S (0-based block of the "
                        "gated skip; ViT-H, 32 blocks: S=24 trains the last 8)")
    small = load_encoder(args.tubes_from)   # a masked export: its encoder, decoder dropped
    if not isinstance(small, TubeViT):
        raise UserError(f"--tubes-from {args.tubes_from} holds a {type(small).__name__}; the "
                        "bootstrap reuses a small TubeViT's tube kernels (export a tubevit-* run)")
    if args.image_checkpoint is None:
        return _enlarge_only(args, small)
    if args.enlarge_kernels is not None:
        from pretrain.model.bootstrap import enlarge_model
        small = enlarge_model(small, _kernels(args.enlarge_kernels))
    image_state = read_state_dict(args.image_checkpoint)
    model, meta = bootstrap(image_state, small, args.gate_layer, num_classes=_num_classes(args.num_classes),
                            heads=args.heads, seed=args.seed, source=args.image_checkpoint,
                            width_map=args.width_map)
    if args.enlarge_kernels is not None:
        meta["enlarge_kernels"] = args.enlarge_kernels
    del image_state
    meta["tubes_from"] = f"{args.tubes_from} " + meta["tubes_from"]
    save_model(model, args.out, meta)
    apply_freeze(model, "prefix")
    c = model.config
    counts = trainable_summary(model)
    summary = {
        "out": args.out,
        "image_vit": meta["image_vit"],
        "depth": c.depth, "dim": c.dim, "heads": c.heads,
        "tubes": [t.describe() for t in c.tubes],
        "gate_layer": c.gate_layer,
        "trained_blocks": c.depth - c.gate_layer,
        "params": count_params(model),
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
        "width_map": meta["width_map"],
        "datasets": c.num_classes,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"bootstrapped {meta['image_vit']} with the tubes of {args.tubes_from} -> {args.out}\n"
              f"  gate after block {c.gate_layer} (0-based); trains blocks {c.gate_layer}..{c.depth - 1}, "
              f"gate, norm, pool, heads: {counts['trainable'] / 1e6:.2f}M of {summary['params'] / 1e6:.2f}M params\n"
              f"  width map: {meta['width_map']} (seed {args.seed}); heads: {c.num_classes}")
    return 0
