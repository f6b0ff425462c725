"""`ringbench run` under a real mpiexec at 1-4 ranks: correctness, the result file, identical modes."""

import numpy as np
import pytest

from ringbench import store
from ringbench.kernels import reference
from ringbench.layout import LAYOUTS

from conftest import Batch, mpiexec

pytestmark = pytest.mark.mpi
SMALL = ["--heads", 4, "--head-dim", 16, "--repeat", 2, "--warmup", 1, "--quiet"]


def run_ok(nranks, tmp_path, *args):
    out = tmp_path / "r.h5"
    res = mpiexec(nranks, "run", *SMALL, "--check", "--out", out, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = store.read(out)
    return run


CAUSAL = ["--causal", "--no-causal"]


@pytest.fixture(scope="module")
def ring_grid(tmp_path_factory):
    def cases(nranks):
        return {(lay, c): ["--seq-len", 48 * nranks, "--layout", lay, c, "--kv-heads", 2] for lay in LAYOUTS for c in CAUSAL}

    return Batch(tmp_path_factory.mktemp("ring-grid"), cases, [*SMALL, "--check"])


BASELINE_EXTRA = {"zigzag": ["--causal", "--layout", "zigzag"], "fp16-mqa": ["--dtype", "float16", "--kv-heads", 1]}


@pytest.fixture(scope="module")
def baseline_grid(tmp_path_factory):
    def cases(nranks):
        return {(m, e): ["--seq-len", 96, "--mode", m, *BASELINE_EXTRA[e]] for m in ("blocking", "allgather") for e in BASELINE_EXTRA}

    return Batch(tmp_path_factory.mktemp("baseline-grid"), cases, [*SMALL, "--check"])


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_overlap_ring_is_correct(nranks, layout, causal, ring_grid):
    run = ring_grid.run(nranks, (layout, causal))
    assert run.check["passed"] and 0 < run.check["rel_err"] < run.check["tol"]
    p = nranks
    for name in ("compute_s", "comm_s", "step_s"):
        assert run.samples[name].shape == (2, p, p)
        assert run.samples["warmup_" + name].shape == (1, p, p)
    assert run.samples["total_s"].shape == (2, p)
    assert run.samples["comm_only_s"].shape == ((2 if p > 1 else 0), p, p - 1)
    assert np.all(run.samples["step_s"] > 0)
    assert run.config["layout"] == layout and run.nranks == p
    assert run.summary["time_s"] > 0 and run.summary["tflops"] > 0
    assert run.summary["bytes_per_rank"] == (p - 1) * 2 * 1 * 48 * 2 * 16 * 4
    pairs = (48 * p) * (48 * p + 1) // 2 if causal == "--causal" else (48 * p) ** 2
    assert run.summary["unmasked_pairs"] == pairs
    assert len(run.provenance["rank_hosts"]) == p and run.provenance["mpi_library"].startswith("MPICH")
    assert len(run.memory["peak_rss_bytes"]) == p


@pytest.mark.parametrize("nranks", [2, 3])
@pytest.mark.parametrize("mode", ["blocking", "allgather"])
@pytest.mark.parametrize("extra", list(BASELINE_EXTRA))
def test_baseline_modes_are_correct(nranks, mode, extra, baseline_grid):
    run = baseline_grid.run(nranks, (mode, extra))
    assert run.check["passed"], run.check


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_dtypes_at_four_ranks(dtype, tmp_path):
    run = run_ok(4, tmp_path, "--seq-len", 128, "--dtype", dtype, "--causal", "--layout", "striped")
    assert run.check["passed"], run.check


@pytest.mark.parametrize("blas", ["numpy", "mkl"])
def test_blas_choice_is_correct_and_recorded(blas, tmp_path):
    from ringbench.kernels.mkl import MklMatmul

    if blas == "mkl" and MklMatmul.load() is None:
        pytest.skip("Intel MKL is not installed (pip install -e '.[mkl]')")
    run = run_ok(3, tmp_path, "--seq-len", 1536, "--blas", blas, "--causal", "--layout", "zigzag")
    assert run.check["passed"], run.check
    assert run.config["blas"] == blas
    assert run.provenance["blas"].startswith({"numpy": "numpy.matmul", "mkl": "Intel MKL"}[blas])


def test_modes_give_identical_outputs_and_tensors_reverify(tmp_path):
    outs = {}
    for mode in ("overlap", "blocking", "allgather"):
        for progress in ("test", "none") if mode == "overlap" else ("none",):
            path = tmp_path / f"{mode}-{progress}.h5"
            res = mpiexec(
                3,
                "run",
                *SMALL,
                "--seq-len",
                120,
                "--causal",
                "--layout",
                "zigzag",
                "--kv-heads",
                2,
                "--mode",
                mode,
                "--progress",
                progress,
                "--save-tensors",
                "--out",
                path,
                env={"RINGBENCH_EXP": "2"},  # one exponential for every run (auto measures per run; bitwise needs one)
            )
            assert res.returncode == 0, res.stderr
            (run,) = store.read(path, tensors=True)
            outs[(mode, progress)] = run.tensors
    base = outs[("overlap", "test")]
    for key, t in outs.items():
        np.testing.assert_array_equal(t["out"], base["out"], err_msg=str(key))  # bitwise identical
    # anyone can re-verify from the stored global tensors (global token order)
    ref = reference.reference_attention(base["q"], base["k"], base["v"], causal=True)
    assert np.abs(base["out"] - ref).max() / np.abs(ref).max() < 1e-5
    assert base["q"].shape == (1, 120, 4, 16) and base["k"].shape == (1, 120, 2, 16)


def test_summary_printed_by_rank_zero_only(tmp_path):
    res = mpiexec(2, "run", "--seq-len", 64, "--heads", 2, "--head-dim", 8, "--repeat", 1, "--check")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ringbench run:") == 1
    assert "check vs float64" in res.stdout and "ok" in res.stdout


def test_appending_runs_to_one_file(tmp_path):
    out = tmp_path / "r.h5"
    for n in (64, 128, 64):
        assert mpiexec(2, "run", *SMALL, "--seq-len", n, "--out", out).returncode == 0
    names = [r.name for r in store.read(out)]
    assert len(names) == 3 and names[2] == names[0] + "~2"


def test_console_script_gives_each_rank_one_blas_thread_and_keeps_a_user_setting(tmp_path):
    """`ringbench run` (the installed script, not only python -m) limits every BLAS pool of every rank to one
    thread by default, and to the number a user set (OPENBLAS_NUM_THREADS=2) otherwise."""
    import subprocess
    import sys
    from pathlib import Path

    from ringbench.engine.backend import THREAD_VARS

    from conftest import MPIEXEC, child_env

    script = Path(sys.executable).parent / "ringbench"
    if not script.exists():
        pytest.skip(f"{script} not installed (pip install -e .)")
    for user, want in [({}, (1, "default")), ({"OPENBLAS_NUM_THREADS": "2"}, (2, "OPENBLAS_NUM_THREADS"))]:
        out = tmp_path / f"r{want[0]}.h5"
        env = {k: v for k, v in child_env().items() if k not in THREAD_VARS} | user
        res = subprocess.run(
            [str(MPIEXEC), "-n", "2", str(script), "run", *map(str, SMALL), "--seq-len", "64", "--out", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        (run,) = store.read(out)
        threads = run.provenance["threads"]
        assert (threads["limit"], threads["set_by"]) == want
        assert len(threads["ranks"]) == 2
        for pools in threads["ranks"]:  # what threadpoolctl saw on each rank after the limit
            assert any(p["user_api"] == "blas" for p in pools)
            assert all(p["num_threads"] == want[0] for p in pools)


@pytest.mark.parametrize("extra", [["--heads", 1], ["--heads", 2, "--kv-heads", 2, "--seq-len", 2]])
def test_one_query_head_per_group_is_checked_and_saved_unscaled(extra, tmp_path):
    """With G = 1 (or one token per rank) the query layout change is a view of q: the ring must not scale it in place."""
    from ringbench.harness import inputs

    out = tmp_path / "r.h5"
    res = mpiexec(2, "run", "--seq-len", 64, "--head-dim", 64, "--repeat", 1, "--check", "--save-tensors", "--out", out, *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = store.read(out, tensors=True)
    assert run.check["passed"], run.check
    cfg = run.config
    q = inputs.tokens("q", 0, np.arange(cfg["seq_len"]), batch=1, seq_len=cfg["seq_len"], heads=cfg["heads"], head_dim=64)
    np.testing.assert_array_equal(run.tensors["q"], q.astype(np.float32))


@pytest.mark.parametrize(
    "args",
    [
        ["--batch", 64, "--seq-len", 256, "--heads", 8, "--head-dim", 128],  # the ring's own arrays dominate
        # ulysses' backward: all-to-all buffers, the group's K/V (kv heads replicated), what the forward keeps
        ["--batch", 64, "--seq-len", 256, "--heads", 8, "--kv-heads", 1, "--head-dim", 128, "--mode", "ulysses", "--pass", "fwd+bwd"],
        ["--seq-len", 4096, "--heads", 4, "--head-dim", 64, "--causal", "--check"],  # --check's reference dominates
        # the float64 reference gradients dominate: K, V, dK, dV repeated to every query head (GQA 4/1)
        ["--seq-len", 2048, "--heads", 4, "--kv-heads", 1, "--head-dim", 64, "--pass", "bwd", "--check"],
        [
            "--seq-len",
            1024,
            "--heads",
            4,
            "--kv-heads",
            1,
            "--head-dim",
            64,
            "--dtype",
            "bfloat16",
            "--mode",
            "allgather",
            "--save-tensors",
        ],
    ],
)
@pytest.mark.parametrize("exp", ["auto", pytest.param("fused", marks=pytest.mark.slow)])
def test_memory_estimate_covers_the_measured_peak(args, exp, tmp_path):
    """The estimate that refuses problems is not below what a real run uses (peak RSS above the baseline), whichever
    exponential the ranks use: with fused (what auto picks on some CPUs, e.g. with AVX-512, or under load), numba's
    compiled pass must be loaded on every rank before the baseline, not by the ring after it (+50 MB on rank 1)."""
    from ringbench.config import RunConfig
    from ringbench.engine.backend import get_backend
    from ringbench.harness.memory import memory_estimate
    from ringbench.kernels.kernel import fused_module
    from ringbench.kernels.mkl import MklMatmul

    if exp == "fused" and fused_module() is None:
        pytest.skip("numba is not installed (pip install -e '.[numba]')")
    out = tmp_path / "r.h5"
    res = mpiexec(2, "run", *args, "--repeat", 1, "--warmup", 0, "--quiet", "--out", out, env={"RINGBENCH_EXP": exp})
    assert res.returncode == 0, res.stderr
    (run,) = store.read(out)
    cfg = RunConfig.from_dict(run.config)
    backend = get_backend("numpy")
    mkl = isinstance(backend.matmul(cfg.blas)[0], MklMatmul)
    used = run.memory["peak_rss_bytes"] - run.memory["baseline_rss_bytes"]
    for rank in range(2):
        est, device = memory_estimate(cfg, 2, rank, backend, mkl)
        assert device == 0
        assert est >= 0.85 * used[rank], (rank, est, used)
        assert est <= 2 * used[rank] + 64 * 2**20, (rank, est, used)  # and not so loose that it refuses what fits


def test_a_run_records_its_conditions_and_a_calibration_from_runs_keeps_them(tmp_path):
    """Each run records how busy its hosts were while its passes were timed and the spread of each phase's pass
    time over the repeats (provenance "conditions"); a calibration fitted to runs carries them for the warnings."""
    from ringbench import provenance
    from ringbench.analysis import model

    out = tmp_path / "r.h5"
    res = mpiexec(2, "run", *SMALL[:-1], "--seq-len", 64, "--pass", "fwd+bwd", "--out", out)  # not --quiet
    assert res.returncode == 0, res.stderr
    (run,) = store.read(out)
    cond = run.provenance["conditions"]
    (host,) = cond["hosts"].values()
    assert host["ranks"] == 2 and host["seconds"] > 0 and host["own_cpus"] > 0 and len(host["load_end"]) == 4
    assert set(cond["spread"]) == {"fwd", "bwd"}
    assert model.calibrate_from_runs([run]).conditions == [cond]
    assert ("warning: measured on a loaded machine" in res.stdout) == (provenance.loaded(cond) is not None)
