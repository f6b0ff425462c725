"""Figures render from a real result file (PNG and PDF), each noting host, backend and dtype."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import mpiexec, ringbench

pytestmark = pytest.mark.mpi

plot = pytest.importorskip("ringbench.analysis.plot")  # needs matplotlib (the plot/test extras)


@pytest.fixture(scope="module")
def richer(small_results, tmp_path_factory):
    """small_results plus one P=2 run at N=512: a second block size (overlap) and N/P=256 at P=1 and 2 (weak)."""
    path = tmp_path_factory.mktemp("richer") / "richer.h5"
    shutil.copyfile(small_results, path)
    res = mpiexec(2, "run", "--seq-len", 512, "--heads", 2, "--head-dim", 16, "--repeat", 3, "--quiet", "--out", path)
    assert res.returncode == 0, res.stderr
    return path


def test_plot_command_writes_every_figure(richer, tmp_path):
    out = tmp_path / "figs"
    res = ringbench("plot", richer, "-o", out)
    assert res.returncode == 0, res.stderr
    # forward-only: test_training_views.py draws the backward's, tests/engine/test_serving.py the serving passes',
    # test_packed_model.py the packed one
    for name in (f for f in plot.FIGURES if f not in plot.BWD_FIGURES + plot.SERVING_FIGURES + plot.PACKED_FIGURES):
        for ext in ("png", "pdf"):
            f = out / f"{name}.{ext}"
            assert f.exists() and f.stat().st_size > 5000, f
    assert (out / "strong.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "strong.pdf").read_bytes()[:5] == b"%PDF-"
    assert "skipped" not in res.stdout


def test_small_file_skips_what_it_cannot_draw(small_results, tmp_path):
    res = ringbench("plot", small_results, "-o", tmp_path, "--only", "weak,timeline")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "timeline.png").exists() and not (tmp_path / "weak.png").exists()
    assert "skipped weak: needs one N/P run at 2 or more rank counts" in res.stdout


def test_each_figure_names_host_backend_dtype_and_units(richer):
    from ringbench.analysis import model, results

    runs = results.load(richer)
    cal = model.calibrate_from_runs(runs)
    figs = {
        "strong": plot.strong_scaling(runs),
        "weak": plot.weak_scaling(runs),
        "overlap": plot.overlap(runs, cal),
        "timeline": plot.timeline(runs),
        "breakdown": plot.breakdown(runs),
        "causal": plot.causal_layouts(runs, cal),
        "model": plot.model_figure(runs, cal),
    }
    host = runs[0].provenance["hosts"][0]
    for name, fig in figs.items():
        assert fig is not None, name
        texts = " ".join(t.get_text() for t in fig.texts)
        assert f"host: {host}" in texts and "backend: numpy" in texts and "dtype: float32" in texts, name
        assert fig._suptitle.get_text(), name
        labels = " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in fig.axes)
        assert "[ms]" in labels or "%" in labels or "efficiency" in labels, name
        plot.plt.close(fig)


def _errorbars(ax, axis="y"):
    """The error-bar containers of an axes that carry bars along ``axis``, and how many bars have a length."""
    from matplotlib.container import ErrorbarContainer

    conts = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and (c.has_yerr if axis == "y" else c.has_xerr)]
    lengths = [
        seg[1][1 if axis == "y" else 0] - seg[0][1 if axis == "y" else 0] for c in conts for lc in c.lines[2] for seg in lc.get_segments()
    ]
    return conts, sum(1 for x in lengths if x > 0)


def test_every_time_point_carries_its_confidence_interval(richer):
    """Error bars (the bootstrap CI over repeats) on the times of strong, weak, overlap and model; ± in the others."""
    from ringbench.analysis import model, results

    runs = results.load(richer)
    cal = model.calibrate_from_runs(runs)
    fig = plot.strong_scaling(runs)
    ax_t, ax_s = fig.axes[:2]
    conts, bars = _errorbars(ax_t)
    assert len(conts) >= 1 and bars >= 2 and all(c.lines[1] for c in conts)  # caps drawn
    # the drawn interval is the row's: the P=1 point of the overlap line at N=256
    row = next(r for r in results.rows(runs) if r["nranks"] == 1)
    seg = next(sg for c in conts for sg in c.lines[2][0].get_segments() if sg[0][0] == 1)
    assert sorted(seg[:, 1]) == pytest.approx([row["time_ci_lo_s"] * 1e3, row["time_ci_hi_s"] * 1e3])
    assert _errorbars(ax_s)[1] >= 1  # speed-up: the interval of the ratio, none at the reference point
    assert "CI" in ax_t.get_title() and "CI" in ax_s.get_title()
    fig = plot.weak_scaling(runs)
    assert all(_errorbars(ax)[1] >= 1 for ax in fig.axes[:2])
    fig = plot.overlap(runs, cal)
    assert _errorbars(fig.axes[1])[1] >= 2  # exposed communication per block size
    fig = plot.model_figure(runs, cal)
    assert _errorbars(fig.axes[0], "x")[1] >= 6 and _errorbars(fig.axes[1])[1] >= 2
    fig = plot.breakdown(runs)
    assert sum("±" in t.get_text() for t in fig.axes[0].texts) == 7
    fig = plot.timeline(runs)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert "±" in titles[0] and re.search(r"overlap vs blocking: \d+\.\d\dx \[\d+\.\d\d, \d+\.\d\d\] (not )?significant", titles[1])
    plot.plt.close("all")


def test_timeline_of_a_named_run(small_results, tmp_path):
    from ringbench.analysis import results

    name = next(r.name for r in results.load(small_results) if r.config["layout"] == "zigzag")
    res = ringbench("plot", small_results, "-o", tmp_path, "--only", "timeline", "--timeline-run", name)
    assert res.returncode == 0, res.stderr
    res = ringbench("plot", small_results, "-o", tmp_path, "--timeline-run", "nope")
    assert res.returncode == 2 and res.stderr.startswith("ringbench plot: --timeline-run: no run 'nope'")


def test_plot_user_errors(small_results, tmp_path):
    res = ringbench("plot", small_results, "-o", tmp_path, "--only", "strng")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("ringbench plot: --only: unknown figure 'strng'; allowed: strong,")
    res = ringbench("plot", small_results)
    assert res.returncode == 2 and "-o/--out-dir" in res.stderr
    f = tmp_path / "file"
    f.write_text("")
    res = ringbench("plot", small_results, "-o", f)
    assert res.returncode == 2 and "is not a directory" in res.stderr


def test_missing_plot_dependency_is_one_line():
    from ringbench.cli import missing_modules

    assert missing_modules("numpy") is None
    assert missing_modules("no_such_module_rb") == "no_such_module_rb not installed: pip install 'ringbench[plot]'"


def _as(run, factor: float = 1.0, **config):
    """A stored run as another configuration (``config`` keys changed; its times x ``factor``): a realistic run of a
    point not measured here, with a new run id and the id of its new point."""
    import copy
    import uuid

    from ringbench.config import stored_point_id

    out = copy.deepcopy(run)
    out.config.update(config)
    out.run_id, out.point_id = uuid.uuid4().hex, stored_point_id(out.config, out.nranks, run.point_id)
    for k in ("total_s", "compute_s", "comm_s", "step_s"):
        out.samples[k] = out.samples[k] * factor
    out.summary["time_s"] *= factor
    return out


def test_timeline_draws_ring_runs_of_one_kernel_and_pass(small_results, tmp_path):
    """The configuration with the most modes run only with strategies (ulysses, pass-q, hybrid: not ring steps) is not
    the timeline's: it draws the ring modes of N=256 P=2. A torch-kernel overlap run and a fwd+bwd blocking run of
    that point (stored first, 3x slower) are other configurations: not stacked with the native forward-only runs."""
    from ringbench import store
    from ringbench.analysis import results

    runs = results.load(small_results)
    ring = {r.config["mode"]: r for r in runs if r.nranks == 2}  # overlap, blocking, allgather at N=256
    strategies = [
        _as(ring["overlap"], seq_len=512, mode="ulysses"),
        _as(ring["blocking"], seq_len=512, mode="pass-q"),
        _as(ring["allgather"], seq_len=512, mode="hybrid", ulysses_degree=2),
    ]
    torch = _as(ring["overlap"], 3.0, kernel="torch")
    both = _as(ring["blocking"], 3.0, **{"pass": "fwd+bwd"})
    both.bwd = store.Phase(samples=dict(both.samples), summary=dict(both.summary), check=dict(both.check))
    path = tmp_path / "mixed.h5"
    for r in [torch, both, *runs, *strategies]:
        store.append(path, r)
    fig = plot.timeline(results.load(path))
    assert fig is not None
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert [t.split(":")[0] for t in titles] == ["overlap", "blocking", "allgather"]
    for t, mode in zip(titles, ("overlap", "blocking", "allgather")):
        assert t.startswith(f"{mode}: pass {ring[mode].summary['time_s'] * 1e3:.1f} ms")  # the native fwd run's time
    plot.plt.close(fig)
    res = ringbench("plot", path, "-o", tmp_path, "--only", "timeline")
    assert res.returncode == 0, res.stderr
    assert "skipped" not in res.stdout and (tmp_path / "timeline.png").exists()
