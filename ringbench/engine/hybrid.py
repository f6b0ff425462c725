"""Ulysses and hybrid (Ulysses x ring): all-to-all inside groups of U ranks, a ring over the R = P / U groups.

The strategies are described in ringbench.engine.strategies (and docs/strategies.md); the engine interface is
ringbench.engine.api.Engine. Ulysses is hybrid with U = P (one group, a ring of one rank).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ringbench.engine import comm
from ringbench.engine.ring import InjectedFault, Ring
from ringbench.kernels import kernel
from ringbench.kernels.backward import BlockBackward
from ringbench.kernels.kernel import load_queries
from ringbench.layout import group_plan


def degree(mode: str, ulysses_degree: int, nranks: int) -> int:
    """The all-to-all group size U of a strategy at ``nranks`` ranks (1 for the ring modes and pass-q)."""
    return nranks if mode == "ulysses" else ulysses_degree if mode == "hybrid" else 1


def kv_head_map(kv_heads: int, u: int) -> np.ndarray:
    """(U, kv heads per member): the kv heads group member a needs (split, or replicated when U > H_kv)."""
    if kv_heads % u == 0:
        return np.arange(kv_heads).reshape(u, kv_heads // u)
    return (np.arange(u) // (u // kv_heads))[:, None]


class Hybrid:
    """Ulysses all-to-all inside groups of U consecutive ranks, a ring over the R = P / U groups (module docstring)."""

    def __init__(self, ctx, q, k, v, do=None, u: int | None = None):
        """``ctx``: the rank context (ringbench.engine.api.RankContext); q (B, n, H, D), k, v (B, n, H_kv, D): this
        rank's tokens (read, never written); ``do``: their upstream gradient for a backward; ``u``: the group size
        (default: the mode's, from the configuration)."""
        cfg, backend, cuda_aware = ctx.cfg, ctx.backend, ctx.cuda_aware
        rank, nranks = ctx.rank, ctx.nranks
        xp = backend.xp
        self.cfg, self.backend, self.xp = cfg, backend, xp
        self.rank, self.nranks = rank, nranks
        self.u = u = degree(cfg.mode, cfg.ulysses_degree, nranks) if u is None else u
        self.r = nranks // u
        self.storage = q.dtype
        b, n, h, d = q.shape
        hk = k.shape[2]
        self.batch, self.n, self.heads, self.head_dim = b, n, h, d
        self.q_in, self.k_in, self.v_in = q, k, v  # this rank's tokens: the pass's input
        self.hl = h // u  # query heads per member after the all-to-all
        self.kmap = kv_head_map(hk, u)  # (U, hkl)
        self.hkl = hkl = self.kmap.shape[1]
        group_comm, ring_comm = comm.split_groups(ctx.comm, u)
        self.a2a = comm.AllToAll(group_comm, backend, cuda_aware)
        width = self.hl + 2 * hkl  # q, k, v heads packed along the head axis: one collective
        self.send_in = xp.empty((u, b, n, width, d), self.storage)  # block a -> member a
        self.recv_in = xp.empty_like(self.send_in)  # block a <- member a (its tokens)
        self.send_out = xp.empty((u, b, n, self.hl, d), self.storage)
        self.recv_out = xp.empty_like(self.send_out)
        # RINGBENCH_FAULT's step counts this pass's steps (0: the all-to-all in, 1..R the ring's, R + 1: the all-to-all
        # out; a later step, possible when R + 2 < P, fires at the last one): the ring's steps fire inside the ring
        self.fault = None if ctx.fault_step is None else min(ctx.fault_step, self.r + 1)
        ring_fault = self.fault - 1 if self.fault is not None and 1 <= self.fault <= self.r else None
        # the ring over the R groups (the members with this member index): an overlapped ring of the group blocks,
        # whose step plans are the layout's plans of every (query chunk, key chunk) pair of the two groups
        group = rank // u
        docs, w = cfg.doc_lengths, cfg.window
        plans = [group_plan(cfg.layout, group, (group - s) % self.r, u, nranks, n, cfg.causal, docs, w) for s in range(self.r)]
        ring_ctx = ctx.replace(cfg=dataclasses.replace(cfg, mode="overlap"), comm=ring_comm, fault_step=ring_fault, fault_at=(rank, 1))
        zq = xp.zeros((b, u * n, self.hl, d), self.storage)  # (B, U n, H/U, D): shapes only, loaded each pass
        zkv = xp.zeros((b, u * n, hkl, d), self.storage)
        self.ring = Ring.build(ring_ctx, zq, zkv, zkv, plans=plans)
        del zq, zkv
        self.score_tile_elems = self.ring.score_tile_elems
        self.compute, self.blas = self.ring.compute, self.ring.blas
        self.out = None
        self.do_in = do  # (B, n, H, D) this rank's tokens' upstream gradient (None: forward only)
        if do is not None:  # the backward's all-to-all buffers: dO in (storage dtype), dQ | dK | dV out (compute dtype)
            self.send_do = xp.empty((u, b, n, self.hl, d), self.storage)
            self.recv_do = xp.empty_like(self.send_do)
            self.send_grad = xp.empty((u, b, n, width, d), self.compute)
            self.recv_grad = xp.empty_like(self.send_grad)
            self.grads_out = (xp.empty_like(q), xp.empty_like(k), xp.empty_like(v))  # dQ, dK, dV of this rank's tokens
            self.o_kept = None  # (Z, G, U n, D): the forward's O of the group, this member's heads (prepare_backward)

    # one pass -----------------------------------------------------------------------------------
    def _pack_in(self) -> None:
        hl, hkl = self.hl, self.hkl
        for a in range(self.u):
            heads = slice(int(self.kmap[a, 0]), int(self.kmap[a, -1]) + 1)  # a contiguous range: split or one replicated head
            self.send_in[a, :, :, :hl] = self.q_in[:, :, a * hl : (a + 1) * hl]
            self.send_in[a, :, :, hl : hl + hkl] = self.k_in[:, :, heads]
            self.send_in[a, :, :, hl + hkl :] = self.v_in[:, :, heads]

    def _load(self) -> None:
        """The gathered group tokens into the ring: queries into its softmax state, K/V into its home block."""
        b, n, d, u, hl, hkl = self.batch, self.n, self.head_dim, self.u, self.hl, self.hkl
        g = hl // hkl
        r = self.recv_in  # (U, B, n, width, D): member a's tokens
        rq = r[..., :hl, :].reshape(u, b, n, hkl, g, d).transpose(1, 3, 0, 2, 4, 5)  # (B, hkl, U, n, G, D)
        if isinstance(self.ring.state, kernel.OnlineSoftmax):
            load_queries(_QView(self.ring.state, (b, hkl, u, n, g)), rq, kernel.softmax_scale(d))
        else:  # a fused kernel's state (--kernel torch): (Z, G, U n, D), unscaled (the kernel applies the scale)
            self.ring.state.load(rq.transpose(0, 1, 4, 2, 3, 5))
        home = self.ring.kv_home.reshape(2, b, hkl, u, n, d)
        home[0] = r[..., hl : hl + hkl, :].transpose(1, 3, 0, 2, 4)  # (B, hkl, U, n, D)
        home[1] = r[..., hl + hkl :, :].transpose(1, 3, 0, 2, 4)

    def _unload(self) -> None:
        o = self.ring.output()  # (B, U n, H/U, D) storage
        self.send_out[...] = o.reshape(self.batch, self.u, self.n, self.hl, self.head_dim).transpose(1, 0, 2, 3, 4)

    def _finish_out(self) -> None:
        """(U, B, n, H/U, D) -> (B, n, H, D): member a's heads of this rank's tokens."""
        self.out = self.recv_out.transpose(1, 2, 0, 3, 4).reshape(self.batch, self.n, self.heads, self.head_dim)

    def _a2a_step(self, pack, send, recv, load) -> tuple[float, float, float]:
        """One all-to-all step: ``pack`` (compute), the collective ``send`` -> ``recv`` (comm), ``load`` (compute).
        Returns its (compute_s, comm_s, step_s)."""
        clock, sync = time.perf_counter, self.backend.synchronize
        t0 = clock()
        pack()
        sync()
        t1 = clock()
        self.a2a(send, recv)
        t2 = clock()
        load()
        sync()
        t3 = clock()
        return (t1 - t0) + (t3 - t2), t2 - t1, t3 - t0

    def _pass(self, step_in, ring_pass, step_out):
        """The loop of both passes: step 0 the all-to-all in, 1..R the ring's steps over the groups, R+1 the all-to-all
        out (each step: (pack, send, recv, load)). (compute_s, comm_s, step_s) per step (R + 2), and the pass total."""
        S = self.r + 2
        t_compute, t_comm, t_step = np.zeros(S), np.zeros(S), np.zeros(S)
        pass_start = time.perf_counter()
        if self.fault == 0:
            raise InjectedFault(f"injected fault on rank {self.rank} at step 0")
        t_compute[0], t_comm[0], t_step[0] = self._a2a_step(*step_in)
        c, m, s, _ = ring_pass()  # steps 1..R (a fault there is raised by the ring)
        t_compute[1 : self.r + 1], t_comm[1 : self.r + 1], t_step[1 : self.r + 1] = c, m, s
        if self.fault == self.r + 1:
            raise InjectedFault(f"injected fault on rank {self.rank} at step {self.r + 1}")
        t_compute[-1], t_comm[-1], t_step[-1] = self._a2a_step(*step_out)
        return t_compute, t_comm, t_step, time.perf_counter() - pass_start

    def forward(self):
        """One pass: all-to-all of q, k, v in, the ring over the groups, finalize and the all-to-all of O out."""
        return self._pass(
            (self._pack_in, self.send_in, self.recv_in, self._load),
            self.ring.forward,
            (self._unload, self.send_out, self.recv_out, self._finish_out),
        )

    # the backward ----------------------------------------------------------------------------------
    def prepare_backward(self) -> None:
        """The untimed forward; then what a training step keeps from it, head split on this member: the group's
        queries, K/V (already in the ring's home block), O and the LSE, given to the ring's backward."""
        if self.o_kept is not None:
            return
        xp, b, n, d, u, hl, hkl = self.xp, self.batch, self.n, self.head_dim, self.u, self.hl, self.hkl
        g = hl // hkl
        self.forward()
        o, lse = self.ring.state.finalize(self.storage)  # (Z, G, U n, D) storage, (Z, G, U n)
        # the group's queries (Z, G, U n, D) times the softmax scale in the compute dtype, as Ring's backward takes them
        rq = self.recv_in[..., :hl, :].reshape(u, b, n, hkl, g, d).transpose(1, 3, 4, 0, 2, 5)  # (B, hkl, G, U, n, D)
        qh = xp.asarray(rq, self.compute).reshape(b * hkl, g, u * n, d) * self.compute.type(kernel.softmax_scale(d))
        self._pack_do()
        self.a2a(self.send_do, self.recv_do)
        doh = self.recv_do.reshape(u, b, n, hkl, g, d).transpose(1, 3, 4, 0, 2, 5).reshape(b * hkl, g, u * n, d)
        self.ring.attach_backward(qh, doh, o, lse)
        self.o_kept = o
        del qh, doh, lse

    def _pack_do(self) -> None:
        hl = self.hl
        for a in range(self.u):
            self.send_do[a] = self.do_in[:, :, a * hl : (a + 1) * hl]

    def _load_do(self) -> None:
        """The gathered dO into the ring's backward (the same (B, hkl, U, n, G) view as the queries), then D = rowsum(dO * O)."""
        b, n, d, u, hl, hkl = self.batch, self.n, self.head_dim, self.u, self.hl, self.hkl
        g = hl // hkl
        grad = self.ring.block_backward
        rd = self.recv_do.reshape(u, b, n, hkl, g, d).transpose(1, 3, 0, 2, 4, 5)  # (B, hkl, U, n, G, D)
        if not isinstance(grad, BlockBackward):  # --kernel torch: FusedBackward takes dO (Z, G, U n, D); its op computes D
            grad.set_do(rd.transpose(0, 1, 4, 2, 3, 5))
            return
        dst = grad.doa.reshape(b, hkl, u, n, g, d + 1)
        dst[..., :d] = rd
        grad.set_delta(self.o_kept.transpose(0, 2, 1, 3))

    def _pack_grads(self) -> None:
        """dQ (times the softmax scale), dK and dV of the group's tokens, this member's heads, in the compute dtype:
        block a (member a's tokens) -> member a."""
        b, n, d, u, hl, hkl = self.batch, self.n, self.head_dim, self.u, self.hl, self.hkl
        g = hl // hkl
        dqa, scale, acc = self.ring.grads_compute()  # (Z, U n, G, D) dQ / scale, (2, Z, U n, D)
        dq = self.send_grad[..., :hl, :].reshape(u, b, n, hkl, g, d)
        src = dqa.reshape(b, hkl, u, n, g, d).transpose(2, 0, 3, 1, 4, 5)  # (U, B, n, hkl, G, D)
        self.xp.multiply(src, self.compute.type(scale), out=dq)
        kv = acc.reshape(2, b, hkl, u, n, d).transpose(0, 3, 1, 4, 2, 5)  # (2, U, B, n, hkl, D)
        self.send_grad[..., hl : hl + hkl, :] = kv[0]
        self.send_grad[..., hl + hkl :, :] = kv[1]

    def _unpack_grads(self) -> None:
        """dQ, dK, dV of this rank's tokens from every member's heads, rounded once to the storage dtype. A kv head
        replicated on U / H_kv members (U > H_kv) gets their partial dK/dV summed in member order first."""
        b, n, d, u, hl, hkl = self.batch, self.n, self.head_dim, self.u, self.hl, self.hkl
        dq, dk, dv = self.grads_out
        r = self.recv_grad  # (U, B, n, hl + 2 hkl, D): member a's heads of this rank's tokens
        dq.reshape(b, n, u, hl, d)[...] = r[..., :hl, :].transpose(1, 2, 0, 3, 4)
        hk = dk.shape[2]
        if hk % u == 0:  # split: member a holds kv heads [a hkl, (a+1) hkl)
            dk.reshape(b, n, u, hkl, d)[...] = r[..., hl : hl + hkl, :].transpose(1, 2, 0, 3, 4)
            dv.reshape(b, n, u, hkl, d)[...] = r[..., hl + hkl :, :].transpose(1, 2, 0, 3, 4)
            return
        rep = u // hk  # replicated: members [j rep, (j+1) rep) hold kv head j (hkl = 1)
        parts = r[..., hl:, :].reshape(hk, rep, b, n, 2, d)  # [dK | dV] of each member
        total = parts[:, 0].copy()  # (H_kv, B, n, 2, D) compute dtype
        for i in range(1, rep):
            total += parts[:, i]
        dk[...] = total[..., 0, :].transpose(1, 2, 0, 3)
        dv[...] = total[..., 1, :].transpose(1, 2, 0, 3)

    def backward(self):
        """One backward pass (after :meth:`prepare_backward`): the all-to-all of dO, the ring's backward over the groups
        (dK/dV accumulators travel with the K/V blocks), the all-to-all of dQ, dK, dV back to the tokens' owners."""
        return self._pass(
            (self._pack_do, self.send_do, self.recv_do, self._load_do),
            self.ring.backward,
            (self._pack_grads, self.send_grad, self.recv_grad, self._unpack_grads),
        )

    def grads(self):
        """dQ (B, n, H, D), dK and dV (B, n, H_kv, D) of this rank's tokens in the storage dtype (from the last backward)."""
        return self.grads_out

    @property
    def bwd_score_tile_elems(self) -> int:
        """Elements of one of the backward's two score tiles (the inner ring's; 0 without a backward)."""
        return self.ring.bwd_score_tile_elems

    def comm_only(self, phase: str = "fwd") -> np.ndarray:
        """The transfers alone. fwd: the all-to-all in, the ring's R - 1 transfers, the all-to-all out. bwd: the
        all-to-all of dO, the ring backward's R steps of transfers (none when R = 1), the all-to-all of dQ, dK, dV."""
        if phase == "bwd":
            out = [self._timed(self.a2a, self.send_do, self.recv_do)]
            out += list(self.ring.comm_only("bwd"))
            out.append(self._timed(self.a2a, self.send_grad, self.recv_grad))
            return np.array(out)
        out = [self._timed(self.a2a, self.send_in, self.recv_in)]
        out += list(self.ring.comm_only())
        out.append(self._timed(self.a2a, self.send_out, self.recv_out))
        return np.array(out)

    @staticmethod
    def _timed(fn, *args) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    def output(self):
        """This rank's tokens' output (B, n, H, D) in the storage dtype (from the last pass)."""
        return self.out

    def bytes_per_rank(self, phase: str = "fwd") -> int:
        """Bytes this rank sends to other ranks in one pass of ``phase``. fwd: q, k, v in and the output out to the
        U - 1 other members, R - 1 K/V group blocks. bwd: dO in (storage dtype), dQ, dK, dV out (compute dtype),
        and the ring backward's R - 1 K/V group blocks and R dK/dV accumulators (none when R = 1)."""
        u, ring = self.u, self.ring
        if phase == "bwd":
            a2a = (u - 1) * (self.send_do.nbytes + self.send_grad.nbytes) // u
            return int(a2a + (self.r - 1) * ring.block_bytes() + (self.r * ring.grad_block_bytes() if self.r > 1 else 0))
        per_member_in = self.send_in.nbytes // u
        per_member_out = self.send_out.nbytes // u
        return int((u - 1) * (per_member_in + per_member_out) + (self.r - 1) * ring.block_bytes())


class _QView:
    """The query part of an OnlineSoftmax seen as (B, hkl, U, n, G, D): lets ``load_queries`` write it in one go."""

    def __init__(self, state, dims):
        self.dtype = state.dtype
        self.base = state.base
        b, hkl, u, n, g = dims
        d = state.shape[3]
        self.shape = state.shape
        self.qa = state.qa.reshape(b, hkl, u, n, g, d + 1)


class Ulysses(Hybrid):
    """Hybrid with one group of all P ranks."""

    def __init__(self, ctx, q, k, v, do=None):
        super().__init__(ctx, q, k, v, do=do, u=ctx.nranks)
