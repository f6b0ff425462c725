"""Blockwise attention with an online softmax: pure math over an array module ``xp``.

Nothing here knows about MPI or about which device it runs on; functions take arrays and ``xp``
(numpy or cupy). The public layout is flash-attn's (B, N, H, D); inside a rank the kernel works on
head-major copies so that every score tile is one batched matrix product:

    q: (Z, G, n, D)   Z = B * H_kv batch-heads, G = H / H_kv query heads per kv head (GQA/MQA)
    k, v: (Z, m, D)

Query head h reads kv head h // G (PyTorch SDPA's ``enable_gqa`` convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np

from ringbench.layout import FULL, Piece


# ---------------------------------------------------------------------------------------------
# Layout changes between the public (B, N, H, D) and the kernel's head-major layout
# ---------------------------------------------------------------------------------------------
def q_to_heads(xp, q, kv_heads: int, dtype=None):
    """(B, n, H, D) -> (B*H_kv, G, n, D), contiguous, optionally cast."""
    b, n, h, d = q.shape
    g = h // kv_heads
    x = q.reshape(b, n, kv_heads, g, d).transpose(0, 2, 3, 1, 4)  # (B, H_kv, G, n, D)
    return xp.ascontiguousarray(x, dtype=dtype).reshape(b * kv_heads, g, n, d)


def kv_to_heads(xp, x, dtype=None):
    """(B, n, H_kv, D) -> (B*H_kv, n, D), contiguous, optionally cast."""
    b, n, hk, d = x.shape
    return xp.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=dtype).reshape(b * hk, n, d)


def heads_to_out(o, batch: int):
    """(B*H_kv, G, n, D) -> (B, n, H, D) view-then-copy."""
    z, g, n, d = o.shape
    hk = z // batch
    return o.reshape(batch, hk, g, n, d).transpose(0, 3, 1, 2, 4).reshape(batch, n, hk * g, d)


# ---------------------------------------------------------------------------------------------
# The online-softmax accumulator
# ---------------------------------------------------------------------------------------------
class OnlineSoftmax:
    """Running (max, sum, weighted V) for one rank's queries, updated block by block.

    ``q`` must already be scaled by 1/sqrt(D) and be in the compute dtype. Tiles: ``head_chunk``
    batch-heads and ``tile_q`` query rows at a time, against at most ``tile_k`` keys; the score tile
    buffer is allocated once and reused, so memory stays O(n) beyond one tile.
    ``on_tile`` (if given) is called after every tile: the ring uses it to drive MPI progress.
    """

    def __init__(self, xp, q, *, head_chunk: int | None = None, tile_q: int | None = None,
                 tile_k: int | None = None, on_tile: Callable[[], None] | None = None):
        self.xp = xp
        self.q = q                                     # (Z, G, n, D)
        z, g, n, d = q.shape
        self.head_chunk = min(head_chunk or z, z)
        self.tile_q = min(tile_q or n, n)
        self.tile_k = tile_k                           # None: whole key block
        self.on_tile = on_tile
        self.acc = xp.zeros((z, g, n, d), q.dtype)    # sum_j p_ij v_j, rescaled to the running max
        self.m = xp.full((z, g, n), -np.inf, q.dtype)  # running row max of the scores
        self.l = xp.zeros((z, g, n), q.dtype)          # running row sum of exp(score - m)
        self._s = None                                 # flat score-tile buffer
        self._pv = None                                # flat (p @ v) tile buffer

    def reset(self) -> None:
        self.acc.fill(0)
        self.m.fill(-np.inf)
        self.l.fill(0)

    def _buffers(self, tq: int, tk: int):
        z, g, _, d = self.q.shape
        zc = self.head_chunk
        need = zc * g * self.tile_q * max(tk, 1)
        if self._s is None or self._s.size < need:
            self._s = self.xp.empty(need, self.q.dtype)
        if self._pv is None:
            self._pv = self.xp.empty(zc * g * self.tile_q * d, self.q.dtype)
        return self._s, self._pv

    def update(self, k, v, pieces: Sequence[Piece]) -> None:
        """Fold the key/value block ``k, v`` (Z, m, D) into the state, for the given pieces."""
        for piece in pieces:
            self._update_piece(k, v, piece)

    def _update_piece(self, k, v, p: Piece) -> None:
        z = self.q.shape[0]
        nk = p.k1 - p.k0
        tk_max = self.tile_k or nk
        for z0 in range(0, z, self.head_chunk):
            z1 = min(z0 + self.head_chunk, z)
            for i0 in range(0, p.q1 - p.q0, self.tile_q):
                i1 = min(i0 + self.tile_q, p.q1 - p.q0)
                # keys past the diagonal are masked for every row of this tile: never touch them
                kend = nk if p.mask == FULL else min(nk, i1 if p.mask == "causal" else i1 - 1)
                for j0 in range(0, kend, tk_max):
                    j1 = min(j0 + tk_max, kend)
                    self._tile(k, v, p, z0, z1, i0, i1, j0, j1)
                    if self.on_tile is not None:
                        self.on_tile()

    def _tile(self, k, v, p: Piece, z0, z1, i0, i1, j0, j1) -> None:
        xp = self.xp
        g = self.q.shape[1]
        zc, tq, tk = z1 - z0, i1 - i0, j1 - j0
        sbuf, pvbuf = self._buffers(tq, tk)
        s = sbuf[: zc * g * tq * tk].reshape(zc, g, tq, tk)            # (Zc, G, tq, tk)
        qt = self.q[z0:z1, :, p.q0 + i0:p.q0 + i1]                       # (Zc, G, tq, D)
        kt = k[z0:z1, None, p.k0 + j0:p.k0 + j1].swapaxes(-1, -2)        # (Zc, 1, D, tk)
        xp.matmul(qt, kt, out=s)
        if p.mask != FULL and j1 > i0 - (p.mask != "causal"):
            # only tiles that cross the diagonal need a mask
            rows = xp.arange(i0, i1)[:, None]
            cols = xp.arange(j0, j1)[None, :]
            masked = cols > rows if p.mask == "causal" else cols >= rows
            xp.copyto(s, -np.inf, where=masked)
        rows_sl = (slice(z0, z1), slice(None), slice(p.q0 + i0, p.q0 + i1))
        m_old = self.m[rows_sl]                                          # (Zc, G, tq)
        m_new = xp.maximum(m_old, s.max(axis=-1))
        # a row with every key masked so far keeps m = -inf: shift by 0 so exp gives 0, never NaN
        m_use = xp.where(m_new == -np.inf, 0, m_new)
        s -= m_use[..., None]
        xp.exp(s, out=s)                                                 # p = exp(s - m)
        alpha = xp.exp(m_old - m_use)                                    # rescale of the old state
        l = self.l[rows_sl]
        l *= alpha
        l += s.sum(axis=-1)
        pv = pvbuf[: zc * g * tq * self.q.shape[3]].reshape(zc, g, tq, self.q.shape[3])
        vt = v[z0:z1, None, p.k0 + j0:p.k0 + j1]                         # (Zc, 1, tk, D)
        xp.matmul(s, vt, out=pv)
        acc = self.acc[rows_sl]
        acc *= alpha[..., None]
        acc += pv
        self.m[rows_sl] = m_new

    def finalize(self, out_dtype=None):
        """Normalised output (Z, G, n, D) and log-sum-exp (Z, G, n); rows that saw no key give 0 and -inf."""
        xp = self.xp
        l_safe = xp.where(self.l == 0, 1, self.l)
        out = self.acc / l_safe[..., None]
        with np.errstate(divide="ignore"):
            lse = self.m + xp.log(self.l)
        return (out if out_dtype is None else out.astype(out_dtype)), lse


def merge(xp, out_a, lse_a, out_b, lse_b):
    """Exact merge of two normalised partial attentions over disjoint key sets.

    out: (..., n, D), lse: (..., n). Stable for large logits (weights are exp(lse - max) <= 1);
    a side with lse = -inf (saw no key) gets weight 0, and two such sides give 0 and -inf.
    """
    m = xp.maximum(lse_a, lse_b)
    m_use = xp.where(m == -np.inf, 0, m)
    wa = xp.exp(lse_a - m_use)
    wb = xp.exp(lse_b - m_use)
    tot = wa + wb
    safe = xp.where(tot == 0, 1, tot)
    out = out_a * (wa / safe)[..., None] + out_b * (wb / safe)[..., None]
    with np.errstate(divide="ignore"):
        lse = m_use + xp.log(tot)
    return out, lse


def flops(batch: int, heads: int, head_dim: int, pairs: int) -> float:
    """Matmul FLOPs of attention over ``pairs`` unmasked (query, key) pairs: QK^T and PV, 2 FLOPs per MAC."""
    return 4.0 * batch * heads * head_dim * pairs


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------------------------------
# Float64 reference (NumPy only): exact softmax over all keys, a block of queries at a time
# ---------------------------------------------------------------------------------------------
def reference_attention(q, k, v, *, causal: bool, q_pos=None, k_pos=None, chunk: int = 256) -> np.ndarray:
    """Full attention in float64. q: (B, Nq, H, D), k/v: (B, Nk, H_kv, D); positions give the causal mask.

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
        qh = q[:, i0:i1].transpose(0, 2, 1, 3)            # (B, H, c, D)
        s = qh @ kh.swapaxes(-1, -2) * scale              # (B, H, c, Nk)
        if causal:
            s = np.where(k_pos[None, :] > q_pos[i0:i1, None], -np.inf, s)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), 0, m)
        p = np.exp(s - m)
        den = p.sum(axis=-1, keepdims=True)
        o = (p @ vh) / np.where(den == 0, 1, den)
        out[:, i0:i1] = o.transpose(0, 2, 1, 3)
    return out
