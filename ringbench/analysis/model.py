"""A calibrated overlap model of one ring pass: pure formulas, no MPI, no device.

Inputs: a configuration (layout, P, N, B, H, H_kv, D, dtype, causal, mode) and a :class:`Calibration`
(per-rank attention compute rate, ring link latency and bandwidth), from ``ringbench probe`` or fitted
to stored runs. With n = N / P tokens per rank:

    work(r, s)   = 4 B H D * pairs(r, s)           pairs from layout.step_plan (causal masks included)
    compute(r,s) = work(r, s) / rate
    block bytes  m = 2 B n H_kv D * itemsize        the K and V block that travels each step
    comm         = latency + m / bandwidth          Hockney model, every step but the last
    step s       overlap:   max(max_r compute(r, s), comm)      exposed = max(0, comm - max_r compute(r, s))
                 blocking:  max_r compute(r, s) + comm          exposed = comm
                 allgather: max_r compute(r, s), plus (P-1)(latency + m / bandwidth) once before step 0
    pass time    = sum over steps (bulk-synchronous: each step ends when its slowest rank ends)

The crossover block size n* is the least n for which every communicating step's compute covers the transfer
of the next block (the Ring Attention condition). For a full step, 4 B H D n^2 / rate = latency +
2 B n H_kv D itemsize / bandwidth, so

    n* = (b + sqrt(b^2 + 4 a latency)) / (2 a),   a = 4 B H D f / rate,   b = 2 B H_kv D itemsize / bandwidth

where f is the least (over communicating steps) share of a full n x n block that the busiest rank computes
(1 without a causal mask; about 1/2 with one: at step 0 every rank computes its own causal diagonal block,
n(n+1)/2 pairs, and zigzag / striped off-diagonal steps are half blocks too).
B cancels; with latency = 0, n* = H_kv * itemsize * rate / (2 H f bandwidth).

The backward pass (Shape.pass_ "bwd"; README "The overlap model"). The dK/dV accumulator of a block travels
with it (acc = the accumulation dtype's itemsize: float32 for half precision, else the storage dtype's):

    work_bwd(r, s) = 2.5 work(r, s)                  FlashAttention's convention (five GEMMs to two)
    compute(r, s)  = work_bwd(r, s) / rate_bwd        rate_bwd calibrated apart (probe or backward runs)
    g              = 2 B n H_kv D acc                 one dK/dV accumulator
    comm(s)        = latency + (m [s < P-1] + g [s >= 1]) / bandwidth      step 0: K/V only; step P-1: dK/dV only
    final hop      = latency + g / bandwidth          after the last step, every accumulator goes home: exposed
    step s         overlap / blocking as the forward, with comm(s); the final hop added to the last step
                   allgather: (P-1)(latency + m / bandwidth) before step 0 (all-gather of K/V) and
                   (P-1)(latency + g / bandwidth) after the last step (reduce-scatter of dK/dV), both exposed
    bytes per rank = (P-1) m + P g

The backward's crossover is the largest over its communicating steps s = 0..P-1 of the closed form with
a_s = 10 B H D f_s / rate_bwd and b_s = 2 B H_kv D (itemsize [s < P-1] + acc [s >= 1]) / bandwidth, where f_s is
the busiest rank's share of a full block at step s; without a mask and P >= 3 the middle steps (both
transfers) bind: with latency = 0, n* = H_kv (itemsize + acc) rate_bwd / (5 H f bandwidth). "fwd+bwd" is
the sum of both passes (and the larger n*).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from ringbench.config import STRATEGY_MODES, RunConfig, heads_rule
from ringbench.kernels.kernel import flops
from ringbench.layout import CAUSAL, FULL, Piece, group_plan, step_plan

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# The backward's dK/dV accumulators (and what they travel as): float32 for half precision.
ACC_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 4, "bfloat16": 4}
BWD_FLOPS = 2.5  # backward FLOPs per forward FLOP (FlashAttention's convention; backward.flops)
PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """What the model needs of a run configuration."""

    nranks: int
    seq_len: int
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    layout: str = "contiguous"
    mode: str = "overlap"
    ulysses_degree: int = 1  # hybrid: the all-to-all group size U
    pass_: str = "fwd"  # the config key `pass`: fwd, bwd or fwd+bwd
    docs: str = ""  # the config key `docs`: the packed documents' spec ("": one document)
    window: int = 0  # the config key `window`: each query sees the previous W keys (0: no window)

    @classmethod
    def from_config(cls, config: dict, nranks: int) -> Shape:
        heads = int(config["heads"])
        kv = config.get("kv_heads")
        return cls(
            nranks=int(nranks),
            seq_len=int(config["seq_len"]),
            batch=int(config["batch"]),
            heads=heads,
            kv_heads=heads if kv in (None, "none") else int(kv),
            head_dim=int(config["head_dim"]),
            dtype=str(config["dtype"]),
            causal=bool(config["causal"]),
            layout=str(config["layout"]),
            mode=str(config["mode"]),
            ulysses_degree=int(config.get("ulysses_degree", 1) or 1),
            pass_=str(config.get("pass") or "fwd"),
            docs=str(config.get("docs") or ""),
            window=int(config.get("window") or 0),
        )

    def to_config(self) -> RunConfig:
        """The run configuration of this shape (the inverse of :meth:`from_config`; other options at their defaults):
        what ``config.validate`` checks before a shape is predicted as a runnable candidate."""
        return RunConfig(
            batch=self.batch,
            seq_len=self.seq_len,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            causal=self.causal,
            layout=self.layout,
            mode=self.mode,
            ulysses_degree=self.ulysses_degree,
            pass_=self.pass_,
            **self.mask_fields(),
        )

    def mask_fields(self) -> dict:
        """{"docs": ..., "window": ...} away from their defaults (empty for one document without a window): what a
        RunConfig takes beyond the old keys."""
        return {k: v for k, v in (("docs", self.docs), ("window", self.window)) if v}

    @property
    def doc_lengths(self) -> tuple:
        """The documents' lengths (ringbench.documents.doc_lengths), () for one document."""
        return _doc_lengths(self.docs, self.seq_len) if self.docs else ()

    @property
    def masked(self) -> bool:
        """Whether documents or a window shape the mask (then the step classes do not hold: :func:`classed`)."""
        return bool(self.docs or self.window)

    @property
    def phases(self) -> tuple[str, ...]:
        """('fwd',), ('bwd',) or ('fwd', 'bwd')."""
        return tuple(self.pass_.split("+"))

    @property
    def n_local(self) -> int:
        return self.seq_len // self.nranks

    def with_(self, **kw) -> Shape:
        d = dict(self.__dict__)
        d.update(kw)
        return Shape(**d)


@dataclass
class Calibration:
    """Machine parameters, possibly per allocation size (rank count).

    rates: {nranks: [(full-block FLOPs, per-rank FLOP/s), ...]}: the compute rate as a function of block
    size (interpolated in log FLOPs, clamped at the ends); links: {nranks: (latency_s, bandwidth_Bps)}.
    A rank count with no entry uses the nearest one stored (ties: the larger). causal_rates, if given,
    {layout: {nranks: points}}, replace rates for causal runs of that layout (masked tiles run at another rate
    than full ones, and each layout masks differently); a layout with no entry uses the pooled causal points.
    bwd_rates and bwd_causal_rates: the same for the backward kernel (points keyed by the backward's full-block
    FLOPs, 2.5 x the forward's); empty: the backward cannot be predicted (``has_phase``).
    """

    rates: dict
    links: dict
    source: str = ""
    causal_rates: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    bwd_rates: dict = field(default_factory=dict)
    bwd_causal_rates: dict = field(default_factory=dict)
    diag_rates: dict = field(default_factory=dict)  # {nranks: points}: causal diagonal blocks (probe), keyed by the square's FLOPs
    bwd_diag_rates: dict = field(default_factory=dict)
    copy_bw: dict = field(default_factory=dict)  # {nranks: bytes read + written per second} of local strided copies (probe)
    conditions: list = field(default_factory=list)  # how busy the machine was, per probe (or run) it came from (provenance.conditions)
    piece_fits: dict = field(default_factory=dict)  # {nranks: PieceFit}: per-call cost of the pieces the tables miss (probe, schema 4)
    bwd_piece_fits: dict = field(default_factory=dict)
    merge_fits: dict = field(default_factory=dict)  # {nranks: (c, per element)}: one kernel.merge of partials (probe, schema 4)

    @classmethod
    def simple(cls, rate: float, latency: float, bandwidth: float, source: str = "given", bwd_rate: float | None = None) -> Calibration:
        """One rate for every block size and rank count (and one backward rate, if given), one link."""
        bwd = {1: [(1.0, float(bwd_rate))]} if bwd_rate is not None else {}
        return cls(rates={1: [(1.0, float(rate))]}, links={1: (float(latency), float(bandwidth))}, source=source, bwd_rates=bwd)

    def has_phase(self, phase: str) -> bool:
        """Whether this calibration has a compute rate for the phase (fwd, bwd) or every phase of a pass (fwd+bwd)."""
        return all(bool(self.bwd_rates if p == "bwd" else self.rates) for p in phase.split("+"))

    def rate(self, block_flops: float, nranks: int, causal: bool = False, layout: str = "", phase: str = "fwd") -> float:
        table, causal_table = (self.bwd_rates, self.bwd_causal_rates) if phase == "bwd" else (self.rates, self.causal_rates)
        if not table:
            raise ValueError(f"no {phase} compute rate in this calibration ({self.source or 'given'})")
        if causal and causal_table:
            table = causal_table.get(layout) or causal_table.get("*") or table
        return _interp(table[_nearest(table, nranks)], block_flops)

    def per_piece(self, phase: str = "fwd") -> bool:
        """Whether masked pieces have their own measured rate (a probe's causal diagonal blocks): then the model
        times every piece of a step apart, a full piece at the full-block rate of its own size, a masked one at the
        diagonal-block rate; else (rates fitted to runs) a whole step at the rate of the run's full block."""
        return bool(self.bwd_diag_rates if phase == "bwd" else self.diag_rates)

    def piece_rate(self, rect_flops: float, nranks: int, masked: bool, phase: str = "fwd") -> float:
        """FLOP/s of a piece whose unmasked rectangle has ``rect_flops`` FLOPs (masked: the diagonal-block table)."""
        return float(self.piece_rates(np.array([float(rect_flops)]), nranks, masked, phase)[0])

    def piece_rates(self, rect_flops: np.ndarray, nranks: int, masked: bool, phase: str = "fwd") -> np.ndarray:
        """:meth:`piece_rate` of many pieces at once. Between the table's points: linear in log FLOPs; above the
        last: the last; below the first (the small pieces documents and windows cut): the per-call line through the
        two smallest points, time = c + FLOPs / R (c: a call's fixed cost), so a piece never costs less than c; with
        no positive c there, the first point's rate (:func:`_small_rates`)."""
        if masked:
            table = self.bwd_diag_rates if phase == "bwd" else self.diag_rates
        else:
            table = self.bwd_rates if phase == "bwd" else self.rates
        return _small_rates(table[_nearest(table, nranks)], np.asarray(rect_flops, dtype=np.float64))

    def piece_fit(self, nranks: int, phase: str = "fwd") -> PieceFit | None:
        """The per-call cost fit of the phase at the rank count nearest ``nranks`` (None: a calibration without one)."""
        fits = self.bwd_piece_fits if phase == "bwd" else self.piece_fits
        return fits[_nearest(fits, nranks)] if fits else None

    def pieces_seconds(self, nq, nk, pairs, masked, nranks: int, phase: str, dims: tuple) -> np.ndarray:
        """Seconds of pieces of ``nq`` x ``nk`` (arrays) with ``pairs`` unmasked pairs (``masked``: not FULL) on one
        rank; ``dims`` = (B, H, H_kv, D) of the queries timed. Pieces the square tables cover (both sides at least the
        smallest block, at most SKINNY_ASPECT : 1): their rate (:meth:`piece_rates`, keyed by the rectangle's FLOPs);
        the rest (few query rows against many keys, pieces under the smallest block), where the calibration has a
        probe's per-call fit (:class:`PieceFit`): one kernel call's fitted seconds, a masked piece times the mask's
        measured cost at the smallest block. Without a fit every piece from the tables (as before schema 4)."""
        nq, nk = np.asarray(nq, dtype=np.float64), np.asarray(nk, dtype=np.float64)
        pairs, masked = np.asarray(pairs, dtype=np.float64), np.asarray(masked, dtype=bool)
        mult = BWD_FLOPS if phase == "bwd" else 1.0
        b, h, hk, d = dims
        per_pair = mult * flops(b, h, d, 1)
        rect = per_pair * nq * nk
        rate = np.ones(len(nq))
        for m in (False, True):
            sel = masked == m
            if sel.any():
                rate[sel] = self.piece_rates(rect[sel], nranks, m, phase)
        with np.errstate(divide="ignore", invalid="ignore"):
            secs = np.where(pairs > 0, per_pair * pairs / rate, 0.0)
        fit = self.piece_fit(nranks, phase)
        if fit is not None:
            off = fit.off_table(nq, nk) & (pairs > 0)
            if off.any():
                called = fit.seconds(nq[off], nk[off], b, h, hk, d)
                secs[off] = np.where(masked[off], fit.masked * called, called)
        return secs

    def merge_seconds(self, elems: float, nranks: int, itemsize: int) -> float:
        """Seconds of one kernel.merge of two partials of ``elems`` output elements (B t H (D + 1)): the probe's fitted
        line c + elements x per-element where it timed merges (schema 4: a few NumPy calls, their cost mostly per call),
        else MERGE_PASSES read-and-write passes at the copy rate (as before)."""
        if self.merge_fits:
            c, per = self.merge_fits[_nearest(self.merge_fits, nranks)]
            return c + per * float(elems)
        return self.copy_seconds(2 * MERGE_PASSES * float(elems) * itemsize, nranks)

    def copy_seconds(self, nbytes: float, nranks: int) -> float:
        """Seconds of local copies moving ``nbytes`` (read + written); 0 without a measured copy rate."""
        if not self.copy_bw or nbytes <= 0:
            return 0.0
        return float(nbytes) / self.copy_bw[_nearest(self.copy_bw, nranks)]

    def link(self, nranks: int) -> tuple[float, float]:
        if not self.links:
            return 0.0, math.inf
        return self.links[_nearest(self.links, nranks)]


SKINNY_ASPECT = 4  # a piece longer than this many times its width is off the square tables (Calibration.pieces_seconds)


@dataclass(frozen=True)
class PieceFit:
    """Seconds of one kernel call on a piece of q query rows against k keys, fitted to a probe's pieces (its square
    blocks and its skinny pieces: :func:`fit_piece_cost`): t = c + a q k + b k + e q at the probe's batch, heads, K/V
    heads and head dim. c is a call's fixed cost, a the per-pair work, b the per-key work (loading and tiling K and
    V: what makes a 1 x n piece cost more per FLOP than a square), e the per-query-row work (the softmax state).
    Another shape scales a and e by B H D and b by B H_kv D against the probe's; c stays. ``masked``: the causal
    diagonal block's time over the full block's at the smallest block (what a mask costs a piece off the tables);
    ``min_block``: the square tables' smallest block (tokens). ``rows``, ``keys``, ``grid``: the skinny pieces the probe
    timed ((Q,), (K,), (Q, K) seconds); inside their range a piece's time is interpolated in them (linear in log q,
    log k, log t) and scaled to the shape by the fit's ratio, so a measured 1 x N / P piece costs what it measured (the
    per-key cost grows past the caches, which one line cannot follow over 32 .. 12288 keys); outside, the fit."""

    c: float
    a: float
    b: float
    e: float
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    min_block: int
    masked: float = 1.0
    rows: tuple = ()
    keys: tuple = ()
    grid: tuple = ()  # (Q,) tuples of K seconds

    def fitted(self, nq, nk, batch: int, heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
        """The line's seconds of pieces of ``nq`` x ``nk`` (arrays) with B, H, H_kv, D as given."""
        nq, nk = np.asarray(nq, dtype=np.float64), np.asarray(nk, dtype=np.float64)
        zq = batch * heads * head_dim / (self.batch * self.heads * self.head_dim)
        zk = batch * kv_heads * head_dim / (self.batch * self.kv_heads * self.head_dim)
        return self.c + zq * (self.a * nq * nk + self.e * nq) + zk * self.b * nk

    def seconds(self, nq, nk, batch: int, heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
        """Seconds of one call on pieces of ``nq`` x ``nk`` (arrays) with B, H, H_kv, D as given: the measured grid
        where it covers the piece (scaled by the fit from the probe's shape to this one), else the fit."""
        nq, nk = np.asarray(nq, dtype=np.float64), np.asarray(nk, dtype=np.float64)
        out = self.fitted(nq, nk, batch, heads, kv_heads, head_dim)
        if len(self.rows) < 2 or len(self.keys) < 2:
            return out
        rows, keys = np.log(np.asarray(self.rows, dtype=np.float64)), np.log(np.asarray(self.keys, dtype=np.float64))
        lq, lk = np.log(np.maximum(nq, 1.0)), np.log(np.maximum(nk, 1.0))
        inside = (lq >= rows[0]) & (lq <= rows[-1]) & (lk >= keys[0]) & (lk <= keys[-1])
        if not inside.any():
            return out
        lt = np.log(np.asarray(self.grid, dtype=np.float64))  # (Q, K)
        i = np.clip(np.searchsorted(rows, lq[inside], side="right") - 1, 0, len(rows) - 2)
        j = np.clip(np.searchsorted(keys, lk[inside], side="right") - 1, 0, len(keys) - 2)
        u = (lq[inside] - rows[i]) / (rows[i + 1] - rows[i])
        w = (lk[inside] - keys[j]) / (keys[j + 1] - keys[j])
        t = (1 - u) * (1 - w) * lt[i, j] + u * (1 - w) * lt[i + 1, j] + (1 - u) * w * lt[i, j + 1] + u * w * lt[i + 1, j + 1]
        own = self.fitted(nq[inside], nk[inside], self.batch, self.heads, self.kv_heads, self.head_dim)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(own > 0, out[inside] / own, 1.0)  # the probe's shape -> this one (1 for a fit of zeros)
        out[inside] = np.exp(t) * scale
        return out

    def off_table(self, nq, nk) -> np.ndarray:
        """Whether pieces of ``nq`` x ``nk`` are off the square tables: a side under the smallest block, or one side
        more than SKINNY_ASPECT times the other."""
        nq, nk = np.asarray(nq, dtype=np.float64), np.asarray(nk, dtype=np.float64)
        lo, hi = np.minimum(nq, nk), np.maximum(nq, nk)
        return (lo < self.min_block) | (hi > SKINNY_ASPECT * lo)


def fit_piece_cost(nq, nk, seconds) -> tuple[float, float, float, float]:
    """(c, a, b, e) >= 0 of t = c + a q k + b k + e q fitted to one call's ``seconds`` on pieces of ``nq`` x ``nk``:
    least squares of the relative error (each time weighs as much as any other, so the small pieces the fit is for
    are not drowned by the large squares), non-negative (the best of the fits over every subset of the four terms
    whose coefficients all come out non-negative)."""
    q, k, t = (np.asarray(x, dtype=np.float64).ravel() for x in (nq, nk, seconds))
    if len(t) == 0 or len(q) != len(t) or len(k) != len(t) or not (t > 0).all():
        raise ValueError("fit_piece_cost: needs positive times, one per piece")
    c, a, b, e = _relative_nnls(np.stack([np.ones_like(q), q * k, k, q], axis=1), t)
    return c, a, b, e


def _relative_nnls(cols: np.ndarray, t: np.ndarray) -> tuple[float, ...]:
    """Coefficients >= 0 of t ~ cols @ x minimising the relative residuals: the best least-squares fit over the subsets
    of the columns whose coefficients all come out non-negative (exact non-negative least squares for few columns)."""
    rel = cols / t[:, None]  # relative: (t_fit - t) / t
    ones = np.ones_like(t)
    n = cols.shape[1]
    best, best_res = np.zeros(n), math.inf
    for mask in range(1, 1 << n):
        use = [j for j in range(n) if mask >> j & 1]
        coef, *_ = np.linalg.lstsq(rel[:, use], ones, rcond=None)
        if (coef < 0).any():
            continue
        res = float(np.sum((rel[:, use] @ coef - ones) ** 2))
        if res < best_res - 1e-12 * max(res, 1.0):
            best_res, best = res, np.zeros(n)
            best[use] = coef
    return tuple(float(x) for x in best)


def _nearest(table: dict, nranks: int) -> int:
    return min(table, key=lambda k: (abs(k - nranks), -k))


def _small_rates(points, keys: np.ndarray) -> np.ndarray:
    """Rates at ``keys`` from (FLOPs, rate) points: :func:`_interp` above the first point; below it the per-call
    line t = c + F / R through the two smallest points (t = F / rate), rate = F / (c + F / R), when c > 0 (a call's
    fixed cost shows), else the first point's rate (:meth:`Calibration.piece_rates`)."""
    pts = sorted(points)
    x = np.log([max(w, 1.0) for w, _ in pts])
    y = np.array([r for _, r in pts], dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    out = np.interp(np.log(np.maximum(keys, 1.0)), x, y)
    if len(pts) >= 2:
        (f0, r0), (f1, r1) = pts[0], pts[1]
        t0, t1 = f0 / r0, f1 / r1
        inv = (t1 - t0) / (f1 - f0) if f1 > f0 else 0.0  # 1 / R
        c = t0 - inv * f0
        if c > 0 and inv > 0:
            small = keys < f0
            out = np.where(small, keys / (c + inv * np.maximum(keys, 0.0)), out)
    return out


def _interp(points, flops_key: float) -> float:
    """Rate at ``flops_key`` from (FLOPs, rate) points: linear in log FLOPs, clamped at the ends."""
    pts = sorted(points)
    x = np.log([max(w, 1.0) for w, _ in pts])
    y = np.array([r for _, r in pts], dtype=np.float64)
    return float(np.interp(math.log(max(flops_key, 1.0)), x, y))


# ---------------------------------------------------------------------------------------------
# Per-step quantities
# ---------------------------------------------------------------------------------------------
def block_bytes(shape: Shape) -> int:
    """Bytes of one K/V block (K and V of one rank) as it travels: 2 B n H_kv D itemsize."""
    return 2 * shape.batch * shape.n_local * shape.kv_heads * shape.head_dim * ITEMSIZE[shape.dtype]


def full_block_flops(shape: Shape) -> float:
    """FLOPs of one unmasked n x n block: the compute-rate lookup key."""
    return flops(shape.batch, shape.heads, shape.head_dim, shape.n_local**2)


# ---------------------------------------------------------------------------------------------
# Step classes: why the model's cost does not grow with P^2
# ---------------------------------------------------------------------------------------------
# layout.step_plan(layout, rank, src, ...) depends on the two ranks only through whether the K/V block's source
# rank is the query rank, a lower one or a higher one (tests/analysis/test_model_scale.py checks this for every pair at
# P = 1..64). At ring step s >= 1 ranks s..P-1 hold a lower rank's block and ranks 0..s-1 a higher one's, so every
# step has both kinds and its busiest rank is the slower of the two: the model evaluates three plans, not P^2,
# and the per-step vectors it sums are O(P). The same holds for the hybrid strategy's ring over groups of U ranks
# (group_plan), whose diagonal group's U^2 pieces are summed exactly by :func:`sequential_sum`.
SAME, BELOW, ABOVE = "same", "below", "above"  # the K/V block's source rank vs the query rank: ==, <, >


def class_plans(layout: str, nranks: int, n_local: int, causal: bool) -> dict:
    """{SAME, BELOW, ABOVE: the step plan of that class} (SAME only at P = 1)."""
    plans = {SAME: step_plan(layout, 0, 0, nranks, n_local, causal)}
    if nranks > 1:
        plans[BELOW] = step_plan(layout, 1, 0, nranks, n_local, causal)
        plans[ABOVE] = step_plan(layout, 0, 1, nranks, n_local, causal)
    return plans


def ring_classes(nranks: int) -> np.ndarray:
    """(P, P) class index (0 SAME, 1 BELOW, 2 ABOVE) of rank r at ring step s, whose block came from (r - s) mod P."""
    r = np.arange(nranks)[:, None]
    s = np.arange(nranks)[None, :]
    return np.where(s == 0, 0, np.where(r >= s, 1, 2))


def class_matrix(values: dict, nranks: int, dtype=np.float64) -> np.ndarray:
    """(P, P) ``values[class]`` of rank r at ring step s (the per-rank view; O(P^2), for run-sized P)."""
    table = np.array([values[k] for k in (SAME, BELOW, ABOVE) if k in values], dtype=dtype)
    return table[ring_classes(nranks)]


def busiest(values: dict, nranks: int) -> np.ndarray:
    """(P,) the busiest rank's value at each ring step: SAME at step 0, the larger of BELOW and ABOVE after
    (equal, bit for bit, to the column maxima of :func:`class_matrix`)."""
    out = np.empty(nranks, dtype=np.float64)
    out[0] = values[SAME]
    if nranks > 1:
        out[1:] = np.maximum(values[BELOW], values[ABOVE])
    return out


def step_pairs(shape: Shape) -> np.ndarray:
    """(P, P) unmasked (query, key) pairs rank r computes at ring step s, from layout.step_plan (with documents or a
    window, or a layout without step classes: every (rank, source) plan, :func:`pair_matrix`; equal to
    layout.plan_pairs)."""
    if not classed(shape):
        return ring_view(pair_matrix(shape))
    plans = class_plans(shape.layout, shape.nranks, shape.n_local, shape.causal)
    return class_matrix({k: sum(p.pairs() for p in v) for k, v in plans.items()}, shape.nranks, np.int64)


def busiest_pairs(shape: Shape) -> np.ndarray:
    """(P,) int64: the busiest rank's unmasked pairs at each ring step (``step_pairs(shape).max(axis=0)``), O(P)
    with the step classes, O(P^2) plans without them (:func:`classed`)."""
    if not classed(shape):
        return step_pairs(shape).max(axis=0)
    plans = class_plans(shape.layout, shape.nranks, shape.n_local, shape.causal)
    pairs = {k: sum(p.pairs() for p in v) for k, v in plans.items()}
    out = np.empty(shape.nranks, dtype=np.int64)
    out[0] = pairs[SAME]
    if shape.nranks > 1:
        out[1:] = max(pairs[BELOW], pairs[ABOVE])
    return out


def step_work(shape: Shape) -> np.ndarray:
    """(P, P) FLOPs rank r computes at step s."""
    return flops(shape.batch, shape.heads, shape.head_dim, 1) * step_pairs(shape).astype(np.float64)


def piece_terms(pieces, cal: Calibration, shape: Shape, heads: int, phase: str = "fwd") -> list[float]:
    """Per-piece rates (``Calibration.per_piece``): the seconds of each piece, in order (:func:`pieces_seconds`)."""
    if isinstance(cal, DeviceCalibration):  # a preset's GPU: each piece one kernel call (Device.call_seconds)
        return [cal.piece_seconds(p, shape, heads, phase) for p in pieces]
    if not pieces:
        return []
    nq = [p.q1 - p.q0 for p in pieces]
    nk = [p.k1 - p.k0 for p in pieces]
    pairs = [p.pairs() for p in pieces]
    masked = [p.mask != FULL for p in pieces]
    secs = cal.pieces_seconds(nq, nk, pairs, masked, shape.nranks, phase, piece_dims(shape, heads))
    return [float(x) for x in secs]


def piece_dims(shape: Shape, heads: int) -> tuple[int, int, int, int]:
    """(B, H, H_kv, D) of a piece with ``heads`` query heads of ``shape`` (after an all-to-all: its share of the K/V
    heads, at least one)."""
    return shape.batch, heads, max(1, shape.kv_heads * heads // shape.heads), shape.head_dim


def pieces_seconds(pieces, cal: Calibration, shape: Shape, heads: int, phase: str = "fwd", key_flops: float | None = None) -> float:
    """Compute seconds of ``pieces`` with ``heads`` query heads (B and D from ``shape``) on one rank.

    With per-piece rates (``Calibration.per_piece``: a probe measured causal diagonal blocks): each piece at the rate
    of its own size, full pieces from the full-block table and masked ones from the diagonal-block table, both keyed
    by the FLOPs of the piece's rectangle. Otherwise every piece at ``cal.rate(key_flops)`` (default: the shape's full
    block), the causal and layout tables included (rates fitted to runs). The backward counts 2.5 x the FLOPs."""
    if not cal.per_piece(phase):
        return _pairs_seconds(sum(p.pairs() for p in pieces), cal, shape, heads, phase, key_flops)
    total = 0.0
    for t in piece_terms(pieces, cal, shape, heads, phase):
        total += t
    return total


def _pairs_seconds(pairs: int, cal: Calibration, shape: Shape, heads: int, phase: str, key_flops: float | None) -> float:
    """``pairs`` unmasked pairs at the one rate of ``key_flops`` (default: the shape's full block): rates fitted to runs."""
    mult = BWD_FLOPS if phase == "bwd" else 1.0
    per_pair = mult * flops(shape.batch, heads, shape.head_dim, 1)
    if key_flops is None:
        key_flops = mult * full_block_flops(shape)
    return per_pair * pairs / cal.rate(key_flops, shape.nranks, shape.causal, shape.layout, phase)


def class_seconds(shape: Shape, cal: Calibration, phase: str = "fwd") -> dict:
    """{class: compute seconds of one ring step of that class} (:func:`class_plans`, :func:`pieces_seconds`)."""
    plans = class_plans(shape.layout, shape.nranks, shape.n_local, shape.causal)
    return {k: pieces_seconds(v, cal, shape, shape.heads, phase) for k, v in plans.items()}


def step_compute(shape: Shape, cal: Calibration, phase: str = "fwd") -> np.ndarray:
    """(P, P) compute seconds of rank r at ring step s (pieces from layout.step_plan, :func:`pieces_seconds`; without
    step classes: :func:`plan_seconds` of every (rank, source) plan)."""
    if not classed(shape):
        return ring_view(plan_seconds(shape, cal, shape.heads, phase))
    return class_matrix(class_seconds(shape, cal, phase), shape.nranks)


def ring_compute(shape: Shape, cal: Calibration, phase: str = "fwd", per_rank: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """((P,) the busiest rank's compute seconds per ring step, the (P, P) per-rank matrix or, without ``per_rank``, the
    busiest row (1, P)): the step classes' O(P) where they hold, every plan's O(P^2) where documents break them."""
    P = shape.nranks
    if classed(shape):
        values = class_seconds(shape, cal, phase)
        top = busiest(values, P)
        return top, (class_matrix(values, P) if per_rank else top[None, :])
    m = step_compute(shape, cal, phase)
    top = m.max(axis=0)
    return top, (m if per_rank else top[None, :])


# ---------------------------------------------------------------------------------------------
# Packed documents and sliding windows (issue 20): the pairs and seconds of every (rank, source) plan
# ---------------------------------------------------------------------------------------------
# With documents or a window the work of a step depends on which tokens the two ranks hold, not only on whether the
# source is the query rank, a lower one or a higher one: the step classes above do not hold, and the model evaluates
# the P^2 plans (layout.step_plan with the documents and the window; the hybrid strategy's R^2 group plans), each
# piece at the rate of its own size. The plans' pieces are flattened into arrays once per (layout, P, n, mask) and
# cached, so the strategies of one advise point share them.
CLASSED_LAYOUTS = ("contiguous", "zigzag", "striped")  # the layouts whose step plans have the step classes


def classed(shape: Shape) -> bool:
    """Whether the step classes hold: a layout of CLASSED_LAYOUTS with one document and no window (the old mask)."""
    return shape.layout in CLASSED_LAYOUTS and not shape.masked


@functools.lru_cache(maxsize=256)
def _doc_lengths(docs: str, seq_len: int) -> tuple:
    from ringbench.documents import doc_lengths

    return tuple(doc_lengths(docs, seq_len))


def unrunnable(shape: Shape) -> str | None:
    """Why the layout cannot take the shape's documents and window at its rank count (layout.layout_problem; a spec
    that does not hold over N), else None."""
    from ringbench.layout import layout_problem

    try:
        docs = shape.doc_lengths
    except ValueError as exc:
        return str(exc)
    return layout_problem(shape.layout, shape.nranks, shape.seq_len, docs if len(docs) > 1 else (), shape.window, shape.causal)


def _nan_prediction(shape: Shape, per_rank: bool) -> Prediction:
    """The prediction of a shape that cannot run: every time nan (what the figures and tables skip)."""
    nan = np.full(1, math.nan)
    return Prediction(np.full((shape.nranks if per_rank else 1, 1), math.nan), math.nan, nan, nan, math.nan, math.nan, phase=shape.pass_)


def mask_kw(shape: Shape) -> dict:
    """The documents and window keywords of layout's plans (none for the old mask: the old calls, bit for bit)."""
    return {"docs": shape.doc_lengths, "window": shape.window} if shape.masked else {}


@dataclass(frozen=True)
class PieceTable:
    """Every piece of the R x R plans (ring: R = P, owner = rank R + source; groups of U ranks: R = P / U, owner =
    group R + source group), as arrays: ``owner``, ``nq``, ``nk``, ``pairs`` (int64) and ``masked`` (not FULL)."""

    size: int
    owner: np.ndarray
    nq: np.ndarray
    nk: np.ndarray
    pairs: np.ndarray
    masked: np.ndarray

    def per_owner(self, values) -> np.ndarray:
        """(R, R) sums of a per-piece ``values`` array by owner."""
        return np.bincount(self.owner, weights=values, minlength=self.size * self.size).reshape(self.size, self.size)


def piece_table(shape: Shape, u: int = 1) -> PieceTable:
    """The pieces of every (rank, source) plan (``u`` = 1) or every (group, source group) plan of groups of ``u``
    consecutive ranks (the hybrid strategy's ring; ``u`` = P: ulysses, one plan of the whole mask)."""
    return _piece_table(shape.layout, shape.nranks, shape.n_local, shape.causal, shape.doc_lengths, shape.window, u)


@functools.lru_cache(maxsize=32)
def _piece_table(layout: str, nranks: int, n: int, causal: bool, docs: tuple, window: int, u: int) -> PieceTable:
    kw = {"docs": docs, "window": window} if docs or window else {}
    size = nranks // u
    owner, nq, nk, pairs, masked = [], [], [], [], []
    for a in range(size):
        for b in range(size):
            plan = step_plan(layout, a, b, nranks, n, causal, **kw) if u == 1 else group_plan(layout, a, b, u, nranks, n, causal, **kw)
            for p in plan:
                owner.append(a * size + b)
                nq.append(p.q1 - p.q0)
                nk.append(p.k1 - p.k0)
                pairs.append(p.pairs())
                masked.append(p.mask != FULL)
    arr = [np.asarray(x, dtype=np.int64) for x in (owner, nq, nk, pairs)]
    return PieceTable(size, *arr, np.asarray(masked, dtype=bool))


def pair_matrix(shape: Shape, u: int = 1) -> np.ndarray:
    """(R, R) int64 unmasked pairs of the plan of (rank, source) (``u`` = 1: R = P) or (group, source group) of groups
    of ``u`` ranks: every query of the group against every key of the source group, all heads."""
    tab = piece_table(shape, u)
    return np.bincount(tab.owner, weights=tab.pairs, minlength=tab.size**2).astype(np.int64).reshape(tab.size, tab.size)


def ring_view(m: np.ndarray) -> np.ndarray:
    """(R, R) ``m[a, (a - s) mod R]``: a (rank, source) matrix as (rank, ring step), the block of step s having come
    from (a - s) mod R."""
    size = m.shape[0]
    a = np.arange(size)[:, None]
    return m[a, (a - np.arange(size)[None, :]) % size]


def plan_seconds(shape: Shape, cal: Calibration, heads: int, phase: str = "fwd", u: int = 1, key_flops: float | None = None) -> np.ndarray:
    """(R, R) compute seconds of the plan of (rank, source) (``u`` = 1) or (group, source group) with ``heads`` query
    heads: each piece at the rate of its own size where the calibration has per-piece rates (a probe; a preset's
    device: one kernel call per piece, its per-call overhead included), else every pair at the one rate of
    ``key_flops`` (default: the shape's full block), as :func:`pieces_seconds` times one piece."""
    tab = piece_table(shape, u)
    mult = BWD_FLOPS if phase == "bwd" else 1.0
    per_pair = mult * flops(shape.batch, heads, shape.head_dim, 1)
    pairs = tab.pairs.astype(np.float64)
    if isinstance(cal, DeviceCalibration):
        dev = cal.device
        kv = max(1, shape.kv_heads * heads // shape.heads)
        rate = np.empty(len(pairs))
        for m in (False, True):
            sel = tab.masked == m
            if sel.any():
                rate[sel] = _device_rates(dev, phase, m, tab.nk[sel].astype(np.float64))
        q_elems = shape.batch * tab.nq * heads * shape.head_dim
        if phase == "bwd":
            moved = dev.merge_bwd_q_bytes * q_elems + 2 * dev.merge_bwd_kv_bytes * shape.batch * tab.nk * kv * shape.head_dim
        else:
            moved = dev.merge_fwd_bytes * q_elems
        secs = dev.call_overhead_s + per_pair * pairs / rate + moved / dev.hbm_Bps
        secs = np.where(tab.pairs > 0, secs, 0.0)
    elif cal.per_piece(phase):
        secs = cal.pieces_seconds(tab.nq, tab.nk, tab.pairs, tab.masked, shape.nranks, phase, piece_dims(shape, heads))
    else:
        if key_flops is None:
            key_flops = mult * full_block_flops(shape)
        secs = per_pair * pairs / cal.rate(key_flops, shape.nranks, shape.causal, shape.layout, phase)
    return tab.per_owner(secs)


def _device_rates(dev: Device, phase: str, causal: bool, tokens: np.ndarray) -> np.ndarray:
    """:meth:`Device.rate` of many calls at once."""
    pts = dev.tables[(phase, bool(causal))]
    k0, r0 = pts[0]
    out = np.interp(np.log(np.maximum(tokens, 1.0)), [math.log(k) for k, _ in pts], [r for _, r in pts])
    return np.where(tokens < k0, r0 * np.maximum(tokens, 1.0) / k0, out)


def strategy_pairs(shape: Shape) -> np.ndarray:
    """(P, S) the (query, key) pairs each rank computes at each step of its strategy's pass, all heads counted (a rank
    computing a share of the heads counts that share): what a run stores as its ``pairs`` sample.

    ring modes (overlap, blocking, allgather): (P, P) by ring step, :func:`step_pairs`. pass-q: (P, P), at step s
    rank r computes the queries of rank (r - s) mod P against its own keys. hybrid and ulysses: (P, R) by step of the
    ring over the R = P / U groups, every member of a group 1 / U of its group plan's pairs (its H / U heads of the
    group's U n queries against a group's U n keys; ulysses: R = 1, the whole mask)."""
    P = shape.nranks
    if shape.mode == "pass-q":
        ring = step_pairs(shape)  # (q, s') with src = (q - s') mod P: rank r = src at pass-q step s has q = (r - s) mod P
        r, s = np.arange(P)[:, None], np.arange(P)[None, :]
        return ring[(r - s) % P, (-s) % P].astype(np.float64)
    if shape.mode in ("ulysses", "hybrid"):
        u = strategy_degree(shape)
        groups = ring_view(group_pairs(shape, u)) / u
        return np.repeat(groups, u, axis=0)
    return step_pairs(shape).astype(np.float64)


def group_pairs(shape: Shape, u: int) -> np.ndarray:
    """(R, R) pairs of the plan of (group, source group), groups of ``u`` ranks (:func:`pair_matrix`; with the step
    classes in closed form from the three class plans, as :func:`group_seconds`)."""
    r = shape.nranks // u
    if not classed(shape) or not shape.causal:
        if not shape.causal and not shape.masked:
            return np.full((r, r), (u * shape.n_local) ** 2, dtype=np.int64)
        return pair_matrix(shape, u)
    plans = class_plans(shape.layout, shape.nranks, shape.n_local, shape.causal)
    pairs = {k: sum(p.pairs() for p in v) for k, v in plans.items()}
    same = u * pairs[SAME] + (u * (u - 1) // 2 * (pairs[BELOW] + pairs[ABOVE]) if u > 1 else 0)
    if r == 1:
        return np.array([[same]], dtype=np.int64)
    g = np.arange(r)
    out = np.where(g[None, :] < g[:, None], u * u * pairs[BELOW], u * u * pairs[ABOVE]).astype(np.int64)
    out[g, g] = same
    return out


def group_seconds(shape: Shape, cal: Calibration, u: int, heads: int, phase: str, key_flops: float) -> dict:
    """{class: ``pieces_seconds(group_plan(layout, g, src, u, P, n, causal), ...)``} for the hybrid strategy's ring over
    groups of U ranks: SAME (src == g), BELOW (src < g), ABOVE (src > g), equal bit for bit to the U^2-piece sums, in
    O(log U) (:func:`sequential_sum`): group g's member a against group src's member c is a step plan of class
    BELOW for every (a, c) when src < g, ABOVE when src > g, and, when src == g, BELOW for c < a, SAME for c == a and
    ABOVE for c > a (pieces in the order a, c)."""
    P, n, r = shape.nranks, shape.n_local, shape.nranks // u
    keys = (SAME, BELOW, ABOVE) if r > 1 else (SAME,)
    if not shape.causal or u == 1:  # one full piece (u n x u n), or the ring's own step plans
        plans = {SAME: group_plan(shape.layout, 0, 0, u, P, n, shape.causal)}
        if r > 1:
            plans[BELOW] = group_plan(shape.layout, 1, 0, u, P, n, shape.causal)
            plans[ABOVE] = group_plan(shape.layout, 0, 1, u, P, n, shape.causal)
        return {k: pieces_seconds(plans[k], cal, shape, heads, phase, key_flops) for k in keys}
    plans = class_plans(shape.layout, P, n, shape.causal)  # P >= u >= 2
    if not cal.per_piece(phase):
        pairs = {k: sum(p.pairs() for p in v) for k, v in plans.items()}
        total = {
            SAME: u * pairs[SAME] + u * (u - 1) // 2 * (pairs[BELOW] + pairs[ABOVE]),
            BELOW: u * u * pairs[BELOW],
            ABOVE: u * u * pairs[ABOVE],
        }
        return {k: _pairs_seconds(total[k], cal, shape, heads, phase, key_flops) for k in keys}
    terms = {k: tuple(piece_terms(v, cal, shape, heads, phase)) for k, v in plans.items()}
    out = {SAME: sequential_sum([(terms[BELOW], 0, 1), (terms[SAME], 1, 0), (terms[ABOVE], u - 1, -1)], u)}
    if r > 1:  # U^2 step plans of one class, one after the other
        out[BELOW] = _repeat_add(0.0, terms[BELOW], u * u)
        out[ABOVE] = _repeat_add(0.0, terms[ABOVE], u * u)
    return out


# ---------------------------------------------------------------------------------------------
# Exact sums of long repetitive sequences of floats
# ---------------------------------------------------------------------------------------------
def sequential_sum(spec, rows: int) -> float:
    """``0.0 + t + t + ...`` added one term at a time (Python float addition, left to right), bit for bit, without
    adding every term: row a (0 <= a < ``rows``) adds, for each (terms, c0, c1) of ``spec`` in order, the tuple
    ``terms`` c0 + c1 a times.

    Exactness: while the running sum s stays in one binade [2^e, 2^(e+1)) its spacing u is fixed, and for a term
    t >= 0, fl(s + t) = s + rne(t / u) u whenever t / u is not a tie (a fraction of exactly 1/2); so a stretch of
    rows adds a known integer number of u, in closed form (rows within a binade: an arithmetic series), until the
    row that leaves the binade, which is added term by term (a run of one repeated term: :func:`_repeat_add`).
    A tie makes the rounding depend on the parity of s / u; each term has a tie in at most one binade (where u is
    twice its lowest bit), whose rows are added explicitly. Cost: O(binades x log rows) for terms without ties.
    Negative terms (no calibration gives them): added one by one."""
    if any(t < 0 for ts, _, _ in spec for t in ts):
        s = 0.0
        for a in range(rows):
            for ts, c0, c1 in spec:
                for _ in range(c0 + c1 * a):
                    for t in ts:
                        s += t
        return s
    s, a = 0.0, 0
    while a < rows:
        if 0 < s < math.inf:
            u, su, top = _grid(s)
            units = [_units(ts, u) for ts, _, _ in spec]
            if None not in units:
                alpha = sum(d * c0 for d, (_, c0, _) in zip(units, spec))  # row a adds alpha + beta a units
                beta = sum(d * c1 for d, (_, _, c1) in zip(units, spec))
                room = top - 1 - su  # units the sum may still grow by and stay in its binade
                lo, hi = 0, rows - a  # the most rows whose end stays in the binade (the growth is non-decreasing)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if _rows_units(alpha, beta, a, mid) <= room:
                        lo = mid
                    else:
                        hi = mid - 1
                s = float(su + _rows_units(alpha, beta, a, lo)) * u  # an integer below 2^53 times a power of two: exact
                a += lo
                if a == rows:
                    break
        for ts, c0, c1 in spec:  # the row that leaves the binade (or one with a tie), term by term
            s = _repeat_add(s, ts, c0 + c1 * a)
        a += 1
    return s


def _rows_units(alpha: int, beta: int, a0: int, m: int) -> int:
    """Units added by rows a0 .. a0 + m - 1 when row a adds alpha + beta a."""
    return alpha * m + beta * (m * a0 + m * (m - 1) // 2)


def _grid(s: float) -> tuple[float, int, int]:
    """(u, s / u, the binade's top / u) of a positive finite s: its spacing, itself and its binade's end in units."""
    u = math.ulp(s)
    su = int(s / u)
    return u, su, (1 << 53) if su >= (1 << 52) else (1 << 52)


def _units(terms: tuple, u: float) -> int | None:
    """How many units u the tuple adds to a sum on the grid u (rne(t / u) per term), or None if a term is a tie
    (or too large for the binade)."""
    total = 0
    for t in terms:
        x = t / u  # exact: u is a power of two
        if not x < 2.0**53:
            return None
        q = math.floor(x)
        frac = x - q
        if frac == 0.5:
            return None
        total += q + (frac > 0.5)
    return total


def _repeat_add(s: float, terms: tuple, k: int) -> float:
    """``s`` plus the tuple ``terms`` k times, one float addition at a time, bit for bit (:func:`sequential_sum`)."""
    if not terms or k <= 0:
        return s
    if any(t < 0 for t in terms):  # no calibration gives these
        for _ in range(k):
            for t in terms:
                s += t
        return s
    while k > 0:
        if not s < math.inf:
            return s + sum(terms)  # inf or nan: only a nan term still changes it (to nan)
        if s > 0 and k > 1:
            u, su, top = _grid(s)
            d = _units(terms, u)
            if d is None and len(terms) == 1 and terms[0] / u < 2.0**53 and su % 2 == 0:
                q = math.floor(terms[0] / u)  # a tie from an even sum: it rounds to even, and stays even
                d = q if q % 2 == 0 else q + 1
            if d is not None:
                if d == 0:
                    return s  # every term rounds away: the sum does not change
                m = min(k, (top - 1 - su) // d)
                if m:
                    s = float(su + m * d) * u
                    k -= m
                    continue
        for t in terms:
            s += t
        k -= 1
    return s


def comm_time(nbytes: float, latency: float, bandwidth: float) -> float:
    """Hockney: latency + bytes / bandwidth."""
    return latency + nbytes / bandwidth


@dataclass
class Prediction:
    compute_s: np.ndarray  # (P, P) rank x step; (1, steps) the busiest rank per step when predicted with per_rank=False
    comm_s: float  # one block transfer
    step_s: np.ndarray  # (P,) bulk-synchronous step times
    exposed_s: np.ndarray  # (P,) communication not hidden, per step
    time_s: float  # the pass
    comm_total_s: float  # all transfers of the pass, alone
    phase: str = "fwd"  # fwd, bwd or fwd+bwd (then ``parts`` holds each phase's prediction)
    final_s: float = 0.0  # transfers after the last step (the backward's dK/dV hop home), in the last step's time
    parts: dict = field(default_factory=dict)

    @property
    def exposed_total_s(self) -> float:
        return float(self.exposed_s.sum())


def predict(shape: Shape, cal: Calibration, machine: Machine | None = None, *, per_rank: bool = True) -> Prediction:
    """Per-step compute, communication, exposed time and the pass time (module docstring; strategies: predict_strategy).

    O(P) time and memory (the step classes above), plus the (P, P) per-rank compute matrix ``compute_s`` when
    ``per_rank``; ``per_rank=False`` (advise) keeps only the busiest rank's row, (1, steps): every time is the same."""
    if not classed(shape) and unrunnable(shape):  # e.g. a documents' spec extrapolated to a rank count it cannot take
        return _nan_prediction(shape, per_rank)
    if shape.mode in STRATEGY_MODES:
        return predict_strategy(shape, cal, machine, per_rank=per_rank)
    if shape.pass_ != "fwd":
        if shape.pass_ == "bwd":
            return predict_bwd(shape, cal, machine, per_rank=per_rank)
        return predict_fwd_bwd(shape, cal, machine, per_rank=per_rank)
    P = shape.nranks
    latency, bandwidth = ring_link(cal, machine, P, 1)
    busiest_s, compute = ring_compute(shape, cal, "fwd", per_rank)  # (P,) per step; (P, P) or (1, P)
    comm = comm_time(block_bytes(shape), latency, bandwidth) if P > 1 else 0.0
    sends = np.where(np.arange(P) < P - 1, comm, 0.0)
    if shape.mode == "overlap":
        busy = overlapped(busiest_s, sends, cal)
        step = np.maximum(busy, sends)
        exposed = np.maximum(0.0, sends - busy)
    elif shape.mode == "blocking":
        step = busiest_s + sends
        exposed = sends
    elif shape.mode == "allgather":
        exposed = np.zeros(P)
        exposed[0] = allgather_time(block_bytes(shape), P, cal, machine)
        step = busiest_s + exposed
    else:
        raise ValueError(f"unknown mode {shape.mode!r}")
    return Prediction(compute_s=compute, comm_s=comm, step_s=step, exposed_s=exposed, time_s=float(step.sum()), comm_total_s=(P - 1) * comm)


# ---------------------------------------------------------------------------------------------
# The backward pass (module docstring)
# ---------------------------------------------------------------------------------------------
def grad_block_bytes(shape: Shape) -> int:
    """Bytes of one dK/dV accumulator as it travels: 2 B n H_kv D acc (float32 for half precision)."""
    return 2 * shape.batch * shape.n_local * shape.kv_heads * shape.head_dim * ACC_ITEMSIZE[shape.dtype]


def bwd_full_block_flops(shape: Shape) -> float:
    """Backward FLOPs of one unmasked n x n block (2.5 x the forward's): the backward rate's lookup key."""
    return BWD_FLOPS * full_block_flops(shape)


def bwd_bytes_per_rank(shape: Shape) -> int:
    """Bytes a rank sends in one backward pass: (P-1) K/V blocks and P dK/dV accumulators (none at P = 1); the
    allgather mode's all-to-all sends P - 1 shares of them (its own stays)."""
    P = shape.nranks
    hops = P - 1 if shape.mode == "allgather" else P
    return (P - 1) * block_bytes(shape) + (hops * grad_block_bytes(shape) if P > 1 else 0)


def bwd_step_bytes(shape: Shape) -> np.ndarray:
    """(P,) bytes a rank sends during ring step s of the backward: the next K/V block (s < P-1) and the
    accumulator finished at step s-1 (s >= 1); the hop home after the last step is not included."""
    P, m, g = shape.nranks, block_bytes(shape), grad_block_bytes(shape)
    if P < 2:
        return np.zeros(P)
    steps = np.arange(P)
    return (np.where(steps < P - 1, m, 0) + np.where(steps >= 1, g, 0)).astype(np.float64)


def predict_bwd(shape: Shape, cal: Calibration, machine: Machine | None = None, *, per_rank: bool = True) -> Prediction:
    """The backward pass: per-step compute at the backward rate, the K/V and dK/dV transfers, the final hop."""
    P = shape.nranks
    latency, bandwidth = ring_link(cal, machine, P, 1)
    busiest_s, compute = ring_compute(shape, cal, "bwd", per_rank)
    step_bytes = bwd_step_bytes(shape)
    sends = np.where(step_bytes > 0, comm_time(step_bytes, latency, bandwidth), 0.0)
    final = comm_time(grad_block_bytes(shape), latency, bandwidth) if P > 1 else 0.0
    if shape.mode == "overlap":
        busy = overlapped(busiest_s, sends, cal)
        step = np.maximum(busy, sends)
        exposed = np.maximum(0.0, sends - busy)
    elif shape.mode == "blocking":
        step = busiest_s + sends
        exposed = sends.copy()
    elif shape.mode == "allgather":  # all-gather K/V before step 0, reduce-scatter dK/dV after the last step
        exposed = np.zeros(P)
        exposed[0] = allgather_time(block_bytes(shape), P, cal, machine)
        final = allgather_time(grad_block_bytes(shape), P, cal, machine)  # the reduce-scatter: the same ring, reversed
        step = busiest_s + exposed
        sends = np.zeros(P)
        comm_total = exposed[0] + final
    else:
        raise ValueError(f"unknown mode {shape.mode!r}")
    if shape.mode != "allgather":
        comm_total = float(sends.sum() + final)
    step[-1] += final
    exposed[-1] += final
    return Prediction(
        compute_s=compute,
        comm_s=float(sends.max(initial=0.0)),
        step_s=step,
        exposed_s=exposed,
        time_s=float(step.sum()),
        comm_total_s=float(comm_total),
        phase="bwd",
        final_s=float(final),
    )


def predict_fwd_bwd(shape: Shape, cal: Calibration, machine: Machine | None = None, *, per_rank: bool = True) -> Prediction:
    """Both passes one after the other: steps, compute and times of the forward, then of the backward."""
    fwd = predict(shape.with_(pass_="fwd"), cal, machine, per_rank=per_rank)
    return _both(fwd, predict(shape.with_(pass_="bwd"), cal, machine, per_rank=per_rank))


def _both(fwd: Prediction, bwd: Prediction) -> Prediction:
    return Prediction(
        compute_s=np.hstack([fwd.compute_s, bwd.compute_s]),
        comm_s=max(fwd.comm_s, bwd.comm_s),
        step_s=np.concatenate([fwd.step_s, bwd.step_s]),
        exposed_s=np.concatenate([fwd.exposed_s, bwd.exposed_s]),
        time_s=fwd.time_s + bwd.time_s,
        comm_total_s=fwd.comm_total_s + bwd.comm_total_s,
        phase="fwd+bwd",
        final_s=bwd.final_s,
        parts={"fwd": fwd, "bwd": bwd},
    )


# ---------------------------------------------------------------------------------------------
# The crossover block size
# ---------------------------------------------------------------------------------------------
def causal_fraction(shape: Shape) -> float:
    """Least share of a full n x n block the busiest rank computes at a communicating step (1 if none)."""
    P = shape.nranks
    if P < 2:
        return 1.0
    return float(busiest_pairs(shape)[: P - 1].min()) / shape.n_local**2


def crossover_tokens(shape: Shape, cal: Calibration, *, iterations: int = 3) -> float:
    """Least tokens per rank n at which compute covers every transfer in overlap mode (module docstring).

    The compute rate depends on the block size, so the closed form is iterated with the rate at the
    previous estimate. ``inf`` if a step computes nothing at all (the transfer can never be hidden).
    The backward (``shape.pass_`` "bwd"): :func:`bwd_crossover_tokens`; "fwd+bwd": the larger of the two.
    """
    if shape.pass_ != "fwd":
        n_bwd = bwd_crossover_tokens(shape, cal, iterations=iterations)
        return n_bwd if shape.pass_ == "bwd" else max(n_bwd, crossover_tokens(shape.with_(pass_="fwd"), cal, iterations=iterations))
    P = max(shape.nranks, 2)
    shape = shape.with_(nranks=P)
    f = causal_fraction(shape)
    if f <= 0:
        return math.inf
    latency, bandwidth = cal.link(P)
    b = 2 * shape.batch * shape.kv_heads * shape.head_dim * ITEMSIZE[shape.dtype] / bandwidth
    n = float(shape.n_local)
    for _ in range(iterations):
        rate = cal.rate(flops(shape.batch, shape.heads, shape.head_dim, n * n), P, shape.causal, shape.layout)
        a = 4 * shape.batch * shape.heads * shape.head_dim * f / rate
        n = crossover_closed_form(a, b, latency)
    return n


def bwd_crossover_tokens(shape: Shape, cal: Calibration, *, iterations: int = 3) -> float:
    """Least tokens per rank n at which the backward's compute covers every step's transfers (module docstring):
    the largest over steps s = 0..P-1 of the closed form with that step's bytes and busiest share f_s."""
    P = max(shape.nranks, 2)
    shape = shape.with_(nranks=P)
    # Steps 1..P-1 have the same busiest share (step classes), so only steps 0, 1 and P-1 differ: the maximum over
    # those three (in step order, as over all P steps) is the maximum over every step.
    steps = ([0, 1, P - 1] if P > 2 else [0, 1]) if classed(shape) else list(range(P))  # documents: every step differs
    frac = busiest_pairs(shape)[steps] / shape.n_local**2  # the busiest rank's share of a full block
    if frac.min() <= 0:
        return math.inf
    latency, bandwidth = cal.link(P)
    per_token = 2 * shape.batch * shape.kv_heads * shape.head_dim
    item, acc = ITEMSIZE[shape.dtype], ACC_ITEMSIZE[shape.dtype]
    b = np.array([per_token * (item * (s < P - 1) + acc * (s >= 1)) / bandwidth for s in steps])
    n = float(shape.n_local)
    for _ in range(iterations):
        rate = cal.rate(BWD_FLOPS * flops(shape.batch, shape.heads, shape.head_dim, n * n), P, shape.causal, shape.layout, phase="bwd")
        a = BWD_FLOPS * 4 * shape.batch * shape.heads * shape.head_dim * frac / rate
        n = max(crossover_closed_form(float(a_s), float(b_s), latency) for a_s, b_s in zip(a, b))
    return n


def crossover_closed_form(a: float, b: float, latency: float) -> float:
    """Positive root of a n^2 = latency + b n."""
    return (b + math.sqrt(b * b + 4 * a * latency)) / (2 * a)


# ---------------------------------------------------------------------------------------------
# Calibration from measurements
# ---------------------------------------------------------------------------------------------
def fit_link(nbytes, seconds) -> tuple[float, float]:
    """(latency, bandwidth) of t = latency + bytes / bandwidth: the bandwidth from the large messages, the latency
    from the small ones.

    With three message sizes or more, the bandwidth is the slope of a least-squares line through the median time of
    each of the larger half of the sizes (at least two), and the latency the smallest size's median time less its
    bytes at that bandwidth (0 if negative). A link that passes small messages faster than its sustained rate, such
    as a token-bucket shaper (``tc ... tbf``: a burst at line rate, then the shaped rate) or an eager protocol's
    buffers, would otherwise get the small messages' rate: a ring moves blocks of megabytes at the sustained one.
    Two sizes: least squares on relative residuals. One size, or a fit with a non-positive slope or a negative
    intercept: latency 0 and a fit through the origin.
    """
    m = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    sizes = np.unique(m)
    if len(sizes) >= 3:
        med = np.array([np.median(t[m == x]) for x in sizes])
        top = max(2, len(sizes) // 2)
        slope, _ = np.polyfit(sizes[-top:], med[-top:], 1)
        if slope > 0:
            return float(max(med[0] - sizes[0] * slope, 0.0)), float(1.0 / slope)
    elif len(sizes) == 2:
        slope, icpt = np.polyfit(m, t, 1, w=1.0 / t)
        if slope > 0 and icpt >= 0:
            return float(icpt), float(1.0 / slope)
    slope = float(np.median(t / m))
    return 0.0, (1.0 / slope if slope > 0 else math.inf)


def check_failed(run) -> bool:
    """Whether a stored run's --check failed in some phase: it ran (status "ok"), but its numbers are wrong."""
    phases = [run.phase(p) for p in run.phases()] if hasattr(run, "phases") else []
    return any(ph.check and not ph.check.get("passed", True) for ph in phases)


def fit_runs(runs) -> tuple[list, list[str]]:
    """The runs a calibration may be fitted to (those whose --check did not fail) and a note on those left out."""
    bad = [r for r in runs if check_failed(r)]
    if not bad:
        return list(runs), []
    where = ", ".join(f"{r.path}:/runs/{r.name}" for r in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return [r for r in runs if not check_failed(r)], [f"{len(bad)} run(s) left out of the fit: their --check failed ({where})"]


def calibrate_from_runs(runs) -> Calibration:
    """Compute rate from compute_s samples and link parameters from comm_only_s, per rank count; runs whose
    --check failed are left out (``fit_runs``), and the calibration's notes say so."""
    runs, notes = fit_runs(runs)
    tables: dict = {"full": {}}
    link_pts: dict = {}
    for run in runs:
        if run.status != "ok" or "compute_s" not in run.samples or run.config.get("mode") in STRATEGY_MODES:
            continue  # the strategies' steps are not ring steps: calibrate from the ring modes only
        if run.config.get("pass") in ("prefill", "decode"):
            continue  # serving passes: queries and K/V of other lengths than the training ring's
        shape = Shape.from_config(run.config, run.nranks)
        work = step_work(shape).sum(axis=1)  # (P,)
        busy = np.median(np.asarray(run.samples["compute_s"]).sum(axis=2), axis=0)  # (P,)
        if busy.sum() > 0:
            point = (full_block_flops(shape), float(work.sum() / busy.sum()))
            for kind in (shape.layout, "*") if shape.causal else ("full",):
                tables.setdefault(kind, {}).setdefault(run.nranks, []).append(point)
        alone = np.asarray(run.samples.get("comm_only_s", np.zeros((0,))))
        if run.nranks > 1 and alone.size:
            link_pts.setdefault(run.nranks, []).append((block_bytes(shape), float(np.median(alone))))
    bwd_tables = _bwd_run_points(runs, link_pts)
    if len(tables) == 1 and not tables["full"] and not bwd_tables:
        raise ValueError("no successful runs with timing samples to calibrate from")
    rates, causal = _rate_tables(tables)
    bwd_rates, bwd_causal = _rate_tables(bwd_tables) if bwd_tables else ({}, {})
    links = {p: fit_link([m for m, _ in v], [t for _, t in v]) for p, v in link_pts.items()}
    return Calibration(
        rates=rates,
        links=links,
        causal_rates=causal,
        bwd_rates=bwd_rates,
        bwd_causal_rates=bwd_causal,
        source="fitted to the runs' own samples (compute_s, comm_only_s)",
        notes=notes,
        conditions=[r.provenance.get("conditions") for r in runs if r.status == "ok"],
    )


def _rate_tables(tables: dict) -> tuple[dict, dict]:
    """(rates, causal_rates) from {"full" | layout | "*": {nranks: points}}: points merged per block size."""
    merged = {kind: {p: _merge_points(v) for p, v in t.items()} for kind, t in tables.items()}
    full = merged.pop("full", {})
    return (full or merged.get("*", {})), merged


def _bwd_run_points(runs, link_pts: dict) -> dict:
    """Backward rate points of the runs' backward phases ({"full" | layout | "*": {nranks: points}}), keyed by the
    backward's full-block FLOPs; their comm-only passes add link points to ``link_pts``: step 0 moves one K/V
    block, steps 1..P-2 a K/V block and a dK/dV accumulator (the last step, with the hop home, is left out)."""
    tables: dict = {}
    for run in runs:
        ph = getattr(run, "bwd", None)
        if run.status != "ok" or ph is None or "compute_s" not in ph.samples:
            continue
        shape = Shape.from_config(run.config, run.nranks)
        work = BWD_FLOPS * step_work(shape).sum(axis=1)  # (P,)
        busy = np.median(np.asarray(ph.samples["compute_s"]).sum(axis=2), axis=0)  # (P,)
        if busy.sum() > 0:
            point = (bwd_full_block_flops(shape), float(work.sum() / busy.sum()))
            for kind in (shape.layout, "*") if shape.causal else ("full",):
                tables.setdefault(kind, {}).setdefault(run.nranks, []).append(point)
        alone = np.asarray(ph.samples.get("comm_only_s", np.zeros((0,))))
        P = run.nranks
        if P > 1 and alone.ndim == 3 and alone.shape[0] and alone.shape[2] == P:
            step_bytes = bwd_step_bytes(shape)
            link_pts.setdefault(P, []).append((float(step_bytes[0]), float(np.median(alone[:, :, 0]))))
            if P > 2:
                link_pts[P].append((float(step_bytes[1]), float(np.median(alone[:, :, 1 : P - 1]))))
    return tables


def calibrate(runs, probes) -> Calibration:
    """From probes if there are any (link parameters from the runs if no probe had two ranks, the backward rate from
    the runs' backward phases if no probe measured it), else from runs."""
    if not probes:
        return calibrate_from_runs(runs)
    cal = calibrate_from_probes(probes)
    if not cal.bwd_rates and any(getattr(r, "bwd", None) is not None for r in runs):
        try:
            fitted = calibrate_from_runs(runs)
            cal.bwd_rates, cal.bwd_causal_rates = fitted.bwd_rates, fitted.bwd_causal_rates
        except ValueError:
            pass
        if cal.bwd_rates:
            cal.notes.append("backward compute rate fitted to the runs' backward samples (the probe has none: probe again)")
            cal.notes += [n for n in fit_runs(runs)[1] if n not in cal.notes]
    if not cal.links and runs:
        try:
            cal.links = calibrate_from_runs(runs).links
        except ValueError:
            pass
        if cal.links:
            cal.notes.append("link latency and bandwidth fitted to the runs' comm_only_s (no probe had 2+ ranks)")
            cal.notes += [n for n in fit_runs(runs)[1] if n not in cal.notes]
    if not cal.links:
        cal.notes.append("no link measurement: communication is predicted as free")
    return cal


def calibrate_from_probes(probes) -> Calibration:
    """Calibration from ``ringbench probe`` results (one or more rank counts)."""
    rates: dict = {}
    bwd_rates: dict = {}
    links: dict = {}
    diag: dict = {}
    bwd_diag: dict = {}
    copy_bw: dict = {}
    fits: dict = {}
    bwd_fits: dict = {}
    merges: dict = {}
    for pr in probes:
        s = pr.samples
        per_rank = np.median(np.asarray(s["compute_s"]), axis=1)  # (K, P)
        rate = np.asarray(s["block_flops"], dtype=np.float64) / np.median(per_rank, axis=1)
        rates[pr.nranks] = _merge_points(list(zip(np.asarray(s["block_flops"]).tolist(), rate.tolist())))
        if "bwd_compute_s" in s:  # probes from before the backward have none
            per_rank = np.median(np.asarray(s["bwd_compute_s"]), axis=1)  # (K, P)
            rate = np.asarray(s["bwd_block_flops"], dtype=np.float64) / np.median(per_rank, axis=1)
            bwd_rates[pr.nranks] = _merge_points(list(zip(np.asarray(s["bwd_block_flops"]).tolist(), rate.tolist())))
        if "causal_compute_s" in s:  # probes from before 2026-11-26 have no diagonal blocks and no copy rate
            diag[pr.nranks] = _probe_points(s["block_flops"], s["causal_flops"], s["causal_compute_s"])
            mult = BWD_FLOPS
            bwd_diag[pr.nranks] = _probe_points(
                mult * np.asarray(s["block_flops"]), mult * np.asarray(s["causal_flops"]), s["bwd_causal_compute_s"]
            )
            copy_bw[pr.nranks] = float(pr.summary["copy_Bps"])
        if "piece_compute_s" in s and "causal_compute_s" in s and pr.nranks not in fits:  # schema 4: the skinny pieces
            fits[pr.nranks], bwd_fits[pr.nranks] = probe_piece_fits(pr)
            merges[pr.nranks] = probe_merge_fit(pr)
        if pr.nranks > 1:
            links[pr.nranks] = (float(pr.summary["latency_s"]), float(pr.summary["bandwidth_Bps"]))
    if not rates:
        raise ValueError("no probes")
    where = sorted({f"{p.path}:/probes/{p.name}" for p in probes})
    return Calibration(
        rates=rates,
        links=links,
        bwd_rates=bwd_rates,
        source="probe " + ", ".join(where),
        diag_rates=diag if len(diag) == len(rates) else {},  # per-piece rates only if every rank count has them
        bwd_diag_rates=bwd_diag if len(bwd_diag) == len(rates) else {},
        copy_bw=copy_bw,
        conditions=[p.provenance.get("conditions") for p in probes],
        piece_fits=fits if len(fits) == len(rates) else {},  # as the diagonal tables: only if every rank count has one
        bwd_piece_fits=bwd_fits if len(bwd_fits) == len(rates) else {},
        merge_fits=merges if len(merges) == len(rates) else {},
    )


def probe_merge_fit(probe) -> tuple[float, float]:
    """(c, seconds per output element) >= 0 of one merge, fitted to a schema-4 probe's merge_s (per row count: B H q
    (D + 1) elements; median over repeats per rank, then over ranks), relative residuals, both terms >= 0."""
    c = probe.config
    s = probe.samples
    elems = int(c["batch"]) * int(c["heads"]) * (int(c["head_dim"]) + 1) * np.asarray(s["piece_rows"], dtype=np.float64)
    t = np.median(np.median(np.asarray(s["merge_s"]), axis=1), axis=1)
    c0, per = _relative_nnls(np.stack([np.ones_like(elems), elems], axis=1), t)
    return c0, per


def probe_pieces(probe, phase: str = "fwd") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q rows, k keys, seconds) of every piece a probe timed in the phase: its n x n blocks and (schema 4) its
    skinny pieces, each time the median over repeats (per rank first), then over ranks."""
    s = probe.samples
    pre = "bwd_" if phase == "bwd" else ""
    n = np.asarray(s["block_tokens"], dtype=np.float64)
    t = np.median(np.median(np.asarray(s[pre + "compute_s"]), axis=1), axis=1)  # (K,)
    q, k, out = [n], [n], [t]
    if pre + "piece_compute_s" in s:
        rows, keys = np.asarray(s["piece_rows"], dtype=np.float64), np.asarray(s["piece_keys"], dtype=np.float64)
        tp = np.median(np.median(np.asarray(s[pre + "piece_compute_s"]), axis=2), axis=2)  # (Q, K)
        q.append(np.repeat(rows, len(keys)))
        k.append(np.tile(keys, len(rows)))
        out.append(tp.ravel())
    return np.concatenate(q), np.concatenate(k), np.concatenate(out)


def probe_piece_fits(probe) -> tuple[PieceFit, PieceFit]:
    """The forward's and the backward's :class:`PieceFit` of a probe with skinny pieces (schema 4)."""
    c = probe.config
    dims = dict(batch=int(c["batch"]), heads=int(c["heads"]), kv_heads=int(c.get("kv_heads") or c["heads"]), head_dim=int(c["head_dim"]))
    s = probe.samples
    i0 = int(np.argmin(np.asarray(s["block_tokens"])))
    out = []
    rows, keys = np.asarray(s["piece_rows"]), np.asarray(s["piece_keys"])
    qo, ko = np.argsort(rows), np.argsort(keys)
    for pre in ("", "bwd_"):
        full = float(np.median(np.median(np.asarray(s[pre + "compute_s"])[i0], axis=0)))
        diag = float(np.median(np.median(np.asarray(s[pre + "causal_compute_s"])[i0], axis=0)))
        coef = fit_piece_cost(*probe_pieces(probe, "bwd" if pre else "fwd"))
        grid = np.median(np.median(np.asarray(s[pre + "piece_compute_s"]), axis=2), axis=2)[qo][:, ko]  # (Q, K)
        out.append(
            PieceFit(
                *coef,
                **dims,
                min_block=int(s["block_tokens"][i0]),
                masked=diag / full,
                rows=tuple(int(x) for x in rows[qo]),
                keys=tuple(int(x) for x in keys[ko]),
                grid=tuple(tuple(float(x) for x in r) for r in grid),
            )
        )
    return out[0], out[1]


def _probe_points(key_flops, done_flops, seconds) -> list:
    """(key FLOPs, rate) per block size from (K, R, P) seconds: rate = the FLOPs done / the median over repeats and
    ranks (median per rank first). The key is the square block's full FLOPs (the table's key), the rate the masked
    block's own."""
    per_block = np.median(np.median(np.asarray(seconds), axis=1), axis=1)  # (K,)
    rate = np.asarray(done_flops, dtype=np.float64) / per_block
    return _merge_points(list(zip(np.asarray(key_flops, dtype=np.float64).tolist(), rate.tolist())))


def _merge_points(points) -> list:
    """Median rate per distinct block FLOPs."""
    by: dict = {}
    for w, r in points:
        by.setdefault(float(w), []).append(float(r))
    return sorted((w, float(np.median(v))) for w, v in by.items())


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    return (predicted - measured) / measured if measured > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Context-parallel strategies (ringbench.engine.strategies): Ulysses, hybrid, pass-Q
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """A cluster described by hand (``advise --machine``): links inside a node and between nodes, ranks per node.
    Ranks are numbered node by node (consecutive ranks share a node)."""

    ranks_per_node: int
    intra: tuple  # (latency_s, bandwidth_Bps)
    inter: tuple
    source: str = ""
    # A preset's optional terms: {"intra" | "inter": {"all_gather" | "all_to_all": bus bandwidth, bytes/s}} (nccl-tests'
    # busbw), and the GPU (:class:`Device`); empty / None: the Hockney links above only.
    collectives: dict = field(default_factory=dict, compare=False)
    device: Device | None = field(default=None, compare=False)


def ring_link(cal: Calibration, machine: Machine | None, nranks: int, stride: int) -> tuple[float, float]:
    """(latency, bandwidth) of a ring step over ``nranks`` ranks whose neighbours are ``stride`` ranks apart.
    Without a machine: the calibration's link. With one: intra-node if the whole job fits a node, else the
    inter-node link (a bulk-synchronous step ends with its slowest transfer)."""
    if machine is None:
        return cal.link(nranks)
    return machine.intra if nranks <= machine.ranks_per_node else machine.inter


def alltoall_time(peer_bytes: float, group: int, cal: Calibration, machine: Machine | None, nranks: int) -> float:
    """All-to-all of ``peer_bytes`` to each of the other U - 1 ranks of a group of U consecutive ranks: pairwise
    exchange, U - 1 rounds of one message each, (U - 1)(latency + peer_bytes / bandwidth); with a machine the
    rounds to ranks on the same node use the intra-node link and the rest the inter-node one."""
    if group <= 1:
        return 0.0
    if machine is None:
        lat, bw = cal.link(nranks)
        return (group - 1) * comm_time(peer_bytes, lat, bw)
    if machine.collectives:  # a preset: NCCL's pairwise all-to-all at the bus bandwidth of the link class it spans
        kind = link_class(machine, group)
        lat, bw = machine.intra if kind == "intra" else machine.inter
        return (group - 1) * comm_time(peer_bytes, lat, machine.collectives.get(kind, {}).get("all_to_all", bw))
    local = min(group, machine.ranks_per_node) - 1
    remote = group - 1 - local
    return local * comm_time(peer_bytes, *machine.intra) + remote * comm_time(peer_bytes, *machine.inter)


def strategy_degree(shape: Shape) -> int:
    """The all-to-all group size U: P for ulysses, ulysses_degree for hybrid, 1 otherwise."""
    return shape.nranks if shape.mode == "ulysses" else shape.ulysses_degree if shape.mode == "hybrid" else 1


def _heads_after_a2a(shape: Shape, u: int) -> tuple[int, int]:
    """(query heads, kv heads) a rank holds after the all-to-all over U ranks (kv heads replicated when U > H_kv)."""
    return shape.heads // u, (shape.kv_heads // u if shape.kv_heads % u == 0 else 1)


def strategy_bytes(shape: Shape, phase: str | None = None) -> int:
    """Bytes one rank sends to other ranks in one pass of ``phase`` (default: the shape's pass; fwd+bwd: both), what
    the runner records as bytes_per_rank (README: the strategies' traffic table)."""
    phase = phase or shape.pass_
    if "+" in phase:
        return sum(strategy_bytes(shape, ph) for ph in phase.split("+"))
    P, n, b, d, s = shape.nranks, shape.n_local, shape.batch, shape.head_dim, ITEMSIZE[shape.dtype]
    acc = ACC_ITEMSIZE[shape.dtype]
    rows = b * n * shape.heads
    if shape.mode == "pass-q":
        if phase == "bwd":  # Q, dO, LSE, D out; the dQ partial back
            return (P - 1) * (rows * (2 * d * s + 2 * acc) + rows * d * acc)
        return (P - 1) * (rows * d * s + rows * (d + 1) * acc)
    if shape.mode in ("ulysses", "hybrid"):
        u = strategy_degree(shape)
        r = P // u
        hl, hkl = _heads_after_a2a(shape, u)
        group_kv = 2 * b * (u * n) * hkl * d  # elements of a group's K (and V) block on the inner ring
        if phase == "bwd":  # dO in; the inner ring's backward; dQ, dK, dV out in the compute dtype
            ring = ((r - 1) * group_kv * s + r * group_kv * acc) if r > 1 else 0
            return (u - 1) * (b * n * hl * d * s + b * n * (hl + 2 * hkl) * d * acc) + ring
        return (u - 1) * (b * n * (hl + 2 * hkl) * d * s + b * n * hl * d * s) + (r - 1) * group_kv * s
    return bwd_bytes_per_rank(shape) if phase == "bwd" else (P - 1) * block_bytes(shape)


# Local copies around the strategies' transfers, in bytes read + written (Calibration.copy_seconds), counted from
# the code (ringbench/engine/strategies.py): a copy or an elementwise pass over an array reads and writes it once (2x its
# bytes). Queries loaded into a softmax state: the copy, the softmax scale and the exponential's base (3 passes).
LOAD_PASSES = 3
MERGE_PASSES = 3  # kernel.merge: two weighted outputs and their sum


def predict_strategy(shape: Shape, cal: Calibration, machine: Machine | None = None, *, per_rank: bool = True) -> Prediction:
    """Ulysses / hybrid / pass-Q pass time (README: the model's strategy terms), forward, backward or both.

    hybrid (ulysses = hybrid with U = P), R = P / U, h = H / U, h_kv its kv heads, n = N / P:
        step 0     all-to-all in:  alltoall_time(B n (h + 2 h_kv) D itemsize, U)        backward: dO only, B n h D itemsize
        steps 1..R the ring over the R groups (overlap), per-piece compute of h heads, transfers of a group's K/V block
                   2 B U n h_kv D itemsize (the backward: with the dK/dV accumulators, and their hop home, as the ring's)
        step R+1   all-to-all out: alltoall_time(B n h D itemsize, U)      backward: dQ, dK, dV, B n (h + 2 h_kv) D acc
    pass-q: steps s = 0..P-1 compute the visiting queries against the local keys; a step's transfers are the next
        query block (latency + B n H D itemsize / bandwidth, s < P - 1) and the previous step's partial returning
        home (latency + B n H (D + 1) compute_itemsize / bandwidth, 2 <= s <= P); step time = max(compute, transfers).
        Backward: the block is Q, dO, LSE and D (B n H (2 D itemsize + 2 compute_itemsize)), the partial is dQ
        (B n H D compute_itemsize); dK, dV stay.
    Local copies (packing around the all-to-alls, loads into the softmax state, pass-Q's merges) at the probe's copy
    rate, added to the compute of their step (0 without a measured copy rate).
    ``per_rank``: as :func:`predict` (False: ``compute_s`` is the busiest rank's row only).
    """
    P, u = shape.nranks, strategy_degree(shape)
    if heads_rule(shape.heads, shape.kv_heads, u) or P % u:  # not runnable (e.g. extrapolated to more ranks than heads)
        return _nan_prediction(shape, per_rank)
    one = _pass_q if shape.mode == "pass-q" else _hybrid
    preds = {ph: one(shape, cal, machine, ph, per_rank) for ph in shape.phases}
    return preds[shape.pass_] if len(preds) == 1 else _both(preds["fwd"], preds["bwd"])


def _pass_q(shape: Shape, cal: Calibration, machine: Machine | None, phase: str, per_rank: bool = True) -> Prediction:
    P, n, b, d = shape.nranks, shape.n_local, shape.batch, shape.head_dim
    s_item, cs = ITEMSIZE[shape.dtype], ACC_ITEMSIZE[shape.dtype]
    rows = b * n * shape.heads  # query rows of a block
    # At step s rank r computes the queries of rank (r - s) mod P against its own keys: the plan of (that rank, src r),
    # whose class is the ring's with the roles swapped (the source r is above the query rank where the ring has below).
    lat, bw = ring_link(cal, machine, P, 1)
    if phase == "bwd":
        block, part = rows * (2 * d * s_item + 2 * cs), rows * d * cs
        per_step = 2 * (LOAD_PASSES + 1) * rows * d * cs  # Q and dO into the compute dtype, scaled; a zeroed dQ partial
        per_return = 2 * rows * d * cs  # the partial added to the owner's dQ
    else:
        block, part = rows * d * s_item, rows * (d + 1) * cs
        per_step = 2 * (LOAD_PASSES + 2) * rows * d * cs  # the queries loaded, the output finalized and packed
        per_return = 2 * MERGE_PASSES * rows * (d + 1) * cs
    if not classed(shape):  # documents: every (query rank, source) plan; at step s rank r holds rank (r - s)'s queries
        plans = plan_seconds(shape, cal, shape.heads, phase)  # (query rank, key rank)
        r, st = np.arange(P)[:, None], np.arange(P)[None, :]
        table = np.zeros((P, P + 1))
        table[:, :P] = plans[(r - st) % P, r]
        table[:, :P] += cal.copy_seconds(per_step, P)
        table[:, 2:] += cal.copy_seconds(per_return, P)
        busiest_s = table.max(axis=0)
        compute = table if per_rank else busiest_s[None, :]
    else:
        values = class_seconds(shape, cal, phase)
        swapped = {SAME: values[SAME], BELOW: values.get(ABOVE), ABOVE: values.get(BELOW)}
        # one row of compute per class (the rows of the ranks of that class, each step), the copies added as to every rank
        kinds = [k for k in (SAME, BELOW, ABOVE) if swapped[k] is not None]
        table = np.zeros((len(kinds), P + 1))
        table[:, :P] = np.array([swapped[k] for k in kinds])[:, None]
        table[:, :P] += cal.copy_seconds(per_step, P)
        table[:, 2:] += cal.copy_seconds(per_return, P)
        busiest_s = table[0].copy()
        if P > 1:
            busiest_s[1:] = np.maximum(table[1, 1:], table[2, 1:])
        if per_rank:
            cls = np.zeros((P, P + 1), dtype=np.int64)
            cls[:, 1:P] = ring_classes(P)[:, 1:]
            cls[:, P] = 1 if P > 1 else 0  # after the last step every rank only adds the returning partial
            compute = table[cls, np.arange(P + 1)[None, :]]
        else:
            compute = busiest_s[None, :]
    tq, tr = comm_time(block, lat, bw), comm_time(part, lat, bw)
    steps = np.arange(P + 1)
    comm = np.where(steps < P - 1, tq, 0.0) + np.where((steps >= 2) & (steps <= P), tr, 0.0)
    step = np.maximum(busiest_s, comm)
    return Prediction(compute, tq, step, np.maximum(0.0, comm - busiest_s), float(step.sum()), float(comm.sum()), phase=phase)


def _hybrid(shape: Shape, cal: Calibration, machine: Machine | None, phase: str, per_rank: bool = True) -> Prediction:
    P, n, b, d = shape.nranks, shape.n_local, shape.batch, shape.head_dim
    s_item, acc = ITEMSIZE[shape.dtype], ACC_ITEMSIZE[shape.dtype]
    u = strategy_degree(shape)
    r = P // u
    hl, hkl = _heads_after_a2a(shape, u)
    q_bytes, kv_bytes = b * n * hl * d * s_item, 2 * b * n * hkl * d * s_item  # one member's share of one rank's tokens
    wide = acc // s_item  # compute bytes per storage byte
    if phase == "bwd":
        t_in = alltoall_time(q_bytes, u, cal, machine, P)  # dO
        out_bytes = b * n * (hl + 2 * hkl) * d * acc  # dQ, dK, dV in the compute dtype
        t_out = alltoall_time(out_bytes, u, cal, machine, P)
        local_in = 2 * u * q_bytes * (1 + LOAD_PASSES * wide)  # pack, load and D = rowsum(dO O)
        local_out = 2 * 2 * u * out_bytes  # pack, unpack (and the sum of replicated kv heads)
    else:
        t_in = alltoall_time(q_bytes + kv_bytes, u, cal, machine, P)
        t_out = alltoall_time(q_bytes, u, cal, machine, P)
        local_in = 2 * u * (q_bytes + kv_bytes) + 2 * u * (q_bytes * LOAD_PASSES * wide + kv_bytes)  # pack, then load
        local_out = 2 * u * q_bytes * (wide + 2)  # finalize, pack, unpack
    lat, bw = ring_link(cal, machine, P, u)
    key = (BWD_FLOPS if phase == "bwd" else 1.0) * flops(b, hl, d, (u * n) ** 2)
    if classed(shape):
        values = group_seconds(shape, cal, u, hl, phase, key)  # the ring over the R groups: its step classes
        busiest_s = busiest(values, r)
        group_steps = None
    else:  # documents: every (group, source group) plan
        group_steps = ring_view(plan_seconds(shape, cal, hl, phase, u, key))  # (R, R) group x step
        busiest_s = group_steps.max(axis=0)
    steps = np.arange(r)
    if r > 1 and phase == "bwd":
        m, g_acc = 2 * b * u * n * hkl * d * s_item, 2 * b * u * n * hkl * d * acc
        nbytes = np.where(steps < r - 1, m, 0) + np.where(steps >= 1, g_acc, 0)
        sends = comm_time(nbytes.astype(np.float64), lat, bw)
        final = comm_time(g_acc, lat, bw)
    elif r > 1:
        sends = np.where(steps < r - 1, comm_time(2 * b * u * n * hkl * d * s_item, lat, bw), 0.0)
        final = 0.0
    else:
        sends, final = np.zeros(r), 0.0
    copy_in, copy_out = cal.copy_seconds(local_in, P), cal.copy_seconds(local_out, P)
    if per_rank:
        compute = np.zeros((P, r + 2))
        per_group = class_matrix(values, r) if group_steps is None else group_steps
        compute[:, 1 : r + 1] = np.repeat(per_group, u, axis=0)  # every member of a group computes alike
        compute[:, 0] = copy_in
        compute[:, -1] = copy_out
    else:
        compute = np.concatenate([[copy_in], busiest_s, [copy_out]])[None, :]
    busy = overlapped(busiest_s, sends, cal)
    ring_steps = np.maximum(busy, sends)
    ring_steps[-1] += final
    exposed_ring = np.maximum(0.0, sends - busy)
    exposed_ring[-1] += final
    step = np.concatenate([[t_in + copy_in], ring_steps, [t_out + copy_out]])
    exposed = np.concatenate([[t_in], exposed_ring, [t_out]])
    t_ring = float(sends.max(initial=0.0))
    return Prediction(
        compute, t_ring, step, exposed, float(step.sum()), float(t_in + t_out + sends.sum() + final), phase=phase, final_s=final
    )


# ---------------------------------------------------------------------------------------------
# The exposed time split: waiting for a slower rank vs communication not hidden (issue 21)
# ---------------------------------------------------------------------------------------------
HOME_GROUPS = 8  # ringbench.engine.ring.HOME_GROUPS: the backward's last step sends its dK/dV home in this many slices


def predict_split(shape: Shape, cal: Calibration) -> dict | None:
    """Per rank and step, (P, P) seconds: ``partner_wait`` (waiting for a neighbour still computing: the imbalance of
    the layout's per-rank work, :func:`step_compute`) and ``unhidden`` (waiting for a transfer both ends had posted:
    max(0, transfer - compute) in overlap mode, the whole transfer in blocking mode), as measure.split_exposed
    defines them, from a replay of the ring: rank r posts step s when its step s-1 ends; a transfer starts when
    both neighbours have posted and takes the transfer alone. The backward's last step adds the last of its
    dK/dV slices home (overlap: the slice posted after the last group's compute, 1 / min(HOME_GROUPS, B H_kv) of an
    accumulator; blocking: all of it). None for the allgather mode and the strategies."""
    if shape.mode not in ("overlap", "blocking") or shape.pass_ == "fwd+bwd":
        return None
    P, phase = shape.nranks, shape.pass_
    latency, bandwidth = cal.link(P)
    compute = step_compute(shape, cal, phase)  # (P, P)
    if phase == "fwd":
        nbytes = np.where(np.arange(P) < P - 1, block_bytes(shape), 0).astype(np.float64)
    else:
        nbytes = bwd_step_bytes(shape)
    alone = np.where(nbytes > 0, comm_time(nbytes, latency, bandwidth), 0.0) if P > 1 else np.zeros(P)
    home = 0.0
    if phase == "bwd" and P > 1:
        groups = min(HOME_GROUPS, shape.batch * shape.kv_heads) if shape.mode == "overlap" else 1
        home = comm_time(grad_block_bytes(shape) / groups, latency, bandwidth)
    return split_replay(compute, alone, home, overlap=shape.mode == "overlap")


def split_replay(compute, alone, home: float = 0.0, *, overlap: bool = True) -> dict:
    """The ring replayed from ``compute`` (P, S) seconds per rank and step and ``alone`` (S,) seconds per step's
    transfer (0: none), ``home`` the transfer after the last step's compute: {"partner_wait", "unhidden"} (P, S)."""
    compute = np.asarray(compute, dtype=np.float64)
    P, S = compute.shape
    prev, nxt = (np.arange(P) - 1) % P, (np.arange(P) + 1) % P
    start = np.zeros(P)
    partner, unhidden = np.zeros((P, S)), np.zeros((P, S))
    for s in range(S):
        post = start.copy()
        wait0 = start + compute[:, s] if overlap else start  # where the rank starts waiting
        if alone[s] > 0:
            ready = np.maximum(post[prev], post[nxt])
            done = np.maximum(ready, post) + alone[s]
            partner[:, s] = np.clip(ready - wait0, 0.0, None)
            end = np.maximum(wait0, done)
            unhidden[:, s] = end - wait0 - partner[:, s]
        else:
            end = wait0
        if not overlap:
            end = end + compute[:, s]
        if s == S - 1 and home > 0:  # the last hop home: posted when each rank's compute is done
            ready = np.maximum(end[prev], end[nxt])
            partner[:, s] += np.clip(ready - end, 0.0, None)
            unhidden[:, s] += home
            end = np.maximum(end, ready) + home
        start = end
    return {"partner_wait": partner, "unhidden": unhidden}


# A GPU described by a machine preset (ringbench/analysis/machines/*.yaml): the kernel's rate as a function of what a
# call computes, per-call overhead, merges at the memory bandwidth, the slowdown while a transfer shares the device
# (docs/model.md "Machine presets and the device terms")
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """One GPU of a preset. ``tables``: {(phase, causal): ((tokens, FLOP/s), ...)} with phase "fwd" | "bwd": the
    single-GPU kernel's rate when a call's keys are ``tokens`` long (a causal call: a square of that side), ascending.
    Between points: linear in log tokens; above the last: the last; below the first: the first point's rate times
    tokens / first tokens (a call that short is latency-bound: its time no longer falls with its size)."""

    tables: dict
    kernel: str = ""
    call_overhead_s: float = 0.0  # per kernel call, on the device's stream (launch gap)
    overlap_slowdown: float = 0.0  # relative slowdown of the kernel while a transfer runs beside it
    hbm_Bps: float = math.inf  # achieved device-memory bandwidth: merges and accumulations
    merge_fwd_bytes: float = 0.0  # bytes read + written per output element (B q H D) per forward merge
    merge_bwd_q_bytes: float = 0.0  # per dQ element (B q H D) per backward accumulation
    merge_bwd_kv_bytes: float = 0.0  # per dK (and dV) element (B k H_kv D) per backward accumulation
    memory_bytes: float = math.inf
    price_per_hour: float = 0.0  # per GPU
    gpu: str = ""

    def rate(self, phase: str, causal: bool, tokens: float) -> float:
        pts = self.tables[(phase, bool(causal))]
        k0, r0 = pts[0]
        if tokens < k0:
            return r0 * max(tokens, 1.0) / k0
        return float(np.interp(math.log(tokens), [math.log(k) for k, _ in pts], [r for _, r in pts]))

    def call_seconds(self, batch: int, heads: int, kv_heads: int, head_dim: int, piece, phase: str) -> float:
        """Seconds of one kernel call on ``piece`` (layout.Piece) with its merge (forward) or accumulation (backward)."""
        pairs = piece.pairs()
        if pairs <= 0:
            return 0.0
        nq, nk = piece.q1 - piece.q0, piece.k1 - piece.k0
        mult = BWD_FLOPS if phase == "bwd" else 1.0
        t = self.call_overhead_s + mult * flops(batch, heads, head_dim, pairs) / self.rate(phase, piece.mask != FULL, nk)
        q_elems = batch * nq * heads * head_dim
        if phase == "bwd":
            moved = self.merge_bwd_q_bytes * q_elems + 2 * self.merge_bwd_kv_bytes * batch * nk * kv_heads * head_dim
        else:
            moved = self.merge_fwd_bytes * q_elems
        return t + moved / self.hbm_Bps

    def single_call_seconds(self, batch: int, heads: int, head_dim: int, tokens: int, causal: bool, phase: str) -> float:
        """One call over the whole of ``tokens`` (what a single-GPU benchmark times): no merge, no accumulation."""
        piece = Piece(0, tokens, 0, tokens, CAUSAL if causal else FULL)
        mult = BWD_FLOPS if phase == "bwd" else 1.0
        return self.call_overhead_s + mult * flops(batch, heads, head_dim, piece.pairs()) / self.rate(phase, causal, tokens)


class DeviceCalibration(Calibration):
    """A calibration from a machine preset: every piece a kernel call of :class:`Device` (per-piece), the links those
    of the preset's machine (intra-node), local copies at the device's memory bandwidth."""

    def __init__(self, device: Device, machine: Machine, source: str = ""):
        super().__init__(rates={1: [(1.0, device.rate("fwd", False, 1 << 30))]}, links={1: machine.intra}, source=source)
        self.bwd_rates = {1: [(1.0, device.rate("bwd", False, 1 << 30))]}  # the asymptotic rates: the crossover's closed form
        self.device = device
        self.copy_bw = {1: device.hbm_Bps} if math.isfinite(device.hbm_Bps) else {}
        self.machine = machine

    def link(self, nranks: int) -> tuple[float, float]:
        """The preset's intra-node link while ``nranks`` fit one node, else its inter-node link (the node boundary)."""
        return self.machine.intra if nranks <= self.machine.ranks_per_node else self.machine.inter

    def per_piece(self, phase: str = "fwd") -> bool:
        return True

    def piece_seconds(self, piece, shape: Shape, heads: int, phase: str) -> float:
        kv = max(1, shape.kv_heads * heads // shape.heads)
        return self.device.call_seconds(shape.batch, heads, kv, shape.head_dim, piece, phase)


def overlapped(busy: np.ndarray, sends: np.ndarray, cal: Calibration) -> np.ndarray:
    """Compute of each overlapped step with the slowdown while its transfer runs beside it: compute + sigma min(compute,
    transfer) (sigma: the device's ``overlap_slowdown``; 0 without a preset)."""
    sigma = cal.device.overlap_slowdown if isinstance(cal, DeviceCalibration) else 0.0
    return busy + sigma * np.minimum(busy, sends) if sigma else busy


def link_class(machine: Machine | None, group: int) -> str:
    """ "intra" if ``group`` consecutive ranks share a node, else "inter" (the node boundary)."""
    return "intra" if machine is None or group <= machine.ranks_per_node else "inter"


def allgather_time(nbytes: float, nranks: int, cal: Calibration, machine: Machine | None) -> float:
    """All-gather of one ``nbytes`` block from each of P ranks. With a preset's collectives (nccl-tests' bus bandwidth
    of the link class the job spans): the ring algorithm, (P-1)(latency + nbytes / busbw); else (P-1) Hockney
    transfers on the ring's link."""
    if nranks < 2:
        return 0.0
    coll = machine.collectives.get(link_class(machine, nranks), {}) if machine is not None and machine.collectives else {}
    lat, bw = ring_link(cal, machine, nranks, 1)
    return (nranks - 1) * comm_time(nbytes, lat, coll.get("all_gather", bw))
