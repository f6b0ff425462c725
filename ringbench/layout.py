"""How the global sequence is split over the ranks, and which part of each ring step is needed.

Pure functions of (layout, rank, P, N): no arrays of the attention itself, no MPI.

Layouts (P ranks, global length N, n = N / P tokens per rank):

* ``contiguous``: rank r holds tokens [r*n, (r+1)*n).
* ``zigzag``: the sequence is cut into 2P chunks of c = N / (2P); rank r holds chunks r and 2P-1-r,
  which balances causal work.
* ``striped``: token t lives on rank t mod P (rank r holds r, r+P, r+2P, ...).

At ring step s rank r holds the K/V block that started on rank ``src = (r - s) mod P``. A step plan is the
list of :class:`Piece` (a query row range, a key row range, and a mask kind) that rank r must compute for
that block; an empty plan means the block is fully masked and only forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")

FULL = "full"  # every key visible to every query
CAUSAL = "causal"  # key j visible to query i iff j <= i (local indices within the piece)
STRICT = "strict"  # key j visible to query i iff j < i
MASKS = (FULL, CAUSAL, STRICT)


@dataclass(frozen=True)
class Piece:
    q0: int
    q1: int
    k0: int
    k1: int
    mask: str = FULL

    def pairs(self) -> int:
        """Number of unmasked (query, key) pairs in this piece."""
        nq, nk = self.q1 - self.q0, self.k1 - self.k0
        if self.mask == FULL:
            return nq * nk
        assert nq == nk, "causal pieces are square"
        return nq * (nq + 1) // 2 if self.mask == CAUSAL else nq * (nq - 1) // 2


def divisor(layout: str, nranks: int) -> int:
    """The global sequence length must be a multiple of this for the layout at P ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return 2 * nranks if layout == "zigzag" else nranks


def positions(layout: str, rank: int, nranks: int, seq_len: int) -> np.ndarray:
    """Global token indices held by ``rank``, ascending."""
    n = seq_len // nranks
    if layout == "contiguous":
        return np.arange(rank * n, (rank + 1) * n)
    if layout == "zigzag":
        c = n // 2
        lo = rank * c
        hi = (2 * nranks - 1 - rank) * c
        return np.concatenate([np.arange(lo, lo + c), np.arange(hi, hi + c)])
    if layout == "striped":
        return np.arange(rank, seq_len, nranks)
    raise ValueError(f"unknown layout {layout!r}")


def step_plan(layout: str, rank: int, src: int, nranks: int, n_local: int, causal: bool) -> list[Piece]:
    """Pieces of (local queries of ``rank``) x (local keys of ``src``) that need computing."""
    n = n_local
    if not causal:
        return [Piece(0, n, 0, n, FULL)]
    if layout == "contiguous":
        if src == rank:
            return [Piece(0, n, 0, n, CAUSAL)]
        return [Piece(0, n, 0, n, FULL)] if src < rank else []
    if layout == "zigzag":
        c = n // 2
        if src == rank:
            # q chunk r vs k chunk r: causal; q chunk 2P-1-r vs k chunk r: full;
            # q chunk 2P-1-r vs k chunk 2P-1-r: causal; q chunk r vs k chunk 2P-1-r: masked.
            return [Piece(0, c, 0, c, CAUSAL), Piece(c, n, 0, c, FULL), Piece(c, n, c, n, CAUSAL)]
        if src < rank:
            return [Piece(0, n, 0, c, FULL)]  # all queries, first half of the keys
        return [Piece(c, n, 0, n, FULL)]  # second half of the queries, all keys
    if layout == "striped":
        # query i is token i*P + rank, key j is token j*P + src: visible iff j < i, or j == i and src <= rank.
        return [Piece(0, n, 0, n, CAUSAL if src <= rank else STRICT)]
    raise ValueError(f"unknown layout {layout!r}")


def unmasked_pairs(layout: str, nranks: int, seq_len: int, causal: bool) -> int:
    """Unmasked (query, key) pairs summed over all ranks and steps: N^2, or N(N+1)/2 when causal.

    Every layout's step plans cover each visible (query, key) pair of the global N x N attention exactly once
    (tests/test_layout.py checks this pair by pair, and checks this closed form against the sum of
    ``Piece.pairs`` over all P^2 step plans), so the count does not depend on the layout or P: O(1), where
    the loop over the step plans is O(P^2). ``seq_len`` must be a multiple of ``divisor(layout, nranks)``.
    """
    if seq_len % divisor(layout, nranks):
        raise ValueError(f"seq_len {seq_len} is not a multiple of {divisor(layout, nranks)} (layout {layout} at {nranks} ranks)")
    return seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len


def prefill_plan(layout: str, rank: int, src: int, nranks: int, n_new: int, n_cached: int) -> list[Piece]:
    """Pieces of rank ``rank``'s n_new queries against the K/V block of rank ``src`` in a prefill against a cache
    (ringbench.engine.serving: its n_cached cached rows, then its n_new new rows): every cached key (FULL), then the
    causal plan of the new tokens, shifted past the cached rows."""
    pieces = [Piece(0, n_new, 0, n_cached, FULL)] if n_cached else []
    for p in step_plan(layout, rank, src, nranks, n_new, True):
        pieces.append(Piece(p.q0, p.q1, p.k0 + n_cached, p.k1 + n_cached, p.mask))
    return pieces


def cache_pairs(seq_len: int, queries: int) -> int:
    """Visible (query, key) pairs per sequence and head when the last ``queries`` of ``seq_len`` positions attend
    causally to all of them (the serving passes: prefill's T = N - C new tokens, decode's t): each sees the
    N - T earlier tokens and, causally, the new ones up to itself. ``queries = seq_len`` is the causal count."""
    n, t = seq_len, queries
    return t * (n - t) + t * (t + 1) // 2


def first_hidden(mask: str, i):
    """The first key index hidden from query ``i`` (piece-local; an int or an integer array): key j is visible
    to query i iff j < first_hidden(mask, i). The one definition of CAUSAL and STRICT: the kernel's masking and
    :func:`mask_for` are both built on it."""
    if mask == CAUSAL:
        return i + 1
    if mask == STRICT:
        return i
    raise ValueError(f"mask {mask!r} hides no key; allowed: {CAUSAL}, {STRICT}")


def hidden(mask: str, rows, cols):
    """Boolean 'masked out' of query indices ``rows`` against key indices ``cols`` (arrays that broadcast, of any
    array module), or None for FULL."""
    if mask == FULL:
        return None
    return cols >= first_hidden(mask, rows)


def mask_for(piece: Piece, i0: int, i1: int, j0: int, j1: int) -> np.ndarray | None:
    """Boolean 'masked out' array for rows [i0, i1) and columns [j0, j1) of ``piece`` (piece-local), or None."""
    return hidden(piece.mask, np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :])


def group_plan(layout: str, group: int, src: int, u: int, nranks: int, n: int, causal: bool) -> list[Piece]:
    """Pieces of (the U n queries of rank group ``group``) x (the U n keys of group ``src``), groups of U consecutive
    ranks with their tokens side by side (member a's at rows a n .. (a+1) n): the step plans of the hybrid strategy's
    ring over the groups (ringbench.engine.strategies)."""
    if not causal:
        return [Piece(0, u * n, 0, u * n, FULL)]
    out = []
    for a in range(u):
        for c in range(u):
            for p in step_plan(layout, group * u + a, src * u + c, nranks, n, causal):
                out.append(Piece(p.q0 + a * n, p.q1 + a * n, p.k0 + c * n, p.k1 + c * n, p.mask))
    return out
