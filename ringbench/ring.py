"""The ring step loop: post the next K/V transfer, compute on the current block, wait, swap.

A :class:`Ring` owns one rank's queries, its double K/V buffer and the online-softmax state, and runs
one forward pass of ring attention per call to :meth:`Ring.forward`, returning per-step timings.

Modes (what is benchmarked):

* ``overlap``: Isend/Irecv of the next block are posted before computing on the current one, and
  waited for after; with ``progress='test'`` the compute also calls MPI_Testall between tiles so the
  transfer advances while NumPy computes.
* ``blocking``: Sendrecv, then compute: the no-overlap baseline.
* ``allgather``: gather every rank's K/V first, then compute (the Llama-3 style baseline).

All three perform the same arithmetic in the same order, so their outputs are bitwise identical.
"""

from __future__ import annotations

import time

import numpy as np

from ringbench import kernel
from ringbench.backend import MklMatmul
from ringbench.layout import step_plan

# Elements of one score tile. Host: 512 query rows x 512 keys of float32 (1 MiB). Measured on a 2 MiB-L2
# core (benchmarks/README.md): both GEMMs of a tile run near OpenBLAS's peak at this shape, the tile, its K/V
# slices and the elementwise passes over it stay in L2, and per-tile Python costs are spread over 2^18
# scores; 256 x 512 was 0-4% slower, a whole key block per tile (64 x 4096 at n = 4096) ~10% slower.
# Device: all batch-heads at once (few, large kernels), every key of the block, capped at 512 MiB of scores.
HOST_TILE_ELEMS = 1 << 18
# With MKL's GEMMs (--blas mkl) 1024 x 512 tiles measured best (2 MiB: MKL reaches its peak on taller tiles,
# and beta = 1 accumulation removes a pass); see benchmarks/README.md.
HOST_TILE_ELEMS_MKL = 1 << 19
HOST_TILE_K = 512
DEVICE_TILE_ELEMS = 1 << 27


class InjectedFault(RuntimeError):
    """Raised on purpose (RINGBENCH_FAULT=rank:step) to test that one failing rank ends the job."""


def auto_tile_k(backend, n_keys: int) -> int:
    """Keys per score tile: the whole block on a device, at most HOST_TILE_K on the host."""
    return n_keys if backend.is_gpu else max(1, min(n_keys, HOST_TILE_K))


def auto_tile_q(backend, n_local: int, rows_per_query: int, n_keys: int, host_budget: int = HOST_TILE_ELEMS) -> int:
    """Query rows per tile so that (rows_per_query * tile_q) x tile_k scores fit the backend's tile budget."""
    budget = DEVICE_TILE_ELEMS if backend.is_gpu else host_budget
    tile_k = auto_tile_k(backend, n_keys)
    return int(max(16, min(n_local, budget // max(1, rows_per_query * tile_k))))


def auto_head_chunk(heads: int, tile_elems: int) -> int:
    """Batch-heads per host tile: 1 unless one head's tile is under half the budget (blocks under ~512 keys),
    then as many as fill half of it (measured +10-25% at blocks of 128-256: fewer, larger NumPy calls)."""
    return int(max(1, min(heads, (HOST_TILE_ELEMS // 2) // max(1, tile_elems))))


def tiling(backend, z: int, g: int, n: int, n_keys: int, tile_q: int = 0, mkl: bool = False) -> tuple[int, int, int]:
    """(head_chunk, tile_q, tile_k) of the score tiles for ``z`` batch-heads of ``g`` x ``n`` queries against ``n_keys`` keys."""
    head_chunk = z if backend.is_gpu else 1
    budget = HOST_TILE_ELEMS_MKL if mkl else HOST_TILE_ELEMS
    tile_q = tile_q or auto_tile_q(backend, n, head_chunk * g, n_keys, budget)
    tile_k = auto_tile_k(backend, n_keys)
    if not backend.is_gpu:  # small blocks: several heads per tile, fewer Python calls
        head_chunk = auto_head_chunk(z, g * tile_q * tile_k)
    return head_chunk, tile_q, tile_k


def make_state(backend, qh, n_keys: int, *, tile_q: int = 0, on_tile=None, matmul=None, scale=None) -> kernel.OnlineSoftmax:
    """The online-softmax state for queries ``qh`` (Z, G, n, D) (read only; scaled by ``scale`` in the state's
    own copy, None if already scaled), tiled as the backend wants it."""
    z, g, n, _ = qh.shape
    head_chunk, tile_q, tile_k = tiling(backend, z, g, n, n_keys, tile_q, isinstance(matmul, MklMatmul))
    return kernel.OnlineSoftmax(
        backend.xp, qh, head_chunk=head_chunk, tile_q=tile_q, tile_k=tile_k, on_tile=on_tile, matmul=matmul, scale=scale
    )


class Ring:
    def __init__(self, cfg, backend, exchange, rank: int, nranks: int, q, k, v, *, fault_step: int | None = None):
        """q: (B, n, H, D), k/v: (B, n, H_kv, D) in the storage dtype, on the backend's device; only read, never
        written to (the ring computes on copies it owns). ``fault_step``: raise InjectedFault at that step."""
        xp = backend.xp
        self.cfg, self.backend, self.ex = cfg, backend, exchange
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
        self.state = make_state(backend, qh, n, tile_q=cfg.tile_q, on_tile=on_tile, matmul=self.matmul, scale=scale)
        self.tile_q, self.tile_k = self.state.tile_q, self.state.tile_k
        del qh  # the state keeps its own (scaled, widened) copy: free this before the K/V buffers
        self.kv_home = xp.stack([kernel.kv_to_heads(xp, k), kernel.kv_to_heads(xp, v)])  # (2, Z, n, D)
        self.bufs = [xp.empty_like(self.kv_home), xp.empty_like(self.kv_home)]
        # half precision travels as stored; the compute copy is made once per step
        self.kv_compute = None if self.storage == self.compute else xp.empty(self.kv_home.shape, self.compute)
        self.gathered = xp.empty((nranks,) + self.kv_home.shape, self.storage) if cfg.mode == "allgather" else None
        self.plans = [step_plan(cfg.layout, rank, (rank - s) % nranks, nranks, n, cfg.causal) for s in range(nranks)]
        self.fault = fault_step
        self.score_tile_elems = self.state.head_chunk * (h // hk) * self.tile_q * self.tile_k

    def _progress(self) -> None:
        if self.ex.posted:
            self.ex.test()

    def block_bytes(self) -> int:
        return int(self.kv_home.nbytes)

    def _compute(self, kv, step: int) -> None:
        if self.kv_compute is not None:
            self.kv_compute[...] = kv
            kv = self.kv_compute
        self.state.update(kv[0], kv[1], self.plans[step])

    def forward(self):
        """One ring pass. Returns (compute_s, comm_s, step_s) arrays of length P, and the pass's total."""
        P, mode, ex = self.nranks, self.cfg.mode, self.ex
        self.state.reset()
        cur, nxt = self.bufs
        cur[...] = self.kv_home
        self.backend.synchronize()
        t_compute, t_comm, t_step = np.zeros(P), np.zeros(P), np.zeros(P)
        clock = time.perf_counter
        ctimer = self.backend.timer()
        pass_start = clock()
        for s in range(P):
            if s == self.fault:
                raise InjectedFault(f"injected fault on rank {self.rank} at step {s}")
            more = s < P - 1  # is there a next block to receive?
            step_start = clock()
            if mode == "overlap":
                if more:
                    ex.post(cur, nxt)  # next K/V starts moving ...
                t_comm[s] = clock() - step_start
                ctimer.start()
                self._compute(cur, s)  # ... while this one is computed on
                ctimer.stop()
                t0 = clock()
                if more:
                    ex.wait()
                t_comm[s] += clock() - t0
            elif mode == "blocking":
                if more:
                    ex.sendrecv(cur, nxt)  # transfer, then compute: nothing overlaps
                t_comm[s] = clock() - step_start
                ctimer.start()
                self._compute(cur, s)
                ctimer.stop()
            else:  # allgather: every block first, then compute
                if s == 0:
                    ex.allgather(self.kv_home, self.gathered)
                t_comm[s] = clock() - step_start
                ctimer.start()
                self._compute(self.gathered[(self.rank - s) % P], s)
                ctimer.stop()
            self.backend.synchronize()
            t_step[s] = clock() - step_start
            t_compute[s] = ctimer.seconds()
            cur, nxt = nxt, cur
        return t_compute, t_comm, t_step, clock() - pass_start

    def comm_only(self) -> np.ndarray:
        """One ring pass that moves K/V but computes nothing: the transfers' own time, per step."""
        P = self.nranks
        cur, nxt = self.bufs
        cur[...] = self.kv_home
        self.backend.synchronize()
        out = np.zeros(max(P - 1, 0))
        for s in range(P - 1):
            t0 = time.perf_counter()
            self.ex.sendrecv(cur, nxt)
            out[s] = time.perf_counter() - t0
            cur, nxt = nxt, cur
        return out

    def output(self):
        """The normalised output (B, n, H, D) in the storage dtype, on the device."""
        o, _ = self.state.finalize(self.storage)
        return kernel.heads_to_out(o, self.batch)


FAULT_FORM = "rank:step"


def parse_fault(spec: str, nranks: int) -> tuple[int, int] | None:
    """The (rank, step) of RINGBENCH_FAULT=rank:step (None if unset or empty); ValueError naming the variable
    and the allowed form for anything else, or for a rank or step outside 0..P-1."""
    spec = spec.strip()
    if not spec:
        return None
    r, sep, s = spec.partition(":")
    if sep and r.strip().isdecimal() and s.strip().isdecimal():
        rank, step = int(r), int(s)
        if rank < nranks and step < nranks:
            return rank, step
    ranks = f"{nranks} rank{'s' if nranks > 1 else ''}"
    raise ValueError(f"RINGBENCH_FAULT: expected {FAULT_FORM} with rank and step in 0..{nranks - 1} ({ranks}), got {spec!r}")
