"""Bad input: one line, exit status 2, nothing written, on every rank. A failing rank ends the job."""

import pytest

from conftest import mpiexec, ringbench

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
    assert res.stderr.strip() == f"ringbench run: RINGBENCH_FAULT: expected rank:step with rank and step in 0..2 (3 ranks), got {spec!r}"
    assert not out.exists() and res.stdout == ""
