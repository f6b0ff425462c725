"""ringbench.kernels.reference: the float64 reference every check is held to, against a direct formula on random
inputs of odd shapes (GQA, causal by position), and the tolerance helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ringbench.kernels import reference


def direct(q, k, v, causal, q_pos, k_pos):
    """softmax(q k^T / sqrt(D)) v for one query row at a time, with plain Python loops over heads (no chunks, no repeat)."""
    b, nq, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, nq, h, d))
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, :, hi // g], v[bi, :, hi // g]
            for i in range(nq):
                s = kh @ q[bi, i, hi] / math.sqrt(d)
                vis = k_pos <= q_pos[i] if causal else np.ones(len(k_pos), bool)
                if not vis.any():
                    continue
                w = np.exp(s[vis] - s[vis].max())
                out[bi, i, hi] = (w / w.sum()) @ vh[vis]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_reference_attention_is_the_direct_formula(causal, seed):
    rng = np.random.default_rng(seed)
    b, nq, nk, hk, g, d = 2, int(rng.integers(1, 9)), int(rng.integers(1, 13)), 2, int(rng.integers(1, 4)), int(rng.integers(1, 9))
    q = rng.standard_normal((b, nq, hk * g, d))
    k, v = (rng.standard_normal((b, nk, hk, d)) for _ in range(2))
    q_pos, k_pos = np.sort(rng.choice(nk + 3, nq)), np.arange(nk)
    got = reference.reference_attention(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos, chunk=3)
    np.testing.assert_allclose(got, direct(q, k, v, causal, q_pos, k_pos), rtol=0, atol=1e-12)


def test_reference_gradients_are_the_derivative_of_the_reference():
    """dq, dk, dv of sum(O * dO) by central differences of reference_attention, at a few random coordinates."""
    rng = np.random.default_rng(5)
    q, do = (rng.standard_normal((1, 5, 4, 3)) for _ in range(2))
    k, v = (rng.standard_normal((1, 5, 2, 3)) for _ in range(2))
    grads = reference.reference_attention_grad(q, k, v, do, causal=True)
    eps = 1e-6
    for which, x in enumerate((q, k, v)):
        for _ in range(4):
            idx = tuple(int(rng.integers(0, n)) for n in x.shape)
            plus, minus = x.copy(), x.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args = [
                [plus if j == which else y for j, y in enumerate((q, k, v))],
                [minus if j == which else y for j, y in enumerate((q, k, v))],
            ]
            f = [np.sum(reference.reference_attention(*a, causal=True) * do) for a in args]
            assert abs((f[0] - f[1]) / (2 * eps) - grads[which][idx]) < 1e-6


def test_rel_err_and_within():
    ref = np.array([1.0, -2.0, 4.0])
    assert reference.rel_err(ref + [0, 0, 4e-6], ref) == pytest.approx(1e-6)
    assert reference.rel_err([1e-3], [0.0]) == pytest.approx(1e-3)  # an all-zero reference: the absolute error
    assert reference.within(ref * (1 + 1e-6), ref, "float32") and not reference.within(ref * (1 + 1e-4), ref, "float32")
    assert not reference.within([np.nan, 0, 0], ref, "float32")
    assert reference.within(ref * (1 + 1e-3), ref, "float16", phase="bwd")
    assert set(reference.TOLERANCE) == set(reference.TOLERANCE_BWD) == {"float64", "float32", "float16", "bfloat16"}
