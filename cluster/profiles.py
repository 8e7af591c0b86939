"""Cluster profiles: plain YAML data, layered defaults -> profile -> overrides.

`profiles/defaults.yaml` holds every key a profile may set, with its default; each other file
in `profiles/` is one cluster and states only what differs. A profile argument is either a
packaged name (`gke-8xh100`) or the path of a YAML file of the same shape, so operators can
keep their own clusters outside the package. Overrides (`worker.max_nodes=4`, values parsed
as YAML) are applied last. The merged profile is checked: unknown keys, wrong types, bad
Kubernetes quantities and secrets written inline are errors that name the key.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import UserError

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULTS = "defaults"
PLATFORMS = ("kubernetes", "gcp-vm")
AUTH_MODES = ("token", "disabled")
# A Kubernetes resource quantity (the CRDs' own pattern, without exponents).
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE])?$")
_SECRET_LIKE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY",
                          re.IGNORECASE)
# Keys whose value may be null in defaults but has this type when set.
_NULLABLE_TYPES: dict[str, type | tuple] = {
    "address": str, "worker.accelerator": str, "kubernetes.service_account": str,
    "gcp.project_id": str, "gcp.worker_machine_type": str, "gcp.accelerator_type": str,
    "gcp.service_account": str,
}


def profile_names() -> list[str]:
    """The packaged profiles, sorted (defaults.yaml is a layer, not a profile)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if p.stem != DEFAULTS)


def load_profile(name_or_path: str, overrides: list[str] | dict | None = None) -> dict:
    """The merged, checked profile as a nested dict; its `name` key says where it came from."""
    defaults = _read(PROFILE_DIR / f"{DEFAULTS}.yaml")
    path = _find(name_or_path)
    layer = _read(path)
    _check_keys(layer, defaults, f"profile {path}")
    merged = _merge(defaults, layer)
    if overrides:
        override_tree = _override_tree(overrides)
        _check_keys(override_tree, defaults, "profile override")
        merged = _merge(merged, override_tree)
    merged["name"] = path.stem
    _check_values(merged, f"profile '{path.stem}'")
    return merged


def _find(name_or_path: str) -> Path:
    packaged = PROFILE_DIR / f"{name_or_path}.yaml"
    if name_or_path != DEFAULTS and packaged.is_file():
        return packaged
    as_path = Path(name_or_path)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    raise UserError(
        f"cluster profile '{name_or_path}' is unknown; valid profiles: "
        f"{', '.join(profile_names())} (see `pretrain cluster list`), or the path of a YAML "
        f"file shaped like {PROFILE_DIR / 'defaults.yaml'}.")


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"cluster profile {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"cluster profile {path} must be a YAML mapping of keys to values, "
                        f"not a {type(data).__name__}.")
    return data


def _override_tree(overrides: list[str] | dict) -> dict:
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"profile override '{item}' must look like key.sub=value, "
                                "e.g. worker.max_nodes=4.")
            items.append((key, yaml.safe_load(value)))
    tree: dict = {}
    for key, value in items:
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _merge(base: dict, layer: dict) -> dict:
    """`layer` over `base`: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and out[key]:
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(layer: dict, defaults: dict, where: str, prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = prefix + str(key)
        if key not in defaults:
            valid = ", ".join(prefix + k for k in defaults)
            raise UserError(f"{where}: key '{dotted}' is unknown; valid keys here: {valid}.")
        # a mapping default with keys is a section; an empty mapping is free-form (labels, env)
        if isinstance(defaults[key], dict) and defaults[key] and isinstance(value, dict):
            _check_keys(value, defaults[key], where, dotted + ".")


def _check_values(p: dict, where: str) -> None:
    defaults = _read(PROFILE_DIR / f"{DEFAULTS}.yaml")
    _check_types(p, defaults, where)
    if p["platform"] not in PLATFORMS:
        raise UserError(f"{where}: platform '{p['platform']}' is not one of {', '.join(PLATFORMS)}.")
    if p["auth"] not in AUTH_MODES:
        raise UserError(f"{where}: auth '{p['auth']}' is not one of {', '.join(AUTH_MODES)}.")
    for section in ("head", "worker"):
        for key in ("memory", "shm"):
            value = p[section].get(key)
            if value is not None and value != 0 and not _QUANTITY.match(str(value)):
                raise UserError(f"{where}: {section}.{key} '{value}' is not a Kubernetes "
                                "quantity; write e.g. 64Gi, 512Mi or 0.")
        if p[section]["cpus"] <= 0:
            raise UserError(f"{where}: {section}.cpus must be > 0, got {p[section]['cpus']}.")
    w = p["worker"]
    if w["gpus"] < 0 or int(w["gpus"]) != w["gpus"]:
        raise UserError(f"{where}: worker.gpus must be a whole number >= 0, got {w['gpus']}.")
    if w["max_nodes"] < 1:
        raise UserError(f"{where}: worker.max_nodes must be >= 1, got {w['max_nodes']}.")
    if p["auth"] == "token" and p["platform"] == "kubernetes" and not p["kubernetes"]["auth_secret"]:
        raise UserError(f"{where}: auth is token but kubernetes.auth_secret is empty; name "
                        "the Kubernetes secret that holds the Ray auth token.")
    if p["platform"] == "gcp-vm":
        for key in ("project_id", "worker_machine_type"):
            if not p["gcp"][key]:
                raise UserError(f"{where}: platform gcp-vm needs gcp.{key}.")
        if w["gpus"] and not p["gcp"]["accelerator_type"]:
            raise UserError(f"{where}: worker.gpus is {w['gpus']} but gcp.accelerator_type is "
                            "not set (e.g. nvidia-tesla-a100).")
    for name, value in p["job"]["env"].items():
        if _SECRET_LIKE.search(str(name)):
            raise UserError(
                f"{where}: job.env.{name} looks like a credential; profiles never hold secret "
                "values. Reference a Kubernetes secret instead: kubernetes.secret_env: "
                f"[{{env: {name}, secret: SECRET_NAME, key: KEY}}].")
        if not isinstance(value, (str, int, float, bool)):
            raise UserError(f"{where}: job.env.{name} must be a plain value, got {value!r}.")
    for i, ref in enumerate(p["kubernetes"]["secret_env"]):
        if not isinstance(ref, dict) or set(ref) != {"env", "secret", "key"}:
            raise UserError(f"{where}: kubernetes.secret_env[{i}] must be {{env, secret, key}} "
                            f"(names only), got {ref!r}.")
    for i, ref in enumerate(p["kubernetes"]["secret_files"]):
        if not isinstance(ref, dict) or set(ref) != {"secret", "path"}:
            raise UserError(f"{where}: kubernetes.secret_files[{i}] must be {{secret, path}}, "
                            f"got {ref!r}.")


def _check_types(value: Any, default: Any, where: str, dotted: str = "") -> None:
    if isinstance(default, dict) and default:
        for key, sub in default.items():
            _check_types(value[key], sub, where, f"{dotted}{key}" if not dotted else f"{dotted}.{key}")
        return
    if default is None:
        expected = _NULLABLE_TYPES.get(dotted)
        if value is None or expected is None or isinstance(value, expected):
            return
    elif isinstance(default, bool):
        expected = bool
    elif isinstance(default, (int, float)):
        expected = (int, float)
    else:
        expected = type(default)
    if isinstance(value, bool) and expected is not bool:
        ok = False
    else:
        ok = isinstance(value, expected)
    if dotted.endswith(("memory", "shm")) and isinstance(value, (int, str)):
        ok = True  # quantities: 0 or a string, checked by pattern
    if not ok:
        names = expected.__name__ if isinstance(expected, type) else "number"
        raise UserError(f"{where}: {dotted} must be a {names}, got {value!r}.")
