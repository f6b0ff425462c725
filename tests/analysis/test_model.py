"""The overlap model's formulas on hand-computed cases (no MPI)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ringbench.analysis import model
from ringbench.analysis.model import Calibration, Shape
from ringbench.layout import Piece
from ringbench.store import Phase, Probe, Run

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


def test_fit_link_takes_the_sustained_rate_of_a_token_bucket_not_its_burst():
    # one-way times as a probe measured them through `tc tbf rate 100mbit burst 256kb` (slurm/multinode.sh): up to
    # 16 KiB at line rate (~40 us), then 12.5 MB/s; the relative-residual fit gave 0.44 GB/s, 35x the shaped rate
    m = np.array([8, 1024, 4096, 16384, 65536, 262144, 1 << 20, 1 << 22, 1 << 24], dtype=float)
    burst, rate = 256e3, 12.5e6
    t = np.where(m <= 16384, 2e-5 + m / 1.5e9, np.maximum(m - burst, 0) / rate + m / 1.5e9 + 2e-5)
    rng = np.random.default_rng(7)
    reps = np.repeat(m, 5)
    times = np.repeat(t, 5) * rng.uniform(0.98, 1.02, reps.size)
    lat, bw = model.fit_link(reps, times)
    assert bw == pytest.approx(rate, rel=0.1)
    assert 0.0 <= lat < 1e-3
    # three sizes on a clean line, any order and with repeats: exact
    m3 = np.array([1 << 24, 8, 1 << 20, 8, 1 << 24], dtype=float)
    assert model.fit_link(m3, 3e-6 + m3 / 2e9) == (pytest.approx(3e-6, rel=1e-6), pytest.approx(2e9, rel=1e-6))


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
        "import sys, ringbench.analysis.model, ringbench.analysis.results, ringbench.analysis.report, "
        "ringbench.harness.probe, ringbench.store; "
        "print('mpi4py.MPI' in sys.modules, 'pandas' in sys.modules, 'matplotlib' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert res.stdout.split() == ["False", "False", "False"]


# ---------------------------------------------------------------------------------------------
# The backward pass
# ---------------------------------------------------------------------------------------------
def test_backward_bytes_by_hand():
    s = Shape(nranks=4, seq_len=1024, batch=2, heads=8, kv_heads=2, head_dim=16, dtype="bfloat16")
    n = 256
    assert model.grad_block_bytes(s) == 2 * 2 * n * 2 * 16 * 4  # dK and dV accumulate (and travel) in float32
    assert model.bwd_bytes_per_rank(s) == 3 * model.block_bytes(s) + 4 * model.grad_block_bytes(s)  # P-1 K/V, P dK/dV
    f64 = s.with_(dtype="float64")
    assert model.grad_block_bytes(f64) == model.block_bytes(f64)  # float64 accumulates in float64
    assert model.bwd_step_bytes(s).tolist() == [
        model.block_bytes(s),  # step 0: the next K/V block only (no accumulator finished yet)
        model.block_bytes(s) + model.grad_block_bytes(s),
        model.block_bytes(s) + model.grad_block_bytes(s),
        model.grad_block_bytes(s),  # last step: no next K/V block; the hop home follows the step
    ]
    assert model.bwd_bytes_per_rank(s.with_(nranks=1, seq_len=256)) == 0
    assert model.bwd_full_block_flops(s) == 2.5 * model.full_block_flops(s)


def test_shape_reads_the_pass_from_a_config():
    cfg = {"heads": 2, "kv_heads": None, "seq_len": 8, "batch": 1, "head_dim": 4, "dtype": "float32", "causal": False}
    cfg.update(layout="contiguous", mode="overlap")
    assert Shape.from_config(cfg, 2).pass_ == "fwd"  # version-1 configs have no pass: forward
    assert Shape.from_config({**cfg, "pass": "fwd+bwd"}, 2).phases == ("fwd", "bwd")


BWD_CAL = Calibration.simple(rate=1e3, latency=0.1, bandwidth=1e3, bwd_rate=1e3)


def test_predict_backward_overlap_by_hand():
    # P=3, n=4, B=H=H_kv=D=1, float32: K/V block m = 32 B, accumulator g = 32 B; backward step work 2.5 * 64 = 160
    # FLOP -> 160 ms; transfers: step 0 m (132 ms), step 1 m + g (164 ms), step 2 g (132 ms), then g home (132 ms)
    p = model.predict(tiny(nranks=3, seq_len=12, pass_="bwd"), BWD_CAL)
    assert p.phase == "bwd"
    assert p.compute_s == pytest.approx(np.full((3, 3), 0.160))
    assert p.step_s.tolist() == pytest.approx([0.160, 0.164, 0.160 + 0.132])
    assert p.exposed_s.tolist() == pytest.approx([0.0, 0.004, 0.132])  # the final hop is exposed in every mode
    assert p.final_s == pytest.approx(0.132)
    assert p.comm_s == pytest.approx(0.164)
    assert p.comm_total_s == pytest.approx(0.132 + 0.164 + 0.132 + 0.132)
    assert p.time_s == pytest.approx(0.616)


def test_predict_backward_blocking_and_allgather_by_hand():
    bl = model.predict(tiny(nranks=3, seq_len=12, pass_="bwd", mode="blocking"), BWD_CAL)
    assert bl.step_s.tolist() == pytest.approx([0.160 + 0.132, 0.160 + 0.164, 0.160 + 0.132 + 0.132])
    assert bl.exposed_total_s == pytest.approx(0.132 + 0.164 + 0.132 + 0.132)
    # allgather: (P-1) K/V blocks gathered before step 0, (P-1) accumulators reduce-scattered after the last step
    ag = model.predict(tiny(nranks=3, seq_len=12, pass_="bwd", mode="allgather"), BWD_CAL)
    assert ag.step_s.tolist() == pytest.approx([0.160 + 2 * 0.132, 0.160, 0.160 + 2 * 0.132])
    assert ag.final_s == pytest.approx(2 * 0.132)
    assert ag.time_s == pytest.approx(3 * 0.160 + 4 * 0.132)


def test_predict_backward_half_precision_moves_float32_accumulators():
    # bfloat16: m = 16 B, g = 32 B; step 1 moves 48 B: 100 + 48 ms
    p = model.predict(tiny(nranks=3, seq_len=12, pass_="bwd", dtype="bfloat16", mode="blocking"), BWD_CAL)
    assert (p.step_s - p.compute_s.max(axis=0)).tolist() == pytest.approx([0.116, 0.148, 0.132 + 0.132])


def test_predict_backward_uses_its_own_rate_and_forward_is_unchanged():
    cal = Calibration.simple(rate=1e3, latency=0.1, bandwidth=1e3, bwd_rate=2e3)
    shape = tiny(nranks=3, seq_len=12)
    assert model.predict(shape, cal).time_s == model.predict(shape, Calibration.simple(rate=1e3, latency=0.1, bandwidth=1e3)).time_s
    assert model.predict(shape.with_(pass_="bwd"), cal).compute_s == pytest.approx(np.full((3, 3), 0.080))
    with pytest.raises(ValueError, match="no bwd compute rate"):
        model.predict(shape.with_(pass_="bwd"), Calibration.simple(rate=1e3, latency=0.1, bandwidth=1e3))
    assert not Calibration.simple(rate=1.0, latency=0, bandwidth=1).has_phase("fwd+bwd") and cal.has_phase("fwd+bwd")


def test_predict_single_rank_backward_has_no_comm():
    p = model.predict(tiny(nranks=1, pass_="bwd"), BWD_CAL)
    assert p.exposed_total_s == 0 and p.final_s == 0 and p.comm_total_s == 0
    assert p.time_s == pytest.approx(2.5 * 4 * 64 / 1e3)


def test_predict_fwd_bwd_is_the_sum_of_both_passes():
    shape = tiny(nranks=3, seq_len=12)
    both = model.predict(shape.with_(pass_="fwd+bwd"), BWD_CAL)
    fwd, bwd = model.predict(shape, BWD_CAL), model.predict(shape.with_(pass_="bwd"), BWD_CAL)
    assert both.time_s == pytest.approx(fwd.time_s + bwd.time_s)
    assert both.step_s.tolist() == pytest.approx(fwd.step_s.tolist() + bwd.step_s.tolist())
    assert both.parts["fwd"].time_s == fwd.time_s and both.parts["bwd"].time_s == bwd.time_s
    assert both.compute_s.shape == (3, 6)


@pytest.mark.parametrize("nranks, want", [(3, 1.6), (4, 1.6), (2, 0.8)])
def test_backward_crossover_without_latency_by_hand(nranks, want):
    # rate 1 kFLOP/s, 1 kB/s, B=H=H_kv=D=1, float32: a = 10 / rate; the middle steps move K/V + dK/dV,
    # b = 2 * (4 + 4) / bandwidth, n* = b / a = 1.6; at P = 2 no step moves both: b = 8 / bandwidth, n* = 0.8
    cal = Calibration.simple(rate=1e3, latency=0.0, bandwidth=1e3, bwd_rate=1e3)
    shape = tiny(nranks=nranks, seq_len=4 * nranks, pass_="bwd")
    assert model.crossover_tokens(shape, cal) == pytest.approx(want)
    assert model.crossover_tokens(shape.with_(pass_="fwd"), cal) == pytest.approx(2.0)  # the forward: 8 / 4
    assert model.crossover_tokens(shape.with_(pass_="fwd+bwd"), cal) == pytest.approx(2.0)  # the larger


def test_backward_crossover_with_latency_separates_hidden_from_exposed():
    # a n^2 = latency + b n with a = 0.01, b = 0.016, latency = 0.1: n* = 4.06; n = 4 exposes, n = 5 hides
    n_star = model.crossover_tokens(tiny(nranks=3, seq_len=12, pass_="bwd"), BWD_CAL)
    assert n_star == pytest.approx((0.016 + math.sqrt(0.016**2 + 4 * 0.01 * 0.1)) / 0.02)
    for n, exposed in ((4, True), (5, False)):
        p = model.predict(tiny(nranks=3, seq_len=3 * n, pass_="bwd"), BWD_CAL)
        assert (p.exposed_s[:-1].sum() - 0 > 1e-12) == exposed  # the steps; the final hop is never hidden


def _fake_bwd_run(nranks, seq_len, compute_per_step, alone_kv, alone_both, fwd=True):
    run = _fake_run(nranks, seq_len, 1e-3, 1e-3)
    R, P = 3, nranks
    alone = np.full((R, P, P), alone_both)
    alone[:, :, 0] = alone_kv
    run.bwd = Phase(
        samples={
            "compute_s": np.full((R, P, P), compute_per_step),
            "comm_s": np.zeros((R, P, P)),
            "total_s": np.full((R, P), P * compute_per_step),
            "comm_only_s": alone,
        }
    )
    run.config["pass"] = "fwd+bwd" if fwd else "bwd"
    if not fwd:
        run.samples = {}
    return run


def test_calibrate_from_runs_fits_the_backward_rate_apart():
    # P=3, N=12, n=4: each rank's backward work 3 * 160 FLOP in 3 * 4 ms -> 40 kFLOP/s (the forward: 64 kFLOP/s);
    # comm-only: step 0 moves 32 B in 1 ms, step 1 64 B in 1.5 ms -> latency 0.5 ms, 64 kB/s
    cal = model.calibrate_from_runs([_fake_bwd_run(3, 12, 4e-3, 1e-3, 1.5e-3, fwd=False)])
    assert cal.has_phase("bwd")
    assert cal.rate(160.0, 3, phase="bwd") == pytest.approx(40e3)
    lat, bw = cal.link(3)
    assert lat == pytest.approx(0.5e-3) and bw == pytest.approx(64e3)
    both = model.calibrate_from_runs([_fake_bwd_run(3, 12, 4e-3, 1e-3, 1.5e-3)])
    assert both.rate(64.0, 3) == pytest.approx(64e3) and both.rate(160.0, 3, phase="bwd") == pytest.approx(40e3)


def test_calibrate_takes_the_backward_rate_from_runs_when_the_probe_has_none():
    probe = Probe(
        nranks=3,
        config={},
        provenance={},
        created_utc="",
        name="old",
        samples={"block_flops": np.array([64.0]), "compute_s": np.full((1, 2, 3), 1e-3)},
        summary={"latency_s": 1e-3, "bandwidth_Bps": 1e6},
    )
    cal = model.calibrate([_fake_bwd_run(3, 12, 4e-3, 1e-3, 1.5e-3)], [probe])
    assert cal.rate(64.0, 3) == pytest.approx(64e3) and cal.rate(160.0, 3, phase="bwd") == pytest.approx(40e3)
    assert any("backward compute rate fitted" in n for n in cal.notes)
    probe.samples.update(bwd_block_flops=np.array([160.0]), bwd_compute_s=np.full((1, 2, 3), 2e-3))
    cal = model.calibrate([_fake_bwd_run(3, 12, 4e-3, 1e-3, 1.5e-3)], [probe])
    assert cal.rate(160.0, 3, phase="bwd") == pytest.approx(80e3) and not cal.notes
    # a probe from before the causal diagonal blocks and the copy rate: whole-step rates, no copy term
    assert not cal.per_piece("fwd") and not cal.per_piece("bwd") and cal.copy_bw == {}
    # with them: per-piece rates (diagonal block of the same square: 36 of its 64 pairs' FLOPs in 2 ms) and a copy rate
    probe.samples.update(
        causal_flops=np.array([36.0]),
        causal_compute_s=np.full((1, 2, 3), 2e-3),
        bwd_causal_compute_s=np.full((1, 2, 3), 4e-3),
        copy_bytes=np.array([1000]),
        copy_s=np.full((5, 3), 1e-3),
    )
    probe.summary["copy_Bps"] = 1e6
    cal = model.calibrate([], [probe])
    assert cal.per_piece("fwd") and cal.per_piece("bwd") and cal.copy_bw == {3: 1e6}
    assert cal.piece_rate(64.0, 3, masked=True) == pytest.approx(18e3)
    assert cal.piece_rate(160.0, 3, masked=True, phase="bwd") == pytest.approx(2.5 * 36 / 4e-3)


# ---------------------------------------------------------------------------------------------
# Per-piece rates (a probe's causal diagonal blocks) and the strategies' local copies
# ---------------------------------------------------------------------------------------------
def per_piece_cal() -> Calibration:
    """Full pieces at 1 GFLOP/s up to 1e6 FLOPs, 2 GFLOP/s from 1e8; masked pieces at 0.5 GFLOP/s; copies at 1 GB/s."""
    return Calibration(
        rates={2: [(1e6, 1e9), (1e8, 2e9)]},
        links={2: (0.0, 1e9)},
        diag_rates={2: [(1.0, 0.5e9)]},
        bwd_rates={2: [(1.0, 4e9)]},
        bwd_diag_rates={2: [(1.0, 1e9)]},
        copy_bw={2: 1e9},
    )


def test_pieces_are_timed_apart_at_their_own_rates():
    cal = per_piece_cal()
    sh = Shape(nranks=2, seq_len=4096, heads=1, kv_heads=1, head_dim=64, causal=True, layout="zigzag")
    c = 1024  # zigzag chunk
    step0 = [Piece(0, c, 0, c, "causal"), Piece(c, 2 * c, 0, c), Piece(c, 2 * c, c, 2 * c, "causal")]
    per_pair = 4 * 64
    # a 1024 x 1024 full piece: 2.7e8 FLOPs, above the table: 2 GFLOP/s; a causal diagonal piece: 0.5 GFLOP/s
    want = per_pair * c * c / 2e9 + 2 * per_pair * c * (c + 1) / 2 / 0.5e9
    assert model.pieces_seconds(step0, cal, sh, 1) == pytest.approx(want)
    assert model.step_compute(sh, cal)[0, 0] == pytest.approx(want)
    # the backward: 2.5 x the FLOPs at the backward tables' rates
    assert model.pieces_seconds(step0, cal, sh, 1, "bwd") == pytest.approx(
        2.5 * (per_pair * c * c / 4e9 + 2 * per_pair * c * (c + 1) / 2 / 1e9)
    )
    # without diagonal rates (fitted to runs): every piece at the one rate of the full block, as before
    fitted = Calibration(rates={2: [(1.0, 1e9)]}, links={2: (0.0, 1e9)})
    assert not fitted.per_piece() and model.pieces_seconds(step0, fitted, sh, 1) == pytest.approx(per_pair * (c * c + c * (c + 1)) / 1e9)


def test_strategy_local_copies_are_added_to_their_steps():
    cal = per_piece_cal()
    sh = Shape(nranks=2, seq_len=512, heads=2, kv_heads=2, head_dim=16, mode="ulysses")
    without = model.predict(sh, Calibration(**{**cal.__dict__, "copy_bw": {}}))
    pred = model.predict(sh, cal)
    b, n, hl, hkl, d, s = 1, 256, 1, 1, 16, 4
    q, kv = b * n * hl * d * s, 2 * b * n * hkl * d * s
    local_in = 2 * 2 * (q + kv) + 2 * 2 * (q * model.LOAD_PASSES + kv)
    local_out = 2 * 2 * q * 3
    assert pred.compute_s[0, 0] == pytest.approx(local_in / 1e9) and pred.compute_s[0, -1] == pytest.approx(local_out / 1e9)
    assert pred.time_s - without.time_s == pytest.approx((local_in + local_out) / 1e9)
    pq = sh.with_(mode="pass-q")
    rows = 256 * 2
    extra = 2 * 2 * (model.LOAD_PASSES + 2) * rows * d * 4 + 2 * model.MERGE_PASSES * rows * (d + 1) * 4
    no_copy = model.predict(pq, Calibration(**{**cal.__dict__, "copy_bw": {}}))
    assert model.predict(pq, cal).compute_s.sum(axis=1)[0] - no_copy.compute_s.sum(axis=1)[0] == pytest.approx(extra / 1e9)


def test_strategies_backward_hand_computed():
    cal = Calibration.simple(rate=1e9, latency=1e-5, bandwidth=1e8, bwd_rate=2e9)
    # pass-q backward, P = 2, n = 256, H = 8, D = 16, float32, no mask: the block is Q, dO, LSE, D; the partial is dQ
    pq = Shape(nranks=2, seq_len=512, heads=8, kv_heads=2, head_dim=16, mode="pass-q", pass_="bwd")
    rows = 256 * 8
    c = 2.5 * 4 * 8 * 16 * 256**2 / 2e9
    tq = 1e-5 + rows * (2 * 16 * 4 + 2 * 4) / 1e8
    tr = 1e-5 + rows * 16 * 4 / 1e8
    pred = model.predict(pq, cal)
    assert pred.phase == "bwd" and math.isclose(pred.time_s, max(c, tq) + c + tr, rel_tol=1e-12)
    assert model.strategy_bytes(pq) == rows * (2 * 16 * 4 + 2 * 4) + rows * 16 * 4
    # fwd+bwd: the sum, both phases kept
    both = model.predict(pq.with_(pass_="fwd+bwd"), cal)
    assert math.isclose(both.time_s, model.predict(pq.with_(pass_="fwd"), cal).time_s + pred.time_s)
    assert set(both.parts) == {"fwd", "bwd"}
    assert model.strategy_bytes(both_shape := pq.with_(pass_="fwd+bwd")) == model.strategy_bytes(both_shape, "fwd") + model.strategy_bytes(
        pq
    )
    # ulysses backward, P = 4: dO in (2 query heads), dQ, dK, dV out (2 + 2 x 1 replicated kv head) in float32
    ul = Shape(nranks=4, seq_len=1024, heads=8, kv_heads=2, head_dim=16, mode="ulysses", pass_="bwd")
    t_in = 3 * (1e-5 + 256 * 2 * 16 * 4 / 1e8)
    t_out = 3 * (1e-5 + 256 * 4 * 16 * 4 / 1e8)
    compute = 2.5 * 4 * 2 * 16 * 1024**2 / 2e9
    assert math.isclose(model.predict(ul, cal).time_s, t_in + compute + t_out, rel_tol=1e-12)
    assert model.strategy_bytes(ul) == 3 * (256 * 2 * 16 * 4 + 256 * 4 * 16 * 4)
    # hybrid U = 1 is the ring's backward; its bytes are the ring's
    hy = ul.with_(mode="hybrid", ulysses_degree=1, causal=True, layout="zigzag")
    ring = ul.with_(mode="overlap", causal=True, layout="zigzag")
    assert math.isclose(model.predict(hy, cal).time_s, model.predict(ring, cal).time_s, rel_tol=1e-12)
    assert model.strategy_bytes(hy) == model.bwd_bytes_per_rank(ring)
    # half precision: the all-to-all out and the dK/dV accumulators travel in float32
    half = ul.with_(dtype="bfloat16")
    assert model.strategy_bytes(half) == 3 * (256 * 2 * 16 * 2 + 256 * 4 * 16 * 4)


def test_split_replay_puts_imbalance_in_partner_wait_and_a_slow_link_in_unhidden():
    """Two ranks, two steps. Balanced compute 1 s, transfer 0.1 s: all hidden, no wait. Rank 0 twice as slow at
    step 0: rank 1 waits 1 s for it. A transfer of 1.5 s behind 1 s of compute: 0.5 s not hidden on both."""
    even = model.split_replay([[1.0, 1.0], [1.0, 1.0]], [0.1, 0.0])
    assert np.all(even["partner_wait"] == 0) and np.all(even["unhidden"] == 0)
    slow = model.split_replay([[2.0, 1.0], [1.0, 1.0]], [0.1, 0.0])
    np.testing.assert_allclose(slow["partner_wait"], [[0.0, 0.0], [0.0, 0.0]])  # rank 0 posted step 0 at t=0: nobody waits at step 0
    link = model.split_replay([[1.0, 1.0], [1.0, 1.0]], [1.5, 0.0])
    np.testing.assert_allclose(link["unhidden"], [[0.5, 0.0], [0.5, 0.0]])
    three = model.split_replay([[4.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.1, 0.1, 0.0])  # rank 0 posts step 1 at 4 s
    np.testing.assert_allclose(three["partner_wait"][:, 1], [0.0, 2.0, 2.0])  # its neighbours were ready at 2 s
    np.testing.assert_allclose(three["unhidden"][:, 1], [0.0, 0.1, 0.1])
    home = model.split_replay([[1.0, 2.0], [1.0, 1.0]], [0.1, 0.1], home=0.25)  # the backward's hop home after the last step
    np.testing.assert_allclose(home["partner_wait"][:, 1], [0.0, 1.0])
    np.testing.assert_allclose(home["unhidden"][:, 1], [0.25, 0.25])


def test_predict_split_sees_the_causal_contiguous_imbalance():
    """Causal contiguous backward at P = 3: the last rank does the most work, so its neighbours wait for it (for the
    accumulators it sends on); zigzag balances it. (The forward's transfers are all posted at step starts that the
    balanced step 0 aligns: its imbalance shows in the pass time, not in waiting.)"""
    cal = Calibration.simple(rate=1e12, latency=1e-6, bandwidth=1e12, bwd_rate=1e12)
    base = dict(
        batch=1, seq_len=3072, heads=4, kv_heads=4, head_dim=64, dtype="float32", nranks=3, mode="overlap", causal=True, pass_="bwd"
    )
    cont = model.predict_split(Shape(**base, layout="contiguous"), cal)
    zig = model.predict_split(Shape(**base, layout="zigzag"), cal)
    assert cont["partner_wait"].sum() > 10 * max(zig["partner_wait"].sum(), 1e-9)
    assert np.all(cont["unhidden"] < 1e-4)  # a fast link: nothing left unhidden
    assert model.predict_split(Shape(**base, layout="zigzag").with_(mode="allgather"), cal) is None


# ---------------------------------------------------------------------------------------------
# Skinny pieces (schema-4 probes): the per-call fit t = c + a q k + b k + e q
# ---------------------------------------------------------------------------------------------
def _piece_grid(rng):
    """Probe-like pieces: squares of 32..1024 and 1, 8, 32 rows against the same key counts, shuffled."""
    blocks = np.array([32, 64, 128, 256, 512, 1024])
    q = np.concatenate([blocks, np.repeat([1, 8, 32], len(blocks))])
    k = np.concatenate([blocks, np.tile(blocks, 3)])
    order = rng.permutation(len(q))
    return q[order], k[order]


@pytest.mark.parametrize("seed", range(4))
def test_fit_piece_cost_recovers_known_coefficients(seed):
    rng = np.random.default_rng(seed)
    c, a, b, e = rng.uniform(20e-6, 200e-6), rng.uniform(20e-9, 120e-9), rng.uniform(0.05e-6, 2e-6), rng.uniform(0.1e-6, 1e-6)
    q, k = _piece_grid(rng)
    t = c + a * q * k + b * k + e * q
    assert model.fit_piece_cost(q, k, t) == pytest.approx((c, a, b, e), rel=1e-6)
    # with 3% multiplicative noise the fit still lands near them, and predicts every piece within the noise's reach
    noisy = t * rng.lognormal(0.0, 0.03, len(t))
    fit = np.array(model.fit_piece_cost(q, k, noisy))
    assert fit[1] == pytest.approx(a, rel=0.1) and fit[2] == pytest.approx(b, rel=0.5)
    back = fit[0] + fit[1] * q * k + fit[2] * k + fit[3] * q
    assert np.max(np.abs(back / t - 1)) < 0.12


def test_fit_piece_cost_keeps_every_coefficient_non_negative():
    q, k = _piece_grid(np.random.default_rng(7))
    t = 50e-9 * q * k + 1e-6 * k  # no fixed cost and no per-row term
    t = t * (1 + 0.02 * np.cos(np.arange(len(t))))  # a wobble that unconstrained least squares answers with c or e < 0
    fit = model.fit_piece_cost(q, k, t)
    assert min(fit) >= 0 and fit[1] == pytest.approx(50e-9, rel=0.1)
    with pytest.raises(ValueError, match="positive times"):
        model.fit_piece_cost([1, 2], [3, 4], [1e-3, 0.0])


A = 4 * 8 * 64 / 1e10  # seconds per (query, key) pair of all 8 heads at 10 GFLOP/s


def skinny_cal(fits: bool = True) -> Calibration:
    """Squares at 10 GFLOP/s (blocks of 32 to 1024 tokens at H = 1, D = 64), masked at 5; with ``fits``: one call
    t = 100 us + 204.8 ns q k (the tables' 10 GFLOP/s) + 1 us k + 0.5 us q at the probe's B = 1, H = 8, H_kv = 1, D = 64."""
    pts = [(4.0 * 64 * n * n, 1e10) for n in (32, 1024)]
    fit = model.PieceFit(100e-6, A, 1e-6, 0.5e-6, batch=1, heads=8, kv_heads=1, head_dim=64, min_block=32, masked=1.5)
    return Calibration(
        rates={2: pts},
        links={2: (0.0, 1e9)},
        diag_rates={2: [(w, 0.5e10) for w, _ in pts]},
        bwd_rates={2: pts},
        bwd_diag_rates={2: pts},
        piece_fits={2: fit} if fits else {},
        bwd_piece_fits={2: fit} if fits else {},
    )


def test_a_skinny_piece_costs_more_than_a_square_of_the_same_flops():
    cal = skinny_cal()
    sh = Shape(nranks=2, seq_len=8192, heads=8, kv_heads=1, head_dim=64, causal=True)
    skinny = model.pieces_seconds([Piece(0, 1, 0, 4096)], cal, sh, 8)  # decode: 1 query per head against 4096 keys
    square = model.pieces_seconds([Piece(0, 64, 0, 64)], cal, sh, 8)  # the same 4096 pairs as a square
    assert skinny == pytest.approx(100e-6 + A * 4096 + 1e-6 * 4096 + 0.5e-6)  # the fit, at the probe's own shape
    assert square == pytest.approx(4 * 8 * 64 * 4096 / 1e10)  # on the tables (64 x 64: a square of the table's range)
    assert skinny > 3 * square
    # other shapes scale the fit: a and e by B H D, b by B H_kv D, c stays (B = 2, H = 4, H_kv = 2, D = 128: x2 and x8)
    other = Shape(nranks=2, seq_len=8192, batch=2, heads=4, kv_heads=2, head_dim=128, causal=True)
    assert model.pieces_seconds([Piece(0, 1, 0, 4096)], cal, other, 4) == pytest.approx(100e-6 + 2 * (A * 4096 + 0.5e-6) + 8 * 1e-6 * 4096)
    # off the tables: a side under the smallest block, or longer than SKINNY_ASPECT times the other; a masked piece
    # there costs the fit times the mask's measured cost
    fit = cal.piece_fit(2)
    assert fit.off_table([16, 64, 64, 64], [16, 64, 256, 257]).tolist() == [True, False, False, True]
    corner = model.pieces_seconds([Piece(0, 16, 0, 16, "causal")], cal, sh, 8)
    assert corner == pytest.approx(1.5 * (100e-6 + A * 256 + 1e-6 * 16 + 0.5e-6 * 16))
    # the backward has its own fit; without fits, today's tables for every piece
    assert model.pieces_seconds([Piece(0, 1, 0, 4096)], cal, sh, 8, "bwd") == pytest.approx(skinny)
    old = skinny_cal(fits=False)
    assert model.pieces_seconds([Piece(0, 1, 0, 4096)], old, sh, 8) == pytest.approx(4 * 8 * 64 * 4096 / 1e10)


def test_serving_prices_decode_and_few_new_tokens_through_the_fit():
    from ringbench.analysis import inference

    cal, old = skinny_cal(), skinny_cal(fits=False)
    w = dict(nranks=2, seq_len=8192, new_tokens=1, batch=1, heads=8, kv_heads=1, head_dim=64, dtype="float32", layout="contiguous")
    assert inference.decode_compute_s(w, cal) == pytest.approx(100e-6 + A * 4096 + 1e-6 * 4096 + 0.5e-6)
    assert inference.decode_compute_s(w, old) == pytest.approx(4 * 8 * 64 * 4096 / 1e10)
    p = dict(w, cached_tokens=8192 - 64)  # T / P = 32 new queries per rank against 4064 cached keys
    assert inference.predict_prefill(p, cal)["pass-kv"] > 1.1 * inference.predict_prefill(p, old)["pass-kv"]
    # many new tokens: squares and halves on the tables, as before
    p = dict(w, cached_tokens=0)
    assert inference.predict_prefill(p, cal) == pytest.approx(inference.predict_prefill(p, old))


def test_the_fit_follows_the_probes_measured_grid_inside_it():
    fit = model.PieceFit(
        100e-6, A, 1e-6, 0.5e-6, batch=1, heads=8, kv_heads=1, head_dim=64, min_block=32,
        rows=(1, 32), keys=(256, 4096), grid=((200e-6, 9e-3), (400e-6, 12e-3)),
    )  # fmt: skip
    at = fit.seconds([1, 32, 1, 1], [256, 4096, 4096, 1024], 1, 8, 1, 64)
    assert at[:3] == pytest.approx([200e-6, 12e-3, 9e-3])  # measured pieces cost what they measured
    assert at[3] == pytest.approx(np.sqrt(200e-6 * 9e-3))  # between them: linear in log k and log t
    # outside the grid: the line; another shape: the grid scaled by the line's ratio
    assert fit.seconds([64], [256], 1, 8, 1, 64)[0] == pytest.approx(fit.fitted(64, 256, 1, 8, 1, 64))
    ratio = fit.fitted(1, 4096, 8, 8, 1, 64) / fit.fitted(1, 4096, 1, 8, 1, 64)
    assert fit.seconds([1], [4096], 8, 8, 1, 64)[0] == pytest.approx(9e-3 * ratio)
