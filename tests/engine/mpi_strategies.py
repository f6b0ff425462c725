"""Run under mpiexec by tests/engine/test_strategies.py: every strategy x layout x causal x GQA x dtype at this rank count,
checked against the float64 reference in one launch. Prints 'checked K' from rank 0; any failure raises (the job aborts)."""

import dataclasses
import sys

import numpy as np
from mpi_common import report_checked, run, setup

from ringbench.config import RunConfig, validate
from ringbench.engine import comm, strategies
from ringbench.engine.ring import Ring
from ringbench.harness import inputs
from ringbench.kernels import reference
from ringbench.layout import LAYOUTS, positions

TOL = reference.TOLERANCE


def tensors(cfg, rank, nranks, backend):
    pos = positions(cfg.layout, rank, nranks, cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    dtype = backend.dtype(cfg.dtype)
    hk = cfg.kv_heads_resolved
    host = {n: inputs.tokens(n, cfg.seed, pos, heads=cfg.heads if n == "q" else hk, **dims).astype(dtype) for n in ("q", "k", "v")}
    allpos = np.arange(cfg.seq_len)
    k = inputs.tokens("k", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    v = inputs.tokens("v", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    ref = reference.reference_attention(host["q"], k, v, causal=cfg.causal, q_pos=pos, k_pos=allpos)
    return host, ref


def output(cfg, backend, world, rank, nranks, host):
    dev = {k: backend.asarray(v) for k, v in host.items()}
    if cfg.mode in strategies.STRATEGIES:
        obj = strategies.make(cfg, backend, world, False, rank, nranks, dev["q"], dev["k"], dev["v"])
    else:
        obj = Ring(cfg, backend, comm.KVExchange(world, backend, False), rank, nranks, dev["q"], dev["k"], dev["v"])
    for _ in range(2):  # the second pass must give the same result (state reloaded, not accumulated)
        c, m, s, total = obj.forward()
        assert len(c) == len(m) == len(s) and np.all(s >= 0) and total > 0
    obj.comm_only()
    return backend.asnumpy(obj.output()).astype(np.float64)


def check_torch_kernel(backend, world, rank, P) -> int:
    """ulysses and hybrid with --kernel torch (the fused kernel's state takes the gathered queries): against the
    reference, and within float32 rounding of the native kernel. Skipped (0 checked) without torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return 0
    checked = 0
    for mode, u in (("ulysses", 1), ("hybrid", 2 if P % 2 == 0 else 1)):
        for dtype, hk in (("float32", 1), ("bfloat16", 2)):
            cfg = RunConfig(
                seq_len=16 * P, heads=4, kv_heads=hk, head_dim=8, layout="striped", causal=True, dtype=dtype, mode=mode,
                ulysses_degree=u, kernel="torch",
            )  # fmt: skip
            if mode == "ulysses" and 4 % P:  # the head rule (P = 3)
                continue
            assert validate(cfg, P) == [], validate(cfg, P)
            host, ref = tensors(cfg, rank, P, backend)
            out = output(cfg, backend, world, rank, P, host)
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert err < TOL[dtype], (mode, u, dtype, "torch", err)
            obj = strategies.make(cfg, backend, world, False, rank, P, *(backend.asarray(host[x]) for x in "qkv"))
            assert obj.blas.startswith("torch "), obj.blas  # the fused kernel computed
            if dtype == "float32":
                native = output(dataclasses.replace(cfg, kernel="native"), backend, world, rank, P, host)
                np.testing.assert_allclose(out, native, rtol=0, atol=1e-5)
            checked += 1
    return checked


def main() -> int:
    world, rank, P, backend = setup()
    heads = 4
    n_checked = 0
    for layout in LAYOUTS:
        for causal in (False, True):
            for hk in (4, 2, 1):
                base = RunConfig(seq_len=16 * P, heads=heads, kv_heads=hk, head_dim=8, layout=layout, causal=causal, batch=2)
                host, ref = tensors(base, rank, P, backend)
                outs = {}
                cases = [("overlap", 1), ("ulysses", 1), ("pass-q", 1)] + [("hybrid", u) for u in range(1, P + 1) if P % u == 0]
                for mode, u in cases:
                    cfg = dataclasses.replace(base, mode=mode, ulysses_degree=u)
                    if validate(cfg, P):
                        continue
                    out = output(cfg, backend, world, rank, P, host)
                    err = np.abs(out - ref).max() / np.abs(ref).max()
                    assert err < TOL["float32"], (mode, u, layout, causal, hk, err)
                    outs[(mode, u)] = out
                    n_checked += 1
                if ("hybrid", 1) in outs:  # U = 1 is the ring, U = P is Ulysses
                    np.testing.assert_allclose(outs[("hybrid", 1)], outs[("overlap", 1)], rtol=0, atol=1e-6)
                if ("hybrid", P) in outs:
                    np.testing.assert_allclose(outs[("hybrid", P)], outs[("ulysses", 1)], rtol=0, atol=1e-6)
    for dtype in ("float64", "float16", "bfloat16"):
        for mode, u in (("ulysses", 1), ("pass-q", 1), ("hybrid", 2 if P % 2 == 0 else 1)):
            cfg = RunConfig(
                seq_len=16 * P, heads=4, kv_heads=2, head_dim=8, layout="zigzag", causal=True, dtype=dtype, mode=mode, ulysses_degree=u
            )
            if validate(cfg, P):
                continue
            host, ref = tensors(cfg, rank, P, backend)
            out = output(cfg, backend, world, rank, P, host)
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert err < TOL[dtype], (mode, u, dtype, err)
            n_checked += 1
    return report_checked(world, n_checked + check_torch_kernel(backend, world, rank, P))


if __name__ == "__main__":
    sys.exit(run(main))
