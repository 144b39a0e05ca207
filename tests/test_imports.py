"""The package's modules import one another in one direction: no import cycle, counting
imports inside functions too (a lazy import is still an edge). A package's ``__init__``
re-exporting its modules is not an edge of those modules back to it. A package that imports
every module of its own at import time (``pkgutil.iter_modules(__path__)``, as clipft.methods
does so that a method is one new file) has an edge to each of them, as if it named them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clipft"
DISCOVERY = "pkgutil.iter_modules(__path__)"  # a package importing all of its own modules


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the clipft modules it imports anywhere in its text (``from clipft.x import y``
    counts as clipft.x.y when that is a module, else clipft.x)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("clipft"):
                    graph[name].add(target)
        if path.name == "__init__.py" and DISCOVERY in path.read_text():
            graph[name] |= {other for other, p in modules.items() if p.parent == path.parent and p != path}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert sum(len(t) for t in graph.values()) > 100  # the walk finds the package's imports
    assert cycles(graph) == []


def test_a_package_that_discovers_its_modules_has_an_edge_to_each() -> None:
    graph = import_graph()
    methods = {name for name in graph if name.startswith("clipft.methods.")}
    assert {"clipft.methods.finetune", "clipft.methods.base"} <= methods
    assert methods <= graph["clipft.methods"]


def test_the_cycle_finder_finds_a_lazy_import_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
