"""The float64 check of a run (``--check``): each rank's output and gradients against the float64 reference.

Every rank regenerates the global K/V (and dO) it needs from ringbench.harness.inputs (the same rounded inputs the
run used), computes the reference of its own queries (ringbench.kernels.reference) and compares; rank 0 folds the
ranks' comparisons into the phase's check attributes (:func:`summary`: the worst relative error over ranks and
tensors against the storage dtype's tolerance). The forward and the backward comparison are here once, for the
runner, doctor and the MPI test workers.
"""

from __future__ import annotations

import numpy as np

from ringbench.config import RunConfig
from ringbench.engine import comm
from ringbench.harness import inputs
from ringbench.kernels import reference


def global_kv(cfg: RunConfig, dtype):
    """(every position, K, V) of the whole sequence, rounded to ``dtype``: what every rank's reference attends to."""
    allpos = np.arange(cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    k, v = (inputs.tokens(name, cfg.seed, allpos, heads=cfg.kv_heads_resolved, **dims).astype(dtype) for name in ("k", "v"))
    return allpos, k, v


def forward_errors(cfg: RunConfig, host: dict, output: np.ndarray, pos) -> dict:
    """Compare this rank's output with a float64 reference over the global K/V (same rounded inputs)."""
    allpos, k, v = global_kv(cfg, host["q"].dtype)
    mask = dict(docs=cfg.doc_lengths, window=cfg.window)  # packed documents and window: the same mask as the run
    ref = reference.reference_attention(host["q"], k, v, causal=cfg.causal, q_pos=pos, k_pos=allpos, **mask)
    diff = np.abs(output.astype(np.float64) - ref)
    return {
        "max_abs_err": float(diff.max()),
        "max_abs_ref": float(np.abs(ref).max()),
        "finite": bool(np.isfinite(output.astype(np.float64)).all()),
    }


GRADS = ("dq", "dk", "dv")


def backward_errors(cfg: RunConfig, host: dict, grads, pos) -> dict:
    """Collective: compare this rank's dQ, dK, dV with float64 reference gradients of full attention on the same
    rounded global inputs and dO. Each rank computes the reference for its own queries against every key (dQ of
    its queries exactly, its queries' part of every key's dK/dV); the parts are summed over the ranks."""
    allpos, k, v = global_kv(cfg, host["q"].dtype)
    mask = dict(docs=cfg.doc_lengths, window=cfg.window)
    dq, dk, dv = reference.reference_attention_grad(host["q"], k, v, host["do"], causal=cfg.causal, q_pos=pos, k_pos=allpos, **mask)
    comm.allreduce_sum(dk)
    comm.allreduce_sum(dv)
    refs = {"dq": dq, "dk": dk[:, pos], "dv": dv[:, pos]}
    out = {}
    for name, got in zip(GRADS, grads):
        got = got.astype(np.float64)
        out[name] = {
            "max_abs_err": float(np.abs(got - refs[name]).max()),
            "max_abs_ref": float(np.abs(refs[name]).max()),
            "finite": bool(np.isfinite(got).all()),
        }
    return out


def _masked(cfg) -> str:
    """What the reference's mask adds to its description: the documents and the window, where the run has them."""
    docs = f"{len(cfg.doc_lengths)} documents ({cfg.docs})" if cfg.docs else ""
    window = f"window {cfg.window}" if cfg.window else ""
    return f", masked by {' and '.join(x for x in (docs, window) if x)}" if docs or window else ""


def _rel(max_abs: float, max_ref: float) -> float:
    return max_abs / max_ref if max_ref > 0 else max_abs


def summary(cfg, checks: list, phase: str) -> dict:
    """The check attributes of a phase from every rank's comparison: the worst error over ranks (and tensors); a rank
    that holds no output (None: decode's gather merge leaves it on rank 0) has nothing to compare."""
    checks = [c for c in checks if c is not None]
    if phase == "fwd":
        max_abs = max(c["max_abs_err"] for c in checks)
        rel = _rel(max_abs, max(c["max_abs_ref"] for c in checks))
        finite = all(c["finite"] for c in checks)
        tol = reference.TOLERANCE[cfg.dtype]
        return {
            "max_abs_err": max_abs,
            "rel_err": rel,
            "tol": tol,
            "passed": bool(finite and rel <= tol),
            "reference": "float64 full attention on the same rounded inputs" + _masked(cfg),
        }
    out, finite = {}, True
    for name in GRADS:
        out[f"{name}_max_abs_err"] = max(c[name]["max_abs_err"] for c in checks)
        out[f"{name}_rel_err"] = _rel(out[f"{name}_max_abs_err"], max(c[name]["max_abs_ref"] for c in checks))
        finite = finite and all(c[name]["finite"] for c in checks)
    worst = max(GRADS, key=lambda n: out[f"{n}_rel_err"])
    tol = reference.TOLERANCE_BWD[cfg.dtype]
    out.update(
        max_abs_err=max(out[f"{n}_max_abs_err"] for n in GRADS),
        rel_err=out[f"{worst}_rel_err"],
        tol=tol,
        passed=bool(finite and out[f"{worst}_rel_err"] <= tol),
        reference="float64 gradients of full attention on the same rounded inputs and dO" + _masked(cfg),
    )
    return out
