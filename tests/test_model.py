"""The overlap model's formulas on hand-computed cases (no MPI)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ringbench import model
from ringbench.model import Calibration, Shape
from ringbench.store import Run

from conftest import ROOT


def tiny(**kw) -> Shape:
    """B = H = H_kv = D = 1, float32: work of a step = 4 * pairs, K/V block = 8 n bytes."""
    d = {"nranks": 2, "seq_len": 8, "batch": 1, "heads": 1, "kv_heads": 1, "head_dim": 1, "dtype": "float32"}
    d.update(kw)
    return Shape(**d)


def test_block_bytes_and_full_block_flops():
    s = Shape(nranks=4, seq_len=1024, batch=2, heads=8, kv_heads=2, head_dim=16, dtype="float16")
    n = 256
    assert model.block_bytes(s) == 2 * 2 * n * 2 * 16 * 2  # K and V, B n H_kv D itemsize
    assert model.full_block_flops(s) == 4 * 2 * 8 * 16 * n * n  # QK^T and PV, 2 FLOPs per MAC


def test_step_pairs_contiguous_causal_by_hand():
    # n = 4: rank 0 sees its own block (causal: 4*5/2 = 10) then a fully masked one;
    # rank 1 sees its own block (10) then rank 0's block, fully visible (16).
    pairs = model.step_pairs(tiny(causal=True, layout="contiguous"))
    assert pairs.tolist() == [[10, 0], [10, 16]]
    assert pairs.sum() == 8 * 9 // 2  # N(N+1)/2 over the whole pass


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_step_pairs_cover_the_causal_triangle(layout, nranks):
    n_div = 2 * nranks if layout == "zigzag" else nranks
    s = tiny(nranks=nranks, seq_len=8 * n_div, causal=True, layout=layout)
    N = s.seq_len
    assert model.step_pairs(s).sum() == N * (N + 1) // 2
    assert model.step_pairs(s.with_(causal=False)).sum() == N * N


def test_predict_overlap_hides_comm_when_compute_is_longer():
    # n = 4: full step work = 4 * 16 = 64 FLOP -> 64 ms at 1 kFLOP/s; comm = 1 ms + 32 B / 1 kB/s = 33 ms
    cal = Calibration.simple(rate=1e3, latency=1e-3, bandwidth=1e3)
    p = model.predict(tiny(mode="overlap"), cal)
    assert p.compute_s == pytest.approx(np.full((2, 2), 0.064))
    assert p.comm_s == pytest.approx(0.033)
    assert p.step_s.tolist() == pytest.approx([0.064, 0.064])  # max(compute, comm), last step: compute
    assert p.exposed_total_s == 0
    assert p.time_s == pytest.approx(0.128)


def test_predict_overlap_exposes_the_excess_and_blocking_adds():
    # comm = 100 ms + 32 B / 1 kB/s = 132 ms > compute 64 ms: 68 ms exposed at step 0
    cal = Calibration.simple(rate=1e3, latency=0.1, bandwidth=1e3)
    ov = model.predict(tiny(mode="overlap"), cal)
    assert ov.step_s.tolist() == pytest.approx([0.132, 0.064])
    assert ov.exposed_total_s == pytest.approx(0.068)
    bl = model.predict(tiny(mode="blocking"), cal)
    assert bl.step_s.tolist() == pytest.approx([0.064 + 0.132, 0.064])
    assert bl.exposed_total_s == pytest.approx(0.132)
    ag = model.predict(tiny(mode="allgather", nranks=4, seq_len=16), cal)
    assert ag.exposed_total_s == pytest.approx(3 * 0.132)  # (P-1) blocks before step 0
    assert ag.time_s == pytest.approx(4 * 0.064 + 3 * 0.132)


def test_predict_single_rank_has_no_comm():
    p = model.predict(tiny(nranks=1), Calibration.simple(rate=1e3, latency=1.0, bandwidth=1.0))
    assert p.comm_s == 0 and p.exposed_total_s == 0
    assert p.time_s == pytest.approx(4 * 64 / 1e3)


def test_predict_causal_is_bulk_synchronous():
    # contiguous causal P=2 (n = 4): step 0 both ranks 10 pairs (40 FLOP), step 1 rank 1 computes 16 pairs (64 FLOP)
    cal = Calibration.simple(rate=1e3, latency=0.0, bandwidth=math.inf)
    p = model.predict(tiny(causal=True, layout="contiguous"), cal)
    assert p.step_s.tolist() == pytest.approx([0.040, 0.064])


def test_crossover_closed_form_by_hand():
    # latency 0: n* = H_kv itemsize rate / (2 H f bandwidth) = 1 * 4 * 1e9 / (2 * 1e9) = 2 tokens
    cal = Calibration.simple(rate=1e9, latency=0.0, bandwidth=1e9)
    assert model.crossover_tokens(tiny(), cal) == pytest.approx(2.0)
    # GQA: 8 query heads share 2 kv heads: 4x less to move per FLOP -> n* / 4
    assert model.crossover_tokens(tiny(heads=8, kv_heads=2), cal) == pytest.approx(0.5)
    # a n^2 = latency + b n with a = 4, b = 8, latency = 12 (seconds, FLOP/s = 1): n* = 3
    assert model.crossover_closed_form(4.0, 8.0, 12.0) == pytest.approx(3.0)


def test_crossover_is_where_predicted_exposure_vanishes():
    cal = Calibration.simple(rate=5e10, latency=2e-6, bandwidth=1e10)
    base = Shape(nranks=4, seq_len=4096, heads=8, kv_heads=8, head_dim=64)
    nstar = model.crossover_tokens(base, cal)
    above = base.with_(seq_len=4 * math.ceil(nstar * 1.05))
    below = base.with_(seq_len=4 * int(nstar * 0.95))
    assert model.predict(above, cal).exposed_total_s == 0
    assert model.predict(below, cal).exposed_total_s > 0


def test_causal_fraction():
    # P=2, n=8 (chunks of 4): the only communicating step is the diagonal one, 10 + 16 + 10 of 64 pairs
    assert model.causal_fraction(Shape(nranks=2, seq_len=16, causal=True, layout="zigzag")) == pytest.approx(36 / 64)
    zz = Shape(nranks=4, seq_len=64, causal=True, layout="zigzag")
    assert model.causal_fraction(zz) == pytest.approx(0.5)  # off-diagonal steps: half a block
    # contiguous: step 0 is every rank's own causal diagonal block, n(n+1)/2 of n^2 pairs
    assert model.causal_fraction(zz.with_(layout="contiguous")) == pytest.approx(16 * 17 / 2 / 256)
    assert model.causal_fraction(zz.with_(causal=False)) == 1.0
    cal = Calibration.simple(rate=1e9, latency=0.0, bandwidth=1e9)
    assert model.crossover_tokens(tiny(nranks=4, seq_len=64, causal=True, layout="zigzag"), cal) == pytest.approx(4.0)  # n* / f = 2 / 0.5


def test_fit_link_recovers_a_line_and_falls_back():
    m = np.array([8, 1024, 65536, 1 << 20, 1 << 24], dtype=float)
    lat, bw = model.fit_link(m, 2e-6 + m / 1e10)
    assert lat == pytest.approx(2e-6, rel=1e-6)
    assert bw == pytest.approx(1e10, rel=1e-6)
    assert model.fit_link([1000.0, 1000.0], [1e-6, 1e-6]) == (0.0, pytest.approx(1e9))


def test_calibration_rate_interpolates_and_picks_the_nearest_rank_count():
    cal = Calibration(rates={2: [(1e6, 10.0), (1e8, 30.0)], 8: [(1e6, 5.0)]}, links={2: (1e-6, 1e9)})
    assert cal.rate(1e7, 2) == pytest.approx(20.0)  # halfway in log FLOPs
    assert cal.rate(1e3, 2) == 10.0 and cal.rate(1e12, 2) == 30.0  # clamped
    assert cal.rate(1e6, 3) == 10.0  # nearest: P=2
    assert cal.rate(1e6, 64) == 5.0
    assert cal.link(16) == (1e-6, 1e9)
    assert Calibration(rates={1: [(1.0, 1.0)]}, links={}).link(4) == (0.0, math.inf)


def _fake_run(nranks, seq_len, compute_per_step, comm_step, causal=False, layout="contiguous"):
    cfg = {
        "batch": 1,
        "seq_len": seq_len,
        "heads": 1,
        "kv_heads": 1,
        "head_dim": 1,
        "dtype": "float32",
        "causal": causal,
        "layout": layout,
        "mode": "overlap",
    }
    R, P = 3, nranks
    samples = {
        "compute_s": np.full((R, P, P), compute_per_step),
        "comm_s": np.zeros((R, P, P)),
        "total_s": np.full((R, P), P * compute_per_step),
        "comm_only_s": np.full((R, P, max(P - 1, 0)), comm_step),
    }
    return Run(point_id="x", nranks=nranks, config=cfg, provenance={}, samples=samples)


def test_calibrate_from_runs_by_hand():
    # P=2, N=8: each rank computes 2 full 4x4 blocks = 2 * 64 FLOP in 2 * 1 ms -> 64 kFLOP/s;
    # comm_only: 32 B in 1 ms (N=8) and 64 B in 1.5 ms (N=16) -> latency 0.5 ms, bandwidth 64 kB/s
    runs = [_fake_run(2, 8, 1e-3, 1e-3), _fake_run(2, 16, 4e-3, 1.5e-3)]
    cal = model.calibrate_from_runs(runs)
    assert cal.rate(64.0, 2) == pytest.approx(64e3)
    lat, bw = cal.link(2)
    assert lat == pytest.approx(0.5e-3)
    assert bw == pytest.approx(64e3)
    assert "fitted" in cal.source
    p = model.predict(Shape(nranks=2, seq_len=8, batch=1, heads=1, kv_heads=1, head_dim=1), cal)
    assert p.time_s == pytest.approx(2e-3)  # reproduces the run it came from


def test_calibrate_keeps_causal_layouts_apart():
    runs = [_fake_run(2, 8, 1e-3, 1e-3), _fake_run(2, 8, 2e-3, 1e-3, causal=True, layout="striped")]
    cal = model.calibrate_from_runs(runs)
    assert set(cal.causal_rates) == {"striped", "*"}
    # striped causal, N=8, P=2: 36 = N(N+1)/2 pairs = 144 FLOP over 2 ranks x 2 steps x 2 ms
    assert cal.rate(64.0, 2, causal=True, layout="striped") == pytest.approx(144 / 8e-3)
    assert cal.rate(64.0, 2, causal=True, layout="zigzag") == pytest.approx(144 / 8e-3)  # pooled causal points
    assert cal.rate(64.0, 2) == pytest.approx(64e3)  # full blocks unchanged


def test_analysis_modules_import_without_mpi_or_pandas():
    code = (
        "import sys, ringbench.model, ringbench.results, ringbench.report, ringbench.probe, ringbench.store; "
        "print('mpi4py.MPI' in sys.modules, 'pandas' in sys.modules, 'matplotlib' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert res.stdout.split() == ["False", "False", "False"]
