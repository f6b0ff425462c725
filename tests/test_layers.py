"""The layer rules of the package, stated as folder rules and checked statically: every ringbench/**/*.py is parsed
(function-level imports included, so a lazy import cannot hide), the module import graph is built, and the rules are
asserted on it (docs/architecture.md explains them).

* each folder imports only the folders below it (``MAY_IMPORT``); the top-level modules ``layout``, ``config``,
  ``provenance`` and ``yamlfile`` import no folder; ``cli`` may import everything;
* the pure modules (the kernels, the layouts, the inputs, the metrics and the model) import, even indirectly, no MPI,
  no HDF5, no plotting and nothing that runs or stores a benchmark;
* only engine/comm imports mpi4py; only engine/backend imports cupy; only store/ imports h5py;
* the graph of ringbench's modules has no cycle;
* ``ringbench/__init__.py`` imports no ringbench module at import time (only its entry point does, when called);
* no module of the package imports a module by its former flat name (``from ringbench import results``).
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "ringbench"
TOP = {"layout", "documents", "config", "provenance", "yamlfile"}
FOLDERS = ("kernels", "engine", "store", "analysis", "harness", "sweeps")
# what each folder may import besides itself and the top-level modules (the layers, bottom to top)
MAY_IMPORT = {
    "kernels": set(),
    "engine": {"kernels"},
    "store": set(),
    "analysis": {"kernels", "store"},
    "harness": {"kernels", "engine", "store", "analysis"},
    "sweeps": {"kernels", "store"},
}
PURE = (
    "ringbench.layout",
    "ringbench.documents",
    "ringbench.config",
    "ringbench.kernels.kernel",
    "ringbench.kernels.backward",
    "ringbench.harness.inputs",
    "ringbench.analysis.measure",
    "ringbench.analysis.model",
)
NOT_IN_PURE = {
    "mpi4py",
    "h5py",
    "matplotlib",
    "cupy",
    "ringbench.cli",
    "ringbench.harness.runner",
    "ringbench.store",
    "ringbench.engine.comm",
}
ONLY_IN = {"mpi4py": {"ringbench.engine.comm"}, "cupy": {"ringbench.engine.backend"}, "h5py": {"ringbench.store"}}


def _module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    """{'ringbench.engine.ring': its tree, 'ringbench.store': store/__init__.py's tree, ...}"""
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(tree: ast.AST, modules) -> set[str]:
    """Every module ``tree`` imports anywhere: 'numpy', 'mpi4py', 'ringbench.engine.comm' (top-level names of others)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}: ringbench imports absolutely"
            for a in node.names:  # from ringbench.engine import comm (a module) or from ringbench import env_int (a name)
                sub = f"{node.module}.{a.name}"
                names.add(sub if sub in modules else node.module)
    out = set()
    for name in names:
        if name.split(".")[0] != "ringbench":
            out.add(name.split(".")[0])
            continue
        while name not in modules and "." in name:  # ringbench.store.Run -> ringbench.store
            name = name.rsplit(".", 1)[0]
        out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: what it imports}, ringbench modules spelled 'ringbench.x.y'; the package itself and the folders'
    own __init__ are left out of the targets (every submodule imports them implicitly)."""
    modules = _modules()
    skip = {"ringbench", "ringbench.__main__"} | {f"ringbench.{f}" for f in FOLDERS if f != "store"}
    return {m: _imported(tree, modules) - skip - {m} for m, tree in modules.items() if m not in skip}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[1] in FOLDERS else "top:" + parts[1]


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


def test_every_folder_imports_only_the_layers_below_it():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        src = _folder(mod)
        if src == "top:cli":
            continue
        allowed = MAY_IMPORT.get(src, set()) | {src} if src in FOLDERS else set()
        for dep in deps:
            if not dep.startswith("ringbench."):
                continue
            dst = _folder(dep)
            if dst.startswith("top:"):
                if dst[4:] not in TOP and dst != "top:__init__":
                    bad.append(f"{mod} imports {dep} (only cli may)")
            elif dst not in allowed:
                bad.append(f"{mod} imports {dep}: {src} may import {sorted(MAY_IMPORT.get(src, ()))} and the top-level modules")
    assert not bad, "\n".join(bad)


def test_pure_math_imports_no_mpi_hdf5_plotting_or_runner():
    graph = import_graph()
    for mod in PURE:
        assert mod in graph, f"{mod} is not a module of the package any more: update PURE"
        reached = _closure(graph, mod)
        assert not reached & NOT_IN_PURE, f"{mod} imports {sorted(reached & NOT_IN_PURE)} (directly or through another module)"


def test_mpi4py_cupy_and_h5py_each_have_one_home():
    graph = import_graph()
    for package, allowed in ONLY_IN.items():
        users = {m for m, deps in graph.items() if package in deps}
        assert users <= allowed, f"{package} imported by {sorted(users - allowed)}; only {sorted(allowed)} may"


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_package_init_imports_nothing_of_ringbench_at_import_time():
    tree = _modules()["ringbench"]
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(("ringbench" in (getattr(n, "module", "") or "")) or any("ringbench" in a.name for a in n.names) for n in top)


def test_no_module_uses_a_flat_layout_name():
    import ringbench

    modules = _modules()
    bad = []
    for mod, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "ringbench":
                bad += [f"{mod}: from ringbench import {a.name}" for a in node.names if a.name in ringbench.MOVED]
    assert not bad, "\n".join(bad)


def test_the_flat_names_still_resolve_with_a_warning():
    import warnings

    import ringbench
    from ringbench.analysis import results

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ringbench.results is results
    assert "ringbench.analysis.results" in str(caught[0].message)


def test_the_checks_see_lazy_imports_and_cycles():
    modules = {"ringbench.engine.comm": None, "ringbench.store": None}
    tree = ast.parse("def f():\n    from ringbench.engine import comm\n    import mpi4py.MPI\n    from ringbench.store import Run\n")
    assert _imported(tree, modules) == {"ringbench.engine.comm", "mpi4py", "ringbench.store"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "numpy"}, "b": set()}) is None


# Modules whose tests live under another name (test files keep unique names across folders: pytest imports them by
# basename): module -> the test file(s) that test it.
TESTED_IN = {
    "ringbench.cli": ["tests/test_cli_inputs.py"],
    "ringbench.yamlfile": ["tests/sweeps/test_experiment.py", "tests/analysis/test_advise.py"],
    "ringbench.kernels.api": ["tests/kernels/test_kernel_api.py"],
    "ringbench.kernels.tiling": ["tests/kernels/test_kernel_tiling.py"],
    "ringbench.engine.api": ["tests/engine/test_engine_api.py"],
    "ringbench.engine.comm": ["tests/engine/test_faults.py", "tests/engine/test_engine_api.py"],
    "ringbench.engine.hybrid": ["tests/engine/test_strategies.py"],
    "ringbench.engine.passq": ["tests/engine/test_passq_backward.py", "tests/engine/test_strategies.py"],
    "ringbench.harness.memory": ["tests/harness/test_run_mpi.py", "tests/harness/test_runner_record.py"],
    "ringbench.harness.record": ["tests/harness/test_runner_record.py"],
    "ringbench.harness.runner": ["tests/harness/test_run_mpi.py"],
    "ringbench.analysis.report": ["tests/analysis/test_results.py", "tests/analysis/test_strategy_map.py"],
}


def test_tests_mirror_the_folders_and_every_module_has_a_test_file():
    """ringbench/FOLDER/MOD.py is tested in tests/FOLDER/test_MOD.py (the top level in tests/test_MOD.py), or in the
    files TESTED_IN names, which must exist; no test file sits in a folder the package lacks."""
    missing = []
    for mod in _modules():
        parts = mod.split(".")
        if mod == "ringbench" or parts[-1] == "__main__" or (len(parts) == 2 and parts[1] in FOLDERS and parts[1] != "store"):
            continue
        if mod in TESTED_IN:
            files = [ROOT / f for f in TESTED_IN[mod]]
            ok = all(f.exists() for f in files)
        else:
            folder = parts[1] if parts[1] in FOLDERS else ""
            ok = (ROOT / "tests" / folder / f"test_{parts[-1]}.py").exists()
        if not ok:
            missing.append(mod)
    assert not missing, f"modules without their test file: {missing}"
    for path in (ROOT / "tests").rglob("test_*.py"):
        rel = path.relative_to(ROOT / "tests")
        assert len(rel.parts) == 1 or rel.parts[0] in FOLDERS, f"{rel}: tests mirror the package's folders"
