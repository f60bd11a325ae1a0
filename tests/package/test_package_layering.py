"""The import graph of the hieraloss package keeps its layers (DEVELOPING.md, "Rules of the house").

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a hieraloss module, at module level and inside functions alike, is an edge
from the importing module to the imported one (``from .pkg import name`` goes to ``pkg.name`` when
that is a module, else to ``pkg``). A package's ``__init__`` is the module named after the package;
importing a submodule does not count as importing its package (that is how every package with an
``__init__`` that imports its submodules would otherwise be a cycle).

Rules:

* no cycle among hieraloss modules, except those listed in ``KNOWN_CYCLES`` with a reason;
* the framework-free core (``FRAMEWORK_FREE``) imports neither torch nor paddle at module level,
  directly or through the hieraloss modules it imports at module level (their packages' ``__init__``
  included: that is what ``import`` runs);
* ``hieraloss/torch/*`` never imports paddle and ``hieraloss/paddle/*`` never imports torch (nor
  each other's hieraloss backend), except ``hieraloss/paddle/_bridge.py``, the DLPack bridge to the
  Triton kernels of ``hieraloss.torch.kernels``, which does so only inside functions;
* inside each backend, the internals (ops, tables, kernel glue, collectives, kernels) never import
  a door (``DOORS``: the package, its functional module, its Module/Layer classes, its leaf losses,
  torch's heads for stock models, and paddle's ``distributed`` face);
* the functional doors (``DISPATCHING_DOORS``) import no implementation (``IMPLEMENTATIONS``: the
  compiled kernel, its glue, the Triton kernels, the DLPack bridge): which one runs is each op
  file's choice, through its backend's ``ops.route``;
* ``hieraloss/integrations/*`` use public names only: no import of a name or module starting with
  ``_`` from hieraloss, and no ``module._name`` attribute on an imported hieraloss module;
* ``hieraloss/torch/*``, ``hieraloss/paddle/*`` and ``hieraloss/integrations/*`` never import
  ``hieraloss.numpy`` (the numpy backend is a reference built on the core, not a shared core: the
  rules and checks they share live in ``hieraloss.core``), except the paths in
  ``NUMPY_IMPORT_ALLOWED`` (none now; remove an entry when its file moves to the core);
* ``hieraloss.core`` imports no backend and not ``hieraloss.numpy`` (numpy only, acyclic).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hieraloss"

# Cycles tolerated for now: each entry is (predicate on a module name, reason). A cycle passes when
# every module in it satisfies one entry's predicate. Remove an entry when its cycle is gone.
KNOWN_CYCLES: list[tuple[object, str]] = []

# Modules that never import torch or paddle at module level (DEVELOPING.md, DESIGN.md); ``x.*`` is
# the package x (if it exists) and all its modules.
FRAMEWORK_FREE = [
    "hieraloss",
    "hieraloss.hierarchy",
    "hieraloss.metrics",
    "hieraloss.testing",
    "hieraloss.presets",
    "hieraloss._native",
    "hieraloss.numpy.*",
    "hieraloss.core.*",
]
FRAMEWORKS = ("torch", "paddle")

# paddle -> torch: only the DLPack bridge to the Triton kernels, and only inside its functions.
PADDLE_TO_TORCH_BRIDGE = "hieraloss.paddle._bridge"

# The packages that build on the core and never on the numpy reference backend.
NOT_ON_NUMPY_BACKEND = ("hieraloss.torch", "hieraloss.paddle", "hieraloss.integrations")
# Files (relative to the repository root) still allowed to import hieraloss.numpy, until they move
# their imports to hieraloss.core. Keep it empty; an entry needs a reason and an owner.
NUMPY_IMPORT_ALLOWED: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    target: str  # the imported module (absolute dotted name; may be outside hieraloss)
    names: tuple[str, ...]  # the names taken from it (``from x import a, b``); () for ``import x``
    module_level: bool  # runs when the importing module is imported
    line: int
    alias: str | None  # the local name the import binds to a module (``import a.b`` binds ``a``)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import statement of ``module`` (its source), resolved to absolute module names.

    ``modules`` is the set of known module names (to tell ``from pkg import submodule`` from
    ``from pkg import function``)."""
    out: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, module_level)
            return  # annotations only: never runs
        if isinstance(node, ast.Import):
            for a in node.names:
                # ``import a.b`` binds ``a`` (attributes then reach a.b); ``import a.b as c`` binds ``c``
                out.append(Import(a.name, (), module_level, node.lineno, a.asname or a.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            plain = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in modules:  # ``from pkg import submodule``
                    out.append(Import(sub, (), module_level, node.lineno, a.asname or a.name))
                else:
                    plain.append(a.name)
            if plain or not node.names:
                out.append(Import(target, tuple(plain), module_level, node.lineno, None))
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(ast.parse(source), True)
    return out


def _known(name: str, modules: set[str]) -> str | None:
    """The hieraloss module that an import of ``name`` loads last (``a.b.c`` -> the longest known prefix)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@pytest.fixture(scope="module")
def package() -> dict[str, tuple[Path, list[Import]]]:
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    modules = set(paths)
    return {
        m: (p, imports_of(p.read_text(encoding="utf-8"), m, p.name == "__init__.py", modules))
        for m, p in paths.items()
    }


def _graph(package, module_level_only: bool = False) -> dict[str, set[str]]:
    modules = set(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, (_, imports) in package.items():
        for imp in imports:
            if module_level_only and not imp.module_level:
                continue
            if imp.target == "hieraloss" or imp.target.startswith("hieraloss."):
                t = _known(imp.target, modules)
                if t and t != m:
                    graph[m].add(t)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _edges_inside(graph, component):
    inside = set(component)
    return sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in inside)


# ---------------------------------------------------------------------------- the analysis itself
def test_analysis_sees_module_and_function_level_imports():
    source = (
        "import os\n"
        "from . import sibling, helper\n"
        "from .sub import thing\n"
        "from ..other import name as alias\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .typing_only import T\n"
        "def f():\n"
        "    import torch\n"
        "    from .late import x\n"
        "class C:\n"
        "    from .in_class import y\n"
    )
    modules = {"pkg", "pkg.a", "pkg.a.mod", "pkg.a.sibling", "pkg.a.sub", "pkg.other", "pkg.a.late"}
    got = {(i.target, i.names, i.module_level) for i in imports_of(source, "pkg.a.mod", False, modules)}
    assert ("pkg.a.sibling", (), True) in got
    assert ("pkg.a", ("helper",), True) in got  # not a module: a name from the package
    assert ("pkg.a.sub", ("thing",), True) in got
    assert ("pkg.other", ("name",), True) in got
    assert ("torch", (), False) in got
    assert ("pkg.a.late", ("x",), False) in got
    assert ("pkg.a.in_class", ("y",), True) in got  # a class body runs at import
    assert not any(t.endswith("typing_only") for t, _, _ in got)
    # from the __init__ of package pkg.a, "." is pkg.a itself
    got_init = {i.target for i in imports_of("from .sub import thing\n", "pkg.a", True, modules)}
    assert got_init == {"pkg.a.sub"}


def test_strongly_connected_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_the_graph_has_the_expected_edges(package):
    graph = _graph(package)
    assert "hieraloss.paddle.ops.tree_min" in graph["hieraloss.paddle.functional"]
    assert "hieraloss.torch.ops.tree_min" in graph["hieraloss.torch.functional"]
    # function-level imports count: the paddle bridge reaches the Triton kernels inside functions
    assert "hieraloss.torch.kernels" in graph["hieraloss.paddle._bridge"]


# ---------------------------------------------------------------------------- the rules
DISPATCHING_DOORS = ("hieraloss.torch.functional", "hieraloss.paddle.functional")
IMPLEMENTATIONS = ("hieraloss._native", "hieraloss.torch.kernels", "hieraloss.torch.ops.native",
                   "hieraloss.paddle._bridge", "hieraloss.paddle.ops.native")


def test_the_doors_leave_the_routing_to_the_op_files(package):
    graph = _graph(package)
    for door in DISPATCHING_DOORS:
        reached = sorted(t for t in graph[door] if any(t == i or t.startswith(i + ".") for i in IMPLEMENTATIONS))
        assert not reached, f"{door} imports {reached}: route through its ops/ files (ops.route) instead"
    # the routes themselves do reach them
    assert "hieraloss.torch.kernels" in graph["hieraloss.torch.ops.route"]
    assert "hieraloss.paddle._bridge" in graph["hieraloss.paddle.ops.route"]


def test_no_import_cycles(package):
    graph = _graph(package)
    unexplained = []
    for component in strongly_connected(graph):
        if any(all(allowed(m) for m in component) for allowed, _ in KNOWN_CYCLES):
            continue
        unexplained.append("\n    ".join([" <-> ".join(component), *_edges_inside(graph, component)]))
    assert not unexplained, "import cycles among hieraloss modules:\n  " + "\n  ".join(unexplained)


def _framework_free_modules(package) -> list[str]:
    out = []
    for pattern in FRAMEWORK_FREE:
        if pattern.endswith(".*"):
            out += [m for m in package if m == pattern[:-2] or m.startswith(pattern[:-1])]
        else:
            assert pattern in package, pattern
            out.append(pattern)
    return sorted(set(out))


def _module_level_closure(package, start: str) -> dict[str, str]:
    """The hieraloss modules that importing ``start`` runs, each with the module that first imported it
    (the packages' ``__init__`` included: importing ``a.b`` runs ``a`` first)."""
    graph = _graph(package, module_level_only=True)
    seen = {start: ""}
    todo = [start]
    while todo:
        m = todo.pop()
        parents = [m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)]
        for t in [*graph[m], *parents]:
            if t not in seen:
                seen[t] = m
                todo.append(t)
    return seen


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_framework_free_core_imports_no_framework_at_module_level(package, framework):
    bad = []
    for start in _framework_free_modules(package):
        for m, via in _module_level_closure(package, start).items():
            for imp in package[m][1]:
                root = imp.target.split(".")[0]
                if imp.module_level and root == framework:
                    chain = f" (imported by {start} through {via})" if m != start else ""
                    bad.append(f"{module_name(package[m][0])}:{imp.line} imports {imp.target}{chain}")
    assert not bad, "\n".join(sorted(set(bad)))


def _imports_framework(imp: Import, framework: str) -> bool:
    return imp.target.split(".")[0] == framework or imp.target.startswith(f"hieraloss.{framework}")


@pytest.mark.parametrize(("backend", "other"), [("torch", "paddle"), ("paddle", "torch")])
def test_backends_do_not_import_each_other(package, backend, other):
    bad = []
    for m, (_, imports) in package.items():
        if not m.startswith(f"hieraloss.{backend}"):
            continue
        for imp in imports:
            if not _imports_framework(imp, other):
                continue
            if m == PADDLE_TO_TORCH_BRIDGE and not imp.module_level:
                continue  # the DLPack bridge, inside its functions only
            bad.append(f"{m}:{imp.line} imports {imp.target}")
    assert not bad, "\n".join(bad)


def _private(parts) -> list[str]:
    return [p for p in parts if p.startswith("_") and not (p.startswith("__") and p.endswith("__"))]


def test_integrations_use_public_names_only(package):
    bad = []
    integrations = [m for m in package if m.startswith("hieraloss.integrations.")]
    assert integrations
    for m in integrations:
        path, imports = package[m]
        aliases = set()
        for imp in imports:
            if not (imp.target == "hieraloss" or imp.target.startswith("hieraloss.")):
                continue
            private = _private(imp.target.split(".")[1:]) + _private(imp.names)
            if private:
                bad.append(f"{m}:{imp.line} imports private {', '.join(private)} from {imp.target}")
            if imp.alias:
                aliases.add(imp.alias)
        # attributes of imported hieraloss modules: F._tables, hieraloss.torch._tables.tables_for, ...
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                private = _private(chain)
                if private:
                    bad.append(f"{m}:{node.lineno} uses private {', '.join(private)} of {base.id}")
    assert not bad, "\n".join(sorted(set(bad)))


# The public faces of each backend ("doors": validate, then dispatch) and what lies below them.
DOORS = {
    "torch": {"hieraloss.torch", "hieraloss.torch.functional", "hieraloss.torch.modules",
              "hieraloss.torch.leaf_losses", "hieraloss.torch.heads", "hieraloss.torch.logic"},
    "paddle": {"hieraloss.paddle", "hieraloss.paddle.functional", "hieraloss.paddle.layers",
               "hieraloss.paddle.leaf_losses", "hieraloss.paddle.distributed", "hieraloss.paddle.logic"},
}


@pytest.mark.parametrize("backend", sorted(DOORS))
def test_backend_internals_import_no_door(package, backend):
    """Ops, tables, kernel glue and collectives sit below the doors: they never import one."""
    doors = DOORS[backend]
    assert doors <= set(package)
    graph = _graph(package)
    internals = [m for m in package if m.startswith(f"hieraloss.{backend}.") and m not in doors]
    assert internals
    bad = [f"{m} -> {t}" for m in sorted(internals) for t in sorted(graph[m]) if t in doors]
    assert not bad, "\n".join(bad)


def _imports_numpy_backend(imp: Import) -> bool:
    return imp.target == "hieraloss.numpy" or imp.target.startswith("hieraloss.numpy.")


def _in_packages(m: str, packages) -> bool:
    return any(m == p or m.startswith(p + ".") for p in packages)


def test_backends_and_integrations_do_not_import_the_numpy_backend(package):
    """torch, paddle and the integrations take shared rules and checks from ``hieraloss.core`` only
    (issue 13): the numpy backend is the reference, not everyone's shared core. Imports inside
    functions count too."""
    bad = []
    checked = [m for m in package if _in_packages(m, NOT_ON_NUMPY_BACKEND)]
    assert checked
    for m in sorted(checked):
        path, imports = package[m]
        rel = path.relative_to(ROOT).as_posix()
        if rel in NUMPY_IMPORT_ALLOWED:
            continue
        bad += [f"{rel}:{imp.line} imports {imp.target}" for imp in imports if _imports_numpy_backend(imp)]
        # ``import hieraloss`` then ``hieraloss.numpy.x``: an attribute path into the numpy backend
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "numpy" and isinstance(node.value, ast.Name)
                    and node.value.id == "hieraloss"):
                bad.append(f"{rel}:{node.lineno} uses hieraloss.numpy")
    assert not bad, "\n".join(bad)


def test_numpy_import_allow_list_is_current(package):
    """An allow-list entry names an existing file that still imports hieraloss.numpy (else drop it)."""
    paths = {p.relative_to(ROOT).as_posix(): imports for p, imports in package.values()}
    stale = [rel for rel in sorted(NUMPY_IMPORT_ALLOWED)
             if rel not in paths or not any(_imports_numpy_backend(i) for i in paths[rel])]
    assert not stale, f"remove from NUMPY_IMPORT_ALLOWED: {stale}"


def test_core_imports_no_backend(package):
    """``hieraloss.core`` is numpy only: it imports no backend (``hieraloss.numpy``, ``.torch``,
    ``.paddle``, ``.integrations``), nothing else of hieraloss but ``hieraloss.hierarchy`` and itself,
    and outside hieraloss only the standard library and numpy (inside functions too)."""
    allowed = ("hieraloss.core", "hieraloss.hierarchy")
    bad = []
    core = [m for m in package if _in_packages(m, ("hieraloss.core",))]
    assert core
    for m in sorted(core):
        for imp in package[m][1]:
            root = imp.target.split(".")[0]
            if root == "hieraloss":
                ok = _in_packages(imp.target, allowed)
            else:
                ok = root == "numpy" or root in sys.stdlib_module_names
            if not ok:
                bad.append(f"{m}:{imp.line} imports {imp.target}")
    assert not bad, "\n".join(bad)
