"""Imports flow downward only (DESIGN.md, Layout): no cycle between camelid's packages nor between
its modules, and every module imports.

The graph is read from the source with `ast`, not from `sys.modules`: every `import camelid.x` and
`from camelid.x import y` anywhere in a file counts, at the top, inside functions and under
`if TYPE_CHECKING:` alike, since a cycle hidden in a function still ties the two layers together.
`from camelid.a import b` is an edge to module `camelid.a.b` when there is one, else to `camelid.a`.
Module names come from the files found, so modules may move without this test changing.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "camelid"


def _module_name(path: Path) -> str:
    parts = ("camelid", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _target(name: str) -> str | None:
    """The camelid module that `import name` executes last: its longest prefix that is a module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The camelid modules that `module` imports, anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                found.add(_target(f"{source}.{alias.name}") if f"{source}.{alias.name}" in MODULES
                          else _target(source))
    return {m for m in found if m is not None and m != module}


def package_of(module: str) -> str:
    """`camelid.<first component>`; the root package `camelid` is a node of its own."""
    return ".".join(module.split(".")[:2])


def find_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # the graphs here are a few hundred nodes: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_shortest_cycle(edges, sorted(c)[0], c) for c in components]


def _shortest_cycle(edges: dict[str, dict[str, str]], start: str, within: set[str]) -> list[str]:
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, {})):
            if w not in within:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # a component of two or more nodes has one


def describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    """`a -> b -> a`, then which import makes each step."""
    steps = "\n".join(f"    {a} -> {b}: {edges[a][b]}" for a, b in zip(cycle, cycle[1:]))
    return " -> ".join(cycle) + "\n" + steps


def module_graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: why}."""
    return {m: {t: f"{MODULES[m].relative_to(ROOT.parent)} imports {t}" for t in imports_of(m)} for m in MODULES}


def package_graph() -> dict[str, dict[str, str]]:
    edges: dict[str, dict[str, str]] = {}
    for module, targets in module_graph().items():
        for target, why in sorted(targets.items()):
            a, b = package_of(module), package_of(target)
            if a != b:
                edges.setdefault(a, {}).setdefault(b, why)
    return edges


def _assert_acyclic(edges: dict[str, dict[str, str]], what: str) -> None:
    cycles = find_cycles(edges)
    if cycles:
        pytest.fail(f"import cycles between camelid's {what}:\n" + "\n".join(describe(c, edges) for c in cycles),
                    pytrace=False)


def test_the_graph_is_read():
    """Guards the test itself: it sees the package and the kinds of import it is meant to see."""
    assert len(MODULES) > 20 and "camelid" in MODULES
    graph = module_graph()
    assert "camelid.errors" in {t for targets in graph.values() for t in targets}
    assert any(package_of(t) != package_of(m) for m, targets in graph.items() for t in targets)


def test_no_cycle_between_packages():
    _assert_acyclic(package_graph(), "packages")


def test_no_cycle_between_modules():
    _assert_acyclic(module_graph(), "modules")


def test_cycles_are_found_and_named():
    edges = {"a": {"b": "a imports b"}, "b": {"c": "b imports c"}, "c": {"a": "c imports a", "d": ""}, "d": {}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    assert describe(["a", "b", "c", "a"], edges).startswith("a -> b -> c -> a\n    a -> b: a imports b")
    assert find_cycles({"a": {"b": ""}, "b": {}}) == []


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional_dependencies() -> set[str]:
    """Distributions named only in camelid's extras (ray, transformers, ...)."""
    try:
        requirements = importlib.metadata.requires("camelid") or []
    except importlib.metadata.PackageNotFoundError:  # not installed: run from the source tree
        return set()
    split = [(_normalize(re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0]), "extra ==" in r) for r in requirements]
    return {name for name, extra in split if extra} - {name for name, extra in split if not extra}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_module_imports(module):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing and _normalize(missing) in _optional_dependencies():
            pytest.skip(f"{module} needs the optional dependency {missing!r}, which is not installed")
        raise
