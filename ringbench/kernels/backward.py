"""The backward pass of blockwise attention, block pair by block pair: pure math over an array module ``xp``.

FlashAttention-2's formulation with the forward's saved log-sum-exp (no softmax is recomputed from scratch,
no N x N array is formed). For one rank's queries and one K/V block at a time:

    D_i = rowsum(dO_i * O_i)                     once per pass
    S = Q K^T * scale;  P = exp(S - LSE)         per score tile
    dV += P^T dO;  dP = dO V^T;  dS = P * (dP - D)
    dQ += dS K * scale;  dK += dS^T Q * scale

:class:`BlockBackward` holds one rank's queries, dO, O and LSE and the local dQ accumulator; each
:meth:`BlockBackward.update` folds in one K/V block and adds that block's dK and dV into accumulators that
the caller owns (in the ring backward they travel with the K/V block, so every rank adds its share).
Layouts are the kernel's head-major ones (``ringbench.kernels.kernel``): q, dO, O (Z, G, n, D), LSE (Z, G, n),
k, v, dK, dV (Z, m, D), Z = B * H_kv, G = H / H_kv; a kv head's dK and dV sum over its G query heads.

P is taken as exp(S - LSE) or as 2^((S - LSE) log2(e)), whichever NumPy computes faster on this CPU
(:func:`fast_exp_base`). For base 2 only the keys' transposed copy and the LSE column are scaled by log2(e): the
queries stay as given, so dK = dS^T Q needs no rescaling; the base changes rounding only. Half precision
computes and accumulates in float32 (float64 stays float64): ``kernel.compute_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ringbench.kernels import kernel
from ringbench.layout import FULL, Piece, band

# Elements of one score tile on the host (the backward holds two: P and dS, 1 MiB each in float32). 512 query rows
# x 512 keys was within the noise of the best tile among 128-1024 rows x 256-1024 keys (benchmarks/README.md).
HOST_TILE_ELEMS_BWD = 1 << 18
HOST_TILE_K_BWD = 512

# Masked scores are set to this before the exponential and P to exactly 0 after: exp and exp2 take slow paths for
# -inf and for results below float32's normal range (the forward's kernel.MASKED, per base).
MASKED = {"2": -126.0, "e": -87.0}


def fast_exp_base(xp) -> str:
    """'2' (exp2) or 'e' (exp): the faster float32 exponential of ``xp``, decided by the CPU, not by timing (so
    every rank of a node, and every run, does the same arithmetic). NumPy, measured on one AMD EPYC core:
    with its AVX-512 loops exp2 takes 120 us and exp 247 us per 2^19 elements; restricted to AVX2
    (NPY_DISABLE_CPU_FEATURES) exp2 takes 1330 us and exp 900 us. Off the host: '2'."""
    if xp is not np:
        return "2"
    return "2" if kernel.numpy_has_avx512() else "e"


def auto_tiles(n_q: int, n_k: int, g: int, z: int, *, gpu: bool = False) -> tuple[int, int, int]:
    """(tile_q, tile_k, head_chunk) for a backward over n_q queries (G heads each) and blocks of n_k keys.

    Host: score tiles of about HOST_TILE_ELEMS_BWD elements, at most HOST_TILE_K_BWD keys wide, one batch-head
    at a time unless a head's whole tile is smaller than the budget. Device: every batch-head and key at once.
    """
    if gpu:
        return n_q, n_k, z
    tile_k = max(1, min(n_k, HOST_TILE_K_BWD))
    tile_q = max(1, min(n_q, HOST_TILE_ELEMS_BWD // max(1, g * tile_k)))
    head_chunk = max(1, min(z, HOST_TILE_ELEMS_BWD // max(1, g * tile_q * tile_k)))
    return tile_q, tile_k, head_chunk


def heads_to_kv(x, batch: int):
    """(B*H_kv, m, D) -> (B, m, H_kv, D), a view: the inverse of ``kernel.kv_to_heads``."""
    z, m, d = x.shape
    return x.reshape(batch, z // batch, m, d).transpose(0, 2, 1, 3)


class BlockBackward(kernel.Scratch):
    """One rank's share of the attention backward: dQ of its queries, dK/dV of every block it meets.

    ``q`` (Z, G, n, D) as the forward's ``OnlineSoftmax`` takes it (already multiplied by ``scale``, the
    softmax scale, 1/sqrt(D) by default); ``do`` and ``out`` (Z, G, n, D) the upstream gradient and the
    forward's output; ``lse`` (Z, G, n) the natural-log log-sum-exp ``OnlineSoftmax.finalize`` returns (-inf
    for rows that saw no key: their gradient is exactly 0). Any float dtype: the object keeps its own copies
    in the compute dtype (float32 for half precision), query-major (Z, n, G, D+1) so that the G query heads of
    a kv head stack into the rows of one matrix, each widened by one column: [q, -LSE log_b(e)] and [dO, -D],
    which a ones row under the keys turns into the shifted scores and dP - D in the GEMMs themselves.

    ``out`` is read once, for D, and not kept; LSE lives on in the widened query copy. Beyond its three
    (Z, n, G, D[+1]) arrays the object holds two score tiles and the transposed K and V of one head chunk.

    Tiles: ``head_chunk`` batch-heads, ``tile_q`` query positions (times G heads), at most ``tile_k`` keys;
    the two score-tile buffers (P and dS) are allocated once and reused: memory is O(n) beyond them.
    ``on_tile`` (if given) is called after every tile (the ring drives MPI progress with it). ``matmul`` is the
    batched GEMM (``xp.matmul`` by default; the ring may pass ``backend.MklMatmul``, whose ``matmul_add``
    accumulates dQ, dK and dV in place). The arithmetic depends only on the data and the tiling, so equal
    inputs give bitwise equal gradients.
    """

    _masked_part = kernel.OnlineSoftmax._masked_part  # the kernel's one definition of the masks (layout.band_hidden)

    def __init__(
        self,
        xp,
        q,
        do,
        out,
        lse,
        *,
        scale: float | None = None,
        tile_q: int | None = None,
        tile_k: int | None = None,
        head_chunk: int | None = None,
        matmul: Callable | None = None,
        on_tile: Callable[[], None] | None = None,
        exp_base: str | None = None,
    ):
        self.xp = xp
        exp_base = "2" if exp_base == "fused" else exp_base  # the forward's fused pass works in base 2
        self.exp_base = exp_base or fast_exp_base(xp)
        if self.exp_base not in MASKED:
            raise ValueError(f"BlockBackward: exp_base must be '2' or 'e', got {exp_base!r}")
        self._exp = xp.exp2 if self.exp_base == "2" else xp.exp
        self._log_e = 1.0 if self.exp_base == "e" else kernel.LOG2E  # log_b(e)
        z, g, n, d = q.shape
        if do.shape != q.shape or out.shape != q.shape or lse.shape != (z, g, n):
            raise ValueError(f"BlockBackward: q {q.shape}, do {do.shape}, out {out.shape} must match and lse {lse.shape} be (Z, G, n)")
        self.shape = (z, g, n, d)
        self.dtype = dt = kernel.compute_dtype(q.dtype)
        self.scale = kernel.softmax_scale(d) if scale is None else float(scale)
        self.matmul = matmul or xp.matmul
        self.matmul_add = getattr(matmul, "matmul_add", None)  # c += a @ b in one GEMM, where offered
        self.head_chunk = max(1, min(head_chunk or z, z))
        self.tile_q = max(1, min(tile_q or n, n))
        self.tile_k = tile_k  # None: whole key block
        self.on_tile = on_tile
        self.qa = xp.empty((z, n, g, d + 1), dt)  # [q, -LSE log_b(e)], query-major (b: the exponential's base)
        self._load_q(q, lse)
        self.doa = xp.empty((z, n, g, d + 1), dt)  # [dO, -D], query-major
        self.doa[..., :d] = do.transpose(0, 2, 1, 3)
        self.set_delta(xp.asarray(out, dt).transpose(0, 2, 1, 3))
        self.dqa = xp.zeros((z, n, g, d), dt)  # dQ / scale, query-major
        self._scratch = {}  # flat work buffers: scratch_elems
        self._masks = {}  # (tq, tk, i0 - j0, mask) -> boolean pattern (kernel's cache)

    def _load_q(self, q, lse, q_scale: float = 1.0) -> None:
        """[q q_scale, -LSE log_b(e)] into ``qa`` (the product in the compute dtype)."""
        xp, dt, d = self.xp, self.dtype, self.shape[3]
        self.qa[..., :d] = q.transpose(0, 2, 1, 3)
        if q_scale != 1.0:
            self.qa[..., :d] *= dt.type(q_scale)
        lse_t = xp.asarray(lse, dt).transpose(0, 2, 1)  # (Z, n, G)
        # a row that saw no key (-inf) is masked wherever it is computed: any finite shift will do
        xp.multiply(xp.where(lse_t == -np.inf, 0, lse_t), dt.type(-self._log_e), out=self.qa[..., d])

    def set_delta(self, out) -> None:
        """The last column of ``doa``, -D with D = rowsum(dO * O), from the dO in ``doa[..., :D]`` and the forward's
        output ``out`` (Z, n, G, D) query-major, any dtype. The constructor calls it; a caller that writes a new dO
        into ``doa[..., :D]`` for the same queries and O (hybrid: dO arrives by an all-to-all each pass) calls it again."""
        xp, d = self.xp, self.shape[3]
        delta = xp.sum(self.doa[..., :d] * xp.asarray(out, self.dtype), axis=-1)  # D = rowsum(dO * O), (Z, n, G)
        kernel.negate(xp, delta, out=self.doa[..., d])

    def reset(self) -> None:
        """Zero dQ for another pass over the same q, dO, O and LSE."""
        self.dqa.fill(0)

    def load(self, q, do, lse, delta, q_scale: float = 1.0) -> None:
        """Replace the rows by another block of queries of the same shape and zero dQ (pass-Q: the visiting blocks).

        ``q``, ``do`` (Z, G, n, D) in any float dtype and strides; q is multiplied by ``q_scale`` here, in the compute
        dtype (1: it comes scaled, as the constructor's q); ``lse`` (Z, G, n) as the constructor's; ``delta`` (Z, G, n)
        = rowsum(dO * O), which the constructor computes from O (:meth:`delta`) and which travels instead of O."""
        z, g, n, d = self.shape
        if q.shape != self.shape or do.shape != self.shape or lse.shape != (z, g, n) or delta.shape != (z, g, n):
            raise ValueError(
                f"BlockBackward.load: q {q.shape}, do {do.shape} must be {self.shape}, lse {lse.shape}, delta {delta.shape} (Z, G, n)"
            )
        self._load_q(q, lse, q_scale)
        self.doa[..., :d] = do.transpose(0, 2, 1, 3)
        kernel.negate(self.xp, self.xp.asarray(delta, self.dtype).transpose(0, 2, 1), out=self.doa[..., d])
        self.dqa.fill(0)

    def delta(self):
        """D = rowsum(dO * O) (Z, G, n) of the loaded rows, in the compute dtype: a new array."""
        return self.xp.ascontiguousarray(kernel.negate(self.xp, self.doa[..., self.shape[3]].transpose(0, 2, 1)))

    @staticmethod
    def scratch_elems(
        g: int, d: int, nq: int, nk: int, *, head_chunk: int, tile_q: int, tile_k: int | None, mask=FULL, in_place: bool = False
    ) -> dict[str, int]:
        """Elements of each work buffer a piece of ``nq`` query positions (G heads each) against ``nk`` keys needs:
        keys and values, the [k^T; 1] and [v^T; 1] copies of one head chunk; scores and dscores, the P and dS
        tiles; product, one GEMM's result before it is added (none when the GEMM adds in place, ``in_place``:
        MKL's matmul_add). The buffers grow to the largest piece's (:meth:`scratch`)."""
        tq, tk = kernel.piece_tiles(Piece(0, nq, 0, nk, mask), tile_q, tile_k)  # as the forward tiles it
        rq = min(tq, nq) * g
        hc = head_chunk
        need = {"keys": hc * (d + 1) * nk, "values": hc * (d + 1) * nk, "scores": hc * rq * tk, "dscores": hc * rq * tk}
        if not in_place:
            need["product"] = hc * max(rq, tk) * d
        return need

    @property
    def head_bounds(self) -> tuple[int, ...]:
        """The bounds of the head chunks (0, hc, 2 hc, ..., Z): where :meth:`update`'s ``heads`` may start and end."""
        z = self.shape[0]
        return tuple(range(0, z, self.head_chunk)) + (z,)

    def update(self, k, v, dk_acc, dv_acc, pieces: Sequence[Piece], heads: tuple[int, int] | None = None) -> None:
        """Fold the K/V block ``k, v`` (Z, m, D) in, for the given pieces: dQ here, dK and dV into ``dk_acc``,
        ``dv_acc`` (Z, m, D), which must be in the compute dtype (``self.dtype``) and are added to, not set.
        ``heads`` (z0, z1): only those batch-heads, on :attr:`head_bounds` (every head's arithmetic is that of the
        whole update: the ring's last step computes in head groups)."""
        xp = self.xp
        z, _, _, d = self.shape
        for name, a in (("dk_acc", dk_acc), ("dv_acc", dv_acc)):
            if a.dtype != self.dtype or a.shape != k.shape:
                raise ValueError(f"BlockBackward.update: {name} must be {self.dtype} of shape {k.shape}, got {a.dtype} {a.shape}")
        if k.shape[0] != z or k.shape[2] != d or v.shape != k.shape:
            raise ValueError(f"BlockBackward.update: k {k.shape} and v {v.shape} must be (Z={z}, m, D={d})")
        k = xp.asarray(k, self.dtype)  # a half-precision block computes in float32 (no copy otherwise)
        v = xp.asarray(v, self.dtype)
        if heads is not None and (heads[0] not in self.head_bounds or heads[1] not in self.head_bounds):
            raise ValueError(f"BlockBackward.update: heads {heads} must start and end on the head-chunk bounds {self.head_bounds}")
        for piece in pieces:
            self._update_piece(k, v, dk_acc, dv_acc, piece, heads or (0, z))

    def _update_piece(self, k, v, dk_acc, dv_acc, p: Piece, heads: tuple[int, int]) -> None:
        xp = self.xp
        z, g, _, d = self.shape
        nk = p.k1 - p.k0
        if nk <= 0 or p.q1 <= p.q0:
            return
        tq_max, tk_max = kernel.piece_tiles(p, self.tile_q, self.tile_k)  # as the forward tiles it
        hc = self.head_chunk
        in_place = self.matmul_add is not None
        need = self.scratch_elems(
            g, d, p.q1 - p.q0, nk, head_chunk=hc, tile_q=self.tile_q, tile_k=self.tile_k, mask=p.mask, in_place=in_place
        )
        kt, vt, sbuf, dpbuf = (self._buffer(name, need[name]) for name in ("keys", "values", "scores", "dscores"))
        tmp = None if in_place else self._buffer("product", need["product"])
        log_e = self.dtype.type(self._log_e)
        for z0 in range(heads[0], heads[1], hc):
            z1 = min(z0 + hc, z)
            zc = z1 - z0
            kta = kt[: zc * (d + 1) * nk].reshape(zc, d + 1, nk)  # [k^T log_b(e); 1]
            kernel._transpose_into(xp, kta[:, :d], k[z0:z1, p.k0 : p.k1])
            if self.exp_base != "e":
                kta[:, :d] *= log_e
            kta[:, d] = 1
            vta = vt[: zc * (d + 1) * nk].reshape(zc, d + 1, nk)  # [v^T; 1]
            kernel._transpose_into(xp, vta[:, :d], v[z0:z1, p.k0 : p.k1])
            vta[:, d] = 1
            kz = k[z0:z1, p.k0 : p.k1]  # (Zc, nk, D)
            dkz = dk_acc[z0:z1, p.k0 : p.k1]
            dvz = dv_acc[z0:z1, p.k0 : p.k1]
            for i0 in range(0, p.q1 - p.q0, tq_max):
                i1 = min(i0 + tq_max, p.q1 - p.q0)
                rq = (i1 - i0) * g
                rows = (slice(z0, z1), slice(p.q0 + i0, p.q0 + i1))
                qt = self.qa[rows].reshape(zc, rq, d + 1)
                dot = self.doa[rows].reshape(zc, rq, d + 1)
                dqt = self.dqa[rows].reshape(zc, rq, d)
                kstart, kend = kernel.tile_keys(p, i0, i1)  # the keys some row of the tile sees (as the forward)
                for j0 in range(kstart, kend, tk_max):
                    j1 = min(j0 + tk_max, kend)
                    tk = j1 - j0
                    s = sbuf[: zc * rq * tk].reshape(zc, rq, tk)  # (Zc, tq*G, tk)
                    dp = dpbuf[: zc * rq * tk].reshape(zc, rq, tk)
                    mask = (i0, i1, j0, band(p)) if kernel.tile_masked(p, i0, i1, j0, j1) else None
                    self._tile(qt, dot, dqt, kta[..., j0:j1], vta[..., j0:j1], kz[:, j0:j1], dkz[:, j0:j1], dvz[:, j0:j1], s, dp, mask, tmp)
                    if self.on_tile is not None:
                        self.on_tile()

    def _tile(self, qt, dot, dqt, kt, vt, kj, dkj, dvj, s, dp, mask, tmp) -> None:
        """One score tile: P, then dV, dS, and the dQ and dK it gives, accumulated in place."""
        xp = self.xp
        d = self.shape[3]
        self.matmul(qt, kt, out=s)  # (S - LSE) log_b(e)
        if mask is not None:
            sub, where = self._masked_part(s, *mask)
            xp.copyto(sub, MASKED[self.exp_base], where=where)  # the exponential's fast path, then exactly 0
        self._exp(s, out=s)  # P
        if mask is not None:
            xp.copyto(sub, 0, where=where)
        self._gemm_add(s.swapaxes(-1, -2), dot[..., :d], dvj, tmp)  # dV += P^T dO
        self.matmul(dot, vt, out=dp)  # dP - D
        dp *= s  # dS
        self._gemm_add(dp, kj, dqt, tmp)  # dQ += dS K (scale applied in dq())
        self._gemm_add(dp.swapaxes(-1, -2), qt[..., :d], dkj, tmp)  # dK += dS^T (Q * scale)

    def _gemm_add(self, a, b, c, tmp) -> None:
        """c += a @ b: one GEMM with beta = 1 where the matmul offers it, else a product into ``tmp`` and an add."""
        if self.matmul_add is not None:
            self.matmul_add(a, b, c)
            return
        t = tmp[: c.size].reshape(c.shape)
        self.matmul(a, b, out=t)
        c += t

    def dq(self, out_dtype=None):
        """The finished dQ (Z, G, n, D), in the compute dtype or ``out_dtype``: a new array."""
        xp = self.xp
        dq = xp.multiply(self.dqa.transpose(0, 2, 1, 3), self.dtype.type(self.scale))
        return xp.ascontiguousarray(dq, dtype=out_dtype or self.dtype)


def flops(batch: int, heads: int, head_dim: int, pairs: int) -> float:
    """Backward FLOPs counted as 2.5 x the forward's (FlashAttention's convention: five GEMMs to the forward's two)."""
    return 2.5 * kernel.flops(batch, heads, head_dim, pairs)


def phase_flops(phase: str, batch: int, heads: int, head_dim: int, pairs: int) -> float:
    """FLOPs of one timed phase: 'fwd' :func:`kernel.flops`, 'bwd' :func:`flops` (2.5 x the forward's)."""
    return (kernel.flops if phase == "fwd" else flops)(batch, heads, head_dim, pairs)
