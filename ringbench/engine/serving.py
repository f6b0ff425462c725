"""The serving passes: prefill against a KV cache (``--pass prefill``) and one decode step with a sharded cache (``--pass decode``).

Both attend causally by global position: the context is the seq_len = N tokens 0 .. N - 1, a query at position i
sees every key at a position <= i.

**Prefill** (``--cached-tokens C``): tokens 0 .. C - 1 are cached (their K and V exist), the T = N - C tokens C .. N - 1
are new (their queries, keys and values are computed now). The layout splits the two parts apart, so that every rank
holds a share of both, whatever C:

* the cached tokens by the layout over C: rank r holds cached positions ``positions(layout, r, P, C)``;
* the new tokens by the layout over T: rank r holds new positions ``C + positions(layout, r, P, T)``; its queries are
  these, its K/V block is its cached tokens followed by its new ones (C / P + T / P rows).

With C = 0 this is exactly the training layout, and every step plan is today's causal one: the prefill is the causal
forward, bit for bit. A rank's queries see every cached key (a FULL piece against the block's first C / P rows) and the
new keys as the causal forward over T tokens does (``layout.step_plan`` shifted by C / P rows). Strategies (``--mode``):
``overlap`` / ``blocking``: pass-KV, the ring of ringbench.engine.ring (the K/V blocks of cached and new tokens travel);
``allgather``: the same ring's all-gather; ``pass-q``: ringbench.engine.passq (the new queries travel, partial outputs
and LSE return home): fewer bytes than pass-KV when T is small against C.

**Decode** (``--new-tokens t``): every sequence's KV cache of N tokens, the last t of them this step's new tokens (their
K/V just appended), is split over the ranks by the layout (contiguous or striped, i.e. round-robin; zigzag too); every
rank holds this step's t queries of each of the B sequences (positions N - t .. N - 1). One timed step: each rank's
partial attention (O, LSE) over its shard, then the merge (``--merge``): ``ring`` (the partials travel P - 1 hops, each
rank folds in every other's: all ranks end with the output), ``tree`` (tree attention: an all-reduce of the LSE's max,
then of [O w | w] with w = exp(LSE - max): log P latency, every rank ends with the output), ``gather`` (each rank sends
its partial to rank 0, which merges them in rank order: only rank 0 holds the output, ``holds_output``).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ringbench.engine import comm
from ringbench.engine.passq import PassQ
from ringbench.engine.ring import InjectedFault, Ring
from ringbench.kernels import kernel
from ringbench.kernels.api import make_forward, score_tile_elems
from ringbench.layout import FULL, Piece, positions, step_plan

SERVING = ("prefill", "decode")


# the layout of the serving passes: pure ---------------------------------------------------------------------------
def query_tokens(cfg) -> int:
    """Queries per sequence of the pass over all ranks: T = N - C (prefill), t (decode), N (training passes)."""
    if cfg.pass_ == "prefill":
        return cfg.seq_len - cfg.cached_tokens
    if cfg.pass_ == "decode":
        return cfg.new_tokens
    return cfg.seq_len


def rank_positions(cfg, rank: int, nranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, K/V positions) of ``rank``, global and in the order the rank holds them (module docstring)."""
    layout, n = cfg.layout, cfg.seq_len
    if cfg.pass_ == "prefill":
        c = cfg.cached_tokens
        new = c + positions(layout, rank, nranks, n - c)
        return new, np.concatenate([positions(layout, rank, nranks, c), new])
    if cfg.pass_ == "decode":
        return np.arange(n - cfg.new_tokens, n), positions(layout, rank, nranks, n)
    pos = positions(layout, rank, nranks, n, cfg.doc_lengths, cfg.window, cfg.causal)  # balanced deals by the mask's work
    return pos, pos


def prefill_plan(layout: str, rank: int, src: int, nranks: int, n_new: int, n_cached: int) -> list[Piece]:
    """Pieces of rank ``rank``'s n_new queries against the K/V block of rank ``src`` (its n_cached cached rows, then its
    n_new new rows): every cached key (FULL), then the causal plan of the new tokens, shifted past the cached rows."""
    pieces = [Piece(0, n_new, 0, n_cached, FULL)] if n_cached else []
    for p in step_plan(layout, rank, src, nranks, n_new, True):
        pieces.append(Piece(p.q0, p.q1, p.k0 + n_cached, p.k1 + n_cached, p.mask))
    return pieces


def visible_pieces(q_pos, k_pos) -> list[Piece]:
    """FULL pieces covering exactly the causal pairs (key position <= query position) of queries ``q_pos`` (ascending)
    against keys ``k_pos`` (ascending): the keys every query sees, then, for each run of queries that see the same
    number of keys, the rest (decode: t queries against a shard, whatever the layout)."""
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    seen = np.searchsorted(k_pos, q_pos, side="right")  # keys visible to each query: a prefix of the ascending keys
    if len(seen) == 0:
        return []
    c0 = int(seen.min())
    pieces = [Piece(0, len(q_pos), 0, c0, FULL)] if c0 else []
    i = 0
    while i < len(seen):
        j = i
        while j + 1 < len(seen) and seen[j + 1] == seen[i]:
            j += 1
        if seen[i] > c0:
            pieces.append(Piece(i, j + 1, c0, int(seen[i]), FULL))
        i = j + 1
    return pieces


def unmasked_pairs(cfg) -> int:
    """Visible (query, key) pairs per sequence and head: each of the T queries (the last T of N positions) sees the
    N - T earlier tokens and, causally, the new ones before it."""
    n, t = cfg.seq_len, query_tokens(cfg)
    return t * (n - t) + t * (t + 1) // 2


def kv_cache_bytes(cfg, nranks: int, itemsize: int) -> tuple[int, int]:
    """(K/V bytes a rank holds, the theoretical minimum: the whole cache / P) of a serving pass."""
    per_token = 2 * cfg.batch * cfg.kv_heads_resolved * cfg.head_dim * itemsize
    return per_token * (cfg.seq_len // nranks), per_token * cfg.seq_len / nranks


def memory_need(cfg, nranks: int, itemsize: int, compute_itemsize: int, tokens_chunk: int, tokens_temps: int, ref_chunk: int) -> int:
    """Host bytes a rank of a serving pass allocates above its baseline (harness.memory's estimate for these passes):
    generating its q, k, v (float64, then the storage dtype, with the hash's temporaries); the engine's K/V (home,
    two ring buffers, a compute copy, allgather's P blocks; pass-q: its query blocks and partials); the kernel state
    and output; --check's global K/V and float64 reference over all N keys."""
    s, c = itemsize, compute_itemsize
    b, h, hk, d, n = cfg.batch, cfg.heads, cfg.kv_heads_resolved, cfg.head_dim, cfg.seq_len
    t = query_tokens(cfg) if cfg.pass_ == "decode" else query_tokens(cfg) // nranks  # this rank's queries
    nk = n // nranks  # this rank's K/V rows
    qe, kve = b * t * h * d, b * nk * hk * d
    gen = (8 + s) * (qe + 2 * kve) + tokens_temps * 8 * min(tokens_chunk, max(t, nk)) * max(h, hk) * d
    kv = 2 * kve * (3 * s + c) + (nranks * 2 * kve * s if cfg.mode == "allgather" else 0)
    rows = b * t * h
    state = c * (3 * qe + 4 * rows) + 4 * c * rows * (d + 1) + (3 * s * qe if cfg.mode == "pass-q" else 0)
    if cfg.pass_ == "decode":
        state += nranks * c * rows * (d + 1)  # gather: the P partials on rank 0
    tile = c * 4 * rows * min(nk, 1024)  # score tiles of the native kernel (bounded by its tiling)
    check = 0
    if cfg.check:
        ge = b * n * hk * d
        check = (8 + s) * 2 * ge + 8 * (2 * qe + 2 * b * h * n * d) + 5 * 8 * b * h * min(ref_chunk, t) * n
    return gen + kv + state + tile + check


# the engines ----------------------------------------------------------------------------------------------------
def build(ctx, q, k, v, do=None):
    """The engine of a serving pass for this rank's queries q (B, nq, H, D) and K/V k, v (B, nk, H_kv, D) at the
    positions :func:`rank_positions` gives: :class:`Decode`, or for the prefill the ring (overlap, blocking,
    allgather) or pass-Q with the prefill's step plans."""
    cfg, rank, P = ctx.cfg, ctx.rank, ctx.nranks
    if cfg.pass_ == "decode":
        return Decode(ctx, q, k, v)
    n_new, n_cached = q.shape[1], cfg.cached_tokens // P
    if cfg.mode == "pass-q":
        eng = PassQ(ctx, q, k, v)
        # step s: the queries of rank (r - s) against this rank's block
        eng.plans = [prefill_plan(cfg.layout, (rank - s) % P, rank, P, n_new, n_cached) for s in range(P)]
        return eng
    plans = [prefill_plan(cfg.layout, rank, (rank - s) % P, P, n_new, n_cached) for s in range(P)]
    return Ring.build(ctx, q, k, v, plans=plans)


class Decode:
    """One decode step of one rank: its partial attention over its shard of the KV cache, then the merge (``--merge``).

    Steps of a timed pass: the partial (step 0), then the merge's: ring P - 1 hops, tree 2 all-reduces, gather 1."""

    def __init__(self, ctx, q, k, v, do=None):
        """q (B, t, H, D): this step's queries (the same on every rank); k, v (B, n, H_kv, D): this rank's shard."""
        cfg, backend = ctx.cfg, ctx.backend
        xp = backend.xp
        self.cfg, self.backend, self.xp, self.world = cfg, backend, xp, ctx.comm
        self.rank, self.nranks = ctx.rank, ctx.nranks
        self.merge = cfg.merge
        self.storage = q.dtype
        self.compute = backend.compute_dtype(q.dtype)
        b, t, h, d = q.shape
        hk = k.shape[2]
        self.batch, self.head_dim = b, d
        self.fused = cfg.kernel != "native"
        self.matmul, self.blas = backend.matmul(cfg.blas)
        self.state = make_forward(
            backend,
            kernel.q_to_heads(xp, q, hk, self.compute),  # (Z, G, t, D); the state keeps its own (scaled) copy
            k.shape[1],
            tile_q=cfg.tile_q,
            matmul=self.matmul,
            scale=kernel.softmax_scale(d),
            kernel_name=cfg.kernel,
            storage=self.storage,
        )
        self.blas = getattr(self.state, "library", self.blas)
        self.kv_home = xp.stack([kernel.kv_to_heads(xp, k), kernel.kv_to_heads(xp, v)])  # (2, Z, n, D): the shard
        wide = self.storage != self.compute and not self.fused
        self.kv_compute = xp.empty(self.kv_home.shape, self.compute) if wide else None
        q_pos, k_pos = rank_positions(cfg, self.rank, self.nranks)
        self.pieces = visible_pieces(q_pos, k_pos)
        z, g = self.kv_home.shape[1], h // hk
        self.part = xp.empty((z, g, t, d + 1), self.compute)  # [O | LSE] of this rank's shard
        self.bufs = [xp.empty_like(self.part), xp.empty_like(self.part)]
        self.gathered = xp.empty((self.nranks,) + self.part.shape, self.compute) if self.merge == "gather" else None
        self.staged = backend.is_gpu and not ctx.cuda_aware
        self.ex = comm.KVExchange(ctx.comm, backend, ctx.cuda_aware, name="decode_")
        self.fault = ctx.fault_step
        self.score_tile_elems = score_tile_elems(self.state, g)
        self.bwd_score_tile_elems = 0
        self.holds_output = self.merge != "gather" or self.rank == 0
        self.acc = None

    @property
    def merge_steps(self) -> int:
        return {"ring": self.nranks - 1, "tree": 2, "gather": 1}[self.merge]

    def forward(self):
        """One decode step: (compute_s, comm_s, step_s) arrays of length 1 + merge steps, and the step's total."""
        S = 1 + self.merge_steps
        t_compute, t_comm, t_step = np.zeros(S), np.zeros(S), np.zeros(S)
        clock, sync = time.perf_counter, self.backend.synchronize
        start = clock()
        if self.fault == 0:
            raise InjectedFault(f"injected fault on rank {self.rank} at step 0")
        kv = self.kv_home
        if self.kv_compute is not None:
            self.kv_compute[...] = kv
            kv = self.kv_compute
        st = self.state
        st.reset()
        if self.pieces:
            st.update(kv[0], kv[1], self.pieces)
        o, lse = st.finalize()  # (Z, G, t, D), (Z, G, t)
        sync()
        t_compute[0] = t_step[0] = clock() - start
        steps = getattr(self, "_" + self.merge)(o, lse)
        for s, (c, m) in enumerate(steps, start=1):
            if s == self.fault:
                raise InjectedFault(f"injected fault on rank {self.rank} at step {s}")
            t_compute[s], t_comm[s], t_step[s] = c, m, c + m
        return t_compute, t_comm, t_step, clock() - start

    def _ring(self, o, lse):
        """The partials travel the ring: at hop s this rank receives the partial of rank r - s and folds it in."""
        d, xp, clock = self.head_dim, self.xp, time.perf_counter
        cur, nxt = self.bufs
        cur[..., :d], cur[..., d] = o, lse
        self.acc = (o, lse)
        for _ in range(self.nranks - 1):
            t0 = clock()
            self.ex.post(cur, nxt)
            self.ex.wait()
            t1 = clock()
            self.acc = kernel.merge(xp, self.acc[0], self.acc[1], nxt[..., :d], nxt[..., d])
            self.backend.synchronize()
            yield clock() - t1, t1 - t0
            cur, nxt = nxt, cur

    def _tree(self, o, lse):
        """Tree attention: the all-reduced max M of the LSE, then the all-reduced [O w | w], w = exp(LSE - M)."""
        d, xp, clock = self.head_dim, self.xp, time.perf_counter
        m = lse.copy()
        t0 = clock()
        comm.allreduce(m, "max", self.world, self.backend, self.staged)
        t1 = clock()
        m_use = xp.where(m == -np.inf, 0, m)
        w = xp.exp(lse - m_use)  # (Z, G, t): 0 where this rank saw no key
        part = self.part
        part[..., :d] = o * w[..., None]
        part[..., d] = w
        self.backend.synchronize()
        t2 = clock()
        yield t2 - t1, t1 - t0
        comm.allreduce(part, "sum", self.world, self.backend, self.staged)
        t3 = clock()
        den = part[..., d]
        safe = xp.where(den == 0, 1, den)
        with np.errstate(divide="ignore"):
            self.acc = (part[..., :d] / safe[..., None], m_use + xp.log(den))
        self.backend.synchronize()
        yield clock() - t3, t3 - t2

    def _gather(self, o, lse):
        """Every partial to rank 0, merged there in rank order."""
        d, xp, clock = self.head_dim, self.xp, time.perf_counter
        part = self.part
        part[..., :d], part[..., d] = o, lse
        t0 = clock()
        comm.gather_to(part, self.gathered, self.world, self.backend, self.staged)
        t1 = clock()
        if self.rank == 0:
            acc = (self.gathered[0][..., :d], self.gathered[0][..., d])
            for r in range(1, self.nranks):
                acc = kernel.merge(xp, acc[0], acc[1], self.gathered[r][..., :d], self.gathered[r][..., d])
            self.acc = acc
        else:
            self.acc = None
        self.backend.synchronize()
        yield clock() - t1, t1 - t0

    def comm_only(self, phase: str = "fwd") -> np.ndarray:
        """The merge's transfers alone, per merge step."""
        out, clock = [], time.perf_counter
        cur, nxt = self.bufs
        for _ in range(self.merge_steps):
            t0 = clock()
            if self.merge == "ring":
                self.ex.sendrecv(cur, nxt)
            elif self.merge == "tree":
                comm.allreduce(self.part, "sum", self.world, self.backend, self.staged)
            else:
                comm.gather_to(self.part, self.gathered, self.world, self.backend, self.staged)
            out.append(clock() - t0)
        return np.array(out)

    def output(self):
        """The step's output (B, t, H, D) in the storage dtype (rank 0 only for --merge gather: ``holds_output``)."""
        if not self.holds_output:
            raise RuntimeError(f"rank {self.rank} holds no output with --merge gather (rank 0 does)")
        return kernel.heads_to_out(self.acc[0].astype(self.storage), self.batch)

    def prepare_backward(self) -> None:
        raise RuntimeError("--pass decode has no backward")

    def backward(self):
        raise RuntimeError("--pass decode has no backward")

    def grads(self):
        raise RuntimeError("--pass decode has no backward")

    def bytes_per_rank(self, phase: str = "fwd") -> int:
        """Bytes a rank sends per step: ring P - 1 partials [O | LSE]; tree the two all-reduces by recursive doubling,
        ceil(log2 P) x (LSE + [O w | w]); gather one partial (a non-root rank's; rank 0 sends none)."""
        P, nbytes = self.nranks, int(self.part.nbytes)
        if P == 1:
            return 0
        if self.merge == "ring":
            return (P - 1) * nbytes
        if self.merge == "tree":
            return math.ceil(math.log2(P)) * (nbytes + nbytes // (self.head_dim + 1))
        return nbytes

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_home.nbytes)
