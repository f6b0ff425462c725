"""Timing samples and the metrics computed from them. Pure NumPy on stored samples: no MPI, no device.

Samples (all seconds, float64), gathered from every rank:

    compute_s  (R, P, P)    repeat x rank x ring step: time computing on the step's K/V block
    comm_s     (R, P, P)    time inside communication calls (post + wait, Sendrecv, or Allgather at step 0)
    step_s     (R, P, P)    whole step
    total_s    (R, P)       whole ring pass on that rank
    comm_only_s (C, P, P-1) ring passes that only move K/V (no compute): the transfer time alone

Warm-up passes are stored with the same shapes under their own names and never enter a summary.

Metrics (the README defines them for users):

    time_s          median over repeats of the slowest rank's total_s
    tflops          unmasked attention FLOPs / time_s
    overlap_eff     1 - exposed / alone, where exposed = sum over steps of comm_s, alone = the fastest
                    comm-only pass; per rank, median over repeats, then mean over ranks, clipped to [0, 1]
    bandwidth_gbps  bytes a rank receives per pass / the slowest rank's fastest comm-only pass
    imbalance       (max - mean) / mean of the per-rank compute totals, median over repeats
"""

from __future__ import annotations

import numpy as np


def summarize(samples: dict, *, flops: float, bytes_per_rank: int) -> dict:
    """Summary metrics of one run from its samples (see module docstring)."""
    total = np.asarray(samples["total_s"])  # (R, P)
    compute = np.asarray(samples["compute_s"])  # (R, P, S)
    comm = np.asarray(samples["comm_s"])
    alone_passes = np.asarray(samples.get("comm_only_s", np.zeros((0,) + total.shape[1:] + (0,))))
    per_repeat = total.max(axis=1)
    time_s = float(np.median(per_repeat))
    nranks = total.shape[1]

    compute_tot = compute.sum(axis=2)  # (R, P)
    exposed = comm.sum(axis=2)  # (R, P)
    out = {
        "time_s": time_s,
        "time_min_s": float(per_repeat.min()),
        "time_max_s": float(per_repeat.max()),
        "tflops": flops / time_s / 1e12 if time_s > 0 else float("nan"),
        "flops": float(flops),
        "compute_s": float(np.median(compute_tot.max(axis=1))),
        "exposed_comm_s": float(np.median(exposed.max(axis=1))),
        "imbalance": float(np.median(imbalance(compute_tot))),
        "bytes_per_rank": int(bytes_per_rank),
        "bytes_total": int(bytes_per_rank) * nranks,
    }
    if nranks > 1 and alone_passes.size:
        alone = alone_passes.sum(axis=2).min(axis=0)  # (P,) fastest comm-only pass
        out["comm_alone_s"] = float(alone.max())
        out["bandwidth_gbps"] = bytes_per_rank / float(alone.max()) / 1e9 if alone.min() > 0 else float("nan")
        out["overlap_eff"] = overlap_efficiency(exposed, alone)
    else:
        out["comm_alone_s"] = 0.0
        out["bandwidth_gbps"] = float("nan")
        out["overlap_eff"] = float("nan")
    return out


def imbalance(per_rank) -> np.ndarray:
    """(max - mean) / mean over the last axis."""
    per_rank = np.asarray(per_rank, dtype=np.float64)
    mean = per_rank.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, (per_rank.max(axis=-1) - mean) / mean, 0.0)


def overlap_efficiency(exposed, alone) -> float:
    """Share of the communication time hidden behind compute.

    exposed: (R, P) time each rank spent inside communication calls per pass; alone: (P,) the same
    transfers' time with no compute. 1.0: fully hidden; 0.0: fully exposed (as in blocking mode).
    """
    exposed = np.asarray(exposed, dtype=np.float64)
    alone = np.asarray(alone, dtype=np.float64)
    if alone.size == 0 or np.any(alone <= 0):
        return float("nan")
    eff = 1.0 - np.median(exposed, axis=0) / alone
    return float(np.clip(eff, 0.0, 1.0).mean())


def theoretical_bytes(
    *, batch: int, local_q: int, heads: int, kv_heads: int, head_dim: int, itemsize: int, compute_itemsize: int, score_tile_elems: int
) -> int:
    """Least memory a rank needs for a ring pass: q, output, accumulators, two K/V buffers, one score tile."""
    q = batch * local_q * heads * head_dim
    kv_block = 2 * batch * local_q * kv_heads * head_dim
    return int(
        q * itemsize  # q (storage)
        + q * compute_itemsize  # scaled q in the compute dtype
        + q * compute_itemsize  # acc
        + 2 * batch * heads * local_q * compute_itemsize  # running max and sum
        + q * itemsize  # output
        + 2 * kv_block * itemsize  # double buffer
        + score_tile_elems * compute_itemsize
    )
