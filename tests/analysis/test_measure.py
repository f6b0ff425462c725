"""Spread and significance (ringbench.analysis.measure): bootstrap intervals and verdicts on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ringbench.analysis import measure


def _times(rng, n, median=0.1, sigma=0.05):
    """n pass times (seconds) from a log-normal with the given median: the right skew of noisy timings."""
    return median * rng.lognormal(0.0, sigma, n)


def test_median_ci_brackets_the_median_and_is_reproducible():
    values = _times(np.random.default_rng(0), 7)
    med, lo, hi = measure.median_ci(values)
    assert med == np.median(values)
    assert values.min() <= lo < med < hi <= values.max()
    assert measure.median_ci(values) == (med, lo, hi)  # fixed default seed: same samples, same report


def test_default_resamples_are_enough():
    """Another seed and ten times the resamples move the interval's ends by under 1% of the median."""
    values = _times(np.random.default_rng(10), 40)
    med, lo, hi = measure.median_ci(values)
    _, lo2, hi2 = measure.median_ci(values, seed=7, resamples=10 * measure.RESAMPLES)
    assert abs(lo2 - lo) < 0.01 * med and abs(hi2 - hi) < 0.01 * med


def test_median_ci_narrows_with_more_repeats_and_widens_with_the_level():
    rng = np.random.default_rng(1)
    few, many = _times(rng, 5), _times(rng, 200)
    w_few = measure.relative_half_width(*measure.median_ci(few))
    w_many = measure.relative_half_width(*measure.median_ci(many))
    assert w_many < w_few / 2
    _, lo80, hi80 = measure.median_ci(many, confidence=0.8)
    _, lo99, hi99 = measure.median_ci(many, confidence=0.99)
    assert lo99 < lo80 and hi80 < hi99


def test_median_ci_of_identical_values_is_a_point():
    assert measure.median_ci([0.25] * 5) == (0.25, 0.25, 0.25)
    assert measure.relative_half_width(0.25, 0.25, 0.25) == 0.0


def test_too_few_repeats_give_no_interval():
    assert measure.MIN_REPEATS == 3
    med, lo, hi = measure.median_ci([0.1, 0.3])
    assert med == pytest.approx(0.2) and math.isnan(lo) and math.isnan(hi)
    assert math.isnan(measure.relative_half_width(med, lo, hi))
    assert all(math.isnan(x) for x in measure.median_ci([]))
    with pytest.raises(ValueError, match="confidence"):
        measure.median_ci([1.0, 2.0, 3.0], confidence=95)


def test_median_ci_covers_the_true_median_at_about_the_nominal_rate():
    """A log-normal's median is known: over many synthetic runs of 20 repeats a 95% interval holds it ~95% of the time."""
    rng = np.random.default_rng(2)
    trials, true_median = 300, 0.1
    hits = 0
    for seed in range(trials):
        _, lo, hi = measure.median_ci(_times(rng, 20, median=true_median), seed=seed, resamples=500)
        hits += lo <= true_median <= hi
    assert 0.85 <= hits / trials <= 0.995  # loose: the percentile bootstrap of a median is only near its level


def test_clear_difference_is_significant():
    rng = np.random.default_rng(3)
    blocking, overlap = _times(rng, 5, median=0.121), _times(rng, 5, median=0.100, sigma=0.01)
    blocking = blocking / np.median(blocking) * 0.121  # exact medians: the ratio is known
    overlap = overlap / np.median(overlap) * 0.100
    c = measure.compare(blocking, overlap)
    assert c.ratio == pytest.approx(1.21)
    assert 1 < c.lo < c.ratio < c.hi and c.verdict == measure.SIGNIFICANT and c.significant
    assert (c.n_base, c.n_new) == (5, 5)
    # the other way round: the new set is slower, the interval lies below 1, still significant
    back = measure.compare(overlap, blocking)
    assert back.ratio == pytest.approx(1 / 1.21) and back.hi < 1 and back.significant
    assert measure.compare(blocking, overlap) == c  # fixed default seed


def test_same_distribution_is_not_significant_in_most_seeds():
    rng = np.random.default_rng(4)
    verdicts = [measure.compare(_times(rng, 5), _times(rng, 5), seed=s).verdict for s in range(200)]
    false_alarms = verdicts.count(measure.SIGNIFICANT)
    assert set(verdicts) <= {measure.SIGNIFICANT, measure.NOT_SIGNIFICANT}
    assert false_alarms / len(verdicts) < 0.10  # nominal 5%; measured ~2-4% at 5 repeats


def test_noise_larger_than_the_difference_is_not_significant():
    rng = np.random.default_rng(5)
    c = measure.compare(_times(rng, 5, median=0.102, sigma=0.2), _times(rng, 5, median=0.100, sigma=0.2))
    assert c.lo < 1 < c.hi and c.verdict == measure.NOT_SIGNIFICANT and not c.significant


def test_compare_with_too_few_repeats_says_so():
    c = measure.compare([0.2, 0.21], [0.1, 0.1, 0.1])
    assert c.verdict == measure.TOO_FEW and c.ratio == pytest.approx(2.05)
    assert math.isnan(c.lo) and math.isnan(c.hi) and not c.significant
    with pytest.raises(ValueError, match="at least one value"):
        measure.compare([], [0.1])


def test_per_repeat_values_are_what_the_summary_takes_the_median_of():
    rng = np.random.default_rng(6)
    R, P = 4, 3
    compute, comm = rng.uniform(1e-3, 2e-3, (R, P, P)), rng.uniform(0, 1e-3, (R, P, P))
    samples = {"compute_s": compute, "comm_s": comm, "step_s": compute + comm, "total_s": (compute + comm).sum(axis=2) * 1.1}
    reps = measure.per_repeat(samples)
    assert reps["time_s"].shape == (R,)
    np.testing.assert_allclose(reps["time_s"], samples["total_s"].max(axis=1))
    summary = measure.summarize(samples, flops=1e9, bytes_per_rank=1000, unmasked_pairs=P * P)
    assert tuple(summary) == measure.SUMMARY_KEYS
    for key in ("time_s", "compute_s", "exposed_comm_s"):
        assert summary[key] == pytest.approx(np.median(reps[key])), key


@pytest.mark.parametrize("n", [3, 4, 7, 10])
def test_resampled_medians_are_the_medians_of_the_resamples(n):
    """The fast path (sorted indices) gives exactly np.median of the same resamples (indices into the sorted values)."""
    values = _times(np.random.default_rng(n), n)
    fast = measure.resampled_medians(values, 50, np.random.default_rng(0))
    idx = np.random.default_rng(0).integers(0, n, size=(50, n))
    np.testing.assert_array_equal(fast, np.median(np.sort(values)[idx], axis=1))


# ---------------------------------------------------------------------------------------------
# The exposed time split (issue 21): waiting for a slower neighbour vs waiting for the link
# ---------------------------------------------------------------------------------------------
def _marks(posts, starts, ends):
    """(R=1, P, S=1, K=1) mark arrays from per-rank lists."""
    as4 = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1, 1, 1)  # noqa: E731
    return as4(posts), as4(starts), as4(ends)


def test_split_charges_the_wait_before_a_neighbour_posted_to_it():
    """3 ranks, one transfer: rank 1 posts 40 ms late. Rank 0 and 2 (its neighbours) start waiting at 10 ms and
    finish at 45 ms: 30 ms of partner wait and 5 ms of transfer each; rank 1 waits 5 ms, all of it for the link."""
    post, start, end = _marks([0.0, 0.040, 0.0], [0.010, 0.040, 0.010], [0.045, 0.045, 0.045])
    comm = (end - start)[..., 0]
    partner, unhidden = measure.split_exposed(comm, post, start, end)
    np.testing.assert_allclose(partner[0, :, 0], [0.030, 0.0, 0.030])
    np.testing.assert_allclose(unhidden[0, :, 0], [0.005, 0.005, 0.005])
    np.testing.assert_allclose(partner + unhidden, comm)


def test_split_is_all_unhidden_when_everyone_posted_early_and_ignores_unused_marks():
    post, start, end = _marks([0.0, 0.001], [0.5, 0.5], [0.52, 0.51])
    post, start, end = (np.concatenate([a, np.full_like(a, np.nan)], axis=3) for a in (post, start, end))  # K = 2, one unused
    comm = np.array([[[0.02], [0.01]]])
    partner, unhidden = measure.split_exposed(comm, post, start, end)
    assert np.all(partner == 0)
    np.testing.assert_allclose(unhidden, comm)


def test_summary_overlap_uses_the_unhidden_part_and_old_samples_keep_comm_s():
    """A balanced pass whose transfers were hidden but that waited 9 ms for a slow rank: overlap 90% from the 1 ms
    unhidden (10 ms alone), where comm_s alone (schema 2) says 0%."""
    R, P = 3, 2
    base = {
        "total_s": np.full((R, P), 1.0),
        "compute_s": np.full((R, P, P), 0.4),
        "comm_s": np.full((R, P, P), 0.005),  # 10 ms exposed per pass
        "comm_only_s": np.full((R, P, P), 0.005),  # 10 ms alone
    }
    kw = dict(flops=1e9, bytes_per_rank=1 << 20, unmasked_pairs=16)
    old = measure.summarize(base, **kw)
    assert old["overlap_eff"] == 0.0 and math.isnan(old["unhidden_comm_s"]) and math.isnan(old["partner_wait_s"])
    split = dict(base, partner_wait_s=np.full((R, P, P), 0.0045), unhidden_s=np.full((R, P, P), 0.0005))
    new = measure.summarize(split, **kw)
    assert new["overlap_eff"] == pytest.approx(0.9)
    assert new["partner_wait_s"] == pytest.approx(0.009) and new["unhidden_comm_s"] == pytest.approx(0.001)
    assert new["exposed_comm_s"] == old["exposed_comm_s"] == pytest.approx(0.010)
    steps = measure.per_step_split(split)
    np.testing.assert_allclose(steps["hidden"], [0.9, 0.9])
    np.testing.assert_allclose(steps["partner_wait"], [0.0045, 0.0045])
    assert measure.per_step_split(base) is None


def test_split_gives_a_wait_beyond_the_transfer_alone_to_the_neighbour():
    """Both ranks posted at 0; rank 0 waited 50 ms for a transfer that takes 5 ms alone: its neighbour, computing,
    did not call MPI. With ``alone`` 45 ms are the neighbour's, 5 ms not hidden."""
    post, start, end = _marks([0.0, 0.0], [0.010, 0.060], [0.060, 0.061])
    comm = (end - start)[..., 0]
    partner, unhidden = measure.split_exposed(comm, post, start, end, alone=np.array([[0.005], [0.005]]))
    np.testing.assert_allclose(partner[0, :, 0], [0.045, 0.0], atol=1e-12)
    np.testing.assert_allclose(unhidden[0, :, 0], [0.005, 0.001], atol=1e-12)


def test_split_caps_each_transfer_at_its_share_of_the_step_alone():
    """One step, two transfers: 3 MB waited 2 ms, then a 1 MB slice waited 30 ms on a neighbour computing (both had
    posted). Alone the step's 4 MB take 8 ms: the slice is not hidden for at most its 2 ms, the rest is the neighbour's."""
    post = np.zeros((1, 2, 1, 2))
    start = np.array([0.010, 0.020]).reshape(1, 1, 1, 2).repeat(2, axis=1)
    end = start + np.array([0.002, 0.030]).reshape(1, 1, 1, 2)
    nbytes = np.array([3e6, 1e6]).reshape(1, 1, 1, 2).repeat(2, axis=1)
    comm = np.full((1, 2, 1), 0.032)
    partner, unhidden = measure.split_exposed(comm, post, start, end, alone=np.full((2, 1), 0.008), post_bytes=nbytes)
    np.testing.assert_allclose(unhidden[0, :, 0], [0.004, 0.004])
    np.testing.assert_allclose(partner[0, :, 0], [0.028, 0.028])
