"""The blockwise kernel and the layouts together, against a float64 reference, without MPI.

Each case emulates a full ring on one process: every rank's queries meet every rank's K/V block in
ring order, through the same step plans the MPI ring uses.
"""

import numpy as np
import pytest

from ringbench.engine.backend import get_backend
from ringbench.harness import inputs
from ringbench.kernels import kernel, reference
from ringbench.layout import LAYOUTS, Piece, positions, step_plan

from conftest import to_host

# max |out - ref| / max |ref| allowed per storage dtype (the output is rounded to the storage dtype)
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
BACKEND = get_backend("numpy")


def make(seq_len, heads, kv_heads, head_dim, batch=2, seed=1):
    dims = dict(batch=batch, seq_len=seq_len, head_dim=head_dim)
    allpos = np.arange(seq_len)
    return (
        inputs.tokens("q", seed, allpos, heads=heads, **dims),
        inputs.tokens("k", seed, allpos, heads=kv_heads, **dims),
        inputs.tokens("v", seed, allpos, heads=kv_heads, **dims),
    )


def emulate_ring(q, k, v, *, nranks, layout, causal, dtype, tile_q=None, head_chunk=1, matmul=None, xp=np):
    """Global output assembled from each emulated rank's ring pass (on the array module ``xp``), in global token order."""
    b, n_total, h, d = q.shape
    hk = k.shape[2]
    n = n_total // nranks
    storage = BACKEND.dtype(dtype)
    compute = BACKEND.compute_dtype(storage)
    out = np.zeros(q.shape, np.float64)
    for r in range(nranks):
        pos = positions(layout, r, nranks, n_total)
        qh = kernel.q_to_heads(xp, xp.asarray(q[:, pos].astype(storage)), hk, compute) * compute.type(kernel.softmax_scale(d))
        st = kernel.OnlineSoftmax(xp, qh, head_chunk=head_chunk, tile_q=tile_q, matmul=matmul)
        for s in range(nranks):
            src = (r - s) % nranks
            kp = positions(layout, src, nranks, n_total)
            kb = kernel.kv_to_heads(xp, xp.asarray(k[:, kp].astype(storage)), compute)
            vb = kernel.kv_to_heads(xp, xp.asarray(v[:, kp].astype(storage)), compute)
            st.update(kb, vb, step_plan(layout, r, src, nranks, n, causal))
        o, lse = st.finalize(storage)
        out[:, pos] = to_host(kernel.heads_to_out(o, b))
    return out


def matmuls():
    """The GEMM providers the kernel can run on here: NumPy's always, MKL's where installed."""
    from ringbench.kernels.mkl import MklMatmul

    mkl = MklMatmul.load()
    return [
        pytest.param(None, id="numpy"),
        pytest.param(mkl, id="mkl", marks=pytest.mark.skipif(mkl is None, reason="Intel MKL not installed")),
    ]


def rel_err(out, ref):
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_ring_matches_reference_float32(nranks, layout, causal, heads, kv_heads, xp):
    q, k, v = make(48 * nranks, heads, kv_heads, 16)
    ref = reference.reference_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), causal=causal)
    out = emulate_ring(q, k, v, nranks=nranks, layout=layout, causal=causal, dtype="float32", tile_q=16, xp=xp)
    assert rel_err(out, ref) < TOL["float32"]


@pytest.mark.parametrize("matmul", matmuls())
@pytest.mark.parametrize("dtype", BACKEND.dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_within_tolerance(dtype, layout, matmul, xp):
    if xp is not np and (matmul is not None or dtype == "bfloat16"):
        pytest.skip("MKL and bfloat16 are NumPy-only")
    q, k, v = make(96, 4, 2, 32)
    st = BACKEND.dtype(dtype)
    ref = reference.reference_attention(q.astype(st), k.astype(st), v.astype(st), causal=True)
    out = emulate_ring(q, k, v, nranks=3, layout=layout, causal=True, dtype=dtype, tile_q=7, matmul=matmul, xp=xp)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{dtype}: {err:.2e} >= {TOL[dtype]:.0e}"
    assert err > 0 or dtype == "float64"  # the comparison really compares


@pytest.mark.parametrize("tile_q,head_chunk", [(None, None), (1, 1), (5, 2), (64, 3)])
def test_tiling_does_not_change_the_result(tile_q, head_chunk, xp):
    q, k, v = make(64, 6, 3, 8, batch=1)
    ref = reference.reference_attention(q, k, v, causal=True)
    out = emulate_ring(q, k, v, nranks=2, layout="zigzag", causal=True, dtype="float64", tile_q=tile_q, head_chunk=head_chunk, xp=xp)
    assert rel_err(out, ref) < TOL["float64"]


def test_large_logits_do_not_overflow(xp):
    q, k, v = make(64, 2, 2, 16)
    q, k = q * 60.0, k * 60.0  # logits of order 1e4: exp would overflow without the running max
    # float32 scores of size 1e4 carry absolute rounding errors of ~1e-3: only float64 stays tight
    for dtype, tol in (("float32", 1e-2), ("float64", 1e-10)):
        st = BACKEND.dtype(dtype)
        ref = reference.reference_attention(q.astype(st), k.astype(st), v.astype(st), causal=True)
        out = emulate_ring(q, k, v, nranks=4, layout="striped", causal=True, dtype=dtype, tile_q=8, xp=xp)
        assert np.isfinite(out).all()
        assert rel_err(out, ref) < tol


def test_fully_masked_rows_give_zero_not_nan(xp):
    rng = np.random.default_rng(0)
    qh = xp.asarray(rng.standard_normal((1, 1, 8, 4)))
    kh = xp.asarray(rng.standard_normal((1, 8, 4)))
    st = kernel.OnlineSoftmax(xp, qh.copy(), tile_q=3)
    st.update(kh, kh, [Piece(0, 8, 0, 8, "strict")])  # row 0 sees no key at all
    out, lse = map(to_host, st.finalize())
    assert np.isfinite(out).all() and np.all(out[0, 0, 0] == 0) and lse[0, 0, 0] == -np.inf
    assert np.isfinite(lse[0, 0, 1:]).all()
    st.update(kh, kh, [])  # a skipped step changes nothing
    np.testing.assert_array_equal(to_host(st.finalize()[0]), out)


def test_merge_of_two_key_halves_equals_full_attention():
    q, k, v = make(32, 2, 2, 8, batch=1)
    qh = kernel.q_to_heads(np, q, 2) * kernel.softmax_scale(8)
    kh, vh = kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v)
    parts = []
    for sl in (slice(0, 12), slice(12, 32)):
        st = kernel.OnlineSoftmax(np, qh)
        st.update(kh[:, sl], vh[:, sl], [Piece(0, 32, 0, sl.stop - sl.start)])
        parts.append(st.finalize())
    out, lse = kernel.merge(np, *parts[0], *parts[1])
    full = kernel.OnlineSoftmax(np, qh)
    full.update(kh, vh, [Piece(0, 32, 0, 32)])
    want_out, want_lse = full.finalize()
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    # a side that saw nothing has weight zero, and two empty sides stay finite
    empty = (np.zeros_like(out), np.full_like(lse, -np.inf))
    np.testing.assert_allclose(kernel.merge(np, *empty, out, lse)[0], out)
    both = kernel.merge(np, *empty, *empty)
    assert np.all(both[0] == 0) and np.all(both[1] == -np.inf)
    # large log-sum-exps merge without overflow
    big = kernel.merge(np, out, lse + 1e4, out, lse + 1e4 - 1.0)
    assert np.isfinite(big[0]).all()


def test_flops_count_only_unmasked_pairs():
    assert kernel.flops(1, 1, 64, 10) == 4 * 64 * 10
