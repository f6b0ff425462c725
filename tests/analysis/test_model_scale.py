"""The model at scale (issue 15, item 6): its step classes and exact sums against the (P, P) evaluation they replaced.

tests/analysis/model_reference.py is the model's code before the step classes (every rank, every step, every piece); the new
code must give the same predictions bit for bit wherever the old one finishes: every layout, causal or not, every
mode and Ulysses degree, P = 1..64, forward, backward and both, each kind of calibration. Times are not asserted
here: benchmarks/advise_bench.py checks the target (advise up to P = 16384 in under 1 s).
"""

from __future__ import annotations

import math
import random

import model_reference as ref
import numpy as np
import pytest

from ringbench.analysis import advise, model
from ringbench.analysis.model import Calibration, Machine, Shape
from ringbench.config import STRATEGY_MODES
from ringbench.layout import LAYOUTS, OLD_LAYOUTS, step_plan

pytestmark = pytest.mark.slow  # the full set (pytest --all, CI): docs/testing.md

RING_MODES = ("overlap", "blocking", "allgather")
MODES = RING_MODES + STRATEGY_MODES
PASSES = ("fwd", "bwd", "fwd+bwd")


def calibrations(rng: random.Random) -> dict:
    """One of each kind: a probe's (per-piece rates, copies, several rank counts), runs' (pooled and per-layout
    causal tables), one rate, and one without links (communication free)."""

    def points(lo: float) -> list:
        return sorted((10.0 ** rng.uniform(0, 12), lo * rng.uniform(1, 3)) for _ in range(rng.randint(1, 4)))

    probe = Calibration(
        rates={2: points(1e9), 8: points(1e9)},
        links={2: (rng.uniform(0, 1e-5), 1e9 * rng.uniform(1, 30)), 8: (2e-6, 5e9)},
        diag_rates={2: points(3e8), 8: points(3e8)},
        bwd_rates={2: points(2e9), 8: points(2e9)},
        bwd_diag_rates={2: points(8e8), 8: points(8e8)},
        copy_bw={2: 1e9 * rng.uniform(1, 20), 8: 7e9},
    )
    runs = Calibration(
        rates={2: points(1e9), 4: points(1e9)},
        links={2: (1e-6, 1e10), 4: (3e-6, 2e9)},
        causal_rates={"zigzag": {4: points(6e8)}, "*": {2: points(5e8)}},
        bwd_rates={2: points(2e9)},
        bwd_causal_rates={"striped": {2: points(7e8)}},
    )
    one = Calibration.simple(rate=1e9 * rng.uniform(1, 90), latency=rng.uniform(0, 1e-4), bandwidth=1e8, bwd_rate=3e10)
    free = Calibration(rates={1: [(1.0, 1e9)]}, links={}, bwd_rates={1: [(1.0, 2e9)]})
    return {"probe": probe, "runs": runs, "one": one, "free": free}


def random_shape(rng: random.Random, nranks: int, layout: str, causal: bool, mode: str, pass_: str) -> Shape:
    """A shape at ``nranks`` ranks; heads often divisible by the all-to-all group, sometimes not (a refused
    strategy predicts nan), any dtype, GQA or not, odd head dims."""
    n = 2 * rng.randint(1, 24)  # tokens per rank (even: zigzag's two chunks)
    u = rng.choice([d for d in advise.divisors(nranks)]) if mode == "hybrid" else 1
    group = nranks if mode == "ulysses" else u
    heads = rng.choice([group, 2 * group, group * rng.randint(1, 3), rng.randint(1, 12)])
    kv = rng.choice([d for d in advise.divisors(heads)])
    return Shape(
        nranks=nranks,
        seq_len=n * nranks,
        batch=rng.randint(1, 3),
        heads=heads,
        kv_heads=kv,
        head_dim=rng.choice([1, 3, 7, 16, 64, 100]),
        dtype=rng.choice(["float32", "float64", "float16", "bfloat16"]),
        causal=causal,
        layout=layout,
        mode=mode,
        ulysses_degree=u,
        pass_=pass_,
    )


def same(a, b) -> bool:
    """Equal bit for bit (nan equal to nan), scalars or arrays of the same shape."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def assert_same_prediction(new: model.Prediction, old: model.Prediction, what: str) -> None:
    for name in ("time_s", "comm_s", "comm_total_s", "final_s", "step_s", "exposed_s", "compute_s"):
        assert same(getattr(new, name), getattr(old, name)), f"{what}: {name} {getattr(new, name)!r} != {getattr(old, name)!r}"
    assert new.phase == old.phase and set(new.parts) == set(old.parts), what
    for ph in old.parts:
        assert_same_prediction(new.parts[ph], old.parts[ph], f"{what} [{ph}]")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", OLD_LAYOUTS)
def test_a_step_plan_depends_on_the_two_ranks_only_through_their_order(layout, causal):
    """The symmetry the step classes stand on: every (rank, src) pair's plan is its class's, P = 1..64, for the
    layouts the model takes the classes for (doc-zigzag and balanced, and documents, go through every plan:
    tests/analysis/test_packed_model.py checks the two paths agree)."""
    for nranks in range(1, 65):
        n = 6
        plans = model.class_plans(layout, nranks, n, causal)
        for rank in range(nranks):
            for src in range(nranks):
                cls = model.SAME if src == rank else model.BELOW if src < rank else model.ABOVE
                assert step_plan(layout, rank, src, nranks, n, causal) == plans[cls], (nranks, rank, src)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("mode", MODES)
def test_predictions_equal_the_per_rank_evaluation_bit_for_bit(mode, pass_):
    """Every layout, causal or not, every kind of calibration, with and without a machine, P cycling over 1..64:
    the whole prediction (per-rank compute included) equals the reference's, and advise's busiest-rank view
    (per_rank=False) gives the same times with the reference's column maxima as its compute row."""
    rng = random.Random(f"{mode}/{pass_}")
    cals = calibrations(rng)
    machine = Machine(ranks_per_node=4, intra=(1e-6, 1e11), inter=(5e-6, 2.5e10))
    cases = 0
    for i, (layout, causal, kind) in enumerate((a, b, c) for a in OLD_LAYOUTS for b in (False, True) for c in cals):
        nranks = 1 + (7 * i + MODES.index(mode) * 11 + PASSES.index(pass_) * 23) % 64
        shape = random_shape(rng, nranks, layout, causal, mode, pass_)
        mach = machine if i % 3 == 0 else None
        what = f"{shape} cal={kind} machine={mach is not None}"
        old = ref.predict(shape, cals[kind], mach)
        assert_same_prediction(model.predict(shape, cals[kind], mach), old, what)
        lean = model.predict(shape, cals[kind], mach, per_rank=False)
        assert same(lean.time_s, old.time_s) and same(lean.step_s, old.step_s) and same(lean.exposed_s, old.exposed_s), what
        assert same(lean.compute_s, old.compute_s.max(axis=0, keepdims=True)), what
        cases += 1
    assert cases == 3 * 2 * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_ulysses_degree_equals_the_reference(layout):
    """Causal hybrid at every U dividing P (ulysses: U = P) at P = 48 and 64, with a probe's per-piece rates, where
    the diagonal group's U^2 pieces are summed in closed form (model.sequential_sum), forward or backward."""
    causal = True
    rng = random.Random(layout)
    cal = calibrations(rng)["probe"]
    for nranks in (48, 64):
        for u in advise.divisors(nranks):
            mode = "ulysses" if u == nranks else "hybrid"
            shape = Shape(
                nranks=nranks,
                seq_len=4 * nranks,
                heads=u,
                kv_heads=rng.choice(advise.divisors(u)),
                head_dim=rng.choice([3, 64]),
                causal=causal,
                layout=layout,
                mode=mode,
                ulysses_degree=1 if mode == "ulysses" else u,
                pass_=rng.choice(["fwd", "bwd"]),
            )
            assert_same_prediction(model.predict(shape, cal), ref.predict(shape, cal), str(shape))


def test_crossover_and_step_pairs_equal_the_reference():
    rng = random.Random(6)
    cals = calibrations(rng)
    for nranks in [*range(1, 17), 24, 31, 32, 47, 48, 63, 64]:
        for layout in LAYOUTS:
            for causal in (False, True):
                shape = random_shape(rng, nranks, layout, causal, "overlap", "fwd")
                pairs = ref.step_pairs(shape)
                assert same(model.step_pairs(shape), pairs), shape
                assert same(model.busiest_pairs(shape), pairs.max(axis=0)), shape
                assert model.causal_fraction(shape) == ref.causal_fraction(shape), shape
                for pass_ in PASSES:
                    sh = shape.with_(pass_=pass_)
                    for kind in ("probe", "one"):
                        assert same(model.crossover_tokens(sh, cals[kind]), ref.crossover_tokens(sh, cals[kind])), (sh, kind)


def naive_sum(spec, rows: int) -> float:
    s = 0.0
    for a in range(rows):
        for terms, c0, c1 in spec:
            for _ in range(c0 + c1 * a):
                for t in terms:
                    s += t
    return s


def test_sequential_sum_is_the_term_by_term_sum_bit_for_bit():
    """Random rows of runs, terms chosen to make ties (dyadic values whose lowest bit meets the sum's spacing),
    zeros, empty plans, subnormals, several terms per plan, and inf/nan."""
    rng = random.Random(15)

    def term() -> float:
        kind = rng.randrange(7)
        if kind == 0:
            return rng.random() * 10.0 ** rng.randint(-9, 3)
        if kind == 1:
            return rng.randint(1, 7) * 2.0 ** rng.randint(-30, 5)  # few bits: a tie in one binade
        if kind == 2:
            return 0.0
        if kind == 3:
            return 5e-324 * rng.randint(1, 9)
        if kind == 4:
            return float(rng.randint(1, 2**20)) * 2.0**-40
        if kind == 5:
            return 0.1 * rng.randint(1, 30)
        return rng.random()

    for trial in range(400):
        rows = rng.randint(1, 90)
        spec = []
        for _ in range(rng.randint(1, 3)):
            terms = tuple(term() for _ in range(rng.choice([0, 1, 1, 1, 2, 3])))
            if rng.random() < 0.5:
                c0, c1 = rng.randint(0, 5), rng.randint(0, 3)
            else:
                c1 = -rng.randint(0, 2)
                c0 = -c1 * (rows - 1) + rng.randint(0, 4)  # counts that fall to (about) zero by the last row
            spec.append((terms, c0, c1))
        assert same(model.sequential_sum(spec, rows), naive_sum(spec, rows)), (trial, spec, rows)
    for bad in (math.inf, math.nan):
        spec = [((1.0,), 2, 0), ((bad,), 0, 1), ((0.5, math.inf), 1, 0)]
        assert same(model.sequential_sum(spec, 5), naive_sum(spec, 5))
    spec = [((1.0, -0.25), 3, 1)]  # negative terms: added one by one
    assert model.sequential_sum(spec, 6) == naive_sum(spec, 6)


def test_the_diagonal_group_sum_over_many_terms_is_exact():
    """The hybrid's diagonal group at U = 300 (90,000 pieces): the closed form against the term-by-term sum."""
    rng = random.Random(3)
    for _ in range(6):
        below, same_, above = (rng.random() * 1e-6,), (rng.random() * 1e-6, rng.random() * 1e-7), (rng.choice([0.0, 3e-7]),)
        spec = [(below, 0, 1), (same_, 1, 0), (above, 299, -1)]
        assert model.sequential_sum(spec, 300) == naive_sum(spec, 300)


def test_advise_evaluates_every_strategy_at_16384_ranks():
    """At P = 16384 (the old code: (P, P) matrices per strategy, days): every candidate the rules allow is predicted;
    the unmasked ring's time is the closed form (P - 1) max(compute, transfer) + compute."""
    cal = Calibration.simple(rate=1e12, latency=1e-5, bandwidth=2e10)
    base = Shape(nranks=1, seq_len=1, heads=4096, kv_heads=4096, head_dim=64)
    p = 16384
    cands = advise.candidates(base.with_(seq_len=64 * p), p, cal)
    labels = [c.label for c in cands]
    assert labels[:3] == ["ring", "allgather", "ulysses"] and labels[-1] == "pass-q"
    assert [c.label for c in cands if c.time_s is None] == ["ulysses", "hybrid U=8192"]  # more ranks than heads
    assert all(math.isfinite(c.time_s) and c.time_s > 0 for c in cands if c.time_s is not None)
    ring = cands[0].shape
    compute = 4 * 4096 * 64 * 64**2 / 1e12
    comm = 1e-5 + model.block_bytes(ring) / 2e10
    assert cands[0].time_s == pytest.approx((p - 1) * max(compute, comm) + compute, rel=1e-12)
    lean = model.predict(base.with_(nranks=p, seq_len=64 * p, causal=True, layout="zigzag"), cal, per_rank=False)
    assert lean.compute_s.shape == (1, p) and lean.step_s.shape == (p,)
