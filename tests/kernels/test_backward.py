"""The block-pair backward kernel, with the forward that feeds it, against float64 reference gradients, without MPI.

Each case emulates the ring backward on one process exactly as the MPI ring will run it: every rank runs the
real forward (OnlineSoftmax over its step plans) for O and the log-sum-exp, then, at step s, rank r holds the
K/V block of src = (r - s) mod P together with that block's dK/dV accumulators, adds its share, and passes
both on; after the last step one more hop brings every accumulator home.
"""

import numpy as np
import pytest
from test_kernel import make as make_qkv

from ringbench.engine.backend import MklMatmul, get_backend
from ringbench.harness import inputs
from ringbench.kernels import backward, kernel
from ringbench.kernels.backward import BlockBackward, heads_to_kv
from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention, reference_attention_grad
from ringbench.layout import CAUSAL, FULL, LAYOUTS, STRICT, Piece, positions, step_plan

BACKEND = get_backend("numpy")


def make(seq_len, heads, kv_heads, head_dim, batch=2, seed=1):
    """q, k, v (test_kernel.make) and the upstream gradient dO, from the counter-based global inputs (any P, any layout).
    inputs knows only q, k and v: dO is the q tensor of the next seed (its hash key, (seed+1)*3, is none of this
    seed's three), independent of q, k and v."""
    dims = dict(batch=batch, seq_len=seq_len, head_dim=head_dim)
    return make_qkv(seq_len, heads, kv_heads, head_dim, batch, seed) + (
        inputs.tokens("q", seed + 1, np.arange(seq_len), heads=heads, **dims),
    )


def emulate_ring(
    q, k, v, do, *, nranks, layout, causal, dtype, tile_q=None, tile_k=None, head_chunk=None, matmul=None, on_tile=None, exp_base=None
):
    """Global (dq, dk, dv) in float64 from each emulated rank's ring forward and backward, cast to the storage dtype
    first (as the ring returns them), in global token order."""
    b, n_total, h, d = q.shape
    hk = k.shape[2]
    n = n_total // nranks
    storage = BACKEND.dtype(dtype)
    compute = BACKEND.compute_dtype(storage)
    pos = [positions(layout, r, nranks, n_total) for r in range(nranks)]
    kv = [(kernel.kv_to_heads(np, k[:, p].astype(storage), compute), kernel.kv_to_heads(np, v[:, p].astype(storage), compute)) for p in pos]
    plans = [[step_plan(layout, r, (r - s) % nranks, nranks, n, causal) for s in range(nranks)] for r in range(nranks)]
    tiles = dict(tile_q=tile_q, tile_k=tile_k, head_chunk=head_chunk, matmul=matmul)
    ranks = []
    for r in range(nranks):
        qh = kernel.q_to_heads(np, q[:, pos[r]].astype(storage), hk, compute) * compute.type(kernel.softmax_scale(d))  # (Z, G, n, D)
        fwd = kernel.OnlineSoftmax(np, qh.copy(), **tiles)
        for s in range(nranks):
            fwd.update(*kv[(r - s) % nranks], plans[r][s])
        o, lse = fwd.finalize(storage)  # O is stored in the storage dtype, the LSE in the compute dtype
        doh = kernel.q_to_heads(np, do[:, pos[r]].astype(storage), hk)
        ranks.append(BlockBackward(np, qh, doh, o, lse, on_tile=on_tile, exp_base=exp_base, **tiles))
    # held[r]: (block id, dK accumulator, dV accumulator) on rank r, float32 for half precision
    held = [(r, np.zeros(kv[r][0].shape, compute), np.zeros(kv[r][0].shape, compute)) for r in range(nranks)]
    for s in range(nranks):
        for r in range(nranks):
            src, dk_acc, dv_acc = held[r]
            assert src == (r - s) % nranks  # the accumulators travel with their K/V block
            ranks[r].update(*kv[src], dk_acc, dv_acc, plans[r][s])
        held = [held[(r - 1) % nranks] for r in range(nranks)]  # one hop to the next rank
    assert [src for src, _, _ in held] == list(range(nranks))  # P hops: every accumulator is home
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for r in range(nranks):
        dq[:, pos[r]] = kernel.heads_to_out(ranks[r].dq(storage), b)
        dk[:, pos[r]] = heads_to_kv(held[r][1].astype(storage), b)
        dv[:, pos[r]] = heads_to_kv(held[r][2].astype(storage), b)
    return dq, dk, dv


def reference(q, k, v, do, *, causal, dtype):
    """Float64 gradients of the inputs rounded to the storage dtype."""
    st = BACKEND.dtype(dtype)
    return reference_attention_grad(q.astype(st), k.astype(st), v.astype(st), do.astype(st), causal=causal)


def rel_errs(got, want):
    """max |got - want| / max |want| for dq, dk, dv."""
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want)]


def assert_close(got, want, tol):
    assert all(np.isfinite(x).all() for x in got)
    errs = rel_errs(got, want)
    assert max(errs) < tol, f"dq, dk, dv relative errors {errs} >= {tol:.0e}"
    return errs


def matmuls():
    """The GEMM providers the kernel can run on here: NumPy's always, MKL's where installed."""
    mkl = MklMatmul.load()
    return [
        pytest.param(None, id="numpy"),
        pytest.param(mkl, id="mkl", marks=pytest.mark.skipif(mkl is None, reason="Intel MKL not installed")),
    ]


# ---------------------------------------------------------------------------------------------
# The float64 reference itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradients_match_finite_differences(causal):
    """Directional derivatives of L = sum(attention(q, k, v) * dO) against the reference's gradients."""
    q, k, v, do = make(12, 4, 2, 8, batch=1)
    grads = reference_attention_grad(q, k, v, do, causal=causal, chunk=5)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for i, g in enumerate(grads):
        direction = rng.standard_normal(g.shape)
        plus, minus = [q, k, v], [q, k, v]
        plus[i], minus[i] = plus[i] + eps * direction, minus[i] - eps * direction
        loss = [np.sum(reference_attention(*x, causal=causal) * do) for x in (plus, minus)]
        numeric = (loss[0] - loss[1]) / (2 * eps)
        assert abs(np.sum(g * direction) - numeric) < 1e-7 * max(1.0, abs(numeric))


def test_reference_rows_with_no_visible_key_give_zero():
    q, k, v, do = make(6, 2, 1, 4, batch=1)
    pos = np.arange(6)
    dq, dk, dv = reference_attention_grad(q, k, v, do, causal=True, q_pos=pos, k_pos=pos + 1)  # row 0 sees nothing
    assert np.all(dq[:, 0] == 0) and np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    assert np.all(dk[:, 5] == 0) and np.all(dv[:, 5] == 0)  # key 5 (position 6) is seen by no query
    assert np.abs(dq[:, 2:]).sum(axis=-1).min() > 1e-6  # (row 1 sees one key: softmax 1, dq 0 up to rounding)


# ---------------------------------------------------------------------------------------------
# The ring backward, emulated
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_ring_backward_matches_reference_float64(nranks, layout, causal, heads, kv_heads):
    q, k, v, do = make(24 * nranks, heads, kv_heads, 16)
    got = emulate_ring(q, k, v, do, nranks=nranks, layout=layout, causal=causal, dtype="float64", tile_q=5, tile_k=7)
    assert_close(got, reference(q, k, v, do, causal=causal, dtype="float64"), TOLERANCE_BWD["float64"])


@pytest.mark.parametrize("nranks", [1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_ring_backward_matches_reference_float32(nranks, layout, heads, kv_heads):
    q, k, v, do = make(32 * nranks, heads, kv_heads, 16)
    got = emulate_ring(q, k, v, do, nranks=nranks, layout=layout, causal=True, dtype="float32", tile_q=8)
    assert_close(got, reference(q, k, v, do, causal=True, dtype="float32"), TOLERANCE_BWD["float32"])


@pytest.mark.parametrize("exp_base", ["2", "e"])
@pytest.mark.parametrize("matmul", matmuls())
@pytest.mark.parametrize("dtype", BACKEND.dtypes())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_within_tolerance(dtype, layout, matmul, exp_base):
    q, k, v, do = make(96, 4, 2, 32)
    got = emulate_ring(
        q, k, v, do, nranks=3, layout=layout, causal=True, dtype=dtype, tile_q=7, tile_k=12, matmul=matmul, exp_base=exp_base
    )
    errs = assert_close(got, reference(q, k, v, do, causal=True, dtype=dtype), TOLERANCE_BWD[dtype])
    assert min(errs) > 0 or dtype == "float64"  # the comparison really compares


def test_tolerances_cover_every_dtype():
    assert set(TOLERANCE_BWD) == {"float64", "float32", "float16", "bfloat16"}
    assert TOLERANCE_BWD["float64"] <= 1e-10


@pytest.mark.parametrize(
    "tile_q,tile_k,head_chunk",
    [(None, None, None), (1, 1, 1), (5, 3, 2), (6, 12, 3), (64, 7, 1), (3, 64, 6)],
)
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_tiling_does_not_change_the_result(tile_q, tile_k, head_chunk, layout):
    """Tiles smaller and larger than the pieces, tiles that cross the causal diagonal, several heads at once."""
    q, k, v, do = make(48, 6, 3, 8, batch=1)
    got = emulate_ring(
        q, k, v, do, nranks=2, layout=layout, causal=True, dtype="float64", tile_q=tile_q, tile_k=tile_k, head_chunk=head_chunk
    )
    assert_close(got, reference(q, k, v, do, causal=True, dtype="float64"), TOLERANCE_BWD["float64"])


@pytest.mark.parametrize("exp_base", ["2", "e"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 3e-2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_logits_give_finite_gradients(dtype, tol, layout, exp_base):
    """q and k scaled by 100: logits of order 1e4. The saved LSE keeps every P <= 1; float32 scores of that size
    carry absolute rounding errors of ~1e-3, hence the looser float32 bound (the forward's test has the same)."""
    q, k, v, do = make(64, 2, 2, 16)
    q, k = q * 100.0, k * 100.0
    got = emulate_ring(q, k, v, do, nranks=4, layout=layout, causal=True, dtype=dtype, tile_q=8, tile_k=8, exp_base=exp_base)
    assert_close(got, reference(q, k, v, do, causal=True, dtype=dtype), tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fully_masked_pieces_one_token_per_rank(dtype):
    """Striped causal with one token per rank: every step with src > r is a 1 x 1 STRICT piece, masked entirely."""
    q, k, v, do = make(4, 2, 1, 8)
    assert step_plan("striped", 0, 1, 4, 1, True) == [Piece(0, 1, 0, 1, STRICT)]
    got = emulate_ring(q, k, v, do, nranks=4, layout="striped", causal=True, dtype=dtype)
    assert_close(got, reference(q, k, v, do, causal=True, dtype=dtype), TOLERANCE_BWD[dtype])


@pytest.mark.parametrize("exp_base", ["2", "e"])
@pytest.mark.parametrize("tile_q,tile_k", [(None, None), (1, 1), (3, 4)])
def test_rows_that_saw_no_key_get_exactly_zero(tile_q, tile_k, exp_base):
    """A STRICT block alone: query 0 sees no key, its LSE is -inf. Its dQ is exactly 0, no NaN anywhere, and
    the last key (seen by no query) gets exactly zero dK and dV."""
    q, k, v, do = make(8, 2, 2, 4, batch=1)
    qh = kernel.q_to_heads(np, q, 2) * kernel.softmax_scale(4)
    kh, vh, doh = kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v), kernel.q_to_heads(np, do, 2)
    fwd = kernel.OnlineSoftmax(np, qh.copy(), tile_q=tile_q, tile_k=tile_k)
    pieces = [Piece(0, 8, 0, 8, STRICT)]
    fwd.update(kh, vh, pieces)
    o, lse = fwd.finalize()
    assert np.all(lse[..., 0] == -np.inf)
    bwd = BlockBackward(np, qh, doh, o, lse, tile_q=tile_q, tile_k=tile_k, exp_base=exp_base)
    dk, dv = np.zeros_like(kh), np.zeros_like(vh)
    bwd.update(kh, vh, dk, dv, pieces)
    dq = bwd.dq()
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    assert np.all(dq[:, :, 0] == 0) and np.all(dk[:, 7] == 0) and np.all(dv[:, 7] == 0)
    pos = np.arange(8)
    want = reference_attention_grad(q, k, v, do, causal=True, q_pos=pos, k_pos=pos + 1)
    got = (kernel.heads_to_out(dq, 1), heads_to_kv(dk, 1), heads_to_kv(dv, 1))
    assert_close(got, want, TOLERANCE_BWD["float64"])


def test_pieces_of_a_zigzag_step_and_skipped_steps():
    """Several pieces over one block add up like plain causal attention on it; an empty plan changes nothing."""
    q, k, v, do = make(24, 2, 1, 8, batch=1)
    qh = kernel.q_to_heads(np, q, 1) * kernel.softmax_scale(8)
    kh, vh, doh = kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v), kernel.q_to_heads(np, do, 1)
    pieces = [Piece(0, 12, 0, 12, CAUSAL), Piece(12, 24, 0, 12, FULL), Piece(12, 24, 12, 24, CAUSAL)]
    fwd = kernel.OnlineSoftmax(np, qh.copy())
    fwd.update(kh, vh, pieces)
    bwd = BlockBackward(np, qh, doh, *fwd.finalize(), tile_q=5, tile_k=7)
    dk, dv = np.zeros_like(kh), np.zeros_like(vh)
    bwd.update(kh, vh, dk, dv, pieces)
    before = (bwd.dq(), dk.copy(), dv.copy())
    bwd.update(kh, vh, dk, dv, [])
    for a, b in zip(before, (bwd.dq(), dk, dv)):
        np.testing.assert_array_equal(a, b)
    got = (kernel.heads_to_out(before[0], 1), heads_to_kv(dk, 1), heads_to_kv(dv, 1))
    assert_close(got, reference_attention_grad(q, k, v, do, causal=True), TOLERANCE_BWD["float64"])


def test_deterministic_on_tile_after_every_tile_and_reset():
    q, k, v, do = make(40, 2, 2, 8, batch=1)
    calls = []
    first = emulate_ring(q, k, v, do, nranks=1, layout="contiguous", causal=True, dtype="float32", tile_q=16, tile_k=16, head_chunk=1)
    second = emulate_ring(
        q,
        k,
        v,
        do,
        nranks=1,
        layout="contiguous",
        causal=True,
        dtype="float32",
        tile_q=16,
        tile_k=16,
        head_chunk=1,
        on_tile=lambda: calls.append(1),
    )
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # as the forward: half-height query tiles on a diagonal piece (tile_k / 2 = 8 rows), keys not past the
    # diagonal: head chunks (2) x query tiles ending at 8, 16, 24, 32, 40 x key tiles of 16 -> 1, 1, 2, 2, 3
    assert len(calls) == 2 * (1 + 1 + 2 + 2 + 3)


def test_reset_and_repeat_give_the_same_bits():
    q, k, v, do = make(32, 2, 2, 8, batch=1)
    qh = (kernel.q_to_heads(np, q, 2, np.float32) * np.float32(kernel.softmax_scale(8))).astype(np.float32)
    kh, vh = kernel.kv_to_heads(np, k, np.float32), kernel.kv_to_heads(np, v, np.float32)
    fwd = kernel.OnlineSoftmax(np, qh.copy())
    fwd.update(kh, vh, [Piece(0, 32, 0, 32)])
    bwd = BlockBackward(np, qh, kernel.q_to_heads(np, do, 2, np.float32), *fwd.finalize(), tile_q=8, tile_k=8)
    results = []
    for _ in range(2):
        bwd.reset()
        dk, dv = np.zeros_like(kh), np.zeros_like(vh)
        bwd.update(kh, vh, dk, dv, [Piece(0, 32, 0, 32)])
        results.append((bwd.dq(), dk, dv))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_half_precision_blocks_compute_and_accumulate_in_float32():
    bf16 = BACKEND.dtype("float16")
    q, k, v, do = (x.astype(bf16) for x in make(16, 2, 1, 8, batch=1))
    qh = kernel.q_to_heads(np, q, 1)
    kh, vh = kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v)  # float16: the step's block as it travels
    fwd = kernel.OnlineSoftmax(np, kernel.q_to_heads(np, q, 1, np.float32) * np.float32(kernel.softmax_scale(8)))
    fwd.update(kernel.kv_to_heads(np, k, np.float32), kernel.kv_to_heads(np, v, np.float32), [Piece(0, 16, 0, 16)])
    o, lse = fwd.finalize(bf16)
    bwd = BlockBackward(np, qh * bf16.type(kernel.softmax_scale(8)), kernel.q_to_heads(np, do, 1), o, lse)
    assert bwd.dtype == np.float32 and bwd.dq().dtype == np.float32 and bwd.dq(bf16).dtype == bf16
    with pytest.raises(ValueError, match="dk_acc must be float32"):
        bwd.update(kh, vh, np.zeros(kh.shape, bf16), np.zeros(kh.shape, np.float32), [Piece(0, 16, 0, 16)])
    dk, dv = np.zeros(kh.shape, np.float32), np.zeros(kh.shape, np.float32)
    bwd.update(kh, vh, dk, dv, [Piece(0, 16, 0, 16)])
    assert np.isfinite(dk).all() and np.abs(dk).max() > 0


def test_memory_is_linear_in_the_block():
    """Beyond its copies of q, dO (each with one extra column), LSE and dQ, the object holds two score tiles,
    the transposed K and V of one head chunk and, without an in-place GEMM, one small product buffer."""
    q, k, v, do = make(512, 4, 2, 16, batch=1)
    qh = kernel.q_to_heads(np, q, 2, np.float32) * np.float32(kernel.softmax_scale(16))
    kh, vh = kernel.kv_to_heads(np, k, np.float32), kernel.kv_to_heads(np, v, np.float32)
    lse = np.zeros(qh.shape[:3], np.float32)
    bwd = BlockBackward(np, qh, kernel.q_to_heads(np, do, 2, np.float32), qh, lse, tile_q=64, tile_k=128, head_chunk=1)
    bwd.update(kh, vh, np.zeros_like(kh), np.zeros_like(vh), [Piece(0, 512, 0, 512)])
    g = 2
    held = bwd.scratch()  # elements of each work buffer, as allocated
    assert held == BlockBackward.scratch_elems(g, 16, 512, 512, head_chunk=1, tile_q=64, tile_k=128, in_place=False)
    assert held["scores"] == held["dscores"] == 64 * g * 128
    assert held["keys"] == held["values"] == 17 * 512
    assert held["product"] <= 128 * g * 16
    assert bwd.scratch_bytes == 4 * sum(held.values())
    in_place = BlockBackward.scratch_elems(g, 16, 512, 512, head_chunk=1, tile_q=64, tile_k=128, in_place=True)
    assert "product" not in in_place and in_place.items() <= held.items()  # MKL's matmul_add: no product buffer


def test_auto_tiles_and_flops():
    assert backward.auto_tiles(4096, 4096, 1, 8) == (512, 512, 1)
    assert backward.auto_tiles(4096, 4096, 4, 8) == (128, 512, 1)
    assert backward.auto_tiles(64, 64, 1, 8) == (64, 64, 8)  # small blocks: several heads per tile
    assert backward.auto_tiles(100, 200, 2, 3, gpu=True) == (100, 200, 3)
    assert backward.flops(1, 2, 64, 10) == 2.5 * kernel.flops(1, 2, 64, 10)


def test_heads_to_kv_inverts_kv_to_heads():
    x = np.arange(2 * 5 * 3 * 4.0).reshape(2, 5, 3, 4)
    np.testing.assert_array_equal(heads_to_kv(kernel.kv_to_heads(np, x), 2), x)


def test_exp_base_is_decided_by_the_cpu_and_checked():
    assert backward.fast_exp_base(np) in ("2", "e")
    assert backward.fast_exp_base(object()) == "2"  # off the host
    qh = np.ones((1, 1, 2, 4))
    with pytest.raises(ValueError, match="exp_base"):
        BlockBackward(np, qh, qh, qh, np.zeros((1, 1, 2)), exp_base="10")
