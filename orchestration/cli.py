"""The `pretrain` console script.

Each verb lives in a module under `orchestration.commands` that is imported only when it
runs, so `pretrain --help` and light verbs (plan, list) stay fast and never import Ray or
DeepSpeed. A verb is anything with these three names: the module itself, or, for a module
that serves several verbs (jobs.py: submit, status, logs, stop, list), one object per verb
in it, named in VERBS as "module:OBJECT".

    HELP: str                           one line for `pretrain --help`
    add_arguments(parser) -> None       its flags (and sub-verbs, if any)
    run(args) -> int                    the exit code

`UserError` from anywhere becomes one paragraph on stderr and exit status 2. As a program
(`pretrain`, `python -m orchestration.cli`: `program`), the process ends without Python's
teardown once the verb has returned (`exit_now`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from pretrain.errors import UserError

# verb -> its module under orchestration.commands, or "module:OBJECT" inside such a module
VERBS: dict[str, str] = {
    "plan": "plan",
    "prepare": "prepare",
    "run": "run",
    "launch": "launch",
    "submit": "jobs:SUBMIT",
    "status": "jobs:STATUS",
    "logs": "jobs:LOGS",
    "stop": "jobs:STOP",
    "list": "jobs:LIST",
    "export": "export",
    "bootstrap": "bootstrap",
    "checkpoints": "checkpoints",
    "cluster": "cluster",
    "config": "config",
}


def _load(verb: str):
    module, _, name = VERBS[verb].partition(":")
    found = importlib.import_module(f"orchestration.commands.{module}")
    return getattr(found, name) if name else found


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Distributed joint image+video TubeViT pretraining (Ray + DeepSpeed + MLflow).",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    # Only the verb being run has its module imported (plus all of them for --help listings).
    wanted = [a for a in argv if a in VERBS][:1] or list(VERBS)
    for verb in VERBS:
        if verb in wanted:
            command = _load(verb)
            p = sub.add_parser(verb, help=command.HELP, description=command.HELP)
            command.add_arguments(p)
            p.set_defaults(_run=command.run)
        else:
            sub.add_parser(verb, add_help=False)
    return parser


def _default_accelerator() -> None:
    """DeepSpeed probes for CUDA at import; on a machine without a GPU it must be told."""
    from pretrain.process_env import default_accelerator

    default_accelerator()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _default_accelerator()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print("error: " + textwrap.fill(str(exc), width=100, subsequent_indent="  "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`pretrain config keys | head`): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def program() -> None:
    """The `pretrain` console script."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End this process as Python's exit would, without tearing the interpreter down.

    The teardown of a process that imported torch, DeepSpeed, Ray and MLflow (every module
    and object freed one by one) takes 2-3 s on an idle 2-core machine and over 10 s on a
    busy one: after `pretrain run` printed its summary, or before a job counts as finished.
    What an exit does for others still happens: other threads finish (as at any exit), the
    exit handlers run (multiprocessing's children, logging, whatever libraries queued), the
    streams are flushed. Not for callers of main() inside a process (the tests).
    """
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed, or a reader that went away
            pass
    os._exit(code)


if __name__ == "__main__":
    program()
