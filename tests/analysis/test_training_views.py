"""The backward in the analysis views: phases side by side (results, report), figures per phase, from synthetic
rows and from a real result file with fwd, bwd and fwd+bwd runs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import measure, model, report, results

from conftest import append_runs, ringbench


def _row(phase, times, name="a", mode="overlap", **cfg):
    base = dict.fromkeys(results.PHASE_KEY, 1) | {"status": "ok", "mode": mode, "file": "f.h5", "name": name, "phase": phase}
    return base | cfg | {"time_s": float(np.median(times)), "time_repeats_s": tuple(times)}


def test_phase_pairs_sum_the_repeats_of_one_run():
    fwd, bwd = [1.0, 1.1, 0.9, 1.0, 1.2], [2.0, 2.4, 2.1, 2.2, 2.0]
    (d,) = results.phase_pairs([_row("fwd", fwd), _row("bwd", bwd)])
    assert d["same_run"] and d["fwd"]["time_s"] == 1.0 and d["bwd"]["time_s"] == 2.1
    sums = np.add(fwd, bwd)
    med, lo, hi = measure.median_ci(sums)
    assert d["total_s"] == med == pytest.approx(3.2)
    assert (d["total_ci_lo_s"], d["total_ci_hi_s"]) == (lo, hi) and d["total_ci_rel"] > 0


def test_phase_pairs_match_separate_runs_without_an_interval():
    rows = [_row("fwd", [1.0, 1.0, 1.0], name="f"), _row("bwd", [3.0, 3.0, 3.0], name="b"), _row("fwd", [5.0] * 3, seq_len=2)]
    (d,) = results.phase_pairs(rows)  # the N=2 configuration has no backward: not paired
    assert not d["same_run"] and d["total_s"] == 4.0 and d["total_ci_rel"] is None


def test_phases_table_shows_both_phases_and_the_model():
    cal = model.Calibration.simple(rate=1e3, latency=0.1, bandwidth=1e3, bwd_rate=1e3)
    cfg = dict(layout="contiguous", causal=False, dtype="float32", seq_len=12, nranks=3, batch=1, heads=1, kv_heads=1, head_dim=1)
    extra = dict(tflops=1.0, overlap_eff=0.5, exposed_comm_s=0.001, bytes_per_rank=2048, backend="numpy")
    rows = [_row("fwd", [0.3] * 3, **cfg, **extra), _row("bwd", [0.6] * 3, **cfg, **extra)]
    shape = model.Shape(nranks=3, seq_len=12, heads=1, kv_heads=1, head_dim=1)
    preds = {("f.h5", "a", ph): model.predict(shape.with_(pass_=ph), cal) for ph in ("fwd", "bwd")}
    text = report.phases_table(rows, preds)
    line = text.splitlines()[2]
    assert "0.5 ms" not in line and "300.00" in line and "600.00" in line and "2.00x" in line and "900.00" in line
    assert "50% / 50%" in line and "2 / 2" in line  # overlap and KiB per rank, forward / backward
    total = preds["f.h5", "a", "fwd"].time_s + preds["f.h5", "a", "bwd"].time_s
    assert f"{total * 1e3:.2f}" in line and "Backward FLOPs = 2.5 x forward" in text
    assert "no configuration has both" in report.phases_table(rows[:1], None)


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    """fwd+bwd at P=1 and 2 (N=256), overlap and blocking at two block sizes, matched fwd and bwd runs, a probe."""
    path = tmp_path_factory.mktemp("training") / "t.h5"
    common = ["--heads", 2, "--head-dim", 16, "--repeat", 3, "--quiet", "--out", path]
    runs = []
    for p, extra in [
        (1, ["--pass", "fwd+bwd", "--seq-len", 256]),
        (2, ["--pass", "fwd+bwd", "--seq-len", 256]),
        (2, ["--pass", "fwd+bwd", "--seq-len", 512]),
        (2, ["--pass", "fwd+bwd", "--seq-len", 256, "--mode", "blocking"]),
        (2, ["--pass", "fwd+bwd", "--seq-len", 512, "--mode", "blocking"]),
        (2, ["--pass", "fwd", "--seq-len", 256, "--causal", "--layout", "zigzag"]),
        (2, ["--pass", "bwd", "--seq-len", 256, "--causal", "--layout", "zigzag"]),
    ]:
        runs.append((p, [*common, *extra]))
    append_runs(runs)
    return path


@pytest.mark.mpi
def test_report_puts_the_phases_side_by_side_with_the_model(training_file):
    res = ringbench("report", training_file, "--predict-ranks", "4")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    side = text.split("forward and backward side by side")[1].split("exposed communication step by step")[0]
    assert len([ln for ln in side.splitlines() if ln.startswith(("overlap", "blocking"))]) == 6
    assert "overlap *  zigzag causal" in side  # matched separate runs
    assert "backward compute rate at P=2" in text and "by phase and mode: fwd: " in text and "; bwd: " in text
    body = text.split("\n\n")[1].splitlines()
    bwd_lines = [ln for ln in body if "(bwd)" in ln]
    assert len(bwd_lines) == 6 and all(ln.split()[-1].endswith("%") for ln in bwd_lines)  # model err for the backward
    cross = text.split("crossover:")[1]
    assert " bwd " in cross and " fwd " in cross
    assert re.search(r"^blocking +bwd +contiguous", text.split("predicted pass time")[1], re.M)


@pytest.mark.mpi
def test_plots_render_per_phase(training_file, tmp_path):
    plot = pytest.importorskip("ringbench.analysis.plot")
    runs = results.load(training_file)
    cal = model.calibrate_from_runs(runs)
    assert cal.has_phase("bwd")
    fig = plot.timeline(runs, phase="bwd")
    assert fig._suptitle.get_text().startswith("Backward timeline") and len(fig.axes) >= 2
    plot.plt.close(fig)
    fig = plot.overlap(runs, cal, "bwd")
    assert fig._suptitle.get_text().startswith("Backward: overlap vs block size")
    assert any("model crossover" in t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
    plot.plt.close(fig)
    fig = plot.breakdown(runs)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sum(" bwd " in lb for lb in labels) == 6 and sum(" fwd " in lb for lb in labels) == 6
    plot.plt.close(fig)
    fig = plot.strong_fwd_bwd(runs)
    ax = fig.axes[0]
    assert "fwd + bwd time" in ax.get_ylabel()
    # the P=1 and P=2 totals are the medians of the per-repeat sums of the fwd+bwd runs
    rows = [r for r in results.rows(runs) if r["seq_len"] == 256 and r["mode"] == "overlap" and not r["causal"]]
    want = {}
    for p in (1, 2):
        f, b = (next(r for r in rows if r["nranks"] == p and r["phase"] == ph) for ph in ("fwd", "bwd"))
        want[p] = np.median(np.add(f["time_repeats_s"], b["time_repeats_s"])) * 1e3
    (cont,) = [c for c in ax.containers if c.get_label() == "overlap, contiguous"]
    assert list(cont.lines[0].get_ydata()) == pytest.approx([want[1], want[2]])
    plot.plt.close(fig)
    res = ringbench("plot", training_file, "-o", tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("timeline-bwd", "overlap-bwd", "strong-fwdbwd", "breakdown", "timeline"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000, name
    assert store.read(training_file)  # the file is untouched
