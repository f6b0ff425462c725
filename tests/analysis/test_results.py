"""Rows, CSV, DataFrame and the terminal report, from a real result file; schema-version refusal."""

from __future__ import annotations

import csv
import re

import h5py
import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import measure, results

from conftest import ringbench

pytestmark = pytest.mark.mpi  # the small_results fixture launches mpiexec


def test_rows_one_per_run_with_expected_values(small_results):
    rows = results.rows(results.load(small_results))
    assert len(rows) == 6
    assert set(rows[0]) == set(results.COLUMNS) | set(results.REPEAT_KEYS)
    got = sorted((r["mode"], r["layout"], r["causal"], r["nranks"]) for r in rows)
    assert got == [
        ("allgather", "contiguous", False, 2),
        ("blocking", "contiguous", False, 2),
        ("overlap", "contiguous", False, 1),
        ("overlap", "contiguous", False, 2),
        ("overlap", "striped", True, 4),
        ("overlap", "zigzag", True, 4),
    ]
    for r in rows:
        assert r["status"] == "ok" and r["seq_len"] == 256 and r["tokens_per_rank"] == 256 // r["nranks"]
        assert r["time_s"] > 0 and r["tflops"] > 0 and r["check_passed"] is True
        assert r["block_bytes"] == 2 * (256 // r["nranks"]) * 2 * 16 * 4  # B n H_kv D float32
        assert r["host"] and r["backend_device"].startswith("numpy") and "MPICH" in r["mpi_library"]


def test_rows_carry_the_spread_of_each_time(small_results):
    runs = results.load(small_results)
    for run, r in zip(runs, results.rows(runs)):
        reps = run.samples["total_s"].max(axis=1)  # the slowest rank's pass, per repeat
        assert r["time_repeats_s"] == tuple(reps) and len(r["compute_repeats_s"]) == len(r["exposed_comm_repeats_s"]) == 3
        assert r["time_s"] == pytest.approx(np.median(reps))
        assert reps.min() <= r["time_ci_lo_s"] <= r["time_s"] <= r["time_ci_hi_s"] <= reps.max()
        assert r["time_ci_rel"] == pytest.approx((r["time_ci_hi_s"] - r["time_ci_lo_s"]) / 2 / r["time_s"])
        assert r["compute_ci_lo_s"] <= r["compute_s"] <= r["compute_ci_hi_s"]
        assert r["exposed_comm_ci_lo_s"] <= r["exposed_comm_s"] <= r["exposed_comm_ci_hi_s"]
    # summaries are computed from samples: a run read without them has no spread, and nothing breaks
    bare = results.rows(store.read(small_results, samples=False))
    assert all(r["time_ci_lo_s"] is None and r["time_repeats_s"] == () and r["time_s"] > 0 for r in bare)
    assert all(d["verdict"] == measure.TOO_FEW for d in results.compare_modes(bare))


def test_csv_and_dataframe(small_results, tmp_path):
    runs = results.load(small_results)
    out = tmp_path / "runs.csv"
    results.to_csv(results.rows(runs), out)
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and list(table[0]) == list(results.COLUMNS)
    assert {t["mode"] for t in table} == {"overlap", "blocking", "allgather"}
    for col in ("time_ci_lo_s", "time_ci_hi_s", "time_ci_rel", "compute_ci_lo_s", "exposed_comm_ci_hi_s"):
        assert col in results.SPREAD_COLUMNS and col in table[0]
    for t in table:
        assert float(t["time_ci_lo_s"]) <= float(t["time_s"]) <= float(t["time_ci_hi_s"]) and float(t["time_ci_rel"]) >= 0
    df = results.dataframe(small_results)
    assert df.shape == (6, len(results.COLUMNS) + len(results.REPEAT_KEYS))
    assert (df.time_ci_lo_s <= df.time_s).all() and df.time_repeats_s.map(len).tolist() == [3] * 6
    assert sorted(df["nranks"]) == [1, 2, 2, 2, 4, 4]
    assert (df.groupby("mode").size().to_dict()) == {"allgather": 1, "blocking": 1, "overlap": 4}


def test_compare_modes_pair_by_pair_with_interval_and_verdict(small_results):
    rows = results.rows(results.load(small_results))
    comp = results.compare_modes(rows)
    # only N=256, P=2 contiguous was run in several modes: every pair of its three modes, in config.MODES order
    assert [(d["mode"], d["other"]) for d in comp] == [("overlap", "blocking"), ("overlap", "allgather"), ("blocking", "allgather")]
    by_mode = {r["mode"]: r for r in rows if r["nranks"] == 2}
    for d in comp:
        assert d["nranks"] == 2 and d["seq_len"] == 256 and d["repeats"] == d["repeats_other"] == 3
        assert d["time_s"] == pytest.approx(by_mode[d["mode"]]["time_s"])
        assert d["speedup"] == pytest.approx(by_mode[d["other"]]["time_s"] / by_mode[d["mode"]]["time_s"])
        assert d["speedup_ci_lo"] <= d["speedup"] <= d["speedup_ci_hi"]
        assert d["verdict"] == (measure.SIGNIFICANT if d["speedup_ci_lo"] > 1 or d["speedup_ci_hi"] < 1 else measure.NOT_SIGNIFICANT)


def _row(mode, times, **cfg):
    base = dict.fromkeys(results.COMPARE_KEY, 1) | {"status": "ok", "mode": mode}
    return base | cfg | {"time_s": float(np.median(times)), "time_repeats_s": tuple(times)}


def test_compare_modes_is_generic_over_mode_names():
    """Any modes (new strategies) are compared; a clear difference is significant, noise is not."""
    rng = np.random.default_rng(0)
    table = [
        _row("overlap", 0.100 * rng.lognormal(0, 0.01, 5)),
        _row("ulysses", 0.150 * rng.lognormal(0, 0.01, 5)),
        _row("hybrid", 0.100 * rng.lognormal(0, 0.01, 5), ulysses_degree=2),
        _row("hybrid", 0.300 * rng.lognormal(0, 0.01, 5), ulysses_degree=4),  # another strategy: not pooled with U=2
        _row("overlap", [0.2, 0.2, 0.2], seq_len=2),  # another configuration, one mode only: nothing to compare
    ]
    comp = results.compare_modes(table)
    assert [(d["mode"], d["other"]) for d in comp] == [
        ("overlap", "ulysses"),
        ("overlap", "hybrid U=2"),
        ("overlap", "hybrid U=4"),
        ("ulysses", "hybrid U=2"),
        ("ulysses", "hybrid U=4"),
        ("hybrid U=2", "hybrid U=4"),
    ]  # config.MODES order, hybrid by degree
    verdict = {(d["mode"], d["other"]): d for d in comp}
    assert verdict["overlap", "ulysses"]["verdict"] == measure.SIGNIFICANT
    assert verdict["overlap", "ulysses"]["speedup"] == pytest.approx(1.5, rel=0.05)
    assert verdict["ulysses", "hybrid U=2"]["verdict"] == measure.SIGNIFICANT
    assert verdict["overlap", "hybrid U=2"]["verdict"] == measure.NOT_SIGNIFICANT
    assert verdict["hybrid U=2", "hybrid U=4"]["speedup"] == pytest.approx(3.0, rel=0.05)
    assert verdict["hybrid U=2", "hybrid U=4"]["repeats"] == 5 == verdict["hybrid U=2", "hybrid U=4"]["repeats_other"]
    # repeated runs of one mode pool their repeats; below MIN_REPEATS there is no verdict
    comp = results.compare_modes([_row("overlap", [0.1, 0.1]), _row("blocking", [0.2, 0.2]), _row("blocking", [0.2])])
    assert [(d["repeats"], d["repeats_other"], d["verdict"]) for d in comp] == [(2, 3, measure.TOO_FEW)]
    assert comp[0]["speedup_ci_lo"] is None and comp[0]["speedup"] == pytest.approx(2.0)


def test_compare_modes_keeps_kernels_and_gemm_libraries_apart():
    """A native overlap run and a torch blocking run of one configuration are not compared (nor numpy vs mkl GEMMs)."""
    table = [_row("overlap", [0.1] * 5, kernel="native", blas="auto"), _row("blocking", [0.2] * 5, kernel="torch", blas="auto")]
    assert results.compare_modes(table) == []
    table = [_row("overlap", [0.1] * 5, kernel="native", blas="mkl"), _row("blocking", [0.2] * 5, kernel="native", blas="numpy")]
    assert results.compare_modes(table) == []
    table = [_row("overlap", [0.1] * 5, kernel="torch", blas="auto"), _row("blocking", [0.2] * 5, kernel="torch", blas="auto")]
    assert [(d["mode"], d["other"], d["kernel"]) for d in results.compare_modes(table)] == [("overlap", "blocking", "torch")]


def test_rows_of_runs_without_kernel_or_blas_are_native_and_auto():
    """Version-1 runs (and runs from before `kernel` / `blas`) lack the keys: they ran the native kernel."""
    run = store.Run(point_id="p", nranks=2, config={"mode": "overlap", "seq_len": 64}, provenance={})
    r = results.row(run)
    assert (r["kernel"], r["blas"]) == ("native", "auto")
    assert set(results.CONFIG_COLUMNS) >= {"kernel", "blas"}


def test_report_command(small_results, tmp_path):
    out = tmp_path / "r.csv"
    res = ringbench("report", small_results, "--csv", out, "--predict-ranks", "8,16")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "6 runs from 1 file(s)" in text
    for word in (
        "allgather",
        "blocking",
        "zigzag causal",
        "striped causal",
        "TFLOP/s",
        "GB/s",
        "overlap",
        "rel err",
        "model err",
        "overlap vs blocking",
        "overlap vs allgather",
        "blocking vs allgather",
        "95% bootstrap confidence interval",
        "significant when the interval excludes 1",
        "calibration: fitted to the runs",
        "model error on 6 runs",
        "crossover",
        "P=16 ms",
    ):
        assert word in text, word
    assert sum(1 for line in text.splitlines() if line.startswith(("overlap ", "blocking ", "allgather "))) >= 6
    # every time carries its spread; the mode comparison its interval and verdict
    assert len(re.findall(r" \d+\.\d\d ±\d+\.\d%", text)) >= 6 + 2 * 3
    comp = [line for line in text.splitlines() if line.startswith("overlap vs blocking")]
    assert len(comp) == 1
    assert re.search(r"\d+\.\d\dx \[\d+\.\d\d, \d+\.\d\d\]  +(significant: (overlap|blocking) faster|not significant \(noise\))$", comp[0])
    assert "wrote 6 rows" in text and out.exists()


def test_report_without_model(small_results):
    res = ringbench("report", small_results, "--no-model")
    assert res.returncode == 0 and "calibration" not in res.stdout


def _old_file(path, version):
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "ringbench-results"
        f.attrs["schema_version"] = version
        f.create_group("runs")
    return path


@pytest.mark.parametrize("version", [0, 6])
@pytest.mark.parametrize("cmd", ["report", "plot"])
def test_other_schema_versions_are_refused(tmp_path, cmd, version):
    path = _old_file(tmp_path / "old.h5", version)
    args = [cmd, path] + (["-o", tmp_path / "figs"] if cmd == "plot" else [])
    res = ringbench(*args)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"ringbench {cmd}: {path}: result schema version {version} is not supported; this ringbench reads versions 1, 2, 3, 4 and 5"
    )
    assert not (tmp_path / "figs").exists()


def test_not_a_result_file_and_missing_file(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1])
    res = ringbench("report", other)
    assert res.returncode == 2 and "not a ringbench result file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = ringbench("report", tmp_path / "nope.h5")
    assert res.returncode == 2 and res.stderr.strip() == f"ringbench report: FILE: {tmp_path / 'nope.h5'}: no such file"
    text = tmp_path / "t.h5"
    text.write_text("hello")
    res = ringbench("report", text)
    assert res.returncode == 2 and "not an HDF5 file" in res.stderr


def test_reading_old_schema_from_python_raises_schema_error(tmp_path):
    path = _old_file(tmp_path / "old.h5", 0)
    with pytest.raises(store.SchemaError, match="result schema version 0 is not supported"):
        results.load(path)


def test_failed_runs_are_listed_and_skipped_by_model_and_plots(small_results, tmp_path):
    import shutil

    path = tmp_path / "with_failed.h5"
    shutil.copyfile(small_results, path)
    cfg = dict(results.load(small_results)[0].config)
    store.append(path, store.Run(point_id="broken", nranks=2, config=cfg, provenance={}, status="failed", error="rank 1 ran out of memory"))
    rows = results.rows(results.load(path))
    assert [r["status"] for r in rows].count("failed") == 1
    res = ringbench("report", path)
    assert res.returncode == 0, res.stderr
    assert "failed: rank 1 ran out of memory" in res.stdout and "model error on 6 runs" in res.stdout
    res = ringbench("plot", path, "-o", tmp_path / "figs", "--only", "strong,breakdown,model")
    assert res.returncode == 0, res.stderr


def _failed_check(run, rel_err: float = 1.7):
    """``run`` as stored when its forward --check failed: the same timings, a rel err far above the tolerance."""
    import copy

    out = copy.deepcopy(run)
    out.check = dict(out.check, max_abs_err=rel_err, rel_err=rel_err, passed=False)
    return out


def test_a_failed_check_is_marked_in_the_report_and_left_out_of_the_fit(small_results, tmp_path):
    """A run whose --check failed ran (status ok) but computed wrong numbers: FAILED in the report's runs table, and
    the model's calibration is fitted without it and says so (report and plot print the calibration's notes)."""
    runs = results.load(small_results)
    i = next(i for i, r in enumerate(runs) if r.nranks == 2 and r.config["mode"] == "overlap")
    bad = _failed_check(runs[i])
    for k in ("compute_s", "total_s"):  # 10x slower compute: a fit that used it would have another P=2 rate
        bad.samples[k] = bad.samples[k] * 10
    path = tmp_path / "bad.h5"
    for r in runs[:i] + [bad] + runs[i + 1 :]:
        store.append(path, r)
    stored = results.load(path)
    (failed,) = [r for r in stored if not r.check["passed"]]
    assert store.check_failure(failed) == "check failed: out rel err 1.7 (tol 2e-05)"
    assert all(store.check_failure(r) is None for r in stored if r is not failed)

    from ringbench.analysis import model

    cal = model.calibrate_from_runs(stored)
    good = model.calibrate_from_runs([r for r in stored if r is not failed])
    assert cal.rates == good.rates and cal.links == good.links
    assert cal.notes == [f"1 run(s) left out of the fit: their --check failed ({path}:/runs/{failed.name})"]

    res = ringbench("report", path)
    assert res.returncode == 0, res.stderr
    marked = [ln for ln in res.stdout.splitlines() if ln.endswith("FAILED") or " FAILED " in ln]
    assert len(marked) == 1 and marked[0].startswith("overlap") and "1.7e+00 FAILED" in marked[0]
    assert "1 timed phase(s) failed --check" in res.stdout
    assert "note: 1 run(s) left out of the fit: their --check failed" in res.stdout


def test_check_failure_names_the_worst_gradient():
    bwd = {"dq_rel_err": 1.37, "dk_rel_err": 0.276, "dv_rel_err": 3e-7, "rel_err": 1.37, "tol": 2e-5, "passed": False}
    run = store.Run(point_id="p", nranks=2, config={"pass": "bwd"}, provenance={}, bwd=store.Phase(summary={"time_s": 1.0}, check=bwd))
    assert store.check_failure(run) == "check failed: dq rel err 1.37 (tol 2e-05)"
    run.bwd.check = dict(bwd, dq_rel_err=float("nan"))  # non-finite values: the nan is the worst
    assert store.check_failure(run) == "check failed: dq rel err nan (tol 2e-05)"
    run.bwd.check = dict(bwd, dq_rel_err=1e-6, dk_rel_err=1e-6, rel_err=1e-6)  # within the tolerance, yet failed: inf/nan
    assert store.check_failure(run) == "check failed: dq rel err 1e-06 (tol 2e-05); non-finite values in the gradients"
    run.bwd.check = dict(bwd, passed=True)
    assert store.check_failure(run) is None


def test_report_header_counts_runs_not_their_phases(small_results):
    """One fwd+bwd run is one run with two timed phases (two rows): the header says so."""
    from ringbench.analysis import report

    run = next(r for r in results.load(small_results) if r.nranks == 1)
    run.config["pass"] = "fwd+bwd"
    run.bwd = store.Phase(samples=dict(run.samples), summary=dict(run.summary), check=dict(run.check))
    assert len(results.rows([run])) == 2
    assert report.format_report([run], None).startswith("1 run (2 timed phases) from 1 file(s); hosts ")


def test_report_shows_the_runs_across_nodes():
    from ringbench import store
    from ringbench.analysis import report
    from ringbench.harness import nodes

    node_of = [0, 0, 1, 1]
    sent = {"fwd": [{(i + 1) % 4: 2**20} for i in range(4)]}
    rec = nodes.node_record(node_of, ["n1", "n2"], [0, 1, 2, 3], "overlap", 1, sent)
    run = store.Run(point_id="p", nranks=4, config={"mode": "overlap", "seq_len": 64}, provenance={"nodes": rec})
    text = report.nodes_table([run])
    assert text.startswith("across nodes:") and "2 (2/2)" in text and "2 of 4" in text and "1.00" in text
    one = store.Run(point_id="q", nranks=2, config={"mode": "overlap"}, provenance={})
    assert report.nodes_table([one]) is None


def test_report_tables_each_steps_hidden_share_and_slower_rank_wait_beside_the_model():
    """A synthetic balanced backward at P = 2: step 0 hid 90% of its 10 ms transfer, step 1 waited 30 ms for the
    other rank; the report's split table shows both, and the model's prediction for a balanced layout (no wait)."""
    from ringbench.analysis import model, report
    from ringbench.config import RunConfig

    R, P = 3, 2
    samples = {
        "total_s": np.full((R, P), 1.0),
        "compute_s": np.full((R, P, P), 0.5),
        "comm_s": np.tile([[0.001, 0.032]], (R, P, 1)),
        "comm_only_s": np.tile([[0.010, 0.020]], (R, P, 1)),
        "partner_wait_s": np.tile([[0.0, 0.030]], (R, P, 1)),
        "unhidden_s": np.tile([[0.001, 0.002]], (R, P, 1)),
    }
    cfg = RunConfig(seq_len=256, heads=2, head_dim=8, pass_="bwd").to_dict()
    run = store.Run(point_id="p", nranks=P, config=cfg, provenance={}, bwd=store.Phase(samples=samples, summary={"time_s": 1.0}))
    cal = model.Calibration.simple(rate=1e10, latency=1e-6, bandwidth=1e9, bwd_rate=1e10)
    text = report.split_text([run], cal)
    assert "slower-rank wait" in text and "not hidden" in text
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] in (["p"], ["1"])]
    assert rows[0][:6] == ["p", "bwd", "0", "10.00", "90%", "1.00"] and rows[0][7] == "0.00"
    assert rows[1][:4] == ["1", "20.00", "90%", "2.00"] and rows[1][5] == "30.00"
    assert report.split_text([store.Run(point_id="q", nranks=P, config=cfg, provenance={}, bwd=store.Phase(samples={}))], cal) is None
