"""The ring step loop: post the next K/V transfer, compute on the current block, wait, swap.

A :class:`Ring` owns one rank's queries, its double K/V buffer and the online-softmax state, and runs
one forward pass of ring attention per call to :meth:`Ring.forward`, returning per-step timings. With dO
it also runs the backward (:meth:`Ring.backward`, after :meth:`Ring.prepare_backward`): the same loop, in
which the dK/dV accumulator of each K/V block travels with the block (``_Backward``). What a pass posts,
computes and does after the last step is the pass's data (``_Forward``, ``_Backward``), not another loop.

Modes (what is benchmarked):

* ``overlap``: Isend/Irecv of the next block are posted before computing on the current one, and
  waited for after; with ``progress='test'`` the compute also calls MPI_Testall between tiles so the
  transfer advances while NumPy computes.
* ``blocking``: Sendrecv, then compute: the no-overlap baseline.
* ``allgather``: gather every rank's K/V first, then compute (the Llama-3 style baseline).

All three perform the same arithmetic in the same order, so their outputs (and gradients) are bitwise identical.
"""

from __future__ import annotations

import time

import numpy as np

from ringbench.engine import comm
from ringbench.kernels import backward, kernel
from ringbench.kernels.api import make_backward, make_forward, score_tile_elems
from ringbench.layout import step_plan

# the marks a pass keeps per step (Ring.marks, arrays (P, MARKS_PER_STEP), time.perf_counter seconds, NaN where unused):
# post_t[s, k] when the step's k-th transfer was posted, wait_start_t / wait_end_t[s, k] its wait (blocking: right after)
MARK_KEYS = ("post_t", "wait_start_t", "wait_end_t", "post_bytes")  # post_bytes[s, k]: the bytes the k-th transfer sends
HOME_GROUPS = 8  # the backward's last step: its dK/dV go home in up to this many head slices, each behind the next one's compute
HOME_LAG = 3  # ... each slice waited for this many groups after its post (as many exchanges, each with one slice in flight)
MARKS_PER_STEP = HOME_GROUPS + 2


def _store_marks(marks: dict, s: int, log: list) -> None:
    """This step's exchange log ((kind, times...) as comm.KVExchange.mark writes it) into row ``s`` of ``marks``."""
    posts = [e[1] for e in log if e[0] == "post"][:MARKS_PER_STEP]
    sizes = [e[2] for e in log if e[0] == "post"][:MARKS_PER_STEP]
    waits = [e[1:] for e in log if e[0] == "wait"][:MARKS_PER_STEP]
    marks["post_t"][s, : len(posts)] = posts
    marks["post_bytes"][s, : len(sizes)] = sizes
    for k, (a, b) in enumerate(waits):
        marks["wait_start_t"][s, k], marks["wait_end_t"][s, k] = a, b


class InjectedFault(RuntimeError):
    """Raised on purpose (RINGBENCH_FAULT=rank:step) to test that one failing rank ends the job."""


class Ring:
    def __init__(
        self, cfg, backend, exchange, rank: int, nranks: int, q, k, v, *, do=None, fault_step: int | None = None, plans=None, fault_at=None
    ):
        """q: (B, n, H, D), k/v: (B, n, H_kv, D) in the storage dtype, on the backend's device; only read, never
        written to (the ring computes on copies it owns). ``do`` (B, n, H, D): the upstream gradient, needed for
        :meth:`backward` (read once, by :meth:`prepare_backward`). ``fault_step``: raise InjectedFault at that step
        (``fault_at``: the (rank, step offset) its message names). ``plans``: the step plans (default: the layout's
        plans of this rank's queries against each step's block; a strategy's inner ring passes its own).
        ``exchange``: what moves the blocks (comm.KVExchange; tests pass a loopback); :meth:`build` makes one."""
        xp = backend.xp
        self.cfg, self.backend, self.ex = cfg, backend, exchange
        # the backward's last step keeps HOME_LAG dK/dV slices in flight, one per exchange (a test loopback: itself)
        twin = getattr(exchange, "twin", None)
        self.home_exs = [exchange] + [twin(f"home{i}_") if twin else exchange for i in range(1, HOME_LAG)]
        self.rank, self.nranks = rank, nranks
        self.storage = q.dtype
        self.compute = backend.compute_dtype(q.dtype)
        b, n, h, d = q.shape
        hk = k.shape[2]
        self.batch, self.n = b, n
        qh = kernel.q_to_heads(xp, q, hk, self.compute)  # (Z, G, n, D); may be a view of q: never written to
        on_tile = self._progress if (cfg.progress == "test" and cfg.mode == "overlap") else None
        self.matmul, self.blas = backend.matmul(cfg.blas)
        scale = kernel.softmax_scale(d)
        self.state = make_forward(
            backend,
            qh,
            n,
            tile_q=cfg.tile_q,
            on_tile=on_tile,
            matmul=self.matmul,
            scale=scale,
            kernel_name=cfg.kernel,
            storage=self.storage,
        )
        self.blas = getattr(self.state, "library", self.blas)  # a fused kernel: the library that computes
        self.tile_q, self.tile_k = self.state.tile_q, self.state.tile_k
        del qh  # the state keeps its own (scaled, widened) copy: free this before the K/V buffers
        self.kv_home = xp.stack([kernel.kv_to_heads(xp, k), kernel.kv_to_heads(xp, v)])  # (2, Z, n, D)
        self.bufs = [xp.empty_like(self.kv_home), xp.empty_like(self.kv_home)]
        # half precision travels as stored; the compute copy is made once per step (fused kernels take it as stored)
        wide = self.storage != self.compute and cfg.kernel == "native"
        self.kv_compute = xp.empty(self.kv_home.shape, self.compute) if wide else None
        self.gathered = xp.empty((nranks,) + self.kv_home.shape, self.storage) if cfg.mode == "allgather" else None
        if plans is None:
            docs, w = cfg.doc_lengths, cfg.window  # packed documents and a window change the plans (data), not the loop
            plans = [step_plan(cfg.layout, rank, (rank - s) % nranks, nranks, n, cfg.causal, docs, w) for s in range(nranks)]
        self.plans = plans
        self.fault = fault_step
        self.fault_at = fault_at or (rank, 0)  # the rank and step offset a fault's message names (a strategy's inner ring: its own)
        self.score_tile_elems = score_tile_elems(self.state, h // hk)
        self._on_tile = on_tile
        self._fwd = _Forward(self)
        self._bwd = None if do is None else _Backward(self, q, do, on_tile)
        self.marks = None  # after a pass: its per-step transfer marks (MARK_KEYS)

    def _progress(self) -> None:
        if self.ex.posted:
            self.ex.test()
        for hx in self.home_exs[1:]:
            if hx is not self.ex and hx.posted:
                hx.test()

    @classmethod
    def build(cls, ctx, q, k, v, do=None, plans=None) -> Ring:
        """The ring of rank context ``ctx`` (ringbench.engine.api.RankContext) over its communicator."""
        exchange = comm.KVExchange(ctx.comm, ctx.backend, ctx.cuda_aware)
        return cls(
            ctx.cfg,
            ctx.backend,
            exchange,
            ctx.rank,
            ctx.nranks,
            q,
            k,
            v,
            do=do,
            fault_step=ctx.fault_step,
            plans=plans,
            fault_at=ctx.fault_at,
        )

    def bytes_per_rank(self, phase: str = "fwd") -> int:
        """Bytes this rank sends in one pass: P - 1 K/V hops (fwd); the backward's K/V hops and its P hops of the
        dK/dV accumulators (bwd; allgather: the all-gather's P - 1 blocks, and the all-to-all's P - 1 shares of
        the accumulators: its own share stays)."""
        P = self.nranks
        if phase == "fwd":
            return self.block_bytes() * (P - 1)
        hops = P - 1 if self.cfg.mode == "allgather" else P
        return self.block_bytes() * (P - 1) + (self.grad_block_bytes() * hops if P > 1 else 0)

    def block_bytes(self) -> int:
        """Bytes of one K/V block (storage dtype): what the forward moves per hop."""
        return int(self.kv_home.nbytes)

    def grad_block_bytes(self) -> int:
        """Bytes of one dK/dV accumulator (compute dtype: float32 for half precision): what travels beside K/V in the backward."""
        return int(self.kv_home.size * self.compute.itemsize)

    def forward(self):
        """One forward ring pass. Returns (compute_s, comm_s, step_s) arrays of length P, and the pass's total."""
        return self._pass(self._fwd)

    def prepare_backward(self) -> None:
        """Run the forward once (untimed) and keep what the backward needs: O and the log-sum-exp (and D)."""
        self._bwd.prepare()

    def attach_backward(self, qh, doh, o, lse) -> None:
        """Set up the backward from a forward run outside this ring (hybrid: its queries arrive by an all-to-all and
        its forward ends with one): ``qh`` (Z, G, n, D) the queries times the softmax scale in the compute dtype,
        ``doh`` and ``o`` (Z, G, n, D), ``lse`` (Z, G, n), as :class:`backward.BlockBackward` takes them."""
        self._bwd = _Backward(self, None, None, self._on_tile)
        self._bwd.make_grad(qh, doh, o, lse)
        del qh, doh, o, lse
        self._bwd.allocate()

    def backward(self):
        """One backward ring pass (after :meth:`prepare_backward`): dQ here, every rank's dK/dV accumulated on the
        way round and brought home. Returns timings as :meth:`forward` does."""
        return self._pass(self._bwd)

    def _pass(self, work):
        """The ring loop of every pass, layout and mode: post the next transfers, compute on the block in hand,
        wait, swap. What differs per pass lives in ``work``: what travels beside K/V (``posts``), what is computed
        (``compute``), what joins the arrived data after the wait (``fold``, None if nothing) and what happens after
        the last step (``send_home``, ``finish``). Returns (compute_s, comm_s, step_s) per step and the total."""
        P, mode, ex = self.nranks, self.cfg.mode, self.ex
        work.start()
        cur, nxt = self.bufs
        cur[...] = self.kv_home
        self.backend.synchronize()
        t_compute, t_comm, t_step = np.zeros(P), np.zeros(P), np.zeros(P)
        marks = {k: np.full((P, MARKS_PER_STEP), np.nan) for k in MARK_KEYS}  # per step: each transfer's post and wait
        clock = time.perf_counter
        ctimer = self.backend.timer()
        pass_start = clock()
        for s in range(P):
            if s == self.fault:
                raise InjectedFault(f"injected fault on rank {self.fault_at[0]} at step {s + self.fault_at[1]}")
            last = s == P - 1
            log = []
            for hx in self.home_exs:
                hx.log = log
            step_start = clock()
            if mode == "allgather":  # every block first, then compute
                if s == 0:
                    ex.allgather(self.kv_home, self.gathered)
                kv, pairs = self.gathered[(self.rank - s) % P], []
            else:
                kv = cur
                pairs = ([] if last else [(cur, nxt)]) + work.posts(s)  # the next K/V block (+ the backward's finished dK/dV)
                if pairs and mode == "overlap":
                    ex.post_all(pairs)  # ... start moving ...
                elif pairs:
                    ex.sendrecv_all(pairs)  # blocking: transfer, then compute: nothing overlaps
            t_comm[s] = clock() - step_start
            ctimer.start()
            inner = self._compute(work, kv, s)  # ... while this block is computed on (seconds it spent waiting, if any)
            ctimer.stop()
            t0 = clock()
            if pairs and mode == "overlap":
                ex.wait()  # (the backward's last step: the last slice of the dK/dV's hop home, posted by its compute)
            t_comm[s] += clock() - t0 + inner
            extra = -inner  # arithmetic after the wait (the backward adds its share to the accumulator that arrived)
            if work.fold is not None:
                extra += self._timed(work.fold, s)
            if last and work.send_home is not None:  # after the last step: the backward's dK/dV go home
                t0 = clock()
                work.send_home()
                t_comm[s] += clock() - t0
                extra += self._timed(work.finish)
            self.backend.synchronize()
            t_step[s] = clock() - step_start
            t_compute[s] = ctimer.seconds() + extra
            _store_marks(marks, s, log)
            cur, nxt = nxt, cur
        for hx in self.home_exs:
            hx.log = None
        self.marks = marks
        return t_compute, t_comm, t_step, clock() - pass_start

    def _timed(self, fn, *args) -> float:
        t0 = time.perf_counter()
        fn(*args)
        self.backend.synchronize()
        return time.perf_counter() - t0

    def _compute(self, work, kv, step: int) -> float:
        """Compute on block ``kv`` at ``step``; returns the seconds the compute spent in communication calls (the
        backward's last step waits for the arriving accumulator and slices of the hop home between its head groups)."""
        if self.kv_compute is not None:
            self.kv_compute[...] = kv
            kv = self.kv_compute
        return work.compute(kv, step) or 0.0

    def comm_only(self, phase: str = "fwd") -> np.ndarray:
        """One ring pass that moves what the pass ``phase`` moves but computes nothing: the transfers' own time,
        per step. fwd: P-1 K/V hops. bwd: P steps, step s sending K/V (s < P-1) and a dK/dV accumulator (s >= 1),
        the last step also the accumulators' hop home. Ring transfers in every mode, as the forward's."""
        P = self.nranks
        work = self._fwd if phase == "fwd" else self._bwd
        cur, nxt = self.bufs
        cur[...] = self.kv_home
        self.backend.synchronize()
        steps = P - 1 if phase == "fwd" else (P if P > 1 else 0)
        out = np.zeros(steps)
        for s in range(steps):
            t0 = time.perf_counter()
            pairs = ([] if s == P - 1 else [(cur, nxt)]) + work.ring_posts(s)
            self.ex.sendrecv_all(pairs)
            if s == P - 1:
                self.ex.sendrecv_all(work.ring_posts(P))
            out[s] = time.perf_counter() - t0
            cur, nxt = nxt, cur
        return out

    def output(self):
        """The normalised output (B, n, H, D) in the storage dtype, on the device."""
        o, _ = self.state.finalize(self.storage)
        return kernel.heads_to_out(o, self.batch)

    @property
    def bwd_score_tile_elems(self) -> int:
        """Elements of one of the backward's two score tiles (0 without a backward)."""
        return getattr(self._bwd, "score_tile_elems", 0)

    def grads(self):
        """dQ (B, n, H, D) and this rank's own dK, dV (B, n, H_kv, D) after :meth:`backward`, in the storage dtype."""
        return self._bwd.grads()

    @property
    def block_backward(self):
        """The backward's :class:`backward.BlockBackward` (after :meth:`prepare_backward` or :meth:`attach_backward`)."""
        return self._bwd.grad

    def grads_compute(self):
        """After :meth:`backward` (ring modes), unrounded: dQ / scale (Z, n, G, D) query-major, the softmax scale, and
        this rank's dK/dV accumulator (2, Z, n, D) at home, in the compute dtype (views, valid until the next pass)."""
        bwd = self._bwd
        return bwd.grad.dqa, bwd.grad.scale, bwd.done


class _Forward:
    """The forward pass as the ring loop sees it: K/V travel alone; the online softmax folds each block in."""

    fold = send_home = finish = None

    def __init__(self, ring: Ring):
        self.ring = ring

    def start(self) -> None:
        self.ring.state.reset()

    def posts(self, s: int) -> list:
        return []

    ring_posts = posts

    def compute(self, kv, s: int) -> None:
        self.ring.state.update(kv[0], kv[1], self.ring.plans[s])


class _Backward:
    """The backward pass as the ring loop sees it: the dK/dV accumulator of a K/V block travels with it.

    Ring modes (overlap, blocking). At step s a rank holds block src = (r - s) mod P and computes its share of
    that block's dK/dV into ``local`` (zeroed first). Meanwhile the accumulator it finished at step s-1 goes to
    the next rank and the accumulator of block src arrives from the previous one (posted with the next K/V
    block: ``posts``). After the wait, the share is added to the arrived accumulator (``fold``), which is then
    finished: it is sent on at step s+1. After the last step every finished accumulator holds all P shares of
    its block and is one hop short of the block's owner: ``send_home`` makes that hop. Per rank: P-1 K/V hops
    and P accumulator hops (P-1 during the pass, one after it).

    Why a separate ``local`` share rather than adding into the arrived accumulator directly: in overlap mode
    the accumulator is still arriving while the share is computed, and adding into it tile by tile once it
    has come would make the rounding depend on when it came. With the share computed apart and added once,
    every accumulator is ((c_b + c_{b+1}) + c_{b+2}) + ... in ring order (c_r: rank r's share) in every mode,
    so the gradients are bitwise identical across modes. The cost is one zero-fill and one add of a
    (2, Z, n, D) array per step: O(n D) against the step's O(n^2 D).

    Allgather mode: every share goes into its own slot of ``parts`` (P, 2, Z, n, D); after the last step an
    all-to-all hands each owner the P shares of its block (the reduce-scatter's data movement), and the owner
    sums them in the same ring order.
    """

    def __init__(self, ring: Ring, q, do, on_tile):
        self.ring = ring
        self._inputs = (q, do)  # read by prepare(), then dropped
        self._on_tile = on_tile
        self.grad = None  # backward.BlockBackward (torch_kernel.FusedBackward with --kernel torch), made by prepare()
        self.allgather = ring.cfg.mode == "allgather"
        if self.allgather:
            self.fold = None
        # overlap: the last step's share is computed in head groups, each group's accumulator slice sent home while
        # the next group computes (only the last slice's hop is left after the compute)
        self.pipelined = ring.cfg.mode == "overlap" and ring.nranks > 1

    def prepare(self) -> None:
        """The untimed forward, the BlockBackward of its O and LSE (FusedBackward with a fused kernel), then the
        accumulators (allocated last, once the temporaries of this step are freed, so that they do not add to its peak)."""
        ring = self.ring
        if self.grad is not None:
            return
        xp = ring.backend.xp
        q, do = self._inputs
        self._inputs = None
        hk = ring.kv_home.shape[1] // ring.batch
        qh = kernel.q_to_heads(xp, q, hk, ring.compute) * ring.compute.type(kernel.softmax_scale(q.shape[3]))  # (Z, G, n, D)
        doh = kernel.q_to_heads(xp, do, hk)
        del q, do
        ring.forward()  # untimed: O and the log-sum-exp
        o, lse = ring.state.finalize(ring.storage)  # O in the storage dtype (as a training forward keeps it)
        self.make_grad(qh, doh, o, lse)
        del qh, doh, o, lse
        self.allocate()

    def make_grad(self, qh, doh, o, lse) -> None:
        """The BlockBackward of these queries, dO, O and LSE (FusedBackward with a fused kernel)."""
        ring = self.ring
        self.grad = make_backward(
            ring.backend,
            qh,
            doh,
            o,
            lse,
            kernel_name=ring.cfg.kernel,
            tile_q=ring.cfg.tile_q,
            on_tile=self._on_tile,
            matmul=ring.matmul,
            exp_base=getattr(ring.state, "base", None) and ring.state.base.name,  # the forward's exponential (native)
            storage=ring.storage,
        )
        self.score_tile_elems = score_tile_elems(self.grad, qh.shape[1])

    def allocate(self) -> None:
        """The accumulators: allocated last, once the temporaries of the set-up are freed (not to add to its peak)."""
        ring = self.ring
        xp = ring.backend.xp
        shape, dt = ring.kv_home.shape, ring.compute
        if self.allgather:
            self.parts = xp.zeros((ring.nranks,) + shape, dt)  # this rank's share of every block
            self.received = xp.empty_like(self.parts)  # every rank's share of this rank's block
            self.home = xp.empty(shape, dt)
        else:
            self.local = xp.empty(shape, dt)  # this step's share
            self.done = xp.empty(shape, dt)  # the accumulator finished last step: on its way to the next rank
            self.arriving = xp.empty(shape, dt)  # the accumulator of the block in hand: from the previous rank

    def start(self) -> None:
        self.grad.reset()
        if self.allgather:
            self.parts.fill(0)

    def posts(self, s: int) -> list:
        """Beside the next K/V block: the accumulator finished at step s-1 out, the one of this step's block in."""
        return [] if self.allgather else self.ring_posts(s)

    def ring_posts(self, s: int) -> list:
        """The accumulator pair of step s on the ring (s = P: the hop home); comm-only passes use it in every mode."""
        if s < 1 or self.ring.nranks == 1:
            return []
        return [(self.parts[0], self.received[0])] if self.allgather else [(self.done, self.arriving)]

    def compute(self, kv, s: int) -> float:
        ring = self.ring
        if self.allgather:
            share = self.parts[(ring.rank - s) % ring.nranks]
        else:
            share = self.local
            share.fill(0)
        if self.pipelined and s == ring.nranks - 1:
            return self._last_step(kv, s)
        self.grad.update(kv[0], kv[1], share[0], share[1], ring.plans[s])
        return 0.0

    def _last_step(self, kv, s: int) -> float:
        """The last step in overlap mode: the share in head groups (on the kernel's head-chunk bounds, so the
        arithmetic is the ungrouped one's), each group folded into the arrived accumulator and posted home (to the
        next rank, which owns the block; this rank's own accumulator arrives into ``done``) while the next groups
        compute. Group j >= 1 is folded and posted as soon as it has been computed (group 0 after group 1, with it:
        its fold waits for the arriving accumulator, which gets group 0's compute to arrive), and waited for HOME_LAG
        groups later: a fused kernel calls MPI only between its calls (a few per group: torch_kernel.row_chunks), and a
        transfer needs two or three progress calls on each side, alternating, to finish; after the compute only the
        last group's slice (and any not yet finished) is left to move. HOME_LAG slices are in flight at a time, one per
        exchange (``ring.home_exs``, the first the ring's own ``ex``); the last ones are waited for by the loop
        (``ex``) and ``send_home`` (the others). Returns the seconds spent waiting."""
        ring = self.ring
        groups = home_groups(getattr(self.grad, "head_bounds", None), self.local.shape[1])
        waited, sent = 0.0, 0
        for i, (za, zb) in enumerate(groups):
            self.grad.update(kv[0], kv[1], self.local[0], self.local[1], ring.plans[s], heads=(za, zb))
            if i >= 1 or len(groups) == 1:  # group 0 waits for group 1: its fold waits for the arriving accumulator
                for j in range(sent, i + 1):
                    waited += self._send_group(j, groups)
                sent = i + 1
        return waited

    def _send_group(self, j: int, groups: list) -> float:
        """Group j's share into the arrived accumulator, and its slice home; returns the seconds waited first (group 0:
        for the step's own transfers, the arriving accumulator among them; group j >= lag: for the slice of group
        j - lag, on the same exchange). Group j goes on exchange (j - len(groups)) mod lag, lag = min(HOME_LAG,
        len(groups)): the slices still in flight after the compute are waited for in the order they were posted (the
        loop's ``ex``, exchange 0, holds the earliest; ``send_home`` waits for the others in turn), so that the k-th
        wait of the step is its k-th post's, as the exposed-time split reads the marks (comm.KVExchange.mark)."""
        ring = self.ring
        lag = min(HOME_LAG, len(groups))
        slot = (j - len(groups)) % lag
        ex = ring.home_exs[slot]
        t0 = time.perf_counter()
        if j == 0:
            ring.ex.wait()  # the step's transfers (the arriving accumulator)
        if j >= lag:
            ex.wait()
        waited = time.perf_counter() - t0
        g = slice(*groups[j])
        self.arriving[:, g] += self.local[:, g]
        ex.post_all([(self.arriving[0, g], self.done[0, g]), (self.arriving[1, g], self.done[1, g])], tag=5 + 4 * slot)
        return waited

    def fold(self, s: int) -> None:
        if self.pipelined and s == self.ring.nranks - 1:
            return  # folded group by group in _last_step
        if s == 0:  # the rank's own block: its share starts the accumulator
            self.local, self.done = self.done, self.local
        else:
            self.arriving += self.local
            self.done, self.arriving = self.arriving, self.done

    def send_home(self) -> None:
        """After the last step: the accumulators' last hop (ring modes), or the all-to-all of the shares (allgather)."""
        if self.allgather:
            if self.ring.nranks > 1:
                self.ring.ex.alltoall(self.parts, self.received)
            else:
                self.received[...] = self.parts
        elif self.pipelined:  # home into done by _last_step: its last slices but one may still be on their way
            for hx in self.ring.home_exs[1:]:
                if hx is not self.ring.ex and hx.posted:
                    hx.wait()
        elif self.ring.nranks > 1:
            self.ring.ex.sendrecv_all([(self.done, self.arriving)], tag=3)
            self.done, self.arriving = self.arriving, self.done

    def finish(self) -> None:
        """Allgather: the owner's sum of every rank's share of its block, in ring order (rank r, r+1, ...), as the ring adds them."""
        if not self.allgather:
            return
        r, P = self.ring.rank, self.ring.nranks
        self.home[...] = self.received[r]
        for i in range(1, P):
            self.home += self.received[(r + i) % P]

    def grads(self):
        """dQ (B, n, H, D), dK and dV (B, n, H_kv, D) in the storage dtype, each written once into its own array."""
        ring, xp = self.ring, self.ring.backend.xp
        z, n, g, d = self.grad.dqa.shape
        b = ring.batch
        dq = xp.empty((b, n, z // b, g, d), ring.storage)
        # dQ = (dQ / scale) * scale in the compute dtype, rounded once to the storage dtype (as BlockBackward.dq)
        xp.multiply(self.grad.dqa.reshape(b, z // b, n, g, d).transpose(0, 2, 1, 3, 4), ring.compute.type(self.grad.scale), out=dq)
        acc = self.home if self.allgather else self.done  # (2, Z, n, D), at home
        dk, dv = (xp.empty((b, n, z // b, d), ring.storage) for _ in range(2))
        dk[...] = backward.heads_to_kv(acc[0], b)
        dv[...] = backward.heads_to_kv(acc[1], b)
        return dq.reshape(b, n, -1, d), dk, dv


def home_groups(bounds, z: int) -> list[tuple[int, int]]:
    """Up to HOME_GROUPS (z0, z1) head ranges covering 0..z, each starting and ending on one of ``bounds`` (the
    kernel's head-chunk bounds, 0 and z included; None: one group)."""
    bounds = list(bounds) if bounds else [0, z]
    chunks = len(bounds) - 1
    per = -(-chunks // HOME_GROUPS)
    cuts = bounds[::per] + ([z] if (chunks % per) else [])
    return list(zip(cuts[:-1], cuts[1:]))


FAULT_FORM = "rank:step[@P]"


def parse_fault(spec: str, nranks: int) -> tuple[int, int] | None:
    """The (rank, step) of RINGBENCH_FAULT=rank:step[@P] (None if unset or empty, or when ``@P`` names another
    rank count: a sweep over several rank counts can fail the points of one of them); ValueError naming the
    variable and the allowed form for anything else, or for a rank or step outside 0..P-1."""
    spec = spec.strip()
    if not spec:
        return None
    body, at, only = spec.partition("@")
    if at and only.strip().isdecimal() and int(only) != nranks:
        return None
    r, sep, s = body.partition(":")
    if sep and r.strip().isdecimal() and s.strip().isdecimal() and (not at or only.strip().isdecimal()):
        rank, step = int(r), int(s)
        if rank < nranks and step < nranks:
            return rank, step
    ranks = f"{nranks} rank{'s' if nranks > 1 else ''}"
    raise ValueError(f"RINGBENCH_FAULT: expected {FAULT_FORM} with rank and step in 0..{nranks - 1} ({ranks}), got {spec!r}")
