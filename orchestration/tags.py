"""Job tags: `--tag KEY=VALUE` on `pretrain submit` / `pretrain run`, filters on `pretrain list`.

A submitted job keeps its tags in its Ray metadata, one entry per tag (`tag.KEY: VALUE`, so
the dashboard shows them as they are) and hands them to its run (`pretrain run --tag`), which
sets them on the MLflow run. `pretrain list --tag KEY=VALUE` keeps the jobs whose tags hold
every pair asked for.
"""
from __future__ import annotations

import re

from pretrain import storage
from pretrain.errors import UserError

META_PREFIX = "tag."
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_VALUE = 250


def parse_tags(items: list[str] | None) -> dict[str, str]:
    """{key: value} from KEY=VALUE strings; UserError naming the bad one."""
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise UserError(
                f"--tag '{item}' is not KEY=VALUE with a key of 1-63 letters, digits, '_', '.' "
                "or '-' (starting with a letter or digit), e.g. --tag team=vision.")
        if len(value) > MAX_VALUE:
            raise UserError(f"--tag {key}: the value has {len(value)} characters; at most "
                            f"{MAX_VALUE} are kept.")
        storage.refuse_credentials(value, f"--tag {key}")
        tags[key] = value
    return tags


def to_metadata(tags: dict[str, str]) -> dict[str, str]:
    """The Ray job metadata entries holding `tags`."""
    return {META_PREFIX + k: v for k, v in tags.items()}


def from_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """The tags held in a job's Ray metadata."""
    return {k[len(META_PREFIX):]: v for k, v in (metadata or {}).items()
            if k.startswith(META_PREFIX)}


def matches(tags: dict[str, str], wanted: dict[str, str]) -> bool:
    """`tags` holds every KEY=VALUE pair of `wanted`."""
    return all(tags.get(k) == v for k, v in wanted.items())


def as_args(tags: dict[str, str]) -> list[str]:
    """`--tag KEY=VALUE` arguments for `pretrain run`."""
    out: list[str] = []
    for k, v in tags.items():
        out += ["--tag", f"{k}={v}"]
    return out
