"""Pass-Q: the K/V stay, the query blocks travel the ring, partial outputs return to their owners.

The strategy is described in ringbench.engine.strategies (and docs/strategies.md); the engine interface is
ringbench.engine.api.Engine. One loop (:meth:`PassQ._pass`) serves both passes; what travels, what is computed and
what is folded in are the pass's data (:class:`_QForward`, :class:`_QBackward`), as in the ring.
"""

from __future__ import annotations

import time

import numpy as np

from ringbench.engine import comm
from ringbench.engine.ring import InjectedFault
from ringbench.kernels import backward, kernel
from ringbench.kernels.api import make_backward, make_forward, score_tile_elems
from ringbench.kernels.kernel import load_queries
from ringbench.layout import step_plan


class PassQ:
    """Pass-Q: the K/V stay, the queries travel the ring, partial outputs return to their owners (module docstring);
    in the backward the visitor bundles travel and the dQ partials return (:meth:`backward`)."""

    def __init__(self, ctx, q, k, v, do=None):
        """``ctx``: the rank context (ringbench.engine.api.RankContext); q (B, n, H, D), k, v (B, n, H_kv, D): this
        rank's tokens (read, never written); ``do``: their upstream gradient for a backward."""
        cfg, backend, world, cuda_aware = ctx.cfg, ctx.backend, ctx.comm, ctx.cuda_aware
        rank, nranks = ctx.rank, ctx.nranks
        xp = backend.xp
        self.cfg, self.backend, self.xp = cfg, backend, xp
        self.rank, self.nranks = rank, nranks
        self.storage = q.dtype
        self.compute = backend.compute_dtype(q.dtype)
        b, n, h, d = q.shape
        hk = k.shape[2]
        self.batch, self.n, self.head_dim = b, n, d
        self.q_home = kernel.q_to_heads(xp, q, hk)  # (Z, G, n, D) storage: the block that travels
        self.bufs = [xp.empty_like(self.q_home), xp.empty_like(self.q_home)]
        self.kv_home = xp.stack([kernel.kv_to_heads(xp, k), kernel.kv_to_heads(xp, v)])  # (2, Z, n, D): stays
        self.fused = cfg.kernel != "native"  # torch / flash-attn: the kernel takes q, k, v as stored and scales itself
        self.kv = xp.empty(self.kv_home.shape, self.storage if self.fused else self.compute)
        self.ex = comm.KVExchange(world, backend, cuda_aware)
        self.ret = comm.PeerExchange(world, backend, cuda_aware, name="ret")
        # the backward's own exchanges: staged through pinned buffers of their own shapes (fwd+bwd never reallocates them)
        self.bex = comm.KVExchange(world, backend, cuda_aware, name="bundle_")
        self.dret = comm.PeerExchange(world, backend, cuda_aware, name="dq")
        self._exchanges = (self.ex, self.ret, self.bex, self.dret)
        on_tile = self._progress if cfg.progress == "test" else None
        self.matmul, self.blas = backend.matmul(cfg.blas)
        self.state = make_forward(
            backend,
            xp.zeros(self.q_home.shape, self.compute),  # shapes only: each step loads the visiting queries
            n,
            tile_q=cfg.tile_q,
            on_tile=on_tile,
            matmul=self.matmul,
            scale=kernel.softmax_scale(d) if self.fused else None,
            kernel_name=cfg.kernel,
            storage=self.storage,
        )
        self.blas = getattr(self.state, "library", self.blas)  # a fused kernel: the library that computes
        z, g = self.q_home.shape[:2]
        self.parts = [xp.empty((z, g, n, d + 1), self.compute) for _ in range(2)]  # [out | lse] of a visiting block
        self.recv_part = xp.empty_like(self.parts[0])
        # step s: the queries of rank (r - s) against this rank's keys
        docs, w = cfg.doc_lengths, cfg.window
        self.plans = [step_plan(cfg.layout, (rank - s) % nranks, rank, nranks, n, cfg.causal, docs, w) for s in range(nranks)]
        self.fault = ctx.fault_step
        self.score_tile_elems = score_tile_elems(self.state, g)
        self.acc = None
        self._do = do  # (B, n, H, D): read once by prepare_backward, then dropped
        self.grad = None  # backward.BlockBackward, made by prepare_backward()
        self.bwd_score_tile_elems = 0  # set by prepare_backward()
        self._fwd = _QForward(self)
        self._bwd = None  # _QBackward, made by prepare_backward()

    def _progress(self) -> None:
        for ex in self._exchanges:
            if ex.posted:
                ex.test()

    def _partial(self, qblock, step: int):
        st = self.state
        st.reset()
        if self.fused:
            st.load(qblock)  # (Z, G, n, D) as stored, read in place
        else:
            load_queries(st, qblock.transpose(0, 2, 1, 3), kernel.softmax_scale(self.head_dim))
        if self.plans[step]:
            st.update(self.kv[0], self.kv[1], self.plans[step])
        return st.finalize()  # (Z, G, n, D), (Z, G, n) natural log

    def forward(self):
        """One pass: the query blocks travel, partial (O, LSE) return home and are merged there. (compute_s, comm_s,
        step_s) arrays of length P + 1 and the pass total."""
        return self._pass(self._fwd)

    def _pass(self, work):
        """The loop of both passes, steps s = 0..P; what travels and what is computed is the pass's data (``work``:
        :class:`_QForward`, :class:`_QBackward`). The block of rank (r - s) mod P is here (``work.home`` copied into
        ``work.bufs[0]`` first; tuples of buffers that travel together by ``work.ex``); the next one moves on
        (s < P - 1) while this one is computed against the local K/V (``work.compute(cur, s)``, writing the partial
        of step s into ``work.parts[s % 2]``, or keeping its own at s = 0); the partial of step s - 1 returns to its
        owner by ``work.ret`` (2 <= s <= P), into ``work.recv``, and ``work.fold()`` joins it to the owner's result.
        (compute_s, comm_s, step_s) arrays of length P + 1 and the pass total."""
        home, bufs, ex, ret, parts, recv = work.home, work.bufs, work.ex, work.ret, work.parts, work.recv
        P = self.nranks
        S = P + 1
        t_compute, t_comm, t_step = np.zeros(S), np.zeros(S), np.zeros(S)
        clock = time.perf_counter
        ctimer = self.backend.timer()
        cur, nxt = bufs
        pass_start = clock()
        for a, h in zip(cur, home):
            a[...] = h
        work.start()
        self.backend.synchronize()
        for s in range(S):
            if s == self.fault:
                raise InjectedFault(f"injected fault on rank {self.rank} at step {s}")
            step_start = clock()
            more = s < P - 1  # a next block to receive
            back = 2 <= s <= P  # the partial computed at step s-1 goes home now
            if more:
                ex.post_all(list(zip(cur, nxt)))  # one buffer per dtype, together
            if back:
                ret.post(parts[(s - 1) % 2], (self.rank - s + 1) % P, recv, (self.rank + s - 1) % P)
            t_comm[s] = clock() - step_start
            ctimer.start()
            if s < P:
                work.compute(cur, s)
            ctimer.stop()
            t0 = clock()
            if more:
                ex.wait()
            if back:
                ret.wait()
            t_comm[s] += clock() - t0
            if back:  # the owner's result: its own partial, then those of ranks r+1, r+2, ... (ring order)
                ctimer.start()
                work.fold()
                ctimer.stop()
            self.backend.synchronize()
            t_step[s] = clock() - step_start
            t_compute[s] = ctimer.seconds()
            if more:
                cur, nxt = nxt, cur
        return t_compute, t_comm, t_step, clock() - pass_start

    def comm_only(self, phase: str = "fwd") -> np.ndarray:
        """The transfers alone: P - 1 query-block (bwd: bundle) transfers, then P - 1 partial (bwd: dQ partial) returns."""
        P = self.nranks
        work = self._fwd if phase == "fwd" else self._bwd  # what travels: the query block alone, or the bundle's two
        home, (cur, nxt), part, recv, ex, ret = work.home, work.bufs, work.parts[0], work.recv, work.ex, work.ret
        for a, h in zip(cur, home):
            a[...] = h
        self.backend.synchronize()
        out = []
        for _ in range(P - 1):
            t0 = time.perf_counter()
            ex.sendrecv_all(list(zip(cur, nxt)))
            out.append(time.perf_counter() - t0)
            cur, nxt = nxt, cur
        for s in range(1, P):
            t0 = time.perf_counter()
            ret.post(part, (self.rank - s) % P, recv, (self.rank + s) % P)
            ret.wait()
            out.append(time.perf_counter() - t0)
        return np.array(out)

    def output(self):
        o = self.acc[0].astype(self.storage, copy=False)
        return kernel.heads_to_out(o, self.batch)

    # the backward ---------------------------------------------------------------------------------
    def prepare_backward(self) -> None:
        """The forward once (untimed): O, rounded to the storage dtype (as a training forward keeps it), and the
        LSE of this rank's queries give D = rowsum(dO * O) in the compute dtype. Then this rank's visitor bundle
        ([Q, dO] in the storage dtype, [LSE, D] in the compute dtype), its two ring buffers, the dQ partials and
        the dK/dV accumulators of the local K/V."""
        if self.grad is not None:
            return
        xp, d = self.xp, self.head_dim
        z, g, n, _ = self.q_home.shape
        doh = kernel.q_to_heads(xp, self._do, z // self.batch)  # (Z, G, n, D) storage
        self._do = None
        self.forward()
        o, lse = self.acc[0].astype(self.storage), self.acc[1]  # (Z, G, n, D), (Z, G, n) natural log
        self.grad = make_backward(
            self.backend,
            self.q_home.astype(self.compute) * self.compute.type(kernel.softmax_scale(d)),
            doh,
            o,
            lse,
            kernel_name="native",  # pass-q's backward loads each visiting bundle into the native kernel (config.validate)
            tile_q=self.cfg.tile_q,
            matmul=self.matmul,
            on_tile=self._progress if self.cfg.progress == "test" else None,
            exp_base=self.state.base.name,  # the forward's exponential
        )
        del o
        self.bwd_score_tile_elems = score_tile_elems(self.grad, g)
        self.bundle_home = (xp.stack([self.q_home, doh]), xp.stack([lse, self.grad.delta()]))  # (2, Z, G, n, D), (2, Z, G, n)
        del doh
        self.bundles = [tuple(xp.empty_like(x) for x in self.bundle_home) for _ in range(2)]
        self.dq_parts = [xp.empty((z, n, g, d), self.compute) for _ in range(2)]  # a visiting block's dQ / scale, query-major
        self.recv_dq = xp.empty_like(self.dq_parts[0])
        self.dq_acc = xp.empty_like(self.dq_parts[0])  # the sum of this rank's queries' partials
        self.dkv = xp.empty(self.kv_home.shape, self.compute)  # dK, dV of the local K/V (they never move)
        self._bwd = _QBackward(self)

    def _bwd_step(self, bundle, step: int, into) -> None:
        """The visiting bundle against the local K/V: its dQ partial (dQ / scale) into ``into``, dK/dV added here."""
        (qdo, ld), g = bundle, self.grad
        g.load(qdo[0], qdo[1], ld[0], ld[1], q_scale=kernel.softmax_scale(self.head_dim))
        if self.plans[step]:
            g.update(self.kv[0], self.kv[1], self.dkv[0], self.dkv[1], self.plans[step])
        into[...] = g.dqa

    def backward(self):
        """One backward pass (after :meth:`prepare_backward`), the forward's loop with other data: at step s the bundle
        of rank (r - s) mod P is here; the next bundle moves on (s < P - 1) while this one is computed against the
        local K/V, and the dQ partial of step s - 1 returns to its owner (2 <= s <= P), which adds it in ring order.
        (compute_s, comm_s, step_s) arrays of length P + 1 and the pass total."""
        return self._pass(self._bwd)

    def grads(self):
        """dQ (B, n, H, D), dK and dV (B, n, H_kv, D) of this rank's tokens in the storage dtype (after :meth:`backward`):
        dQ = (sum of the partials) x scale in the compute dtype, rounded once."""
        xp, b = self.xp, self.batch
        z, n, g, d = self.dq_acc.shape
        dq = xp.empty((b, n, z // b, g, d), self.storage)
        xp.multiply(self.dq_acc.reshape(b, z // b, n, g, d).transpose(0, 2, 1, 3, 4), self.compute.type(self.grad.scale), out=dq)
        dk, dv = (xp.empty((b, n, z // b, d), self.storage) for _ in range(2))
        dk[...] = backward.heads_to_kv(self.dkv[0], b)
        dv[...] = backward.heads_to_kv(self.dkv[1], b)
        return dq.reshape(b, n, -1, d), dk, dv

    def bytes_per_rank(self, phase: str = "fwd") -> int:
        """Bytes this rank sends in one pass. fwd: P - 1 query blocks and P - 1 partials (output and LSE, compute dtype).
        bwd: P - 1 bundles (Q and dO in the storage dtype, LSE and D in the compute dtype) and P - 1 dQ partials
        (compute dtype)."""
        if phase == "fwd":
            return int((self.nranks - 1) * (self.q_home.nbytes + self.parts[0].nbytes))
        rows = self.q_home.size // self.head_dim  # B n H
        c = self.compute.itemsize
        bundle = 2 * self.q_home.nbytes + 2 * rows * c
        return int((self.nranks - 1) * (bundle + self.q_home.size * c))


class _QForward:
    """Pass-Q's forward as its loop sees it: the query block travels alone; its partial [O | LSE] returns home and is
    merged into the owner's result (``kernel.merge``) in ring order."""

    def __init__(self, pq: PassQ):
        self.pq = pq
        self.home, self.bufs = (pq.q_home,), ((pq.bufs[0],), (pq.bufs[1],))
        self.ex, self.ret, self.parts, self.recv = pq.ex, pq.ret, pq.parts, pq.recv_part

    def start(self) -> None:
        self.pq.kv[...] = self.pq.kv_home

    def compute(self, cur, s: int) -> None:
        pq, d = self.pq, self.pq.head_dim
        o, lse = pq._partial(cur[0], s)
        if s == 0:
            pq.acc = (o, lse)
        else:
            part = self.parts[s % 2]
            part[..., :d] = o
            part[..., d] = lse

    def fold(self) -> None:
        pq, d = self.pq, self.pq.head_dim
        pq.acc = kernel.merge(pq.xp, pq.acc[0], pq.acc[1], self.recv[..., :d], self.recv[..., d])


class _QBackward:
    """Pass-Q's backward as its loop sees it: the visitor bundle ([Q, dO], [LSE, D]) travels; its dQ partial returns
    home and is added there in ring order; dK/dV accumulate where the K/V stay."""

    def __init__(self, pq: PassQ):
        self.pq = pq
        self.home, self.bufs = pq.bundle_home, pq.bundles
        self.ex, self.ret, self.parts, self.recv = pq.bex, pq.dret, pq.dq_parts, pq.recv_dq

    def start(self) -> None:
        self.pq.kv[...] = self.pq.kv_home
        self.pq.dkv.fill(0)

    def compute(self, cur, s: int) -> None:
        self.pq._bwd_step(cur, s, self.pq.dq_acc if s == 0 else self.parts[s % 2])

    def fold(self) -> None:
        self.pq.dq_acc += self.recv
