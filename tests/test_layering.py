"""The import layering stated in the README's layout section, checked on the source.

    ground        pretrain.errors, pretrain.storage, pretrain.process_env, pretrain.model,
                  pretrain.data (and pretrain's other top-level modules)
    checkpoints
    pretrain.train
    orchestration, cluster

A module may import its own layer and the ones below, never one above; every import counts,
including those inside functions (a lazy import still ties the layers together). Model code
also imports neither Ray nor DeepSpeed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "checkpoints", "orchestration", "cluster")

# Most specific prefix first; anything else under pretrain is ground.
LAYERS = [("pretrain.train", 2), ("checkpoints", 1), ("orchestration", 3), ("cluster", 3),
          ("pretrain", 0)]
LAYER_NAMES = {0: "ground (pretrain.errors/storage/model/data)", 1: "checkpoints",
               2: "pretrain.train", 3: "orchestration/cluster"}
# Further rules of the layout: (importer prefix, imported prefix, why).
FORBIDDEN = [("pretrain.model", "ray", "model code imports neither Ray nor DeepSpeed"),
             ("pretrain.model", "deepspeed", "model code imports neither Ray nor DeepSpeed"),
             ("checkpoints", "pretrain.data", "checkpoints do not depend on the data pipeline")]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if within(module, prefix):
            return layer
    return None   # third-party or standard library


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the file, relative ones resolved;
    `from A import b` gives A.b (b may be a module; the layer of A.b is A's when it is not)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def violations() -> list[str]:
    found = []
    for path in source_files():
        me = module_name(path)
        mine = layer_of(me)
        for line, imported in imports_of(path):
            theirs = layer_of(imported)
            where = f"{path.relative_to(ROOT)}:{line}"
            if theirs is not None and theirs > mine:
                found.append(f"{where} ({LAYER_NAMES[mine]}) imports {imported} "
                             f"({LAYER_NAMES[theirs]})")
            found += [f"{where} imports {imported}: {why}" for importer, banned, why in FORBIDDEN
                      if within(me, importer) and within(imported, banned)]
    return found


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "imports against the layering (README, Layout):\n" + "\n".join(found)


@pytest.mark.parametrize("source, module, expected", [
    ("from pretrain.train.config import X\n", "checkpoints/x.py", "pretrain.train.config.X"),
    ("def f():\n    from .upload import A\n", "checkpoints/x.py", "checkpoints.upload.A"),
    ("from . import storage\n", "pretrain/model/x.py", "pretrain.model.storage"),
    ("from .. import storage\n", "pretrain/model/x.py", "pretrain.storage"),
    ("from . import io\n", "pretrain/model/__init__.py", "pretrain.model.io"),
    ("import orchestration.driver as d\n", "pretrain/x.py", "orchestration.driver"),
])
def test_imports_are_found_and_resolved(tmp_path, source, module, expected):
    path = tmp_path / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert [m for _, m in imports_of(path, tmp_path)] == [expected]


def test_a_function_level_import_of_a_higher_layer_is_caught(tmp_path):
    path = tmp_path / "checkpoints" / "bad.py"
    path.parent.mkdir()
    path.write_text("import os\n\n\ndef f():\n    from pretrain.train.worker import train\n")
    (_, std), (line, imported) = imports_of(path, tmp_path)
    assert layer_of(std) is None and line == 5
    assert layer_of(module_name(path, tmp_path)) == 1 and layer_of(imported) == 2
