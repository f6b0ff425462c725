"""Run under ``mpiexec -n P`` by tests/engine/test_engine_api.py: every engine registered in ringbench.engine.api.ENGINES that
the configuration rules allow at this rank count, built by ``api.build`` from a RankContext and used only through the
Engine interface: its forward and backward checked against float64 by ringbench.harness.check (the run's own check),
its timings shaped as the interface says. Prints ``RESULT {"checked": [...]}`` from rank 0; any failure aborts the job."""

import dataclasses
import json
import sys

import numpy as np

from ringbench.config import RunConfig, validate
from ringbench.engine import api, comm
from ringbench.engine.backend import get_backend
from ringbench.harness import check, inputs
from ringbench.layout import positions


def case(cfg, backend, world):
    rank, nranks = world.rank, world.size
    pos = positions(cfg.layout, rank, nranks, cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    hk = cfg.kv_heads_resolved
    dtype = backend.dtype(cfg.dtype)
    host = {n: inputs.tokens(n, cfg.seed, pos, heads=hk if n in "kv" else cfg.heads, **dims).astype(dtype) for n in ("q", "k", "v", "do")}
    dev = {n: backend.asarray(x) for n, x in host.items()}
    eng = api.build(api.RankContext(cfg, backend, world), dev["q"], dev["k"], dev["v"], do=dev["do"])
    assert isinstance(eng, api.Engine), type(eng)
    c, m, s, total = eng.forward()
    assert len(c) == len(m) == len(s) and total > 0 and np.all(s >= 0)
    eng.prepare_backward()
    c, m, s, total = eng.backward()
    assert len(c) == len(m) == len(s) and total > 0
    for ph in ("fwd", "bwd"):
        assert eng.bytes_per_rank(ph) >= 0 and (nranks == 1 or eng.bytes_per_rank(ph) > 0)
        if nranks > 1:
            assert np.all(np.asarray(eng.comm_only(ph)) >= 0)
    eng.forward()  # the output of the last forward
    fwd = check.summary(cfg, world.allgather(check.forward_errors(cfg, host, backend.asnumpy(eng.output()), pos)), "fwd")
    grads = tuple(backend.asnumpy(g) for g in eng.grads())
    bwd = check.summary(cfg, world.allgather(check.backward_errors(cfg, host, grads, pos)), "bwd")
    assert fwd["passed"] and bwd["passed"], (cfg.mode, cfg.ulysses_degree, fwd["rel_err"], bwd["rel_err"])
    return f"{cfg.mode}{'/U=' + str(cfg.ulysses_degree) if cfg.mode == 'hybrid' else ''}"


def main() -> int:
    world = comm.WORLD
    nranks = world.size
    backend = get_backend("numpy")
    base = RunConfig(seq_len=12 * nranks * 2, heads=4, kv_heads=2, head_dim=7, batch=2, causal=True, layout="zigzag", check=True)
    checked = []
    for mode in api.ENGINES:
        for u in (2, 4) if mode == "hybrid" else (base.ulysses_degree,):
            cfg = dataclasses.replace(base, mode=mode, ulysses_degree=u, pass_="fwd+bwd")
            if validate(cfg, nranks):
                continue  # not valid at this rank count (heads or U)
            checked.append(case(cfg, backend, world))
    if world.rank == 0:
        print("RESULT " + json.dumps({"checked": checked}))
    return 0


if __name__ == "__main__":
    sys.exit(comm.run_or_abort(main))
