"""Run under ``mpiexec -n P`` by tests/engine/test_random_shapes.py: a seeded random search over shapes at this rank count, in
one launch. Every case is a :class:`RunConfig` drawn by :func:`draw_cases` (head dims 1..256, tokens per rank 1..300,
GQA ratios, batch, dtype, causal, layout, every mode of config.MODES with its Ulysses degree, pass fwd or bwd, tile_q),
after the pinned regression cases (:func:`pinned_cases`); each runs through the real ring or strategy object over MPI
and its output, or its dQ, dK, dV, is compared with the float64 reference of full attention on the same rounded inputs.

Rank 0 prints one ``RESULT`` line of JSON: per case its configuration, the relative error of each tensor (the worst
over the ranks) and the tolerance. Nothing is asserted here, so one bad case does not hide the others: the test
asserts. An exception on any rank (a crash, not a wrong number) aborts the job.

The drawing needs no MPI (the test imports this module to list the cases); MPI is imported by :func:`main` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from ringbench.config import DTYPES, MODES, RunConfig, validate
from ringbench.kernels import reference
from ringbench.kernels.reference import TOLERANCE, TOLERANCE_BWD
from ringbench.layout import LAYOUTS

MAX_TOKENS = 300  # per rank
MAX_HEAD_DIM = 256
# B * H * N^2 * D of one case at most (N the global length): bounds the float64 reference and the kernel's work, so
# a launch of many cases stays within a few seconds per case on a loaded machine; larger draws are shrunk
COST_BUDGET = 4e6


def pinned_cases(nranks: int) -> list[RunConfig]:
    """The regression cases drawn every time: the backward at head dim 3 (float32 and half precision: rows of the
    -D column 16 bytes apart) and 7 (float64: 64 bytes), where NumPy 2.4.6's in-place negative stored wrong dQ, dK."""
    p = nranks
    cases = [
        RunConfig(seq_len=8 * p, heads=2, head_dim=3, pass_="bwd", dtype="float32"),
        RunConfig(seq_len=8 * p, heads=2, head_dim=7, pass_="bwd", dtype="float64"),
        RunConfig(seq_len=6 * p, heads=4, kv_heads=2, head_dim=3, pass_="bwd", dtype="bfloat16", causal=True, layout="zigzag"),
        RunConfig(seq_len=4 * p, heads=4, kv_heads=1, head_dim=3, pass_="bwd", dtype="float16", mode="pass-q", layout="striped"),
        RunConfig(seq_len=4 * p, heads=4, head_dim=7, pass_="bwd", dtype="float64", mode="ulysses" if 4 % p == 0 else "hybrid"),
    ]
    return [c for c in cases if not validate(c, nranks)]


def cost(cfg: RunConfig) -> float:
    return cfg.batch * cfg.heads * cfg.seq_len**2 * cfg.head_dim


def log_int(rng, lo: int, hi: int) -> int:
    """An integer in [lo, hi], log-uniform (small sizes as often as large ones)."""
    return int(min(hi, max(lo, round(float(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))) - 0.5))))


def draw_case(rng, nranks: int, budget: float = COST_BUDGET) -> RunConfig:
    """One random valid configuration at ``nranks`` ranks (redrawn until ``validate`` accepts it)."""
    p = nranks
    while True:
        mode = str(rng.choice(MODES))
        layout = str(rng.choice(LAYOUTS))
        u = 1
        if mode == "hybrid":
            u = int(rng.choice([x for x in range(1, p + 1) if p % x == 0]))
        hk = int(rng.integers(1, 5))
        g = int(rng.integers(1, 5))
        n = log_int(rng, 1, MAX_TOKENS)
        if layout in ("zigzag", "doc-zigzag") and n % 2:
            n += 1 if n < MAX_TOKENS else -1
        cfg = RunConfig(
            batch=int(rng.integers(1, 4)),
            seq_len=n * p,
            heads=hk * g,
            kv_heads=hk,
            head_dim=log_int(rng, 1, MAX_HEAD_DIM),
            dtype=str(rng.choice(DTYPES)),
            causal=bool(rng.integers(2)),
            layout=layout,
            mode=mode,
            ulysses_degree=u,
            pass_=str(rng.choice(["fwd", "bwd"])),
            tile_q=int(rng.integers(-(-n // 32), n + 1)) if rng.random() < 0.3 else 0,  # at most 32 query tiles a piece
            seed=int(rng.integers(0, 2**30)),
        )
        # shrink what is over the budget: the batch first, then the head dim, then the tokens (layout's multiple kept)
        step = 2 if layout == "zigzag" else 1
        while cost(cfg) > budget:
            if cfg.batch > 1:
                cfg.batch -= 1
            elif cfg.head_dim > 16:
                cfg.head_dim = cfg.head_dim // 2 + 1  # stays odd or even at random
            elif cfg.seq_len // p > step:
                cfg.seq_len = max(step, cfg.seq_len // p // 2 // step * step) * p
            else:
                break
        cfg.tile_q = min(cfg.tile_q, cfg.seq_len // p)  # the tokens may have shrunk
        if not validate(cfg, p) and cfg.seq_len >= 2:  # N = 1: the gradients of q and k are 0 (nothing to compare)
            return cfg


def draw_cases(seed: int, nranks: int, examples: int, budget: float = COST_BUDGET) -> list[tuple[RunConfig, str]]:
    """(configuration, exponential base) of the pinned cases, then of ``examples`` random ones: the same list for the
    same (seed, nranks, examples). The base ('2' or 'e', as RINGBENCH_EXP forces it) is drawn too: the measured
    choice costs seconds per process, and the fused pass is searched by the kernel-level test."""
    rng = np.random.default_rng([seed, nranks])
    pinned = [(c, base) for c in pinned_cases(nranks) for base in ("2", "e")]
    return pinned + [(draw_case(rng, nranks, budget), str(rng.choice(["2", "e"]))) for _ in range(examples)]


def describe(cfg: RunConfig, exp: str) -> dict:
    """The fields of ``cfg`` that differ from the defaults, and the exponential's base (what reproduces the case)."""
    base = RunConfig()
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
    return dict(out, RINGBENCH_EXP=exp)


def rel_errors(errs, refs) -> list[float]:
    """max |got - ref| / max |ref| per tensor; a tensor that cancels to near 0 by chance (few keys, head dim 1) is
    measured against 1% of the largest reference tensor of the case instead, so that its rounding cannot fail it."""
    floor = 0.01 * max(refs)
    return [e / max(r, floor) if max(r, floor) > 0 else e for e, r in zip(errs, refs)]


def run_case(cfg: RunConfig, exp: str, world, backend) -> dict:
    from ringbench.engine import comm, strategies
    from ringbench.engine.ring import Ring
    from ringbench.harness import inputs
    from ringbench.kernels import kernel
    from ringbench.kernels.reference import reference_attention_grad
    from ringbench.layout import positions

    os.environ[kernel.EXP_ENV] = exp  # read by every state the ring or strategy builds
    rank, p = world.rank, world.size
    pos = positions(cfg.layout, rank, p, cfg.seq_len)
    allpos = np.arange(cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    dtype = backend.dtype(cfg.dtype)
    hk = cfg.kv_heads_resolved
    bwd = cfg.pass_ == "bwd"
    names = ("q", "k", "v", "do") if bwd else ("q", "k", "v")
    host = {x: inputs.tokens(x, cfg.seed, pos, heads=hk if x in ("k", "v") else cfg.heads, **dims).astype(dtype) for x in names}
    dev = {x: backend.asarray(a) for x, a in host.items()}
    do = dev.get("do")
    if cfg.mode in strategies.STRATEGIES:
        obj = strategies.make(cfg, backend, world, False, rank, p, dev["q"], dev["k"], dev["v"], do=do)
    else:
        obj = Ring(cfg, backend, comm.KVExchange(world, backend, False), rank, p, dev["q"], dev["k"], dev["v"], do=do)
    k = inputs.tokens("k", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    v = inputs.tokens("v", cfg.seed, allpos, heads=hk, **dims).astype(dtype)
    if bwd:
        obj.prepare_backward()
        obj.backward()
        got = [backend.asnumpy(g) for g in obj.grads()]
        dq, dk, dv = reference_attention_grad(host["q"], k, v, host["do"], causal=cfg.causal, q_pos=pos, k_pos=allpos)
        comm.allreduce_sum(dk)
        comm.allreduce_sum(dv)
        refs, names, tol = (dq, dk[:, pos], dv[:, pos]), ["dq", "dk", "dv"], TOLERANCE_BWD[cfg.dtype]
    else:
        obj.forward()
        got = [backend.asnumpy(obj.output())]
        ref = reference.reference_attention(host["q"], k, v, causal=cfg.causal, q_pos=pos, k_pos=allpos)
        refs, names, tol = (ref,), ["out"], TOLERANCE[cfg.dtype]
    shapes_ok = all(g.shape == r.shape and g.dtype == dtype for g, r in zip(got, refs))
    g64 = [g.astype(np.float64) for g in got]
    errs = [float(np.abs(g - r).max()) if g.shape == r.shape else float("inf") for g, r in zip(g64, refs)]
    errs = [e if np.isfinite(g).all() else float("inf") for e, g in zip(errs, g64)]
    errs = [max(e) for e in zip(*world.allgather(errs))]
    refs = [max(r) for r in zip(*world.allgather([float(np.abs(r).max()) for r in refs]))]
    return dict(case=describe(cfg, exp), names=names, rel=rel_errors(errs, refs), tol=tol, shapes_ok=all(world.allgather(shapes_ok)))


def main() -> int:
    from ringbench.engine import comm
    from ringbench.engine.backend import get_backend

    world = comm.WORLD
    spec = json.loads(sys.argv[1])
    backend = get_backend("numpy")
    results = [run_case(cfg, exp, world, backend) for cfg, exp in draw_cases(spec["seed"], world.size, spec["examples"])]
    if world.rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    from ringbench.engine import comm

    sys.exit(comm.run_or_abort(main))  # a failure on any rank ends the whole job, never a hang
