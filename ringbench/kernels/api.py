"""The kernel interfaces the engine programs against, and the one place a kernel is chosen (``--kernel``).

A kernel is the per-rank state of one rank's queries while K/V blocks pass by. The engine (the ring, the
strategies) and the probe only ever hold a :class:`ForwardKernel` or a :class:`BackwardKernel`, made by
:func:`make_forward` / :func:`make_backward`; which class implements it is decided here, by name, from
``KERNELS``. Implementations: ``native`` (:class:`ringbench.kernels.kernel.OnlineSoftmax`,
:class:`ringbench.kernels.backward.BlockBackward`), ``torch`` and ``flash-attn``
(:class:`ringbench.kernels.torch_kernel.FusedAttention`, ``FusedBackward``).

Adding a kernel: one module with the two classes, one entry in ``KERNELS`` (and its name in config.KERNELS);
tests/kernels/test_kernel_api.py then runs it against the float64 reference through both protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ringbench.kernels import backward, kernel
from ringbench.kernels.mkl import MklMatmul
from ringbench.kernels.tiling import tiling
from ringbench.kernels.torch_kernel import FusedAttention, FusedBackward
from ringbench.layout import Piece


@runtime_checkable
class ForwardKernel(Protocol):
    """One rank's queries (Z, G, n, D) against a stream of K/V blocks: prepare (``reset``), fold in one block per
    step (``update``: only the pieces of the step plan, each with its causal mask), finish (``finalize``)."""

    shape: tuple  # (Z, G, n, D): Z = B * H_kv batch-heads, G query heads per kv head
    dtype: object  # the accumulation dtype (float32 for half-precision storage)
    head_chunk: int  # batch-heads per score tile
    tile_q: int  # query rows per score tile (0: the kernel's own, on a device)
    tile_k: int | None  # keys per score tile (None or 0: the whole block)

    def reset(self) -> None:
        """Start a new pass: empty running output and statistics (the queries stay)."""

    def update(self, k, v, pieces: Sequence[Piece]) -> None:
        """Fold in K/V block ``k``, ``v`` (Z, m, D): the parts of it named by ``pieces`` (layout.step_plan)."""

    def finalize(self, out_dtype=None):
        """(O (Z, G, n, D) normalised, in ``out_dtype`` or the accumulation dtype; LSE (Z, G, n), natural log)."""


@runtime_checkable
class BackwardKernel(Protocol):
    """The backward of one rank's queries (with their dO, O and LSE) against a stream of K/V blocks: ``reset``,
    then per block ``update`` (dQ accumulates here, that block's dK/dV into the accumulators given), then ``dq``."""

    shape: tuple  # (Z, G, n, D)
    dtype: object  # the accumulators' dtype
    scale: float  # the softmax scale the queries were multiplied by
    dqa: object  # (Z, n, G, D): dQ / scale so far, query-major
    head_chunk: int
    tile_q: int
    tile_k: int | None

    def reset(self) -> None:
        """Start a new pass: dQ to zero."""

    head_bounds: tuple  # (0, ..., Z): the head-chunk bounds ``update``'s ``heads`` may start and end on

    def update(self, k, v, dk_acc, dv_acc, pieces: Sequence[Piece], heads: tuple[int, int] | None = None) -> None:
        """Add block ``k``, ``v``'s part of dQ here and its dK, dV into ``dk_acc``, ``dv_acc`` (Z, m, D); ``heads``
        (z0, z1): only those batch-heads (on ``head_bounds``), with the same arithmetic per head as the whole update."""

    def dq(self, out_dtype=None):
        """The finished dQ (Z, G, n, D)."""


def _native_forward(backend, qh, n_keys: int, *, tile_q, on_tile, matmul, scale, storage):
    z, g, n, _ = qh.shape
    head_chunk, tile_q, tile_k = tiling(backend, z, g, n, n_keys, tile_q, isinstance(matmul, MklMatmul))
    return kernel.OnlineSoftmax(
        backend.xp, qh, head_chunk=head_chunk, tile_q=tile_q, tile_k=tile_k, on_tile=on_tile, matmul=matmul, scale=scale
    )


def _fused_forward(name: str):
    def make(backend, qh, n_keys: int, *, tile_q, on_tile, matmul, scale, storage):
        return FusedAttention(backend, qh, kernel=name, dtype=storage or qh.dtype, on_tile=on_tile, scale=scale)

    return make


def _native_backward(backend, qh, doh, o, lse, *, tile_q, on_tile, matmul, exp_base, storage):
    z, g, n, _ = qh.shape
    auto_q, tile_k, head_chunk = backward.auto_tiles(n, n, g, z, gpu=backend.is_gpu)
    return backward.BlockBackward(
        backend.xp,
        qh,
        doh,
        o,
        lse,
        tile_q=tile_q or auto_q,
        tile_k=tile_k,
        head_chunk=head_chunk,
        matmul=matmul,
        on_tile=on_tile,
        exp_base=exp_base,
    )


def _fused_backward(backend, qh, doh, o, lse, *, tile_q, on_tile, matmul, exp_base, storage):
    return FusedBackward(backend, qh, doh, o, lse, dtype=storage, on_tile=on_tile)


# name -> (forward factory, backward factory); config.KERNELS lists the names a user may choose
KERNELS = {
    "native": (_native_forward, _native_backward),
    "torch": (_fused_forward("torch"), _fused_backward),
    "flash-attn": (_fused_forward("flash-attn"), _fused_backward),
}


def make_forward(
    backend, qh, n_keys: int, *, tile_q: int = 0, on_tile=None, matmul=None, scale=None, kernel_name="native", storage=None
) -> ForwardKernel:
    """The forward state of kernel ``kernel_name`` for queries ``qh`` (Z, G, n, D) (read only; scaled by ``scale``
    in the state's own copy, None if already scaled) against blocks of ``n_keys`` keys, tiled as the backend wants
    it (the native kernel); a fused kernel computes in the ``storage`` dtype and applies ``scale`` itself.
    ``on_tile``: called between score tiles (the ring's MPI progress point)."""
    return KERNELS[kernel_name][0](backend, qh, n_keys, tile_q=tile_q, on_tile=on_tile, matmul=matmul, scale=scale, storage=storage)


def make_backward(
    backend, qh, doh, o, lse, *, kernel_name="native", tile_q: int = 0, on_tile=None, matmul=None, exp_base=None, storage=None
) -> BackwardKernel:
    """The backward state of kernel ``kernel_name`` for queries ``qh`` (times the softmax scale, compute dtype),
    ``doh`` and ``o`` (Z, G, n, D) and ``lse`` (Z, G, n); ``exp_base``: the forward's exponential (native)."""
    return KERNELS[kernel_name][1](
        backend, qh, doh, o, lse, tile_q=tile_q, on_tile=on_tile, matmul=matmul, exp_base=exp_base, storage=storage
    )


def score_tile_elems(state, g: int) -> int:
    """Elements of one score tile of a kernel state with ``g`` query heads per kv head (what the memory record keeps)."""
    return int(state.head_chunk * g * state.tile_q * (state.tile_k or 0))
