"""ringbench.kernels.api: every registered kernel meets the declared protocols and the float64 reference through them.

A new kernel is one module plus one entry in ``KERNELS``: this test picks it up and checks it, forward and
backward, on random inputs of odd shapes (causal and full, GQA), in every dtype the kernel computes here.
"""

from __future__ import annotations

import numpy as np
import pytest

from ringbench.config import KERNELS as CONFIG_KERNELS
from ringbench.engine.backend import get_backend
from ringbench.kernels import api, kernel
from ringbench.kernels.backward import heads_to_kv
from ringbench.kernels.reference import TOLERANCE, TOLERANCE_BWD, reference_attention, reference_attention_grad, rel_err
from ringbench.kernels.torch_kernel import unavailable
from ringbench.layout import CAUSAL, FULL, Piece

BACKEND = get_backend("numpy")


def test_the_registry_is_the_list_a_user_may_choose():
    assert set(api.KERNELS) == set(CONFIG_KERNELS)


def kernels_here():
    out = []
    for name in api.KERNELS:
        why = unavailable(name, BACKEND, "float32", backward=True)
        out.append(pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason=str(why))))
    return out


@pytest.mark.parametrize("name", kernels_here())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_kernel_through_its_protocols_matches_float64(name, causal, dtype):
    if name != "native" and dtype == "float64":
        pytest.skip("the fused kernels compute in the storage dtype float32 / half here")
    rng = np.random.default_rng(7)
    b, n, h, hk, d = 2, 37, 4, 2, 13  # odd shapes: 37 tokens, head dim 13, GQA 2
    st = np.dtype(dtype)
    q, do = (rng.standard_normal((b, n, h, d)).astype(st) for _ in range(2))
    k, v = (rng.standard_normal((b, n, hk, d)).astype(st) for _ in range(2))
    piece = Piece(0, n, 0, n, CAUSAL if causal else FULL)
    compute = kernel.compute_dtype(st)
    scale = kernel.softmax_scale(d)

    fwd = api.make_forward(BACKEND, kernel.q_to_heads(np, q, hk, compute), n, scale=scale, kernel_name=name, storage=st)
    assert isinstance(fwd, api.ForwardKernel)
    fwd.reset()
    fwd.update(kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v), [piece])
    o, lse = fwd.finalize(st)
    got = kernel.heads_to_out(o, b)
    assert rel_err(got, reference_attention(q, k, v, causal=causal)) <= TOLERANCE[dtype]

    qh = kernel.q_to_heads(np, q, hk, compute) * compute.type(scale)
    bwd = api.make_backward(BACKEND, qh, kernel.q_to_heads(np, do, hk), o, lse, kernel_name=name, storage=st)
    assert isinstance(bwd, api.BackwardKernel)
    bwd.reset()
    dk, dv = (np.zeros((b * hk, n, d), compute) for _ in range(2))
    bwd.update(kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v), dk, dv, [piece])
    want = reference_attention_grad(q, k, v, do, causal=causal)
    got = (kernel.heads_to_out(bwd.dq(st), b), heads_to_kv(dk, b), heads_to_kv(dv, b))
    for name_, g, w in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(g, w) <= TOLERANCE_BWD[dtype], name_
    assert api.score_tile_elems(fwd, h // hk) >= 0
