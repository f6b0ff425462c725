"""Provenance: what a result or a benchmark records about the software and machine that produced it.

Small functions used by the run and the probe (through ``runner.provenance``), by failed runs (store), by
sweeps and job scripts (sweep) and by the benchmark scripts. Nothing here initialises MPI: package versions
come from the installed metadata, and the MPI library's own description (``comm.mpi_info``) is added by the
caller that runs under MPI.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import ringbench

PACKAGES = ("numpy", "h5py", "mpi4py")


def versions(packages=PACKAGES) -> dict:
    """ringbench, its result schema, Python, and each of ``packages`` that is installed (none is imported)."""
    info = {"ringbench": ringbench.__version__, "schema_version": ringbench.SCHEMA_VERSION, "python": platform.python_version()}
    for name in packages:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return info


def git_commit() -> str:
    """The commit of the ringbench source tree, if it is a git checkout ('' otherwise); '-dirty' when it has changes."""
    src = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    if res.returncode != 0:
        return ""
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second: ``2026-11-25T14:03:07+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def host() -> str:
    return socket.gethostname()


def argv() -> str:
    return " ".join(sys.argv)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor id (/proc/cpuinfo ``vendor_id``: GenuineIntel, AuthenticAMD, ...); '' if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo ``flags`` on x86, ``Features`` on Arm), lower case; empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    return set()


def simd_level(flags: set[str]) -> str:
    """The widest vector instructions among ``flags``, and the next one it lacks: 'AVX2, no AVX-512'."""
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2, no AVX-512"
    if "avx" in flags:
        return "AVX, no AVX2"
    if "sse4_2" in flags:
        return "SSE4.2, no AVX"
    if "sve" in flags:
        return "SVE"
    if "asimd" in flags:
        return "NEON, no SVE"
    return "SIMD level unknown"


def cpu() -> str:
    """CPU model and SIMD level, for benchmarks: 'AMD EPYC 7763 64-Core Processor (AVX2, no AVX-512)'."""
    return f"{cpu_model()} ({simd_level(cpu_flags())})"


def thread_pools() -> list[dict]:
    """This process's BLAS and OpenMP thread pools as threadpoolctl sees them: library, version, threads."""
    from threadpoolctl import threadpool_info

    keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{k: p.get(k) for k in keys} for p in threadpool_info()]


# ---------------------------------------------------------------------------------------------
# Conditions: how busy each host was while a probe or a run measured, and how much its repeats spread
# ---------------------------------------------------------------------------------------------
# A host is loaded (not a quiet machine) when work other than the job kept more cores busy, on average over the
# measurement, than QUIET_OTHER_CPUS or than QUIET_OTHER_SHARE of the cores the job leaves free (whichever is
# more: on a 2-core machine running 2 ranks, half a core of other work already slows a rank; on a 64-core node
# running 2, a few other busy cores do not); where /proc/stat is unknown, when the load average (1 min, start or
# end) exceeds QUIET_LOAD per core. A measurement is noisy when the slowest of its repeats took more than
# QUIET_SPREAD times the fastest (a quiet machine gives 1.0-1.3 over blocks of a millisecond and more: shorter
# ones are left out, SPREAD_MIN_S; time-sharing a core with another process gives 2-5). Calibration and runs
# differ when one is loaded and the other is not.
QUIET_OTHER_CPUS = 0.5
QUIET_OTHER_SHARE = 0.25
QUIET_LOAD = 1.0
QUIET_SPREAD = 2.0
SPREAD_MIN_S = 1e-3  # the spread is taken over measurements of at least a millisecond (shorter: jitter)


def _loadavg(path: str = "/proc/loadavg") -> list | None:
    """[1 min, 5 min, 15 min load average, runnable threads now] of this host, or None where unknown."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return [float(x) for x in fields[:3]] + [int(fields[3].split("/")[0])]
    except (OSError, ValueError, IndexError):
        return None


def _cpu_ticks(path: str = "/proc/stat") -> tuple | None:
    """(busy ticks, all ticks, cores) of this host since boot from /proc/stat (idle and iowait are idle; steal,
    time a hypervisor gave to others, is busy), or None where unknown."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
        t = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    except (OSError, ValueError, IndexError):
        return None
    idle = t[3] + t[4]
    return sum(t) - idle, sum(t), cores


def _own_cpu_s() -> float:
    """CPU seconds this process has used (every thread: its BLAS pool too)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_snapshot() -> dict:
    """What one rank samples when a measurement starts (and ends): host, wall clock, its own CPU time, the host's
    CPU tick counters and load average. Cheap (two small /proc reads); pass it to :func:`load_interval`."""
    return {"host": host(), "wall": time.monotonic(), "own": _own_cpu_s(), "ticks": _cpu_ticks(), "load": _loadavg()}


def load_interval(start: dict) -> dict:
    """One rank's view of the host from ``start`` (:func:`load_snapshot`) to now: wall seconds, its own CPU
    seconds, the host's busy CPU seconds (None where /proc/stat is unknown), cores, load average at both ends."""
    end = load_snapshot()
    busy = None
    if start["ticks"] and end["ticks"]:
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (end["ticks"][0] - start["ticks"][0]) / tick
    return {
        "host": end["host"],
        "wall_s": end["wall"] - start["wall"],
        "own_cpu_s": end["own"] - start["own"],
        "busy_cpu_s": busy,
        "cpus": (end["ticks"] or (0, 0, os.cpu_count() or 0))[2],
        "load_start": start["load"],
        "load_end": end["load"],
    }


def repeat_spread(seconds, min_s: float = SPREAD_MIN_S) -> float:
    """max / min over the repeats (axis 0) of a measurement's times, the median over everything else (blocks,
    ranks) that took ``min_s`` or more (shorter ones spread by the timer's and the scheduler's jitter alone):
    1.0 when every repeat took as long; nan without two positive repeats of such an entry."""
    import numpy as np  # here: importing provenance loads no array library

    t = np.asarray(seconds, dtype=np.float64)
    if t.ndim == 0 or t.shape[0] < 2 or t.size == 0 or not (t > 0).all():
        return float("nan")
    t = t.reshape(t.shape[0], -1)
    keep = np.median(t, axis=0) >= min_s
    return float(np.median(t.max(axis=0)[keep] / t.min(axis=0)[keep])) if keep.any() else float("nan")


def conditions(intervals: list[dict], spread: dict) -> dict:
    """The conditions of one probe or run, for its provenance, from every rank's :func:`load_interval` and the
    spread of each measured quantity (:func:`repeat_spread`): per host its cores, ranks, seconds, load average at
    start and end, and the cores busy on average: in all, with this job's ranks, and with other work."""
    hosts: dict = {}
    for iv in intervals:
        h = hosts.get(iv["host"])
        if h is None:  # the host's counters from its first rank (its other ranks read the same ones)
            h = hosts[iv["host"]] = {k: iv[k] for k in ("cpus", "wall_s", "busy_cpu_s", "load_start", "load_end")}
            h.update(ranks=0, own_cpu_s=0.0)
        h["ranks"] += 1
        h["own_cpu_s"] += iv["own_cpu_s"]
    out = {}
    for name, h in hosts.items():
        wall = max(h["wall_s"], 1e-9)
        own = h["own_cpu_s"] / wall
        busy = None if h["busy_cpu_s"] is None else h["busy_cpu_s"] / wall
        out[name] = {
            "cpus": h["cpus"],
            "ranks": h["ranks"],
            "seconds": h["wall_s"],
            "load_start": h["load_start"],
            "load_end": h["load_end"],
            "busy_cpus": busy,
            "own_cpus": own,
            "other_cpus": None if busy is None else max(0.0, busy - own),
        }
    return {"hosts": out, "spread": {k: float(v) for k, v in spread.items()}}


def loaded(cond: dict | None) -> str | None:
    """Why a probe or run was not measured on a quiet machine (one phrase: the busiest host, or the noisiest
    quantity), or None: quiet, or not recorded (results from before the conditions were)."""
    if not cond:
        return None
    for name, h in sorted((cond.get("hosts") or {}).items()):
        cpus, other = h.get("cpus") or 0, h.get("other_cpus")
        if other is not None:
            if other > max(QUIET_OTHER_CPUS, QUIET_OTHER_SHARE * (cpus - (h.get("own_cpus") or 0.0))):
                return f"other work kept {other:.1f} of {cpus} cores of {name} busy"
        else:
            worst = max((x[0] for x in (h.get("load_start"), h.get("load_end")) if x), default=0.0)
            if cpus and worst > QUIET_LOAD * cpus:
                return f"load average {worst:.1f} on {cpus} cores of {name}"
    for what, s in sorted((cond.get("spread") or {}).items()):
        if s > QUIET_SPREAD:  # nan never is
            return f"its {what.replace('_', ' ')} repeats spread x{s:.1f}"
    return None


def calibration_warning(cal, runs=()) -> str | None:
    """One line for report, plot and advise when the model's calibration ``cal`` (its ``conditions``: each probe's,
    or each run's it was fitted to) was measured on a loaded machine, or ``runs`` were and the calibration was not
    (the thresholds: QUIET_*); None when both look quiet or nothing was recorded. Pure."""
    cal_why = [w for w in map(loaded, getattr(cal, "conditions", None) or []) if w]
    conds = [r.provenance.get("conditions") for r in runs if getattr(r, "provenance", None)]
    run_why = [w for w in map(loaded, conds) if w]
    if cal_why:
        n = len(getattr(cal, "conditions", []))
        of = f"{len(cal_why)} of {n} of its measurements" if n > 1 else "it"
        return (
            f"warning: the model's calibration was measured on a loaded machine ({of}: {cal_why[0]}): its rates may be "
            "off; probe again on a quiet machine"
        )
    if run_why and any(getattr(cal, "conditions", None) or []):
        return (
            f"warning: {len(run_why)} of {len(conds)} runs were measured on a loaded machine ({run_why[0]}), the "
            "calibration on a quiet one: their times and the predictions differ by the load"
        )
    return None


def conditions_text(cond: dict) -> str:
    """One line of a probe's or run's conditions: per host the load average at start and end (1 min), the cores
    busy with other work; the largest spread of the repeats."""
    parts = []
    for name, h in sorted(cond.get("hosts", {}).items()):
        ld = "?" if not (h.get("load_start") and h.get("load_end")) else f"{h['load_start'][0]:.1f} -> {h['load_end'][0]:.1f}"
        other = "?" if h.get("other_cpus") is None else f"{h['other_cpus']:.1f}"
        parts.append(f"{name}: load {ld} on {h.get('cpus')} cores, other work {other} cores busy")
    spread = {k: v for k, v in cond.get("spread", {}).items() if v == v}  # nan: fewer than two repeats
    if spread:
        worst = max(spread, key=spread.get)
        parts.append(f"repeats spread up to x{spread[worst]:.2f} ({worst.replace('_', ' ')})")
    return "; ".join(parts)
