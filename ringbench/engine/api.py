"""The per-rank engine interface, the rank context every engine is built from, and the one place a mode is chosen.

An engine is one rank's part of a context-parallel pass of some strategy (``--mode``): the ring (``overlap``,
``blocking``, ``allgather``: ringbench.engine.ring), Ulysses and hybrid (ringbench.engine.hybrid), pass-Q
(ringbench.engine.passq). The harness builds every one the same way, ``build(ctx, q, k, v, do)``, and then
only uses what :class:`Engine` declares: it never branches on the mode.

Adding a strategy: one module with a class that takes ``(ctx, q, k, v, do=None)`` and provides :class:`Engine`,
one entry in ``ENGINES`` (and its name in config.MODES, with its rules in config.validate); tests/engine/test_engine_api.py
then checks it against the float64 reference through this interface at 1..4 ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from ringbench.engine import serving
from ringbench.engine.hybrid import Hybrid, Ulysses
from ringbench.engine.passq import PassQ
from ringbench.engine.ring import Ring


@dataclasses.dataclass(frozen=True)
class RankContext:
    """Who this rank is in the run and what it computes with: what every engine's constructor takes first.

    ``comm``: the communicator of the ranks that run the pass together (an mpi4py communicator, used only through
    ringbench.engine.comm); ``cuda_aware``: whether device buffers may go to MPI as they are; ``fault_step``: raise
    InjectedFault at that step of this rank's pass (RINGBENCH_FAULT, tests); ``fault_at``: (rank, step offset) a
    fault's message names (an inner ring of a strategy counts the strategy's rank and steps)."""

    cfg: Any  # ringbench.config.RunConfig
    backend: Any  # ringbench.engine.backend.Backend
    comm: Any
    cuda_aware: bool = False
    fault_step: int | None = None
    fault_at: tuple | None = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def nranks(self) -> int:
        return self.comm.size

    def replace(self, **changes) -> RankContext:
        return dataclasses.replace(self, **changes)


@runtime_checkable
class Engine(Protocol):
    """One rank's part of a pass. Timings of a pass: (compute_s, comm_s, step_s) per step of the mode (arrays of the
    same length) and the pass's total, all seconds; the step count is the mode's own (ring P, ulysses 3, hybrid
    R + 2, pass-q P + 1)."""

    storage: Any  # the storage dtype of q, k, v
    compute: Any  # the compute (accumulation) dtype
    blas: str  # the GEMM library (or fused kernel) that computes
    score_tile_elems: int  # elements of one forward score tile (the memory record's)

    def forward(self) -> tuple:
        """One timed forward pass."""

    def prepare_backward(self) -> None:
        """The untimed forward a backward needs (O and the log-sum-exp), once."""

    def backward(self) -> tuple:
        """One timed backward pass (after prepare_backward)."""

    def comm_only(self, phase: str = "fwd") -> Any:
        """One pass of ``phase``'s transfers without compute: seconds per transfer step."""

    def output(self) -> Any:
        """This rank's tokens' output (B, n, H, D), storage dtype, on the device."""

    def grads(self) -> tuple:
        """dQ (B, n, H, D), dK, dV (B, n, H_kv, D) of this rank's tokens after backward, storage dtype."""

    def bytes_per_rank(self, phase: str = "fwd") -> int:
        """Bytes this rank sends to other ranks in one pass of ``phase``."""

    @property
    def bwd_score_tile_elems(self) -> int:
        """Elements of one of the backward's score tiles (0 without a backward)."""


# --mode -> the engine that runs it; config.MODES lists the names (and config.validate their rules)
ENGINES = {
    "overlap": Ring.build,
    "blocking": Ring.build,
    "allgather": Ring.build,
    "ulysses": Ulysses,
    "hybrid": Hybrid,
    "pass-q": PassQ,
}


def build(ctx: RankContext, q, k, v, do=None) -> Engine:
    """The engine of ``ctx.cfg.mode`` for this rank's q (B, n, H, D), k, v (B, n, H_kv, D) in the storage dtype on
    the backend's device (read, never written), with ``do`` (B, n, H, D) for a backward. A serving pass (prefill,
    decode: ringbench.engine.serving) builds its own, from queries and K/V of different lengths."""
    if ctx.cfg.pass_ in serving.SERVING:
        return serving.build(ctx, q, k, v)
    return ENGINES[ctx.cfg.mode](ctx, q, k, v, do=do)
