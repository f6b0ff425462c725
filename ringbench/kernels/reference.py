"""The float64 reference of every numeric path and the tolerances a checked run is held to: one home.

Used by ``ringbench run --check`` (ringbench.harness.check), doctor, probe, the tests and the benchmarks.
NumPy only, float64 throughout, a block of query rows at a time (memory: one (B, H, chunk, Nk) score block):

* :func:`reference_attention`: full attention, O = softmax(Q K^T / sqrt(D)) V, with a causal mask by position and,
  with packed documents and a sliding window, their mask (:func:`hidden_keys`: the one dense definition of it);
* :func:`reference_attention_grad`: exact gradients (dQ, dK, dV) of sum(O * dO);
* ``TOLERANCE`` / ``TOLERANCE_BWD``: the largest max|got - ref| / max|ref| accepted per storage dtype, against the
  reference of the inputs rounded to that dtype (the reference never sees more precision than the run had);
  :func:`rel_err` and :func:`within` apply them.
"""

from __future__ import annotations

import math

import numpy as np

# Largest max|out - ref| / max|ref| accepted by --check, per storage dtype. Half precision is
# dominated by rounding the output to the storage dtype (2^-11 for float16, 2^-8 for bfloat16).
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# max |grad - ref| / max |ref| allowed for each of dQ, dK, dV per storage dtype, against float64 gradients of the
# inputs rounded to that dtype, with the gradients rounded to it too. Measured: float32 ~1e-6, float16 ~4e-4,
# bfloat16 ~3.5e-3 (N = 96 to 1024, P = 3 and 4, causal); the same bounds as the forward check (TOLERANCE).
TOLERANCE_BWD = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| in float64 (max |got - ref| when the reference is all zeros)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err, scale = float(np.abs(got - ref).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))
    return err / scale if scale > 0 else err


def within(got, ref, dtype: str, phase: str = "fwd") -> bool:
    """Whether ``got`` is finite and within the tolerance of storage dtype ``dtype`` of the float64 ``ref``."""
    tol = (TOLERANCE if phase == "fwd" else TOLERANCE_BWD)[dtype]
    return bool(np.isfinite(np.asarray(got, np.float64)).all()) and rel_err(got, ref) <= tol


def hidden_keys(q_pos, k_pos, *, causal: bool, docs=(), window: int = 0):
    """Boolean (Nq, Nk) 'key hidden from query' of global positions ``q_pos`` x ``k_pos``, or None when none is:
    keys of another document (``docs``: the lengths, summing to N; () or one: none), later keys when causal, and
    with a window W keys at or before t - W (query t sees t - W < u <= t)."""
    q_pos, k_pos = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
    out = None
    if len(docs) > 1:
        starts = np.cumsum(docs)[:-1]
        out = np.searchsorted(starts, q_pos, side="right") != np.searchsorted(starts, k_pos, side="right")
    if causal:
        later = k_pos > q_pos
        out = later if out is None else out | later
    if window:
        old = k_pos <= q_pos - window
        out = old if out is None else out | old
    return out


def reference_attention(q, k, v, *, causal: bool, q_pos=None, k_pos=None, chunk: int = 256, docs=(), window: int = 0) -> np.ndarray:
    """Full attention in float64. q: (B, Nq, H, D), k/v: (B, Nk, H_kv, D); positions give the causal mask (and the
    document and window mask, :func:`hidden_keys`).

    Returns (B, Nq, H, D) float64. Rows whose every key is masked are 0.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    b, nq, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    q_pos = np.arange(nq) if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(k.shape[1]) if k_pos is None else np.asarray(k_pos)
    kh = np.repeat(k.transpose(0, 2, 1, 3), g, axis=1)  # (B, H, Nk, D)
    vh = np.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    out = np.zeros((b, nq, h, d))
    scale = 1.0 / math.sqrt(d)
    for i0 in range(0, nq, chunk):
        i1 = min(i0 + chunk, nq)
        qh = q[:, i0:i1].transpose(0, 2, 1, 3)  # (B, H, c, D)
        s = qh @ kh.swapaxes(-1, -2) * scale  # (B, H, c, Nk)
        hide = hidden_keys(q_pos[i0:i1], k_pos, causal=causal, docs=docs, window=window)
        if hide is not None:
            s = np.where(hide, -np.inf, s)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), 0, m)
        p = np.exp(s - m)
        den = p.sum(axis=-1, keepdims=True)
        o = (p @ vh) / np.where(den == 0, 1, den)
        out[:, i0:i1] = o.transpose(0, 2, 1, 3)
    return out


def reference_attention_grad(q, k, v, do, *, causal: bool, q_pos=None, k_pos=None, chunk: int = 256, docs=(), window: int = 0):
    """Gradients of sum(attention(q, k, v) * do) in float64: (dq, dk, dv).

    q, do: (B, Nq, H, D); k, v: (B, Nk, H_kv, D); positions give the causal mask (key visible iff k_pos <=
    q_pos; documents and window: :func:`hidden_keys`), as :func:`reference_attention`. Returns dq (B, Nq, H, D),
    dk and dv (B, Nk, H_kv, D); a row whose every key is masked contributes 0 everywhere. Memory: one
    (B, H, chunk, Nk) score block at a time.
    """
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    b, nq, h, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    g = h // hk
    q_pos = np.arange(nq) if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(nk) if k_pos is None else np.asarray(k_pos)
    kh = np.repeat(k.transpose(0, 2, 1, 3), g, axis=1)  # (B, H, Nk, D)
    vh = np.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    scale = 1.0 / math.sqrt(d)
    dq = np.zeros((b, nq, h, d))
    dkh = np.zeros((b, h, nk, d))
    dvh = np.zeros((b, h, nk, d))
    for i0 in range(0, nq, chunk):
        i1 = min(i0 + chunk, nq)
        qh = q[:, i0:i1].transpose(0, 2, 1, 3)  # (B, H, c, D)
        doh = do[:, i0:i1].transpose(0, 2, 1, 3)
        s = qh @ kh.swapaxes(-1, -2) * scale  # (B, H, c, Nk)
        hide = hidden_keys(q_pos[i0:i1], k_pos, causal=causal, docs=docs, window=window)
        if hide is not None:
            s = np.where(hide, -np.inf, s)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - np.where(np.isneginf(m), 0, m))
        den = p.sum(axis=-1, keepdims=True)
        p /= np.where(den == 0, 1, den)  # softmax; a fully masked row stays 0
        o = p @ vh
        dvh += p.swapaxes(-1, -2) @ doh
        dp = doh @ vh.swapaxes(-1, -2)
        ds = p * (dp - (doh * o).sum(axis=-1, keepdims=True))
        dq[:, i0:i1] = (ds @ kh * scale).transpose(0, 2, 1, 3)
        dkh += ds.swapaxes(-1, -2) @ qh * scale
    dk = dkh.reshape(b, hk, g, nk, d).sum(axis=2).transpose(0, 2, 1, 3)  # a kv head sums its G query heads
    dv = dvh.reshape(b, hk, g, nk, d).sum(axis=2).transpose(0, 2, 1, 3)
    return dq, np.ascontiguousarray(dk), np.ascontiguousarray(dv)
