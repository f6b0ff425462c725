"""The layer rules of the package, checked statically: every ringbench/*.py is parsed (function-level imports
included, so a lazy import cannot hide), the module import graph is built, and the rules are asserted on it.

* pure math (layout, kernel, inputs, measure, model, backward) imports, even indirectly, no MPI, no HDF5, no
  plotting and none of the modules that run or store a benchmark (cli, runner, store, comm);
* only comm imports mpi4py; only backend imports cupy;
* the graph of ringbench's modules has no cycle;
* ``ringbench/__init__.py`` imports no ringbench module at import time (only its entry point does, when called).
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "ringbench"
PURE = ("layout", "kernel", "inputs", "measure", "model", "backward")
NOT_IN_PURE = {"mpi4py", "h5py", "matplotlib", "cupy", "ringbench.cli", "ringbench.runner", "ringbench.store", "ringbench.comm"}
ONLY_IN = {"mpi4py": {"comm"}, "cupy": {"backend"}}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imported(tree: ast.AST, modules) -> set[str]:
    """Every module ``tree`` imports anywhere: 'numpy', 'mpi4py', 'ringbench.store' (top-level names of others)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}: ringbench imports absolutely"
            if node.module == "ringbench":  # from ringbench import store (a module) or env_int (a name in __init__)
                names |= {f"ringbench.{a.name}" if a.name in modules else "ringbench" for a in node.names}
            else:
                names.add(node.module)
    out = set()
    for name in names:
        parts = name.split(".")
        out.add(".".join(parts[:2]) if parts[0] == "ringbench" and len(parts) > 1 else parts[0])
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: what it imports}, ringbench modules spelled 'ringbench.x'; the package itself is left out
    (every submodule imports it implicitly)."""
    modules = _modules()
    return {f"ringbench.{m}": _imported(tree, modules) - {"ringbench"} for m, tree in modules.items() if m not in ("__init__", "__main__")}


def _closure(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def find_cycle(graph) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_pure_math_imports_no_mpi_hdf5_plotting_or_runner():
    graph = import_graph()
    for name in PURE:
        mod = f"ringbench.{name}"
        if mod not in graph:
            continue  # backward.py: only once it exists
        reached = _closure(graph, mod)
        assert not reached & NOT_IN_PURE, f"{mod} imports {sorted(reached & NOT_IN_PURE)} (directly or through another module)"


def test_mpi4py_only_in_comm_and_cupy_only_in_backend():
    graph = import_graph()
    for package, allowed in ONLY_IN.items():
        users = {m.split(".")[1] for m, deps in graph.items() if package in deps}
        assert users <= allowed, f"{package} imported by {sorted(users - allowed)}; only {sorted(allowed)} may"


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_package_init_imports_nothing_of_ringbench_at_import_time():
    tree = _modules()["__init__"]
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(("ringbench" in (getattr(n, "module", "") or "")) or any("ringbench" in a.name for a in n.names) for n in top)


def test_the_checks_see_lazy_imports_and_cycles():
    tree = ast.parse("def f():\n    from ringbench import comm\n    import mpi4py.MPI\n")
    assert _imported(tree, {"comm"}) == {"ringbench.comm", "mpi4py"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "numpy"}, "b": set()}) is None
