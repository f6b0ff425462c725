"""Packed documents: the lengths of the documents one sequence of N tokens packs (``--docs SPEC``).

Pure: a spec string and N in, a tuple of lengths out; no arrays of the attention, no MPI. Attention is causal (or
full) inside each document and zero across documents (ringbench.layout builds the step plans from the lengths).

Spec grammar (docs/run.md):

* ``""``: one document of N tokens (no document mask: today's attention);
* ``4096,1024,3072``: the lengths, in order; positive, summing to N;
* ``fixed:L``: N / L documents of L tokens (N a multiple of L);
* ``uniform:LO-HI[:seed=S][,quantum=Q]``: lengths drawn uniformly from [LO, HI];
* ``lognormal:mean=M,sigma=S[,seed=K][,quantum=Q]``: lengths drawn from a log-normal of mean M tokens (the mean of
  the lengths, not of their logarithm: mu = ln M - S^2 / 2) and log-spread S, long-tailed.

Drawn lengths are rounded down to a multiple of the quantum Q (default 64; a length below Q becomes Q) and drawn
until they reach N, the last one truncated to what is left. The draws are a counter-based hash (splitmix64) of
(seed, index): the lengths depend only on the spec and N, never on the rank count, NumPy's version or the
platform, so a point's documents are the same at every P.
"""

from __future__ import annotations

import math

import numpy as np

QUANTUM = 64  # drawn lengths are multiples of this unless the spec says ``quantum=Q``
KINDS = ("fixed", "uniform", "lognormal")
_MASK64 = (1 << 64) - 1


def doc_lengths(docs: str, seq_len: int) -> tuple[int, ...]:
    """The documents' lengths (positive, summing to ``seq_len``) of spec ``docs``; ValueError naming the rule."""
    spec = docs.strip()
    if seq_len < 1:
        raise ValueError(f"the sequence length must be positive, got {seq_len}")
    if not spec:
        return (seq_len,)
    kind, sep, rest = spec.partition(":")
    if not sep:
        return _explicit(spec, seq_len)
    if kind == "fixed":
        length = _int(rest, "fixed:L")
        if length < 1:
            raise ValueError(f"fixed:L needs L >= 1, got {length}")
        if seq_len % length:
            raise ValueError(f"fixed:{length}: the sequence length {seq_len} is not a multiple of {length}")
        return (length,) * (seq_len // length)
    if kind == "uniform":
        head, _, opts = rest.replace(":", ",", 1).partition(",")
        lo_hi = head.split("-")
        if len(lo_hi) != 2:
            raise ValueError(f"uniform:LO-HI expects two lengths LO-HI such as uniform:256-4096, got {head!r}")
        lo, hi = (_int(x, "uniform:LO-HI") for x in lo_hi)
        if not 1 <= lo <= hi:
            raise ValueError(f"uniform:LO-HI needs 1 <= LO <= HI, got {lo}-{hi}")
        o = _options(opts, ("seed", "quantum"), "uniform")
        seed, q = int(o.get("seed", 0)), _quantum(o)
        return _draw(seq_len, q, lambda u, _: lo + np.floor(u * (hi - lo + 1)), seed)
    if kind == "lognormal":
        o = _options(rest, ("mean", "sigma", "seed", "quantum"), "lognormal")
        if "mean" not in o or "sigma" not in o:
            raise ValueError("lognormal needs mean=M,sigma=S (e.g. lognormal:mean=2048,sigma=1.0)")
        mean, sigma = float(o["mean"]), float(o["sigma"])
        if not (mean > 0 and math.isfinite(mean)) or not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"lognormal needs mean > 0 and sigma >= 0, got mean={o['mean']}, sigma={o['sigma']}")
        mu = math.log(mean) - sigma * sigma / 2
        seed, q = int(o.get("seed", 0)), _quantum(o)

        def lengths(u1, u2):  # Box-Muller: one standard normal per pair of uniforms
            z = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
            return np.exp(mu + sigma * z)

        return _draw(seq_len, q, lengths, seed)
    raise ValueError(f"unknown document distribution {kind!r}; allowed: a list L1,L2,..., {', '.join(k + ':' for k in KINDS)}")


def _explicit(spec: str, seq_len: int) -> tuple[int, ...]:
    parts = [p.strip() for p in spec.split(",")]
    lengths = tuple(_int(p, "a list of lengths L1,L2,...") for p in parts)
    bad = [x for x in lengths if x < 1]
    if bad:
        raise ValueError(f"every document length must be >= 1, got {bad[0]}")
    if sum(lengths) != seq_len:
        raise ValueError(f"the document lengths sum to {sum(lengths)}, not to the sequence length {seq_len}")
    return lengths


def _int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{what}: expected an integer, got {text.strip()!r}") from None


def _options(text: str, allowed: tuple, kind: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in text.replace(":", ",").split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"{kind}: unknown option {item!r}; allowed: {', '.join(k + '=' for k in allowed)}")
        try:
            float(value)
        except ValueError:
            raise ValueError(f"{kind}: {key}= expects a number, got {value!r}") from None
        out[key] = value
    if "seed" in out and (not out["seed"].isdigit() or int(out["seed"]) >= 2**32):
        raise ValueError(f"{kind}: seed= expects an integer from 0 to 2^32 - 1, got {out['seed']!r}")
    return out


def _quantum(o: dict) -> int:
    q = o.get("quantum", str(QUANTUM))
    if not q.isdigit() or int(q) < 1:
        raise ValueError(f"quantum= expects an integer >= 1, got {q!r}")
    return int(q)


def _uniforms(seed: int, start: int, count: int, stream: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) from the hash of (seed, stream, index start..start+count)."""
    idx = np.arange(start, start + count, dtype=np.uint64)
    key = np.uint64(((seed & 0xFFFFFFFF) << 32 | stream << 31) & _MASK64)
    with np.errstate(over="ignore"):
        z = (idx ^ key) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _draw(seq_len: int, quantum: int, dist, seed: int) -> tuple[int, ...]:
    """Lengths ``dist(u1, u2)`` (two uniform arrays in, float lengths out), rounded down to multiples of ``quantum``
    (at least one quantum each), drawn until they reach ``seq_len``; the last truncated to what is left."""
    out: list[int] = []
    total, start = 0, 0
    while total < seq_len:
        count = max(16, min(1 << 16, 2 * (seq_len - total) // quantum + 1))
        raw = dist(_uniforms(seed, start, count, 0), _uniforms(seed, start, count, 1))
        raw = np.nan_to_num(np.asarray(raw, np.float64), nan=quantum, posinf=float(seq_len), neginf=quantum)
        lengths = np.maximum(quantum, (np.minimum(raw, float(seq_len)) // quantum).astype(np.int64) * quantum)
        start += count
        for length in lengths.tolist():
            length = min(length, seq_len - total)
            out.append(length)
            total += length
            if total >= seq_len:
                break
    return tuple(out)
