"""Intel MKL's strided batched GEMM for NumPy arrays, through ctypes (``--blas mkl``).

One call of ``cblas_?gemm_batch_strided`` computes ``C[i] = alpha * op(A[i]) @ op(B[i]) + beta * C[i]`` for
``i < batch``, with ``A[i]`` at ``a + i * stride_a`` (in elements; likewise B and C). Each matrix is described
to MKL as row-major storage with a leading dimension (the distance between rows, in elements) and a flag
saying whether to transpose it. :func:`plan` turns NumPy operands into those arguments in named steps
(:func:`matrix_layout`, :func:`output_layout`, :func:`batch_strides`, :func:`single_product_strides`), each
a pure function of shapes and strides; operands it cannot describe are left to ``numpy.matmul``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import NamedTuple

import numpy as np

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS_LAYOUT and CBLAS_TRANSPOSE values
SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL for MKL_Set_Threading_Layer


class Gemm(NamedTuple):
    """The arguments of one ``cblas_?gemm_batch_strided`` call, apart from pointers, alpha and beta."""

    trans_a: int
    trans_b: int
    m: int
    n: int
    k: int
    lda: int
    stride_a: int
    ldb: int
    stride_b: int
    ldc: int
    stride_c: int
    batch: int


def element_strides(x: np.ndarray) -> tuple[int, ...] | None:
    """``x``'s strides counted in elements, or None when one is negative or not a whole number of elements.

    MKL walks every matrix forwards from the pointer it is given: a reversed view (``a[::-1]``) cannot be
    described to it, and a byte stride that splits an element (a view into a record array) cannot either.
    """
    item = x.itemsize
    if any(s < 0 or s % item for s in x.strides):
        return None
    return tuple(s // item for s in x.strides)


def matrix_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) that describe the last two axes of an operand to MKL, or None.

    MKL reads a row-major matrix whose rows are contiguous (column stride 1), each row ``ld`` elements after
    the previous one, with ``ld >= columns``. A matrix whose columns are contiguous instead (a transposed view,
    row stride 1) is the row-major storage of its transpose: pass it with TRANS and ``ld`` = the column
    stride, ``ld >= rows``. A single row or column is contiguous either way. ``strides`` are in elements.
    """
    rows, cols = shape[-2], shape[-1]
    r, c = strides[-2], strides[-1]
    if c == 1 or cols == 1:
        return NO_TRANS, max(r, cols, 1)
    if r == 1 or rows == 1:
        return TRANS, max(c, rows, 1)
    return None


def output_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """Leading dimension of the output C, or None: MKL writes C row-major without transposing, so its rows
    must be contiguous (column stride 1, or a single column); ``ldc >= n``."""
    n = shape[-1]
    if strides[-1] != 1 and n != 1:
        return None
    return max(strides[-2], n, 1)


def batch_strides(a_shape, a_strides, b_shape, b_strides, out_shape, out_strides) -> tuple[int, int, int] | None:
    """(stride_a, stride_b, stride_c) between the products of a 3-D batch, in elements, or None.

    The batch is the output's first axis. An input holding one matrix is broadcast over it with stride 0;
    otherwise its first axis must be as long as the batch. C may not have stride 0 over a batch of several
    products (they would all write the same matrix).
    """
    batch = out_shape[0]
    if a_shape[0] not in (1, batch) or b_shape[0] not in (1, batch):
        return None
    stride_c = out_strides[0]
    if batch > 1 and stride_c == 0:
        return None
    stride_a = a_strides[0] if a_shape[0] > 1 else 0
    stride_b = b_strides[0] if b_shape[0] > 1 else 0
    return stride_a, stride_b, stride_c


def single_product_strides(lda: int, ldb: int, ldc: int, m: int, n: int, k: int) -> tuple[int, int, int]:
    """Batch strides for one 2-D product: unused by MKL, but it checks that each is at least one matrix
    (``stride_c >= ldc * m``, and likewise for A and B), so pass the smallest values it accepts."""
    return lda * max(m, k), ldb * max(k, n), ldc * m


def plan(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> Gemm | None:
    """The MKL call that computes ``out = a @ b (+ beta * out)``, or None when the operands do not fit it.

    Takes 2-D operands, or 3-D ones with a batch axis first; the caller checks the dtypes.
    """
    if a.ndim not in (2, 3) or b.ndim != a.ndim or out.ndim != a.ndim:
        return None
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if b.shape[-2] != k or out.shape[-2:] != (m, n):
        return None
    sa, sb, so = element_strides(a), element_strides(b), element_strides(out)
    if sa is None or sb is None or so is None:
        return None
    la, lb, ldc = matrix_layout(a.shape, sa), matrix_layout(b.shape, sb), output_layout(out.shape, so)
    if la is None or lb is None or ldc is None:
        return None
    if out.ndim == 3:
        strides = batch_strides(a.shape, sa, b.shape, sb, out.shape, so)
        if strides is None:
            return None
        batch = out.shape[0]
    else:
        strides, batch = single_product_strides(la[1], lb[1], ldc, m, n, k), 1
    return Gemm(la[0], lb[0], m, n, k, la[1], strides[0], lb[1], strides[1], ldc, strides[2], batch)


class MklMatmul:
    """``matmul(a, b, out=c)`` for NumPy arrays through MKL's ``cblas_?gemm_batch_strided``: one call per batch.

    Takes 2-D or 3-D float32/float64 operands whose rows are contiguous (a leading dimension, any row
    stride) or whose columns are (a transposed view), and a batch stride that may be 0 (broadcast). Anything
    else falls back to ``numpy.matmul``, so results never depend on which path ran... except for rounding:
    the two libraries may sum in different orders, which is why the choice is part of a run's identity.

    Threads: the first :meth:`load` fixes MKL's threading layer: sequential for one thread (one rank per
    core, as ``ringbench run`` asks by default), else MKL's OpenMP layer with ``threads`` threads.
    """

    _instance = None
    _tried = False
    ROW_MAJOR, NO_TRANS, TRANS = ROW_MAJOR, NO_TRANS, TRANS

    def __init__(self, lib, threads: int = 1):
        self.lib = lib
        c = ctypes
        # (layout, trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch)
        matrix = [c.c_void_p, c.c_int64, c.c_int64]  # pointer, leading dimension, batch stride
        args = [c.c_int] * 3 + [c.c_int64] * 3 + [None] + matrix * 2 + [None] + matrix + [c.c_int64]  # None: the scalar type
        self.fns = {}
        for dt, name, scalar in (
            (np.float32, "cblas_sgemm_batch_strided", c.c_float),
            (np.float64, "cblas_dgemm_batch_strided", c.c_double),
        ):
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [scalar if a is None else a for a in args]
            self.fns[np.dtype(dt)] = fn
        if threads <= 1:
            lib.MKL_Set_Threading_Layer(SEQUENTIAL)  # before any other MKL call: one thread per rank
        else:
            self.set_threads(threads)
        lib.MKL_Get_Version_String.argtypes = [c.c_char_p, c.c_int]
        buf = c.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, 256)
        self.version = buf.value.decode(errors="replace").strip()

    @classmethod
    def load(cls, threads: int = 1) -> MklMatmul | None:
        """The MKL binding (made once per process), or None where libmkl_rt cannot be loaded."""
        if not cls._tried:
            cls._tried = True
            for path in _mkl_candidates():
                try:
                    cls._instance = cls(ctypes.CDLL(path), threads)
                    break
                except (OSError, AttributeError):
                    continue
        return cls._instance

    def set_threads(self, n: int) -> None:
        """MKL's thread count (no effect under the sequential layer, which is one thread)."""
        self.lib.MKL_Set_Num_Threads(ctypes.c_int(max(int(n), 1)))

    def describe(self) -> str:
        return f"Intel MKL cblas_?gemm_batch_strided ({self.version})"

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
        if fn is None or a.dtype != b.dtype or a.dtype != out.dtype:
            return False
        g = plan(a, b, out)
        if g is None:
            return False
        if g.m == 0 or g.n == 0 or g.batch == 0:
            return True
        fn(
            ROW_MAJOR,
            g.trans_a,
            g.trans_b,
            g.m,
            g.n,
            g.k,
            1.0,
            a.ctypes.data,
            g.lda,
            g.stride_a,
            b.ctypes.data,
            g.ldb,
            g.stride_b,
            beta,
            out.ctypes.data,
            g.ldc,
            g.stride_c,
            g.batch,
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
