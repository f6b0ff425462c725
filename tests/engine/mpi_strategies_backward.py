"""Run under mpiexec by tests/engine/test_strategies.py: the backward of ulysses and hybrid (every U dividing P) x layout x causal
x GQA (kv heads split and replicated) x dtype at this rank count, dQ, dK, dV checked against float64 reference gradients
in one launch; hybrid U = 1 must give the ring's gradients, U = P Ulysses' (bitwise: the same arithmetic). Prints
'checked K' from rank 0; any failure raises (the job aborts)."""

import dataclasses
import sys

import numpy as np
from mpi_common import report_checked, run, setup

from ringbench.config import RunConfig, validate
from ringbench.engine import comm, strategies
from ringbench.engine.ring import Ring
from ringbench.harness import inputs
from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention_grad
from ringbench.layout import LAYOUTS, positions


def tensors(cfg, rank, nranks, backend):
    """This rank's rounded q, k, v, dO and the float64 reference dQ, dK, dV of its tokens."""
    pos = positions(cfg.layout, rank, nranks, cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    dtype = backend.dtype(cfg.dtype)
    hk = cfg.kv_heads_resolved
    names = ("q", "k", "v", "do")
    host = {n: inputs.tokens(n, cfg.seed, pos, heads=hk if n in ("k", "v") else cfg.heads, **dims).astype(dtype) for n in names}
    allpos = np.arange(cfg.seq_len)
    k = inputs.tokens("k", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    v = inputs.tokens("v", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    dq, dk, dv = reference_attention_grad(host["q"], k, v, host["do"], causal=cfg.causal, q_pos=pos, k_pos=allpos)
    comm.allreduce_sum(dk)
    comm.allreduce_sum(dv)
    return host, (dq, dk[:, pos], dv[:, pos])


def grads(cfg, backend, world, rank, nranks, host, fused=False):
    """dQ, dK, dV (float64 copies) after two backward passes (the second must start from zero again)."""
    dev = {k: backend.asarray(v.copy()) for k, v in host.items()}  # copies: dO is changed below
    if cfg.mode in strategies.STRATEGIES:
        obj = strategies.make(cfg, backend, world, False, rank, nranks, dev["q"], dev["k"], dev["v"], do=dev["do"])
    else:
        obj = Ring(cfg, backend, comm.KVExchange(world, backend, False), rank, nranks, dev["q"], dev["k"], dev["v"], do=dev["do"])
    obj.prepare_backward()
    if fused:
        assert type(obj.ring.block_backward).__name__ == "FusedBackward"
    for _ in range(2):
        c, m, s, total = obj.backward()
        assert len(c) == len(m) == len(s) and np.all(s >= 0) and total > 0
        if cfg.mode in strategies.STRATEGIES:
            assert len(s) == nranks // obj.u + 2, (len(s), obj.u)
    if cfg.mode in strategies.STRATEGIES:
        alone = obj.comm_only("bwd")
        r = nranks // obj.u
        assert len(alone) == 2 + (r if r > 1 else 0), (len(alone), r)
        assert obj.bwd_score_tile_elems > 0
    got = tuple(backend.asnumpy(g) for g in obj.grads())
    assert [g.dtype for g in got] == [host["q"].dtype] * 3
    if cfg.mode in strategies.STRATEGIES and cfg.dtype in ("float32", "float64"):
        # each pass gathers dO anew (step 0): twice dO gives exactly twice the gradients (not so in half precision,
        # whose subnormals round differently)
        got = tuple(g.copy() for g in got)
        dev["do"] *= 2
        obj.backward()
        for g, h in zip(got, obj.grads()):
            np.testing.assert_array_equal(2 * g.astype(np.float64), backend.asnumpy(h).astype(np.float64), err_msg=str(cfg))
    return tuple(g.astype(np.float64) for g in got)


def check(cfg, got, ref, what) -> None:
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        err = np.abs(g - r).max() / np.abs(r).max()
        assert np.isfinite(g).all() and err < TOLERANCE_BWD[cfg.dtype], (what, name, cfg.dtype, err)


def check_torch_kernel(backend, world, rank, P) -> int:
    """The backward with --kernel torch (FusedBackward per piece; dO loaded into it each pass). 0 without torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return 0
    checked = 0
    for mode, u in (("ulysses", 1), ("hybrid", 2 if P % 2 == 0 else 1)):
        for dtype, hk in (("float32", 1), ("bfloat16", 2)):
            if mode == "ulysses" and 4 % P:  # the head rule (P = 3)
                continue
            cfg = RunConfig(
                seq_len=8 * P, heads=4, kv_heads=hk, head_dim=8, layout="zigzag", causal=True, dtype=dtype, mode=mode,
                ulysses_degree=u, pass_="bwd", seed=3, kernel="torch",
            )  # fmt: skip
            assert validate(cfg, P) == [], validate(cfg, P)
            host, ref = tensors(cfg, rank, P, backend)
            check(cfg, grads(cfg, backend, world, rank, P, host, fused=True), ref, (mode, u, dtype, "torch"))
            checked += 1
    return checked


def main() -> int:
    world, rank, P, backend = setup()
    n_checked = 0
    for layout in LAYOUTS:
        for causal in (False, True):
            for hk in (4, 2, 1):
                base = RunConfig(
                    seq_len=8 * P, heads=4, kv_heads=hk, head_dim=8, layout=layout, causal=causal, batch=2, pass_="bwd", seed=3
                )  # fmt: skip
                host, ref = tensors(base, rank, P, backend)
                got = {}
                cases = [("overlap", 1), ("ulysses", 1)] + [("hybrid", u) for u in range(1, P + 1) if P % u == 0]
                for mode, u in cases:
                    cfg = dataclasses.replace(base, mode=mode, ulysses_degree=u)
                    if validate(cfg, P):
                        continue
                    got[(mode, u)] = grads(cfg, backend, world, rank, P, host)
                    check(cfg, got[(mode, u)], ref, (mode, u, layout, causal, hk))
                    n_checked += 1
                if ("hybrid", 1) in got:  # U = 1 is the ring
                    for a, b in zip(got[("hybrid", 1)], got[("overlap", 1)]):
                        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
                if ("hybrid", P) in got and ("ulysses", 1) in got:  # U = P is Ulysses
                    for a, b in zip(got[("hybrid", P)], got[("ulysses", 1)]):
                        np.testing.assert_array_equal(a, b)
    if 4 % P:  # P = 3: ulysses and hybrid U = P need heads divisible by 3 (kv heads split, then replicated)
        for hk in (3, 1):
            for mode, u in (("ulysses", 1), ("hybrid", P)):
                cfg = RunConfig(
                    seq_len=8 * P, heads=6, kv_heads=hk, head_dim=8, layout="striped", causal=True, mode=mode, ulysses_degree=u,
                    pass_="bwd", seed=3,
                )  # fmt: skip
                host, ref = tensors(cfg, rank, P, backend)
                check(cfg, grads(cfg, backend, world, rank, P, host), ref, (mode, u, hk))
                n_checked += 1
    for dtype in ("float64", "float16", "bfloat16"):
        for mode, u, hk in (("ulysses", 1, 2), ("hybrid", 2 if P % 2 == 0 else 1, 1)):
            cfg = RunConfig(
                seq_len=8 * P, heads=4, kv_heads=hk, head_dim=8, layout="zigzag", causal=True, dtype=dtype, mode=mode,
                ulysses_degree=u, pass_="bwd", seed=3,
            )  # fmt: skip
            if validate(cfg, P):
                continue
            host, ref = tensors(cfg, rank, P, backend)
            check(cfg, grads(cfg, backend, world, rank, P, host), ref, (mode, u, dtype))
            n_checked += 1
    return report_checked(world, n_checked + check_torch_kernel(backend, world, rank, P))


if __name__ == "__main__":
    sys.exit(run(main))
