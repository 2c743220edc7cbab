"""The package's import graph: no cycle (function-level imports included), and the layer contracts hold.

``lint-imports`` (run by ``make test``) checks the contracts in pyproject.toml; this test keeps the stronger,
simpler property that no two modules reach each other at all, and that the contracts are really checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Return one import cycle through each module that is on one (depth-first search)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append([*path[path.index(module):], module])
            return
        if module in done:
            return
        for imported in sorted(graph.find_modules_directly_imported_by(module) & modules):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(modules):
        visit(module, [])
    return found


def test_no_import_cycle_in_the_package() -> None:
    """Result: no module imports (directly or through others, at module or function level) one that imports it."""
    graph = grimp.build_graph("klaviyo_bridge")
    modules = set(graph.modules)
    assert len(modules) > 30
    assert cycles(graph, modules) == []


def test_a_cycle_would_be_found() -> None:
    """The search finds a cycle when there is one (a check that cannot fail is no check)."""
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    assert cycles(graph, {"p.a", "p.b", "p.c"}) == []
    graph.add_import(importer="p.c", imported="p.a")
    assert cycles(graph, {"p.a", "p.b", "p.c"})[0] == ["p.a", "p.b", "p.c", "p.a"]


def test_the_layer_contracts_hold() -> None:
    """Result: lint-imports keeps every contract of pyproject.toml (layers, pure core, SQLite, simulators)."""
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout
