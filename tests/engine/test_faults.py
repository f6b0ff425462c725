"""Bad input: one line, exit status 2, nothing written, on every rank. A failing rank ends the job."""

import subprocess
import sys
import time

import pytest

from conftest import MPIEXEC, child_env, mpiexec, ringbench

pytestmark = pytest.mark.mpi
BASE = ["run", "--heads", 4, "--head-dim", 8, "--repeat", 1, "--warmup", 0]


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--seq-len", 100], "--seq-len: 100 is not divisible by 3"),
        (["--seq-len", 93, "--layout", "zigzag"], "--seq-len: 93 is not divisible by 6"),
        (["--kv-heads", 3], "--kv-heads: must divide heads=4"),
        (["--layout", "spiral"], "--layout: invalid choice: 'spiral'"),
        (["--mode", "ring"], "--mode: invalid choice"),
        (["--dtype", "int8"], "--dtype: invalid choice"),
        (["--backend", "jax"], "--backend: invalid choice"),
        (["--seq-len", "abc"], "--seq-len: invalid int value: 'abc'"),
        (["--backend", "cupy"], "--backend cupy"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_option_is_one_line_exit_2(args, expect, tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(3, *BASE, "--out", out, *(["--seq-len", 96] if "--seq-len" not in args else []), *args, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringbench run: ") and expect in lines[0], res.stderr
    assert not out.exists() and res.stdout == ""


def test_unwritable_output_path(tmp_path):
    res = mpiexec(2, *BASE, "--seq-len", 32, "--out", tmp_path / "nope" / "r.h5", timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"ringbench run: --out: cannot write {tmp_path}/nope/r.h5: directory {tmp_path}/nope does not exist"


def test_output_that_is_not_a_result_file_is_refused(tmp_path):
    out = tmp_path / "r.h5"
    out.write_text("not hdf5")
    res = mpiexec(2, *BASE, "--seq-len", 32, "--out", out, timeout=60)
    assert res.returncode == 2 and "not an HDF5 file" in res.stderr
    assert out.read_text() == "not hdf5"


@pytest.mark.parametrize("rank,step", [(1, 0), (2, 1), (0, 2)])
def test_exception_on_one_rank_ends_the_whole_job(rank, step, tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(3, *BASE, "--seq-len", 96, "--out", out, env={"RINGBENCH_FAULT": f"{rank}:{step}"}, timeout=60)
    assert res.returncode != 0
    assert f"rank {rank} of 3" in res.stderr and "InjectedFault" in res.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,extra,rank,step,fired",
    [
        ("ulysses", [], 2, 1, 1),  # the ring's step (R = 1)
        ("ulysses", [], 1, 3, 2),  # past the R + 2 = 3 steps: the last, the all-to-all out
        ("hybrid", ["--ulysses-degree", 2], 3, 2, 2),  # the ring's second step over the R = 2 groups
        ("hybrid", ["--ulysses-degree", 2], 0, 3, 3),  # the all-to-all out
    ],
)
def test_fault_of_ulysses_and_hybrid_fires_at_its_step(mode, extra, rank, step, fired, tmp_path):
    """RINGBENCH_FAULT=r:s counts the strategy's own steps (0: all-to-all in, 1..R: the ring over the groups, R + 1:
    all-to-all out); it used to fire at step 0 whatever s was."""
    out = tmp_path / "r.h5"
    env = {"RINGBENCH_FAULT": f"{rank}:{step}"}
    res = mpiexec(4, *BASE, "--seq-len", 32, "--mode", mode, *extra, "--out", out, env=env, timeout=90)
    assert res.returncode != 0
    assert f"rank {rank} of 4" in res.stderr and f"InjectedFault: injected fault on rank {rank} at step {fired}" in res.stderr, res.stderr
    assert not out.exists()


def test_cli_basics():
    res = ringbench("--help")
    assert res.returncode == 0 and "run" in res.stdout
    res = ringbench("rnu")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("ringbench: unknown command 'rnu' (did you mean 'run'?)")
    assert ringbench("--version").stdout.startswith("ringbench ")


@pytest.mark.parametrize("spec", ["abc", "3:0", "0:3", "1"])
def test_bad_fault_spec_is_one_line_exit_2(spec, tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(3, *BASE, "--seq-len", 96, "--out", out, env={"RINGBENCH_FAULT": spec}, timeout=60)
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr.strip() == f"ringbench run: RINGBENCH_FAULT: expected rank:step[@P] with rank and step in 0..2 (3 ranks), got {spec!r}"
    )
    assert not out.exists() and res.stdout == ""


@pytest.mark.parametrize(
    "args,expect",
    [
        (
            ["--seq-len", 999_999_999],
            r"this problem needs about [\d.]+ [GT]iB of host memory per rank \(estimate; [\d.]+ TiB for the 3 ranks on .+\), "
            r"more than the [\d.]+ [GMT]iB available there; use more ranks or a smaller problem, or set --memory-limit",
        ),
        (["--seq-len", 3 * 2**16, "--head-dim", 60000], r"needs about [\d.]+ GiB of host memory per rank \(estimate; .*available there"),
        (["--memory-limit", "1MiB"], r"needs about [\d.]+ MiB of host memory per rank \(estimate\), more than --memory-limit 1\.0 MiB"),
        (
            ["--memory-limit", "20MiB", "--check", "--seq-len", 3072],  # fits without --check (below)
            r"needs about [\d.]+ MiB of host memory per rank \(estimate\), more than --memory-limit 20\.0 MiB",
        ),
        (["--head-dim", 100000], r"--head-dim: expected an integer <= 65536 \(2\^16\), got 100000"),
        (["--seq-len", 2**63], r"--seq-len: expected an integer <= 4294967296 \(2\^32\), got 9223372036854775808"),
        (["--repeat", 10**9], r"--repeat: expected an integer <= 100000, got 1000000000"),
        (["--memory-limit", "lots"], r"--memory-limit: expected auto, none, or a size from 1 byte to 2\^60"),
    ],
)
def test_problem_that_cannot_fit_or_is_out_of_bounds_is_one_line_exit_2(args, expect, tmp_path):
    """Refused before anything big is allocated (these used to give tracebacks, the OOM killer, or 1e34 TFLOP/s)."""
    import re

    out = tmp_path / "r.h5"
    res = mpiexec(3, *BASE, "--out", out, *(["--seq-len", 96] if "--seq-len" not in args else []), *args, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringbench run: ") and re.search(expect, lines[0]), res.stderr
    assert not out.exists() and res.stdout == ""


def test_memory_limit_none_skips_the_estimate(tmp_path):
    res = mpiexec(2, *BASE, "--seq-len", 32, "--memory-limit", "none", "--quiet", timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    res = mpiexec(3, *BASE, "--seq-len", 3072, "--memory-limit", "20MiB", "--quiet", timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr


RUN_OR_ABORT = """
import sys, time
from ringbench.engine import comm
def main():
    if comm.WORLD.rank == 1 and sys.argv[1] == "fail":
        raise RuntimeError("boom on rank 1")
    if sys.argv[1] == "fail":
        time.sleep(60)  # rank 0 would wait here for good without the abort
    return 3
sys.exit(comm.run_or_abort(main))
"""


@pytest.mark.parametrize("what", ["ok", "fail"])
def test_run_or_abort_ends_the_job_on_one_ranks_failure(what, tmp_path):
    """The entry of scripts run under mpiexec (the test workers): main's status, or one rank's exception aborts all."""
    script = tmp_path / "w.py"
    script.write_text(RUN_OR_ABORT)
    t0 = time.monotonic()
    res = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, str(script), what], capture_output=True, text=True, env=child_env(), timeout=50
    )
    if what == "ok":
        assert res.returncode == 3, res.stderr
    else:
        assert res.returncode != 0 and "rank 1 of 2" in res.stderr and "boom on rank 1" in res.stderr
        assert time.monotonic() - t0 < 30  # aborted, not waited out
