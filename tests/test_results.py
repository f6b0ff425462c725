"""Rows, CSV, DataFrame and the terminal report, from a real result file; schema-version refusal."""

from __future__ import annotations

import csv

import h5py
import pytest

from ringbench import results, store

from conftest import ringbench

pytestmark = pytest.mark.mpi  # the small_results fixture launches mpiexec


def test_rows_one_per_run_with_expected_values(small_results):
    rows = results.rows(results.load(small_results))
    assert len(rows) == 6
    assert set(rows[0]) == set(results.COLUMNS)
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


def test_csv_and_dataframe(small_results, tmp_path):
    runs = results.load(small_results)
    out = tmp_path / "runs.csv"
    results.to_csv(results.rows(runs), out)
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and list(table[0]) == list(results.COLUMNS)
    assert {t["mode"] for t in table} == {"overlap", "blocking", "allgather"}
    df = results.dataframe(small_results)
    assert df.shape == (6, len(results.COLUMNS))
    assert sorted(df["nranks"]) == [1, 2, 2, 2, 4, 4]
    assert (df.groupby("mode").size().to_dict()) == {"allgather": 1, "blocking": 1, "overlap": 4}


def test_compare_modes_side_by_side(small_results):
    comp = results.compare_modes(results.rows(results.load(small_results)))
    assert len(comp) == 1  # only N=256, P=2 contiguous was run in several modes
    (d,) = comp
    assert d["nranks"] == 2 and {"time_overlap_s", "time_blocking_s", "time_allgather_s"} <= set(d)
    assert d["speedup_vs_blocking"] == pytest.approx(d["time_blocking_s"] / d["time_overlap_s"])
    assert d["speedup_vs_allgather"] == pytest.approx(d["time_allgather_s"] / d["time_overlap_s"])


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
        "vs blocking",
        "vs allgather",
        "calibration: fitted to the runs",
        "model error on 6 runs",
        "crossover",
        "P=16 ms",
    ):
        assert word in text, word
    assert sum(1 for line in text.splitlines() if line.startswith(("overlap ", "blocking ", "allgather "))) >= 6
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


@pytest.mark.parametrize("version", [0, 3])
@pytest.mark.parametrize("cmd", ["report", "plot"])
def test_other_schema_versions_are_refused(tmp_path, cmd, version):
    path = _old_file(tmp_path / "old.h5", version)
    args = [cmd, path] + (["-o", tmp_path / "figs"] if cmd == "plot" else [])
    res = ringbench(*args)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"ringbench {cmd}: {path}: result schema version {version} is not supported; this ringbench reads versions 1 and 2"
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
