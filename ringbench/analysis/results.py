"""Runs as table rows: one row per timed phase of a run (``phase``: fwd or bwd), for the terminal report, CSV and pandas.

    >>> from ringbench import results
    >>> df = results.dataframe("scale.h5")          # pandas, imported only here
    >>> results.to_csv(results.rows(results.load("scale.h5")), "scale.csv")

Columns (``COLUMNS``): where the run is stored, its configuration, its summary metrics (seconds, TFLOP/s,
GB/s, shares in [0, 1]), their spread (bootstrap confidence intervals over the repeats, computed here from the
stored samples: ``SPREAD_COLUMNS``), the correctness check and provenance. A row also carries the per-repeat
values the intervals come from (``REPEAT_KEYS``: tuples, in the DataFrame but not in the CSV). No pandas
needed except for ``dataframe``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ringbench import store
from ringbench.analysis import measure
from ringbench.analysis.model import Shape, block_bytes
from ringbench.config import MODES, SERVING_PASSES, stored_point_id

# ---------------------------------------------------------------------------------------------
# Which configuration a row is: one table. Every key a row carries from its run's configuration, in column order,
# with the value of runs stored before the key existed and its roles:
#   strategy  what strategies side by side differ in (the mode, hybrid's Ulysses degree)
#   compare   what makes two rows the same configuration, compared side by side across strategies (COMPARE_KEY)
#             and across phases (PHASE_KEY)
#   shape     what a figure's line is kept apart by, and named by when it varies (plot.SHAPE_KEYS)
#   sort      the order of rows in tables and figures (sort_key), in this order, then the mode and the phase
# A new configuration key is one line here (and its value for old runs), and every table, comparison, figure
# and CSV column follows. ``pass`` is a column, not a comparison key: a row's ``phase`` stands for it.
# ---------------------------------------------------------------------------------------------
IDENTITY = (
    # name, value in runs stored before the key existed, roles
    ("pass", "fwd", ()),
    ("mode", None, ("strategy",)),
    ("ulysses_degree", 1, ("strategy",)),
    ("merge", "tree", ("strategy",)),  # --pass decode's merge (runs stored before it: the default, never read)
    ("cached_tokens", 0, ("compare", "sort")),  # --pass prefill
    ("new_tokens", 1, ("compare", "sort")),  # --pass decode
    ("layout", None, ("compare", "sort")),
    ("causal", None, ("compare", "sort")),
    ("docs", "", ("compare", "shape", "sort")),  # packed documents (issue 20; runs stored before it: one document)
    ("window", 0, ("compare", "shape", "sort")),  # sliding window (0: none)
    ("dtype", None, ("compare", "shape", "sort")),
    ("seq_len", None, ("compare",)),
    ("nranks", None, ("compare",)),
    ("batch", None, ("compare", "shape", "sort")),
    ("heads", None, ("compare", "shape", "sort")),
    ("kv_heads", None, ("compare", "shape", "sort")),
    ("head_dim", None, ("compare", "shape", "sort")),
    ("backend", None, ("compare", "shape")),
    ("kernel", "native", ("compare", "shape")),
    ("blas", "auto", ("compare", "shape")),
    ("progress", None, ("shape",)),
    ("tile_q", None, ()),
    ("repeat", None, ()),
    ("warmup", None, ()),
    ("seed", None, ()),
)
CONFIG_COLUMNS = tuple(name for name, _, _ in IDENTITY)
DEFAULTS = {name: default for name, default, _ in IDENTITY if default is not None}


def value(row: dict, key: str):
    """``row[key]``, or the key's value in runs stored before it existed (``DEFAULTS``) for a row made without it."""
    return row[key] if key in row else DEFAULTS.get(key)


def keys(role: str) -> tuple:
    """The configuration keys of ``role`` (``IDENTITY``), in column order."""
    return tuple(name for name, _, roles in IDENTITY if role in roles)


SUMMARY_COLUMNS = tuple(m.key for m in measure.SUMMARY if m.column)  # the summary metrics (measure.SUMMARY)
# measure.CONFIDENCE intervals of the median over repeats (measure.median_ci); time_ci_rel = half-width / time_s.
# Empty (None) for failed runs, runs read without samples and runs with fewer than measure.MIN_REPEATS repeats.
SPREAD_COLUMNS = (
    "time_ci_lo_s",
    "time_ci_hi_s",
    "time_ci_rel",
    "compute_ci_lo_s",
    "compute_ci_hi_s",
    "exposed_comm_ci_lo_s",
    "exposed_comm_ci_hi_s",
)
# The slowest rank's pass / compute / exposed comm time of each repeat (measure.per_repeat), as tuples; () without samples.
REPEAT_KEYS = ("time_repeats_s", "compute_repeats_s", "exposed_comm_repeats_s")
COLUMNS = (
    ("file", "name", "point_id", "status", "error", "phase")
    + CONFIG_COLUMNS
    + ("tokens_per_rank", "block_bytes")
    + SUMMARY_COLUMNS
    + SPREAD_COLUMNS
    + ("rel_err", "check_passed", "host", "backend_device", "mpi_library", "created_utc")
)

# What identifies a configuration apart from the strategy: rows with the same key are compared side by side.
# The kernel (native, torch, flash-attn) and the GEMM library are part of it: native and torch runs are never pooled.
COMPARE_KEY = ("phase",) + keys("compare")
# What identifies a configuration apart from the phase (and the pass that ran it): fwd and bwd rows with the same
# key are shown side by side, whether one fwd+bwd run or matched fwd and bwd runs measured them.
PHASE_KEY = keys("strategy") + keys("compare")
# Order of rows in tables and figures: the configuration (layout, mask, dtype, shape), then N, P, the mode, the phase.
SORT_KEY = keys("sort") + ("seq_len", "nranks", "mode")


def load(paths) -> list[store.Run]:
    """Runs of one or more result files (a path or a list of paths), in file order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = []
    for p in paths:
        runs += store.read(p)
    return runs


def row(run: store.Run, phase: str = "fwd") -> dict:
    """One phase of a run as a flat dict with the keys of ``COLUMNS`` and ``REPEAT_KEYS`` (a phase the run lacks:
    empty metrics, as a failed run's)."""
    cfg, prov = run.config, run.provenance
    ph = run.phase(phase) or store.Phase()
    s = ph.summary
    pid = stored_point_id(cfg, run.nranks, run.point_id)  # runs stored under an older 8-hex id line up with their point
    out = {"file": run.path, "name": run.name, "point_id": pid, "status": run.status, "error": run.error, "phase": phase}
    for k in CONFIG_COLUMNS:  # a key the run was stored without: its value then (IDENTITY; version-1 runs, older runs)
        out[k] = run.nranks if k == "nranks" else (cfg.get(k) or DEFAULTS.get(k, cfg.get(k)))
    out["ulysses_degree"] = int(out["ulysses_degree"])  # hybrid's all-to-all group size
    try:
        shape = Shape.from_config(cfg, run.nranks)
        out["tokens_per_rank"], out["block_bytes"] = shape.n_local, block_bytes(shape)
    except (KeyError, ValueError):
        out["tokens_per_rank"] = out["block_bytes"] = None
    for k in SUMMARY_COLUMNS:
        v = s.get(k)
        out[k] = None if v == "none" else v
    out.update(spread(ph))
    out["rel_err"] = ph.check.get("rel_err")
    out["check_passed"] = ph.check.get("passed")
    out["host"] = ",".join(prov.get("hosts", []))
    devices = sorted(set(prov.get("devices", [])))
    out["backend_device"] = f"{prov.get('backend', cfg.get('backend', ''))}: {', '.join(devices)}"
    out["mpi_library"] = prov.get("mpi_library", "")
    out["created_utc"] = run.created_utc
    return out


def spread(run) -> dict:
    """The ``SPREAD_COLUMNS`` and ``REPEAT_KEYS`` of a run (its forward phase) or of a ``store.Phase``, from its samples."""
    out = dict.fromkeys(SPREAD_COLUMNS)
    out.update(dict.fromkeys(REPEAT_KEYS, ()))
    if not all(k in run.samples for k in ("total_s", "compute_s", "comm_s")):
        return out
    reps = measure.per_repeat(run.samples)
    for name, prefix in (("time_s", "time"), ("compute_s", "compute"), ("exposed_comm_s", "exposed_comm")):
        out[f"{prefix}_repeats_s"] = tuple(float(x) for x in reps[name])
        med, lo, hi = measure.median_ci(reps[name])
        if math.isfinite(lo):
            out[f"{prefix}_ci_lo_s"], out[f"{prefix}_ci_hi_s"] = lo, hi
            if prefix == "time":
                out["time_ci_rel"] = measure.relative_half_width(med, lo, hi)
    return out


def rows(runs, phases=store.PHASES) -> list[dict]:
    """One row per phase (of ``phases``) each run has; a run with none of them (a failed run) gives one row, of
    the first phase its configuration asks for."""
    out = []
    for r in runs:
        have = [p for p in r.phases() if p in phases]
        if not have and r.status != "ok":
            first = str(r.config.get("pass") or "fwd").split("+")[0]
            have = [first] if first in phases else []
        out += [row(r, p) for p in have]
        if r.config.get("pass") in SERVING_PASSES:  # a serving pass is stored as the forward: its row is named by its pass
            out[-len(have) :] = [{**x, "phase": r.config["pass"]} for x in out[-len(have) :]] if have else []
    return out


def to_csv(table: list[dict], path) -> None:
    """Write rows (``rows(...)``) as CSV with the ``COLUMNS`` header; empty cells for missing values."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in table:
            w.writerow({k: _csv(r.get(k)) for k in COLUMNS})


def _csv(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def dataframe(paths_or_runs):
    """A pandas DataFrame, one row per run (paths, or runs already read). Needs pandas (the plot extra)."""
    import pandas as pd

    runs = paths_or_runs
    if isinstance(paths_or_runs, (str, Path)) or (paths_or_runs and isinstance(paths_or_runs[0], (str, Path))):
        runs = load(paths_or_runs)
    return pd.DataFrame(rows(runs), columns=list(COLUMNS + REPEAT_KEYS))


def mode_order(mode: str) -> tuple:
    """Modes in the order of ``config.MODES``, then any other mode (a new strategy) by name; a strategy label
    (``hybrid U=2``) sorts with its mode, then by degree."""
    base, _, rest = mode.partition(" ")
    return (MODES.index(base), rest.zfill(8)) if base in MODES else (len(MODES), mode)


def compare_modes(table: list[dict]) -> list[dict]:
    """Runs of the same configuration (``COMPARE_KEY``) in different modes, compared pair by pair.

    One dict per configuration and pair of modes (a, b), a before b in ``mode_order``: the ``COMPARE_KEY``
    fields, ``mode`` = a, ``other`` = b, ``time_s`` / ``time_other_s`` (median over the pooled repeats of every
    run of that mode), ``speedup`` = time_other_s / time_s (> 1: ``mode`` is faster), ``speedup_ci_lo`` /
    ``speedup_ci_hi`` (its bootstrap confidence interval), ``time_ci_rel`` / ``time_other_ci_rel`` (the relative
    half-width of each time's interval; None with too few repeats), ``verdict`` (``measure.compare``:
    "significant", "not significant" or "too few repeats") and ``repeats`` / ``repeats_other`` (how many
    repeats each side pooled). Works for any mode names; hybrid is compared once per Ulysses degree (``mode`` is
    then its ``strategy_label``, ``hybrid U=2``).
    """
    groups: dict = {}
    for r in table:
        if r["status"] != "ok" or r.get("time_s") is None:
            continue
        key = tuple(value(r, k) for k in COMPARE_KEY)
        reps = groups.setdefault(key, {}).setdefault(strategy_label(r), [])  # hybrid once per Ulysses degree
        # runs read without samples: their median stands for them (one value, so "too few repeats")
        reps += list(r.get("time_repeats_s") or (r["time_s"],))
    out = []
    for key, modes in groups.items():
        names = sorted(modes, key=mode_order)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                c = measure.compare(modes[b], modes[a])
                d = dict(zip(COMPARE_KEY, key))
                d.update(
                    mode=a,
                    other=b,
                    time_s=float(np.median(modes[a])),
                    time_other_s=float(np.median(modes[b])),
                    time_ci_rel=_ci_rel(modes[a]),
                    time_other_ci_rel=_ci_rel(modes[b]),
                    speedup=c.ratio,
                    speedup_ci_lo=None if math.isnan(c.lo) else c.lo,
                    speedup_ci_hi=None if math.isnan(c.hi) else c.hi,
                    verdict=c.verdict,
                    repeats=c.n_new,
                    repeats_other=c.n_base,
                )
                out.append(d)
    return sorted(out, key=lambda d: tuple(_orderable(d[k]) for k in COMPARE_KEY) + mode_order(d["mode"]) + mode_order(d["other"]))


def phase_pairs(table: list[dict]) -> list[dict]:
    """The forward and backward of each configuration (``PHASE_KEY``), side by side.

    One dict per configuration with both phases measured: the ``PHASE_KEY`` fields, ``fwd`` and ``bwd`` (the rows:
    of the same fwd+bwd run where there is one, else the last fwd and the last bwd row), ``same_run`` (both rows
    from one fwd+bwd run), ``total_s`` (fwd + bwd time) and ``total_ci_lo_s`` / ``total_ci_hi_s`` /
    ``total_ci_rel``: the bootstrap interval of the median of the per-repeat sums (repeat i: the forward, then the
    backward, of the same run), only for one run with both phases (None otherwise: separate runs' repeats do not pair).
    """
    groups: dict = {}
    for r in table:
        if r["status"] == "ok" and r.get("time_s") is not None:
            groups.setdefault(tuple(value(r, k) for k in PHASE_KEY), []).append(r)
    out = []
    for key, rs in groups.items():
        by_run: dict = {}
        for r in rs:
            by_run.setdefault((r["file"], r["name"]), {})[r["phase"]] = r
        joint = [v for v in by_run.values() if {"fwd", "bwd"} <= set(v)]
        if joint:
            fwd, bwd = joint[-1]["fwd"], joint[-1]["bwd"]
        else:
            fwds, bwds = [r for r in rs if r["phase"] == "fwd"], [r for r in rs if r["phase"] == "bwd"]
            if not (fwds and bwds):
                continue
            fwd, bwd = fwds[-1], bwds[-1]
        d = dict(zip(PHASE_KEY, key))
        d.update(fwd=fwd, bwd=bwd, same_run=bool(joint), total_s=fwd["time_s"] + bwd["time_s"])
        d.update(total_ci_lo_s=None, total_ci_hi_s=None, total_ci_rel=None)
        a, b = fwd.get("time_repeats_s") or (), bwd.get("time_repeats_s") or ()
        if joint and a and len(a) == len(b):
            sums = np.add(a, b)
            med, lo, hi = measure.median_ci(sums)
            d["total_s"] = med
            if math.isfinite(lo):
                d.update(total_ci_lo_s=lo, total_ci_hi_s=hi, total_ci_rel=measure.relative_half_width(med, lo, hi))
        out.append(d)
    return sorted(out, key=lambda d: sort_key(d["fwd"]))


def _orderable(v) -> tuple:
    """Numbers in numeric order, anything else (str, None) as text after them."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _ci_rel(values) -> float | None:
    rel = measure.relative_half_width(*measure.median_ci(values))
    return None if math.isnan(rel) else rel


def sort_key(r: dict):
    """Order of rows in tables and figures (``SORT_KEY``): configuration, then N, P and mode (modes of one point
    adjacent), the forward first."""
    return tuple(bool(r[k]) if k == "causal" else value(r, k) for k in SORT_KEY) + (r.get("phase", "fwd") != "fwd",)


def shape(r: dict, nranks: int | None = None) -> Shape:
    """The model's view of a row: the pass of its phase (a forward row: fwd, a backward row: bwd), optionally at
    another rank count."""
    return Shape.from_config(r, nranks or r["nranks"]).with_(pass_=r.get("phase") or "fwd")


# ---------------------------------------------------------------------------------------------
# Strategies side by side: measured winners, and the model's predicted winners against them
# ---------------------------------------------------------------------------------------------
def strategy_label(r: dict) -> str:
    """A row's strategy: its mode, with the Ulysses degree for hybrid (``hybrid U=2``)."""
    return f"hybrid U={int(r.get('ulysses_degree') or 1)}" if r["mode"] == "hybrid" else r["mode"]


def strategy_points(table: list[dict]) -> list[dict]:
    """Configurations (``COMPARE_KEY``: one (N, P) of one shape) measured with two or more strategies.

    One dict per point: the ``COMPARE_KEY`` fields; ``repeats`` {strategy: per-repeat times, repeated runs pooled};
    ``times`` {strategy: median}; ``rows`` {strategy: one of its rows (the model's view)}; ``best`` and ``runner_up``
    (least and second-least median); ``speedup`` = runner-up time / best time with ``ci_lo`` / ``ci_hi`` and ``verdict``
    (``measure.compare`` of the two); ``winner``: ``best`` when the verdict is significant (the times differ by more
    than their spread), else None (a tie within the noise, or too few repeats).
    """
    groups: dict = {}
    for r in table:
        if r["status"] != "ok" or r.get("time_s") is None:
            continue
        g = groups.setdefault(tuple(r.get(k) for k in COMPARE_KEY), {})
        label = strategy_label(r)
        reps, _ = g.setdefault(label, ([], r))
        reps += list(r.get("time_repeats_s") or (r["time_s"],))
    out = []
    for key, by in groups.items():
        if len(by) < 2:
            continue
        times = {s: float(np.median(reps)) for s, (reps, _) in by.items()}
        best, runner_up = sorted(times, key=lambda s: (times[s], s))[:2]
        c = measure.compare(by[runner_up][0], by[best][0])
        d = dict(zip(COMPARE_KEY, key))
        d.update(
            repeats={s: tuple(reps) for s, (reps, _) in by.items()},
            times=times,
            rows={s: r for s, (_, r) in by.items()},
            best=best,
            runner_up=runner_up,
            speedup=c.ratio,
            ci_lo=None if math.isnan(c.lo) else c.lo,
            ci_hi=None if math.isnan(c.hi) else c.hi,
            verdict=c.verdict,
            winner=best if c.verdict == measure.SIGNIFICANT else None,
        )
        out.append(d)
    return sorted(out, key=lambda d: tuple(_orderable(d[k]) for k in COMPARE_KEY))


PREDICTED_TIE = 1e-9  # relative: predicted times this close are one prediction (the same arithmetic, summed in another order)


def strategy_agreement(points: list[dict], predict) -> dict:
    """How often the predicted winner is the measured one, and the error of the predicted times.

    ``predict(row) -> seconds`` (e.g. ``lambda r: model.predict(shape(r), cal).time_s``; nan: not predicted).
    Each point (``strategy_points``) gains ``predicted`` {strategy: seconds}, ``predicted_winner`` (least predicted
    time among the strategies measured there), ``predicted_winners`` (every strategy whose predicted time equals the
    least: the model cannot tell them apart, e.g. hybrid with U = P and Ulysses), ``agree`` (True where the point has a
    measured winner and it is one of them, False where it is not, None at a tie) and ``errors`` {strategy: (predicted -
    measured) / measured}. Returns {``points``, ``decided``: points
    with a measured winner, ``agree``: of those, where the predicted winner is it, ``ties``, ``errors``: every
    strategy time's relative error, ``median_abs_error``: median of their absolute values (nan if none)}.
    """
    decided = agree = ties = 0
    errors = []
    for p in points:
        pred = {s: float(predict(r)) for s, r in p["rows"].items()}
        valid = {s: t for s, t in pred.items() if math.isfinite(t)}
        p["predicted"] = pred
        p["predicted_winner"] = min(valid, key=lambda s: (valid[s], s)) if valid else None
        # strategies the model cannot tell apart (equal predicted times: hybrid with U = P is Ulysses) win together
        best = valid[p["predicted_winner"]] if valid else math.nan
        p["predicted_winners"] = sorted(s for s, t in valid.items() if t <= best * (1 + PREDICTED_TIE))
        p["errors"] = {s: (t - p["times"][s]) / p["times"][s] for s, t in valid.items() if p["times"][s] > 0}
        errors += list(p["errors"].values())
        if p["winner"] is None:
            p["agree"] = None
            ties += 1
        else:
            p["agree"] = p["winner"] in p["predicted_winners"]
            decided += 1
            agree += p["agree"]
    return {
        "points": points,
        "decided": decided,
        "agree": agree,
        "ties": ties,
        "errors": errors,
        "median_abs_error": float(np.median(np.abs(errors))) if errors else math.nan,
    }
