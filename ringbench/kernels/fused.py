"""The score tile's elementwise work in one pass, compiled by numba (optional: ``pip install 'ringbench[numba]'``).

Pure math on NumPy arrays, imported by :mod:`ringbench.kernels.kernel` only when the fused exponential is chosen or
measured. One call does, for every row of a score tile s (log2 units, already shifted by the row's reference):

    p = 2^s on the row's visible columns, p = 0 on its hidden ones, and r = the row's sum of p

in place of NumPy's separate passes (set the hidden scores, ``exp2``, zero the hidden terms, the row-sum GEMV).

The float32 2^x is Cephes' ``expf`` polynomial on x = n + f, |f| <= 1/2: 2^f = e^(f ln 2), scaled by 2^n built
from its exponent bits; max relative error 7.9e-8 against float64 (NumPy's float32 exp2: 2.2e-7 with AVX-512, 6e-8
with AVX2, measured over [-126, 127]). x below -126 gives 0 (no subnormal result, as NumPy's path avoids them with
its masked value); x above 127 gives 2^127 (finite: any such term is far above the kernel's SUM_HI, whose check
sends the tile to the exact path). float64 takes libm's exp2 (exact to the ulp, not vectorised: the fused float64 path is for tests and
accuracy, not speed). No fastmath flag: every sum is in a fixed order (16 partial sums per row, then added in a
fixed tree), so equal inputs give bitwise equal outputs whatever the vector width of the CPU.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

# numba's own pedantic SSA check warns (several lines on stderr) while compiling the overloaded exponential; it is
# about numba's IR, not this code's results, and it would break the one-line errors of a run that compiled it
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

LANES = 16  # partial sums per row: independent add chains the compiler can keep in vector registers
_LO = np.float32(-126.0)  # below: 2^x is under float32's normal range, taken as 0
_HI = np.float32(127.0)  # above: clamped, 2^127
_LN2 = np.float32(0.6931471805599453)
# Cephes expf: e^r ~ 1 + r + r^2 (P0 r^5 + ... + P5), |r| <= ln(2)/2
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)


@intrinsic
def _bits_to_float32(typingctx, i):
    """The float32 whose bit pattern is the int32 ``i`` (a register move, no memory)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, inline="always")
def _exp2_f32(x):
    """2^x for a float32 x (see the module's docstring for the range)."""
    v = min(max(x, _LO), _HI)
    n = np.float32(np.floor(v + np.float32(0.5)))  # -126 .. 127
    r = (v - n) * _LN2  # v - n is exact
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * r * r + r + np.float32(1.0)
    p = p * _bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))  # times 2^n, a normal float32
    if x >= _LO:
        return p
    return np.float32(0.0) if x < _LO else x  # NaN stays NaN: the kernel's sum check sees it


def _exp2(x):
    """2^x in the precision of x: typed by numba through the overload below, never called from Python."""
    raise NotImplementedError("compiled only")


@overload(_exp2, inline="always")
def _exp2_for(x):
    """float32: the Cephes polynomial (:func:`_exp2_f32`); float64: libm's exp2."""
    if x == types.float32:
        return lambda x: _exp2_f32(x)
    if x == types.float64:
        return lambda x: np.exp2(x)
    return None


@njit(cache=True)
def _rows(s, r, bound, lower, g):
    """s (Zc, rq, tk) float32 or float64 in place, r (Zc, rq) of the same dtype: see :func:`exp2_rows`.

    numba compiles (and caches) one machine-code version per dtype; ``_exp2`` picks that dtype's 2^x at compile time.
    """
    zc, rq, tk = s.shape
    part = np.empty(LANES, s.dtype)
    for z in range(zc):
        for i in range(rq):
            cols = tk if bound.size == 0 else min(tk, max(0, bound[i // g]))
            first = 0 if lower.size == 0 else min(cols, max(0, lower[i // g]))
            row = s[z, i]
            part[:] = 0
            for j in range(first):
                row[j] = 0
            full = first + (cols - first) - (cols - first) % LANES
            for j0 in range(first, full, LANES):
                for k in range(LANES):
                    p = _exp2(row[j0 + k])
                    row[j0 + k] = p
                    part[k] += p
            for j in range(full, cols):
                p = _exp2(row[j])
                row[j] = p
                part[j - full] += p
            for j in range(cols, tk):
                row[j] = 0
            r[z, i] = _tree(part)


@njit(cache=True, inline="always")
def _tree(part):
    """Sum of the LANES partial sums in a fixed pairwise order."""
    n = part.size
    while n > 1:
        n //= 2
        for k in range(n):
            part[k] += part[k + n]
    return part[0]


DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def exp2_rows(s, r, bound, g: int, lower=None) -> None:
    """In place: s[z, i, j] = 2^s[z, i, j] where column j is visible to row i, else 0; r[z, i] = the row's sum.

    s: (Zc, rq, tk) C-contiguous, float32 or float64; r: (Zc, rq) of the same dtype. Row i of the tile is query
    i // g (g query heads per query, GQA); ``bound`` (int64) gives per query the first hidden column (every
    column from it on is hidden; may be <= 0 or >= tk), or is empty when every column is visible; ``lower``
    (int64, or None / empty: 0) per query the first visible column (every column before it is hidden: a window).
    """
    if s.dtype not in DTYPES:
        raise TypeError(f"exp2_rows: float32 or float64 scores, got {s.dtype}")
    _rows(s, r, bound, NO_BOUND if lower is None else lower, g)


NO_BOUND = np.empty(0, np.int64)


def versions() -> dict:
    """numba and llvmlite versions and the CPU numba compiles for (NUMBA_CPU_NAME, else the host's): provenance."""
    import llvmlite
    import numba
    from llvmlite import binding

    return {
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "cpu_name": numba.config.CPU_NAME or binding.get_host_cpu_name(),
        "cpu_features": numba.config.CPU_FEATURES,
    }


def compile(dtype) -> float:
    """Compile (or load from numba's cache) the function for ``dtype`` now; returns the seconds it took."""
    t0 = time.perf_counter()
    s = np.zeros((1, 2, LANES + 1), dtype)
    exp2_rows(s, np.empty((1, 2), dtype), NO_BOUND, 1)
    exp2_rows(s, np.empty((1, 2), dtype), np.ones(2, np.int64), 1)
    exp2_rows(s, np.empty((1, 2), dtype), np.ones(2, np.int64), 1, np.zeros(2, np.int64))
    return time.perf_counter() - t0
