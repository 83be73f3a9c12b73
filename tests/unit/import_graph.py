"""The project's import graph, read from the code with `ast` (nothing is imported or run).

`.venv/bin/python -m tests.unit.import_graph` prints the edges between packages and any cycle;
`tests/unit/test_layers.py` holds them to the layers in docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The code packages, lowest layer first, and the top-level modules kept for Celery callers.
PACKAGES = ("evaluations", "infra", "middleware", "actors", "executor", "app")
TOP_MODULES = ("tasks", "retry_config")


def modules() -> dict[str, Path]:
    """Every module of ours by dotted name."""
    found = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        yield target
        yield from (f"{target}.{alias.name}" for alias in node.names)


def edges() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in it: inside functions and
    TYPE_CHECKING blocks count too, since they are dependencies all the same)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {
            target
            for node in ast.walk(tree)
            for target in _imported(node, name, path.name == "__init__.py")
            if target in known and target != name
        }
        # `from evaluations import json_codec` names the package too; a package's
        # __init__ imports nothing, so only the module counts.
        graph[name] = {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
    return graph


def package_of(module: str) -> str:
    return module.split(".")[0]


def package_edges(graph: dict[str, set[str]]) -> Counter[tuple[str, str]]:
    return Counter(
        (package_of(a), package_of(b))
        for a, bs in graph.items()
        for b in bs
        if package_of(a) != package_of(b)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of nodes that import each other, directly or around a loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    graph = edges()
    for (a, b), count in sorted(package_edges(graph).items()):
        print(f"{a} -> {b}: {count} imports")
    packages = {k: {v for (a, v) in package_edges(graph) if a == k} for k in {*PACKAGES, *TOP_MODULES}}
    print("cycles between files:", cycles(graph) or "none")
    print("cycles between packages:", cycles(packages) or "none")
