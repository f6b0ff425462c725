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

import os

import numpy as np

from ringbench import kernel
from ringbench.layout import step_plan

# One score tile on the host: 256 query rows x 512 keys of float32 (512 KiB). Measured on a 2 MiB-L2 core
# (benchmarks/README.md): the two GEMMs of a tile run near OpenBLAS's peak at this shape, and the tile, its
# K/V slices and the elementwise passes over it stay in L2. Taller tiles of fewer keys lose GEMM speed; a
# whole key block per tile (the old 64 x 4096 at n = 4096) lost ~10%.
HOST_TILE_ELEMS = 1 << 17
HOST_TILE_K = 512


class InjectedFault(RuntimeError):
    """Raised on purpose (RINGBENCH_FAULT=rank:step) to test that one failing rank ends the job."""


def auto_tile_k(backend, n_keys: int) -> int:
    """Keys per score tile: the whole block on a GPU, HOST_TILE_K on the host."""
    return n_keys if backend.is_gpu else max(1, min(n_keys, HOST_TILE_K))


def auto_tile_q(backend, n_local: int, group: int, n_keys: int) -> int:
    """Query positions per score tile (each carries ``group`` query heads): HOST_TILE_ELEMS per tile on the host."""
    if backend.is_gpu:
        return n_local
    tk = auto_tile_k(backend, n_keys)
    return int(max(16, min(n_local, HOST_TILE_ELEMS // max(1, group * tk))))


class Ring:
    def __init__(self, cfg, backend, exchange, rank: int, nranks: int, q, k, v):
        """q: (B, n, H, D), k/v: (B, n, H_kv, D) in the storage dtype, on the backend's device."""
        xp = backend.xp
        self.cfg, self.backend, self.ex = cfg, backend, exchange
        self.rank, self.nranks = rank, nranks
        self.storage = q.dtype
        self.compute = backend.compute_dtype(q.dtype)
        b, n, h, d = q.shape
        hk = k.shape[2]
        self.batch, self.n = b, n
        qh = kernel.q_to_heads(xp, q, hk, self.compute)                  # (Z, G, n, D)
        qh *= self.compute.type(kernel.softmax_scale(d))
        self.kv_home = xp.stack([kernel.kv_to_heads(xp, k), kernel.kv_to_heads(xp, v)])  # (2, Z, n, D)
        self.bufs = [xp.empty_like(self.kv_home), xp.empty_like(self.kv_home)]
        # half precision travels as stored; the compute copy is made once per step
        self.kv_compute = None if self.storage == self.compute else xp.empty(self.kv_home.shape, self.compute)
        self.gathered = (xp.empty((nranks,) + self.kv_home.shape, self.storage)
                         if cfg.mode == "allgather" else None)
        group = h // hk
        self.tile_q = cfg.tile_q or auto_tile_q(backend, n, group, n)
        self.tile_k = auto_tile_k(backend, n)
        on_tile = self._progress if (cfg.progress == "test" and cfg.mode == "overlap") else None
        self.state = kernel.OnlineSoftmax(xp, qh, head_chunk=None if backend.is_gpu else 1,
                                          tile_q=self.tile_q, tile_k=self.tile_k, on_tile=on_tile)
        heads_per_tile = qh.shape[0] if backend.is_gpu else 1
        del qh                                                           # the state keeps its own copy
        self.plans = [step_plan(cfg.layout, rank, (rank - s) % nranks, nranks, n, cfg.causal)
                      for s in range(nranks)]
        self.fault = _fault_step(rank)
        self.score_tile_elems = group * self.tile_q * self.tile_k * heads_per_tile

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
        xp, P = self.backend.xp, self.nranks
        mode = self.cfg.mode
        self.state.reset()
        cur, nxt = self.bufs
        cur[...] = self.kv_home
        self.backend.synchronize()
        t_compute = np.zeros(P)
        t_comm = np.zeros(P)
        t_step = np.zeros(P)
        step_timer = _HostClock()
        total = _HostClock()
        total.start()
        for s in range(P):
            step_timer.start()
            comm = _HostClock()
            ctimer = self.backend.timer()
            last = s == P - 1
            if s == self.fault:
                raise InjectedFault(f"injected fault on rank {self.rank} at step {s}")
            if mode == "overlap":
                comm.run(lambda: None if last else self.ex.post(cur, nxt))
                ctimer.start()
                self._compute(cur, s)
                ctimer.stop()
                comm.run(lambda: None if last else self.ex.wait())
            elif mode == "blocking":
                comm.run(lambda: None if last else self.ex.sendrecv(cur, nxt))
                ctimer.start()
                self._compute(cur, s)
                ctimer.stop()
            else:  # allgather
                if s == 0:
                    comm.run(lambda: self.ex.allgather(self.kv_home, self.gathered))
                ctimer.start()
                self._compute(self.gathered[(self.rank - s) % P], s)
                ctimer.stop()
            self.backend.synchronize()
            step_timer.stop()
            t_compute[s] = ctimer.seconds()
            t_comm[s] = comm.elapsed
            t_step[s] = step_timer.seconds()
            if mode != "allgather" and not last:
                cur, nxt = nxt, cur
        total.stop()
        return t_compute, t_comm, t_step, total.seconds()

    def comm_only(self) -> np.ndarray:
        """One ring pass that moves K/V but computes nothing: the transfers' own time, per step."""
        P = self.nranks
        cur, nxt = self.bufs
        cur[...] = self.kv_home
        self.backend.synchronize()
        out = np.zeros(max(P - 1, 0))
        for s in range(P - 1):
            c = _HostClock()
            c.run(lambda: self.ex.sendrecv(cur, nxt))
            out[s] = c.elapsed
            cur, nxt = nxt, cur
        return out

    def output(self):
        """The normalised output (B, n, H, D) in the storage dtype, on the device."""
        o, _ = self.state.finalize(self.storage)
        return kernel.heads_to_out(o, self.batch)


class _HostClock:
    """Accumulating host stopwatch."""

    def __init__(self):
        import time
        self._now = time.perf_counter
        self.elapsed = 0.0

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> None:
        self.elapsed = self._now() - self._t0

    def seconds(self) -> float:
        return self.elapsed

    def run(self, fn) -> None:
        t0 = self._now()
        fn()
        self.elapsed += self._now() - t0


def _fault_step(rank: int) -> int | None:
    spec = os.environ.get("RINGBENCH_FAULT", "")
    if not spec:
        return None
    r, _, s = spec.partition(":")
    return int(s or 0) if int(r) == rank else None
