"""Start the ranks of a standalone (Ray-less) training job on this node.

    python -m pretrain.train.launch --nproc-per-node 8 configs/tubevit-b.yaml train.steps=100
    # two nodes, on each (R = 0 on the node at ADDR, 1 on the other):
    python -m pretrain.train.launch --nproc-per-node 8 --nnodes 2 --node-rank R \\
        --master-addr ADDR --master-port 29500 configs/tubevit-b.yaml

Why not torchrun: torchrun's agent serves the rendezvous store from its own process, on every
interface, whatever --master-addr says. Here there is no agent store: each worker makes its
process group with pretrain.train.engine.init_process_group (pretrain.train.worker), whose
rank 0 serves the store on 127.0.0.1 when the job is on one node, else on the master address.

What it does: starts N `python -m pretrain.train.worker CONFIG ...` with the usual env
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK/NODE_RANK, MASTER_ADDR/PORT, and
the job id the checkpoint lease uses), forwards SIGTERM/SIGINT to them as SIGTERM (the ranks
stop at the next step with a final checkpoint; a second signal kills them), and when a rank
fails stops the others and exits with the failed rank's code. No restarts: a failed job is
started again and resumes from its newest checkpoint.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

from pretrain.errors import UserError
from pretrain.train.checkpoint_hook import LAUNCH_RUN_ID_ENV
from pretrain.train.engine import LOOPBACK, free_port

FAILURE_GRACE_S = 10.0   # after a rank fails: how long the others get to exit on SIGTERM
POLL_S = 0.2
PR_SET_PDEATHSIG = 1      # prctl(2)


@dataclass(frozen=True)
class Job:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    run_id: str
    worker_args: tuple[str, ...]   # CONFIG [key=value ...]

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's flags (also `pretrain launch`'s)."""
    parser.add_argument("--nproc-per-node", type=int, required=True, metavar="N",
                        help="ranks to start on this node (e.g. its GPU count)")
    parser.add_argument("--nnodes", type=int, default=1, metavar="M",
                        help="nodes in the job (default 1); start the launcher on each")
    parser.add_argument("--node-rank", type=int, default=0, metavar="R",
                        help="this node's index, 0..M-1; rank 0's store runs on node 0")
    parser.add_argument("--master-addr", default=None, metavar="ADDR",
                        help="node 0's cluster address (one node: 127.0.0.1 by default)")
    parser.add_argument("--master-port", type=int, default=None, metavar="PORT",
                        help="the store's port on node 0 (one node: a free port by default)")
    parser.add_argument("--run-id", default=None, metavar="ID",
                        help="the job id the checkpoint lease records (default: new on one "
                             "node, ADDR:PORT on several, the same on every node)")
    parser.add_argument("config", metavar="CONFIG", help="the experiment config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def job_from_args(args: argparse.Namespace) -> Job:
    """The checked job; UserError (one line, naming the flag and what is valid) otherwise."""
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {args.nproc_per_node} is not valid: give the number "
                        "of ranks to start on this node, 1 or more")
    if args.nnodes < 1:
        raise UserError(f"--nnodes {args.nnodes} is not valid: give the number of nodes, 1 or more")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank} is out of range for --nnodes "
                        f"{args.nnodes}: valid values are 0..{args.nnodes - 1}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UserError(f"--master-port {args.master_port} is not valid: give a TCP port, 1..65535")
    if not os.path.isfile(args.config):
        raise UserError(f"config file {args.config!r} not found: give the path of a YAML "
                        "config, e.g. configs/smoke.yaml")
    bad = [a for a in args.overrides if "=" not in a]
    if bad:
        raise UserError(f"{bad[0]!r} is not an override: after CONFIG give key=value pairs "
                        "(e.g. train.steps=100); launcher flags go before CONFIG")
    addr, port = args.master_addr, args.master_port
    if args.nnodes == 1:
        addr = addr or LOOPBACK
        port = port or free_port(LOOPBACK)
    else:
        # the other nodes must find node 0 at an address and port agreed beforehand
        if not addr or addr in (LOOPBACK, "localhost", "::1"):
            raise UserError(f"--nnodes {args.nnodes} needs --master-addr: node 0's address on "
                            "the cluster network, the same on every node (not loopback)")
        if port is None:
            raise UserError(f"--nnodes {args.nnodes} needs --master-port: a port free on node "
                            "0, the same on every node (e.g. 29500)")
    run_id = args.run_id or (uuid.uuid4().hex[:12] if args.nnodes == 1 else f"{addr}:{port}")
    return Job(args.nproc_per_node, args.nnodes, args.node_rank, addr, port, run_id,
               (args.config, *args.overrides))


def rank_env(job: Job, local_rank: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of local rank `local_rank`: `base` plus the rendezvous variables."""
    # a launcher started under torchrun must not make its ranks look like torchrun's
    env = {k: v for k, v in base.items() if not k.startswith("TORCHELASTIC_")}
    env.update(
        RANK=str(job.node_rank * job.nproc_per_node + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(job.world_size),
        LOCAL_WORLD_SIZE=str(job.nproc_per_node),
        GROUP_RANK=str(job.node_rank),     # torchrun's name (pretrain/train/system_metrics.py)
        NODE_RANK=str(job.node_rank),
        NNODES=str(job.nnodes),
        MASTER_ADDR=job.master_addr,
        MASTER_PORT=str(job.master_port),
        **{LAUNCH_RUN_ID_ENV: job.run_id},
    )
    return env


class Ranks:
    """This node's worker processes, and what the launcher does with them."""

    def __init__(self, job: Job, command: list[str]):
        self.job, self.command = job, command
        self.procs: list[subprocess.Popen] = []
        self.signals = 0

    def start(self) -> None:
        for local_rank in range(self.job.nproc_per_node):
            if self.signals:   # stopped while starting: the rest never start
                return
            # Own session: a terminal's Ctrl-C reaches the launcher only, which turns it into
            # the ranks' clean stop (they stop at one step together; SIGINT would not).
            self.procs.append(subprocess.Popen(
                self.command, env=rank_env(self.job, local_rank, dict(os.environ)),
                start_new_session=True, preexec_fn=_stop_with_launcher))

    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"launch: {signal.Signals(signum).name}: stopping the ranks (final checkpoint);"
                  " signal again to kill them", file=sys.stderr, flush=True)
            self.send(signal.SIGTERM)
        else:
            self.send(signal.SIGKILL)

    def send(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:   # exited between poll and send
                    pass

    def wait(self) -> int:
        """Until every rank has exited: 0, or the exit code of the first failure seen."""
        while True:
            codes = [proc.poll() for proc in self.procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                self.stop_after_failure()
                return exit_code(failed[0])
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)

    def stop_after_failure(self) -> None:
        # The others would wait in a collective for the failed rank until the group's
        # timeout: ask them to stop, then kill what is left after the grace.
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + FAILURE_GRACE_S
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.send(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


def _stop_with_launcher() -> None:
    """Run in each rank before exec (Linux): SIGTERM when the launcher dies, even killed with
    SIGKILL; in a session of their own, nothing else would stop the ranks then."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):   # not Linux: the ranks outlive a killed launcher
        pass


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def worker_command(job: Job) -> list[str]:
    return [sys.executable, "-m", "pretrain.train.worker", *job.worker_args]


def launch(job: Job, command: list[str] | None = None) -> int:
    """Run this node's ranks (`command`, default the training worker) to the end; the exit
    code (0, or the first failed rank's)."""
    ranks = Ranks(job, command or worker_command(job))
    # handlers before the children exist: a signal in between must not be lost
    previous = {signum: signal.signal(signum, ranks.on_signal)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        ranks.start()
        return ranks.wait()
    finally:
        ranks.send(signal.SIGKILL)   # only ranks still alive (an exception in start or wait)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a missing one, not a number) as one line too."""

    def error(self, message: str):
        raise UserError(f"{message}; see `python -m pretrain.train.launch --help` for the flags")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m pretrain.train.launch",
        description="Start this node's ranks of a training job (see the module's doc).")
    add_arguments(parser)
    try:
        job = job_from_args(parser.parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return launch(job)


if __name__ == "__main__":
    sys.exit(main())
