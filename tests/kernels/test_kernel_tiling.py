"""The tiled online-softmax kernel against the float64 reference: tile shapes, masks, GQA, and the paths
the fast kernel takes (unchecked b^s with a sum check, the exact row-max path, rebasing), in both bases of the
exponential (b = 2 or e), on random data."""

import numpy as np
import pytest

from ringbench.kernels import kernel, reference
from ringbench.layout import CAUSAL, FULL, STRICT, Piece, mask_for

from conftest import to_host

# max |out - ref| / max |ref| per compute dtype (inputs are rounded to that dtype before the reference)
TOL = {"float64": 1e-12, "float32": 2e-6}
BASES = tuple(kernel.EXP_BASES)  # every base the kernel can pick, forced in turn


def rand(shape, rng, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def run_kernel(q, ks, vs, pieces, dtype, xp=np, **kw):
    """q: (B, n, H, D); ks, vs: lists of (B, m, Hkv, D) blocks, folded in order, each with its pieces.
    Computed on the array module ``xp``; out and lse come back as NumPy arrays."""
    if kw.get("exp") == "fused" and xp is not np:
        pytest.skip("the fused exponential runs on NumPy arrays only")
    if kw.get("exp") == "fused" and kernel.fused_module() is None:
        pytest.skip("numba is not installed (the test extra installs it)")
    hk = ks[0].shape[2]
    qh = kernel.q_to_heads(xp, xp.asarray(q), hk, dtype) * np.dtype(dtype).type(kernel.softmax_scale(q.shape[3]))
    st = kernel.OnlineSoftmax(xp, qh, **kw)
    for k, v, ps in zip(ks, vs, pieces):
        st.update(kernel.kv_to_heads(xp, xp.asarray(k), dtype), kernel.kv_to_heads(xp, xp.asarray(v), dtype), ps)
    o, lse = st.finalize()
    return to_host(kernel.heads_to_out(o, q.shape[0])), to_host(lse), st


def rel_err(out, ref):
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tile_q,tile_k,head_chunk", [(None, None, None), (7, 5, 1), (13, 64, 2), (1, 3, 3), (64, 17, 1), (200, 200, 4)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
def test_full_blocks_any_tiling(dtype, tile_q, tile_k, head_chunk, heads, kv_heads, xp, base):
    rng = np.random.default_rng(3)
    b, n, m, d = 2, 37, 29, 16
    q = rand((b, n, heads, d), rng, dtype)
    ks = [rand((b, m, kv_heads, d), rng, dtype) for _ in range(3)]
    vs = [rand((b, m, kv_heads, d), rng, dtype) for _ in range(3)]
    out, lse, st = run_kernel(
        q, ks, vs, [[Piece(0, n, 0, m)]] * 3, dtype, xp, tile_q=tile_q, tile_k=tile_k, head_chunk=head_chunk, exp=base
    )
    assert st.base.name == base
    k_all, v_all = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)
    ref = reference.reference_attention(q, k_all, v_all, causal=False)
    assert rel_err(out, ref) < TOL[dtype]
    # the log-sum-exp is the natural-log one, whatever base the kernel works in
    s = np.einsum("bnhd,bmhd->bhnm", q.astype(np.float64), np.repeat(k_all.astype(np.float64), heads // kv_heads, axis=2)) / np.sqrt(d)
    want = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)  # (B, H, n)
    got = lse.reshape(b, kv_heads, heads // kv_heads, n).reshape(b, heads, n)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 if dtype == "float32" else 1e-10)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("mask", [CAUSAL, STRICT])
@pytest.mark.parametrize("tile_q,tile_k", [(None, None), (5, 7), (16, 16), (9, 40)])
def test_diagonal_blocks(mask, tile_q, tile_k, xp, base):
    rng = np.random.default_rng(4)
    b, n, h, hk, d = 1, 45, 4, 2, 8
    q = rand((b, n, h, d), rng, "float64")
    k, v = rand((b, n, hk, d), rng, "float64"), rand((b, n, hk, d), rng, "float64")
    out, lse, _ = run_kernel(q, [k], [v], [[Piece(0, n, 0, n, mask)]], "float64", xp, tile_q=tile_q, tile_k=tile_k, exp=base)
    pos = np.arange(n)
    ref = reference.reference_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos + (mask == STRICT))
    assert rel_err(out, ref) < TOL["float64"]
    if mask == STRICT:  # row 0 sees no key: zero output and -inf log-sum-exp, no NaN anywhere
        assert np.all(out[:, 0] == 0) and np.all(lse[..., 0] == -np.inf)
        assert np.isfinite(out).all() and np.isfinite(lse[..., 1:]).all()


def test_pieces_of_a_zigzag_step(xp):
    """Several pieces over one block (different query/key ranges and masks) fold like the separate blocks."""
    rng = np.random.default_rng(5)
    b, n, h, d, c = 1, 24, 2, 8, 12
    q = rand((b, n, h, d), rng, "float64")
    k, v = rand((b, n, h, d), rng, "float64"), rand((b, n, h, d), rng, "float64")
    pieces = [Piece(0, c, 0, c, CAUSAL), Piece(c, n, 0, c, FULL), Piece(c, n, c, n, CAUSAL)]
    out, _, _ = run_kernel(q, [k], [v], [pieces], "float64", xp, tile_q=5, tile_k=7)
    pos = np.arange(n)  # the three pieces together are plain causal attention on the block
    ref = reference.reference_attention(q, k, v, causal=True, q_pos=pos, k_pos=pos)
    assert rel_err(out, ref) < TOL["float64"]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-2), ("float64", 1e-9)])
@pytest.mark.parametrize("scale", [60.0, -60.0])
def test_large_logits_take_the_exact_path(dtype, tol, scale, xp, base):
    """Logits of order 1e4: the unchecked 2^s overflows (scale > 0: mixed signs) or, all logits being very
    negative (scale < 0), underflows to nothing for rows with no mass yet; the sum check sends the tile to the
    exact path, and the result stays finite and right."""
    rng = np.random.default_rng(6)
    b, n, h, d = 1, 32, 2, 16
    q = rand((b, n, h, d), rng, dtype, abs(scale))
    k = rand((b, n, h, d), rng, dtype, scale)
    if scale < 0:
        q, k = np.abs(q), -np.abs(k)
    v = rand((b, n, h, d), rng, dtype)
    out, lse, _ = run_kernel(
        q,
        [k[:, :16], k[:, 16:]],
        [v[:, :16], v[:, 16:]],
        [[Piece(0, n, 0, 16)], [Piece(0, n, 0, 16)]],
        dtype,
        xp,
        tile_q=8,
        tile_k=8,
        exp=base,
    )
    ref = reference.reference_attention(q, k, v, causal=False)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("base", BASES)
def test_rising_logits_rebase_the_rows(xp, base):
    """Each key block's logits exceed the last by ~28 (~40 in base 2): every block must move the reference."""
    rng = np.random.default_rng(7)
    b, n, h, d, m = 1, 16, 1, 4, 8
    q = np.ones((b, n, h, d)) + 0.01 * rng.standard_normal((b, n, h, d))
    ks = [np.full((b, m, h, d), 14.0 * (i + 1)) + rng.standard_normal((b, m, h, d)) for i in range(4)]
    vs = [rand((b, m, h, d), rng, "float64") for _ in range(4)]
    out, lse, st = run_kernel(q, ks, vs, [[Piece(0, n, 0, m)]] * 4, "float64", xp, tile_q=4, tile_k=3, exp=base)
    ref = reference.reference_attention(q, np.concatenate(ks, 1), np.concatenate(vs, 1), causal=False)
    assert rel_err(out, ref) < 1e-10
    assert np.all(to_host(st.m) * st.base.ln_b > 70)  # the reference followed the logits up (~110 in natural-log units)


def test_overflowing_sum_check_counts_infinities_and_nans():
    r = np.array([[1.0, np.inf]])
    assert not kernel.sums_ok(r, np.ones_like(r), False)
    assert not kernel.sums_ok(np.array([[1.0, np.nan]]), np.ones((1, 2)), False)
    assert not kernel.sums_ok(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]), True)  # underflow
    assert kernel.sums_ok(np.array([[1.0, 0.0]]), np.array([[1.0, 2.0]]), True)  # not fresh
    assert kernel.sums_ok(np.array([[1.0, 2.0**20]]), np.zeros((1, 2)), True)


def test_deterministic_and_on_tile_after_every_tile(xp):
    rng = np.random.default_rng(8)
    b, n, h, d = 1, 40, 2, 8
    q = rand((b, n, h, d), rng, "float32")
    k, v = rand((b, n, h, d), rng, "float32"), rand((b, n, h, d), rng, "float32")
    calls = []
    out1, lse1, st = run_kernel(
        q, [k], [v], [[Piece(0, n, 0, n, CAUSAL)]], "float32", xp, tile_q=16, tile_k=16, head_chunk=1, on_tile=lambda: calls.append(1)
    )
    # a diagonal piece uses half-height query tiles (tile_k / 2 = 8 rows):
    # head chunks (2) x query tiles ending at 8, 16, 24, 32, 40 x key tiles of 16 not past the diagonal
    assert len(calls) == 2 * (1 + 1 + 2 + 2 + 3)
    out2, lse2, _ = run_kernel(q, [k], [v], [[Piece(0, n, 0, n, CAUSAL)]], "float32", xp, tile_q=16, tile_k=16, head_chunk=1)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(lse1, lse2)
    st.reset()  # a reset state gives the same bits again
    st.update(kernel.kv_to_heads(xp, xp.asarray(k)), kernel.kv_to_heads(xp, xp.asarray(v)), [Piece(0, n, 0, n, CAUSAL)])
    np.testing.assert_array_equal(to_host(kernel.heads_to_out(st.finalize()[0], b)), out1)


def test_state_memory_is_linear_in_the_block():
    """Beyond q, acc, m and l, the state holds one score tile, one [k^T; 1] head chunk and small buffers."""
    rng = np.random.default_rng(9)
    b, n, h, d = 1, 512, 4, 16
    q = rand((b, n, h, d), rng, "float32")
    k, v = rand((b, n, h, d), rng, "float32"), rand((b, n, h, d), rng, "float32")
    _, _, st = run_kernel(q, [k], [v], [[Piece(0, n, 0, n)]], "float32", tile_q=64, tile_k=128, head_chunk=1)
    held = st.scratch()  # elements of each work buffer, as allocated
    assert held == kernel.OnlineSoftmax.scratch_elems(1, d, n, n, head_chunk=1, tile_q=64, tile_k=128)  # what the runner counts
    assert held["scores"] == 64 * 128
    assert held["keys"] == (d + 1) * n
    assert max(held["row_sums"], held["pv"], held["ones"]) <= 64 * 128
    assert st.scratch_bytes == 4 * sum(held.values())
    st.update(kernel.kv_to_heads(np, k[:, :100]), kernel.kv_to_heads(np, v[:, :100]), [Piece(0, 40, 0, 100, CAUSAL)])
    assert st.scratch() == held  # a smaller piece reuses the buffers


def test_scratch_of_a_fresh_state_and_of_diagonal_pieces():
    st = kernel.OnlineSoftmax(np, np.zeros((2, 3, 64, 8), np.float32), tile_q=32, tile_k=16)
    assert st.scratch() == {} and st.scratch_bytes == 0  # nothing before the first update
    need = kernel.OnlineSoftmax.scratch_elems(3, 8, 64, 48, head_chunk=2, tile_q=32, tile_k=16, mask=CAUSAL)
    assert need == {"keys": 2 * 9 * 48, "scores": 2 * 8 * 3 * 16, "row_sums": 2 * 8 * 3, "pv": 2 * 8 * 3 * 8, "ones": 16}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("mask", [CAUSAL, STRICT])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_masks_are_the_layouts_and_masked_rows_stay_zero(base, mask, scale):
    """The kernel hides exactly the keys ``layout.mask_for`` hides (a dense float64 softmax under that mask is the
    reference), with logits of order 1 and x100, in both bases; a fully masked row (strict, query 0) gives 0."""
    rng = np.random.default_rng(10)
    b, n, h, d = 1, 33, 2, 8
    q = rand((b, n, h, d), rng, "float64", scale)
    k, v = rand((b, n, h, d), rng, "float64", scale), rand((b, n, h, d), rng, "float64")
    piece = Piece(0, n, 0, n, mask)
    out, lse, _ = run_kernel(q, [k], [v], [[piece]], "float64", tile_q=6, tile_k=5, exp=base)
    s = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(d)
    s[..., mask_for(piece, 0, n, 0, n)] = -np.inf
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isinf(top), 0, top))
    den = p.sum(-1, keepdims=True)
    ref = np.einsum("bhnm,bmhd->bnhd", p / np.where(den == 0, 1, den), v)
    assert np.isfinite(out).all() and rel_err(out, ref) < 1e-9
    assert (np.all(out[:, 0] == 0) and np.all(lse[..., 0] == -np.inf)) == (mask == STRICT)


def test_exponential_base_forced_measured_and_refused(monkeypatch):
    monkeypatch.setenv(kernel.EXP_ENV, "e")
    assert kernel.exp_base().name == "e" and kernel.exp_base(np, "2").name == "2"  # a parameter beats the variable
    monkeypatch.setenv(kernel.EXP_ENV, "auto")
    measured = kernel.exp_base()
    assert measured.name in BASES and kernel.exp_base() is measured  # measured once per process
    name, per_elem = kernel.measure_exp(np, rows=4, cols=256, repeat=2)
    assert set(per_elem) == set(BASES) - ({"fused"} if kernel.fused_module() is None else set())  # fused where numba is
    assert min(per_elem.values()) > 0 and name in per_elem
    assert name == kernel.pick_exp(per_elem, kernel.numpy_has_avx512())
    monkeypatch.setenv(kernel.EXP_ENV, "10")
    with pytest.raises(ValueError, match="RINGBENCH_EXP: expected one of auto, 2, e, fused; got '10'"):
        kernel.exp_base()


def test_auto_takes_the_cpus_expected_exponential_unless_another_is_clearly_faster():
    m = kernel.FUSED_MARGIN
    avx2 = {"2": 5.9, "e": 3.1, "fused": 2.4}  # ns/element measured on an AVX2-only EPYC
    assert kernel.pick_exp(avx2, avx512=False) == "fused"
    assert kernel.pick_exp({"2": 5.9, "e": 3.1}, avx512=False) == "e"  # no numba
    assert kernel.pick_exp({**avx2, "e": 2.4 / m * 1.01}, avx512=False) == "fused"  # e faster, within the margin
    assert kernel.pick_exp({**avx2, "e": 2.4 / m * 0.99}, avx512=False) == "e"  # faster by more than it
    avx512 = {"2": 1.0, "e": 2.0, "fused": 0.9}
    assert kernel.pick_exp(avx512, avx512=True) == "2"  # fused faster, within the margin
    assert kernel.pick_exp({**avx512, "fused": 1.0 / m * 0.99}, avx512=True) == "fused"
    assert kernel.pick_exp({"2": 2.0, "e": 1.0}, avx512=True) == "e"


def test_thresholds_are_the_same_powers_of_two_in_every_base():
    for base in kernel.EXP_BASES.values():
        assert base.exp(np)(np.float64(base.rebase)) == pytest.approx(2.0**kernel.REBASE_BITS)
        masked = base.exp(np)(np.float32(base.masked))  # in float32: a normal number, never a subnormal
        assert masked >= np.finfo(np.float32).tiny and masked == pytest.approx(2.0**kernel.MASKED_BITS, rel=1e-5)
        assert base.exp(np)(np.float64(1.0) * base.scale) == pytest.approx(np.e) and base.ln_b == pytest.approx(np.log(base.exp(np)(1.0)))
