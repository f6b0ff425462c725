"""Bad paths given to report and plot: one line on stderr naming the option, exit status 2, nothing written."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import ringbench

ROOT_USER = os.geteuid() == 0
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")


def one_line(res, prog: str) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"ringbench {prog}: ")
    return line[len(f"ringbench {prog}: ") :]


@pytest.mark.parametrize("cmd", ["report", "plot"])
def test_a_directory_as_result_file_is_named_a_directory(tmp_path, cmd):
    args = [cmd, tmp_path] + (["-o", tmp_path / "figs"] if cmd == "plot" else [])
    assert one_line(ringbench(*args), cmd) == f"FILE: {tmp_path}: is a directory, not a result file"


@pytest.mark.mpi
def test_report_csv_onto_a_directory(tmp_path, small_results):
    assert one_line(ringbench("report", small_results, "--csv", tmp_path), "report") == f"--csv: {tmp_path} is a directory"


@pytest.mark.mpi
def test_report_csv_under_a_regular_file(tmp_path, small_results):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "r.csv"
    msg = one_line(ringbench("report", small_results, "--csv", out), "report")
    assert msg == f"--csv: {tmp_path / 'file'}: {tmp_path / 'file'} exists and is not a directory"


@pytest.mark.skipif(ROOT_USER, reason="root writes anywhere")
@pytest.mark.mpi
def test_report_csv_into_an_unwritable_directory(tmp_path, small_results):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    msg = one_line(ringbench("report", small_results, "--csv", ro / "r.csv"), "report")
    assert msg == f"--csv: {ro}: directory {ro} is not writable"


@pytest.mark.mpi
def test_report_csv_is_written_whole(tmp_path, small_results):
    out = tmp_path / "r.csv"
    res = ringbench("report", small_results, "--csv", out)
    assert res.returncode == 0, res.stderr
    assert out.read_text().count("\n") == 7  # header + 6 runs
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temporary file left


@needs_matplotlib
@pytest.mark.parametrize("where", ["file", "file/figs", "file/a/b"])
@pytest.mark.mpi
def test_plot_out_dir_at_or_under_a_regular_file(tmp_path, small_results, where):
    (tmp_path / "file").write_text("x")
    msg = one_line(ringbench("plot", small_results, "-o", tmp_path / where), "plot")
    assert msg == f"--out-dir: {tmp_path / where}: {tmp_path / 'file'} exists and is not a directory"
    assert (tmp_path / "file").read_text() == "x"


@needs_matplotlib
@pytest.mark.skipif(ROOT_USER, reason="root writes anywhere")
@pytest.mark.mpi
def test_plot_out_dir_unwritable(tmp_path, small_results):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    msg = one_line(ringbench("plot", small_results, "-o", ro / "figs"), "plot")
    assert msg == f"--out-dir: {ro / 'figs'}: directory {ro} is not writable"
