"""`pretrain export CHECKPOINT_URI --out FILE.safetensors [--dtype bf16|fp32]`.

Consolidates the model weights of a sharded DeepSpeed checkpoint (any ZeRO stage, any number
of ranks) into one self-describing model file that `pretrain.model.load_model` reads.
CHECKPOINT_URI is a step folder (…/step_00001000) or a run's checkpoint root (the newest
committed checkpoint is taken). Memory stays bounded: optimizer shards are memory-mapped and
only the fp32 master weights are read from them.
"""
from __future__ import annotations

import json

HELP = "Consolidate a sharded checkpoint into one model file (safetensors) that load_model reads."


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_URI",
                        help="a committed step folder or a run's checkpoint root (local or fsspec URI)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors",
                        help="output model file (local path or fsspec URI)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32",
                        help="dtype of the exported weights (default fp32, the master weights)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def run(args) -> int:
    from checkpoints.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, args.dtype)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported step {summary['step']} of {summary['checkpoint']} -> {summary['out']} "
              f"({summary['params'] / 1e6:.2f}M params, {summary['dtype']})")
    return 0
