"""`pretrain config show | keys`: what a config file resolves to, and every key there is.

    pretrain config show configs/tubevit-l.yaml                  # the resolved config, as YAML
    pretrain config show configs/smoke.yaml train.steps=50 --json
    pretrain config keys                                         # every key: type, default, help
    pretrain config keys train
    pretrain config keys model --model tubevit-l                 # that model's keys and defaults

`show` resolves the same way `pretrain run` does (the file, its `base:` chain, the model
size preset, the defaults, then the overrides), so its output run as a config file gives the
same experiment. `keys model` lists the keys of the model family that `--model` (default: the
experiment's default model) belongs to, with that size's defaults.
"""
from __future__ import annotations

import json
import textwrap

HELP = "show the resolved config of a file, or list every config key with type, default and help"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="config_verb", metavar="{show,keys}")
    sub.required = True
    show = sub.add_parser("show", help="the resolved config of a file (YAML, or --json)",
                          description="the resolved config of a file (YAML, or --json)")
    show.add_argument("config", help="experiment config YAML (e.g. configs/smoke.yaml)")
    show.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config overrides, e.g. train.steps=100")
    show.add_argument("--json", action="store_true", help="one JSON object on the last line")
    keys = sub.add_parser("keys", help="every config key with its type, default and help",
                          description="every config key with its type, default and help")
    keys.add_argument("section", nargs="?", help="only this section (model, data, train, ...) "
                      "or key prefix (data.synthetic)")
    keys.add_argument("--model", metavar="NAME", help="list the model keys of this model name "
                      "(e.g. tubevit-l) with its size's defaults")
    keys.add_argument("--json", action="store_true", help="one JSON object on the last line")


def run(args) -> int:
    return _show(args) if args.config_verb == "show" else _keys(args)


def _show(args) -> int:
    from pretrain.train.config import load_config, to_dict, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.json:
        print(json.dumps(to_dict(cfg)))
    else:
        print(to_yaml(cfg), end="")
    return 0


def _keys(args) -> int:
    import dataclasses

    from pretrain.errors import UserError
    from pretrain.train.config import ExperimentConfig, describe

    rows = describe(ExperimentConfig, variant=args.model)
    if args.section:
        rows = [r for r in rows if r[0] == args.section or r[0].startswith(args.section + ".")]
        if not rows:
            sections = [f.name for f in dataclasses.fields(ExperimentConfig)]
            raise UserError(f"config section '{args.section}' is unknown; valid sections: "
                            f"{', '.join(sections)} (or a key prefix such as data.synthetic)")
    if args.json:
        print(json.dumps({"keys": [{"key": k, "type": t, "default": d, "help": h}
                                   for k, t, d, h in rows]}, default=str))
        return 0
    for key, type_name, default, help_text in rows:
        print(f"{key}  ({type_name}, default {json.dumps(default, default=str)})")
        if help_text:
            print(textwrap.fill(help_text, width=100, initial_indent="    ",
                                subsequent_indent="    "))
    return 0
