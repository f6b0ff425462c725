"""Figures from stored runs (matplotlib, Agg backend; imported only by ``ringbench plot``).

One function per figure; each takes runs (ringbench.store.Run) and returns a matplotlib Figure, or None when
the runs hold nothing it can draw. Every figure notes the host(s), backend, device and dtype it came from.
Every measured time carries an error bar: the bootstrap confidence interval of its median over the repeats
(ringbench.analysis.measure.median_ci; speed-ups: measure.compare), none with fewer than measure.MIN_REPEATS repeats.

    strong     time and speed-up vs rank count at fixed N, ideal line; one line per mode / layout
    weak       per-rank throughput efficiency and time vs rank count at fixed N/P
    overlap    overlap efficiency and exposed communication vs block size (N/P), with the model's crossover
    timeline   per rank and ring step: compute and communication bars of one repeat, modes stacked
    breakdown  compute / exposed communication / other share of the pass, per configuration
    causal     per-rank compute and idle time for the causal layouts side by side
    model      model-predicted against measured time, and predicted times at rank counts not run
    strategies predicted fastest strategy over (N, P), measured winners (significant margins only) on top
    packed     packed documents and windows (issue 20): per document spec, (N, P): time and load imbalance (pairs:
               max / mean of the planned pairs per rank; compute: of the measured compute) per strategy and layout

The backward pass (runs with --pass bwd or fwd+bwd): ``timeline-bwd`` and ``overlap-bwd`` are the timeline and the
overlap figure of the backward phase; ``breakdown`` has a bar per configuration and phase; ``strong-fwdbwd`` is the
strong scaling of a training step, the forward plus the backward (its interval from the per-repeat sums when one
run timed both phases). The other figures show the forward.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ringbench import store
from ringbench.analysis import inference, measure, model, results
from ringbench.config import stored_point_id
from ringbench.layout import divisor
from ringbench.provenance import calibration_warning

FIGURES = (
    "strong",
    "weak",
    "overlap",
    "timeline",
    "breakdown",
    "causal",
    "model",
    "strategies",
    "packed",
    "timeline-bwd",
    "overlap-bwd",
    "strong-fwdbwd",
    "prefill",
    "decode",
)
BWD_FIGURES = ("timeline-bwd", "overlap-bwd", "strong-fwdbwd")  # drawn by default only when some run has a backward
SERVING_FIGURES = ("prefill", "decode")  # drawn by default only when some run is of a serving pass (analysis.inference)
PACKED_FIGURES = ("packed",)  # drawn by default only when some run has documents or a window (issue 20)
PACKED_PANELS = 4  # the packed figure's most (document spec, window, N, P) panels: those with the most runs
FORMATS = ("png", "pdf")
MODE_STYLE = {"overlap": ("C0", "o", "-"), "blocking": ("C3", "s", "--"), "allgather": ("C2", "^", ":")}
COMPUTE, COMPUTE_ALT, COMM, OTHER = "#4C72B0", "#7EA6D8", "#DD8452", "#C8C8C8"

# Every configuration field but one: what a line keeps fixed while the rank count varies. The kernel and the GEMM
# library are among them (as in results.COMPARE_KEY): native and torch runs are never one line.
SHAPE_KEYS = results.keys("shape")  # results.IDENTITY: dtype, batch, heads, kv_heads, head_dim, backend, kernel, blas, progress
RING_MODES = ("overlap", "blocking", "allgather")  # the modes whose steps the timeline draws (ring steps)
# what a stored configuration from before a key existed ran (as results.row reads it)
CONFIG_DEFAULTS = {"kernel": "native", "blas": "auto", "pass": "fwd"}


def _cfg(c: dict, key: str):
    """A stored configuration's value of ``key``, the default for runs stored before the key existed."""
    v = c.get(key)
    return CONFIG_DEFAULTS.get(key) if v is None else v


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def provenance_note(runs) -> str:
    """'host: a, b | backend: numpy (CPU name) | dtype: float32 | MPICH ...' for a figure's footer."""
    hosts = sorted({h for r in runs for h in r.provenance.get("hosts", [])})
    backends = sorted(
        {
            f"{r.provenance.get('backend', r.config.get('backend'))} ({', '.join(sorted(set(r.provenance.get('devices', []))))})"
            for r in runs
        }
    )
    dtypes = sorted({r.config.get("dtype", "?") for r in runs})
    mpi = sorted({r.provenance.get("mpi_library", "") for r in runs} - {""})
    return f"host: {', '.join(hosts) or '?'}  |  backend: {'; '.join(backends)}  |  dtype: {', '.join(dtypes)}" + (
        f"  |  {'; '.join(mpi)}" if mpi else ""
    )


FOOT_SIZE = 7  # points: the footer's font
FOOT_CHARS_PER_INCH = 14  # characters of the footer's font on an inch of line (its widest text, with margin)
FOOT_LINE_IN = 1.35 * FOOT_SIZE / 72  # inches per footer line


def _finish(fig, runs, title: str, handles=None, note: str | None = None):
    """Title, (optionally) one legend under the title, clear of the data, and the footer: ``note`` (centred), then
    the provenance. Both are wrapped to the figure's width, and the layout leaves room under the axes for every
    line of them: a long calibration source or host list is never cut off at the figure's edge."""
    fig.suptitle(title, fontsize=12)
    width, height = fig.get_size_inches()
    chars = max(40, int(width * FOOT_CHARS_PER_INCH))
    prov = textwrap.wrap(provenance_note(runs), chars, break_on_hyphens=False)
    fig.text(0.01, 0.04 / height, "\n".join(prov), fontsize=FOOT_SIZE, color="0.3", ha="left", va="bottom")
    bottom = 0.04 + len(prov) * FOOT_LINE_IN
    if note:
        lines = textwrap.wrap(note, chars, break_on_hyphens=False)
        fig.text(0.5, (bottom + 0.04) / height, "\n".join(lines), fontsize=FOOT_SIZE, color="0.3", ha="center", va="bottom")
        bottom += 0.04 + len(lines) * FOOT_LINE_IN
    top = 1 - 0.45 / height
    if handles:
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top), ncol=len(handles), fontsize=8, frameon=False)
        top -= 0.3 / height
    fig.tight_layout(rect=(0, (bottom + 0.08) / height, 1, top))
    return fig


def _plain_log(axis):
    """Log axis labelled with plain numbers (1, 2, 5, 10, 20 ...) instead of powers of ten."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(fmt)


def _ok(runs, phase: str = "fwd"):
    """The successful runs with samples of ``phase``."""
    out = []
    for r in runs:
        ph = r.phase(phase) if r.status == "ok" else None
        if ph is not None and "total_s" in ph.samples:
            out.append(r)
    return out


def _line_label(r: dict, varying: set) -> str:
    """mode, layout (+ causal), and any shape field that differs between the lines of a figure."""
    parts = [results.strategy_label(r), r["layout"] + (" causal" if r["causal"] else "")]
    parts += [f"{k}={r[k]}" for k in SHAPE_KEYS if k in varying]
    return ", ".join(parts)


def _varying(rows: list[dict], keys) -> set:
    return {k for k in keys if len({r[k] for r in rows}) > 1}


def _median_by(rows: list[dict], key: str, value: str) -> dict:
    """{row[key]: median of row[value]} (repeated runs of one point are pooled)."""
    pooled = defaultdict(list)
    for r in rows:
        if r.get(value) is not None:
            pooled[r[key]].append(r[value])
    return {k: float(np.median(v)) for k, v in sorted(pooled.items())}


def _repeats_by(rows: list[dict], key: str, value: str = "time") -> dict:
    """{row[key]: per-repeat values of ``value`` (time, compute or exposed_comm)}, the repeats of repeated runs of a point pooled.

    A row without per-repeat values (read without samples) contributes its median alone.
    """
    pooled = defaultdict(list)
    for r in rows:
        if r.get(f"{value}_s") is not None:
            pooled[r[key]] += list(r.get(f"{value}_repeats_s") or (r[f"{value}_s"],))
    return dict(sorted(pooled.items()))


def _ci_by(rows: list[dict], key: str, value: str = "time") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, median, (2, n) error-bar lengths below and above) per distinct row[key], in seconds; no interval: 0."""
    reps = _repeats_by(rows, key, value)
    cis = np.array([measure.median_ci(v) for v in reps.values()]).reshape(-1, 3)
    med = cis[:, 0]
    err = np.nan_to_num(np.abs(cis[:, 1:].T - med), nan=0.0)
    return np.array(list(reps)), med, err


def _speedups(reps: dict, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """Speed-up of each entry over the first (first's median / its median) and its interval's error bars.

    ``scale`` (optional, per entry) multiplies ratio and interval: e.g. the work per rank for weak scaling.
    """
    keys = list(reps)
    first = reps[keys[0]]
    comps = [measure.compare(first, reps[k]) for k in keys]
    scale = np.ones(len(keys)) if scale is None else np.asarray(scale, dtype=float)
    ratio = np.array([c.ratio for c in comps]) * scale
    bounds = np.array([(c.lo, c.hi) for c in comps]).T * scale
    err = np.nan_to_num(np.abs(bounds - ratio), nan=0.0)
    err[:, 0] = 0.0  # the reference point is 1 by definition
    return ratio, err


def _ci_text(r: dict) -> str:
    """`` ±1.3%``: the relative half-width of a row's time interval ('' without one)."""
    return "" if r.get("time_ci_rel") is None else f" ±{r['time_ci_rel']:.1%}"


def _versus(a: dict, b: dict) -> str:
    """``; overlap vs blocking 1.21x [1.15, 1.27] significant``: speed-up of row a over row b and the verdict."""
    c = measure.compare(b["time_repeats_s"], a["time_repeats_s"])
    ci = "" if c.verdict == measure.TOO_FEW else f" [{c.lo:.2f}, {c.hi:.2f}]"
    return f"; {a['mode']} vs {b['mode']}: {c.ratio:.2f}x{ci} {c.verdict}"


def _shape_desc(r: dict) -> str:
    return f"B={r['batch']} H={r['heads']}/{r['kv_heads']} D={r['head_dim']}"


def _best_group(rows: list[dict], fixed: str, need: str = "nranks") -> tuple:
    """The value of ``fixed`` whose rows span the most distinct ``need`` values (then the most rows)."""
    by = defaultdict(list)
    for r in rows:
        by[r[fixed]].append(r)
    best = max(by, key=lambda k: (len({r[need] for r in by[k]}), len(by[k]), k), default=None)
    return best, by.get(best, [])


def _series(rows: list[dict], extra=()) -> dict:
    """Rows grouped into lines: same mode, layout, causal flag and shape."""
    out = defaultdict(list)
    for r in rows:
        out[(results.strategy_label(r), r["layout"], bool(r["causal"])) + tuple(r[k] for k in SHAPE_KEYS + tuple(extra))].append(r)
    return out


def _style(mode: str, i: int):
    color, marker, ls = MODE_STYLE.get(mode, (f"C{i % 10}", "o", "-"))
    return color, marker, ls


def _layout_color(key, i):
    """Lines of one mode differ by layout: vary the colour with the layout, the dash with the mode."""
    mode, layout, causal = key[:3]
    base = {"contiguous": 0, "zigzag": 1, "striped": 2}.get(layout, 3) + (3 if causal else 0)
    palette = ["C0", "C1", "C2", "C4", "C5", "C6", "C7"]
    return palette[base % len(palette)] if (layout != "contiguous" or causal) else MODE_STYLE.get(mode, ("C0",))[0]


def _logx_ranks(ax, ranks):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ranks))
    ax.set_xticklabels([str(p) for p in sorted(ranks)])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def strong_scaling(runs):
    """Time and speed-up vs rank count at the fixed N with the most rank counts."""
    return _strong(runs, results.rows(_ok(runs), phases=("fwd",)), "pass time")


def strong_fwd_bwd(runs):
    """Strong scaling of forward + backward: per configuration the sum of both phases (results.phase_pairs), its
    interval from the per-repeat sums when one fwd+bwd run timed both (else the sum of the medians, no bar)."""
    rows = []
    for d in results.phase_pairs(results.rows([r for r in runs if r.status == "ok"])):
        reps = d["fwd"]["time_repeats_s"], d["bwd"]["time_repeats_s"]
        sums = tuple(np.add(*reps)) if d["same_run"] and reps[0] and len(reps[0]) == len(reps[1]) else (d["total_s"],)
        rows.append(dict(d["fwd"], time_s=d["total_s"], time_repeats_s=sums))
    return _strong(runs, rows, "fwd + bwd time")


def _strong(runs, rows: list[dict], what: str):
    n, rows = _best_group(rows, "seq_len")
    lines = {k: v for k, v in _series(rows).items() if len({r["nranks"] for r in v}) >= 2}
    if not lines:
        return None
    used = [r for v in lines.values() for r in v]
    varying = _varying(used, SHAPE_KEYS)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 5))
    ranks = sorted({r["nranks"] for r in used})
    for i, (key, v) in enumerate(sorted(lines.items())):
        ps, ts, err = _ci_by(v, "nranks")
        speedup, s_err = _speedups(_repeats_by(v, "nranks"))
        color, marker, ls = _style(key[0], i)
        color = _layout_color(key, i)
        label = _line_label(v[0], varying)
        ax_t.errorbar(ps, ts * 1e3, yerr=err * 1e3, marker=marker, ls=ls, color=color, label=label, capsize=3)
        ax_t.plot(ps, ts[0] * ps[0] / ps * 1e3, ls=(0, (1, 3)), color=color, lw=1)
        ax_s.errorbar(ps, speedup, yerr=s_err, marker=marker, ls=ls, color=color, label=label, capsize=3)
    ax_s.plot(ranks, np.array(ranks) / ranks[0], color="k", lw=1, ls=(0, (1, 3)), label="ideal (linear)")
    ax_t.plot([], [], color="0.4", lw=1, ls=(0, (1, 3)), label="ideal: T(P0) P0 / P")
    ax_t.set_yscale("log")
    _plain_log(ax_t.yaxis)
    for ax in (ax_t, ax_s):
        _logx_ranks(ax, ranks)
        ax.set_xlabel("MPI ranks P")
        ax.grid(True, which="both", alpha=0.3)
    ax_s.set_yscale("log", base=2)
    ax_s.set_yticks([2**k for k in range(int(np.log2(max(ranks) / ranks[0])) + 1)])
    ax_s.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_t.set_ylabel(f"{what} [ms] (median over repeats, slowest rank)")
    ax_s.set_ylabel(f"speed-up T(P={ranks[0]}) / T(P)")
    ax_t.set_title(f"time (bars: {measure.CONFIDENCE:.0%} CI of the median)")
    ax_s.set_title(f"speed-up (bars: {measure.CONFIDENCE:.0%} CI of the ratio)")
    ax_t.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    head = "Strong scaling" if what == "pass time" else "Strong scaling of forward + backward"
    return _finish(fig, runs, f"{head} at fixed N = {n} tokens ({_shape_desc(used[0])})")


def weak_scaling(runs):
    """Per-rank throughput efficiency and time vs rank count at the fixed N/P with the most rank counts."""
    rows = results.rows(_ok(runs), phases=("fwd",))
    n, rows = _best_group(rows, "tokens_per_rank")
    lines = {k: v for k, v in _series(rows).items() if len({r["nranks"] for r in v}) >= 2}
    if not lines:
        return None
    used = [r for v in lines.values() for r in v]
    varying = _varying(used, SHAPE_KEYS)
    ranks = sorted({r["nranks"] for r in used})
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(12, 5))
    for i, (key, v) in enumerate(sorted(lines.items())):
        ps, tt, err = _ci_by(v, "nranks")
        # efficiency = (FLOPs per rank / time) at P over the same at the smallest P: a ratio of times, scaled
        work = _median_by([dict(r, work=r["flops"] / r["nranks"]) for r in v], "nranks", "work")
        w = np.array(list(work.values()))
        eff, e_err = _speedups(_repeats_by(v, "nranks"), scale=w / w[0])
        color, marker, ls = _style(key[0], i)
        color = _layout_color(key, i)
        label = _line_label(v[0], varying)
        ax_e.errorbar(ps, eff, yerr=e_err, marker=marker, ls=ls, color=color, label=label, capsize=3)
        ax_t.errorbar(ps, tt * 1e3, yerr=err * 1e3, marker=marker, ls=ls, color=color, label=label, capsize=3)
        ax_t.plot(ps, tt[0] * ps / ps[0] * 1e3, color=color, lw=1, ls=(0, (1, 3)))
    ax_e.axhline(1.0, color="k", lw=1, ls=(0, (1, 3)), label="ideal")
    ax_t.plot([], [], color="0.4", lw=1, ls=(0, (1, 3)), label="ideal: T(P0) P / P0 (work per rank grows with P)")
    ax_e.set_ylim(0, max(1.2, ax_e.get_ylim()[1]))
    for ax in (ax_e, ax_t):
        _logx_ranks(ax, ranks)
        ax.set_xlabel(f"MPI ranks P  (N = P x {n})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_e.set_ylabel(f"efficiency: TFLOP/s per rank / same at P={ranks[0]}")
    ax_t.set_ylabel("pass time [ms]")
    ax_e.set_title(f"weak-scaling efficiency (bars: {measure.CONFIDENCE:.0%} CI)")
    ax_t.set_title(f"time (bars: {measure.CONFIDENCE:.0%} CI of the median)")
    return _finish(fig, runs, f"Weak scaling at fixed N/P = {n} tokens per rank ({_shape_desc(used[0])})")


def overlap(runs, cal: model.Calibration | None = None, phase: str = "fwd"):
    """Overlap efficiency and exposed communication vs tokens per rank, one line per P; model crossover (of ``phase``)."""
    rows = [r for r in results.rows(_ok(runs, phase), phases=(phase,)) if r["nranks"] > 1 and r["mode"] in ("overlap", "blocking")]
    if not rows:
        return None
    fam = defaultdict(list)  # one family: layout, causal flag and shape
    for r in rows:
        fam[(r["layout"], bool(r["causal"])) + tuple(r[k] for k in SHAPE_KEYS)].append(r)
    key = max(fam, key=lambda k: (len({(r["tokens_per_rank"], r["nranks"]) for r in fam[k]}), len(fam[k])))
    rows = fam[key]
    if len({r["tokens_per_rank"] for r in rows}) < 2:
        return None
    fig, (ax_e, ax_x) = plt.subplots(1, 2, figsize=(14, 5))
    ranks = sorted({r["nranks"] for r in rows})
    xs_all = sorted({r["tokens_per_rank"] for r in rows})
    for i, p in enumerate(ranks):
        color = f"C{i}"
        for mode in ("overlap", "blocking"):
            v = [r for r in rows if r["nranks"] == p and r["mode"] == mode]
            if not v:
                continue
            _, marker, ls = _style(mode, i)
            xs, exp, err = _ci_by(v, "tokens_per_rank", "exposed_comm")
            ax_x.errorbar(xs, exp * 1e3, yerr=err * 1e3, marker=marker, ls=ls, color=color, label=f"{mode}, P={p}", capsize=3)
            if mode == "overlap":
                eff = _median_by(v, "tokens_per_rank", "overlap_eff")
                ax_e.plot(list(eff), list(eff.values()), marker=marker, ls=ls, color=color, label=f"overlap, P={p}")
            alone = _median_by(v, "tokens_per_rank", "comm_alone_s")
            if mode == "blocking" or not any(r["mode"] == "blocking" for r in rows):
                ax_x.plot(
                    list(alone),
                    np.array(list(alone.values())) * 1e3,
                    ls=(0, (1, 2)),
                    color=color,
                    lw=1,
                    label=f"comm alone (no compute), P={p}",
                )
        if cal is not None and cal.has_phase(phase):
            r0 = rows[0]
            # the overlap ring's crossover, at this P and the family's shape
            shape = model.Shape.from_config(r0, p).with_(seq_len=p * r0["tokens_per_rank"], mode="overlap", ulysses_degree=1, pass_=phase)
            nstar = model.crossover_tokens(shape, cal)
            if np.isfinite(nstar):
                for ax in (ax_e, ax_x):
                    ax.axvline(
                        nstar,
                        color=color,
                        lw=1.2,
                        ls="-.",
                        alpha=0.8,
                        label=f"model crossover n* = {nstar:.0f}, P={p}" if ax is ax_e else None,
                    )
                xs_all.append(nstar)
    lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
    one = results.shape(rows[0], nranks=1).with_(seq_len=1)
    moved = model.block_bytes(one) + (model.grad_block_bytes(one) if phase == "bwd" else 0)  # per token, per step
    kib_per_token = moved / 1024
    for ax in (ax_e, ax_x):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(lo, hi)
        ax.set_xlabel("block size n = N/P [tokens per rank]")
        top = ax.secondary_xaxis("top", functions=(lambda n: n * kib_per_token, lambda k: k / kib_per_token))
        top.set_xlabel("K/V block moved per step [KiB]" if phase == "fwd" else "K/V block + dK/dV moved per step [KiB]", fontsize=8)
        top.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="both", alpha=0.3)
    ax_e.legend(fontsize=7, loc="best")
    ax_x.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax_e.set_ylim(-0.05, 1.05)
    ax_e.set_ylabel("overlap efficiency  1 - exposed / alone")
    ax_x.set_yscale("log")
    _plain_log(ax_x.yaxis)
    ax_x.set_ylabel(f"communication time per pass [ms] (bars: {measure.CONFIDENCE:.0%} CI)")
    ax_e.set_title("hidden share of the K/V transfers (overlap mode)" if phase == "fwd" else "hidden share of K/V + dK/dV (overlap mode)")
    ax_x.set_title("exposed communication: overlap vs blocking" + ("" if phase == "fwd" else " (incl. the dK/dV hop home)"))
    layout = key[0] + (" causal" if key[1] else "")
    head = "Overlap vs block size" if phase == "fwd" else "Backward: overlap vs block size"
    return _finish(fig, runs, f"{head} ({layout}, {_shape_desc(rows[0])}); left of n* the transfer outlasts a step's compute")


def _median_repeat(samples: dict) -> int:
    return int(np.argsort(samples["total_s"].max(axis=1))[len(samples["total_s"]) // 2])


def _timeline_axes(ax, run, phase: str = "fwd"):
    """Bars per rank and ring step of the median repeat: compute, communication, and the rest of the step."""
    samples = run.phase(phase).samples
    rep = _median_repeat(samples)
    comp = samples["compute_s"][rep]  # (P, S)
    comm = samples["comm_s"][rep]
    step = samples["step_s"][rep]
    total = samples["total_s"][rep]  # (P,)
    mode = run.config["mode"]
    P = comp.shape[0]
    for r in range(P):
        t = 0.0
        for s in range(comp.shape[1]):
            c, m, st = comp[r, s] * 1e3, comm[r, s] * 1e3, step[r, s] * 1e3
            comm_first = mode == "blocking" or (mode == "allgather" and s == 0)
            c0 = t + (m if comm_first else 0.0)
            m0 = t if comm_first else t + c
            ax.broken_barh([(t, st)], (r - 0.4, 0.8), facecolors=OTHER)
            ax.broken_barh([(c0, c)], (r - 0.4, 0.8), facecolors=COMPUTE if s % 2 == 0 else COMPUTE_ALT)
            if m > 0:
                ax.broken_barh([(m0, m)], (r - 0.4, 0.8), facecolors=COMM)
            if c > 0.06 * total.max() * 1e3:
                ax.text(c0 + c / 2, r, f"s{s}", ha="center", va="center", fontsize=7, color="white")
            t += st
    ax.set_yticks(range(P))
    ax.set_yticklabels([f"rank {r}" for r in range(P)])
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    return rep


def timeline(runs, run_name: str | None = None, phase: str = "fwd"):
    """Per rank and ring step, one repeat of ``phase``: modes of the same configuration stacked, sharing the time axis."""
    ok = _ok(runs, phase)
    if run_name:
        chosen = [r for r in ok if r.name == run_name][:1]
    else:
        groups = defaultdict(dict)
        for r in ok:  # the ring modes only: a strategy's steps are not ring steps
            c = r.config
            if c["mode"] not in RING_MODES:
                continue
            key = (r.nranks, c["seq_len"], c["layout"], bool(c["causal"])) + tuple(_cfg(c, k) for k in SHAPE_KEYS + ("pass",))
            groups[key].setdefault(c["mode"], r)
        if not groups:
            return None
        # the configuration with the most ring modes, then the most ranks, then the longest sequence
        key = max(groups, key=lambda k: (len(groups[k]), k[0], k[1]))
        chosen = [groups[key][m] for m in RING_MODES if m in groups[key]]
    if not chosen:
        return None
    P = chosen[0].nranks
    fig, axes = plt.subplots(len(chosen), 1, figsize=(12, 1.2 + 0.45 * P * len(chosen) + 0.5 * len(chosen)), sharex=True, squeeze=False)
    first = results.row(chosen[0], phase)
    for ax, run in zip(axes[:, 0], chosen):
        rep = _timeline_axes(ax, run, phase)
        ph, r = run.phase(phase), results.row(run, phase)
        s = ph.summary
        ax.set_title(
            f"{run.config['mode']}: pass {s['time_s'] * 1e3:.1f} ms{_ci_text(r)}, exposed comm "
            f"{s['exposed_comm_s'] * 1e3:.2f} ms (medians); drawn: repeat {rep + 1} of "
            f"{len(ph.samples['total_s'])}, the median one" + ("" if run is chosen[0] else _versus(first, r)),
            fontsize=9,
            loc="left",
        )
    axes[-1, 0].set_xlabel("time since the start of the pass on each rank [ms]")
    bwd = phase == "bwd"
    comm_label = "in MPI calls (last step: + dK/dV hop home / all-to-all)" if bwd else "in MPI calls (post + wait / Sendrecv / Allgather)"
    handles = [
        matplotlib.patches.Patch(color=COMPUTE, label="compute on step s's K/V block (shades alternate)" + ("; dQ, dK, dV" if bwd else "")),
        matplotlib.patches.Patch(color=COMM, label=comm_label),
        matplotlib.patches.Patch(color=OTHER, label="rest of the step (casts, sync)"),
    ]
    c = chosen[0].config
    return _finish(
        fig,
        chosen,
        ("Backward timeline" if bwd else "Timeline") + f" per rank and ring step s: {c['layout']}{' causal' if c['causal'] else ''} "
        f"N={c['seq_len']} P={P} ({_shape_desc(results.row(chosen[0]))})",
        handles,
    )


def _split(run, phase: str = "fwd") -> tuple[float, float, float]:
    """Median over repeats, on the slowest rank, of (compute, communication, other) seconds in the pass."""
    s = run.phase(phase).samples
    rep_total = s["total_s"]  # (R, P)
    slow = rep_total.argmax(axis=1)
    idx = np.arange(len(slow))
    comp = s["compute_s"].sum(axis=2)[idx, slow]
    comm = s["comm_s"].sum(axis=2)[idx, slow]
    tot = rep_total[idx, slow]
    return float(np.median(comp)), float(np.median(comm)), float(np.median(np.maximum(tot - comp - comm, 0)))


def breakdown(runs):
    """Share of the pass in compute / communication calls / other, one bar per configuration and phase."""
    latest = {}
    for phase in store.PHASES:
        for r in _ok(runs, phase):  # repeated runs of one point: the last one stored
            latest[(stored_point_id(r.config, r.nranks, r.point_id), phase)] = (r, phase)
    if not latest:
        return None
    items = sorted(latest.values(), key=lambda rp: results.sort_key(results.row(*rp)))
    phased = any(phase == "bwd" for _, phase in items)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.28 * len(items)))
    labels = []
    for i, (run, phase) in enumerate(items):
        c, m, o = _split(run, phase)
        tot = c + m + o
        ax.barh(i, c / tot, color=COMPUTE)
        ax.barh(i, m / tot, left=c / tot, color=COMM)
        ax.barh(i, o / tot, left=(c + m) / tot, color=OTHER)
        r = results.row(run, phase)
        ax.text(1.01, i, f"{r['time_s'] * 1e3:.1f} ms{_ci_text(r)}", va="center", fontsize=7)
        cfg = run.config
        layout = cfg["layout"] + (" causal" if cfg["causal"] else "")
        labels.append(f"{cfg['mode']:9s} {phase + ' ' if phased else ''}{layout:17s} N={cfg['seq_len']:<6d} P={run.nranks}")
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(labels, fontsize=7, family="monospace")
    ax.set_xlim(0, 1.17)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xticklabels([f"{x:.0%}" for x in np.linspace(0, 1, 6)])
    ax.set_xlabel(
        "share of the pass on the slowest rank [%] (median over repeats); "
        f"pass time [ms] (time_s) at the right, ± half its {measure.CONFIDENCE:.0%} CI"
    )
    handles = [
        matplotlib.patches.Patch(color=COMPUTE, label="compute"),
        matplotlib.patches.Patch(color=COMM, label="exposed communication (time in MPI calls)"),
        matplotlib.patches.Patch(color=OTHER, label="other"),
    ]
    title = "Where the time goes, per configuration" + (" and phase (fwd: forward, bwd: backward)" if phased else "")
    return _finish(fig, [run for run, _ in items], title, handles)


def causal_layouts(runs, cal: model.Calibration | None = None):
    """Per-rank compute and idle time of the causal layouts at the (N, P) where the most layouts were run."""
    ok = [r for r in _ok(runs) if r.config["causal"] and r.nranks > 1]
    groups = defaultdict(dict)
    for r in ok:
        c = r.config
        groups[(c["mode"], c["seq_len"], r.nranks) + tuple(_cfg(c, k) for k in SHAPE_KEYS + ("pass",))][c["layout"]] = r
    if not groups:
        return None
    key = max(groups, key=lambda k: (len(groups[k]), k[0] == "overlap", k[2], k[1]))
    chosen = [groups[key][lay] for lay in ("contiguous", "zigzag", "striped") if lay in groups[key]]
    # at least 11 inches wide: the title and the legend must fit even when only one layout was run
    fig, axes = plt.subplots(1, len(chosen), figsize=(max(11.0, 4.2 * len(chosen) + 1), 4.6), sharey=True, squeeze=False)
    P = chosen[0].nranks
    for ax, run in zip(axes[0], chosen):
        s = run.samples
        comp = np.median(s["compute_s"].sum(axis=2), axis=0) * 1e3  # (P,)
        total = np.median(s["total_s"], axis=0) * 1e3
        idle = np.maximum(total - comp, 0)
        ranks = np.arange(P)
        ax.bar(ranks, comp, color=COMPUTE)
        ax.bar(ranks, idle, bottom=comp, color=COMM)
        if cal is not None:
            pred = model.predict(model.Shape.from_config(run.config, run.nranks), cal).compute_s.sum(axis=1)
            ax.plot(ranks, pred * 1e3, "k_", ms=22, mew=2)
        ax.set_xticks(ranks)
        ax.set_xlabel("rank")
        ax.set_title(
            f"{run.config['layout']}: imbalance {run.summary['imbalance']:.0%}, "
            f"pass {run.summary['time_s'] * 1e3:.1f} ms{_ci_text(results.row(run))}",
            fontsize=9,
        )
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("time in the pass [ms], median over repeats")
    handles = [
        matplotlib.patches.Patch(color=COMPUTE, label="compute"),
        matplotlib.patches.Patch(color=COMM, label="idle: in MPI calls (waiting for neighbours) and other"),
    ]
    if cal is not None:
        handles.append(
            matplotlib.lines.Line2D(
                [], [], color="k", marker="_", ms=14, mew=2, ls="none", label="model: the rank's unmasked work / compute rate"
            )
        )
    c = chosen[0].config
    return _finish(
        fig,
        chosen,
        f"Causal layouts: per-rank work and idle time ({c['mode']}, N={c['seq_len']}, P={P}, {_shape_desc(results.row(chosen[0]))})",
        handles,
    )


def packed_figure(runs):
    """Time and load imbalance per strategy and layout, one column of panels per (documents, window, N, P) (the
    PACKED_PANELS with the most runs): top, the pass time (median, its interval); bottom, the pairs' imbalance (bars:
    max / mean over ranks of the pairs the plans gave each rank) and the measured one (black ticks: max / mean of the
    summed compute), 1.0 = perfect. Runs stored without the pairs sample (before issue 20) have no bars."""
    rows = [r for r in results.rows(_ok(runs), phases=("fwd",)) if r["nranks"] > 1 and r.get("pairs_imbalance") is not None]
    if not rows:
        return None
    groups = defaultdict(list)
    for r in rows:
        groups[(results.value(r, "docs"), results.value(r, "window"), r["seq_len"], r["nranks"], bool(r["causal"]))].append(r)
    keys = sorted(groups, key=lambda k: (-len(groups[k]), str(k)))[:PACKED_PANELS]
    keys.sort(key=lambda k: (k[3], k[2], str(k[0]), k[1]))
    labels = sorted({results.strategy_label(r) for k in keys for r in groups[k]}, key=lambda lab: (lab != "ring", lab))
    fig, axes = plt.subplots(2, len(keys), figsize=(max(11.0, 4.6 * len(keys)), 7.4), squeeze=False, sharex="col")
    width = 0.8 / max(1, len(labels))
    for col, key in enumerate(keys):
        docs, window, nseq, P, causal = key
        layouts = sorted({r["layout"] for r in groups[key]}, key=lambda lay: (LAYOUT_ORDER.get(lay, 9), lay))
        top, bottom = axes[0, col], axes[1, col]
        for i, lab in enumerate(labels):
            mine = [r for r in groups[key] if results.strategy_label(r) == lab]
            if not mine:
                continue
            color = strategy_color(lab)
            for j, lay in enumerate(layouts):
                at = [r for r in mine if r["layout"] == lay]
                if not at:
                    continue
                x = j + (i - (len(labels) - 1) / 2) * width
                _, med, err = _ci_by(at, "layout")
                top.bar(x, med[0] * 1e3, width, yerr=err[:, :1] * 1e3, color=color, capsize=2)
                pairs = float(np.median([r["pairs_imbalance"] for r in at]))
                comp = [r["compute_imbalance"] for r in at if r.get("compute_imbalance") is not None]
                bottom.bar(x, pairs, width, color=color)
                if comp:
                    bottom.plot([x], [float(np.median(comp))], "k_", ms=12, mew=2)
        bottom.axhline(1.0, color="0.4", lw=0.8, ls=":")
        bottom.set_xticks(range(len(layouts)))
        bottom.set_xticklabels(layouts, fontsize=8)
        bottom.set_ylim(bottom=min(0.9, bottom.get_ylim()[0]))
        what = (f"docs {docs}" if docs else "one document") + (f", window {window}" if window else "")
        top.set_title(f"{what}\nN={nseq} P={P}{' causal' if causal else ''}", fontsize=9)
        top.grid(True, axis="y", alpha=0.3)
        bottom.grid(True, axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("pass time [ms], median over repeats")
    axes[1, 0].set_ylabel("load imbalance, max / mean over ranks")
    handles = [matplotlib.patches.Patch(color=strategy_color(lab), label=lab) for lab in labels]
    handles.append(matplotlib.lines.Line2D([], [], color="k", marker="_", ms=12, mew=2, ls="none", label="measured compute imbalance"))
    used = [r for k in keys for r in groups[k]]
    by_run = {(r["file"], r["name"]) for r in used}
    chosen = [run for run in _ok(runs) if (run.path, run.name) in by_run]
    note = "bars below: the pairs' imbalance (the plans' pairs per rank, max / mean); 1.0 = perfect balance"
    return _finish(fig, chosen, f"Packed documents: time and load balance per strategy and layout ({_shape_desc(used[0])})", handles, note)


LAYOUT_ORDER = {"contiguous": 0, "zigzag": 1, "striped": 2, "doc-zigzag": 3, "balanced": 4}


def model_figure(runs, cal: model.Calibration | None, predict_ranks=None):
    """Predicted against measured pass time; and predicted strong scaling beyond the rank counts run."""
    if cal is None:
        return None
    rows = results.rows(_ok(runs), phases=("fwd",))
    if not rows:
        return None
    fig, (ax_p, ax_x) = plt.subplots(1, 2, figsize=(12, 5.2))
    errs, seen = [], []
    for mode in ("overlap", "blocking", "allgather"):
        v = [r for r in rows if r["mode"] == mode]
        if not v:
            continue
        pred = np.array([model.predict(results.shape(r), cal).time_s for r in v])
        meas = np.array([r["time_s"] for r in v])
        bars = np.array([[r["time_s"] - (r["time_ci_lo_s"] or r["time_s"]), (r["time_ci_hi_s"] or r["time_s"]) - r["time_s"]] for r in v]).T
        errs += list((pred - meas) / meas)
        seen += list(pred) + list(meas)
        color, marker, _ = _style(mode, 0)
        ax_p.errorbar(meas * 1e3, pred * 1e3, xerr=bars * 1e3, color=color, marker=marker, ls="none", label=mode, alpha=0.8, ms=5, zorder=3)
    lo, hi = min(seen) * 1e3 / 1.5, max(seen) * 1e3 * 1.5
    xs = np.geomspace(lo, hi, 50)
    ax_p.plot(xs, xs, color="k", lw=1, label="predicted = measured")
    ax_p.fill_between(xs, xs / 1.25, xs * 1.25, color="0.85", label="within 25%")
    ax_p.set_xscale("log")
    ax_p.set_yscale("log")
    ax_p.set_xlim(lo, hi)
    ax_p.set_ylim(lo, hi)
    ax_p.set_aspect("equal")
    _plain_log(ax_p.xaxis)
    _plain_log(ax_p.yaxis)
    ax_p.set_xlabel(f"measured pass time [ms] (bars: {measure.CONFIDENCE:.0%} CI)")
    ax_p.set_ylabel("predicted pass time [ms]")
    ax_p.set_title(f"{len(errs)} runs: median |error| {np.median(np.abs(errs)):.0%}, max {np.max(np.abs(errs)):.0%}", fontsize=9)
    ax_p.grid(True, which="both", alpha=0.3)
    ax_p.legend(fontsize=7)
    # extrapolation: the fixed-N lines with the most rank counts, predicted out to predict_ranks
    n, grp = _best_group(rows, "seq_len")
    lines = {k: v for k, v in _series(grp).items()}
    ranks_run = sorted({r["nranks"] for r in grp})
    target = sorted(set(predict_ranks or [2 * max(ranks_run), 4 * max(ranks_run), 8 * max(ranks_run)]) | set(ranks_run))
    varying = _varying(grp, SHAPE_KEYS)
    for i, (key, v) in enumerate(sorted(lines.items())):
        color, marker, ls = _style(key[0], i)
        color = _layout_color(key, i)
        ps_run, t, err = _ci_by(v, "nranks")
        ax_x.errorbar(ps_run, t * 1e3, yerr=err * 1e3, marker=marker, ls="none", color=color, capsize=3)
        ps = [p for p in target if n % divisor(key[1], p) == 0]
        pt = [model.predict(results.shape(v[0], nranks=p), cal).time_s * 1e3 for p in ps]
        if key[2]:  # causal lines of one mode: the dash tells the layouts apart
            ls = {"contiguous": "-", "zigzag": "--", "striped": "-."}.get(key[1], ls)
        label = _line_label(v[0], varying) + (" (model: same as blocking)" if key[0] == "allgather" else "")
        ax_x.plot(ps, pt, ls=ls, color=color, lw=1.6, label=label)
    ax_x.plot([], [], marker="o", ls="none", color="0.4", label="measured")
    _logx_ranks(ax_x, target)
    ax_x.set_yscale("log")
    _plain_log(ax_x.yaxis)
    ax_x.set_xlabel("MPI ranks P")
    ax_x.set_ylabel("pass time [ms]")
    ax_x.set_title(f"predicted (lines) and measured (markers) at N = {n}", fontsize=9)
    ax_x.grid(True, which="both", alpha=0.3)
    ax_x.legend(fontsize=7)
    note = f"model calibration: {cal.source}" + "".join(f"; {x}" for x in cal.notes)
    return _finish(fig, runs, "Overlap model: predicted vs measured", note=note)


STRATEGY_COLORS = {"overlap": "#4c72b0", "blocking": "#c44e52", "allgather": "#55a868", "ulysses": "#8172b2", "pass-q": "#ccb974"}
HYBRID_COLORS = ("#dd8452", "#da8bc3", "#937860", "#64b5cd")


def strategy_color(label: str) -> str:
    if label.startswith("hybrid U="):  # U = 2, 4, 8, 16 ...: one colour each
        return HYBRID_COLORS[(int(label.split("=")[1]).bit_length() - 2) % len(HYBRID_COLORS)]
    return STRATEGY_COLORS.get(label, "0.5")


def _edges(values) -> np.ndarray:
    """Cell edges around sorted positive values on a log axis: geometric midpoints, half a step beyond each end."""
    v = np.asarray(sorted(values), dtype=np.float64)
    if len(v) == 1:
        return np.array([v[0] / 2**0.5, v[0] * 2**0.5])
    mid = np.sqrt(v[1:] * v[:-1])
    return np.concatenate([[v[0] ** 2 / mid[0]], mid, [v[-1] ** 2 / mid[-1]]])


MAX_MAP_PANELS = 6


def strategy_map(runs, cal: model.Calibration | None):
    """Predicted fastest strategy over (N, P) with the measured winners of the runs on top: one panel per family
    (phase, layout, mask, dtype, shape: what stays fixed while N and P vary), the families with most points first
    (at most MAX_MAP_PANELS). The title of each panel says how often the predicted winner was the measured one."""
    if cal is None:
        return None
    families = defaultdict(list)
    for p in results.strategy_points(results.rows(_ok(runs))):
        families[tuple(p[k] for k in results.COMPARE_KEY if k not in ("seq_len", "nranks"))].append(p)
    if not families:
        return None
    panels = sorted(families.values(), key=lambda v: (-len(v), [str(v[0][k]) for k in results.COMPARE_KEY]))[:MAX_MAP_PANELS]
    labels = sorted({s for pts in panels for p in pts for s in p["rows"]}, key=lambda s: results.mode_order(s.split()[0]) + (s,))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.0 + 4.8 * len(panels)), squeeze=False)
    for ax, points in zip(axes[:, 0], panels):
        _strategy_panel(ax, points, labels, cal)
    handles = [matplotlib.patches.Patch(color=strategy_color(s), alpha=0.6, label=s) for s in labels]
    handles += [
        matplotlib.lines.Line2D([], [], marker="o", ms=9, mfc="0.6", mec="k", mew=1.5, ls="none", label="measured winner (significant)"),
        matplotlib.lines.Line2D([], [], marker="X", ms=8, mfc="white", mec="0.35", ls="none", label="tie within the noise"),
    ]
    note = (
        "background: the model's fastest of the strategies measured (white: none can run); markers: measured, "
        f"margin = runner-up / winner [{measure.CONFIDENCE:.0%} CI]; calibration: {cal.source}"
    )
    more = f" ({len(families) - len(panels)} more families not drawn)" if len(families) > len(panels) else ""
    return _finish(fig, runs, f"Strategy map: fastest strategy over (N, P){more}", handles, note)


def _strategy_panel(ax, points: list[dict], labels: list[str], cal: model.Calibration) -> None:
    """One family's map: the predicted winner over a grid of (N, P) and the measured winners of its points."""
    from ringbench.config import validate

    agreement = results.strategy_agreement(points, lambda r: model.predict(results.shape(r), cal).time_s)
    mine = [s for s in labels if any(s in p["rows"] for p in points)]
    base = {s: next(p["rows"][s] for p in points if s in p["rows"]) for s in mine}
    seqs = sorted({p["seq_len"] for p in points})
    ranks = sorted({p["nranks"] for p in points})
    grid_n = sorted(set(seqs) | {seqs[0] // 2, seqs[-1] * 2} | {2**k for k in range(4, 40) if seqs[0] // 2 < 2**k < seqs[-1] * 2})
    grid_p = sorted(set(ranks) | {2 * ranks[-1], 4 * ranks[-1]})
    winner = np.full((len(grid_p), len(grid_n)), -1)
    for j, P in enumerate(grid_p):
        for i, N in enumerate(grid_n):
            times = {}
            for s in mine:
                shape = results.shape(dict(base[s], seq_len=N), nranks=P)
                if N >= P and not validate(shape.to_config(), P):
                    t = model.predict(shape, cal).time_s
                    if np.isfinite(t):
                        times[labels.index(s)] = t
            if times:
                winner[j, i] = min(times, key=times.get)
    colors = ["white"] + [strategy_color(s) for s in labels]
    ax.pcolormesh(
        _edges(grid_n),
        _edges(grid_p),
        winner + 1,
        cmap=matplotlib.colors.ListedColormap(colors),
        vmin=-0.5,
        vmax=len(labels) + 0.5,
        alpha=0.45,
    )
    for p in points:
        x, y = p["seq_len"], p["nranks"]
        if p["winner"]:
            ax.plot(x, y, "o", ms=15, mfc=strategy_color(p["winner"]), mec="k", mew=1.5, zorder=3)
            ci = "" if p["ci_lo"] is None else f" [{p['ci_lo']:.2f}, {p['ci_hi']:.2f}]"
            text = f"{p['winner']} {p['speedup']:.2f}x{ci}\nover {p['runner_up']}"
        else:
            ax.plot(x, y, "o", ms=15, mfc="white", mec="0.35", mew=1.5, zorder=3)
            ax.plot(x, y, "x", ms=8, color="0.35", mew=1.5, zorder=4)
            text = f"tie (noise): {p['best']} ~ {p['runner_up']}\n{p['speedup']:.2f}x, {p['verdict']}"
        if p["agree"] is False:
            text += f"\nmodel: {p['predicted_winner']}"
        ax.annotate(
            text, (x, y), xytext=(0, -16), textcoords="offset points", ha="center", va="top", fontsize=7, zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.7},
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(grid_n)
    ax.set_xticklabels([str(n) for n in grid_n], fontsize=8)
    ax.set_yticks(grid_p)
    ax.set_yticklabels([str(q) for q in grid_p])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(_edges(grid_n)[[0, -1]])
    ax.set_ylim(_edges(grid_p)[0] / 1.6, _edges(grid_p)[-1])  # room under the lowest row for its notes
    ax.set_xlabel("sequence length N [tokens]")
    ax.set_ylabel("MPI ranks P")
    r0 = points[0]
    phase = {"fwd": "forward", "bwd": "backward"}.get(r0.get("phase") or "fwd", r0.get("phase"))
    family = f"{phase}, {r0['layout']}{' causal' if r0['causal'] else ''}, {_shape_desc(r0)}, {r0['dtype']}"
    a, d = agreement["agree"], agreement["decided"]
    ax.set_title(
        f"{family}\npredicted winner = measured winner on {a} of {d} points" + (f" ({a / d:.0%})" if d else "")
        + f" with a significant margin ({agreement['ties']} ties left out); median |error| of the predicted times "
        + (f"{agreement['median_abs_error']:.0%}" if agreement["errors"] else "-"),
        fontsize=9,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _serving_rows(runs, pass_: str) -> list[dict]:
    return [r for r in inference.serving_rows(results.rows(_ok(runs))) if r["phase"] == pass_]


def prefill_figure(runs, cal: model.Calibration | None = None):
    """Prefill time against the cached fraction C / N, one line per strategy (and P, N, shape), Meta's crossover
    (C / N = 1 - 2 H_kv / H) as a vertical line, and the model's lines (dashed) with a calibration."""
    rows = _serving_rows(runs, "prefill")
    groups: dict = {}
    for r in rows:
        key = (r["nranks"], r["seq_len"], r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["dtype"], r["layout"])
        groups.setdefault(key, {}).setdefault(r["mode"], {}).setdefault(r.get("cached_tokens") or 0, []).append(r["time_s"])
    groups = {k: v for k, v in groups.items() if any(len(c) >= 2 for c in v.values())}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (key, modes) in zip(axes[0], sorted(groups.items())):
        P, n, b, h, hk, d, dtype, layout = key
        for i, (mode, by_c) in enumerate(sorted(modes.items())):
            cs = sorted(by_c)
            color = f"C{i}"
            ax.plot([c / n for c in cs], [np.median(by_c[c]) * 1e3 for c in cs], "o-", color=color, label=f"{mode} measured")
            if cal is not None and mode in ("overlap", "blocking", "pass-q", "allgather"):
                grid = np.linspace(0, cs[-1], 24)
                w = dict(nranks=P, seq_len=n, batch=b, heads=h, kv_heads=hk, head_dim=d, dtype=dtype, layout=layout)
                name = {"overlap": "pass-kv", "blocking": "pass-kv"}.get(mode, mode)
                pred = [inference.predict_prefill({**w, "cached_tokens": int(c)}, cal)[name] * 1e3 for c in grid]
                ax.plot(grid / n, pred, "--", color=color, alpha=0.7, label=f"{mode} model")
        cross = 1 - 2 * hk / h
        if 0 < cross < 1:
            ax.axvline(cross, color="0.5", ls=":", label=f"Meta's rule: C/N = {cross:.2f}")
        ax.set_xlabel("cached fraction C / N")
        ax.set_ylabel("prefill time (ms, median)")
        ax.set_yscale("log")
        ax.set_title(f"P={P} N={n} B={b} H={h}/{hk} D={d} {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    return _finish(fig, runs, "prefill against a KV cache: time per strategy by cached fraction")


def decode_figure(runs, cal: model.Calibration | None = None):
    """One decode step's time against P, one line per merge and batch, the model's lines (dashed) with a calibration."""
    rows = _serving_rows(runs, "decode")
    if not rows:
        return None
    groups: dict = {}
    for r in rows:
        key = (r["seq_len"], r.get("new_tokens") or 1, r["heads"], r["kv_heads"], r["head_dim"], r["dtype"], r["layout"])
        groups.setdefault(key, {}).setdefault((r.get("merge") or "tree", r["batch"]), {}).setdefault(r["nranks"], []).append(r["time_s"])
    fig, axes = plt.subplots(1, len(groups), figsize=(max(7.5, 5.5 * len(groups)), 4.2), squeeze=False)  # room for the title
    colors = {"ring": "C0", "tree": "C1", "gather": "C2"}
    for ax, (key, lines) in zip(axes[0], sorted(groups.items())):
        n, t, h, hk, d, dtype, layout = key
        styles = {}
        for merge, b in sorted(lines):
            by_p = lines[(merge, b)]
            ps = sorted(by_p)
            marker = styles.setdefault(b, "os^vD"[len(styles) % 5])
            ax.plot(ps, [np.median(by_p[p]) * 1e6 for p in ps], marker + "-", color=colors[merge], label=f"{merge} B={b}")
            if cal is not None:
                w = dict(seq_len=n, new_tokens=t, batch=b, heads=h, kv_heads=hk, head_dim=d, dtype=dtype, layout=layout)
                pred = [inference.predict_decode({**w, "nranks": p}, cal)[merge] * 1e6 for p in ps]
                ax.plot(ps, pred, "--", color=colors[merge], alpha=0.6)
        ax.set_xlabel("ranks P")
        ax.set_ylabel("decode step (us, median)")
        ax.set_yscale("log")
        ax.set_xticks(sorted({p for v in lines.values() for p in v}))
        ax.set_title(f"N={n} t={t} H={h}/{hk} D={d} {dtype} {layout}" + (" (dashed: model)" if cal is not None else ""), fontsize=9)
        ax.legend(fontsize=7)
    return _finish(fig, runs, "decode with a sharded KV cache: step time per merge by rank count")


def save(fig, out_dir: str, name: str, formats=FORMATS) -> list[str]:
    paths = []
    for ext in formats:
        path = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=130)
        paths.append(path)
    plt.close(fig)
    return paths


def render(
    runs, out_dir: str, *, only=None, cal=None, predict_ranks=None, timeline_run=None, formats=FORMATS
) -> tuple[list[str], list[str]]:
    """Draw the figures into ``out_dir``; returns (files written, 'name: why' for figures with no data)."""
    served = [r for r in runs if r.config.get("pass") in inference.SERVING]
    runs = [r for r in runs if r.config.get("pass") not in inference.SERVING]  # the training figures: training runs
    makers = {
        "prefill": (lambda: prefill_figure(served, cal), "needs prefill runs (--pass prefill) at 2 or more cached sizes"),
        "decode": (lambda: decode_figure(served, cal), "needs decode runs (--pass decode)"),
        "strong": (lambda: strong_scaling(runs), "needs one N run at 2 or more rank counts"),
        "weak": (lambda: weak_scaling(runs), "needs one N/P run at 2 or more rank counts"),
        "overlap": (lambda: overlap(runs, cal), "needs overlap/blocking runs with P > 1 at 2 or more block sizes"),
        "timeline": (lambda: timeline(runs, timeline_run), "needs a successful ring run (overlap, blocking or allgather)"),
        "timeline-bwd": (
            lambda: timeline(runs, timeline_run, "bwd"),
            "needs a ring run (overlap, blocking or allgather) with a backward (--pass bwd or fwd+bwd)",
        ),
        "overlap-bwd": (
            lambda: overlap(runs, cal, "bwd"),
            "needs backward overlap/blocking runs with P > 1 at 2 or more block sizes",
        ),
        "strong-fwdbwd": (lambda: strong_fwd_bwd(runs), "needs forward and backward of one N at 2 or more rank counts"),
        "breakdown": (lambda: breakdown(runs), "needs a successful run"),
        "causal": (lambda: causal_layouts(runs, cal), "needs causal runs with P > 1"),
        "model": (lambda: model_figure(runs, cal, predict_ranks), "needs a calibration (a probe or runs)"),
        "strategies": (lambda: strategy_map(runs, cal), "needs configurations run with 2 or more strategies and a calibration"),
        "packed": (lambda: packed_figure(runs), "needs runs with P > 1 that stored their pairs (ringbench from issue 20 on)"),
    }
    written, skipped = [], []
    if cal is not None and (warn := calibration_warning(cal, runs)):  # one line: the calibration was measured under load
        print(warn, file=sys.stderr)
    has_bwd = any(r.bwd is not None for r in runs)  # without a backward the backward's figures are not asked for
    default = [f for f in FIGURES if (has_bwd or f not in BWD_FIGURES) and (served or f not in SERVING_FIGURES)]
    default = [f for f in default if runs or f in SERVING_FIGURES]  # only serving runs: only their figures
    packed = any(r.config.get("docs") or r.config.get("window") for r in runs)
    default = [f for f in default if packed or f not in PACKED_FIGURES]
    for name in only or default:
        make, why = makers[name]
        fig = make()
        if fig is None:
            skipped.append(f"{name}: {why}")
        else:
            written += save(fig, out_dir, name, formats)
    return written, skipped
