"""Shared test helpers: run the CLI as a subprocess, with or without mpiexec."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def pytest_addoption(parser):
    parser.addoption(
        "--all",
        action="store_true",
        help="also run the tests marked slow: the full set, what CI and the README's install-and-test command run",
    )


# The longest end-to-end runs of the suite (measured 5-27 s each on a 2-core machine, 2026-12-01: --durations):
# each has smaller relatives in the default run (the same paths at fewer ranks, or unit tests of its parts), and
# all of them run in the full set (--all, CI). Node-id parts: a test function, or one of its parameters.
SLOW_RUNS = (
    "test_plot.py::test_plot_command_writes_every_figure",
    "test_training_views.py::test_report_puts_the_phases_side_by_side_with_the_model",
    "test_training_views.py::test_plots_render_per_phase",
    "test_sweep.py::test_sweep_runs_resumes_and_collects",
    "test_sweep.py::test_every_point_of_a_sweep_computes_with_one_exponential",
    "test_sweep.py::test_failed_points_are_recorded_and_retried",
    "test_ring_backward.py::test_report_and_plot_read_a_file_with_every_pass",
    "test_ring_backward.py::test_modes_give_identical_saved_gradients_that_reverify",
    "test_run_mpi.py::test_modes_give_identical_outputs_and_tensors_reverify",
    "test_run_mpi.py::test_appending_runs_to_one_file",
    "test_run_mpi.py::test_dtypes_at_four_ranks",
    "test_strategy_map.py::test_map_renders_from_a_real_file_and_draws_the_measured_winners",
    "test_passq_backward.py::test_pass_q_forward_with_the_torch_kernel_checks_and_equals_native",
    "test_torch_kernel.py::test_run_with_torch_kernel_is_checked[3-",
    "test_strategies.py::test_every_strategy_layout_causal_gqa_dtype_matches_the_reference[4]",
    "test_strategies.py::test_backward_of_ulysses_and_hybrid_matches_float64_gradients[4]",
    "-4]",  # the P = 4 (oversubscribed) parameters of the run tests: P = 1..3 stay in the default run
    "test_strategies.py::test_every_strategy_layout_causal_gqa_dtype_matches_the_reference[3]",
    "test_strategies.py::test_backward_of_ulysses_and_hybrid_matches_float64_gradients[3]",
    "test_torch_kernel.py::test_run_with_torch_kernel_is_checked[2-",
    "test_faults.py::test_memory_limit_none_skips_the_estimate",
    "test_fused.py::test_kernel_bench_runs_the_fused_pass_and_records_it",  # a benchmark's smoke test (12 s)
    # 2026-12-02 (the default run had reached 10.7 min): P = 4 and the CLI end-to-end runs of the new passes, whose
    # smaller relatives stay (P = 1..3, the unit tests of the tables and the model)
    "test_serving.py::test_a_serving_experiment_is_planned_swept_reported_and_plotted_by_the_cli",
    "test_serving.py::test_runs_are_stored_read_back_and_reported",
    "test_ring_backward.py::test_the_torch_backward_in_row_and_head_chunks_matches_float64_and_modes_agree_bitwise[3]",
    "test_ring_backward.py::test_every_layout_mode_and_causal_flag_matches_float64_and_modes_agree_bitwise[4]",
    "test_passq_backward.py::test_every_layout_causal_gqa_and_dtype_matches_float64_gradients[4]",
    "tests/engine/test_packed.py::test_every_strategy_and_layout_with_documents_and_windows_is_checked[1]",
    "test_packed_model.py::test_advise_docs_by_cli",
    "test_packed_model.py::test_report_and_plot_show_the_balance",
)


def pytest_collection_modifyitems(config, items):
    """The default run leaves out the tests marked ``slow`` (skipped, with the reason); ``--all`` or an explicit
    ``-m`` runs them (docs/testing.md: which command is which)."""
    for item in items:
        if any(part in item.nodeid for part in SLOW_RUNS):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: part of the full set, run with --all (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _array_modules() -> list:
    """numpy always; cupy where it sees a GPU, else a skipped parameter that says why (as mpi4py's tests do)."""
    try:
        import cupy

        ok, why = bool(cupy.is_available()), "CuPy sees no CUDA GPU here"
    except Exception as exc:  # noqa: BLE001 - any import problem means: no GPU runs here
        ok, why = False, f"CuPy not importable ({type(exc).__name__}: {exc})"
    return [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(not ok, reason=why))]


@pytest.fixture(params=_array_modules())
def xp(request):
    """The array module a kernel test runs on: each test taking ``xp`` runs once per available array library."""
    return importlib.import_module(request.param)


def to_host(a) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def ringbench(*args, env: dict | None = None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """``python -m ringbench ARGS`` in a subprocess (no MPI launcher)."""
    return subprocess.run(
        [sys.executable, "-m", "ringbench", *map(str, args)],
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def mpi_worker(script: Path, nranks: int, spec: dict, timeout: float = 300, env: dict | None = None):
    """Run a test worker (tests/*worker*.py, tests/mpi_*.py) at ``nranks`` ranks with its JSON ``spec``; the object of
    the ``RESULT <json>`` line rank 0 prints. Fails (with the output's tail) when the job does not exit 0."""
    import json

    if not MPIEXEC.exists():
        pytest.fail(f"{MPIEXEC} not found: install the test extra (pip install -e '.[mpich,test]')")
    cmd = [str(MPIEXEC), "-n", str(nranks), sys.executable, str(script), json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def mpi_runs(nranks: int, runs: list[list], env: dict | None = None, timeout: float = 600) -> list[int]:
    """Each of ``runs`` (the options of one ``ringbench run``) in one launch at ``nranks`` ranks
    (tests/mpi_cli_runs.py); the exit status of each run, in order."""
    return mpi_worker(
        Path(__file__).parent / "mpi_cli_runs.py", nranks, {"runs": [[str(a) for a in r] for r in runs]}, timeout=timeout, env=env
    )["codes"]


class Batch:
    """The runs of one test's parameter grid, in one launch per rank count (tests/mpi_cli_runs.py): the first
    parameter at a rank count launches every case of the grid at that count; each case then reads its own file.
    ``cases(nranks)``: {key: options}; ``common``: the options of every run."""

    def __init__(self, root: Path, cases, common=(), tensors: bool = False):
        self.root, self.cases, self.common, self.tensors, self.done = root, cases, list(common), tensors, {}

    def run(self, nranks: int, key):
        from ringbench import store

        if nranks not in self.done:
            cases = self.cases(nranks)
            outs = {k: self.root / f"p{nranks}-{i}.h5" for i, k in enumerate(cases)}
            codes = mpi_runs(nranks, [[*self.common, "--out", outs[k], *opts] for k, opts in cases.items()])
            self.done[nranks] = {k: (code, outs[k]) for k, code in zip(cases, codes)}
        code, out = self.done[nranks][key]
        assert code == 0, f"ringbench run {self.cases(nranks)[key]} exited {code} (its output: above)"
        (run,) = store.read(out, tensors=self.tensors)
        return run


def append_runs(runs: list[tuple[int, list]], env: dict | None = None) -> None:
    """``ringbench run`` with each (rank count, options) of ``runs``, in order, one launch per stretch of runs at the
    same rank count (a fixture's result file built in a few launches, not one per run); each must exit 0."""
    import itertools

    for nranks, group in itertools.groupby(runs, key=lambda r: r[0]):
        group = [opts for _, opts in group]
        codes = mpi_runs(nranks, group, env=env)
        assert codes == [0] * len(group), list(zip(codes, group))


def mpiexec(nranks: int, *args, env: dict | None = None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """``mpiexec -n P python -m ringbench ARGS`` with this interpreter."""
    if not MPIEXEC.exists():
        pytest.fail(f"{MPIEXEC} not found: install the test extra (pip install -e '.[mpich,test]')")
    cmd = [str(MPIEXEC), "-n", str(nranks), sys.executable, "-m", "ringbench", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout, cwd=cwd or ROOT)


@pytest.fixture(scope="session")
def small_results(tmp_path_factory) -> Path:
    """A real result file: a few small runs over modes, layouts and rank counts (shared by read-only tests)."""
    path = tmp_path_factory.mktemp("results") / "small.h5"
    common = ["--seq-len", 256, "--heads", 2, "--head-dim", 16, "--repeat", 3, "--warmup", 1, "--check", "--quiet", "--out", path]
    append_runs(
        [
            (1, common),
            (2, common),
            (2, [*common, "--mode", "blocking"]),
            (2, [*common, "--mode", "allgather"]),
            (4, [*common, "--causal", "--layout", "zigzag"]),
            (4, [*common, "--causal", "--layout", "striped"]),
        ]
    )
    return path


class LoopBack:
    """An exchange whose every neighbour is this rank: what is sent is what is received."""

    posted = False

    def post_all(self, pairs, tag=0):
        for send, recv in pairs:
            recv[...] = send
        self.posted = True

    def wait(self):
        self.posted = False

    def test(self):
        return True

    def sendrecv_all(self, pairs, tag=1):
        for send, recv in pairs:
            recv[...] = send

    def allgather(self, local, out):
        out[...] = local

    def alltoall(self, send, recv):
        recv[...] = send


def write_v1(path, names=("p1", "p1~2"), probe=True):
    import json

    import h5py

    """A result file as ringbench 0.1 wrote it (schema version 1: no run_id, no probe_id); every run made in one second."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "ringbench-results"
        f.attrs["schema_version"] = 1
        runs = f.create_group("runs", track_order=True)
        for i, name in enumerate(names):
            g = runs.create_group(name)
            g.attrs.update(point_id="p1", nranks=2, status="ok", created_utc="2025-06-01T00:00:00+00:00")
            g.attrs["config"] = json.dumps({"seq_len": 8}, sort_keys=True)
            g.attrs["provenance"] = json.dumps({"hosts": ["h"]}, sort_keys=True)
            g.create_group("config").attrs["seq_len"] = 8
            g.create_group("samples").create_dataset("total_s", data=np.full((3, 2), float(i)))
            g.create_group("summary").attrs["time_s"] = float(i)
            g.create_group("memory")
        if probe:
            p = f.create_group("probes").create_group("probe-P2")
            p.attrs.update(nranks=2, created_utc="2025-06-01T00:00:00+00:00", config="{}", provenance="{}")
            p.create_group("samples").create_dataset("msg_bytes", data=np.array([8]))
            p.create_group("summary").attrs["rate_flops"] = 1.0
    return path
