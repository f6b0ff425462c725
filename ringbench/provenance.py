"""Provenance: what a result or a benchmark records about the software and machine that produced it.

Small functions used by the run and the probe (through ``runner.provenance``), by failed runs (store), by
sweeps and job scripts (sweep) and by the benchmark scripts. Nothing here initialises MPI: package versions
come from the installed metadata, and the MPI library's own description (``comm.mpi_info``) is added by the
caller that runs under MPI.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import socket
import subprocess
import sys
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
