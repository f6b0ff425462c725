"""The house rules a linter can check: ``ruff check`` and ``ruff format --check`` over the tree (ruff.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = Path(sys.executable).parent / "ruff"
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff not found: install the test extra (pip install -e '.[mpich,test]')")


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(args):
    res = subprocess.run([*_ruff(), *args, "ringbench", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# What launches mpiexec, in a test's own code or in the fixtures and module helpers it reaches (conftest's included)
_LAUNCH = ("MPIEXEC", "mpiexec(", "mpi_runs(", "Batch(", "append_runs(")


def _code(node) -> str:
    """A function's code without its strings (a docstring or a message may name what it does not call)."""
    import ast
    import copy

    node = copy.deepcopy(node)
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            n.value = ""
    return ast.unparse(node)


def _functions(tree) -> dict[str, str]:
    import ast

    return {n.name: _code(n) for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_test_that_launches_mpiexec_is_marked_mpi():
    """``pytest -m "not mpi"`` (docs/testing.md) runs without an MPI launcher: a test whose code, or a fixture or
    helper it uses, starts mpiexec carries ``@pytest.mark.mpi`` (or its module's ``pytestmark`` does)."""
    import ast
    import re

    shared = _functions(ast.parse((ROOT / "tests" / "conftest.py").read_text()))
    unmarked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        marked_module = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets) and "mpi" in ast.unparse(n.value)
            for n in tree.body
        )
        if marked_module:
            continue
        local = {**shared, **_functions(tree)}
        for n in tree.body:
            if not (isinstance(n, ast.FunctionDef) and n.name.startswith("test_")):
                continue
            if any("mark.mpi" in ast.unparse(d) for d in n.decorator_list):
                continue
            seen, todo = {n.name}, [_code(n)]
            while todo:
                code = todo.pop()
                if any(x in code for x in _LAUNCH):
                    unmarked.append(f"{path.relative_to(ROOT)}::{n.name}")
                    break
                for name, body in local.items():
                    if name not in seen and re.search(rf"\b{name}\b", code):
                        seen.add(name)
                        todo.append(body)
    assert not unmarked, "launch mpiexec but are not marked mpi: " + ", ".join(unmarked)
