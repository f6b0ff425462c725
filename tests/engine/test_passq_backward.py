"""Pass-Q's backward (`ringbench run --mode pass-q --pass bwd|fwd+bwd`) under a real mpiexec: gradients against float64
for every layout x causal x GQA x dtype at P = 1..4, the traffic counted, and the stored phase."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import model
from ringbench.config import RunConfig, validate
from ringbench.harness import inputs
from ringbench.kernels import kernel
from ringbench.kernels.backward import BlockBackward
from ringbench.kernels.reference import TOLERANCE_BWD
from ringbench.layout import CAUSAL, LAYOUTS, Piece

from conftest import mpi_worker, mpiexec

WORKER = Path(__file__).with_name("mpi_passq_backward.py")
SPEC = dict(tokens_per_rank=12, head_dim=8, batch=2, kv_heads=[4, 2, 1], dtypes=["float64", "float16", "bfloat16"])


def launch(nranks: int, spec: dict) -> list:
    return mpi_worker(WORKER, nranks, spec)


def bwd_bytes(nranks: int, batch: int, n: int, heads: int, head_dim: int, itemsize: int, compute_itemsize: int) -> int:
    """The README's pass-Q backward traffic: (P-1) bundles [Q, dO, LSE, D] and (P-1) dQ partials (compute dtype)."""
    rows = batch * n * heads
    return (nranks - 1) * rows * (2 * head_dim * itemsize + 2 * compute_itemsize) + (nranks - 1) * rows * head_dim * compute_itemsize


@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_every_layout_causal_gqa_and_dtype_matches_float64_gradients(nranks):
    """every layout x 2 causal flags x kv heads 4, 2, 1 in float32, and float64, float16, bfloat16 on causal zigzag GQA:
    dq, dk, dv within TOLERANCE_BWD of float64 reference gradients, a second pass bitwise equal to the first."""
    cases = launch(nranks, SPEC)
    assert len(cases) == len(LAYOUTS) * 2 * 3 + 3
    assert {c["dtype"] for c in cases} == {"float32", "float64", "float16", "bfloat16"} and {c["kv_heads"] for c in cases} == {1, 2, 4}
    sizes = {"float64": (8, 8), "float32": (4, 4), "float16": (2, 4), "bfloat16": (2, 4)}
    for c in cases:
        rel = [e / r for e, r in zip(c["errs"], c["refs"])]
        assert c["finite"] and c["repeatable"], c
        assert max(rel) < TOLERANCE_BWD[c["dtype"]], f"dq, dk, dv relative errors {rel} in {c}"
        assert c["bytes_counted"], c
        assert c["bytes_per_rank"] == bwd_bytes(nranks, 2, 12, 4, 8, *sizes[c["dtype"]])
    tight = [e / r for c in cases if c["dtype"] == "float64" for e, r in zip(c["errs"], c["refs"])]
    assert max(tight) < 1e-12


@pytest.mark.mpi
def test_cli_fwd_bwd_checks_and_stores_the_backward_phase(tmp_path):
    out = tmp_path / "f.h5"
    p, n = 3, 32
    res = mpiexec(
        p, "run", "--mode", "pass-q", "--pass", "fwd+bwd", "--causal", "--layout", "zigzag", "--kv-heads", 2, "--check",
        "--seq-len", p * n, "--heads", 4, "--head-dim", 16, "--repeat", 2, "--warmup", 1, "--quiet", "--out", out,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = store.read(out)
    assert run.phases() == ["fwd", "bwd"] and run.config["mode"] == "pass-q"
    for ph in (run.phase("fwd"), run.bwd):
        for key in ("compute_s", "comm_s", "step_s"):
            assert ph.samples[key].shape == (2, p, p + 1) and ph.samples["warmup_" + key].shape == (1, p, p + 1)
        assert ph.samples["comm_only_s"].shape == (2, p, 2 * (p - 1))  # P-1 hops out, P-1 partials home
        assert ph.check["passed"] and ph.summary["time_s"] > 0
    assert run.bwd.summary["bytes_per_rank"] == bwd_bytes(p, 1, n, 4, 16, 4, 4)
    assert run.bwd.summary["bytes_per_rank"] == model.strategy_bytes(model.Shape.from_config(run.config, p), "bwd")  # the model's count
    for name in ("dq", "dk", "dv"):
        assert run.bwd.check[f"{name}_rel_err"] < TOLERANCE_BWD["float32"]
    assert run.memory["theoretical_bwd_bytes"] > 0


@pytest.mark.mpi
def test_saved_gradients_equal_the_ring_backward(tmp_path):
    """--save-tensors of pass-q's backward: the global dq, dk, dv agree with the ring's to float32 rounding."""
    grads = {}
    for mode in ("overlap", "pass-q"):
        out = tmp_path / f"{mode}.h5"
        shape = ["--seq-len", 64, "--heads", 4, "--kv-heads", 1, "--head-dim", 16, "--causal", "--layout", "striped"]
        res = mpiexec(
            2, "run", "--mode", mode, "--pass", "bwd", *shape, "--repeat", 1, "--warmup", 0, "--quiet", "--save-tensors", "--out", out
        )
        assert res.returncode == 0, res.stdout + res.stderr
        (run,) = store.read(out, tensors=True)
        grads[mode] = run.tensors
    for name in ("dq", "dk", "dv"):
        a, b = grads["pass-q"][name], grads["overlap"][name]
        assert a.shape == b.shape and np.abs(a - b).max() / np.abs(b).max() < 1e-5, name


def test_pass_q_backward_is_accepted():
    for pass_ in ("bwd", "fwd+bwd"):
        assert validate(RunConfig(mode="pass-q", pass_=pass_, heads=3, kv_heads=1), 3) == []


def test_load_gives_the_bits_of_a_backward_built_on_those_rows():
    """BlockBackward.load (pass-Q's visitors: Q unscaled in the storage dtype, dO, LSE and D = delta()) is the constructor
    on those rows: dQ, dK, dV bit for bit, dQ zeroed; a float16 block computes in float32; shapes are checked."""
    b, n, h, hk, d = 1, 24, 4, 2, 8
    pos = np.arange(n)
    x = {name: inputs.tokens(name, 7, pos, batch=b, seq_len=n, heads=hk if name in "kv" else h, head_dim=d) for name in "qkv"}
    x["do"] = inputs.tokens("do", 7, pos, batch=b, seq_len=n, heads=h, head_dim=d)
    x = {k: a.astype(np.float16) for k, a in x.items()}
    kh, vh = (kernel.kv_to_heads(np, x[k], np.float32) for k in "kv")
    scale = np.float32(kernel.softmax_scale(d))
    pieces = [Piece(0, n, 0, n, CAUSAL)]

    def block(other: bool):
        q = (x["q"].astype(np.float32) * 1.5).astype(np.float16) if other else x["q"]
        qs = kernel.q_to_heads(np, q, hk)  # (Z, G, n, D) float16, as the bundle carries it
        fwd = kernel.OnlineSoftmax(np, kernel.q_to_heads(np, q, hk, np.float32) * scale)
        fwd.update(kh, vh, pieces)
        o, lse = fwd.finalize(np.float16)
        doh = kernel.q_to_heads(np, x["do"], hk)
        return qs, doh, BlockBackward(np, kernel.q_to_heads(np, q, hk, np.float32) * scale, doh, o, lse, tile_q=8, tile_k=8), lse

    def grads(bwd):
        dk, dv = np.zeros_like(kh), np.zeros_like(vh)
        bwd.update(kh, vh, dk, dv, pieces)
        return bwd.dq(), dk, dv

    _, _, home, _ = block(False)
    qs, doh, other, lse = block(True)
    grads(home)  # dQ of the home rows, to be zeroed by load
    home.load(qs, doh, lse, other.delta(), q_scale=kernel.softmax_scale(d))
    assert home.dqa.dtype == np.float32
    for a, b_ in zip(grads(home), grads(other)):
        np.testing.assert_array_equal(a, b_)
    with pytest.raises(ValueError, match="BlockBackward.load"):
        home.load(qs[:, :, :-1], doh, lse, other.delta())


@pytest.mark.mpi
def test_memory_estimate_covers_the_measured_peak_of_fwd_bwd(tmp_path):
    """pass-q's estimate (its travelling queries and partials, the bundles and dQ partials of the backward) is not below
    what a real fwd+bwd run uses, and not so loose that it refuses what fits (as tests/harness/test_run_mpi.py asks of the ring)."""
    from ringbench.engine.backend import get_backend
    from ringbench.harness.memory import memory_estimate
    from ringbench.kernels.mkl import MklMatmul

    out = tmp_path / "r.h5"
    args = ["--batch", 32, "--seq-len", 256, "--heads", 8, "--kv-heads", 2, "--head-dim", 128]  # the arrays dominate
    res = mpiexec(2, "run", "--mode", "pass-q", "--pass", "fwd+bwd", *args, "--repeat", 1, "--warmup", 0, "--quiet", "--out", out)
    assert res.returncode == 0, res.stderr
    (run,) = store.read(out)
    cfg = RunConfig.from_dict(run.config)
    backend = get_backend("numpy")
    used = run.memory["peak_rss_bytes"] - run.memory["baseline_rss_bytes"]
    for rank in range(2):
        est, _ = memory_estimate(cfg, 2, rank, backend, isinstance(backend.matmul(cfg.blas)[0], MklMatmul))
        assert 0.85 * used[rank] <= est <= 2 * used[rank] + 64 * 2**20, (rank, est, used)


@pytest.mark.mpi
@pytest.mark.parametrize("rank,step", [(0, 2)])
def test_a_fault_on_one_rank_ends_a_backward_job(rank, step, tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(3, "run", "--mode", "pass-q", "--pass", "bwd", "--seq-len", 48, "--heads", 2, "--head-dim", 8, "--repeat", 1,
                  "--out", out, env={"RINGBENCH_FAULT": f"{rank}:{step}"}, timeout=60)  # fmt: skip
    assert res.returncode != 0
    assert f"rank {rank} of 3" in res.stderr and "InjectedFault" in res.stderr
    assert not out.exists()


needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install -e '.[torch]')")


@needs_torch
@pytest.mark.mpi
@pytest.mark.parametrize("args", [["--layout", "striped", "--kv-heads", 2], ["--layout", "zigzag", "--kv-heads", 1, "--dtype", "bfloat16"]])
def test_pass_q_forward_with_the_torch_kernel_checks_and_equals_native(args, tmp_path):
    """--kernel torch in pass-q's forward (FusedAttention.load: the visiting queries, read in place): --check passes and
    the output is native pass-q's to the dtype's rounding; the library is recorded."""
    outs = {}
    for name in ("native", "torch"):
        out = tmp_path / f"{name}.h5"
        shape = ["--seq-len", 96, "--heads", 4, "--head-dim", 16, "--causal", *args]
        res = mpiexec(
            3, "run", "--mode", "pass-q", "--kernel", name, *shape, "--check", "--save-tensors", "--repeat", 1, "--quiet", "--out", out
        )
        assert res.returncode == 0, res.stdout + res.stderr
        (run,) = store.read(out, tensors=True)
        assert run.check["passed"] and run.samples["step_s"].shape[-1] == 4
        outs[name] = (run.tensors["out"], run.provenance["blas"])
    (a, _), (b, lib) = outs["native"], outs["torch"]
    assert np.abs(a - b).max() / np.abs(a).max() < (2e-5 if "bfloat16" not in args else 1.6e-2) and "torch" in lib


def test_pass_q_kernel_rules():
    assert validate(RunConfig(mode="pass-q", kernel="torch"), 3) == []
    ((key, msg),) = validate(RunConfig(mode="pass-q", kernel="torch", pass_="fwd+bwd"), 3)
    assert key == "kernel" and "forward only" in msg
