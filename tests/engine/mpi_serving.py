"""Run under ``mpiexec -n P`` by tests/engine/test_serving.py: the serving passes (ringbench.engine.serving) built by
``api.build`` at this rank count, on many cases in one launch, each checked against the float64 reference over global
positions by ringbench.harness.check (the run's own check):

* prefill: every strategy (overlap, blocking, allgather, pass-q) x layout x dtype, random odd shapes and cache sizes
  (C = 0 among them), and C = 0 against the causal forward of the same engine (bitwise for the ring, whose arithmetic is
  the same; within tolerance for pass-q);
* decode: every merge x layout x dtype, random t, B, shapes.

Prints ``RESULT {"prefill": K, "decode": K, "bitwise": K}`` from rank 0; any failure aborts the job."""

import dataclasses
import json
import sys

import numpy as np

from ringbench.config import RunConfig, validate
from ringbench.engine import api, comm, serving
from ringbench.engine.backend import get_backend
from ringbench.harness import check, inputs
from ringbench.kernels.torch_kernel import unavailable
from ringbench.layout import divisor

DTYPES = ("float64", "float32", "float16", "bfloat16")


def inputs_of(cfg, backend, world, pass_positions=True):
    q_pos, kv_pos = serving.rank_positions(cfg, world.rank, world.size)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    dtype = backend.dtype(cfg.dtype)
    hk = cfg.kv_heads_resolved
    host = {
        "q": inputs.tokens("q", cfg.seed, q_pos, heads=cfg.heads, **dims).astype(dtype),
        "k": inputs.tokens("k", cfg.seed, kv_pos, heads=hk, **dims).astype(dtype),
        "v": inputs.tokens("v", cfg.seed, kv_pos, heads=hk, **dims).astype(dtype),
    }
    return q_pos, kv_pos, host


def run_case(cfg, backend, world):
    """(passed, rel_err, output) of one case; asserts the timings are shaped as the interface says."""
    q_pos, kv_pos, host = inputs_of(cfg, backend, world)
    eng = api.build(api.RankContext(cfg, backend, world), *(backend.asarray(host[n]) for n in "qkv"))
    assert isinstance(eng, api.Engine), type(eng)
    for _ in range(2):  # a second pass gives the same output (state reset)
        c, m, s, total = eng.forward()
    assert len(c) == len(m) == len(s) and total > 0 and np.all(s >= 0), (len(c), len(m), len(s))
    assert eng.bytes_per_rank("fwd") >= 0 and (world.size == 1 or eng.bytes_per_rank("fwd") > 0)
    if world.size > 1:
        assert np.all(np.asarray(eng.comm_only("fwd")) >= 0)
    holds = getattr(eng, "holds_output", True)
    out = backend.asnumpy(eng.output()) if holds else None
    errs = check.forward_errors(cfg, host, out, q_pos) if holds else None
    summary = check.summary(cfg, world.allgather(errs), "fwd")
    return summary, out


def main() -> int:
    world = comm.WORLD
    P = world.size
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    rng = np.random.default_rng(spec.get("seed", 0) * 100 + P)
    backend = get_backend("numpy")
    counts = {"prefill": 0, "decode": 0, "bitwise": 0}
    for layout in ("contiguous", "zigzag", "striped"):
        div = divisor(layout, P)
        for mode in ("overlap", "blocking", "allgather", "pass-q"):
            for dtype in DTYPES:
                h_kv = int(rng.choice([1, 2, 3]))
                cfg = RunConfig(
                    batch=int(rng.integers(1, 3)),
                    seq_len=div * int(rng.integers(2, 7)),
                    heads=h_kv * int(rng.choice([1, 2])),
                    kv_heads=h_kv,
                    head_dim=int(rng.choice([3, 5, 7, 8, 13])),
                    dtype=dtype,
                    causal=True,
                    layout=layout,
                    mode=mode,
                    pass_="prefill",
                    seed=int(rng.integers(0, 1000)),
                    check=True,
                )
                # a random cache size (0 among them), leaving at least one block of new tokens
                cfg.cached_tokens = div * int(rng.integers(0, cfg.seq_len // div))
                assert not validate(cfg, P), validate(cfg, P)
                summary, out = run_case(cfg, backend, world)
                assert summary["passed"], ("prefill", dataclasses.asdict(cfg), summary["rel_err"])
                counts["prefill"] += 1
                if dtype == "float32":  # C = 0 is the causal forward: the same engine over the training layout
                    zero = dataclasses.replace(cfg, cached_tokens=0)
                    fwd = dataclasses.replace(cfg, cached_tokens=0, pass_="fwd")
                    _, got = run_case(zero, backend, world)
                    _, want = run_case(fwd, backend, world)
                    if mode == "pass-q":
                        assert np.allclose(got, want, rtol=0, atol=1e-6), (layout, mode)
                    else:
                        assert np.array_equal(got, want), (layout, mode)
                    counts["bitwise"] += 1
    for layout in ("contiguous", "striped", "zigzag"):
        div = divisor(layout, P)
        for merge in ("ring", "tree", "gather"):
            for dtype in DTYPES:
                h_kv = int(rng.choice([1, 2]))
                n = div * int(rng.integers(1, 9))
                cfg = RunConfig(
                    batch=int(rng.integers(1, 4)),
                    seq_len=n,
                    heads=h_kv * int(rng.choice([1, 3])),
                    kv_heads=h_kv,
                    head_dim=int(rng.choice([3, 5, 8, 11])),
                    dtype=dtype,
                    causal=True,
                    layout=layout,
                    pass_="decode",
                    merge=merge,
                    new_tokens=int(rng.integers(1, min(n, 5) + 1)),
                    seed=int(rng.integers(0, 1000)),
                    check=True,
                )
                assert not validate(cfg, P), validate(cfg, P)
                summary, _ = run_case(cfg, backend, world)
                assert summary["passed"], ("decode", dataclasses.asdict(cfg), summary["rel_err"])
                counts["decode"] += 1
    counts["torch"] = 0
    if unavailable("torch", backend, "float32") is None:  # the fused kernel: its op takes unequal query and key lengths
        for args in (dict(pass_="prefill", cached_tokens=4 * P, mode="overlap"), dict(pass_="prefill", cached_tokens=2 * P, mode="pass-q")):
            for dtype in ("float32", "bfloat16"):
                cfg = RunConfig(
                    seq_len=6 * P, heads=4, kv_heads=2, head_dim=7, causal=True, dtype=dtype, kernel="torch", check=True, **args
                )
                assert run_case(cfg, backend, world)[0]["passed"], (args, dtype)
                counts["torch"] += 1
        for merge in ("ring", "tree", "gather"):
            cfg = RunConfig(seq_len=5 * P, heads=4, kv_heads=2, head_dim=7, causal=True, layout="striped", kernel="torch")
            cfg.pass_, cfg.merge, cfg.new_tokens, cfg.check = "decode", merge, 2, True
            assert run_case(cfg, backend, world)[0]["passed"], merge
            counts["torch"] += 1
    if world.rank == 0:
        print("RESULT " + json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(comm.run_or_abort(main))
