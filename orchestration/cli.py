"""The `pretrain` console script.

Each verb lives in its own module under `orchestration.commands` and is imported only when
it runs, so `pretrain --help` and light verbs (plan, list) stay fast and never import Ray or
DeepSpeed. A verb module defines:

    HELP: str                           one line for `pretrain --help`
    add_arguments(parser) -> None       its flags (and sub-verbs, if any)
    run(args) -> int                    the exit code

`UserError` from anywhere becomes one paragraph on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from pretrain.errors import UserError

# verb -> module under orchestration.commands
VERBS: dict[str, str] = {
    "plan": "plan",
    "prepare": "prepare",
    "run": "run",
    "submit": "jobs",
    "status": "jobs",
    "logs": "jobs",
    "stop": "jobs",
    "list": "jobs",
    "export": "export",
    "bootstrap": "bootstrap",
    "checkpoints": "checkpoints",
    "cluster": "cluster",
}


def _load(verb: str):
    return importlib.import_module(f"orchestration.commands.{VERBS[verb]}")


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
            try:
                module = _load(verb)
            except ModuleNotFoundError as exc:  # a verb whose module is not written yet
                p = sub.add_parser(verb, help=f"(unavailable: {exc})")
                p.set_defaults(_run=None)
                continue
            helptext = getattr(module, "HELPS", {}).get(verb, getattr(module, "HELP", ""))
            p = sub.add_parser(verb, help=helptext, description=helptext)
            if hasattr(module, "add_verb_arguments"):
                module.add_verb_arguments(verb, p)
                p.set_defaults(_run=lambda args, m=module, v=verb: m.run_verb(v, args))
            else:
                module.add_arguments(p)
                p.set_defaults(_run=module.run)
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
    if args._run is None:
        parser.error(f"verb '{args.verb}' is not available in this build")
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print("error: " + textwrap.fill(str(exc), width=100, subsequent_indent="  "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
