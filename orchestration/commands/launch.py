"""`pretrain launch --nproc-per-node N [--nnodes M --node-rank R --master-addr ADDR
--master-port PORT] CONFIG [key=value ...]`: this node's ranks of a Ray-less job.

The same as `python -m pretrain.train.launch` (see pretrain/train/launch.py): N worker
processes whose rank 0 serves the process group's store on 127.0.0.1 when the job is on one
node, else on ADDR; SIGTERM / Ctrl-C stop them with a final checkpoint.
"""
from __future__ import annotations

from pretrain.train import launch

HELP = "Start this node's ranks of a job without Ray (the store on loopback on one node)."


def add_arguments(parser) -> None:
    launch.add_arguments(parser)


def run(args) -> int:
    return launch.launch(launch.job_from_args(args))
