"""Context-parallel strategies beside the ring: Ulysses, hybrid (Ulysses x ring), pass-Q.

The engines live in ringbench.engine.hybrid (:class:`Hybrid`, :class:`Ulysses`) and ringbench.engine.passq
(:class:`PassQ`); each provides ringbench.engine.api.Engine and is built by ``api.build``. This module holds what
they share (group sizes, the kv-head map, loading queries into a softmax state) and this description. The causal
structure of any pair of sequence chunks comes from ``layout.step_plan``
(chunk i = the tokens rank i holds in the layout), the arithmetic from ``kernel.OnlineSoftmax`` and
``kernel.merge``, and all MPI from ``ringbench.engine.comm``.

* **hybrid** (``--ulysses-degree U``, P = U x R): ranks form groups of U consecutive ranks (rank r is member
  r mod U of group r // U; the harness numbers ranks node-major, so with U = ranks per node each group is one
  node and the all-to-all stays on the fast intra-node links). An all-to-all inside each group turns the
  sequence split into a head split: member a then holds the U n tokens of its group for query heads [a H/U, (a+1) H/U) and their kv heads. A
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

from ringbench.config import heads_rule  # noqa: F401  (the rule lives with the other config checks)
from ringbench.engine.hybrid import degree, kv_head_map  # noqa: F401  (what the harness and tests use of the family)

STRATEGIES = ("ulysses", "hybrid", "pass-q")


def make(cfg, backend, world, cuda_aware: bool, rank: int, nranks: int, q, k, v, fault_step: int | None = None, do=None):
    """The strategy engine for ``cfg.mode`` (one of STRATEGIES) from the six values of a rank context (``rank`` and
    ``nranks`` must be ``world``'s): ``api.build(RankContext(cfg, backend, world, cuda_aware, fault_step), ...)``."""
    from ringbench.engine.api import RankContext, build

    assert (rank, nranks) == (world.rank, world.size), "rank and nranks are the communicator's"
    return build(RankContext(cfg, backend, world, cuda_aware, fault_step), q, k, v, do=do)
