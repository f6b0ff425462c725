"""Context-parallel strategies beside the ring: Ulysses, hybrid (Ulysses x ring), pass-Q.

Each class offers what the runner uses of :class:`ringbench.engine.ring.Ring`: ``forward()`` (per-step compute_s,
comm_s, step_s arrays and the pass total), ``comm_only()``, ``output()``, ``bytes_per_rank()`` and
``score_tile_elems``. The causal structure of any pair of sequence chunks comes from ``layout.step_plan``
(chunk i = the tokens rank i holds in the layout), the arithmetic from ``kernel.OnlineSoftmax`` and
``kernel.merge``, and all MPI from ``ringbench.engine.comm``.

* **hybrid** (``--ulysses-degree U``, P = U x R): ranks form groups of U consecutive ranks (rank r is member
  r mod U of group r // U; on a cluster consecutive ranks share a node, so the all-to-all stays on the fast
  intra-node links). An all-to-all inside each group turns the sequence split into a head split: member a
  then holds the U n tokens of its group for query heads [a H/U, (a+1) H/U) and their kv heads. A
  :class:`Ring` over the R ranks with the same member index (one per group) then passes those K/V
  around; its step plans are the layout's plans of every (query chunk, key chunk) pair of the two groups.
  A second all-to-all returns each member's heads to the tokens' owners.
  Steps: 0 = the all-to-all in (pack, collective, load), 1..R = the ring's steps, R+1 = finalize and the
  all-to-all out. U = 1 is the ring; U = P is Ulysses.
  Backward (``prepare_backward`` / ``backward`` / ``grads``): a training step keeps the forward's head-split
  tensors where they are (q, k, v of the group, O and the LSE on each member, as DeepSpeed-Ulysses' local
  attention saves its inputs), so only dO is gathered: step 0 = the all-to-all of dO (sequence split -> head
  split) and D = rowsum(dO * O); 1..R = :meth:`Ring.backward` over the groups (K/V blocks travel with their
  dK/dV accumulators, then the hop home); R+1 = one all-to-all of dQ, dK and dV, packed, in the compute dtype
  back to the tokens' owners, who sum the partial dK/dV of a replicated kv head in member order and round
  once to the storage dtype.
* **ulysses**: hybrid with U = P (one group, a ring of one rank): steps 0 = all-to-all in, 1 = attention of
  H/P heads over the whole sequence, 2 = all-to-all out.
* **pass-q**: the K/V stay; the query blocks travel the ring (rank r sends to r+1). At step s rank r computes
  the partial output and log-sum-exp of the queries of rank (r - s) mod P against its own K/V; that partial is
  returned to its owner during step s+1 (overlapped with that step's compute) and merged there exactly
  (``kernel.merge``). Steps 0..P-1 compute, step P returns and merges the last partial. Partials travel in
  the compute dtype (float32 for half precision): D + 1 values per query row and head.
  Backward (``prepare_backward``, ``backward``, ``grads``): the same loop. What travels is each query block's
  visitor bundle: [Q, dO] in the storage dtype and [LSE, D] (D = rowsum(dO * O), from the untimed forward) in
  the compute dtype, two buffers posted together. At step s rank r computes, with ``backward.BlockBackward``
  against its own K/V, the dQ partial of the bundle of rank (r - s) mod P and adds that bundle's dK/dV
  contribution to its own accumulators (the K/V never move, so neither do dK/dV). The dQ partial (compute
  dtype) returns to its owner during step s+1; the owner adds the partials in ring order (its own, then those
  of ranks r+1, r+2, ...) and rounds to the storage dtype once, in ``grads``.

GQA in the all-to-all: P (or U) must divide H; kv heads are split when U divides H_kv and replicated
(each kv head sent to the U / H_kv members whose query heads read it) when H_kv divides U. Other shapes are
refused by ``config.validate``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ringbench.config import heads_rule  # noqa: F401  (the rule lives with the other config checks)
from ringbench.engine import comm
from ringbench.engine.ring import Ring
from ringbench.kernels import backward, kernel
from ringbench.kernels.api import make_forward
from ringbench.kernels.backward import BlockBackward
from ringbench.layout import group_plan, step_plan

STRATEGIES = ("ulysses", "hybrid", "pass-q")


def degree(mode: str, ulysses_degree: int, nranks: int) -> int:
    """The all-to-all group size U of a strategy at ``nranks`` ranks (1 for the ring modes and pass-q)."""
    return nranks if mode == "ulysses" else ulysses_degree if mode == "hybrid" else 1


def kv_head_map(kv_heads: int, u: int) -> np.ndarray:
    """(U, kv heads per member): the kv heads group member a needs (split, or replicated when U > H_kv)."""
    if kv_heads % u == 0:
        return np.arange(kv_heads).reshape(u, kv_heads // u)
    return (np.arange(u) // (u // kv_heads))[:, None]


def load_queries(state: kernel.OnlineSoftmax, q, scale: float) -> None:
    """Write queries ``q`` (Z, n, G, D) (any dtype, any strides) into ``state`` as its constructor does:
    cast to the compute dtype, times 1/sqrt(D), times log_b(e) for the state's exponential base b."""
    d = state.shape[3]
    dst = state.qa[..., :d]  # (Z, n, G, D)
    dst[...] = q
    dst *= state.dtype.type(scale)
    if state.base.scale != 1.0:
        dst *= state.dtype.type(state.base.scale)


class Hybrid:
    """Ulysses all-to-all inside groups of U consecutive ranks, a ring over the R = P / U groups (module docstring)."""

    def __init__(
        self, cfg, backend, world, cuda_aware: bool, rank: int, nranks: int, q, k, v, u: int | None = None, fault_step=None, do=None
    ):
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
        group_comm, ring_comm = comm.split_groups(world, u)
        self.a2a = comm.AllToAll(group_comm, backend, cuda_aware)
        width = self.hl + 2 * hkl  # q, k, v heads packed along the head axis: one collective
        self.send_in = xp.empty((u, b, n, width, d), self.storage)  # block a -> member a
        self.recv_in = xp.empty_like(self.send_in)  # block a <- member a (its tokens)
        self.send_out = xp.empty((u, b, n, self.hl, d), self.storage)
        self.recv_out = xp.empty_like(self.send_out)
        ring_cfg = dataclasses.replace(cfg, mode="overlap")
        ex = comm.KVExchange(ring_comm, backend, cuda_aware)
        zq = xp.zeros((b, u * n, self.hl, d), self.storage)  # (B, U n, H/U, D): shapes only, loaded each pass
        zkv = xp.zeros((b, u * n, hkl, d), self.storage)
        self.ring = Ring(ring_cfg, backend, ex, ring_comm.rank, self.r, zq, zkv, zkv)
        del zq, zkv
        group = rank // u
        self.ring.plans = [group_plan(cfg.layout, group, (group - s) % self.r, u, nranks, n, cfg.causal) for s in range(self.r)]
        # RINGBENCH_FAULT's step counts this pass's steps (0: the all-to-all in, 1..R the ring's, R + 1: the all-to-all
        # out; a later step, possible when R + 2 < P, fires at the last one): the ring's steps fire inside the ring
        self.fault = None if fault_step is None else min(fault_step, self.r + 1)
        self.ring.fault = self.fault - 1 if self.fault is not None and 1 <= self.fault <= self.r else None
        self.ring.fault_at = (rank, 1)
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
            raise _fault(self.rank, 0)
        t_compute[0], t_comm[0], t_step[0] = self._a2a_step(*step_in)
        c, m, s, _ = ring_pass()  # steps 1..R (a fault there is raised by the ring)
        t_compute[1 : self.r + 1], t_comm[1 : self.r + 1], t_step[1 : self.r + 1] = c, m, s
        if self.fault == self.r + 1:
            raise _fault(self.rank, self.r + 1)
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

    def __init__(self, cfg, backend, world, cuda_aware: bool, rank: int, nranks: int, q, k, v, fault_step=None, do=None):
        super().__init__(cfg, backend, world, cuda_aware, rank, nranks, q, k, v, u=nranks, fault_step=fault_step, do=do)


class PassQ:
    """Pass-Q: the K/V stay, the queries travel the ring, partial outputs return to their owners (module docstring);
    in the backward the visitor bundles travel and the dQ partials return (:meth:`backward`)."""

    def __init__(self, cfg, backend, world, cuda_aware: bool, rank: int, nranks: int, q, k, v, fault_step=None, do=None):
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
        self.plans = [step_plan(cfg.layout, (rank - s) % nranks, rank, nranks, n, cfg.causal) for s in range(nranks)]
        self.fault = fault_step
        self.score_tile_elems = self.state.head_chunk * g * self.state.tile_q * self.state.tile_k
        self.acc = None
        self._do = do  # (B, n, H, D): read once by prepare_backward, then dropped
        self.grad = None  # backward.BlockBackward, made by prepare_backward()
        self.bwd_score_tile_elems = 0  # set by prepare_backward()

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
        d = self.head_dim

        def start():
            self.kv[...] = self.kv_home

        def compute(cur, s):
            o, lse = self._partial(cur[0], s)
            if s == 0:
                self.acc = (o, lse)
            else:
                part = self.parts[s % 2]
                part[..., :d] = o
                part[..., d] = lse

        def fold():
            self.acc = kernel.merge(self.xp, self.acc[0], self.acc[1], self.recv_part[..., :d], self.recv_part[..., d])

        bufs = ((self.bufs[0],), (self.bufs[1],))
        return self._pass(start, (self.q_home,), bufs, self.ex, self.ret, compute, self.parts, self.recv_part, fold)

    def _pass(self, start, home, bufs, ex, ret, compute, parts, recv, fold):
        """The loop of both passes, steps s = 0..P: the block of rank (r - s) mod P is here (``home`` copied into
        ``bufs[0]`` first; tuples of buffers that travel together by ``ex``); the next one moves on (s < P - 1) while
        this one is computed against the local K/V (``compute(cur, s)``, writing the partial of step s into
        ``parts[s % 2]``, or keeping its own at s = 0); the partial of step s - 1 returns to its owner by ``ret``
        (2 <= s <= P), into ``recv``, and ``fold()`` joins it to the owner's result. (compute_s, comm_s, step_s)
        arrays of length P + 1 and the pass total."""
        P = self.nranks
        S = P + 1
        t_compute, t_comm, t_step = np.zeros(S), np.zeros(S), np.zeros(S)
        clock = time.perf_counter
        ctimer = self.backend.timer()
        cur, nxt = bufs
        pass_start = clock()
        for a, h in zip(cur, home):
            a[...] = h
        start()
        self.backend.synchronize()
        for s in range(S):
            if s == self.fault:
                raise _fault(self.rank, s)
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
                compute(cur, s)
            ctimer.stop()
            t0 = clock()
            if more:
                ex.wait()
            if back:
                ret.wait()
            t_comm[s] += clock() - t0
            if back:  # the owner's result: its own partial, then those of ranks r+1, r+2, ... (ring order)
                ctimer.start()
                fold()
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
        if phase == "fwd":  # what travels, as tuples of buffers: the query block alone, or the bundle's two
            home, (cur, nxt), part, recv = (self.q_home,), ((self.bufs[0],), (self.bufs[1],)), self.parts[0], self.recv_part
            ex, ret = self.ex, self.ret
        else:
            home, (cur, nxt), part, recv = self.bundle_home, self.bundles, self.dq_parts[0], self.recv_dq
            ex, ret = self.bex, self.dret
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
        tile_q, tile_k, head_chunk = backward.auto_tiles(n, n, g, z, gpu=self.backend.is_gpu)
        self.grad = backward.BlockBackward(
            xp,
            self.q_home.astype(self.compute) * self.compute.type(kernel.softmax_scale(d)),
            doh,
            o,
            lse,
            tile_q=self.cfg.tile_q or tile_q,
            tile_k=tile_k,
            head_chunk=head_chunk,
            matmul=self.matmul,
            on_tile=self._progress if self.cfg.progress == "test" else None,
            exp_base=self.state.base.name,  # the forward's exponential
        )
        del o
        self.bwd_score_tile_elems = head_chunk * g * self.grad.tile_q * tile_k
        self.bundle_home = (xp.stack([self.q_home, doh]), xp.stack([lse, self.grad.delta()]))  # (2, Z, G, n, D), (2, Z, G, n)
        del doh
        self.bundles = [tuple(xp.empty_like(x) for x in self.bundle_home) for _ in range(2)]
        self.dq_parts = [xp.empty((z, n, g, d), self.compute) for _ in range(2)]  # a visiting block's dQ / scale, query-major
        self.recv_dq = xp.empty_like(self.dq_parts[0])
        self.dq_acc = xp.empty_like(self.dq_parts[0])  # the sum of this rank's queries' partials
        self.dkv = xp.empty(self.kv_home.shape, self.compute)  # dK, dV of the local K/V (they never move)

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

        def start():
            self.kv[...] = self.kv_home
            self.dkv.fill(0)

        def compute(cur, s):
            self._bwd_step(cur, s, self.dq_acc if s == 0 else self.dq_parts[s % 2])

        def fold():
            self.dq_acc += self.recv_dq

        return self._pass(start, self.bundle_home, self.bundles, self.bex, self.dret, compute, self.dq_parts, self.recv_dq, fold)

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


def _fault(rank: int, step: int) -> Exception:
    from ringbench.engine.ring import InjectedFault

    return InjectedFault(f"injected fault on rank {rank} at step {step}")


CLASSES = {"ulysses": Ulysses, "hybrid": Hybrid, "pass-q": PassQ}


def make(cfg, backend, world, cuda_aware: bool, rank: int, nranks: int, q, k, v, fault_step: int | None = None, do=None):
    """The strategy object for ``cfg.mode`` (one of STRATEGIES); ``fault_step``: raise InjectedFault there (tests);
    ``do``: the upstream gradient of this rank's tokens (B, n, H, D), for a backward pass."""
    return CLASSES[cfg.mode](cfg, backend, world, cuda_aware, rank, nranks, q, k, v, fault_step=fault_step, do=do)
