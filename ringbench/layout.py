"""How the global sequence is split over the ranks, and which part of each ring step is needed.

Pure functions of (layout, rank, P, N, documents, window): no arrays of the attention itself, no MPI.

Layouts (P ranks, global length N, n = N / P tokens per rank):

* ``contiguous``: rank r holds tokens [r*n, (r+1)*n).
* ``zigzag``: the sequence is cut into 2P chunks of c = N / (2P); rank r holds chunks r and 2P-1-r,
  which balances causal work.
* ``striped``: token t lives on rank t mod P (rank r holds r, r+P, r+2P, ...).
* ``doc-zigzag``: every document cut into 2P equal chunks; rank r holds chunks r and 2P-1-r of every document
  (packed-sequence context parallelism: TransformerEngine's THD, ring-flash-attn's varlen zigzag). Every
  document's length must be a multiple of 2P. With one document it is ``zigzag``.
* ``balanced``: the sequence cut into C = kP equal chunks, dealt to the ranks greedily by work: each chunk's
  unmasked pairs (its queries against every key, under the document mask and window), heaviest first (ties: the
  earlier chunk), to the rank with the least work so far that still has room for one (ties: the lower rank); every
  rank gets k chunks (torchtitan's processing-time balancer). k, the chunks per rank (:func:`balanced_chunks`), is
  the fewest of BALANCED_CHUNKS (1, 2, 4, 8, 16) dividing N / P whose deal's imbalance (the largest rank's pairs
  over the mean) is at most BALANCED_BOUND (1.05), or else the one with the least imbalance (ties: the fewer
  chunks): every chunk boundary inside a document cuts it into one more piece (one more kernel call per step), so
  the layout cuts no more than the balance needs. k = 1 holds contiguous's blocks (dealt heaviest first) where
  contiguous is already balanced; one causal document gets k = 2, global zigzag's pairing. A pure function of
  (N, P, documents, window, causal), cached. Runs stored before schema version 5 (which records k per run) were
  dealt with LEGACY_BALANCED_CHUNKS: the first of 8, 4, 2, 1 dividing N / P.

Documents (``docs``: the lengths from :func:`ringbench.documents.doc_lengths`, summing to N; () = one document) and
a sliding window (``window`` W > 0: query t sees keys t - W < u <= t, W keys including itself; causal only): key u
is visible to query t iff both lie in the same document and, when causal, u <= t (and u > t - W). contiguous,
zigzag, doc-zigzag and balanced take any documents and window (doc-zigzag: lengths multiples of 2P); striped
refuses them (:func:`layout_problem`). With no documents and no window every old layout's plans are what they were.

At ring step s rank r holds the K/V block that started on rank ``src = (r - s) mod P``. A step plan is the
list of :class:`Piece` (a query row range, a key row range, and a mask kind) that rank r must compute for
that block; an empty plan means the block is fully masked and only forwarded. With documents or a window a
plan is cut from the runs of the two ranks' tokens (consecutive tokens of one document): every piece lies in one
document, pieces with no visible pair are left out, fully visible ones are FULL, and the rest are CAUSAL (a
square aligned diagonal) or BAND (below).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

OLD_LAYOUTS = ("contiguous", "zigzag", "striped")
LAYOUTS = OLD_LAYOUTS + ("doc-zigzag", "balanced")
DOC_LAYOUTS = ("contiguous", "zigzag", "doc-zigzag", "balanced")  # the layouts that take documents and windows
BALANCED_CHUNKS = (1, 2, 4, 8, 16)  # balanced: the chunks per rank it may take, fewest first (those dividing N / P)
BALANCED_BOUND = 1.05  # balanced: the fewest chunks whose deal is within this of perfect (max / mean pairs)
LEGACY_BALANCED_CHUNKS = (8, 4, 2, 1)  # before schema 5: the first of these dividing N / P, whatever the spec

FULL = "full"  # every key visible to every query
CAUSAL = "causal"  # key j visible to query i iff j <= i (local indices within the piece)
STRICT = "strict"  # key j visible to query i iff j < i
BAND = "band"  # key j visible to query i iff i + offset - window < j <= i + offset (window 0: no lower bound)
MASKS = (FULL, CAUSAL, STRICT, BAND)


@dataclass(frozen=True)
class Piece:
    """Queries [q0, q1) x keys [k0, k1) (local rows of the two ranks' blocks) and which of them see which.

    Every mask but FULL is a diagonal band in piece-local indices (:func:`band`): key j is visible to query i iff
    lo(i) <= j < hi(i), hi(i) = i + offset + 1 and lo(i) = i + offset - window + 1 (0 when window = 0), clipped to
    [0, nk) (:func:`key_bounds`). CAUSAL is offset 0, STRICT offset -1 (both square, no window); BAND carries its
    own ``offset`` (the global start of the queries minus that of the keys) and ``window``.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    mask: str = FULL
    offset: int = 0  # BAND only
    window: int = 0  # BAND only; 0 = no lower bound

    def pairs(self) -> int:
        """Number of unmasked (query, key) pairs in this piece."""
        nq, nk = self.q1 - self.q0, self.k1 - self.k0
        if self.mask == FULL:
            return nq * nk
        if self.mask != BAND:
            assert nq == nk, "causal pieces are square"
            return nq * (nq + 1) // 2 if self.mask == CAUSAL else nq * (nq - 1) // 2
        if nq <= 0 or nk <= 0:
            return 0
        lo, hi = key_bounds(self, np.arange(nq, dtype=np.int64))
        return int(np.maximum(hi - lo, 0).sum())


def band(piece: Piece) -> tuple[int, int] | None:
    """(offset, window) of a masked piece's band (CAUSAL: (0, 0), STRICT: (-1, 0)), or None for FULL."""
    if piece.mask == FULL:
        return None
    if piece.mask == CAUSAL:
        return 0, 0
    if piece.mask == STRICT:
        return -1, 0
    if piece.mask == BAND:
        return piece.offset, piece.window
    raise ValueError(f"unknown mask {piece.mask!r}; allowed: {', '.join(MASKS)}")


def key_bounds(piece: Piece, i):
    """(lo, hi): the visible keys of piece-local query ``i`` (an int or an integer array) are [lo, hi), clipped to
    [0, nk) (lo >= hi: none). The one definition of every mask: the kernels' tile skipping and masking,
    :func:`hidden_in`, :func:`mask_for` and :meth:`Piece.pairs` are built on it. Both are non-decreasing in i."""
    nk = piece.k1 - piece.k0
    b = band(piece)
    if b is None:
        return 0 * i, 0 * i + nk
    d, w = b
    hi = np.minimum(i + (d + 1), nk)
    lo = np.clip(i + (d - w + 1), 0, nk) if w else 0 * i
    if np.ndim(i) == 0:
        return int(lo), int(max(hi, 0))
    return lo, np.maximum(hi, 0)


def first_hidden(mask: str, i):
    """The first key index hidden from query ``i`` (piece-local; an int or an integer array) of a CAUSAL or STRICT
    piece: key j is visible to query i iff j < first_hidden(mask, i) (:func:`key_bounds` of the general band)."""
    if mask == CAUSAL:
        return i + 1
    if mask == STRICT:
        return i
    raise ValueError(f"mask {mask!r} hides no key; allowed: {CAUSAL}, {STRICT}")


def hidden(mask: str, rows, cols):
    """Boolean 'masked out' of query indices ``rows`` against key indices ``cols`` (arrays that broadcast, of any
    array module) of a FULL (None), CAUSAL or STRICT piece; :func:`hidden_in` for any piece."""
    if mask == FULL:
        return None
    return cols >= first_hidden(mask, rows)


def hidden_in(piece: Piece, rows, cols):
    """Boolean 'masked out' of piece-local query indices ``rows`` against key indices ``cols`` (arrays that
    broadcast, of any array module), or None for FULL: the complement of :func:`key_bounds`' interval (unclipped:
    the same inside the piece)."""
    b = band(piece)
    return None if b is None else band_hidden(b[0], b[1], rows, cols)


def band_hidden(offset: int, window: int, rows, cols):
    """Boolean 'masked out' of rows against cols (arrays that broadcast, any array module) of the band (offset,
    window): key j hidden from query i iff j > i + offset or (window > 0 and j <= i + offset - window)."""
    out = cols > rows + offset
    if window:
        out = out | (cols <= rows + (offset - window))
    return out


def mask_for(piece: Piece, i0: int, i1: int, j0: int, j1: int) -> np.ndarray | None:
    """Boolean 'masked out' array for rows [i0, i1) and columns [j0, j1) of ``piece`` (piece-local), or None."""
    return hidden_in(piece, np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :])


# ---------------------------------------------------------------------------------------------
# Which tokens each rank holds
# ---------------------------------------------------------------------------------------------
def divisor(layout: str, nranks: int) -> int:
    """The global sequence length must be a multiple of this for the layout at P ranks (doc-zigzag: every document's
    length, :func:`layout_problem`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return 2 * nranks if layout in ("zigzag", "doc-zigzag") else nranks


def layout_problem(layout: str, nranks: int, seq_len: int, docs=(), window: int = 0, causal: bool = True) -> str | None:
    """Why ``layout`` at P ranks cannot take N tokens packed as ``docs`` with ``window`` (None if it can): the rule."""
    div = divisor(layout, nranks)
    if seq_len % div:
        return f"N={seq_len} is not a multiple of {div} (layout {layout} at {nranks} ranks)"
    docs = tuple(docs)
    if docs and sum(docs) != seq_len:
        return f"the document lengths sum to {sum(docs)}, not N={seq_len}"
    if window < 0:
        return f"the window must be >= 1 (0: none), got {window}"
    if window and not causal:
        return "a sliding window is causal: it needs --causal"
    if (len(docs) > 1 or window) and layout not in DOC_LAYOUTS:
        return f"layout {layout} takes no documents or window; allowed: {', '.join(DOC_LAYOUTS)}"
    if layout == "doc-zigzag":
        for i, length in enumerate(docs or (seq_len,)):
            if length % (2 * nranks):
                cut = f"layout doc-zigzag cuts every document into 2 x {nranks} chunks"
                return f"{cut}: document {i} has {length} tokens, not a multiple of {2 * nranks}"
    return None


def _norm(seq_len: int, docs, window: int) -> tuple[tuple[int, ...], int]:
    docs = tuple(int(x) for x in docs) or (seq_len,)
    return docs, int(window)


def positions(layout: str, rank: int, nranks: int, seq_len: int, docs=(), window: int = 0, causal: bool = True) -> np.ndarray:
    """Global token indices held by ``rank``, ascending (``docs``, ``window``: balanced deals its chunks by the work
    of that mask, causal unless ``causal`` is False; the other layouts hold the same tokens whatever the mask)."""
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
    if layout in ("doc-zigzag", "balanced"):
        d, w = _norm(seq_len, docs, window)
        return _held(layout, nranks, seq_len, d, w, bool(causal))[rank].copy()
    raise ValueError(f"unknown layout {layout!r}")


@lru_cache(maxsize=64)
def _held(layout: str, nranks: int, seq_len: int, docs: tuple, window: int, causal: bool) -> tuple[np.ndarray, ...]:
    """Every rank's tokens of the two document layouts (cached: the greedy deal is O(N / P log) once per spec)."""
    why = layout_problem(layout, nranks, seq_len, docs, window, causal)
    if why:
        raise ValueError(why)
    if layout == "doc-zigzag":
        out = [[] for _ in range(nranks)]
        start = 0
        for length in docs:
            c = length // (2 * nranks)
            for r in range(nranks):
                out[r].append(np.arange(start + r * c, start + (r + 1) * c))
                out[r].append(np.arange(start + (2 * nranks - 1 - r) * c, start + (2 * nranks - r) * c))
            start += length
        return tuple(np.concatenate(x) for x in out)
    chunks = _balanced_deal(nranks, seq_len, docs, window, causal)[1]
    c = seq_len // (nranks * len(chunks[0]))
    return tuple(np.concatenate([np.arange(i * c, (i + 1) * c) for i in x]) for x in chunks)


def balanced_chunks(nranks: int, seq_len: int, docs=(), window: int = 0, causal: bool = True) -> int:
    """Chunks per rank of the balanced layout for this spec: the fewest of BALANCED_CHUNKS dividing N / P whose
    greedy deal's pairs imbalance is at most BALANCED_BOUND, else the least imbalanced (ties: the fewer)."""
    return balanced_deal(nranks, seq_len, docs, window, causal)[0]


def balanced_deal(nranks: int, seq_len: int, docs=(), window: int = 0, causal: bool = True) -> tuple[int, float]:
    """(k, imbalance): balanced's chunks per rank (:func:`balanced_chunks`) and its deal's pairs imbalance (the
    largest rank's unmasked pairs over the mean: :func:`imbalance` of its :func:`plan_pairs`)."""
    why = layout_problem("balanced", nranks, seq_len, docs, window, causal)
    if why:
        raise ValueError(why)
    d, w = _norm(seq_len, docs, window)
    k, _, imb = _balanced_deal(int(nranks), int(seq_len), d, w, bool(causal))
    return k, imb


def legacy_balanced_chunks(nranks: int, seq_len: int) -> int:
    """Chunks per rank that balanced dealt before schema version 5 (runs stored without ``chunks_per_rank``): the
    first of LEGACY_BALANCED_CHUNKS whose k x P divides N, whatever the documents."""
    return next(k for k in LEGACY_BALANCED_CHUNKS if seq_len % (k * nranks) == 0)


@lru_cache(maxsize=64)
def _balanced_deal(nranks: int, seq_len: int, docs: tuple, window: int, causal: bool) -> tuple[int, tuple, float]:
    """(k, per rank its chunk indices ascending, imbalance) of the chosen deal (:func:`balanced_chunks`)."""
    token = _token_work(seq_len, docs, window, causal)
    best = None
    for k in BALANCED_CHUNKS:
        if (seq_len // nranks) % k or seq_len % nranks:
            continue
        chunks, imb = _deal(token, nranks, k)
        if imb <= BALANCED_BOUND:
            return k, chunks, imb
        if best is None or imb < best[2]:
            best = (k, chunks, imb)
    return best


def _deal(token: np.ndarray, nranks: int, k: int) -> tuple[tuple, float]:
    """The greedy deal of kP equal chunks (per-token work ``token``): per rank its chunks ascending, and the
    imbalance of the ranks' work."""
    nchunks = k * nranks
    work = token.reshape(nchunks, -1).sum(axis=1).tolist()
    load, room, chunks = [0] * nranks, [k] * nranks, [[] for _ in range(nranks)]
    for i in sorted(range(nchunks), key=lambda i: (-work[i], i)):
        r = min((r for r in range(nranks) if room[r]), key=lambda r: (load[r], r))
        chunks[r].append(i)
        load[r] += work[i]
        room[r] -= 1
    return tuple(tuple(sorted(x)) for x in chunks), imbalance(np.array(load, np.float64))


def _token_work(seq_len: int, docs: tuple, window: int, causal: bool) -> np.ndarray:
    """(N,) int64: the unmasked pairs of each query against every key."""
    starts = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
    t = np.arange(seq_len, dtype=np.int64)
    doc = np.searchsorted(starts, t, side="right") - 1
    ds, de = starts[doc], starts[doc + 1]
    if not causal:
        return de - ds
    lo = ds if not window else np.maximum(ds, t - window + 1)
    return t + 1 - lo


# ---------------------------------------------------------------------------------------------
# Step plans
# ---------------------------------------------------------------------------------------------
def step_plan(layout: str, rank: int, src: int, nranks: int, n_local: int, causal: bool, docs=(), window: int = 0) -> list[Piece]:
    """Pieces of (local queries of ``rank``) x (local keys of ``src``) that need computing."""
    if (len(docs) > 1 or window) or layout in ("doc-zigzag", "balanced"):
        d, w = _norm(n_local * nranks, docs, window)
        return list(_cut_plan(layout, rank, src, nranks, n_local * nranks, bool(causal), d, w))
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


@lru_cache(maxsize=64)
def _runs(layout: str, nranks: int, seq_len: int, docs: tuple, window: int, causal: bool) -> tuple:
    """Per rank, its runs: (local start, global start, length, document) of each maximal stretch of consecutive
    tokens of one document, in local order."""
    why = layout_problem(layout, nranks, seq_len, docs, window, causal)
    if why:
        raise ValueError(why)
    starts = np.concatenate([[0], np.cumsum(docs)])
    out = []
    for r in range(nranks):
        pos = positions(layout, r, nranks, seq_len, docs, window, causal)
        doc = np.searchsorted(starts, pos, side="right") - 1
        cut = np.flatnonzero((np.diff(pos) != 1) | (np.diff(doc) != 0)) + 1
        bounds = np.concatenate([[0], cut, [len(pos)]])
        out.append(tuple((int(a), int(pos[a]), int(b - a), int(doc[a])) for a, b in zip(bounds[:-1], bounds[1:])))
    return tuple(out)


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


@lru_cache(maxsize=4096)
def _cut_plan(layout: str, rank: int, src: int, nranks: int, seq_len: int, causal: bool, docs: tuple, window: int) -> tuple[Piece, ...]:
    runs = _runs(layout, nranks, seq_len, docs, window, causal)
    by_doc: dict[int, list] = {}
    for run in runs[src]:
        by_doc.setdefault(run[3], []).append(run)
    pieces = []
    for a0, ga, nq, doc in runs[rank]:
        for b0, gb, nk, _ in by_doc.get(doc, ()):
            p = _run_piece(a0, ga, nq, b0, gb, nk, causal, window)
            if p is not None:
                pieces.append(p)
    return tuple(merge_full(pieces))


def _run_piece(a0: int, ga: int, nq: int, b0: int, gb: int, nk: int, causal: bool, w: int) -> Piece | None:
    """The piece of query run (local a0, global ga, nq tokens) x key run (b0, gb, nk) of one document, trimmed to the
    rows and keys with a visible pair (None if there is none), with its mask."""
    if not causal:
        return Piece(a0, a0 + nq, b0, b0 + nk, FULL)
    # rows that see some key: ga + i >= gb, and with a window ga + i - w + 1 <= gb + nk - 1
    i_lo = max(0, gb - ga)
    i_hi = min(nq, gb + nk - ga + w - 1) if w else nq
    if i_hi <= i_lo:
        return None
    # keys some row sees: gb + j <= ga + i_hi - 1, and with a window gb + j >= ga + i_lo - w + 1
    j_lo = max(0, ga + i_lo - w + 1 - gb) if w else 0
    j_hi = min(nk, ga + i_hi - gb)
    if j_hi <= j_lo:
        return None
    q0, q1, k0, k1 = a0 + i_lo, a0 + i_hi, b0 + j_lo, b0 + j_hi
    nq, nk = q1 - q0, k1 - k0
    d = (ga + i_lo) - (gb + j_lo)
    binds = bool(w) and (nq - 1) + d - w + 1 > 0  # the window hides a key of the last row
    if d >= nk - 1 and not binds:
        return Piece(q0, q1, k0, k1, FULL)
    if not binds and d == 0 and nq == nk:
        return Piece(q0, q1, k0, k1, CAUSAL)
    return Piece(q0, q1, k0, k1, BAND, d, w if binds else 0)


def merge_full(pieces: list[Piece]) -> list[Piece]:
    """``pieces`` with adjacent FULL pieces joined (same keys and touching queries, then same queries and touching
    keys); the others as they are, in order. Fewer, larger pieces: fewer kernel calls."""
    full = [p for p in pieces if p.mask == FULL]
    if len(full) < 2:
        return pieces
    rest = [p for p in pieces if p.mask != FULL]
    for axis in (0, 1):
        full.sort(key=lambda p: (p.k0, p.k1, p.q0) if axis == 0 else (p.q0, p.q1, p.k0))
        out = [full[0]]
        for p in full[1:]:
            o = out[-1]
            if axis == 0 and (o.k0, o.k1) == (p.k0, p.k1) and o.q1 == p.q0:
                out[-1] = Piece(o.q0, p.q1, o.k0, o.k1, FULL)
            elif axis == 1 and (o.q0, o.q1) == (p.q0, p.q1) and o.k1 == p.k0:
                out[-1] = Piece(o.q0, o.q1, o.k0, p.k1, FULL)
            else:
                out.append(p)
        full = out
    return sorted(full + rest, key=lambda p: (p.q0, p.k0))


def group_plan(layout: str, group: int, src: int, u: int, nranks: int, n: int, causal: bool, docs=(), window: int = 0) -> list[Piece]:
    """Pieces of (the U n queries of rank group ``group``) x (the U n keys of group ``src``), groups of U consecutive
    ranks with their tokens side by side (member a's at rows a n .. (a+1) n): the step plans of the hybrid strategy's
    ring over the groups (ringbench.engine.strategies)."""
    packed = len(docs) > 1 or window or layout in ("doc-zigzag", "balanced")
    if not causal and not packed:
        return [Piece(0, u * n, 0, u * n, FULL)]
    out = []
    for a in range(u):
        for c in range(u):
            for p in step_plan(layout, group * u + a, src * u + c, nranks, n, causal, docs, window):
                out.append(Piece(p.q0 + a * n, p.q1 + a * n, p.k0 + c * n, p.k1 + c * n, p.mask, p.offset, p.window))
    return merge_full(out) if packed else out


# ---------------------------------------------------------------------------------------------
# Pair counts and balance
# ---------------------------------------------------------------------------------------------
def unmasked_pairs(layout: str, nranks: int, seq_len: int, causal: bool, docs=(), window: int = 0) -> int:
    """Unmasked (query, key) pairs summed over all ranks and steps: N^2, or N(N+1)/2 when causal; with documents the
    sum over them (L^2, L(L+1)/2, or with a window W: W(W+1)/2 + (L - W) W when L > W).

    Every layout's step plans cover each visible (query, key) pair of the global N x N attention exactly once
    (tests/test_layout.py checks this pair by pair, and checks this closed form against the sum of
    ``Piece.pairs`` over all P^2 step plans), so the count does not depend on the layout or P: O(documents), where
    the loop over the step plans is O(P^2). ``seq_len`` must be a multiple of ``divisor(layout, nranks)``.
    """
    if seq_len % divisor(layout, nranks):
        raise ValueError(f"seq_len {seq_len} is not a multiple of {divisor(layout, nranks)} (layout {layout} at {nranks} ranks)")
    if len(docs) <= 1 and not window:
        return seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    why = layout_problem(layout, nranks, seq_len, docs, window, causal)
    if why:
        raise ValueError(why)
    total = 0
    for length in tuple(docs) or (seq_len,):
        if not causal:
            total += length * length
        elif not window or length <= window:
            total += length * (length + 1) // 2
        else:
            total += window * (window + 1) // 2 + (length - window) * window
    return total


def plan_pairs(layout: str, nranks: int, seq_len: int, causal: bool, docs=(), window: int = 0) -> np.ndarray:
    """(P, P) int64: the unmasked pairs rank r computes at ring step s (its queries against the block of
    src = (r - s) mod P), from the step plans."""
    n = seq_len // nranks
    out = np.zeros((nranks, nranks), np.int64)
    for r in range(nranks):
        for s in range(nranks):
            out[r, s] = sum(p.pairs() for p in step_plan(layout, r, (r - s) % nranks, nranks, n, causal, docs, window))
    return out


def imbalance(pairs) -> float:
    """Load imbalance of a (P, P) :func:`plan_pairs` (or per-rank totals, shape (P,)): the largest rank's total over
    the mean (1.0 = perfect; 1.0 when there is no work)."""
    pairs = np.asarray(pairs, np.float64)
    per_rank = pairs.sum(axis=1) if pairs.ndim == 2 else pairs
    mean = float(per_rank.mean()) if per_rank.size else 0.0
    return float(per_rank.max()) / mean if mean > 0 else 1.0
