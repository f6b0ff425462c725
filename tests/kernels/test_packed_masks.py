"""Packed documents and sliding windows in the kernels: every rank's step plans run in one process (no MPI), the
native forward and backward (every exponential, small tiles so that tiles are skipped, masked and whole), and the
torch kernel where it imports, against the float64 reference with the same mask (reference.hidden_keys)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ringbench import layout
from ringbench.engine.backend import get_backend
from ringbench.kernels import api, backward, kernel
from ringbench.kernels.reference import TOLERANCE, TOLERANCE_BWD, hidden_keys, reference_attention, reference_attention_grad, rel_err
from ringbench.kernels.torch_kernel import unavailable

BACKEND = get_backend("numpy")


def _case(rng: random.Random, name: str):
    """A random (P, N, docs, window) the layout takes: odd document lengths, windows from 1 to beyond N."""
    nranks = rng.randint(1, 4)
    unit = 2 * nranks if name == "doc-zigzag" else 1
    m = rng.randint(3, 9)
    n_total = 2 * nranks * m
    k = n_total // unit
    cuts = sorted(rng.sample(range(1, k), rng.randint(1, min(4, k - 1))))
    bounds = [0] + cuts + [k]
    docs = tuple((b - a) * unit for a, b in zip(bounds[:-1], bounds[1:]))
    window = rng.choice([0, 2, 3, 7, n_total + 5])  # (W = 1: dQ and dK are 0, the reference only rounding noise)
    return nranks, n_total, docs, window


def _inputs(seed: int, n_total: int, dtype):
    rng = np.random.default_rng(seed)
    b, h, hk, d = 2, 4, 2, 5  # GQA 2, odd head dim
    q, do = (rng.standard_normal((b, n_total, h, d)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((b, n_total, hk, d)).astype(dtype) for _ in range(2))
    return q, k, v, do


def _ring(name, nranks, n_total, docs, window, q, k, v, do, make_fwd, make_bwd):
    """Every rank's forward and backward over its step plans, the blocks in ring order: (O, dQ, dK, dV) global."""
    n = n_total // nranks
    b, _, h, d = q.shape
    hk = k.shape[2]
    st = q.dtype
    compute = kernel.compute_dtype(st)
    pos = [layout.positions(name, r, nranks, n_total, docs, window) for r in range(nranks)]
    blocks = [(kernel.kv_to_heads(np, k[:, p]), kernel.kv_to_heads(np, v[:, p])) for p in pos]
    out, dq = np.zeros(q.shape), np.zeros(q.shape)
    dk, dv = (np.zeros((nranks, b * hk, n, d), compute) for _ in range(2))
    for r in range(nranks):
        qh = kernel.q_to_heads(np, q[:, pos[r]], hk, compute)
        fwd = make_fwd(qh, n)
        fwd.reset()
        plans = [layout.step_plan(name, r, (r - s) % nranks, nranks, n, True, docs, window) for s in range(nranks)]
        for s in range(nranks):
            fwd.update(*blocks[(r - s) % nranks], plans[s])
        o, lse = fwd.finalize(st)
        out[:, pos[r]] = kernel.heads_to_out(o, b)
        bwd = make_bwd(qh * compute.type(kernel.softmax_scale(d)), kernel.q_to_heads(np, do[:, pos[r]], hk), o, lse)
        bwd.reset()
        for s in range(nranks):
            src = (r - s) % nranks
            bwd.update(*blocks[src], dk[src], dv[src], plans[s])
        dq[:, pos[r]] = kernel.heads_to_out(bwd.dq(st), b)
    dk_g, dv_g = np.zeros(k.shape), np.zeros(k.shape)
    for r in range(nranks):
        dk_g[:, pos[r]] = backward.heads_to_kv(dk[r], b)
        dv_g[:, pos[r]] = backward.heads_to_kv(dv[r], b)
    return out, dq, dk_g, dv_g


def _check(got, q, k, v, do, docs, window, dtype):
    allpos = np.arange(q.shape[1])
    ref = reference_attention(q, k, v, causal=True, q_pos=allpos, k_pos=allpos, docs=docs, window=window)
    assert rel_err(got[0], ref) <= TOLERANCE[dtype]
    want = reference_attention_grad(q, k, v, do, causal=True, q_pos=allpos, k_pos=allpos, docs=docs, window=window)
    for label, g, w in zip(("dq", "dk", "dv"), got[1:], want):
        assert rel_err(g, w) <= TOLERANCE_BWD[dtype], label


def _native(exp: str, tile_q: int, tile_k: int):
    def fwd(qh, n):
        return kernel.OnlineSoftmax(np, qh, tile_q=tile_q, tile_k=tile_k, head_chunk=1, exp=exp, scale=kernel.softmax_scale(qh.shape[3]))

    def bwd(qh, doh, o, lse):
        return backward.BlockBackward(np, qh, doh, o, lse, tile_q=tile_q, tile_k=tile_k, head_chunk=3, exp_base=exp)

    return fwd, bwd


def _exps():
    out = ["2", "e"]
    if kernel.fused_module() is not None:
        out.append("fused")
    return out


@pytest.mark.parametrize("name", layout.DOC_LAYOUTS)
@pytest.mark.parametrize("exp", _exps())
def test_native_kernel_with_documents_and_windows_matches_float64(name, exp):
    rng = random.Random(f"{name}-{exp}")
    for trial in range(4):
        nranks, n_total, docs, window = _case(rng, name)
        dtype = rng.choice(["float32", "float64"])
        q, k, v, do = _inputs(trial, n_total, np.dtype(dtype))
        fwd, bwd = _native(exp, rng.randint(1, 5), rng.randint(1, 6))
        got = _ring(name, nranks, n_total, docs, window, q, k, v, do, fwd, bwd)
        _check(got, q, k, v, do, docs, window, dtype)


def test_hidden_keys_is_documents_causal_and_window():
    pos = np.arange(6)
    hide = hidden_keys(pos, pos, causal=True, docs=(2, 4), window=2)
    vis = [np.flatnonzero(~row).tolist() for row in hide]
    assert vis == [[0], [0, 1], [2], [2, 3], [3, 4], [4, 5]]
    assert hidden_keys(pos, pos, causal=False) is None
    assert hidden_keys(pos, pos, causal=False, docs=(3, 3))[0].tolist() == [False] * 3 + [True] * 3


@pytest.mark.parametrize("name", ["torch"])
def test_torch_kernel_with_documents_and_windows_matches_float64(name):
    why = unavailable(name, BACKEND, "float32", backward=True)
    if why:
        pytest.skip(str(why))
    rng = random.Random(name)
    for trial in range(6):
        lay = rng.choice(layout.DOC_LAYOUTS)
        nranks, n_total, docs, window = _case(rng, lay)
        q, k, v, do = _inputs(trial, n_total, np.dtype("float32"))
        st = q.dtype

        def fwd(qh, n, st=st):
            return api.make_forward(BACKEND, qh, n, scale=kernel.softmax_scale(qh.shape[3]), kernel_name=name, storage=st)

        def bwd(qh, doh, o, lse, st=st):
            return api.make_backward(BACKEND, qh, doh, o, lse, kernel_name=name, storage=st)

        got = _ring(lay, nranks, n_total, docs, window, q, k, v, do, fwd, bwd)
        _check(got, q, k, v, do, docs, window, "float32")


def test_sdpa_parts_cover_a_band_exactly_once():
    """The torch kernel's calls for a piece: every visible pair once, no hidden pair (a masked call's mask removes its)."""
    from ringbench.kernels.torch_kernel import sdpa_parts

    rng = random.Random(3)
    for _ in range(300):
        nq, nk = rng.randint(1, 40), rng.randint(1, 40)
        w = rng.choice([0, 0, 1, 2, 5, 17])
        piece = layout.Piece(3, 3 + nq, 5, 5 + nk, layout.BAND, rng.randint(-nq, nk), w)
        lo, hi = layout.key_bounds(piece, np.arange(nq))
        want = np.zeros((nq, nk), int)
        for i in range(nq):
            want[i, lo[i] : hi[i]] = 1
        got = np.zeros((nq, nk), int)
        for q0, q1, k0, k1, causal, bnd in sdpa_parts(piece, rows=rng.randint(1, 9)):
            assert q1 > q0 and k1 > k0
            vis = np.ones((q1 - q0, k1 - k0), bool)
            if causal:
                assert q1 - q0 == k1 - k0
                vis = np.tril(vis)
            if bnd is not None:
                vis &= ~layout.band_hidden(bnd[0], bnd[1], np.arange(q1 - q0)[:, None], np.arange(k1 - k0)[None, :])
            got[q0 - 3 : q1 - 3, k0 - 5 : k1 - 5] += vis
        np.testing.assert_array_equal(got, want, err_msg=str(piece))
