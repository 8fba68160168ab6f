"""The design stays visible (issue 24): no import cycle between project modules, no import from a lower layer
into a higher one, and core/ imports only torch, numpy and the standard library.

The imports are read with ``ast`` from every module of the layered packages, including the imports inside
functions (a deferred import is still a dependency: it only moves the cycle to run time). Layers, top to bottom::

    client -> api -> worker -> datasets -> store -> schemas -> core

A module may import its own package and any package below it. ``datasets`` sits above ``store``: it decodes
uploads after ``store.uploads``' header pass, and ``store`` persists bytes and rows, never a dataset type.
``schemas`` and ``core`` are the bottom: neither imports the other today, and core/ never may (``schemas`` is
placed above it so that a config model could read a core registry); benchmarks/, tests/ and migrations/ are
outside the layering.
"""
from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# top to bottom; a package may import only packages at its own index or after it
LAYERS = ("client", "api", "worker", "datasets", "store", "schemas", "core")
RANK = {pkg: i for i, pkg in enumerate(LAYERS)}

# Cycles known to exist, as sorted tuples of the modules in one strongly connected component: skipped while they
# exist exactly so (a cycle that grows, or any other one, fails), a warning once they are gone. Empty since
# core.algorithms <-> core.baselines went (core/registry.py); keep it so.
KNOWN_CYCLES: set[tuple[str, ...]] = set()

# what core/ may import besides itself and the standard library
CORE_THIRD_PARTY = {"torch", "numpy"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """module name -> file, for every module of the layered packages."""
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imported_names(path: Path, name: str) -> set[str]:
    """Absolute names of everything ``path`` (module ``name``) imports, at any depth: ``import a.b`` gives
    ``a.b``, and so does ``from a import b`` (``resolve`` then finds module ``a.b``, or ``a`` when ``b`` is a name
    in it); relative imports are made absolute."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.update(mod if a.name == "*" else f"{mod}.{a.name}" for a in node.names)
    return names


def resolve(imported: str, modules: dict) -> str | None:
    """The project module an imported name refers to (the longest module prefix), or None (not ours)."""
    parts = imported.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> the project modules it imports, module -> the top-level names of the rest)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name], external[name] = set(), set()
        for imp in imported_names(path, name):
            target = resolve(imp, modules)
            if target is None:
                external[name].add(imp.split(".")[0])
            elif target != name:
                graph[name].add(target)
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(tuple(sorted(comp)))
    return sorted(found)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a package into a package above it in LAYERS."""
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = src.split(".")[0], dst.split(".")[0]
            if RANK[b] < RANK[a]:
                bad.append(f"{src} ({a}) imports {dst} ({b}, a layer above)")
    return bad


# --------------------------------------------------------------------------- the detectors can fail
def test_the_cycle_detector_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert cycles(g) == [("a", "b", "c"), ("d", "e")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_layer_check_finds_upward_imports():
    g = {"store.x": {"datasets.y", "core.z"}, "api.a": {"worker.b", "client.c"}, "core.z": set()}
    assert upward(g) == ["api.a (api) imports client.c (client, a layer above)",
                         "store.x (store) imports datasets.y (datasets, a layer above)"]


def test_imports_are_read_inside_functions_and_made_absolute(tmp_path):
    pkg = tmp_path / "worker"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from .b import g\n    from store import jobs as Q\n")
    names = imported_names(pkg / "a.py", "worker.a")
    assert names == {"os", "worker.b.g", "store.jobs"}
    assert imported_names(pkg / "__init__.py", "worker") == {"worker.a"}
    modules = {"worker": pkg / "__init__.py", "worker.a": pkg / "a.py", "worker.b": pkg / "b.py", "store": None}
    assert [resolve(n, modules) for n in ("worker.b.g", "store.jobs", "os")] == ["worker.b", "store", None]


# --------------------------------------------------------------------------- the tree
@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_is_read(graph):
    deps, _ = graph
    assert len(deps) > 50 and sum(map(len, deps.values())) > 100  # the walk sees the tree and its imports
    assert "datasets" in deps["worker.runtime"]  # an import inside a function (use_datasets)


def test_no_import_cycles(graph):
    found = set(cycles(graph[0]))
    stale = KNOWN_CYCLES - found
    if stale:
        warnings.warn(f"known cycles that no longer exist: delete them from KNOWN_CYCLES: {sorted(stale)}")
    new = sorted(found - KNOWN_CYCLES)
    assert not new, "import cycles (each a set of modules that import one another):\n" + "\n".join(
        " <-> ".join(c) for c in new)


def test_no_upward_imports(graph):
    bad = upward(graph[0])
    assert not bad, "imports from a lower layer into a higher one:\n" + "\n".join(bad)


def test_core_imports_only_torch_numpy_and_the_standard_library(graph):
    _, external = graph
    allowed = CORE_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__"}
    bad = {m: sorted(ext - allowed) for m, ext in external.items() if m.split(".")[0] == "core" and ext - allowed}
    assert not bad, f"core/ imports beyond torch, numpy and the standard library: {bad}"
