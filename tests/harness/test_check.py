"""ringbench.harness.check: a run's --check folds every rank's comparison into the phase's check attributes."""

from __future__ import annotations

import numpy as np

from ringbench.config import RunConfig
from ringbench.harness import check, inputs
from ringbench.kernels import reference
from ringbench.layout import positions


def test_the_forward_summary_is_the_worst_rank_against_its_tolerance():
    cfg = RunConfig(dtype="float32")
    ranks = [
        {"max_abs_err": 1e-6, "max_abs_ref": 2.0, "finite": True},
        {"max_abs_err": 3e-6, "max_abs_ref": 1.0, "finite": True},
    ]
    s = check.summary(cfg, ranks, "fwd")
    assert s["max_abs_err"] == 3e-6 and s["rel_err"] == 3e-6 / 2.0 and s["tol"] == reference.TOLERANCE["float32"] and s["passed"]
    ranks[0]["finite"] = False
    assert not check.summary(cfg, ranks, "fwd")["passed"]


def test_the_backward_summary_names_each_gradient_and_fails_on_the_worst():
    cfg = RunConfig(dtype="float32")
    one = {n: {"max_abs_err": 1e-7, "max_abs_ref": 1.0, "finite": True} for n in check.GRADS}
    bad = {**one, "dk": {"max_abs_err": 0.5, "max_abs_ref": 1.0, "finite": True}}
    s = check.summary(cfg, [one, bad], "bwd")
    assert s["dk_rel_err"] == 0.5 and s["rel_err"] == 0.5 and not s["passed"]
    assert check.summary(cfg, [one, one], "bwd")["passed"]


def test_forward_errors_of_the_reference_itself_are_zero():
    """One rank of a 2-rank zigzag layout: its exact float64 output compares with error 0."""
    cfg = RunConfig(seq_len=12, heads=2, head_dim=5, causal=True, layout="zigzag", dtype="float64", check=True)
    pos = positions(cfg.layout, 1, 2, cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    host = {n: inputs.tokens(n, cfg.seed, pos, heads=cfg.heads, **dims) for n in ("q",)}
    allpos = np.arange(cfg.seq_len)
    k, v = (inputs.tokens(n, cfg.seed, allpos, heads=cfg.heads, **dims) for n in ("k", "v"))
    out = reference.reference_attention(host["q"], k, v, causal=True, q_pos=pos, k_pos=allpos)
    e = check.forward_errors(cfg, host, out, pos)
    assert e["max_abs_err"] == 0.0 and e["finite"] and e["max_abs_ref"] > 0
