"""The overlap model's (P, P) evaluation as it was before the step classes (ringbench/analysis/model.py at 20b1b72), kept
as the slow reference of tests/analysis/test_model_scale.py: every function below is that code, unchanged but for this
header, the imports and the two private helpers copied in (``_both``, ``_heads_after_a2a``), and one fix (issue 18): the
ring's backward takes the machine's links as its forward does (``machine`` passed to predict_bwd / predict_fwd_bwd; it
read the calibration's link and ignored ``--machine``, the node boundary). O(P^2) step plans per
prediction (O(P^2 U^2) pieces for hybrid): use it at small P only."""

from __future__ import annotations

import math

import numpy as np

from ringbench.analysis.model import (
    ACC_ITEMSIZE,
    BWD_FLOPS,
    ITEMSIZE,
    LOAD_PASSES,
    MERGE_PASSES,
    Calibration,
    Machine,
    Prediction,
    Shape,
    alltoall_time,
    block_bytes,
    comm_time,
    crossover_closed_form,
    full_block_flops,
    grad_block_bytes,
    ring_link,
    strategy_degree,
)
from ringbench.config import STRATEGY_MODES, heads_rule
from ringbench.kernels.kernel import flops
from ringbench.layout import FULL, group_plan, step_plan


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


def predict(shape: Shape, cal: Calibration, machine: Machine | None = None) -> Prediction:
    """Per-step compute, communication, exposed time and the pass time (module docstring; strategies: predict_strategy)."""
    if shape.mode in STRATEGY_MODES:
        return predict_strategy(shape, cal, machine)
    if shape.pass_ != "fwd":
        return predict_bwd(shape, cal, machine) if shape.pass_ == "bwd" else predict_fwd_bwd(shape, cal, machine)
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


def bwd_step_bytes(shape: Shape) -> np.ndarray:
    """(P,) bytes a rank sends during ring step s of the backward: the next K/V block (s < P-1) and the
    accumulator finished at step s-1 (s >= 1); the hop home after the last step is not included."""
    P, m, g = shape.nranks, block_bytes(shape), grad_block_bytes(shape)
    if P < 2:
        return np.zeros(P)
    return np.array([(m if s < P - 1 else 0) + (g if s >= 1 else 0) for s in range(P)], dtype=np.float64)


def predict_bwd(shape: Shape, cal: Calibration, machine: Machine | None = None) -> Prediction:
    """The backward pass: per-step compute at the backward rate, the K/V and dK/dV transfers, the final hop."""
    P = shape.nranks
    latency, bandwidth = ring_link(cal, machine, P, 1)
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


def predict_fwd_bwd(shape: Shape, cal: Calibration, machine: Machine | None = None) -> Prediction:
    """Both passes one after the other: steps, compute and times of the forward, then of the backward."""
    return _both(predict(shape.with_(pass_="fwd"), cal, machine), predict(shape.with_(pass_="bwd"), cal, machine))


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


def _heads_after_a2a(shape: Shape, u: int) -> tuple[int, int]:
    """(query heads, kv heads) a rank holds after the all-to-all over U ranks (kv heads replicated when U > H_kv)."""
    return shape.heads // u, (shape.kv_heads // u if shape.kv_heads % u == 0 else 1)


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
