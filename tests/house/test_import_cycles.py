"""No module-level import cycle inside the package.

Walks every module of ``demofusion`` with ``ast`` (nothing is imported) and
collects the imports that run when the module is first imported: those at
module level, including inside module-level ``try``/``if``/``with`` blocks,
but not those inside functions or classes' methods, and not those under
``if TYPE_CHECKING:``. Edges:

* ``import demofusion.a.b`` / ``from demofusion.a import b`` (absolute or
  relative) depends on ``demofusion.a.b`` when that is a module, else on
  ``demofusion.a``;
* importing ``pkg.mod`` executes ``pkg/__init__.py`` first, so every edge to
  ``pkg.mod`` also adds an edge to each enclosing package's ``__init__``
  (except the importer's own ancestors: Python has already begun executing
  those when the importer runs, so they are not a cycle the importer causes).

The graph must have no strongly connected component of more than one module;
the assertion message lists each one found with its edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import demofusion

ROOT = Path(demofusion.__file__).resolve().parent
PACKAGE = "demofusion"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Import nodes that run at import time (no function bodies, no TYPE_CHECKING)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        elif isinstance(node, ast.ClassDef):
            stack.extend(node.body)  # class bodies run at import time
        else:
            stack.extend(n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt))
            for field in ("handlers",):
                stack.extend(getattr(node, field, []))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(module: str, path: Path, node, modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        base = _base(module, path.name == "__init__.py", node)
        # `from pkg import x` imports pkg, and pkg.x too when x is a submodule
        wanted = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in wanted:
        if not name.startswith(PACKAGE):
            continue
        parts = name.split(".")
        # the module itself and every enclosing package's __init__ run
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules:
                found.add(prefix)
    # the importer's own ancestors are already executing: not an edge
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return found - ancestors - {module}


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[module] = set()
        for node in _module_level_imports(tree):
            graph[module] |= _targets(module, path, node, modules)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components of more than one module."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "{" + ", ".join(component) + "}: " + "; ".join(edges)


def test_graph_sees_known_edges():
    graph = import_graph()
    assert "demofusion.errors" in graph["demofusion.config"] or graph["demofusion.cli"], graph
    # an import inside a function is not an edge; a plain module-level one is
    assert all(dep.startswith(PACKAGE) for deps in graph.values() for dep in deps)
    assert any(graph.values())


def test_relative_from_import_resolves_submodule():
    tree = ast.parse("from . import plan\nfrom .stages import x\ndef f():\n    from .. import cli\n")
    modules = {m: ROOT / "x.py" for m in ("demofusion", "demofusion.memory",
                                          "demofusion.memory.plan", "demofusion.memory.stages",
                                          "demofusion.cli")}
    path = ROOT / "memory" / "fake.py"
    deps = set()
    for node in _module_level_imports(tree):
        deps |= _targets("demofusion.memory.fake", path, node, modules)
    assert deps == {"demofusion.memory.plan", "demofusion.memory.stages"}


def test_no_module_level_import_cycle():
    graph = import_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        _describe(c, graph) for c in cycles)
