"""``--kernel torch``: PyTorch's fused CPU attention inside the ring, against the float64 reference.

Unit tests emulate the ring on one process (as test_kernel.py does); MPI tests run ``ringbench run --kernel torch
--check`` for real. They skip where torch is not installed; CI installs it (the ``torch`` extra).
"""

import importlib.util
import types
import warnings

import numpy as np
import pytest
from test_backward import assert_close
from test_backward import make as make_grad
from test_backward import reference as reference_grad
from test_kernel import TOL, make, rel_err

from ringbench.config import RunConfig, coerce, point_id
from ringbench.engine.backend import get_backend
from ringbench.kernels import kernel, reference
from ringbench.kernels.backward import BlockBackward, heads_to_kv
from ringbench.kernels.reference import TOLERANCE_BWD
from ringbench.layout import CAUSAL, FULL, LAYOUTS, STRICT, Piece, positions, step_plan

from conftest import Batch, LoopBack, mpiexec

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (pip install -e '.[torch]')")
BACKEND = get_backend("numpy")


def emulate_ring(q, k, v, *, nranks, layout, causal, dtype):
    """Global output of every emulated rank's ring pass with the torch state, as the Ring drives it."""
    from ringbench.kernels.torch_kernel import FusedAttention

    b, n_total, h, d = q.shape
    hk = k.shape[2]
    n = n_total // nranks
    storage = BACKEND.dtype(dtype)
    compute = BACKEND.compute_dtype(storage)
    out = np.zeros(q.shape, np.float64)
    for r in range(nranks):
        pos = positions(layout, r, nranks, n_total)
        qh = kernel.q_to_heads(np, q[:, pos].astype(storage), hk, compute) * compute.type(kernel.softmax_scale(d))
        st = FusedAttention(BACKEND, qh, kernel="torch", dtype=storage)
        passes = []
        for _ in range(2):  # a second pass after reset() gives the same output
            st.reset()
            for s in range(nranks):
                src = (r - s) % nranks
                kp = positions(layout, src, nranks, n_total)
                kb = kernel.kv_to_heads(np, k[:, kp].astype(storage))  # half precision as stored, like the Ring
                vb = kernel.kv_to_heads(np, v[:, kp].astype(storage))
                st.update(kb, vb, step_plan(layout, r, src, nranks, n, causal))
            o, lse = st.finalize(storage)
            assert o.dtype == storage and lse.shape == qh.shape[:3] and np.isfinite(lse).all()
            passes.append(o)
        np.testing.assert_array_equal(passes[0], passes[1])
        out[:, pos] = kernel.heads_to_out(o, b)
    return out


@needs_torch
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_ring_matches_reference(nranks, layout, causal, heads, kv_heads, dtype):
    q, k, v = make(48 * nranks, heads, kv_heads, 16)
    storage = BACKEND.dtype(dtype)
    q, k, v = (x.astype(storage) for x in (q, k, v))  # the reference sees the same rounded inputs
    ref = reference.reference_attention(q, k, v, causal=causal)
    out = emulate_ring(q, k, v, nranks=nranks, layout=layout, causal=causal, dtype=dtype)
    assert rel_err(out, ref) < TOL[dtype]


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_ring_other_dtypes(dtype, layout):
    q, k, v = make(96, 4, 2, 16)
    storage = BACKEND.dtype(dtype)
    q, k, v = (x.astype(storage) for x in (q, k, v))
    ref = reference.reference_attention(q, k, v, causal=True)
    out = emulate_ring(q, k, v, nranks=3, layout=layout, causal=True, dtype=dtype)
    assert rel_err(out, ref) < TOL[dtype]


@needs_torch
@pytest.mark.parametrize("mask", [FULL, CAUSAL, STRICT])
def test_one_piece_matches_the_native_kernel_lse_included(mask):
    """Output and lse of one masked piece equal the native kernel's; under STRICT query 0 sees nothing (0, -inf)."""
    from ringbench.kernels.torch_kernel import FusedAttention

    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 2, 40, 16)).astype(np.float32) * 0.25
    k, v = rng.standard_normal((2, 3, 40, 16)).astype(np.float32)
    piece = [Piece(0, 40, 0, 40, mask)]
    native = kernel.OnlineSoftmax(np, q.copy())
    fused = FusedAttention(BACKEND, q.copy(), kernel="torch", dtype=np.float32)
    for st in (native, fused):
        st.reset()
        st.update(k, v, piece)
    (o1, l1), (o2, l2) = native.finalize(), fused.finalize()
    np.testing.assert_allclose(o2, o1, rtol=0, atol=2e-6)
    np.testing.assert_allclose(l2, l1, rtol=1e-6, atol=1e-6)
    if mask == STRICT:
        assert np.all(l2[:, :, 0] == -np.inf) and np.all(o2[:, :, 0] == 0)


@needs_torch
def test_arrays_reach_torch_without_copies():
    import torch

    from ringbench.kernels.torch_kernel import from_torch, to_torch

    a = np.ones((2, 8, 4), np.float32)
    t = to_torch(a[:, 2:6])
    assert t.data_ptr() == a[:, 2:6].ctypes.data and t.dtype == torch.float32
    b = a.astype(BACKEND.dtype("bfloat16"))
    tb = to_torch(b)
    assert tb.dtype == torch.bfloat16 and tb.data_ptr() == b.ctypes.data and float(tb[0, 0, 0]) == 1.0
    back = from_torch(np, t)
    assert back.ctypes.data == t.data_ptr()
    ro = kernel.q_to_heads(np, a[None], 4)  # read only, as the ring hands it over: shared silently (torch warns by default)
    assert not ro.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_torch(ro).data_ptr() == ro.ctypes.data and to_torch(ro.astype(BACKEND.dtype("bfloat16"))).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The backward through PyTorch's fused CPU backward (FusedBackward), the ring emulated as tests/kernels/test_backward.py does
# ---------------------------------------------------------------------------------------------
def emulate_ring_backward(q, k, v, do, *, nranks, layout, causal, dtype, min_rows=None):
    """Global (dq, dk, dv) in float64 of every emulated rank's torch forward and torch backward, as the Ring drives
    them: the forward on unscaled q with the scale, the backward on the scaled q with the forward's O and LSE, K/V as
    stored, the dK/dV accumulators (compute dtype) travelling with their block, one more hop home at the end."""
    from ringbench.kernels.torch_kernel import FusedAttention, FusedBackward

    b, n_total, h, d = q.shape
    hk = k.shape[2]
    n = n_total // nranks
    storage = BACKEND.dtype(dtype)
    compute = BACKEND.compute_dtype(storage)
    scale = kernel.softmax_scale(d)
    pos = [positions(layout, r, nranks, n_total) for r in range(nranks)]
    kv = [(kernel.kv_to_heads(np, k[:, p].astype(storage)), kernel.kv_to_heads(np, v[:, p].astype(storage))) for p in pos]
    plans = [[step_plan(layout, r, (r - s) % nranks, nranks, n, causal) for s in range(nranks)] for r in range(nranks)]
    ranks = []
    for r in range(nranks):
        qh = kernel.q_to_heads(np, q[:, pos[r]].astype(storage), hk, compute)  # (Z, G, n, D)
        fwd = FusedAttention(BACKEND, qh, kernel="torch", dtype=storage, scale=scale)
        for s in range(nranks):
            fwd.update(*kv[(r - s) % nranks], plans[r][s])
        o, lse = fwd.finalize(storage)
        doh = kernel.q_to_heads(np, do[:, pos[r]].astype(storage), hk)
        ranks.append(FusedBackward(BACKEND, qh * compute.type(scale), doh, o, lse, dtype=storage, min_rows=min_rows))
    results = []
    for _ in range(2):  # a second pass after reset() gives the same gradients
        held = [(r, np.zeros(kv[r][0].shape, compute), np.zeros(kv[r][0].shape, compute)) for r in range(nranks)]
        for bwd in ranks:
            bwd.reset()
        for s in range(nranks):
            for r in range(nranks):
                src, dk_acc, dv_acc = held[r]
                assert src == (r - s) % nranks
                ranks[r].update(*kv[src], dk_acc, dv_acc, plans[r][s])
            held = [held[(r - 1) % nranks] for r in range(nranks)]
        dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
        for r in range(nranks):
            dq[:, pos[r]] = kernel.heads_to_out(ranks[r].dq(storage), b)
            dk[:, pos[r]] = heads_to_kv(held[r][1].astype(storage), b)
            dv[:, pos[r]] = heads_to_kv(held[r][2].astype(storage), b)
        results.append((dq, dk, dv))
    for a, c in zip(*results):
        np.testing.assert_array_equal(a, c)
    return results[0]


@needs_torch
@pytest.mark.parametrize("nranks", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_ring_backward_matches_reference(nranks, layout, causal, heads, kv_heads, dtype):
    q, k, v, do = make_grad(24 * nranks, heads, kv_heads, 16)
    got = emulate_ring_backward(q, k, v, do, nranks=nranks, layout=layout, causal=causal, dtype=dtype)
    errs = assert_close(got, reference_grad(q, k, v, do, causal=causal, dtype=dtype), TOLERANCE_BWD[dtype])
    assert min(errs) > 0  # the comparison really compares


def test_row_chunks_cover_the_rows_in_near_equal_chunks():
    from ringbench.kernels.torch_kernel import CPU_BWD_ROW_CALLS, row_chunks

    rng = np.random.default_rng(11)
    for _ in range(200):
        q0, n, m = int(rng.integers(0, 50)), int(rng.integers(1, 3000)), int(rng.integers(1, 900))
        ch = row_chunks(q0, q0 + n, m)
        assert ch[0][0] == q0 and ch[-1][1] == q0 + n and all(a < b for a, b in ch)
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(ch[:-1], ch[1:]))  # contiguous, in order
        assert len(ch) == max(1, min(CPU_BWD_ROW_CALLS, n // m))
        assert len(ch) == 1 or min(b - a for a, b in ch) >= m
        assert max(b - a for a, b in ch) - min(b - a for a, b in ch) <= 1
    assert row_chunks(0, 3072, 256) == [(0, 768), (768, 1536), (1536, 2304), (2304, 3072)]


@needs_torch
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_the_backward_in_query_row_calls_matches_float64_and_progresses_between_them(layout, causal):
    """FusedBackward splits an unmasked piece's calls by query rows (min_rows: rows per call, at least): on random
    odd shapes the ring's gradients match float64, and MPI progress (on_tile) runs after every call: heads x row
    chunks for an unmasked piece, heads for a masked one (its rows see different keys: one call)."""
    from ringbench.kernels.torch_kernel import FusedBackward, head_chunks, row_chunks

    rng = np.random.default_rng(7 + causal)
    for nranks in (1, 2, 3):
        n, d, hk = int(rng.integers(9, 31)) * 2, int(rng.choice([5, 7, 9])), int(rng.choice([1, 3]))
        q, k, v, do = make_grad(n * nranks, 3, hk, d)
        got = emulate_ring_backward(q, k, v, do, nranks=nranks, layout=layout, causal=causal, dtype="float32", min_rows=4)
        errs = assert_close(got, reference_grad(q, k, v, do, causal=causal, dtype="float32"), TOLERANCE_BWD["float32"])
        assert min(errs) > 0
    z, g, n, d = 3, 2, 29, 5
    qh, doh, o = (rng.standard_normal((z, g, n, d)).astype(np.float32) for _ in range(3))
    lse = np.full((z, g, n), 4.0, np.float32)
    kh, vh = (rng.standard_normal((z, n, d)).astype(np.float32) for _ in range(2))
    calls = []
    bwd = FusedBackward(BACKEND, qh, doh, o, lse, dtype=np.float32, min_rows=6, on_tile=lambda: calls.append(1))
    dk, dv = np.zeros(kh.shape, np.float32), np.zeros(kh.shape, np.float32)
    bwd.update(kh, vh, dk, dv, [Piece(0, n, 0, n, FULL)])
    assert len(calls) == len(head_chunks(z, False)) * len(row_chunks(0, n, 6)) == 3 * 4
    calls.clear()
    bwd.update(kh, vh, dk, dv, [Piece(0, n, 0, n, CAUSAL)])
    assert len(calls) == 3


@needs_torch
@pytest.mark.parametrize("mode", ["overlap", "blocking", "allgather"])
def test_the_ring_backward_uses_the_fused_backward_with_kernel_torch(mode):
    """The Ring itself (one rank, loop-back exchange): --kernel torch builds FusedBackward, native BlockBackward."""
    from ringbench.engine.ring import Ring
    from ringbench.kernels.torch_kernel import FusedBackward

    q, k, v, do = make_grad(40, 4, 2, 16)
    ref = reference_grad(q, k, v, do, causal=True, dtype="float32")
    for name, cls in (("torch", FusedBackward), ("native", BlockBackward)):
        cfg = RunConfig(seq_len=40, heads=4, kv_heads=2, head_dim=16, causal=True, mode=mode, kernel=name, pass_="fwd+bwd")
        ring = Ring(cfg, BACKEND, LoopBack(), 0, 1, *(x.astype(np.float32) for x in (q, k, v)), do=do.astype(np.float32))
        ring.prepare_backward()
        ring.backward()
        assert type(ring.block_backward) is cls
        assert_close(ring.grads(), ref, TOLERANCE_BWD["float32"])


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_torch_ring_backward_other_dtypes(dtype):
    q, k, v, do = make_grad(72, 4, 2, 16)
    got = emulate_ring_backward(q, k, v, do, nranks=3, layout="striped", causal=True, dtype=dtype)
    assert_close(got, reference_grad(q, k, v, do, causal=True, dtype=dtype), TOLERANCE_BWD[dtype])


@needs_torch
def test_torch_backward_accumulates_in_float32_and_checks_the_accumulators():
    from ringbench.kernels.torch_kernel import FusedBackward

    f16 = BACKEND.dtype("bfloat16")
    rng = np.random.default_rng(5)
    qh, doh, o = (rng.standard_normal((2, 2, 16, 8)).astype(f16) for _ in range(3))
    lse = np.full((2, 2, 16), 3.0, np.float32)
    kh, vh = (rng.standard_normal((2, 16, 8)).astype(f16) for _ in range(2))
    bwd = FusedBackward(BACKEND, qh, doh, o, lse, dtype=f16)
    assert bwd.dtype == np.float32 and bwd.dq().dtype == np.float32 and bwd.dq(f16).dtype == f16
    with pytest.raises(ValueError, match="dk_acc must be float32"):
        bwd.update(kh, vh, np.zeros(kh.shape, f16), np.zeros(kh.shape, np.float32), [Piece(0, 16, 0, 16)])
    dk, dv = np.zeros(kh.shape, np.float32), np.zeros(kh.shape, np.float32)
    bwd.update(kh, vh, dk, dv, [Piece(0, 16, 0, 16, STRICT), Piece(0, 0, 0, 16)])  # an empty piece is skipped
    assert np.isfinite(dk).all() and np.abs(dk[:, :15]).min() > 0 and not dk[:, 15].any()  # key 15 is hidden under STRICT
    with pytest.raises(ValueError, match="CPU only"):
        FusedBackward(types.SimpleNamespace(is_gpu=True, xp=np), qh, doh, o, lse, dtype=f16)


def test_kernel_is_a_config_field_and_leaves_native_ids_alone():
    import hashlib
    import json

    assert coerce("kernel", "torch") == "torch"
    with pytest.raises(Exception, match="expected one of native, torch, flash-attn"):
        coerce("kernel", "cudnn")
    cfg = RunConfig(seq_len=512, causal=True)
    # the id of a native point is the hash of the fields it had before `kernel` (and pass, ulysses_degree) existed
    old = {k: v for k, v in cfg.to_dict().items() if k not in RunConfig.NON_IDENTITY and k not in RunConfig.ADDED_IDENTITY}
    old["nranks"] = 2
    digest = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert point_id(cfg, 2).endswith(digest[: len(point_id(cfg, 2).rsplit("-", 1)[1])])
    assert point_id(RunConfig(seq_len=512, causal=True, kernel="torch"), 2) != point_id(cfg, 2)


def test_refusals_name_the_kernel_and_the_reason(monkeypatch):
    from ringbench.kernels import torch_kernel

    cpu = types.SimpleNamespace(is_gpu=False)
    gpu = types.SimpleNamespace(is_gpu=True)
    assert torch_kernel.unavailable("native", cpu, "float64") is None
    assert "CUDA GPUs only" in torch_kernel.unavailable("flash-attn", cpu, "float16")
    if not HAVE_TORCH:
        assert "pip install 'ringbench[torch]'" in torch_kernel.unavailable("torch", cpu, "float32")
        return
    import torch

    assert torch_kernel.unavailable("torch", cpu, "bfloat16") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sees no CUDA device" in torch_kernel.unavailable("torch", gpu, "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = torch_kernel.unavailable("torch", gpu, "float64")
    assert why.startswith("--kernel torch on CUDA does not take --dtype float64; allowed: float32")
    assert torch_kernel.unavailable("torch", cpu, "bfloat16", backward=True) is None
    assert "runs on the CPU only" in torch_kernel.unavailable("torch", gpu, "float32", backward=True)
    assert "forward pass only" in torch_kernel.unavailable("flash-attn", gpu, "float16", backward=True)
    assert "CUDA GPUs only" in torch_kernel.unavailable("flash-attn", cpu, "float16", backward=True)


# ---------------------------------------------------------------------------------------------
# for real, under mpiexec
# ---------------------------------------------------------------------------------------------
SMALL = ["--heads", 4, "--head-dim", 16, "--repeat", 2, "--warmup", 1, "--quiet", "--check"]


@needs_torch
@pytest.mark.mpi
@pytest.mark.parametrize(
    "nranks,layout,extra",
    [
        (1, "contiguous", []),
        (2, "zigzag", ["--kv-heads", 2]),
        (3, "striped", ["--dtype", "bfloat16", "--kv-heads", 1]),
        (3, "zigzag", ["--mode", "blocking", "--dtype", "float64"]),
    ],
)
def test_run_with_torch_kernel_is_checked(nranks, layout, extra, tmp_path):
    from ringbench import store

    out = tmp_path / "r.h5"
    res = mpiexec(
        nranks, "run", *SMALL, "--kernel", "torch", "--causal", "--layout", layout, "--seq-len", 48 * nranks, "--out", out, *extra
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = store.read(out)
    assert run.check["passed"] and run.config["kernel"] == "torch"
    assert run.provenance["blas"].startswith("torch ") and "flash_attention_for_cpu" in run.provenance["blas"]


PHASES = ["fwd+bwd", "bwd"]


@pytest.fixture(scope="module")
def torch_backward_runs(tmp_path_factory):
    common = [*SMALL, "--kernel", "torch", "--causal", "--layout", "zigzag", "--kv-heads", 2, "--seq-len", 256]
    return Batch(tmp_path_factory.mktemp("torch-bwd"), lambda nranks: {ph: ["--pass", ph] for ph in PHASES}, common)


@needs_torch
@pytest.mark.mpi
@pytest.mark.parametrize("phases", PHASES)
def test_run_backward_with_torch_kernel_is_checked(phases, torch_backward_runs):
    run = torch_backward_runs.run(2, phases)
    assert run.config["kernel"] == "torch" and run.config["pass"] == phases and run.phases() == phases.split("+")
    assert run.bwd.check["passed"] and all(run.phase(ph).check["passed"] for ph in run.phases())
    for name in ("dq", "dk", "dv"):
        assert 0 < run.bwd.check[f"{name}_rel_err"] < TOLERANCE_BWD["float32"]


@pytest.mark.mpi
def test_flash_attn_on_numpy_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(2, "run", "--seq-len", 64, "--kernel", "flash-attn", "--out", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringbench run: --kernel flash-attn runs on CUDA GPUs only"), res.stderr
    assert not out.exists()


@pytest.mark.mpi
def test_torch_kernel_without_torch_is_refused(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('hidden by the test')\n")
    from conftest import ROOT

    res = mpiexec(2, "run", "--seq-len", 64, "--kernel", "torch", env={"PYTHONPATH": f"{fake}:{ROOT}"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringbench run: --kernel torch needs PyTorch: pip install 'ringbench[torch]'"), (
        res.stderr
    )


@needs_torch
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_and_flash_attn_call_wrappers_on_cpu_stand_ins(causal, dtype):
    """The CUDA paths' GQA handling (fold / repeat) and layouts, with CPU stand-ins that keep the CUDA ops' rules."""
    import torch

    from ringbench.kernels import torch_kernel

    cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def flash(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
        assert q.shape[1] == k.shape[1], "CUDA flash attention takes equal head counts"
        return cpu(q, k, v, dropout_p, is_causal, scale=scale) + (None,) * 7

    def efficient(q, k, v, bias, compute_lse, dropout_p, is_causal, *, scale):
        assert q.shape[1] == k.shape[1] and compute_lse
        o, lse = cpu(q, k, v, dropout_p, is_causal, scale=scale)
        pad = torch.full(lse.shape[:2] + (32 - lse.shape[2] % 32,), float("nan"))  # its lse is padded along the queries
        return o, torch.cat([lse, pad], -1), None, None

    def flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, return_attn_probs):  # (batch, seq, heads, D), GQA
        assert q.stride(-1) == 1 and return_attn_probs
        o, lse = cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal, scale=softmax_scale)
        return o.transpose(1, 2), lse, None

    aten = types.SimpleNamespace(_scaled_dot_product_flash_attention=flash, _scaled_dot_product_efficient_attention=efficient)
    tdt = {"float32": torch.float32, "float16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(3, 2, 40, 16, generator=g) * 0.25).to(tdt)[:, :, 5:37]  # a piece's rows: a strided view
    k, v = (torch.randn(3, 1, 32, 16, generator=g).to(tdt) for _ in range(2))
    o_ref, l_ref = cpu(q, k, v, 0.0, causal, scale=1.0)
    for call in (torch_kernel.cuda_call(torch, tdt, aten), torch_kernel.flash_attn_call(flash_attn_func)):
        o, lse = call(q, k, v, causal)
        assert o.shape == q.shape and lse.shape == q.shape[:3]
        torch.testing.assert_close(o, o_ref, rtol=0, atol=2e-3 if dtype == "float16" else 1e-6)
        torch.testing.assert_close(lse, l_ref, rtol=1e-5, atol=1e-5)


def test_experiment_files_sweep_the_kernel(tmp_path):
    import textwrap

    from ringbench.sweeps import experiment
    from ringbench.sweeps.experiment import ExperimentError

    path = tmp_path / "k.yaml"
    path.write_text(textwrap.dedent("""
        name: kernels
        base: {seq_len: 256, heads: 4}
        matrix:
          kernel: [native, torch]
        ranks: [2]
    """).lstrip())  # fmt: skip
    exp = experiment.load(path)
    assert [p.config.kernel for p in exp.points] == ["native", "torch"]
    assert len({p.id for p in exp.points}) == 2
    path.write_text(path.read_text().replace("torch]", "cudnn]"))
    with pytest.raises(ExperimentError, match=r"matrix\.kernel\[1\]: expected one of native, torch, flash-attn"):
        experiment.load(path)
