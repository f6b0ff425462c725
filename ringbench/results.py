"""Runs as table rows: one row per run, for the terminal report, CSV and pandas.

    >>> from ringbench import results
    >>> df = results.dataframe("scale.h5")          # pandas, imported only here
    >>> results.to_csv(results.rows(results.load("scale.h5")), "scale.csv")

Columns (``COLUMNS``): where the run is stored, its configuration, its summary metrics (seconds, TFLOP/s,
GB/s, shares in [0, 1]), the correctness check and provenance. No pandas needed except for ``dataframe``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ringbench import store
from ringbench.config import stored_point_id
from ringbench.model import Shape, block_bytes

CONFIG_COLUMNS = (
    "mode",
    "layout",
    "causal",
    "dtype",
    "seq_len",
    "nranks",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "backend",
    "progress",
    "tile_q",
    "repeat",
    "warmup",
    "seed",
)
SUMMARY_COLUMNS = (
    "time_s",
    "time_min_s",
    "time_max_s",
    "tflops",
    "compute_s",
    "exposed_comm_s",
    "comm_alone_s",
    "overlap_eff",
    "bandwidth_gbps",
    "imbalance",
    "flops",
    "bytes_per_rank",
    "unmasked_pairs",
)
COLUMNS = (
    ("file", "name", "point_id", "status", "error")
    + CONFIG_COLUMNS
    + ("tokens_per_rank", "block_bytes")
    + SUMMARY_COLUMNS
    + ("rel_err", "check_passed", "host", "backend_device", "mpi_library", "created_utc")
)

# What identifies a configuration apart from the mode: rows with the same key are compared side by side.
COMPARE_KEY = ("layout", "causal", "dtype", "seq_len", "nranks", "batch", "heads", "kv_heads", "head_dim", "backend")


def load(paths) -> list[store.Run]:
    """Runs of one or more result files (a path or a list of paths), in file order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = []
    for p in paths:
        runs += store.read(p)
    return runs


def row(run: store.Run) -> dict:
    """One run as a flat dict with the keys of ``COLUMNS``."""
    cfg, s, prov = run.config, run.summary, run.provenance
    pid = stored_point_id(cfg, run.nranks, run.point_id)  # runs stored under an older 8-hex id line up with their point
    out = {"file": run.path, "name": run.name, "point_id": pid, "status": run.status, "error": run.error}
    for k in CONFIG_COLUMNS:
        out[k] = run.nranks if k == "nranks" else cfg.get(k)
    try:
        shape = Shape.from_config(cfg, run.nranks)
        out["tokens_per_rank"], out["block_bytes"] = shape.n_local, block_bytes(shape)
    except (KeyError, ValueError):
        out["tokens_per_rank"] = out["block_bytes"] = None
    for k in SUMMARY_COLUMNS:
        v = s.get(k)
        out[k] = None if v == "none" else v
    out["rel_err"] = run.check.get("rel_err")
    out["check_passed"] = run.check.get("passed")
    out["host"] = ",".join(prov.get("hosts", []))
    devices = sorted(set(prov.get("devices", [])))
    out["backend_device"] = f"{prov.get('backend', cfg.get('backend', ''))}: {', '.join(devices)}"
    out["mpi_library"] = prov.get("mpi_library", "")
    out["created_utc"] = run.created_utc
    return out


def rows(runs) -> list[dict]:
    return [row(r) for r in runs]


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
    return pd.DataFrame(rows(runs), columns=list(COLUMNS))


def compare_modes(table: list[dict]) -> list[dict]:
    """Same configuration, different modes, side by side: median time per mode and the overlap speed-ups.

    One dict per configuration (``COMPARE_KEY``) with time_<mode>_s for the modes it has, and
    speedup_vs_blocking / speedup_vs_allgather = time of that mode / time of overlap (> 1: overlap is faster).
    """
    groups: dict = {}
    for r in table:
        if r["status"] != "ok" or r.get("time_s") is None:
            continue
        key = tuple(r[k] for k in COMPARE_KEY)
        groups.setdefault(key, {}).setdefault(r["mode"], []).append(r["time_s"])
    out = []
    for key, modes in groups.items():
        if len(modes) < 2:
            continue
        d = dict(zip(COMPARE_KEY, key))
        for m, ts in modes.items():
            d[f"time_{m}_s"] = _median(ts)
        ov = d.get("time_overlap_s")
        for other in ("blocking", "allgather"):
            t = d.get(f"time_{other}_s")
            d[f"speedup_vs_{other}"] = t / ov if (ov and t) else None
        out.append(d)
    return sorted(out, key=lambda d: tuple(str(d[k]) for k in COMPARE_KEY))


def sort_key(r: dict):
    """Order of rows in tables and figures: configuration, then N, P and mode (modes of one point adjacent)."""
    return (
        r["layout"],
        bool(r["causal"]),
        r["dtype"],
        r["batch"],
        r["heads"],
        r["kv_heads"],
        r["head_dim"],
        r["seq_len"],
        r["nranks"],
        r["mode"],
    )


def shape(r: dict, nranks: int | None = None) -> Shape:
    """The model's view of a row, optionally at another rank count."""
    return Shape(
        nranks=nranks or r["nranks"],
        seq_len=r["seq_len"],
        batch=r["batch"],
        heads=r["heads"],
        kv_heads=r["kv_heads"],
        head_dim=r["head_dim"],
        dtype=r["dtype"],
        causal=bool(r["causal"]),
        layout=r["layout"],
        mode=r["mode"],
    )


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
