"""The package graph is a ladder: a package imports only packages on a lower rung, never one above it -- not even
inside a function, where a lazy import would hide the cycle. Modules inside one package form no cycle either.

A failure names the importing module, the line and the imported module. The fix is to move what both need down
(see docs/ARCHITECTURE.md), not to add an exception here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tunesmith"

# Lowest first. Packages on one rung import nothing from each other.
LADDER = [
    ("errors",),
    ("paths", "compat", "hardware"),
    ("config",),
    ("track",),
    ("data",),
    ("model",),
    ("objectives",),
    ("eval",),
    ("train",),
    ("export",),
    ("serve",),
    ("compare", "envinfo"),
    ("demo", "ui"),
    ("cli",),
    ("__main__",),
]
RUNG = {name: i for i, names in enumerate(LADDER) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported tunesmith module) for every import in the file, at module level or inside functions.
    Imports under `if TYPE_CHECKING:` are annotations only, never executed, and are not counted."""
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _ours(node.module):
            found += [(node.lineno, _deepest(f"{node.module}.{a.name}")) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if _ours(name)]


def _ours(module: str) -> bool:
    return module == "tunesmith" or module.startswith("tunesmith.")


def _runtime_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _deepest(dotted: str) -> str:
    """`tunesmith.data.pack.pack_rows` -> `tunesmith.data.pack`: the longest prefix that is a module."""
    parts = dotted.split(".")
    while len(parts) > 1:
        path = PACKAGE.parent.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return "tunesmith"


def package_of(module: str) -> str | None:
    """The top-level package (or module) of tunesmith that `module` belongs to; None for tunesmith itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_is_on_the_ladder():
    packages = {package_of(m) for m in graph()} - {None}
    assert packages <= set(RUNG), f"place these on the ladder: {sorted(packages - set(RUNG))}"


def test_no_package_imports_one_above_it_or_beside_it():
    upward = []
    for module, found in graph().items():
        source = package_of(module)
        for line, target in found:
            target_package = package_of(target)
            if source is None or target_package is None or target_package == source:
                continue
            if RUNG[target_package] >= RUNG[source]:
                upward.append(f"{module}:{line} imports {target} ({source} rung {RUNG[source]} -> "
                              f"{target_package} rung {RUNG[target_package]})")
    assert not upward, "imports that point up the ladder:\n" + "\n".join(upward)


def test_modules_form_no_import_cycle():
    edges = {m: {t for _, t in found if t != m} for m, found in graph().items()}
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tunesmith.train.run import train\n    return train\n")
    assert imports(module) == [(2, "tunesmith.train.run")]


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative over the module graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(root: str) -> None:
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in edges), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.add(top)
                    if top == node:
                        break
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_the_checker_skips_imports_for_annotations_only(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tunesmith.train.run import train\n")
    assert imports(module) == []
