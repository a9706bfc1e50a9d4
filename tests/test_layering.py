"""The architecture's dependency rule, checked by reading every import (including lazy ones in functions).

Layers, bottom to top: leaf utilities < core < models < algorithms/evaluation/planning/tuners < training <
serving < cli.
A module may import its own package and anything in a lower layer, never a higher one; the core needs
only torch and the standard library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "holdall"

RANK = {
    "errors": 0, "fileio": 0, "data": 0,
    "core": 1,
    "models": 2, "kernels": 2,
    "algorithms": 3, "evaluation": 3, "formats": 3, "planning": 3, "tuners": 3,
    "training": 4,
    "serving": 5, "pipeline": 5,
    "cli": 9, "__init__": 9, "__main__": 10,
}
# Same-rank packages that may build on each other (the arrow points downwards).
ALLOWED_SIDEWAYS: set[tuple[str, str]] = {("evaluation", "formats")}  # eval reads GGUF files
CORE_THIRD_PARTY = {"torch"}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # relative import: resolve against the module's package
            base = list(path.relative_to(SRC).parts[:-1])[: len(path.relative_to(SRC).parts) - node.level]
            names.append(".".join(["holdall", *base, *(node.module.split(".") if node.module else [])]))
    return names


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_downwards(path: Path):
    own = _package_of(path)
    assert own in RANK, f"new top-level package {own!r}: give it a rank in tests/test_layering.py and docs/architecture.md"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "holdall" or len(parts) == 1:
            continue
        target = parts[1]
        if target == own:
            continue
        assert RANK[target] < RANK[own] or (own, target) in ALLOWED_SIDEWAYS, (
            f"{path.relative_to(SRC)} imports holdall.{target}: layer {own} (rank {RANK[own]}) must not depend "
            f"on layer {target} (rank {RANK[target]})"
        )


@pytest.mark.parametrize("path", sorted((SRC / "core").rglob("*.py")), ids=lambda p: p.name)
def test_core_needs_only_torch(path: Path):
    stdlib = set(sys.stdlib_module_names)
    for name in _imports(path):
        top = name.split(".")[0]
        assert top in stdlib or top in CORE_THIRD_PARTY or top == "holdall", (
            f"core/{path.name} imports {top}: the quantization core may depend on torch only"
        )


def test_import_is_light():
    code = (
        "import sys, holdall, holdall.core.linear, holdall.algorithms, holdall.cli.main; "
        "heavy = [m for m in ('transformers', 'bitsandbytes', 'peft', 'gguf', 'matplotlib') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing holdall pulled in heavy dependencies: {out.stdout}"
