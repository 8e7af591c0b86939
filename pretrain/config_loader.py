"""Typed config files: dataclasses declare the keys, YAML files and `key.sub=value` set them.

One loader for every config of the project (the experiment tree in pretrain/train/config.py,
the model families' configs, cluster profiles in cluster/profiles.py):

- a key is a dataclass field declared with `config_field(default, help, min=, max=, ...)`;
  its type annotation is what the loader checks and coerces (bool, int, float, str, Literal,
  Optional/Union, list, tuple, dict, nested dataclasses);
- `read_config_file(path)` reads YAML; a file may start from another with `base: other.yaml`
  (relative to the deriving file, chains allowed, cycles rejected) and hold only what
  differs: sections merge key by key, anything else is replaced;
- `apply_overrides(raw, ["train.lr=1e-4"])` sets keys from the command line (values parsed
  as YAML);
- `from_dict(cls, raw)` builds the dataclass tree, rejecting unknown keys (with a did-you-
  mean and the valid keys), wrong types, NaN/infinite numbers, values out of `min`/`max`/
  `less_than`/`choices`, and keys listed in a class's `RENAMED_KEYS` ("renamed to ..."),
  then calls each section's `validate()` for its cross-field rules;
- `to_dict` / `to_yaml` write a tree out again (what from_dict reads back); `describe` lists
  every key with its type, default and help (`pretrain config keys`).

Two field kinds beyond plain values:
- `derived="why"`: the value is set by the program, not by a config file (the model's heads
  come from the data); from_dict rejects it in a file unless `allow_derived=True` (stored
  architecture dicts), to_dict leaves it out unless asked.
- `variants=fn`: a section whose dataclass is chosen by its own `name` key; `fn()` maps each
  valid name to (dataclass, preset values). Precedence inside such a section: command-line
  override > file > the name's preset > the dataclass default.

Every problem is a `UserError` naming the key and what would be valid.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml

from pretrain.errors import UserError

BASE_KEY = "base"


def config_field(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
                 max: float | None = None, less_than: float | None = None,
                 choices: tuple | None = None, required: bool = False, factory: Any = None,
                 derived: str | None = None, compare: bool = True,
                 variants: Callable[[], Mapping[str, tuple[type, dict]]] | None = None):
    """A documented config key: help text, optional range and choices, `required` = no default.

    `derived` (the reason) marks a key the program sets; `variants` makes the field a section
    chosen by its `name` key (see the module docstring); `compare=False` leaves the field out
    of the dataclass's equality."""
    meta: dict[str, Any] = {"help": help}
    for key, value in (("min", min), ("max", max), ("less_than", less_than), ("choices", choices),
                       ("derived", derived), ("variants", variants)):
        if value is not None:
            meta[key] = value
    if required:
        meta["required"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, compare=compare, metadata=meta)
    return dataclasses.field(default=default, compare=compare, metadata=meta)


# ---------------------------------------------------------------------------------------
# Files, derivation, overrides: YAML -> one nested dict.


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping in `path`, with its `base:` chain merged underneath."""
    path = Path(path)
    if not path.is_file():
        via = f" (the base of {_chain[-1]})" if _chain else ""
        raise UserError(f"config file '{path}'{via} does not exist; give the path of a YAML file "
                        "such as configs/smoke.yaml")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise UserError(f"config file '{path}' derives from itself through 'base:' ({cycle}); "
                        "remove one of the base keys")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys to values, not a "
                        f"{type(raw).__name__}")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"config key '{BASE_KEY}' in '{path}' must be the path of another YAML "
                        f"file (relative to this one), got {base!r}")
    return merge(read_config_file(path.parent / base, (*_chain, resolved)), raw)


def merge(base: dict, layer: dict) -> dict:
    """`layer` over `base`: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...] | dict) -> dict:
    """Set `a.b.c=value` items (or a {'a.b.c': value} dict) in a nested dict, in place.

    Values are parsed as YAML: 3, 1e-4, true, [1, 2], null."""
    items = overrides.items() if isinstance(overrides, dict) else map(_parse_override, overrides)
    for key, value in items:
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is a value, "
                                "not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override '{item}' is not of the form key.sub=value "
                        "(e.g. train.steps=100)")
    try:
        return key, yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return key, text


# ---------------------------------------------------------------------------------------
# dict -> typed tree, with the checks.


def from_dict(cls: type, raw: Any, prefix: str = "", source: str = "", *,
              allow_derived: bool = False) -> Any:
    """Build dataclass `cls` from a nested dict, checking keys, types, ranges and choices."""
    where = f" (in {source})" if source else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config key '{prefix}' must be a section (mapping) with keys "
                        f"{', '.join(_names(cls))}; got {raw!r}{where}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_known(cls, raw, fields, prefix, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        full = _join(prefix, name)
        if "variants" in f.metadata:
            kwargs[name] = _variant(f, raw.get(name, {}), full, source, allow_derived)
        elif name in raw:
            if "derived" in f.metadata and not allow_derived:
                raise UserError(f"config key '{full}' cannot be set{where}: {f.metadata['derived']}")
            kwargs[name] = _coerce(hints[name], raw[name], full, f.metadata, source, allow_derived)
        elif f.metadata.get("required"):
            raise UserError(f"config key '{full}' is required{where}: {f.metadata.get('help', '')}; "
                            f"set it in the file or with {full}=VALUE")
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, full, source, allow_derived=allow_derived)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def check(obj: Any, source: str = "") -> None:
    """The checks of from_dict on an object built in code (types, ranges, choices, validate)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "variants" not in f.metadata:
            _coerce(hints[f.name], getattr(obj, f.name), f.name, f.metadata, source, True)
    if hasattr(obj, "validate"):
        obj.validate()


def _check_known(cls: type, raw: dict, fields: dict, prefix: str, where: str) -> None:
    renamed = getattr(cls, "RENAMED_KEYS", {})
    for key in raw:
        if key in fields:
            continue
        full = _join(prefix, str(key))
        if key in renamed:
            new = _join(prefix, renamed[key])
            raise UserError(f"config key '{full}' was renamed to '{new}'{where}; write "
                            f"{new}: ... instead")
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"config key '{full}' is unknown{hint}{where}; valid keys in "
                        f"{prefix or 'the top level'}: {', '.join(fields)}")


def _variant(f: dataclasses.Field, raw: Any, key: str, source: str, allow_derived: bool) -> Any:
    """A section whose dataclass its `name` key chooses; the name's preset under the file."""
    where = f" (in {source})" if source else ""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"config key '{key}' must be a section (mapping), got {raw!r}{where}")
    name = raw.get("name", f.default_factory().name)
    variants = f.metadata["variants"]()
    if name not in variants:
        raise UserError(f"config key '{key}.name' is {name!r}; valid choices: "
                        f"{', '.join(variants)}{where}")
    cls, preset = variants[name]
    return from_dict(cls, {**preset, **raw, "name": name}, key, source, allow_derived=allow_derived)


def _coerce(tp: Any, value: Any, key: str, meta: Any, source: str, allow_derived: bool) -> Any:
    where = f" (in {source})" if source else ""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, float) and not math.isfinite(value) and tp is not Any:
        raise UserError(f"config key '{key}' is {value}; numeric keys must be finite numbers{where}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):   # already built (configs made in code)
            return value
        return from_dict(tp, value, key, source, allow_derived=allow_derived)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, value, key, meta, source, allow_derived)
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}' is {value!r}; valid choices: "
                            f"{', '.join(map(str, args))}{where}")
        return value
    if origin in (list, tuple):
        return _coerce_sequence(tp, value, key, meta, source, allow_derived)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping of {_type_name(args[0])} to "
                            f"{_type_name(args[1])}, got {value!r}{where}")
        return {_coerce(args[0], k, f"{key} (a key)", {}, source, allow_derived):
                _coerce(args[1], v, f"{key}.{k}", meta, source, allow_derived)
                for k, v in value.items()}
    if tp is Any:
        return value
    value = _coerce_scalar(tp, value, key, where)
    _check_choices_and_range(value, key, meta, where)
    return value


def _coerce_union(tp, value, key, meta, source, allow_derived):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, key, meta, source, allow_derived)
        except UserError as exc:
            errors.append((arg, exc))
    # The one alternative of the value's own kind (a list for a list) has the precise error.
    same_kind = [exc for arg, exc in errors if _kind(arg) is _kind(type(value))]
    if len(errors) == 1 or len(same_kind) == 1:
        raise (same_kind or [errors[0][1]])[0]
    where = f" (in {source})" if source else ""
    raise UserError(f"config key '{key}' has value {value!r} that is none of "
                    f"{_type_name(tp)}{where}")


def _kind(tp: Any) -> type:
    """The YAML kind a type is written as: list, dict, or the type itself."""
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        return list
    if origin is dict or dataclasses.is_dataclass(origin):
        return dict
    return origin


def _coerce_sequence(tp, value, key, meta, source, allow_derived):
    where = f" (in {source})" if source else ""
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise UserError(f"config key '{key}' must be a list of {_type_name(args[0])}, "
                        f"got {value!r}{where}")
    if typing.get_origin(tp) is list:
        return [_coerce(args[0], v, f"{key}[{i}]", meta, source, allow_derived)
                for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    elif len(value) != len(args):
        raise UserError(f"config key '{key}' must be a list of {len(args)} "
                        f"{_type_name(args[0])}s, got {value!r}{where}")
    else:
        item_types = list(args)
    return tuple(_coerce(t, v, f"{key}[{i}]", meta, source, allow_derived)
                 for i, (t, v) in enumerate(zip(item_types, value)))


def _coerce_scalar(tp: type, value: Any, key: str, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false, got {value!r}{where}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}{where}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number, got {value!r}{where}")
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' is {value}; numeric keys must be finite "
                            f"numbers{where}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}' must be a string, got {value!r}{where}")
        return value
    raise TypeError(f"config field '{key}' has an unsupported type {tp!r}")


def _check_choices_and_range(value: Any, key: str, meta: Any, where: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"config key '{key}' is {value!r}; valid choices: "
                        f"{', '.join(map(str, choices))}{where}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, below = meta.get("min"), meta.get("max"), meta.get("less_than")
    if (lo is None or value >= lo) and (hi is None or value <= hi) and (below is None or value < below):
        return
    if below is not None:
        rng = f">= {lo} and < {below}" if lo is not None else f"< {below}"
    elif lo is not None and hi is not None:
        rng = f"between {lo} and {hi}"
    else:
        rng = f">= {lo}" if lo is not None else f"<= {hi}"
    raise UserError(f"config key '{key}' is {value}; it must be {rng}{where}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list[{_type_name(args[0])}]"
    if origin in (list, dict, tuple):
        name = "list" if origin is tuple else origin.__name__
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    return {type(None): "null", int: "integer", float: "number", str: "string",
            bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------
# Out again: plain dicts, YAML, the key reference.


def to_dict(obj: Any, derived: bool = False) -> Any:
    """The tree as plain nested dicts/lists (what from_dict reads back).

    Tuples become lists so the result is JSON/YAML-safe; `derived` keys are left out unless
    asked for (a config file may not set them)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), derived) for f in dataclasses.fields(obj)
                if derived or "derived" not in f.metadata}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, derived) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, derived) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'steps': 3}} -> {'train.steps': 3} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = _join(prefix, str(k))
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def describe(cls: type, prefix: str = "", variant: str | None = None) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf key: the reference for config writers.

    A variants section is described for `variant` (a valid name), else for its default
    name; its defaults are that name's preset."""
    return _describe(cls, prefix, variant, {})


def _describe(cls, prefix, variant, preset) -> list[tuple[str, str, Any, str]]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if "variants" in f.metadata:
            name = variant or f.default_factory().name
            variants = f.metadata["variants"]()
            if name not in variants:
                raise UserError(f"'{name}' is not a valid {key}.name; valid: {', '.join(variants)}")
            sub_cls, sub_preset = variants[name]
            for row in _describe(sub_cls, key, None, {**sub_preset, "name": name}):
                if row[0] == f"{key}.name":
                    row = (*row[:3], f"{row[3]} [one of {', '.join(variants)}]")
                rows.append(row)
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _describe(hints[f.name], key, None, {})
            continue
        if "derived" in f.metadata:
            default = f"(set by the program: {f.metadata['derived']})"
        elif f.name in preset:
            default = to_dict(preset[f.name])
        elif f.default is not dataclasses.MISSING:
            default = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_dict(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(hints[f.name]), default, _help(f)))
    return rows


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    limits = [f"{name} {f.metadata[name]}" for name in ("min", "max", "less_than")
              if name in f.metadata]
    if "choices" in f.metadata:
        limits.append("one of " + ", ".join(map(str, f.metadata["choices"])))
    return f"{text} [{'; '.join(limits)}]" if limits else text
