"""Array backends: the array module, the device, synchronisation and timers.

The only module that imports cupy. Everything else receives ``backend.xp``
(numpy or cupy) and stays backend-agnostic.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ringbench import env_int
from ringbench.config import BACKENDS, BLAS
from ringbench.kernels import kernel
from ringbench.kernels.mkl import MklMatmul
from ringbench.provenance import cpu_model, cpu_vendor


class BackendError(Exception):
    """A backend cannot be used as asked (user error: exit status 2)."""


def _bfloat16():
    try:
        import ml_dtypes  # optional: gives NumPy a bfloat16 dtype
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def local_rank() -> int:
    """The rank of this process among the ranks on its node, from the launcher's environment."""
    return env_int(
        (
            "MPI_LOCALRANKID",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "SLURM_LOCALID",
            "PMI_LOCAL_RANK",
            "MV2_COMM_WORLD_LOCAL_RANK",
            "PALS_LOCAL_RANKID",
        )
    )


@dataclass
class Backend:
    """What the ring needs from an array library."""

    name: str
    xp: Any
    device_name: str = "cpu"
    device_id: int | None = None
    _pinned: dict = field(default_factory=dict, repr=False)

    # -- dtypes -------------------------------------------------------------
    def dtype(self, name: str):
        """The storage dtype called ``name`` or BackendError naming what is allowed."""
        allowed = self.dtypes()
        if name not in allowed:
            raise BackendError(f"--dtype {name} is not supported by backend {self.name}; allowed: {', '.join(allowed)}")
        if name == "bfloat16":
            return _bfloat16()
        return np.dtype(name)

    def dtypes(self) -> tuple[str, ...]:
        names = ["float32", "float64", "float16"]
        if self.name == "numpy" and _bfloat16() is not None:
            names.append("bfloat16")
        return tuple(names)

    @staticmethod
    def compute_dtype(storage) -> np.dtype:
        """Accumulate half precision in float32; float64 stays float64 (the kernels' rule: kernel.compute_dtype)."""
        return kernel.compute_dtype(storage)

    # -- device -------------------------------------------------------------
    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def asnumpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a) if self.is_gpu else np.asarray(a)

    def asarray(self, a):
        return self.xp.asarray(a)

    def pinned_empty(self, key: str, shape, dtype) -> np.ndarray:
        """A host array in page-locked memory (for staging device buffers through MPI), reused by key."""
        shape = tuple(shape)
        have = self._pinned.get(key)
        if have is not None and have.shape == shape and have.dtype == np.dtype(dtype):
            return have
        if not self.is_gpu:
            arr = np.empty(shape, dtype)
        else:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            mem = self.xp.cuda.alloc_pinned_memory(nbytes)
            arr = np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)
        self._pinned[key] = arr
        return arr

    # -- timing -------------------------------------------------------------
    def timer(self) -> HostTimer | CudaTimer:
        return CudaTimer(self.xp) if self.is_gpu else HostTimer()

    # -- memory -------------------------------------------------------------
    def device_pool_bytes(self) -> int:
        if not self.is_gpu:
            return 0
        return int(self.xp.get_default_memory_pool().total_bytes())

    def device_free_bytes(self) -> int | None:
        """Device memory this rank could still allocate (free on the GPU + free blocks of CuPy's pool); None on the host."""
        if not self.is_gpu:
            return None
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return int(free) + int(self.xp.get_default_memory_pool().free_bytes())

    # -- matrix products ----------------------------------------------------
    def matmul(self, choice: str = "auto"):
        """The batched matrix product the kernel should use, and a description of the library behind it.

        ``numpy``: ``xp.matmul`` (NumPy's own BLAS, OpenBLAS in PyPI wheels; cuBLAS on CuPy).
        ``mkl``: Intel MKL's strided batched GEMM through ctypes (the ``mkl`` wheel: ``ringbench[mkl]``).
        ``auto``: on an Intel CPU, MKL where it can be loaded; otherwise ``numpy``. On AMD EPYC MKL's GEMMs measured
        5-25% slower than OpenBLAS's (benchmarks/README.md), so ``auto`` leaves them to ``--blas mkl`` there.
        """
        if choice not in BLAS:
            raise BackendError(f"--blas {choice!r} is unknown; allowed: {', '.join(BLAS)}")
        if self.is_gpu:
            if choice == "mkl":
                raise BackendError("--blas mkl applies to --backend numpy; CuPy always uses cuBLAS (use auto or numpy)")
            return self.xp.matmul, "cuBLAS (cupy.matmul)"
        if choice == "mkl" or (choice == "auto" and cpu_vendor() in ("GenuineIntel", "")):
            mkl = MklMatmul.load(thread_limit()[0])
            if mkl is not None:
                return mkl, mkl.describe()
            if choice == "mkl":
                raise BackendError("--blas mkl needs Intel MKL's runtime (libmkl_rt): pip install 'ringbench[mkl]'")
        return np.matmul, numpy_blas()

    def versions(self) -> dict:
        v = {"numpy": np.__version__}
        if self.is_gpu:
            v["cupy"] = self.xp.__version__
            try:
                v["cuda_runtime"] = str(self.xp.cuda.runtime.runtimeGetVersion())
            except Exception:  # pragma: no cover - depends on the CUDA install
                pass
        return v


class HostTimer:
    """Wall-clock interval on the host."""

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._t1 = time.perf_counter()

    def seconds(self) -> float:
        return self._t1 - self._t0


class CudaTimer:
    """Interval of device work on the current stream, measured with CUDA events."""

    def __init__(self, cp):
        self._cp = cp
        self._a = cp.cuda.Event()
        self._b = cp.cuda.Event()

    def start(self) -> None:
        self._a.record()

    def stop(self) -> None:
        self._b.record()

    def seconds(self) -> float:
        self._b.synchronize()
        return self._cp.cuda.get_elapsed_time(self._a, self._b) / 1e3


def get_backend(name: str, rank_on_node: int | None = None) -> Backend:
    """Make the backend ``name``; for cupy, bind this rank to GPU (local rank mod GPU count)."""
    if name == "numpy":
        return Backend("numpy", np, device_name=cpu_model())
    if name != "cupy":
        raise BackendError(f"--backend {name!r} is unknown; allowed: {', '.join(BACKENDS)}")
    try:
        import cupy as cp
    except ImportError as exc:
        raise BackendError(f"--backend cupy needs CuPy: pip install 'ringbench[gpu]' ({exc})") from None
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception:
        count = 0
    if count == 0:
        raise BackendError("--backend cupy needs a CUDA GPU, and this rank sees none; use --backend numpy")
    dev, warning = select_device(local_rank() if rank_on_node is None else rank_on_node, count)
    if warning:
        print(f"ringbench: warning: {warning}", file=sys.stderr, flush=True)
    cp.cuda.Device(dev).use()
    props = cp.cuda.runtime.getDeviceProperties(dev)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend("cupy", cp, device_name=gpu, device_id=dev)


def select_device(rank_on_node: int, count: int) -> tuple[int, str | None]:
    """The GPU of the rank with local rank ``rank_on_node`` among ``count`` visible ones: local rank mod count.

    More ranks than GPUs on a node (testing on one GPU, say) share them round-robin instead of failing. The
    first rank that wraps around (local rank == count) also gets a warning to print, so a node warns once.
    """
    dev = rank_on_node % count
    if rank_on_node != count:
        return dev, None
    host = socket.gethostname()
    return dev, (
        f"more ranks than GPUs on {host} ({count} visible): ranks share them round-robin (GPU = local rank mod {count}); "
        "timings are then not those of one GPU per rank"
    )


def numpy_blas() -> str:
    """The BLAS library NumPy was built with (for provenance)."""
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"numpy.matmul ({blas.get('name', '?')} {blas.get('version', '')})".replace(" )", ")")
    except Exception:  # noqa: BLE001 - older NumPy has no dict mode: the description is only provenance
        return "numpy.matmul"


# ---------------------------------------------------------------------------------------------
# BLAS and OpenMP threads
# ---------------------------------------------------------------------------------------------
THREAD_VARS = ("RINGBENCH_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_limit(environ=None) -> tuple[int, str]:
    """How many BLAS/OpenMP threads each rank may use, and what decided it.

    One rule: the first of RINGBENCH_THREADS, OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS that
    holds a positive integer, else 1 ("default"): ranks are the parallelism, and BLAS threads on top of them
    only fight over cores. A RINGBENCH_THREADS that is not a positive integer is a user error.
    """
    environ = os.environ if environ is None else environ
    for var in THREAD_VARS:
        value = environ.get(var, "").strip()
        if not value:
            continue
        if value.isdigit() and int(value) > 0:
            return int(value), var
        if var == "RINGBENCH_THREADS":
            raise BackendError(f"RINGBENCH_THREADS: expected a positive integer, got {value!r}")
    return 1, "default"


def limit_threads(n: int | None = None) -> int:
    """Limit every BLAS and OpenMP thread pool loaded in this process to ``n`` threads (default: thread_limit).

    Works at run time (threadpoolctl), whatever was imported first; MKL loaded through ctypes is covered too
    (its pool is one threadpoolctl finds, and ringbench.kernels.mkl also sets it when it loads). Returns ``n``.
    """
    from threadpoolctl import threadpool_limits

    n = thread_limit()[0] if n is None else n
    threadpool_limits(limits=n)
    return n


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable of this node (what can be allocated without swapping), shared by every process on it;
    None where the kernel does not say (no /proc/meminfo)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


CGROUP_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2^63: anything this large is none


def cgroup_memory_headroom(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup") -> tuple[int, str] | None:
    """Bytes this process's memory cgroup still lets it allocate before the kernel OOM-kills it, and the folder
    of the cgroup that binds; None where no cgroup limits memory (or there are no cgroups).

    The process's cgroup comes from ``proc_cgroup``: cgroup v1's memory controller line (``N:...memory...:/path``,
    files under ``root``/memory) if there is one, else v2's ``0::/path`` (files under ``root``). That cgroup and
    every ancestor that has a limit count (Slurm limits the job's cgroup; the step's below it may have none);
    the smallest headroom wins. Headroom = limit - (usage - inactive page cache, which is reclaimed before an OOM
    kill): v2 memory.max, memory.current and memory.stat's inactive_file; v1 memory.limit_in_bytes,
    memory.usage_in_bytes and total_inactive_file. A level whose files are missing or unreadable has no limit
    (a container without a cgroup namespace sees a path that its mount does not have: its own cgroup is the root).
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    entries = [ln.split(":", 2) for ln in lines if ln.count(":") >= 2]  # hierarchy id, controllers, path
    v1 = [path for _, ctrls, path in entries if "memory" in ctrls.split(",")]
    v2 = [path for hid, ctrls, path in entries if hid == "0" and not ctrls]
    if v1:
        base, path, names = os.path.join(root, "memory"), v1[0], ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    elif v2:
        base, path, names = str(root), v2[0], ("memory.max", "memory.current", "inactive_file")
    else:
        return None
    parts = [p for p in path.split("/") if p]
    best = None
    for depth in range(len(parts), -1, -1):  # the process's cgroup, then each ancestor up to the mount's root
        folder = os.path.join(base, *parts[:depth])
        limit = _cgroup_value(os.path.join(folder, names[0]))
        if limit is None or limit >= CGROUP_NO_LIMIT:
            continue
        used = _cgroup_value(os.path.join(folder, names[1])) or 0
        used -= _cgroup_stat(os.path.join(folder, "memory.stat"), names[2])
        if best is None or limit - used < best[0]:
            best = (limit - used, folder)
    return best


def _cgroup_value(path: str) -> int | None:
    """The integer in a cgroup file; None for 'max' (v2's no limit), a missing or unreadable file."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _cgroup_stat(path: str, key: str) -> int:
    """One counter of a cgroup's memory.stat (0 where it is missing)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_memory(meminfo: str = "/proc/meminfo", proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup"):
    """What the ranks of this node may allocate together, and what bounds it, as a refusal names it: the smaller of
    the node's MemAvailable ("available there") and what this process's memory cgroup leaves (a Slurm job's
    --mem: :func:`cgroup_memory_headroom`). (None, ...) where neither is known."""
    avail = host_available_bytes(meminfo)
    cg = cgroup_memory_headroom(proc_cgroup, cgroup_root)
    if cg is not None and (avail is None or cg[0] < avail):
        return max(0, cg[0]), f"its memory cgroup leaves ({cg[1]}: limit minus usage, below the node's MemAvailable)"
    return avail, "available there"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
