"""The ring never writes to the arrays it is given (no MPI: a loop-back exchange stands in for the neighbours)."""

import numpy as np
import pytest

from ringbench.config import DTYPES, RunConfig
from ringbench.engine.backend import BackendError, get_backend
from ringbench.engine.ring import InjectedFault, Ring, parse_fault
from ringbench.harness import inputs
from ringbench.kernels import kernel, reference
from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention_grad

from conftest import LoopBack


def _backend(name):
    try:
        return get_backend(name)
    except BackendError as exc:
        pytest.skip(str(exc))


# (B, n, H, H_kv, D, P): B = 1, H = 1, H_kv = 1, one token per rank, GQA, MQA
SHAPES = [
    (1, 1, 1, 1, 8, 1),
    (1, 1, 1, 1, 8, 3),
    (1, 7, 1, 1, 64, 2),
    (2, 1, 4, 1, 16, 2),
    (1, 5, 4, 2, 8, 1),
    (3, 4, 6, 3, 4, 2),
    (1, 33, 2, 2, 32, 2),
]


@pytest.mark.parametrize("backend_name", ["numpy", "cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}n{}H{}Hkv{}D{}P{}".format(*s))
@pytest.mark.parametrize("mode,causal", [("overlap", False), ("blocking", True), ("allgather", True)])
def test_ring_never_writes_to_its_inputs(backend_name, dtype, shape, mode, causal):
    backend = _backend(backend_name)
    if dtype not in backend.dtypes():
        pytest.skip(f"{dtype} is not supported by backend {backend_name}")
    b, n, h, hk, d, p = shape
    cfg = RunConfig(batch=b, seq_len=n * p, heads=h, kv_heads=hk, head_dim=d, dtype=dtype, mode=mode, causal=causal, backend=backend_name)
    st = backend.dtype(dtype)
    pos = np.arange(n)
    dims = dict(batch=b, seq_len=n * p, head_dim=d)
    host = {name: inputs.tokens(name, 3, pos, heads=hk if name in ("k", "v") else h, **dims).astype(st) for name in ("q", "k", "v", "do")}
    dev = {name: backend.asarray(x) for name, x in host.items()}
    before = {name: backend.asnumpy(x).tobytes() for name, x in dev.items()}
    ring = Ring(cfg, backend, LoopBack(), 0, p, dev["q"], dev["k"], dev["v"], do=dev["do"])
    ring.forward()
    out = backend.asnumpy(ring.output())
    ring.forward()
    ring.prepare_backward()
    ring.backward()
    grads = [backend.asnumpy(x) for x in ring.grads()]
    for name, x in dev.items():
        assert backend.asnumpy(x).tobytes() == before[name], f"{name} was written to"
    assert out.shape == (b, n, h, d) and out.dtype == st
    assert [g.shape for g in grads] == [(b, n, h, d), (b, n, hk, d), (b, n, hk, d)] and all(g.dtype == st for g in grads)
    if p == 1:  # one rank: the ring is full attention on its own block
        ref = reference.reference_attention(host["q"], host["k"], host["v"], causal=causal)
        tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
        assert np.abs(out.astype(np.float64) - ref).max() <= tol * np.abs(ref).max()
        refs = reference_attention_grad(host["q"], host["k"], host["v"], host["do"], causal=causal)
        for g, r in zip(grads, refs):  # (with one key dq and dk are exactly 0: the error is then against 1, the inputs' scale)
            assert np.abs(g.astype(np.float64) - r).max() <= max(tol, TOLERANCE_BWD[dtype]) * max(np.abs(r).max(), 1.0)


@pytest.mark.parametrize("shape", [(1, 4, 1, 8), (2, 1, 3, 8), (1, 6, 2, 4)])
def test_head_layouts_are_read_only_views_when_they_alias(shape):
    q = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    qh = kernel.q_to_heads(np, q, shape[2])
    kvh = kernel.kv_to_heads(np, q)
    for x in (qh, kvh):
        with pytest.raises(ValueError):
            x[...] = 0
    assert q.flags.writeable and np.isfinite(q).all()


@pytest.mark.parametrize(
    "spec,expect",
    [("", None), ("1:2", (1, 2)), ("0:0", (0, 0)), (" 2:1 ", (2, 1)), ("1:2@3", (1, 2)), ("5:0@2", None)],
)
def test_fault_spec(spec, expect):
    assert parse_fault(spec, 3) == expect


@pytest.mark.parametrize("spec", ["abc", "1", "1:", ":1", "3:0", "0:3", "-1:0", "1:2:3", "1.5:0", "x:y", "3:0@3", "1:0@x"])
def test_bad_fault_spec_names_the_variable_and_the_form(spec):
    with pytest.raises(ValueError, match=r"^RINGBENCH_FAULT: expected rank:step\[@P\] with rank and step in 0\.\.2 \(3 ranks\)"):
        parse_fault(spec, 3)


def test_fault_is_raised_at_its_step():
    backend = get_backend("numpy")
    cfg = RunConfig(seq_len=8, heads=1, head_dim=4)
    q = np.ones((1, 4, 1, 4), np.float32)
    ring = Ring(cfg, backend, LoopBack(), 0, 2, q, q, q, fault_step=1)
    with pytest.raises(InjectedFault, match="rank 0 at step 1"):
        ring.forward()


def test_home_groups_follow_the_kernels_head_chunks():
    from ringbench.engine.ring import HOME_GROUPS, home_groups

    assert home_groups(None, 6) == [(0, 6)]
    assert home_groups((0, 1, 2, 3, 4), 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert home_groups((0, 4, 8), 8) == [(0, 4), (4, 8)]
    groups = home_groups(tuple(range(0, 20)) + (20,), 20)  # 20 chunks: at most HOME_GROUPS groups, covering 0..20
    assert len(groups) <= HOME_GROUPS and groups[0][0] == 0 and groups[-1][1] == 20
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
