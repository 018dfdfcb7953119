"""The library's layering (docs/ARCHITECTURE.md): a module imports only from its own wing or the wings
below it, so a new method, model family or metric lands in one place and nothing reaches back up.

    base (errors, config, artifacts, methods) < data < model < editing < audit < sequence, pipeline < eval < api < stage, cli

Read from the import statements with `ast` (nothing is imported), every import in a module counted,
function bodies included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    {"errors", "config", "artifacts", "methods"},
    {"data"},
    {"model"},
    {"editing"},
    {"audit"},
    {"eval"},
    {"sequence", "pipeline"},
    {"api"},
    {"stage", "cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
MODULES = sorted(p for p in (ROOT / "ece").rglob("*.py") if p.name != "__init__.py" or p.parent.name != "ece")


def unit_of(dotted: str) -> str:
    """The wing (`ece.editing.zvec` → edit) or base module (`ece.config` → config) a dotted name belongs to."""
    return dotted.split(".")[1]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ece."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ece."):
            names.add(node.module)
    return names


def test_every_wing_and_base_module_has_a_layer() -> None:
    units = {p.relative_to(ROOT / "ece").parts[0].removesuffix(".py") for p in MODULES}
    assert units == set(RANK), f"add to LAYERS (and docs/ARCHITECTURE.md): {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_only_its_own_layer_or_below(path: Path) -> None:
    own = unit_of("ece." + ".".join(path.relative_to(ROOT / "ece").with_suffix("").parts))
    above = sorted(m for m in imported(path) if RANK[unit_of(m)] > RANK[own])
    assert not above, f"{path.relative_to(ROOT)} ({own}) imports from a layer above it: {above}"


def test_same_layer_imports_stay_inside_a_wing_or_the_base() -> None:
    """api and pipeline share a layer, pipeline building on api; the base modules may use each other."""
    for path in MODULES:
        own = unit_of("ece." + ".".join(path.relative_to(ROOT / "ece").with_suffix("").parts))
        for m in imported(path):
            other = unit_of(m)
            if other != own and RANK[other] == RANK[own]:
                assert (own, other) in {
                    ("pipeline", "sequence"),
                    ("cli", "stage"),
                    ("config", "errors"),
                    ("config", "methods"),
                    ("methods", "config"),
                    ("methods", "errors"),
                }, f"{path}: {own} imports {m}"
