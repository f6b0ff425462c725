"""Run under ``mpiexec -n P`` by tests/engine/test_passq_backward.py: pass-Q's backward over every layout x causal x GQA (and
each dtype) at this rank count, in one launch.

Every rank builds a real :class:`ringbench.engine.strategies.PassQ` over the real MPI exchanges for each case, runs the untimed
forward and two backward passes (the second must give the same gradients bit for bit: nothing carries over), a
comm-only backward pass, and compares its dQ, dK, dV with float64 reference gradients of full attention on the same
rounded inputs. The step samples must have P + 1 steps and the comm-only pass 2 (P - 1) transfers. Rank 0 prints one
``RESULT`` line of JSON (one entry per case); an exception on any rank aborts the job (the test then fails on the status).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ringbench.config import RunConfig, validate
from ringbench.engine import comm, strategies
from ringbench.engine.backend import get_backend
from ringbench.harness import inputs
from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention_grad
from ringbench.layout import LAYOUTS, positions


def run_case(cfg: RunConfig) -> dict:
    world = comm.WORLD
    rank, P = world.rank, world.size
    backend = get_backend("numpy")
    dtype = backend.dtype(cfg.dtype)
    pos = positions(cfg.layout, rank, P, cfg.seq_len)
    allpos = np.arange(cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    hk = cfg.kv_heads_resolved
    x = {
        n: inputs.tokens(n, cfg.seed, pos, heads=hk if n in ("k", "v") else cfg.heads, **dims).astype(dtype) for n in ("q", "k", "v", "do")
    }
    pq = strategies.make(cfg, backend, world, False, rank, P, x["q"], x["k"], x["v"], do=x["do"])
    pq.prepare_backward()
    got = []
    for _ in range(2):
        c, m, s, total = pq.backward()
        assert len(c) == len(m) == len(s) == P + 1 and np.all(s >= 0) and np.all(c >= 0) and total > 0, (c, m, s)
        got.append(tuple(np.array(g) for g in pq.grads()))
    same = all(np.array_equal(a, b) for a, b in zip(*got))
    alone = pq.comm_only("bwd")
    assert alone.shape == (2 * (P - 1),), alone.shape
    k = inputs.tokens("k", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    v = inputs.tokens("v", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    dq, dk, dv = reference_attention_grad(x["q"], k, v, x["do"], causal=cfg.causal, q_pos=pos, k_pos=allpos)
    comm.allreduce_sum(dk)
    comm.allreduce_sum(dv)
    refs = (dq, dk[:, pos], dv[:, pos])
    grads = got[-1]
    assert grads[0].shape == x["q"].shape and grads[1].shape == x["k"].shape and all(g.dtype == dtype for g in grads)
    errs = [float(np.abs(g.astype(np.float64) - r).max()) for g, r in zip(grads, refs)]
    finite = all(bool(np.isfinite(g.astype(np.float64)).all()) for g in grads)
    # the traffic counted is what the pass posts: bundles ([Q, dO] storage, [LSE, D] compute) and dQ partials
    sent = sum(a.nbytes for a in pq.bundle_home) + pq.dq_parts[0].nbytes
    counted = pq.bytes_per_rank("bwd") == (P - 1) * sent
    return dict(
        layout=cfg.layout,
        causal=cfg.causal,
        dtype=cfg.dtype,
        kv_heads=hk,
        errs=[max(e) for e in zip(*world.allgather(errs))],
        refs=[max(r) for r in zip(*world.allgather([float(np.abs(r).max()) for r in refs]))],
        finite=all(world.allgather(finite)),
        repeatable=all(world.allgather(same)),
        bytes_counted=all(world.allgather(counted)),
        bytes_per_rank=pq.bytes_per_rank("bwd"),
        tol=TOLERANCE_BWD[cfg.dtype],
    )


def main() -> int:
    world = comm.WORLD
    P = world.size
    spec = json.loads(sys.argv[1])
    n = spec["tokens_per_rank"]
    results = []
    base = dict(seq_len=n * P, heads=4, head_dim=spec["head_dim"], batch=spec["batch"], mode="pass-q", pass_="bwd", seed=3)
    for layout in LAYOUTS:
        for causal in (False, True):
            for hk in spec["kv_heads"]:
                cfg = RunConfig(**base, kv_heads=hk, layout=layout, causal=causal, dtype="float32")
                assert not validate(cfg, P), validate(cfg, P)
                results.append(run_case(cfg))
    for dtype in spec["dtypes"]:  # the other dtypes on one causal GQA configuration
        cfg = RunConfig(**base, kv_heads=2, layout="zigzag", causal=True, dtype=dtype)
        results.append(run_case(cfg))
    if world.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(comm.run_or_abort(main))  # a failure on any rank ends the whole job, never a hang
