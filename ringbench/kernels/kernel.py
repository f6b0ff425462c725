"""Blockwise attention with an online softmax: pure math over an array module ``xp``.

Nothing here knows about MPI or about which device it runs on; functions take arrays and ``xp``
(numpy or cupy). The public layout is flash-attn's (B, N, H, D); inside a rank the kernel works on
head-major copies so that every score tile is one batched matrix product:

    q: (Z, G, n, D)   Z = B * H_kv batch-heads, G = H / H_kv query heads per kv head (GQA/MQA)
    k, v: (Z, m, D)

Query head h reads kv head h // G (PyTorch SDPA's ``enable_gqa`` convention).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ringbench.layout import FULL, Piece, band, band_hidden, key_bounds


# ---------------------------------------------------------------------------------------------
# Layout changes between the public (B, N, H, D) and the kernel's head-major layout
# ---------------------------------------------------------------------------------------------
def q_to_heads(xp, q, kv_heads: int, dtype=None):
    """(B, n, H, D) -> (B*H_kv, G, n, D), contiguous, optionally cast.

    The result may share memory with ``q`` (with G = 1 or n = 1 and no cast it is ``q`` reshaped): read it,
    never write to it. On NumPy it is a read-only view, so a write raises instead of changing the caller's array.
    """
    b, n, h, d = q.shape
    g = h // kv_heads
    x = q.reshape(b, n, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # (B, H_kv, G, n, D)
    return _read_only(xp.ascontiguousarray(x, dtype=dtype).reshape(b * kv_heads, g, n, d))


def kv_to_heads(xp, x, dtype=None):
    """(B, n, H_kv, D) -> (B*H_kv, n, D), contiguous, optionally cast. May share memory with ``x``: read only."""
    b, n, hk, d = x.shape
    return _read_only(xp.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype).reshape(b * hk, n, d))


def _read_only(x):
    """A read-only view of a NumPy array (the caller's array keeps its own flag); other arrays as they are."""
    if isinstance(x, np.ndarray):
        x = x.view()
        x.flags.writeable = False
    return x


def heads_to_out(o, batch: int):
    """(B*H_kv, G, n, D) -> (B, n, H, D) view-then-copy."""
    z, g, n, d = o.shape
    hk = z // batch
    return o.reshape(batch, hk, g, n, d).transpose(0, 3, 1, 2, 4).reshape(batch, n, hk * g, d)


def negate(xp, x, out=None):
    """-x (into ``out`` if given), as x * -1: the same result (but a NaN's sign), and never NumPy's negative loop, which
    NumPy 2.4.6 gets wrong on strided operands (README, known problems): ``np.negative(a[:, 3], out=a[:, 3])`` for a
    float32 (4, 4) array reads the wrong elements (rows 16 bytes apart; float64: 64 bytes), and so does a float32
    input 16 bytes apart into any strided output. The backward's -D column (``backward.BlockBackward``) is such a
    view at D = 3 (float32) and D = 7 (float64), where it stored wrong dQ and dK; multiply's loops are right at every
    stride (tests/engine/test_random_shapes.py probes both). Every negation of the kernels goes through here."""
    return xp.multiply(x, -1, out=out)


# ---------------------------------------------------------------------------------------------
# The online-softmax accumulator
# ---------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The kernel's thresholds, stated in bits (powers of 2) and converted to the exponential's base by ExpBase:
# A row's reference m is moved only when a tile's scores exceed it by more than 2^REBASE_BITS, or, for a row
# that has seen nothing yet, fall below it by more than that: every other tile skips the subtract pass and
# the rescale of the accumulators (FlashAttention-4's lazy rescaling).
REBASE_BITS = 8.0
# The fast path skips even the row-max pass: it takes p = b^(s - m) straight away and accepts the tile when
# every row sum is at most SUM_HI (so no term overflowed or can overflow the accumulators) and, for a row
# that had nothing yet, at least SUM_LO (so its largest term did not underflow). Otherwise the tile is
# recomputed on the exact path (row max first). Both bounds are far inside float32's range, whatever the base.
SUM_HI = 2.0**24
SUM_LO = 2.0**-24
# Masked scores are set to MASKED_BITS (in bits) before the exponential and their b^s to 0 after: exp/exp2 take
# a slow path for -inf and for results below float32's normal range (6x and 16x slower per element, measured),
# never for 2^-125.
MASKED_BITS = -125.0


class ExpBase(NamedTuple):
    """One exponential of the kernel: its base b, the kernel's constants restated in it, and how the tile runs it.

    Scores are kept as log_b: q is multiplied by ``scale`` = log_b(e) once, so every tile needs one b^x.
    """

    name: str  # "2", "e" or "fused"
    scale: float  # log_b(e): natural-log scores times this are log_b scores
    ln_b: float  # ln(b): log_b values times this are natural logs; 1 for base e
    rebase: float  # REBASE_BITS in log_b units
    masked: float  # MASKED_BITS in log_b units
    fused: bool = False  # the tile's exponential, hidden keys and row sums in one compiled pass (ringbench.kernels.fused)

    def exp(self, xp):
        """The ufunc x -> b^x of array module ``xp``."""
        return xp.exp if self.ln_b == 1.0 else xp.exp2

    def log(self, xp):
        return xp.log if self.ln_b == 1.0 else xp.log2


EXP_BASES = {
    "2": ExpBase("2", LOG2E, LN2, REBASE_BITS, MASKED_BITS),
    "e": ExpBase("e", 1.0, 1.0, REBASE_BITS * LN2, MASKED_BITS * LN2),
    # base 2, the tile's elementwise passes compiled by numba (the `numba` extra; NumPy arrays only)
    "fused": ExpBase("fused", LOG2E, LN2, REBASE_BITS, MASKED_BITS, fused=True),
}
EXP_ENV = "RINGBENCH_EXP"  # auto (default): measured; 2, e or fused: forced (tests, benchmarks)
_measured: dict[str, ExpBase] = {}  # array module name -> the exponential measured fastest in this process
_fused: list = []  # [ringbench.kernels.fused, or None when numba is not installed], filled on first use


def fused_module():
    """:mod:`ringbench.kernels.fused`, or None when numba is not installed (then the kernel never uses it)."""
    if not _fused:
        try:
            from ringbench.kernels import fused
        except ModuleNotFoundError as exc:
            if exc.name not in ("numba", "llvmlite"):
                raise
            fused = None
        _fused.append(fused)
    return _fused[0]


def exp_base(xp=np, choice: str | None = None) -> ExpBase:
    """The exponential the kernel uses with ``xp`` in this process: ``choice`` or $RINGBENCH_EXP if set to 2, e or
    fused, else the fastest of NumPy's ``exp2`` and ``exp`` on float32 (measured once per process, a few ms) and,
    where numba is installed, the fused pass (:func:`measure_exp`).

    NumPy's float32 exp2 is 2x faster than exp with AVX-512 and 2x slower with AVX2 only (benchmarks/README.md), so
    the base is a property of the machine. Off the host (CuPy) the tile is memory-bound and base 2 is kept.
    """
    choice = choice or os.environ.get(EXP_ENV, "") or "auto"
    if choice in EXP_BASES:
        if EXP_BASES[choice].fused and (xp is not np or fused_module() is None):
            why = "the NumPy backend" if xp is not np else "numba (pip install 'ringbench[numba]')"
            raise ValueError(f"{EXP_ENV}: fused needs {why}; 2 and e need nothing")
        return EXP_BASES[choice]
    if choice != "auto":
        raise ValueError(f"{EXP_ENV}: expected one of auto, {', '.join(EXP_BASES)}; got {choice!r}")
    key = getattr(xp, "__name__", str(xp))
    if key not in _measured:
        _measured[key] = EXP_BASES[measure_exp(xp)[0]] if xp is np else EXP_BASES["2"]
    return _measured[key]


# auto picks fused only when its pass is this much faster than the better NumPy one: where they are near, the
# choice would flip between processes (and fused costs ~2 s per process to import numba and load its code)
FUSED_MARGIN = 1.25


def measure_exp(xp=np, rows: int = 128, cols: int = 512, repeat: int = 7) -> tuple[str, dict[str, float]]:
    """(name, seconds per element of each candidate): the fastest float32 exponential here, with the row sums.

    Each candidate does a score tile's elementwise work on a (rows, cols) tile: ``exp2`` or ``exp`` then the
    row-sum GEMV, or, where numba is installed, the fused pass (compiled or loaded from numba's cache first, not
    timed). fused wins only by a factor FUSED_MARGIN. The minimum over ``repeat`` calls of this process's CPU
    time: robust to other processes on a shared core.
    """
    x = np.linspace(-20.0, 0.0, rows * cols, dtype=np.float32).reshape(1, rows, cols)  # the range of shifted scores
    out = np.empty_like(x)
    r = np.empty((1, rows), np.float32)
    ones = np.ones(cols, np.float32)
    cands = {name: _numpy_pass(base.exp(np), x, out, ones, r) for name, base in EXP_BASES.items() if not base.fused}
    fused = fused_module()
    if fused is not None:  # every candidate works in place on a copy of x, as the kernel does on its score tile
        fused.compile(np.float32)
        cands["fused"] = lambda: (np.copyto(out, x), fused.exp2_rows(out, r, fused.NO_BOUND, 1))
    best = {}
    for name, fn in cands.items():
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.process_time_ns()
            fn()
            times.append(time.process_time_ns() - t0)
        best[name] = min(times) * 1e-9 / x.size
    # NumPy's own pair: the CPU's expected winner (exp2 with AVX-512 loops, exp without) unless the other is faster
    # by FUSED_MARGIN too, so that a noisy measurement on a loaded machine does not flip the choice between runs
    pick = "2" if numpy_has_avx512() else "e"
    other = "e" if pick == "2" else "2"
    if best[other] * FUSED_MARGIN < best[pick]:
        pick = other
    if "fused" in best and best["fused"] * FUSED_MARGIN < best[pick]:
        pick = "fused"
    return pick, best


def numpy_has_avx512() -> bool:
    """Does NumPy run its AVX-512 loops here? (Its float32 exp2 is then ~2x faster than exp; with AVX2 ~1.5x slower.)"""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return True
    return bool(features.get("AVX512_SKX", False))


def _numpy_pass(fn, x, out, ones, r):
    """The NumPy tile pass measure_exp times: out = fn(x) in place on a copy of x, r = out @ ones."""
    return lambda: (np.copyto(out, x), fn(out, out=out), np.matmul(out, ones, out=r))


def piece_tiles(p: Piece, tile_q: int, tile_k: int | None) -> tuple[int, int]:
    """(query rows, keys) of the largest tile over piece ``p`` (forward and backward tile alike): at most ``tile_k``
    keys (None: the whole piece); on a diagonal piece, which computes then masks part of a triangle per query tile,
    half-height query tiles (less masked work)."""
    nk = p.k1 - p.k0
    tk = min(tile_k or nk, nk)
    return (tile_q if p.mask == FULL else max(1, min(tile_q, tk // 2))), tk


def tile_keys(p: Piece, i0: int, i1: int) -> tuple[int, int]:
    """[kstart, kend): the keys of piece ``p`` some query of the tile [i0, i1) (piece-local) sees; the keys outside
    are never touched (``layout.key_bounds``: every row's visible keys are an interval, both ends non-decreasing)."""
    nk = p.k1 - p.k0
    if p.mask == FULL:
        return 0, nk
    return key_bounds(p, i0)[0], key_bounds(p, i1 - 1)[1]


def tile_masked(p: Piece, i0: int, i1: int, j0: int, j1: int) -> bool:
    """Whether the tile rows [i0, i1) x keys [j0, j1) of piece ``p`` hides a key from some row (then it is masked)."""
    if p.mask == FULL:
        return False
    return j1 > key_bounds(p, i0)[1] or j0 < key_bounds(p, i1 - 1)[0]


class Scratch:
    """Named flat work buffers in ``self.dtype``, allocated on first use, grown to the largest request, reused.

    The forward's state and the backward's object hold their tiles this way; :meth:`scratch` tells what they hold,
    and each class's ``scratch_elems`` what a piece will make them hold (the runner's memory estimate counts that).
    """

    xp: Any
    dtype: Any
    _scratch: dict

    def _buffer(self, name: str, size: int):
        buf = self._scratch.get(name)
        if buf is None or buf.size < size:
            buf = self.xp.empty(size, self.dtype)
            self._scratch[name] = buf
        return buf[:size]

    def scratch(self) -> dict[str, int]:
        """Elements of each work buffer held now, by name (none before the first update; they never shrink)."""
        return {name: int(buf.size) for name, buf in self._scratch.items()}

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the work buffers held now."""
        return sum(int(buf.nbytes) for buf in self._scratch.values())


class OnlineSoftmax(Scratch):
    """Running (reference, sum, weighted V) for one rank's queries, updated block by block.

    ``q`` (Z, G, n, D) is in the compute dtype and is only read: the state keeps its own query-major copy of
    it, (Z, n, G, D+1): scaled by ``scale`` (the softmax scale 1/sqrt(D); None when ``q`` is already scaled),
    then by log_b(e) for the base b of the exponential (``exp``: "2", "e" or
    "fused", default :func:`exp_base`, kept as
    ``self.base``), and widened by one column holding -m, the row's current reference (log_b units), so that a
    single matrix product gives the shifted scores s - m, and the G query heads that share a kv head stack into
    one matrix of tile_q * G rows. The keys are widened by a row of ones to match (one transposed copy per head
    chunk and piece, not per tile). Nothing given to the state (q, k, v) is ever written to.

    Tiles: ``head_chunk`` batch-heads and ``tile_q`` query positions (times G heads) at a time, against
    at most ``tile_k`` keys; the score tile buffer is allocated once and reused, so memory stays O(n)
    beyond one tile. ``on_tile`` (if given) is called after every tile: the ring uses it to drive MPI
    progress. The arithmetic depends only on the data and the tiling, so equal inputs give bitwise
    equal outputs.
    """

    def __init__(
        self,
        xp,
        q,
        *,
        head_chunk: int | None = None,
        tile_q: int | None = None,
        tile_k: int | None = None,
        on_tile: Callable[[], None] | None = None,
        matmul: Callable | None = None,
        exp: str | None = None,
        scale: float | None = None,
    ):
        self.xp = xp
        self.base = exp_base(xp, exp)  # the exponential's base and the thresholds restated in it
        self.exp = self.base.exp(xp)
        # the fused pass (ringbench.kernels.fused), compiled or loaded from numba's cache here, outside any timed region
        self.fused = fused_module() if self.base.fused else None
        self.compile_s = 0.0  # seconds that took
        self.matmul = matmul or xp.matmul  # the two score-tile GEMMs (the ring may pass MKL's)
        self.matmul_add = getattr(matmul, "matmul_add", None)  # c += a @ b in one GEMM, where offered
        z, g, n, d = q.shape
        self.shape = (z, g, n, d)
        self.dtype = q.dtype
        if self.fused is not None:
            if q.dtype not in self.fused.DTYPES:
                raise ValueError(f"{EXP_ENV}: fused computes in float32 or float64, not {q.dtype}")
            self.compile_s = self.fused.compile(q.dtype)
        self.head_chunk = min(head_chunk or z, z)
        self.tile_q = max(1, min(tile_q or n, n))
        self.tile_k = tile_k  # None: whole key block
        self.on_tile = on_tile
        self.qa = xp.empty((z, n, g, d + 1), q.dtype)  # [q * scale * log_b(e), -m], query-major
        qs, qt = self.qa[..., :d], q.transpose(0, 2, 1, 3)
        if scale is None and self.base.scale == 1.0:
            qs[...] = qt
        elif scale is None or self.base.scale == 1.0:
            xp.multiply(qt, q.dtype.type(self.base.scale if scale is None else scale), out=qs)
        else:  # rounded as (q * scale) * log_b(e), like a caller that scaled q first
            xp.multiply(qt, q.dtype.type(scale), out=qs)
            qs *= q.dtype.type(self.base.scale)
        self.qa[..., d] = 0
        self.acc = xp.zeros((z, n, g, d), q.dtype)  # sum_j b^(s_ij - m_i) v_j
        self.m = xp.zeros((z, n, g), q.dtype)  # reference of each row (log_b units, finite)
        self.l = xp.zeros((z, n, g), q.dtype)  # sum_j b^(s_ij - m_i)
        self._scratch = {}  # flat work buffers: scratch_elems
        self._masks = {}  # (tq, tk, i0 - j0, mask) -> boolean pattern; (tq, i0 - j0, mask) -> first hidden columns
        self._shifted = True  # does some row of the current query tile have m != 0?

    @property
    def q(self):
        """The queries as kept here, scaled by log_b(e): (Z, G, n, D), a view."""
        return self.qa[..., : self.shape[3]].transpose(0, 2, 1, 3)

    def reset(self) -> None:
        self.acc.fill(0)
        self.m.fill(0)
        self.l.fill(0)
        self.qa[..., self.shape[3]] = 0

    @staticmethod
    def scratch_elems(g: int, d: int, nq: int, nk: int, *, head_chunk: int, tile_q: int, tile_k: int | None, mask=FULL) -> dict[str, int]:
        """Elements of each work buffer a piece of ``nq`` query positions (G heads each) against ``nk`` keys needs:
        keys, the [k^T; 1] copy of one head chunk; scores, one score tile; row_sums and pv, its row sums and p @ v;
        ones, the row-sum GEMV's vector. The buffers grow to the largest piece's (:meth:`scratch`)."""
        tq, tk = piece_tiles(Piece(0, nq, 0, nk, mask), tile_q, tile_k)
        rq = min(tq, nq) * g
        hc = head_chunk
        return {"keys": hc * (d + 1) * nk, "scores": hc * rq * tk, "row_sums": hc * rq, "pv": hc * rq * d, "ones": tk}

    def update(self, k, v, pieces: Sequence[Piece]) -> None:
        """Fold the key/value block ``k, v`` (Z, m, D) into the state, for the given pieces."""
        with np.errstate(over="ignore"):  # the fast path may overflow; it is then redone
            for piece in pieces:
                self._update_piece(k, v, piece)

    def _update_piece(self, k, v, p: Piece) -> None:
        xp = self.xp
        z, g, _, d = self.shape
        nk = p.k1 - p.k0
        if nk <= 0 or p.q1 <= p.q0:
            return
        tq_max, tk_max = piece_tiles(p, self.tile_q, self.tile_k)
        hc = self.head_chunk
        need = self.scratch_elems(g, d, p.q1 - p.q0, nk, head_chunk=hc, tile_q=self.tile_q, tile_k=self.tile_k, mask=p.mask)
        kt, sbuf, rbuf, pvbuf, ones = (self._buffer(name, need[name]) for name in ("keys", "scores", "row_sums", "pv", "ones"))
        ones.fill(1)
        for z0 in range(0, z, hc):
            z1 = min(z0 + hc, z)
            zc = z1 - z0
            kta = kt[: zc * (d + 1) * nk].reshape(zc, d + 1, nk)  # (Zc, D+1, nk): [k^T; 1]
            _transpose_into(xp, kta[:, :d], k[z0:z1, p.k0 : p.k1])
            kta[:, d] = 1
            vz = v[z0:z1, p.k0 : p.k1]  # (Zc, nk, D)
            for i0 in range(0, p.q1 - p.q0, tq_max):
                i1 = min(i0 + tq_max, p.q1 - p.q0)
                rq = (i1 - i0) * g
                rows = (slice(z0, z1), slice(p.q0 + i0, p.q0 + i1))
                t = _Rows(
                    rows,
                    self.qa[rows].reshape(zc, rq, d + 1),
                    self.l[rows].reshape(zc, rq),
                    self.acc[rows].reshape(zc, rq, d),
                    rbuf[: zc * rq].reshape(zc, rq),
                    pvbuf[: zc * rq * d].reshape(zc, rq, d),
                )
                # keys hidden from every row of this tile (before its first row's, after its last row's) are never touched
                kstart, kend = tile_keys(p, i0, i1)
                fresh = bool((t.l == 0).any())  # rows with nothing yet: their sums get a lower bound too
                # rows whose reference is still 0 need no shift: the score GEMM then runs with K = D, not D+1
                self._shifted = bool(t.q[..., d].any())
                for j0 in range(kstart, kend, tk_max):
                    j1 = min(j0 + tk_max, kend)
                    s = sbuf[: zc * rq * (j1 - j0)].reshape(zc, rq, j1 - j0)  # (Zc, tq*G, tk)
                    mask = (i0, i1, j0, band(p)) if tile_masked(p, i0, i1, j0, j1) else None  # hides keys from some row
                    fresh = self._tile(t, kta[..., j0:j1], vz[:, j0:j1], s, ones[: j1 - j0], mask, fresh)
                    if self.on_tile is not None:
                        self.on_tile()

    def _tile(self, t: _Rows, kt, vt, s, ones, mask, fresh: bool) -> bool:
        """One score tile: s = [q, -m] @ [k^T; 1], p = b^s, then the row sums and p @ v into the state.

        ``fresh``: some row of the tile may have no mass yet. Returns the same for the next tile.
        """
        if self._shifted:
            self.matmul(t.q, kt, out=s)  # s - m, log_b units
        else:
            d = self.shape[3]
            self.matmul(t.q[..., :d], kt[:, :d], out=s)  # m = 0 on every row: s itself
        self._exp_sums(s, t.r, ones, mask)  # p = b^(s - m), unchecked
        if sums_ok(t.r, t.l, fresh):
            fresh = False  # every row now has mass >= SUM_LO
        else:
            self.matmul(t.q, kt, out=s)  # rare: redo on the exact path
            if mask is not None:
                sub, where = self._masked_part(s, *mask)
                self.xp.copyto(sub, -np.inf, where=where)  # hidden keys out of the row max
            self._rebase(s, t)
            self._exp_sums(s, t.r, ones, mask)
        l, acc = t.l, t.acc  # views into the state
        l += t.r
        if self.matmul_add is not None:
            self.matmul_add(s, vt, acc)  # acc += p @ v, (Zc, tq*G, D)
        else:
            self.matmul(s, vt, out=t.pv)
            acc += t.pv
        return fresh

    def _exp_sums(self, s, r, ones, mask) -> None:
        """In place p = b^s, with p = 0 for the keys ``mask`` (None, or (i0, i1, j0, band) of the tile) hides; r = row sums.

        The fused pass does it in one compiled loop; NumPy sets hidden scores to MASKED_BITS first (exp's slow
        paths avoided), zeroes their terms after, and sums the rows by GEMV.
        """
        if self.fused is not None:
            if mask is None:
                self.fused.exp2_rows(s, r, self.fused.NO_BOUND, 1)
            else:  # row k of the tile is query i0 + k // G
                hi, lo = self._bounds(*mask)
                self.fused.exp2_rows(s, r, hi, s.shape[1] // (mask[1] - mask[0]), lo)
            return
        xp = self.xp
        if mask is not None:
            sub, where = self._masked_part(s, *mask)
            xp.copyto(sub, self.base.masked, where=where)
        self.exp(s, out=s)
        if mask is not None:
            xp.copyto(sub, 0, where=where)
        xp.matmul(s, ones, out=r)

    def _bounds(self, i0, i1, j0, bnd):
        """Per query row of the tile (rows [i0, i1), keys from j0), its first hidden column after the visible ones and
        (with a window, else empty) its first visible one: ``layout.key_bounds`` of the band ``bnd`` (offset, window)."""
        d, w = bnd
        key = ("bounds", i1 - i0, i0 - j0 + d, w)
        got = self._masks.get(key)
        if got is None:
            if len(self._masks) > 64:
                self._masks.clear()
            rows = np.arange(i0, i1, dtype=np.int64) - j0
            hi = rows + (d + 1)
            lo = rows + (d - w + 1) if w else np.empty(0, np.int64)
            got = self._masks[key] = (hi, lo)
        return got

    def _masked_part(self, s, i0, i1, j0, bnd):
        """The columns of tile ``s`` (rows [i0, i1), keys from j0) that hide keys, (Zc, tq, G, w), and where (tq, 1, w).

        Which key is hidden from which query is ``layout.band_hidden``'s rule for the piece's band ``bnd`` (offset d,
        window w: key j hidden from query i when j > i + d, or j <= i + d - w with a window; causal is d = 0, strict
        d = -1); without a window only columns from the first hidden one are touched, and the boolean pattern is
        cached by shape, offset and window (few distinct ones per run).
        """
        zc, rq, tk = s.shape
        d, w = bnd
        tq, off = i1 - i0, i0 - j0 + d  # tile row a, column b: hidden iff b > a + off (or b <= a + off - w)
        c0 = 0 if w else max(0, off + 1)  # first hidden column of the tile's first row
        key = (tq, tk, off, w)
        where = self._masks.get(key)
        if where is None:
            if len(self._masks) > 64:
                self._masks.clear()
            xp = self.xp
            where = band_hidden(off, w, xp.arange(tq)[:, None], xp.arange(c0, tk)[None, :])[:, None, :]
            self._masks[key] = where
        return s.reshape(zc, tq, rq // tq, tk)[..., c0:], where

    def _rebase(self, s, t: _Rows) -> None:
        """Exact path: move the reference of rows whose tile max left the safe band, and shift their scores."""
        xp = self.xp
        top = s.max(axis=-1)  # (Zc, rq), -inf if all masked
        fresh = t.l == 0
        rebase = self.base.rebase
        move = (top > rebase) | (fresh & (top < -rebase) & (top > -np.inf))
        if not bool(move.any()):
            return
        shift = xp.where(move, top, 0)
        self._shifted = True
        s -= shift[..., None]
        m = self.m[t.rows]
        m += shift.reshape(m.shape)
        negate(xp, m, out=self.qa[t.rows + (slice(None), self.shape[3])])
        # old mass is scaled down by b^-shift; a fresh row moved down has no mass, so leave its factor at 1
        alpha = self.exp(-xp.maximum(shift, 0))
        l, acc = t.l, t.acc
        l *= alpha
        acc *= alpha[..., None]

    def finalize(self, out_dtype=None):
        """Normalised output (Z, G, n, D) and log-sum-exp (Z, G, n); rows that saw no key give 0 and -inf."""
        xp = self.xp
        z, g, n, d = self.shape
        l_safe = xp.where(self.l == 0, 1, self.l)
        out = xp.empty((z, g, n, d), self.dtype)
        xp.divide(self.acc, l_safe[..., None], out=out.transpose(0, 2, 1, 3))
        with np.errstate(divide="ignore"):
            lse = self.m + self.base.log(xp)(self.l)  # log_b units
            if self.base.ln_b != 1.0:
                lse *= self.dtype.type(self.base.ln_b)
            lse = lse.transpose(0, 2, 1)
        return (out if out_dtype is None else out.astype(out_dtype, copy=False)), xp.ascontiguousarray(lse)


def load_queries(state: OnlineSoftmax, q, scale: float) -> None:
    """Write queries ``q`` (Z, n, G, D) (any dtype, any strides) into ``state`` as its constructor does:
    cast to the compute dtype, times 1/sqrt(D), times log_b(e) for the state's exponential base b."""
    d = state.shape[3]
    dst = state.qa[..., :d]  # (Z, n, G, D)
    dst[...] = q
    dst *= state.dtype.type(scale)
    if state.base.scale != 1.0:
        dst *= state.dtype.type(state.base.scale)


def sums_ok(r, l, fresh: bool) -> bool:
    """The fast path's check of a tile's row sums ``r`` against the state's ``l``: no term overflowed (every row sum
    finite and <= SUM_HI) and, when ``fresh`` (some row had no mass yet), rows new to the state got mass (>= SUM_LO)."""
    if not bool(r.max() <= SUM_HI):  # NaN and inf fail too
        return False
    return not fresh or bool(r.min() >= SUM_LO) or not bool(((l == 0) & (r < SUM_LO)).any())


class _Rows(NamedTuple):
    """Views of one query tile's rows (all of one head chunk), reused by every key tile against them."""

    rows: tuple  # index of the rows in the (Z, n, G) state arrays
    q: Any  # (Zc, tq*G, D+1) [q, -m]
    l: Any  # (Zc, tq*G)
    acc: Any  # (Zc, tq*G, D)
    r: Any  # (Zc, tq*G) row sums of the current tile
    pv: Any  # (Zc, tq*G, D) p @ v of the current tile


def _transpose_into(xp, dst, src) -> None:
    """dst (Zc, D, m) = src (Zc, m, D) transposed. On the host, in blocks of 64 keys: one whole strided copy
    thrashes the cache when m is a power of two (4096 x 128 took 10x longer)."""
    m = src.shape[1]
    block = 64 if xp is np else m
    for j0 in range(0, m, block):
        dst[..., j0 : j0 + block] = src[:, j0 : j0 + block].swapaxes(-1, -2)


def merge(xp, out_a, lse_a, out_b, lse_b):
    """Exact merge of two normalised partial attentions over disjoint key sets.

    out: (..., n, D), lse: (..., n). Stable for large logits (weights are exp(lse - max) <= 1);
    a side with lse = -inf (saw no key) gets weight 0, and two such sides give 0 and -inf.
    """
    m = xp.maximum(lse_a, lse_b)
    m_use = xp.where(m == -np.inf, 0, m)
    wa = xp.exp(lse_a - m_use)
    wb = xp.exp(lse_b - m_use)
    tot = wa + wb
    safe = xp.where(tot == 0, 1, tot)
    out = out_a * (wa / safe)[..., None] + out_b * (wb / safe)[..., None]
    with np.errstate(divide="ignore"):
        lse = m_use + xp.log(tot)
    return out, lse


def compute_dtype(storage) -> np.dtype:
    """The dtype the kernels compute and accumulate in: float32 for half precision (and float32), float64 for float64."""
    return np.dtype(np.float64) if np.dtype(storage) == np.float64 else np.dtype(np.float32)


def flops(batch: int, heads: int, head_dim: int, pairs: int) -> float:
    """Matmul FLOPs of attention over ``pairs`` unmasked (query, key) pairs: QK^T and PV, 2 FLOPs per MAC."""
    return 4.0 * batch * heads * head_dim * pairs


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------------------------------
# Float64 reference (NumPy only): exact softmax over all keys, a block of queries at a time
# ---------------------------------------------------------------------------------------------
