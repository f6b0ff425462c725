"""Strategies side by side: measured winners (significant margins only), the model's predicted winners against them,
the report's winner-agreement line and the strategy map figure."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest

from ringbench.analysis import measure, model, report, results

from conftest import append_runs, ringbench

BASE = dict(
    status="ok",
    phase="fwd",
    layout="zigzag",
    causal=True,
    dtype="float32",
    batch=1,
    heads=8,
    kv_heads=2,
    head_dim=64,
    backend="numpy",
    kernel="native",
    blas="auto",
    ulysses_degree=1,
)


def row(seq_len, nranks, mode, reps, u=1):
    return dict(
        BASE, seq_len=seq_len, nranks=nranks, mode=mode, ulysses_degree=u, time_s=float(np.median(reps)), time_repeats_s=tuple(reps)
    )


def reps(t, spread=0.01):
    return [t * (1 + spread * k) for k in (-2, -1, 0, 1, 2)]


def synthetic():
    """Three points with two or more strategies and one with a single strategy (not a point)."""
    return [
        row(1024, 2, "overlap", reps(1.0)),  # A: overlap wins clearly
        row(1024, 2, "ulysses", reps(2.0)),
        row(2048, 2, "overlap", reps(1.0, 0.2)),  # B: a tie within the noise
        row(2048, 2, "ulysses", reps(1.02, 0.2)),
        row(2048, 4, "hybrid", reps(3.0), u=2),  # C: pass-q wins; hybrid U=2 and U=4 are two strategies
        row(2048, 4, "hybrid", reps(2.0), u=4),
        row(2048, 4, "pass-q", reps(1.0)),
        row(4096, 2, "overlap", reps(1.0)),  # only one strategy: not a point
    ]


# predicted times: A right (overlap), C wrong (hybrid U=4)
PREDICTED = {
    (1024, 2, "overlap"): 1.1,
    (1024, 2, "ulysses"): 1.8,
    (2048, 2, "overlap"): 1.0,
    (2048, 2, "ulysses"): 1.5,
    (2048, 4, "hybrid U=2"): 3.0,
    (2048, 4, "hybrid U=4"): 0.5,
    (2048, 4, "pass-q"): 1.0,
}


def fake_predict(r):
    return PREDICTED[(r["seq_len"], r["nranks"], results.strategy_label(r))]


def test_points_and_winner_agreement_with_known_answers():
    points = results.strategy_points(synthetic())
    assert [(p["seq_len"], p["nranks"]) for p in points] == [(1024, 2), (2048, 2), (2048, 4)]
    a, b, c = points
    assert a["winner"] == "overlap" and a["verdict"] == measure.SIGNIFICANT and math.isclose(a["speedup"], 2.0)
    assert b["winner"] is None and b["verdict"] == measure.NOT_SIGNIFICANT and {b["best"], b["runner_up"]} == {"overlap", "ulysses"}
    assert set(c["times"]) == {"hybrid U=2", "hybrid U=4", "pass-q"}
    assert c["winner"] == "pass-q" and c["runner_up"] == "hybrid U=4"

    agreement = results.strategy_agreement(points, fake_predict)
    assert (agreement["decided"], agreement["agree"], agreement["ties"]) == (2, 1, 1)
    assert [p["agree"] for p in points] == [True, None, False]
    assert c["predicted_winner"] == "hybrid U=4"
    errors = [0.1, -0.1, 0.0, 1.5 / 1.02 - 1, 0.0, -0.75, 0.0]  # (predicted - measured) / measured, point by point
    assert sorted(agreement["errors"]) == pytest.approx(sorted(errors))
    assert agreement["median_abs_error"] == pytest.approx(float(np.median(np.abs(errors))))

    line = report.strategy_summary(agreement)
    assert "the predicted winner was the measured winner on 1 of 2 points (50%)" in line
    assert "(1 tie within the noise left out)" in line and "over 7 strategy times" in line


def test_unpredictable_strategy_is_left_out_of_the_winner():
    points = results.strategy_points(synthetic()[:2])
    agreement = results.strategy_agreement(points, lambda r: math.nan if r["mode"] == "overlap" else 1.0)
    assert points[0]["predicted_winner"] == "ulysses" and agreement["agree"] == 0 and len(agreement["errors"]) == 1


def test_no_points_no_report_section():
    assert report.strategy_text([row(1024, 2, "overlap", reps(1.0))], model.Calibration.simple(1e9, 0, 1e9)) is None
    assert results.strategy_agreement([], fake_predict)["decided"] == 0


# ---------------------------------------------------------------------------------------------
# A real result file: two strategies at two N
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_strategies(tmp_path_factory):
    path = tmp_path_factory.mktemp("strategies") / "s.h5"
    common = ["--heads", 4, "--kv-heads", 2, "--head-dim", 16, "--repeat", 5, "--warmup", 1, "--check", "--quiet", "--out", path]
    append_runs([(2, ["--seq-len", n, "--mode", mode, *common]) for n in (128, 512) for mode in ("overlap", "ulysses")])
    return path


def slowed(runs, mode: str, factor: float):
    """The runs with every time sample of ``mode``'s runs multiplied by ``factor``: a winner known in advance."""
    out = copy.deepcopy(runs)
    for r in out:
        if r.config["mode"] == mode:
            for k in ("total_s", "compute_s", "comm_s", "step_s"):
                r.samples[k] = r.samples[k] * factor
            r.summary["time_s"] *= factor
    return out


def markers(fig):
    """(face colour, is a tie) of every measured-point marker on the map."""
    import matplotlib.colors

    ax = fig.axes[0]
    found = []
    for line in ax.lines:
        if line.get_marker() == "o" and line.get_markersize() == 15:
            face = matplotlib.colors.to_hex(line.get_markerfacecolor())
            found.append((face, face == "#ffffff"))
    return found


@pytest.mark.mpi
def test_map_renders_from_a_real_file_and_draws_the_measured_winners(two_strategies, tmp_path):
    plot = pytest.importorskip("ringbench.analysis.plot")
    out = tmp_path / "figs"
    res = ringbench("plot", two_strategies, "-o", out, "--only", "strategies")
    assert res.returncode == 0, res.stderr
    png = out / "strategies.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    runs = results.load(two_strategies)
    cal = model.calibrate_from_runs(runs)
    fig = plot.strategy_map(runs, cal)
    assert len(markers(fig)) == 2  # one marker per (N, P) measured with both strategies
    # ulysses 100 times slower than measured (this machine is noisy): overlap is the measured winner at both N, drawn in its colour
    fig = plot.strategy_map(slowed(runs, "ulysses", 100.0), cal)
    assert markers(fig) == [(plot.strategy_color("overlap"), False)] * 2
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert len(re.findall(r"overlap [\d.]+x \[[\d.]+, [\d.]+\]\nover ulysses", text)) == 2 and "tie" not in text
    # and ulysses the winner when overlap is the slow one
    fig = plot.strategy_map(slowed(runs, "overlap", 100.0), cal)
    assert markers(fig) == [(plot.strategy_color("ulysses"), False)] * 2
    assert "predicted winner = measured winner on" in fig.axes[0].get_title()


@pytest.mark.mpi
def test_report_states_the_winner_agreement_on_a_real_file(two_strategies):
    res = ringbench("report", two_strategies)
    assert res.returncode == 0, res.stderr
    runs = results.load(two_strategies)
    points = results.strategy_points(results.rows(runs))
    assert len(points) == 2
    decided = sum(p["winner"] is not None for p in points)
    assert "measured winner on " in res.stdout and f" of {decided} points" in res.stdout
    assert "over 4 strategy times" in res.stdout

    runs = slowed(runs, "ulysses", 100.0)
    cal = model.calibrate_from_runs(runs)
    text = report.format_report(runs, cal)
    expected = results.strategy_agreement(
        results.strategy_points(results.rows(runs)), lambda r: model.predict(results.shape(r), cal).time_s
    )
    assert expected["decided"] == 2
    assert f"on {expected['agree']} of 2 points ({expected['agree'] / 2:.0%})" in text
    assert "(0 ties within the noise left out)" in text


@pytest.mark.mpi
def test_map_draws_one_panel_per_family(two_strategies):
    """Runs of another layout (here: the same runs relabelled striped, ulysses made slow there) are a family of
    their own: a second panel with its own measured winners and agreement line."""
    plot = pytest.importorskip("ringbench.analysis.plot")
    runs = results.load(two_strategies)
    other = slowed(runs, "ulysses", 100.0)
    for r in other:
        r.config["layout"] = "striped"
    cal = model.calibrate_from_runs(runs)
    fig = plot.strategy_map(runs + other, cal)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2
    titles = sorted(ax.get_title() for ax in panels)
    assert titles[0].startswith("forward, contiguous") and titles[1].startswith("forward, striped")
    striped = next(ax for ax in panels if ax.get_title().startswith("forward, striped"))
    faces = [matplotlib_hex(line.get_markerfacecolor()) for line in striped.get_lines() if line.get_marker() == "o"]
    assert faces == [plot.strategy_color("overlap")] * 2


def matplotlib_hex(c):
    import matplotlib.colors

    return matplotlib.colors.to_hex(c)


def test_strategies_the_model_cannot_tell_apart_win_together():
    """hybrid with U = P is Ulysses: equal predicted times, either measured winner agrees with the model."""
    table = [row(2048, 2, "hybrid", reps(1.5), u=2), row(2048, 2, "ulysses", reps(1.0)), row(2048, 2, "overlap", reps(2.0))]
    points = results.strategy_points(table)
    same = {"hybrid U=2": 1.2, "ulysses": 1.2, "overlap": 2.0}
    agreement = results.strategy_agreement(points, lambda r: same[results.strategy_label(r)])
    (p,) = points
    assert p["winner"] == "ulysses" and p["predicted_winner"] == "hybrid U=2"  # the first by name among equals
    assert p["predicted_winners"] == ["hybrid U=2", "ulysses"] and p["agree"] is True and agreement["agree"] == 1
    # a prediction apart by more than rounding is a prediction: the model picked hybrid, ulysses won
    same["ulysses"] = 1.2 * (1 + 1e-6)
    (p,) = results.strategy_points(table)
    assert results.strategy_agreement([p], lambda r: same[results.strategy_label(r)])["agree"] == 0 and p["agree"] is False


def test_prediction_table_keeps_each_ulysses_degree():
    """The report's 'predicted pass time' table: hybrid at two Ulysses degrees are two lines, each predicted as itself."""
    cal = model.Calibration.simple(rate=1e9, latency=1e-5, bandwidth=1e8)
    table = [dict(row(2048, 4, "hybrid", reps(1.0), u=u), **{"pass": "fwd"}) for u in (2, 4)]
    text = report.prediction_table(table, cal, [4, 8])
    lines = [ln for ln in text.splitlines() if ln.startswith("hybrid")]
    assert [ln.split()[:2] for ln in lines] == [["hybrid", "U=2"], ["hybrid", "U=4"]]
    for ln, u in zip(lines, (2, 4)):
        want = model.predict(results.shape(dict(row(2048, 4, "hybrid", reps(1.0), u=u), **{"pass": "fwd"}), nranks=8), cal).time_s
        assert f"{want * 1e3:.2f}" in ln


def test_phases_table_keeps_each_ulysses_degree():
    """The report's forward/backward table labels hybrid by its degree, as the runs table does (not `hybrid` twice)."""
    extra = dict(tflops=1.0, overlap_eff=0.5, exposed_comm_s=0.001, bytes_per_rank=2048, file="f.h5")
    table = [
        dict(row(2048, 4, "hybrid", reps(t), u=u), phase=phase, name=f"h{u}", **extra)
        for u in (2, 4)
        for phase, t in (("fwd", 1.0), ("bwd", 2.5))
    ]
    text = report.phases_table(table, None)
    labels = [ln.split("  ")[0] for ln in text.splitlines()[2:4]]
    assert labels == ["hybrid U=2", "hybrid U=4"]


# ---------------------------------------------------------------------------------------------
# advise when strategies are refused
# ---------------------------------------------------------------------------------------------
ADVISE_BASE = model.Shape(nranks=1, seq_len=1, heads=8, kv_heads=8, head_dim=64)
ADVISE_CAL = model.Calibration.simple(rate=1e11, latency=1e-5, bandwidth=1e10)


def test_advise_says_when_every_strategy_is_refused():
    from ringbench.analysis import advise

    text = advise.format_advice(ADVISE_BASE, [100], [3], ADVISE_CAL)  # N=100 is not divisible by P=3: all refused there
    assert "  winner: none: every strategy is refused at N=100 P=3" in text
    # the scan over n = N/P (powers of two) has a winner: which one, not only that it does not change
    assert text.endswith("P=3: the winner does not change for n = 16..1048576 tokens per rank: ring at every one")
    # heads that no kv-head count divides: nothing can run at any block size, and advise does not claim a winner
    text = advise.format_advice(ADVISE_BASE.with_(heads=6, kv_heads=4), [96], [2], ADVISE_CAL)
    assert "does not change" not in text and "winner: none: every strategy is refused at N=96 P=2" in text
    assert text.endswith("P=2: no strategy can run at any n = 16..1048576 tokens per rank: every one is refused")


def test_advise_names_a_change_to_no_strategy():
    from ringbench.analysis import advise

    assert advise.scan_text(2, [(64, "ring", None)], None) == (
        "P=2: the winner changes with the block size: ring -> none (every strategy refused) at n=64 (N=128)"
    )


# ---------------------------------------------------------------------------------------------
# Footers: every line inside the figure, under the axes
# ---------------------------------------------------------------------------------------------
LONG_SOURCE = "probe " + "/a/rather/long/directory/of/results" * 6 + "/probe.h5:/probes/probe-P2-float32"


def footer_clear(fig) -> list[str]:
    """The figure-level texts (footers), drawn: each must lie inside the figure and below every axes (its labels
    included). Returns their text."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    floor = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes if ax.get_visible())
    feet = [t for t in fig.texts if t.get_position()[1] < 0.5]  # not the title
    assert feet
    for t in feet:
        box = t.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0, (t.get_text()[:60], box, fig.bbox)
        assert box.y1 <= floor + 1, (t.get_text()[:60], box.y1, floor)
    return [t.get_text() for t in feet]


@pytest.mark.mpi
def test_footers_of_the_map_and_the_model_fit_the_figure(two_strategies):
    """A long calibration source (a probe file deep in a directory tree) is wrapped, not cut off at the figure's edges."""
    plot = pytest.importorskip("ringbench.analysis.plot")
    runs = results.load(two_strategies)
    cal = model.calibrate_from_runs(runs)
    cal.source = LONG_SOURCE
    for fig in (plot.strategy_map(runs, cal), plot.model_figure(runs, cal)):
        texts = footer_clear(fig)
        squeezed = [t.replace("\n", "").replace(" ", "") for t in texts]  # wrapped at spaces or inside the path
        assert any(LONG_SOURCE.replace(" ", "") in t for t in squeezed)
        plot.plt.close(fig)
