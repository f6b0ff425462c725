"""Run under ``mpiexec -n P`` by tests/engine/test_ring_backward.py: many ring backward configurations in one launch.

Every rank builds a real :class:`ringbench.engine.ring.Ring` over the real MPI exchange for each case, runs the untimed
forward and two backward passes, and compares its dQ, dK, dV with float64 reference gradients of full attention
on the same rounded inputs; the three modes of each case must agree bit for bit. Rank 0 prints one ``RESULT``
line of JSON (one entry per case); an exception on any rank aborts the job (the test then fails on the status).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ringbench.config import RunConfig
from ringbench.engine import comm
from ringbench.engine.backend import get_backend
from ringbench.engine.ring import Ring
from ringbench.harness import inputs
from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention_grad
from ringbench.layout import LAYOUTS, positions

MODES = ("overlap", "blocking", "allgather")


def grads(cfg: RunConfig, scale_q: float) -> tuple:
    """This rank's (dq, dk, dv) from a ring backward, and its rounded inputs."""
    world = comm.WORLD
    backend = get_backend("numpy")
    dtype = backend.dtype(cfg.dtype)
    pos = positions(cfg.layout, world.rank, world.size, cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    hk = cfg.kv_heads_resolved
    x = {n: inputs.tokens(n, cfg.seed, pos, heads=hk if n in ("k", "v") else cfg.heads, **dims) for n in ("q", "k", "v", "do")}
    x["q"] = x["q"] * scale_q  # large logits when scale_q is large
    x = {n: a.astype(dtype) for n, a in x.items()}
    ring = Ring(cfg, backend, comm.KVExchange(world, backend, False), world.rank, world.size, x["q"], x["k"], x["v"], do=x["do"])
    ring.prepare_backward()
    ring.backward()
    ring.backward()  # a second pass starts from zero again
    return tuple(np.asarray(g) for g in ring.grads()), x, pos


def reference(cfg: RunConfig, x: dict, pos, scale_q: float) -> tuple:
    allpos = np.arange(cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    dtype = x["q"].dtype
    hk = cfg.kv_heads_resolved
    k = inputs.tokens("k", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    v = inputs.tokens("v", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    dq, dk, dv = reference_attention_grad(x["q"], k, v, x["do"], causal=cfg.causal, q_pos=pos, k_pos=allpos)
    comm.allreduce_sum(dk)
    comm.allreduce_sum(dv)
    return dq, dk[:, pos], dv[:, pos]


def main() -> int:
    spec = json.loads(sys.argv[1])
    if "bwd_rows" in spec:  # --kernel torch: split its backward's calls by query rows at these tiny shapes too
        from ringbench.kernels import torch_kernel

        torch_kernel.CPU_BWD_ROWS = spec["bwd_rows"]
    world = comm.WORLD
    P = world.size
    results = []
    i = 0
    for layout in spec.get("layouts", LAYOUTS):
        for causal in (False, True):
            dtype = spec["dtypes"][i % len(spec["dtypes"])]
            kv = spec["kv_heads"][i % len(spec["kv_heads"])]
            i += 1
            n = spec["tokens_per_rank"]
            seen = {}
            for mode in MODES:
                cfg = RunConfig(
                    seq_len=n * P, heads=4, kv_heads=kv, head_dim=spec["head_dim"], batch=spec.get("batch", 1),
                    dtype=dtype, causal=causal, layout=layout, mode=mode, seed=5, pass_="bwd", kernel=spec.get("kernel", "native"),
                )  # fmt: skip
                got, x, pos = grads(cfg, spec["scale_q"])
                ref = reference(cfg, x, pos, spec["scale_q"])
                errs = [float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(got, ref)]
                refs = [float(np.abs(r).max()) for r in ref]
                finite = all(bool(np.isfinite(g.astype(np.float64)).all()) for g in got)
                same = all(np.array_equal(g, h) for g, h in zip(got, seen["overlap"])) if seen else True
                seen.setdefault(mode, got)
                case = dict(layout=layout, causal=causal, dtype=dtype, kv_heads=kv, mode=mode, errs=errs, refs=refs, finite=finite)
                case["identical"] = bool(all(comm.WORLD.allgather(same)))
                case["errs"] = [max(e) for e in zip(*comm.WORLD.allgather(errs))]
                case["refs"] = [max(e) for e in zip(*comm.WORLD.allgather(refs))]
                case["finite"] = bool(all(comm.WORLD.allgather(finite)))
                case["tol"] = TOLERANCE_BWD[dtype]
                results.append(case)
    if world.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(comm.run_or_abort(main))  # a failure on any rank ends the whole job, never a hang
