"""Check rendered manifests against the schemas their consumers enforce.

KubeRay manifests are checked against the RayCluster / RayJob CRDs (`schemas/`, copied from
the KubeRay operator): each CRD's `openAPIV3Schema` is the structural schema a Kubernetes API
server validates those resources with, pod templates included. It is OpenAPI v3, not JSON
Schema, so `openapi_to_jsonschema` converts it the way the API server reads it:

- `x-kubernetes-int-or-string: true` accepts an integer or a string (resource quantities);
- `nullable: true` also accepts null;
- objects with `properties` reject unknown fields, as `kubectl apply --validate=strict`
  (server-side field validation "Strict") does, unless `x-kubernetes-preserve-unknown-fields`;
- `x-kubernetes-list-type: set` means unique items; `x-kubernetes-list-map-keys` means no two
  items share the same key fields (defaults of key fields applied first, as the server does);
- `format: int32` / `int64` bound the integer range;
- `x-kubernetes-validations` are CEL rules about updates and cross-field policy, which need a
  CEL evaluator; they are not checked here.

The top-level `metadata` is only `type: object` in a CRD (the API server checks ObjectMeta
itself); it is checked here for the fields we render: a DNS-1035 name (KubeRay derives
Service names from it) and string labels/annotations.

Cluster-launcher YAML is checked against `ray/autoscaler/ray-schema.json`, the schema the
`ray up` launcher itself validates with.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import UserError

SCHEMA_DIR = Path(__file__).parent / "schemas"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
API_VERSION = "ray.io/v1"

_DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": _DNS1035, "maxLength": 63},
        "namespace": {"type": "string", "pattern": _DNS1035, "maxLength": 63},
        "labels": {"type": "object",
                   "additionalProperties": {"type": "string", "pattern": _LABEL_VALUE,
                                            "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def openapi_to_jsonschema(node: Any) -> Any:
    """One OpenAPI v3 structural-schema node (and everything under it) as JSON Schema."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            # a map from field names to schemas: the names are data, never keywords
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("nullable", "x-kubernetes-validations", "x-kubernetes-int-or-string",
                     "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
                     "x-kubernetes-map-type", "x-kubernetes-embedded-resource"):
            continue  # handled below, or (CEL rules, map-type) not checkable here
        else:
            out[key] = openapi_to_jsonschema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (node.get("type") == "object" and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-map-keys`: the key fields identify an item, so they must be unique."""
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "array"):
        return
    item_fields = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        ident = tuple(item.get(k, item_fields.get(k, {}).get("default")) for k in keys)
        if ident in seen:
            yield ValidationError(
                f"items {seen[ident]} and {i} have the same {'/'.join(keys)} {ident}; "
                "list-map keys must be unique")
        seen.setdefault(ident, i)


def _int_format(validator, fmt, instance, schema):
    from jsonschema.exceptions import ValidationError

    bounds = _INT_RANGES.get(fmt)
    if bounds and validator.is_type(instance, "integer") and not bounds[0] <= instance <= bounds[1]:
        yield ValidationError(f"{instance} is out of range for {fmt}")


@functools.lru_cache(maxsize=None)
def _kuberay_validator_class():
    from jsonschema import Draft7Validator, validators

    return validators.extend(Draft7Validator, {
        "x-kubernetes-list-map-keys": _list_map_keys,
        "format": _int_format,
    })


def crd_schema(kind: str, schema_dir: str | Path | None = None) -> dict:
    """The JSON Schema of a KubeRay resource `kind` (v1), from its CRD file in `schema_dir`."""
    return _crd_schema(kind, str(Path(schema_dir or SCHEMA_DIR).resolve()))


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str, schema_dir: str) -> dict:
    if kind not in CRD_FILES:
        raise ValueError(f"no CRD for kind {kind!r}; known: {', '.join(CRD_FILES)}")
    path = Path(schema_dir) / CRD_FILES[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    with open(path) as f:
        crd = yaml.load(f, Loader=loader)
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{path} defines {crd['spec']['names']['kind']}, not {kind}")
    group = crd["spec"]["group"]
    version = API_VERSION.split("/")[1]
    found = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not found:
        raise ValueError(f"{path} has no version {version}")
    schema = openapi_to_jsonschema(found[0]["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"const": f"{group}/{version}"}
    props["kind"] = {"const": kind}
    props["metadata"] = _OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind",
                                                                   "metadata", "spec"})
    return schema


def manifest_errors(manifest: dict, schema_dir: str | Path | None = None) -> list[str]:
    """Every way `manifest` (a RayCluster or RayJob) breaks its CRD schema, as 'path: message'."""
    kind = manifest.get("kind")
    if kind not in CRD_FILES:
        return [f"kind: {kind!r} is not one of {', '.join(CRD_FILES)}"]
    validator = _kuberay_validator_class()(crd_schema(kind, schema_dir))
    return [f"{_path(e.absolute_path)}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.path)))]


def launcher_schema() -> dict:
    """Ray's own cluster-launcher schema, from the installed ray package."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_errors(config: dict) -> list[str]:
    """Every way a cluster-launcher config breaks Ray's schema or its head/worker wiring."""
    from jsonschema import Draft7Validator

    errors = [f"{_path(e.absolute_path)}: {e.message}"
              for e in Draft7Validator(launcher_schema()).iter_errors(config)]
    types = config.get("available_node_types", {})
    if config.get("head_node_type") not in types:
        errors.append(f"head_node_type: {config.get('head_node_type')!r} is not one of the "
                      f"available_node_types {sorted(types)}")
    return errors


def check_manifest(manifest: dict, what: str, schema_dir: str | Path | None = None) -> None:
    """Raise UserError naming `what` (e.g. the profile) if `manifest` breaks its CRD."""
    errors = manifest_errors(manifest, schema_dir)
    if errors:
        raise UserError(
            f"the {manifest.get('kind')} rendered from {what} does not match the KubeRay CRD "
            f"schema ({len(errors)} problem(s)): {'; '.join(errors[:5])}. Fix the profile "
            "values named by these paths.")


def check_launcher(config: dict, what: str) -> None:
    errors = launcher_errors(config)
    if errors:
        raise UserError(
            f"the Ray cluster-launcher config rendered from {what} does not match Ray's "
            f"ray-schema.json ({len(errors)} problem(s)): {'; '.join(errors[:5])}. Fix the "
            "profile values named by these paths.")


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"
