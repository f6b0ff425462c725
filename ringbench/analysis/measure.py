"""Timing samples and the metrics computed from them. Pure NumPy on stored samples: no MPI, no device.

Samples (all seconds, float64), gathered from every rank:

    compute_s  (R, P, P)    repeat x rank x ring step: time computing on the step's K/V block
    comm_s     (R, P, P)    time inside communication calls (post + wait, Sendrecv, or Allgather at step 0)
    step_s     (R, P, P)    whole step
    total_s    (R, P)       whole ring pass on that rank
    comm_only_s (C, P, P-1) ring passes that only move K/V (no compute): the transfer time alone
    partner_wait_s (R, P, P) the part of comm_s spent before a neighbour had posted the transfer being waited for:
                            waiting for a slower rank (imbalance), not for the link (schema 3; absent before)
    unhidden_s  (R, P, P)   comm_s - partner_wait_s: waiting for transfers both ends had posted, i.e. communication
                            that compute did not hide (schema 3; absent before)
    pairs      (P, S)       (query, key) pairs each rank computes at each step of its strategy's pass, all heads counted
                            (model.strategy_pairs: the plans it ran, documents and window included; no repeat axis:
                            the plan is the same every repeat; absent in runs stored before issue 20)

``split_exposed`` computes the last two from the marks every ring pass keeps (ringbench.engine.ring.MARK_KEYS): per
step and transfer, when each rank posted it and when it waited for it, on rank 0's clock.

Warm-up passes are stored with the same shapes under their own names and never enter a summary.

Metrics (the README defines them for users): ``SUMMARY``, one entry per key of a phase's summary, each with its
definition. The keys are the attribute names of a stored summary group (ringbench.store) and the summary columns of
results' table rows (ringbench.analysis.results): keep them as they are (schema).

Spread (computed from the samples when they are read, never stored): ``per_repeat`` gives the values a median
is taken over; ``median_ci`` their percentile-bootstrap confidence interval; ``compare`` the ratio of two
medians, its interval and a verdict (significant when the interval excludes 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """One key of a phase's summary: its name, what it is, and whether results' table rows carry it as a column."""

    key: str
    doc: str
    column: bool = True


# The summary of one timed phase, in column order (see the module docstring).
SUMMARY = (
    Metric("time_s", "median over repeats of the slowest rank's total_s"),
    Metric("time_min_s", "fastest repeat's slowest-rank total_s"),
    Metric("time_max_s", "slowest repeat's slowest-rank total_s"),
    Metric("tflops", "unmasked attention FLOPs / time_s, in TFLOP/s"),
    Metric("compute_s", "median over repeats of the slowest rank's summed compute_s"),
    Metric("exposed_comm_s", "median over repeats of the slowest rank's summed comm_s (communication not hidden)"),
    Metric("comm_alone_s", "the slowest rank's fastest comm-only pass (0 on one rank)"),
    Metric("partner_wait_s", "median over repeats of the largest per-rank sum of partner_wait_s: waiting for a slower neighbour"),
    Metric("unhidden_comm_s", "median over repeats of the largest per-rank sum of unhidden_s: communication compute did not hide"),
    Metric(
        "overlap_eff",
        "1 - unhidden / alone, where unhidden = sum over steps of unhidden_s (comm_s for samples without it: schema 2), "
        "alone = the fastest comm-only pass; per rank, median over repeats, then mean over ranks, clipped to [0, 1] "
        "(nan on one rank)",
    ),
    Metric("bandwidth_gbps", "bytes a rank receives per pass / the slowest rank's fastest comm-only pass, in GB/s"),
    Metric("imbalance", "(max - mean) / mean of the per-rank compute totals, median over repeats"),
    Metric(
        "pairs_imbalance",
        "max / mean over ranks of the (query, key) pairs each rank computed in the pass (the pairs sample: the plans its "
        "strategy ran; 1.0 = perfect)",
    ),
    Metric("compute_imbalance", "max / mean over ranks of the summed compute_s, median over repeats (1.0 = perfect)"),
    Metric("flops", "unmasked attention FLOPs of one pass (backward: 2.5 x the forward's)"),
    Metric("bytes_per_rank", "bytes a rank sends in one pass"),
    Metric("unmasked_pairs", "(query, key) pairs the causal mask leaves (N^2 without it)"),
    Metric("bytes_total", "bytes_per_rank x P", column=False),
)
SUMMARY_KEYS = tuple(m.key for m in SUMMARY)


def summarize(samples: dict, *, flops: float, bytes_per_rank: int, unmasked_pairs: int) -> dict:
    """The summary of one phase from its samples: a dict with the keys of ``SUMMARY``, in that order."""
    total = np.asarray(samples["total_s"])  # (R, P)
    compute = np.asarray(samples["compute_s"])  # (R, P, S)
    comm = np.asarray(samples["comm_s"])
    alone_passes = np.asarray(samples.get("comm_only_s", np.zeros((0,) + total.shape[1:] + (0,))))
    per_repeat = total.max(axis=1)
    time_s = float(np.median(per_repeat))
    nranks = total.shape[1]

    compute_tot = compute.sum(axis=2)  # (R, P)
    exposed = comm.sum(axis=2)  # (R, P)
    split = "unhidden_s" in samples and "partner_wait_s" in samples
    unhidden = np.asarray(samples["unhidden_s"]).sum(axis=2) if split else exposed  # (R, P)
    partner = np.asarray(samples["partner_wait_s"]).sum(axis=2) if split else np.full_like(exposed, np.nan)
    out = {
        "time_s": time_s,
        "time_min_s": float(per_repeat.min()),
        "time_max_s": float(per_repeat.max()),
        "tflops": flops / time_s / 1e12 if time_s > 0 else float("nan"),
        "flops": float(flops),
        "compute_s": float(np.median(compute_tot.max(axis=1))),
        "exposed_comm_s": float(np.median(exposed.max(axis=1))),
        "partner_wait_s": float(np.median(partner.max(axis=1))),
        "unhidden_comm_s": float(np.median(unhidden.max(axis=1))) if split else float("nan"),
        "imbalance": float(np.median(imbalance(compute_tot))),
        "pairs_imbalance": ratio_imbalance(np.asarray(samples["pairs"]).sum(axis=1)) if "pairs" in samples else float("nan"),
        "compute_imbalance": float(np.median(ratio_imbalance(compute_tot))),
        "bytes_per_rank": int(bytes_per_rank),
        "bytes_total": int(bytes_per_rank) * nranks,
    }
    if nranks > 1 and alone_passes.size:
        alone = alone_passes.sum(axis=2).min(axis=0)  # (P,) fastest comm-only pass
        out["comm_alone_s"] = float(alone.max())
        out["bandwidth_gbps"] = bytes_per_rank / float(alone.max()) / 1e9 if alone.min() > 0 else float("nan")
        out["overlap_eff"] = overlap_efficiency(unhidden, alone)
    else:
        out["comm_alone_s"] = 0.0
        out["bandwidth_gbps"] = float("nan")
        out["overlap_eff"] = float("nan")
    out["unmasked_pairs"] = int(unmasked_pairs)
    return {k: out[k] for k in SUMMARY_KEYS}


def imbalance(per_rank) -> np.ndarray:
    """(max - mean) / mean over the last axis."""
    per_rank = np.asarray(per_rank, dtype=np.float64)
    mean = per_rank.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, (per_rank.max(axis=-1) - mean) / mean, 0.0)


def ratio_imbalance(per_rank):
    """max / mean over the last axis (1.0 = perfect; layout.imbalance's definition): a float for a vector, an array
    for a stack of them; 1.0 where the mean is 0 (nothing to balance)."""
    per_rank = np.asarray(per_rank, dtype=np.float64)
    mean = per_rank.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mean > 0, per_rank.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)
    return float(out) if out.ndim == 0 else out


def split_exposed(comm_s, post_t, wait_start_t, wait_end_t, alone=None, post_bytes=None) -> tuple[np.ndarray, np.ndarray]:
    """(partner_wait_s, unhidden_s), each (R, P, S) like ``comm_s``: the exposed communication of every step and
    rank split into waiting for a neighbour that had not yet posted and waiting for the link.

    ``post_t``, ``wait_start_t``, ``wait_end_t`` (R, P, S, K), seconds on one clock (rank 0's), NaN where unused:
    when each rank posted the k-th transfer of step s and when it waited for it (a blocking exchange: posted and
    waited for at once). Rank r's k-th transfer of step s sends to r+1 and receives from r-1, so it cannot finish
    before both have posted theirs: the part of its wait before max(post of r-1, post of r+1) is partner wait
    (the neighbour was still computing, or waiting itself); the rest of comm_s is unhidden communication. A ring
    of one rank, or a rank that waited only after its neighbours posted, has no partner wait.

    ``alone`` (P, S'), the transfers' own time per rank and step (the fastest comm-only pass; S' <= S, steps past
    it have none): unhidden is at most that, and what a step waited beyond it goes to partner wait too. A
    transfer both ends posted still needs both to call MPI to move: a neighbour computing between its progress
    calls (a fused kernel calls MPI only between its calls) holds it up as surely as one that has not posted.
    With ``post_bytes`` (R, P, S, K), the bytes of each transfer, the cap is per transfer: its share of the step's
    bytes times the step's time alone (a wait for a small slice is not hidden for at most that slice's time).
    """
    comm = np.asarray(comm_s, dtype=np.float64)
    post = np.asarray(post_t, dtype=np.float64)
    start = np.asarray(wait_start_t, dtype=np.float64)
    end = np.asarray(wait_end_t, dtype=np.float64)
    nranks = post.shape[1]
    ranks = np.arange(nranks)
    with np.errstate(invalid="ignore"):
        ready = np.fmax(post[:, (ranks - 1) % nranks], post[:, (ranks + 1) % nranks])  # (R, P, S, K)
        late = np.nan_to_num(np.clip(ready - start, 0.0, None))  # NaN (no such transfer) -> 0
        waited = np.nan_to_num(np.clip(end - start, 0.0, None))
    if alone is not None and post_bytes is not None:
        cap = np.zeros(comm.shape[1:])
        alone = np.asarray(alone, dtype=np.float64)
        cap[:, : alone.shape[1]] = alone[:, : cap.shape[1]]
        nbytes = np.nan_to_num(np.asarray(post_bytes, dtype=np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(nbytes.sum(axis=3, keepdims=True) > 0, nbytes / nbytes.sum(axis=3, keepdims=True), 0.0)
        mine = np.minimum(waited - np.minimum(late, waited), share * cap[None, :, :, None])  # (R, P, S, K)
        unhidden = np.minimum(mine.sum(axis=3), comm)
        return comm - unhidden, unhidden
    partner = np.minimum(np.minimum(late, waited).sum(axis=3), comm)
    unhidden = comm - partner
    if alone is not None:
        cap = np.zeros(comm.shape[1:])
        alone = np.asarray(alone, dtype=np.float64)
        cap[:, : alone.shape[1]] = alone[:, : cap.shape[1]]
        unhidden = np.minimum(unhidden, cap[None])
        partner = comm - unhidden
    return partner, unhidden


def per_step_split(samples: dict) -> dict | None:
    """Per step (S,), the slowest rank's view of each step's transfer: ``alone`` (the fastest comm-only pass's step,
    slowest rank; 0 for a step with no transfer: the forward's last), ``unhidden`` and ``partner_wait`` (medians over
    repeats, largest over ranks) and ``hidden`` = 1 - unhidden / alone (clipped to [0, 1], NaN without a transfer).
    None for samples without the split (schema 2) or without comm-only passes."""
    if "unhidden_s" not in samples or "partner_wait_s" not in samples:
        return None
    alone_passes = np.asarray(samples.get("comm_only_s", np.zeros((0, 0, 0))), dtype=np.float64)
    if alone_passes.size == 0:
        return None
    unhidden = np.median(np.asarray(samples["unhidden_s"], dtype=np.float64), axis=0).max(axis=0)  # (S,)
    partner = np.median(np.asarray(samples["partner_wait_s"], dtype=np.float64), axis=0).max(axis=0)
    alone = np.zeros_like(unhidden)
    steps = alone_passes.min(axis=0).max(axis=0)  # (steps,) fastest pass per rank, slowest rank
    alone[: len(steps)] = steps[: len(alone)]
    with np.errstate(invalid="ignore", divide="ignore"):
        hidden = np.where(alone > 0, np.clip(1.0 - unhidden / alone, 0.0, 1.0), np.nan)
    return {"alone": alone, "unhidden": unhidden, "partner_wait": partner, "hidden": hidden}


def overlap_efficiency(exposed, alone) -> float:
    """Share of the communication time hidden behind compute.

    exposed: (R, P) time each rank spent waiting for transfers per pass (unhidden_s summed; comm_s before schema 3);
    alone: (P,) the same transfers' time with no compute. 1.0: fully hidden; 0.0: fully exposed (as in blocking mode).
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


def theoretical_bwd_bytes(
    *, batch: int, local_q: int, heads: int, kv_heads: int, head_dim: int, itemsize: int, compute_itemsize: int, score_tile_elems: int
) -> int:
    """Least memory a rank needs for a ring backward pass (README "Memory"): q, dO and O (storage), the LSE and dQ
    (compute), two K/V buffers (storage), three dK/dV accumulators in the accumulation (compute) dtype (the share
    being computed, the finished one leaving, the one arriving) and two score tiles (P and dS)."""
    q = batch * local_q * heads * head_dim
    kv_block = 2 * batch * local_q * kv_heads * head_dim
    return int(
        3 * q * itemsize  # q, dO, O
        + batch * heads * local_q * compute_itemsize  # LSE
        + q * compute_itemsize  # dQ
        + 2 * kv_block * itemsize  # K/V double buffer
        + 3 * kv_block * compute_itemsize  # dK/dV: local share, outgoing, incoming
        + 2 * score_tile_elems * compute_itemsize  # P and dS
    )


# ---------------------------------------------------------------------------------------------
# Spread and significance (the README's "Measurements and metrics" states the rules for users)
# ---------------------------------------------------------------------------------------------
CONFIDENCE = 0.95  # two-sided level of every interval
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 1% of the median between seeds
SEED = 20240607  # fixed, so the same samples always give the same report
MIN_REPEATS = 3  # fewer repeats than this: no interval, and a comparison says "too few repeats"

SIGNIFICANT, NOT_SIGNIFICANT, TOO_FEW = "significant", "not significant", "too few repeats"


def per_repeat(samples: dict) -> dict:
    """The slowest rank's pass, compute and exposed communication time of each repeat, (R,) arrays in seconds.

    ``time_s``, ``compute_s`` and ``exposed_comm_s`` of ``summarize`` are the medians of these.
    """
    total = np.asarray(samples["total_s"], dtype=np.float64)  # (R, P)
    return {
        "time_s": total.max(axis=1),
        "compute_s": np.asarray(samples["compute_s"], dtype=np.float64).sum(axis=2).max(axis=1),
        "exposed_comm_s": np.asarray(samples["comm_s"], dtype=np.float64).sum(axis=2).max(axis=1),
    }


def resampled_medians(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``resamples`` resamples of ``values`` drawn with replacement, each of the same size.

    The values are sorted once; then sorting a resample's indices sorts the resample, and its median is read
    at the middle (3x faster than ``np.median`` of the resampled values, same result).
    """
    n = len(values)
    ordered = np.sort(values)
    idx = np.sort(rng.integers(0, n, size=(resamples, n)), axis=1)  # (resamples, n)
    if n % 2:
        return ordered[idx[:, n // 2]]
    return 0.5 * (ordered[idx[:, n // 2 - 1]] + ordered[idx[:, n // 2]])


def _tails(confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return (1 - confidence) / 2, (1 + confidence) / 2


def median_ci(values, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """(median, low, high): the median of ``values`` and its percentile-bootstrap confidence interval.

    ``values`` are one number per repeat (e.g. ``per_repeat(samples)["time_s"]``). The repeats are resampled
    with replacement ``resamples`` times; the interval runs between the (1 - confidence)/2 and (1 + confidence)/2
    quantiles of the resampled medians. With fewer than ``MIN_REPEATS`` values low and high are NaN.
    """
    lo_q, hi_q = _tails(confidence)
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    med = float(np.median(values))
    if values.size < MIN_REPEATS:
        return med, float("nan"), float("nan")
    meds = resampled_medians(values, resamples, np.random.default_rng(seed))
    lo, hi = np.quantile(meds, [lo_q, hi_q])
    return med, float(lo), float(hi)


def relative_half_width(median: float, lo: float, hi: float) -> float:
    """(high - low) / 2 / median: the '±' of a time, as a share of it (NaN without an interval)."""
    if not (median > 0) or not np.isfinite(lo) or not np.isfinite(hi):
        return float("nan")
    return (hi - lo) / 2 / median


@dataclass(frozen=True)
class Comparison:
    """Speed-up of ``new`` over ``base``: ratio = median(base) / median(new); > 1: ``new`` is faster."""

    ratio: float
    lo: float  # confidence interval of the ratio (NaN with too few repeats)
    hi: float
    verdict: str  # SIGNIFICANT, NOT_SIGNIFICANT or TOO_FEW
    n_base: int
    n_new: int

    @property
    def significant(self) -> bool:
        return self.verdict == SIGNIFICANT


def compare(base, new, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Compare two sets of per-repeat times (e.g. blocking and overlap runs of the same configuration).

    ratio = median(base) / median(new). Its confidence interval is a percentile bootstrap: both sets are
    resampled with replacement, independently, ``resamples`` times, and the ratio of the two resampled
    medians is taken each time. The verdict is SIGNIFICANT when the interval excludes 1 (low > 1 or
    high < 1), NOT_SIGNIFICANT when it contains 1, and TOO_FEW when either set has fewer than
    ``MIN_REPEATS`` values (no interval is computed then).
    """
    lo_q, hi_q = _tails(confidence)
    base = np.asarray(base, dtype=np.float64).ravel()
    new = np.asarray(new, dtype=np.float64).ravel()
    if base.size == 0 or new.size == 0:
        raise ValueError("compare needs at least one value in each set")
    ratio = float(np.median(base) / np.median(new))
    if min(base.size, new.size) < MIN_REPEATS:
        return Comparison(ratio, float("nan"), float("nan"), TOO_FEW, base.size, new.size)
    rng = np.random.default_rng(seed)
    ratios = resampled_medians(base, resamples, rng) / resampled_medians(new, resamples, rng)
    lo, hi = (float(x) for x in np.quantile(ratios, [lo_q, hi_q]))
    verdict = SIGNIFICANT if (lo > 1 or hi < 1) else NOT_SIGNIFICANT
    return Comparison(ratio, lo, hi, verdict, base.size, new.size)
