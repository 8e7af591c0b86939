"""How every benchmark ends: its result dict as one JSON line (`--json`, the contract that
scripts and the README's figures parse) or as an aligned `key: value` table for people."""
from __future__ import annotations

import json


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max((len(str(key)) for key in result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
