"""Ulysses, hybrid and pass-Q: correctness under mpiexec, refusals, model terms, advise, machine YAML."""

import math
from pathlib import Path

import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import advise, model
from ringbench.config import RunConfig, point_id, validate
from ringbench.engine.strategies import kv_head_map
from ringbench.kernels import reference
from ringbench.layout import group_plan
from ringbench.sweeps.experiment import ExperimentError

from conftest import MPIEXEC, ROOT, Batch, child_env, mpiexec, ringbench

SMALL = ["--heads", 4, "--head-dim", 16, "--repeat", 2, "--warmup", 1, "--quiet"]


@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_every_strategy_layout_causal_gqa_dtype_matches_the_reference(nranks):
    """One launch per rank count loops over strategy x layout x causal x kv heads (and dtypes); the script asserts
    against the float64 reference and that hybrid U=1 equals the ring and U=P equals Ulysses."""
    import subprocess
    import sys

    cmd = [str(MPIEXEC), "-n", str(nranks), sys.executable, str(Path(__file__).with_name("mpi_strategies.py"))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    checked = int(res.stdout.split("checked")[1])
    assert checked >= {1: 60, 2: 90, 3: 50, 4: 100}[nranks]


CLI_MODES = ["ulysses", "pass-q", "hybrid"]


@pytest.fixture(scope="module")
def cli_modes(tmp_path_factory):
    def cases(nranks):
        return {m: ["--mode", m, *(["--ulysses-degree", 2] if m == "hybrid" else [])] for m in CLI_MODES}

    common = [*SMALL, "--check", "--seq-len", 128, "--kv-heads", 2, "--causal"]
    return Batch(tmp_path_factory.mktemp("cli-modes"), cases, common)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", CLI_MODES)
def test_cli_run_checks_samples_and_bytes(mode, cli_modes):
    run = cli_modes.run(4, mode)
    assert run.check["passed"]
    steps = {"ulysses": 3, "pass-q": 5, "hybrid": 4}[mode]  # a2a, R ring steps, a2a / P compute steps and the last return
    for name in ("compute_s", "comm_s", "step_s"):
        assert run.samples[name].shape == (2, 4, steps)
    assert run.samples["comm_only_s"].shape == (2, 4, {"ulysses": 2, "pass-q": 6, "hybrid": 3}[mode])
    shape = model.Shape.from_config(run.config, 4)
    assert run.summary["bytes_per_rank"] == model.strategy_bytes(shape)
    assert run.config["ulysses_degree"] == (2 if mode == "hybrid" else 1)


@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_backward_of_ulysses_and_hybrid_matches_float64_gradients(nranks):
    """One launch per rank count: ulysses and hybrid (every U dividing P) x layout x causal x kv heads (split and
    replicated) and dtypes, dQ, dK, dV against float64 reference gradients (TOLERANCE_BWD); hybrid U=1 gives the
    ring's gradients, U=P Ulysses'; each pass gathers dO anew (tests/engine/mpi_strategies_backward.py asserts)."""
    import subprocess
    import sys

    cmd = [str(MPIEXEC), "-n", str(nranks), sys.executable, str(Path(__file__).with_name("mpi_strategies_backward.py"))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    checked = int(res.stdout.split("checked")[1])
    assert checked >= {1: 60, 2: 78, 3: 43, 4: 96}[nranks]


def backward_bytes(n, heads, kv_heads, d, u, r, itemsize=4, compute=4, batch=1):
    """The documented backward traffic of hybrid (ulysses: U = P, R = 1): dO in, the ring backward, dQ | dK | dV out."""
    hl, hkl = heads // u, max(1, kv_heads // u)
    ring = (r - 1) * 2 * batch * u * n * hkl * d * itemsize + (r * 2 * batch * u * n * hkl * d * compute if r > 1 else 0)
    return (u - 1) * batch * n * hl * d * itemsize + ring + (u - 1) * batch * n * (hl + 2 * hkl) * d * compute


@pytest.mark.mpi
@pytest.mark.parametrize("nranks,mode,extra", [(2, "ulysses", ["--kv-heads", 2]), (4, "hybrid", ["--ulysses-degree", 2, "--kv-heads", 1])])
def test_cli_backward_phase_samples_bytes_and_check(nranks, mode, extra, tmp_path):
    """--pass fwd+bwd --check: a bwd phase of R + 2 steps, its bytes as documented, both checks passed; the saved
    gradients (hybrid: kv heads replicated, their partial dK/dV summed by the owner) reverify against float64."""
    out = tmp_path / "r.h5"
    save = ["--save-tensors"] if mode == "hybrid" else []
    res = mpiexec(
        nranks, "run", *SMALL, "--check", "--out", out, "--seq-len", 64, "--mode", mode, "--pass", "fwd+bwd", "--causal", *extra, *save
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = store.read(out, tensors=bool(save))
    u = nranks if mode == "ulysses" else 2
    r = nranks // u
    bwd = run.bwd
    assert run.check["passed"] and bwd.check["passed"], bwd.check
    for name in ("compute_s", "comm_s", "step_s"):
        assert bwd.samples[name].shape == (2, nranks, r + 2) and bwd.samples["warmup_" + name].shape == (1, nranks, r + 2)
    assert bwd.samples["comm_only_s"].shape == (2, nranks, 2 + (r if r > 1 else 0))
    assert (bwd.samples["comm_s"] > 0).all()  # the all-to-alls are timed as comm
    n, kv = 64 // nranks, run.config["kv_heads"]
    assert bwd.summary["bytes_per_rank"] == backward_bytes(n, 4, kv, 16, u, r)
    shape = model.Shape.from_config(run.config, nranks)
    assert run.summary["bytes_per_rank"] == model.strategy_bytes(shape, "fwd")
    assert bwd.summary["bytes_per_rank"] == model.strategy_bytes(shape, "bwd")  # the model counts what is sent
    assert run.memory["theoretical_bwd_bytes"] > 0
    if save:
        from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention_grad

        t = run.tensors
        for got, ref in zip((t["dq"], t["dk"], t["dv"]), reference_attention_grad(t["q"], t["k"], t["v"], t["do"], causal=True)):
            assert np.abs(got - ref).max() / np.abs(ref).max() < TOLERANCE_BWD["float32"]


def test_every_strategy_has_a_backward():
    for mode, u in (("ulysses", 1), ("hybrid", 2), ("pass-q", 1)):
        for pass_ in ("bwd", "fwd+bwd"):
            assert validate(RunConfig(mode=mode, ulysses_degree=u, heads=4, kv_heads=2, pass_=pass_), 4) == []


def test_kernel_torch_with_the_strategies():
    """ulysses and hybrid run --kernel torch forward and backward; pass-q its forward only (its backward is refused)."""
    for mode, u in (("ulysses", 1), ("hybrid", 2)):
        assert validate(RunConfig(mode=mode, ulysses_degree=u, heads=4, kv_heads=2, kernel="torch", pass_="fwd+bwd"), 4) == []
    assert validate(RunConfig(mode="pass-q", kernel="torch"), 4) == []
    (problem,) = validate(RunConfig(mode="pass-q", kernel="torch", pass_="bwd"), 4)
    assert problem[0] == "kernel" and "forward only" in problem[1]


@pytest.mark.mpi
def test_save_tensors_reverify(tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(2, "run", *SMALL, "--seq-len", 64, "--mode", "pass-q", "--layout", "striped", "--causal", "--save-tensors", "--out", out)
    assert res.returncode == 0, res.stderr
    (run,) = store.read(out, tensors=True)

    t = run.tensors
    ref = reference.reference_attention(t["q"], t["k"], t["v"], causal=True)
    assert np.abs(t["out"] - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.mpi
@pytest.mark.parametrize(
    "nranks,args,needle",
    [
        (3, ["--mode", "ulysses"], "--mode: ulysses at 3 ranks: the all-to-all group size 3 must divide heads=4"),
        (4, ["--mode", "ulysses", "--heads", 12, "--kv-heads", 6], "must divide kv_heads=6 or be a multiple"),
        (4, ["--mode", "hybrid", "--ulysses-degree", 3], "--ulysses-degree: must divide the rank count 4; got 3"),
        (2, ["--ulysses-degree", 2], "--ulysses-degree: only for --mode hybrid"),
    ],
)
def test_refused_before_anything_runs(nranks, args, needle, tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(nranks, "run", "--seq-len", 96, "--heads", 4, *args, "--out", out)
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_config_rules_and_point_ids():
    assert validate(RunConfig(mode="ulysses", heads=8, kv_heads=2), 4) == []  # kv heads replicated
    assert validate(RunConfig(mode="ulysses", heads=8, kv_heads=8), 8) == []
    assert validate(RunConfig(mode="ulysses", heads=8), 16)[0][0] == "mode"
    assert validate(RunConfig(mode="hybrid", ulysses_degree=2, heads=6, kv_heads=3), 4)[0][0] == "ulysses_degree"
    assert validate(RunConfig(mode="pass-q", heads=3), 4) == []  # pass-q has no head rule
    # the new field leaves the ids of other modes as they were; it is part of hybrid ids
    assert point_id(RunConfig(seq_len=2048), 4) == "overlap-contiguous-float32-N2048-P4-" + point_id(RunConfig(seq_len=2048), 4)[-16:]
    import hashlib
    import json

    ident = {
        k: v for k, v in RunConfig(seq_len=2048).to_dict().items() if k not in RunConfig.NON_IDENTITY and k not in RunConfig.ADDED_IDENTITY
    }
    ident["nranks"] = 4
    assert point_id(RunConfig(seq_len=2048), 4).endswith(hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16])
    a, b = (point_id(RunConfig(mode="hybrid", ulysses_degree=u), 4) for u in (1, 2))
    assert a != b and b.startswith("hybrid2-")


def test_experiment_refusal_names_file_line_key(tmp_path):
    from ringbench.sweeps import experiment

    path = tmp_path / "x.yaml"
    path.write_text("name: x\nbase:\n  seq_len: 96\n  heads: 4\nmatrix:\n  mode: [overlap, ulysses]\nranks: [3]\n")
    with pytest.raises(ExperimentError, match=r"x.yaml:6: matrix.mode\[1\]: ulysses at 3 ranks"):
        experiment.load(path)


def test_kv_head_map_and_group_plan():
    assert kv_head_map(4, 2).tolist() == [[0, 1], [2, 3]]
    assert kv_head_map(2, 4).tolist() == [[0], [0], [1], [1]]
    # U = 1: the layout's own plan; non-causal: one full piece over the group's tokens
    from ringbench.layout import step_plan

    assert group_plan("zigzag", 2, 1, 1, 4, 8, True) == step_plan("zigzag", 2, 1, 4, 8, True)
    (full,) = group_plan("striped", 0, 1, 2, 4, 8, False)
    assert (full.q0, full.q1, full.k0, full.k1) == (0, 16, 0, 16)
    # causal pieces over all group pairs cover exactly N(N+1)/2 pairs
    total = sum(p.pairs() for g in range(2) for s in range(2) for p in group_plan("contiguous", g, s, 2, 4, 8, True))
    assert total == 32 * 33 // 2


CAL = model.Calibration.simple(rate=1e9, latency=1e-5, bandwidth=1e8)


def test_model_terms_hand_computed():
    # Ulysses, P = 4, N = 1024 (n = 256), B = 1, H = 8, H_kv = 2, D = 16, float32, no mask
    sh = model.Shape(nranks=4, seq_len=1024, heads=8, kv_heads=2, head_dim=16, mode="ulysses")
    # a2a in: h = 2 query heads, 1 kv head (replicated) -> per peer 256 * (2 + 2) * 16 * 4 = 65536 bytes, 3 rounds
    t_in = 3 * (1e-5 + 65536 / 1e8)
    t_out = 3 * (1e-5 + 256 * 2 * 16 * 4 / 1e8)
    compute = 4 * 2 * 16 * 1024**2 / 1e9
    pred = model.predict(sh, CAL)
    assert math.isclose(pred.time_s, t_in + compute + t_out, rel_tol=1e-12)
    assert model.strategy_bytes(sh) == 3 * (65536 + 256 * 2 * 16 * 4)
    # hybrid U = 1 is the ring, U = P is Ulysses
    ring = model.predict(sh.with_(mode="overlap", causal=True, layout="zigzag"), CAL).time_s
    assert math.isclose(model.predict(sh.with_(mode="hybrid", ulysses_degree=1, causal=True, layout="zigzag"), CAL).time_s, ring)
    assert math.isclose(model.predict(sh.with_(mode="hybrid", ulysses_degree=4), CAL).time_s, pred.time_s)
    # pass-q, P = 2, no mask: step 0 max(compute, q transfer), step 1 compute (nothing moves), step 2 the return
    pq = sh.with_(mode="pass-q", nranks=2, seq_len=512)
    c = 4 * 8 * 16 * 256**2 / 1e9
    tq = 1e-5 + 256 * 8 * 16 * 4 / 1e8
    tr = 1e-5 + 256 * 8 * 17 * 4 / 1e8
    assert math.isclose(model.predict(pq, CAL).time_s, max(c, tq) + c + tr, rel_tol=1e-12)
    assert model.strategy_bytes(pq) == 256 * 8 * 16 * 4 + 256 * 8 * 17 * 4


def test_machine_links_split_intra_and_inter():
    m = model.Machine(ranks_per_node=2, intra=(1e-6, 1e10), inter=(1e-5, 1e9))
    # group of 4 over 2-rank nodes: 1 round intra, 2 rounds inter
    t = model.alltoall_time(1000, 4, CAL, m, 8)
    assert math.isclose(t, (1e-6 + 1000 / 1e10) + 2 * (1e-5 + 1000 / 1e9))
    assert model.ring_link(CAL, m, 2, 1) == m.intra and model.ring_link(CAL, m, 4, 2) == m.inter


def test_advise_on_a_synthetic_calibration(tmp_path):
    base = model.Shape(nranks=1, seq_len=1, heads=8, kv_heads=8, head_dim=64)
    cands = advise.candidates(base.with_(seq_len=4096), 4, CAL)
    assert [c.label for c in cands] == ["ring", "allgather", "ulysses", "hybrid U=2", "pass-q"]
    w, margin = advise.winner(cands)
    assert w.time_s == min(c.time_s for c in cands) and margin >= 1
    refused = advise.candidates(base.with_(seq_len=4096, heads=6, kv_heads=6), 4, CAL)
    assert {c.label: bool(c.refused) for c in refused}["ulysses"] and not refused[0].refused
    # a slow link: at small blocks the ring cannot hide it; the winner changes with the block size
    slow = model.Calibration.simple(rate=1e10, latency=1e-3, bandwidth=1e7)
    moves = advise.changes(base, 4, slow)
    assert moves and all(a != b for _, a, b in moves)
    text = advise.format_advice(base, [4096], [4], slow)
    assert "winner:" in text and "ulysses" in text and "the winner changes" in text


@pytest.mark.mpi
def test_advise_cli(small_results, tmp_path):
    res = ringbench("advise", small_results, "--seq-len", "1024,4096", "--ranks", "2,4", "--kv-heads", 2, "--causal", "--layout", "zigzag")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("winner:") == 4 and "hybrid U=2" in res.stdout
    bad = ringbench("advise", "--seq-len", 1024, "--ranks", 2)
    assert bad.returncode == 2 and "FILE or --probe" in bad.stderr
    # the backward needs a backward rate: forward-only ring runs have none
    bwd = ringbench("advise", small_results, "--seq-len", "1024", "--ranks", "2", "--pass", "bwd")
    assert bwd.returncode == 2 and bwd.stderr.count("\n") == 1 and "--pass bwd" in bwd.stderr and "no backward compute rate" in bwd.stderr


def test_advise_predicts_the_backward():
    cal = model.Calibration.simple(rate=1e9, latency=1e-5, bandwidth=1e8, bwd_rate=2e9)
    base = model.Shape(nranks=1, seq_len=1, heads=8, kv_heads=2, head_dim=64, causal=True, layout="zigzag", pass_="fwd+bwd")
    text = advise.format_advice(base, [4096], [2], cal)
    assert "forward + backward passes" in text and "winner:" in text
    for c in advise.candidates(base.with_(seq_len=4096), 2, cal):
        pred = model.predict(c.shape, cal)
        assert c.time_s == pytest.approx(pred.time_s) and set(pred.parts) == {"fwd", "bwd"}
        assert c.bytes_per_rank == model.strategy_bytes(c.shape, "fwd") + model.strategy_bytes(c.shape, "bwd")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("ranks_per_node: 4\nintra: {latency_us: 1, bandwidth_gbps: 100}\ninter: {latency_us: 5, bandwidth_gbps: 25}\n", None),
        (
            "ranks_per_node: 0\nintra: {latency_us: 1, bandwidth_gbps: 100}\ninter: {latency_us: 5, bandwidth_gbps: 25}\n",
            "m.yaml:1: ranks_per_node",
        ),
        (
            "ranks_per_node: 4\nintra: {latency_us: 1, bandwidth_gbps: 100}\ninter:\n  latency_us: 5\n  bandwidth_gbps: 0\n",
            "m.yaml:5: inter.bandwidth_gbps",
        ),
        (
            "ranks_per_node: 4\nintra: {latency_us: 1, bandwidth_gbps: 100}\ninterr: {}\n",
            "m.yaml:3: interr: unknown key (did you mean 'inter'?)",
        ),
        (
            "ranks_per_node: 4\nintra: {latency_us: 1}\ninter: {latency_us: 5, bandwidth_gbps: 25}\n",
            "m.yaml:2: intra: missing key bandwidth_gbps",
        ),
    ],
)
def test_machine_yaml_validation(text, needle, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    if needle is None:
        m = advise.load_machine(path)
        assert m.ranks_per_node == 4 and np.allclose(m.intra, (1e-6, 1e11)) and np.allclose(m.inter, (5e-6, 25e9), rtol=1e-12, atol=0)
        return
    with pytest.raises(ExperimentError) as exc:
        advise.load_machine(path)
    assert needle in str(exc.value)
    res = ringbench("advise", "--probe", ROOT / "nonexistent.h5", "--seq-len", 64, "--ranks", 2, "--machine", path)
    assert res.returncode == 2
