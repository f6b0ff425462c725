"""Array backends: the array module, the device, synchronisation and timers.

The only module that imports cupy. Everything else receives ``backend.xp``
(numpy or cupy) and stays backend-agnostic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ringbench import env_int
from ringbench.config import BACKENDS, BLAS


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
        """Accumulate half precision in float32; float64 stays float64."""
        return np.dtype(np.float64) if np.dtype(storage) == np.float64 else np.dtype(np.float32)

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
        ``auto``: MKL where it can be loaded, on the numpy backend; otherwise ``numpy``.
        """
        if choice not in BLAS:
            raise BackendError(f"--blas {choice!r} is unknown; allowed: {', '.join(BLAS)}")
        if self.is_gpu:
            if choice == "mkl":
                raise BackendError("--blas mkl applies to --backend numpy; CuPy always uses cuBLAS (use auto or numpy)")
            return self.xp.matmul, "cuBLAS (cupy.matmul)"
        if choice != "numpy":
            mkl = MklMatmul.load()
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
        return Backend("numpy", np, device_name=_cpu_name())
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
    dev = (local_rank() if rank_on_node is None else rank_on_node) % count
    cp.cuda.Device(dev).use()
    props = cp.cuda.runtime.getDeviceProperties(dev)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend("cupy", cp, device_name=gpu, device_id=dev)


def numpy_blas() -> str:
    """The BLAS library NumPy was built with (for provenance)."""
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"numpy.matmul ({blas.get('name', '?')} {blas.get('version', '')})".replace(" )", ")")
    except Exception:  # noqa: BLE001 - older NumPy has no dict mode: the description is only provenance
        return "numpy.matmul"


class MklMatmul:
    """``matmul(a, b, out=c)`` for NumPy arrays through MKL's ``cblas_?gemm_batch_strided``: one call per batch.

    Takes 2-D or 3-D float32/float64 operands whose rows are contiguous (a leading dimension, any row
    stride) or whose columns are (a transposed view), and a batch stride that may be 0 (broadcast). Anything
    else falls back to ``numpy.matmul``, so results never depend on which path ran... except for rounding:
    the two libraries may sum in different orders, which is why the choice is part of a run's identity.
    """

    _instance = None
    _tried = False
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self, lib):
        self.lib = lib
        c = ctypes
        args = [
            c.c_int,
            c.c_int,
            c.c_int,
            c.c_int64,
            c.c_int64,
            c.c_int64,
            None,
            c.c_void_p,
            c.c_int64,
            c.c_int64,
            c.c_void_p,
            c.c_int64,
            c.c_int64,
            None,
            c.c_void_p,
            c.c_int64,
            c.c_int64,
            c.c_int64,
        ]
        self.fns = {}
        for dt, name, scalar in (
            (np.float32, "cblas_sgemm_batch_strided", c.c_float),
            (np.float64, "cblas_dgemm_batch_strided", c.c_double),
        ):
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [scalar if a is None else a for a in args]
            self.fns[np.dtype(dt)] = fn
        lib.MKL_Set_Threading_Layer(1)  # MKL_THREADING_SEQUENTIAL: one thread per rank
        lib.MKL_Get_Version_String.argtypes = [c.c_char_p, c.c_int]
        buf = c.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, 256)
        self.version = buf.value.decode(errors="replace").strip()

    @classmethod
    def load(cls) -> MklMatmul | None:
        if not cls._tried:
            cls._tried = True
            for path in _mkl_candidates():
                try:
                    cls._instance = cls(ctypes.CDLL(path))
                    break
                except (OSError, AttributeError):
                    continue
        return cls._instance

    def describe(self) -> str:
        return f"Intel MKL cblas_?gemm_batch_strided ({self.version})"

    @staticmethod
    def _layout(x, item):
        """(trans flag, leading dimension) of a 2-D matrix view, or None if neither rows nor columns are contiguous."""
        r, c = x.strides[-2] // item, x.strides[-1] // item
        rows, cols = x.shape[-2], x.shape[-1]
        if c == 1 or cols == 1:
            return MklMatmul.NO_TRANS, max(r, cols, 1)
        if r == 1 or rows == 1:
            return MklMatmul.TRANS, max(c, rows, 1)
        return None

    def matmul_add(self, a, b, out) -> None:
        """out += a @ b in one GEMM (beta = 1): no temporary, no extra pass over ``out``."""
        if not self._gemm(a, b, out, 1.0):
            out += np.matmul(a, b)

    def __call__(self, a, b, out=None):
        if out is None:
            out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), np.result_type(a, b))
        if not self._gemm(a, b, out, 0.0):
            np.matmul(a, b, out=out)
        return out

    def _gemm(self, a, b, out, beta: float) -> bool:
        """out = a @ b + beta * out through MKL; False (nothing done) when the operands do not fit it."""
        fn = self.fns.get(a.dtype) if isinstance(a, np.ndarray) else None
        if fn is None or a.dtype != b.dtype or a.dtype != out.dtype or a.ndim not in (2, 3) or b.ndim != a.ndim or out.ndim != a.ndim:
            return False
        item = a.itemsize
        m, k = a.shape[-2:]
        n = b.shape[-1]
        batch = out.shape[0] if out.ndim == 3 else 1
        la, lb = self._layout(a, item), self._layout(b, item)
        oc = out.strides[-1] // item
        if (
            la is None
            or lb is None
            or (oc != 1 and n != 1)
            or b.shape[-2] != k
            or out.shape[-2:] != (m, n)
            or any(x.strides[-1] % item or x.strides[-2] % item for x in (a, b, out))
        ):
            return False
        if out.ndim == 3:
            sa = a.strides[0] // item if a.shape[0] > 1 else 0
            sb = b.strides[0] // item if b.shape[0] > 1 else 0
            so = out.strides[0] // item
            if (
                a.shape[0] not in (1, batch)
                or b.shape[0] not in (1, batch)
                or (batch > 1 and so == 0)
                or any(x.strides[0] % item for x in (a, b, out))
            ):
                return False
        if m == 0 or n == 0 or batch == 0:
            return True
        ldo = max(out.strides[-2] // item, n, 1)
        if out.ndim == 2:  # one product: strides unused, but MKL checks stride_c >= ldc * m
            sa, sb, so = la[1] * max(m, k), lb[1] * max(k, n), ldo * m
        fn(
            self.ROW_MAJOR,
            la[0],
            lb[0],
            m,
            n,
            k,
            1.0,
            a.ctypes.data,
            la[1],
            sa,
            b.ctypes.data,
            lb[1],
            sb,
            beta,
            out.ctypes.data,
            ldo,
            so,
            batch,
        )
        return True


def _mkl_candidates():
    """Where libmkl_rt may be: the mkl wheel puts it in <prefix>/lib; else the loader's search path."""
    names = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        names += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    found = ctypes.util.find_library("mkl_rt")
    if found:
        names.append(found)
    return names


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


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


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
