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


class _Recorder:
    """A loop-back exchange (what is sent is received at once) that numbers its transfers: ``events`` gets
    ("post", i) and ("wait", i) for each, across all its twins, and the marks go to ``log`` as KVExchange.mark's do."""

    def __init__(self, events, count):
        self.events, self.count, self.pending, self.log = events, count, None, None

    @property
    def posted(self):
        return self.pending is not None

    def twin(self, name):
        return _Recorder(self.events, self.count)

    def _mark(self, *entry):
        if self.log is not None:
            self.log.append(entry)

    def post_all(self, pairs, tag=0):
        assert self.pending is None, "posted twice"
        for send, recv in pairs:
            recv[...] = send
        self.pending = len(self.count)
        self.count.append(1)
        self.events.append(("post", self.pending))
        self._mark("post", 0.0, float(sum(s.nbytes for s, _ in pairs)))

    def test(self):
        return True

    def wait(self):
        assert self.pending is not None, "wait with nothing posted"
        self.events.append(("wait", self.pending))
        self._mark("wait", 0.0, 0.0)
        self.pending = None

    def sendrecv_all(self, pairs, tag=1):
        for send, recv in pairs:
            recv[...] = send


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (4, 2), (3, 1), (6, 3)])
@pytest.mark.parametrize("kernel_name", ["native", "torch"])
def test_the_backward_waits_for_its_transfers_in_the_order_it_posted_them(heads, kv_heads, kernel_name):
    """The overlap backward's last step sends dK/dV home in head groups on up to HOME_LAG exchanges: every step waits
    for its transfers in post order (its k-th wait is its k-th post's, which is how the exposed-time split pairs the
    marks), and no transfer is left in flight after the pass. 1, 2, 3 and 8 groups; both kernels."""
    if kernel_name == "torch":
        pytest.importorskip("torch")
    backend = get_backend("numpy")
    n, d, P = 12, 8, 2
    cfg = RunConfig(seq_len=n * P, heads=heads, kv_heads=kv_heads, head_dim=d, causal=True, mode="overlap", kernel=kernel_name, pass_="bwd")
    rng = np.random.default_rng(3)
    q, do = (rng.standard_normal((1, n, heads, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, n, kv_heads, d)).astype(np.float32) for _ in range(2))
    events = []
    ex = _Recorder(events, [])
    ring = Ring(cfg, backend, ex, 0, P, q, k, v, do=do)
    ring.prepare_backward()
    events.clear()
    ring.backward()
    posts = [i for kind, i in events if kind == "post"]
    waits = [i for kind, i in events if kind == "wait"]
    assert waits == posts and all(not hx.posted for hx in ring.home_exs)
    assert len(posts) > P  # the last step's slices went home apart (more than one transfer per step)
    # the marks: as many waits as posts in every step
    assert np.array_equal(np.isnan(ring.marks["post_t"]), np.isnan(ring.marks["wait_end_t"]))
