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

import math
from dataclasses import dataclass, field

import numpy as np

from ringbench.config import STRATEGY_MODES, RunConfig, heads_rule
from ringbench.kernel import flops
from ringbench.layout import FULL, group_plan, step_plan

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
        )

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
        if masked:
            table = self.bwd_diag_rates if phase == "bwd" else self.diag_rates
        else:
            table = self.bwd_rates if phase == "bwd" else self.rates
        return _interp(table[_nearest(table, nranks)], rect_flops)

    def copy_seconds(self, nbytes: float, nranks: int) -> float:
        """Seconds of local copies moving ``nbytes`` (read + written); 0 without a measured copy rate."""
        if not self.copy_bw or nbytes <= 0:
            return 0.0
        return float(nbytes) / self.copy_bw[_nearest(self.copy_bw, nranks)]

    def link(self, nranks: int) -> tuple[float, float]:
        if not self.links:
            return 0.0, math.inf
        return self.links[_nearest(self.links, nranks)]


def _nearest(table: dict, nranks: int) -> int:
    return min(table, key=lambda k: (abs(k - nranks), -k))


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


def step_pairs(shape: Shape) -> np.ndarray:
    """(P, P) unmasked (query, key) pairs rank r computes at ring step s, from layout.step_plan."""
    P, n = shape.nranks, shape.n_local
    out = np.zeros((P, P), dtype=np.int64)
    for r in range(P):
        for s in range(P):
            out[r, s] = sum(p.pairs() for p in step_plan(shape.layout, r, (r - s) % P, P, n, shape.causal))
    return out


def step_work(shape: Shape) -> np.ndarray:
    """(P, P) FLOPs rank r computes at step s."""
    return flops(shape.batch, shape.heads, shape.head_dim, 1) * step_pairs(shape).astype(np.float64)


def pieces_seconds(pieces, cal: Calibration, shape: Shape, heads: int, phase: str = "fwd", key_flops: float | None = None) -> float:
    """Compute seconds of ``pieces`` with ``heads`` query heads (B and D from ``shape``) on one rank.

    With per-piece rates (``Calibration.per_piece``: a probe measured causal diagonal blocks): each piece at the rate
    of its own size, full pieces from the full-block table and masked ones from the diagonal-block table, both keyed
    by the FLOPs of the piece's rectangle. Otherwise every piece at ``cal.rate(key_flops)`` (default: the shape's full
    block), the causal and layout tables included (rates fitted to runs). The backward counts 2.5 x the FLOPs."""
    mult = BWD_FLOPS if phase == "bwd" else 1.0
    per_pair = mult * flops(shape.batch, heads, shape.head_dim, 1)
    if not cal.per_piece(phase):
        if key_flops is None:
            key_flops = mult * full_block_flops(shape)
        return per_pair * sum(p.pairs() for p in pieces) / cal.rate(key_flops, shape.nranks, shape.causal, shape.layout, phase)
    total = 0.0
    for p in pieces:
        rect = per_pair * (p.q1 - p.q0) * (p.k1 - p.k0)
        total += per_pair * p.pairs() / cal.piece_rate(rect, shape.nranks, p.mask != FULL, phase)
    return total


def step_compute(shape: Shape, cal: Calibration, phase: str = "fwd") -> np.ndarray:
    """(P, P) compute seconds of rank r at ring step s (pieces from layout.step_plan, :func:`pieces_seconds`)."""
    P, n = shape.nranks, shape.n_local
    out = np.zeros((P, P))
    for r in range(P):
        for s in range(P):
            out[r, s] = pieces_seconds(step_plan(shape.layout, r, (r - s) % P, P, n, shape.causal), cal, shape, shape.heads, phase)
    return out


def comm_time(nbytes: float, latency: float, bandwidth: float) -> float:
    """Hockney: latency + bytes / bandwidth."""
    return latency + nbytes / bandwidth


@dataclass
class Prediction:
    compute_s: np.ndarray  # (P, P) rank x step
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


def predict(shape: Shape, cal: Calibration, machine: Machine | None = None) -> Prediction:
    """Per-step compute, communication, exposed time and the pass time (module docstring; strategies: predict_strategy)."""
    if shape.mode in STRATEGY_MODES:
        return predict_strategy(shape, cal, machine)
    if shape.pass_ != "fwd":
        return predict_bwd(shape, cal) if shape.pass_ == "bwd" else predict_fwd_bwd(shape, cal)
    P = shape.nranks
    latency, bandwidth = ring_link(cal, machine, P, 1)
    compute = step_compute(shape, cal)  # (P, P)
    busiest = compute.max(axis=0)  # (P,) per step
    comm = comm_time(block_bytes(shape), latency, bandwidth) if P > 1 else 0.0
    sends = np.array([comm if s < P - 1 else 0.0 for s in range(P)])
    if shape.mode == "overlap":
        step = np.maximum(busiest, sends)
        exposed = np.maximum(0.0, sends - busiest)
    elif shape.mode == "blocking":
        step = busiest + sends
        exposed = sends
    elif shape.mode == "allgather":
        exposed = np.zeros(P)
        exposed[0] = (P - 1) * comm
        step = busiest + exposed
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
    """Bytes a rank sends in one backward pass: (P-1) K/V blocks and P dK/dV accumulators (none at P = 1)."""
    P = shape.nranks
    return (P - 1) * block_bytes(shape) + (P * grad_block_bytes(shape) if P > 1 else 0)


def bwd_step_bytes(shape: Shape) -> np.ndarray:
    """(P,) bytes a rank sends during ring step s of the backward: the next K/V block (s < P-1) and the
    accumulator finished at step s-1 (s >= 1); the hop home after the last step is not included."""
    P, m, g = shape.nranks, block_bytes(shape), grad_block_bytes(shape)
    if P < 2:
        return np.zeros(P)
    return np.array([(m if s < P - 1 else 0) + (g if s >= 1 else 0) for s in range(P)], dtype=np.float64)


def predict_bwd(shape: Shape, cal: Calibration) -> Prediction:
    """The backward pass: per-step compute at the backward rate, the K/V and dK/dV transfers, the final hop."""
    P = shape.nranks
    latency, bandwidth = cal.link(P)
    compute = step_compute(shape, cal, "bwd")  # (P, P)
    busiest = compute.max(axis=0)
    step_bytes = bwd_step_bytes(shape)
    sends = np.array([comm_time(b, latency, bandwidth) if b > 0 else 0.0 for b in step_bytes])
    final = comm_time(grad_block_bytes(shape), latency, bandwidth) if P > 1 else 0.0
    if shape.mode == "overlap":
        step = np.maximum(busiest, sends)
        exposed = np.maximum(0.0, sends - busiest)
    elif shape.mode == "blocking":
        step = busiest + sends
        exposed = sends.copy()
    elif shape.mode == "allgather":  # all-gather K/V before step 0, reduce-scatter dK/dV after the last step
        exposed = np.zeros(P)
        exposed[0] = (P - 1) * comm_time(block_bytes(shape), latency, bandwidth) if P > 1 else 0.0
        final = (P - 1) * final
        step = busiest + exposed
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


def predict_fwd_bwd(shape: Shape, cal: Calibration) -> Prediction:
    """Both passes one after the other: steps, compute and times of the forward, then of the backward."""
    return _both(predict(shape.with_(pass_="fwd"), cal), predict(shape.with_(pass_="bwd"), cal))


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
    pairs = step_pairs(shape)
    return float(pairs[:, : P - 1].max(axis=0).min()) / shape.n_local**2


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
    frac = step_pairs(shape).max(axis=0) / shape.n_local**2  # (P,) busiest rank's share of a full block
    if frac.min() <= 0:
        return math.inf
    latency, bandwidth = cal.link(P)
    per_token = 2 * shape.batch * shape.kv_heads * shape.head_dim
    item, acc = ITEMSIZE[shape.dtype], ACC_ITEMSIZE[shape.dtype]
    b = np.array([per_token * (item * (s < P - 1) + acc * (s >= 1)) / bandwidth for s in range(P)])
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
    """(latency, bandwidth) of t = latency + bytes / bandwidth, least squares on relative residuals.

    Relative residuals ((fit - t) / t) let 8-byte and 16-MiB messages weigh alike, so the latency comes from
    the small messages and the bandwidth from the large ones. One message size, or a fit with a negative
    intercept: latency 0 and a fit through the origin.
    """
    m = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if len(np.unique(m)) >= 2:
        slope, icpt = np.polyfit(m, t, 1, w=1.0 / t)
        if slope > 0 and icpt >= 0:
            return float(icpt), float(1.0 / slope)
    slope = float(np.median(t / m))
    return 0.0, (1.0 / slope if slope > 0 else math.inf)


def calibrate_from_runs(runs) -> Calibration:
    """Compute rate from compute_s samples and link parameters from comm_only_s, per rank count."""
    tables: dict = {"full": {}}
    link_pts: dict = {}
    for run in runs:
        if run.status != "ok" or "compute_s" not in run.samples or run.config.get("mode") in STRATEGY_MODES:
            continue  # the strategies' steps are not ring steps: calibrate from the ring modes only
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
    if not cal.links and runs:
        try:
            cal.links = calibrate_from_runs(runs).links
        except ValueError:
            pass
        if cal.links:
            cal.notes.append("link latency and bandwidth fitted to the runs' comm_only_s (no probe had 2+ ranks)")
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
    )


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
# Context-parallel strategies (ringbench.strategies): Ulysses, hybrid, pass-Q
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """A cluster described by hand (``advise --machine``): links inside a node and between nodes, ranks per node.
    Ranks are numbered node by node (consecutive ranks share a node)."""

    ranks_per_node: int
    intra: tuple  # (latency_s, bandwidth_Bps)
    inter: tuple
    source: str = ""


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
# the code (ringbench/strategies.py): a copy or an elementwise pass over an array reads and writes it once (2x its
# bytes). Queries loaded into a softmax state: the copy, the softmax scale and the exponential's base (3 passes).
LOAD_PASSES = 3
MERGE_PASSES = 3  # kernel.merge: two weighted outputs and their sum


def predict_strategy(shape: Shape, cal: Calibration, machine: Machine | None = None) -> Prediction:
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
    """
    P, u = shape.nranks, strategy_degree(shape)
    if heads_rule(shape.heads, shape.kv_heads, u) or P % u:  # not runnable (e.g. extrapolated to more ranks than heads)
        nan = np.full(1, math.nan)
        return Prediction(np.full((P, 1), math.nan), math.nan, nan, nan, math.nan, math.nan, phase=shape.pass_)
    one = _pass_q if shape.mode == "pass-q" else _hybrid
    preds = {ph: one(shape, cal, machine, ph) for ph in shape.phases}
    return preds[shape.pass_] if len(preds) == 1 else _both(preds["fwd"], preds["bwd"])


def _pass_q(shape: Shape, cal: Calibration, machine: Machine | None, phase: str) -> Prediction:
    P, n, b, d = shape.nranks, shape.n_local, shape.batch, shape.head_dim
    s_item, cs = ITEMSIZE[shape.dtype], ACC_ITEMSIZE[shape.dtype]
    rows = b * n * shape.heads  # query rows of a block
    compute = np.zeros((P, P + 1))
    for r in range(P):
        for s in range(P):
            plan = step_plan(shape.layout, (r - s) % P, r, P, n, shape.causal)
            compute[r, s] = pieces_seconds(plan, cal, shape, shape.heads, phase)
    lat, bw = ring_link(cal, machine, P, 1)
    if phase == "bwd":
        block, part = rows * (2 * d * s_item + 2 * cs), rows * d * cs
        per_step = 2 * (LOAD_PASSES + 1) * rows * d * cs  # Q and dO into the compute dtype, scaled; a zeroed dQ partial
        per_return = 2 * rows * d * cs  # the partial added to the owner's dQ
    else:
        block, part = rows * d * s_item, rows * (d + 1) * cs
        per_step = 2 * (LOAD_PASSES + 2) * rows * d * cs  # the queries loaded, the output finalized and packed
        per_return = 2 * MERGE_PASSES * rows * (d + 1) * cs
    compute[:, :P] += cal.copy_seconds(per_step, P)
    compute[:, 2:] += cal.copy_seconds(per_return, P)
    tq, tr = comm_time(block, lat, bw), comm_time(part, lat, bw)
    comm = np.array([(tq if s < P - 1 else 0.0) + (tr if 2 <= s <= P else 0.0) for s in range(P + 1)])
    busiest = compute.max(axis=0)
    step = np.maximum(busiest, comm)
    return Prediction(compute, tq, step, np.maximum(0.0, comm - busiest), float(step.sum()), float(comm.sum()), phase=phase)


def _hybrid(shape: Shape, cal: Calibration, machine: Machine | None, phase: str) -> Prediction:
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
    group_compute = np.array(
        [
            [pieces_seconds(group_plan(shape.layout, g, (g - s) % r, u, P, n, shape.causal), cal, shape, hl, phase, key) for s in range(r)]
            for g in range(r)
        ]
    )  # (R, R) group x ring step
    if phase == "bwd":
        m, g_acc = 2 * b * u * n * hkl * d * s_item, 2 * b * u * n * hkl * d * acc
        sends = np.array([comm_time((m if s < r - 1 else 0) + (g_acc if s >= 1 else 0), lat, bw) if r > 1 else 0.0 for s in range(r)])
        final = comm_time(g_acc, lat, bw) if r > 1 else 0.0
    else:
        sends = np.array([comm_time(2 * b * u * n * hkl * d * s_item, lat, bw) if s < r - 1 else 0.0 for s in range(r)])
        final = 0.0
    compute = np.zeros((P, r + 2))
    compute[:, 1 : r + 1] = np.repeat(group_compute, u, axis=0)  # every member of a group computes alike
    compute[:, 0] = cal.copy_seconds(local_in, P)
    compute[:, -1] = cal.copy_seconds(local_out, P)
    busiest = group_compute.max(axis=0)
    ring_steps = np.maximum(busiest, sends)
    ring_steps[-1] += final
    exposed_ring = np.maximum(0.0, sends - busiest)
    exposed_ring[-1] += final
    step = np.concatenate([[t_in + compute[0, 0]], ring_steps, [t_out + compute[0, -1]]])
    exposed = np.concatenate([[t_in], exposed_ring, [t_out]])
    t_ring = float(sends.max(initial=0.0))
    return Prediction(
        compute, t_ring, step, exposed, float(step.sum()), float(t_in + t_out + sends.sum() + final), phase=phase, final_s=final
    )
