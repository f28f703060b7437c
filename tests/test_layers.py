"""The library's layers (docs/architecture.md): every module belongs to one, imports only from
its own layer or those below, and no chain of imports comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Bottom first. A module is named by its dotted path; a folder's name covers its modules.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "_version", "config", "interrupt", "progress", "local_worker")),
    ("store", ("store",)),
    ("sources, network, simulation", ("sources", "model", "anatomy", "simulate")),
    ("kernels and cluster", ("infer", "training", "cluster", "launchers")),
    ("analysis", ("metrics", "detection", "acquire", "report", "heldout")),
    ("jobs", ("jobs",)),
    ("entry points", ("__init__", "__main__", "cli")),
    ("viewer", ("viewer",)),
]


def _files() -> dict[str, Path]:
    """``{module name relative to the package: file}``, the CLI included."""
    found = {}
    for path in (ROOT / "deepcad_chunked").rglob("*.py"):
        found[".".join(path.relative_to(ROOT / "deepcad_chunked").with_suffix("").parts)] = path
    for path in (ROOT / "cli").rglob("*.py"):
        found["cli." + ".".join(path.relative_to(ROOT / "cli").with_suffix("").parts)] = path
    return found


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module a dotted import of the package reaches (``a.b`` as a module or a
    package's ``__init__``), or None for names outside the package."""
    if name != "deepcad_chunked" and not name.startswith("deepcad_chunked."):
        return None
    rel = name.removeprefix("deepcad_chunked").removeprefix(".")
    if not rel:
        return "__init__"
    if rel in modules:
        return rel
    return f"{rel}.__init__" if f"{rel}.__init__" in modules else None


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every import statement, at the top of a file or
    inside a function alike."""
    files = _files()
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(a.name, modules) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from package import module" reaches the module; "from module import name"
                # (or a name the package's __init__ exports) reaches the module itself
                for alias in node.names:
                    target = _resolve(f"{node.module}.{alias.name}", modules)
                    targets.append(target or _resolve(node.module, modules))
            deps.update(t for t in targets if t is not None and t != module)
        graph[module] = deps
    return graph


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the entry that names ``module`` or its folder."""
    head = module.split(".")[0]
    for index, (_, names) in enumerate(LAYERS):
        if head in names or module in names:
            return index
    raise KeyError(module)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a module in a higher layer."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if layer_of(d) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in import_graph():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"add these to LAYERS (and docs/architecture.md): {unplaced}"


def test_no_module_imports_one_above_it() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_storage_layer_never_imports_the_cluster() -> None:
    graph = import_graph()
    store = {m: deps for m, deps in graph.items() if m.startswith(("store.", "sources."))}
    assert store, "the store and sources modules were not found"
    assert not [f"{m} -> {d}" for m, deps in store.items() for d in deps
                if d.split(".")[0] in ("cluster", "launchers", "jobs")]


def test_the_checks_find_what_they_look_for() -> None:
    """The checks are not vacuous: a planted upward import and a planted cycle are found."""
    graph = import_graph()
    assert graph["jobs.convert"] >= {"store.lifecycle", "cluster"}  # imports are read
    planted = {**graph, "store.omezarr": graph["store.omezarr"] | {"jobs.convert"}}
    assert "store.omezarr -> jobs.convert" in upward_imports(planted)
    assert any("store.omezarr" in c and "jobs.convert" in c for c in cycles(planted))
    with pytest.raises(KeyError):
        layer_of("plugins.napari")
