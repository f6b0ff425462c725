"""Deterministic global inputs: any rank makes any token's q, k, v (and dO) without making the rest.

Each element is a counter-based hash (splitmix64) of (seed, tensor, b, t, h, d) mapped to a uniform
value with unit variance, so the global tensors are the same whatever the rank count or layout, and
a rank holding tokens ``positions`` generates only those: memory stays O(N/P).

``do`` is the upstream gradient of the backward pass (shaped like q). q, k and v of seed s use the hash keys
3s, 3s+1, 3s+2; ``do`` uses key s with its own multiplier, so it is none of the q, k, v of any seed and the
q, k, v streams are exactly what they were before ``do`` existed.
"""

from __future__ import annotations

import numpy as np

_TENSOR = {"q": 0, "k": 1, "v": 2, "do": 3}
_GOLDEN = 0x9E3779B97F4A7C15  # the key multiplier of q, k, v
_DO_MULT = 0xD1B54A32D192ED03  # dO's own multiplier (another odd constant of the splitmix family)
_SQRT3 = np.sqrt(3.0)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def tokens(
    name: str, seed: int, positions, *, batch: int, seq_len: int, heads: int, head_dim: int, dtype=np.float64, chunk: int = 2048
) -> np.ndarray:
    """Tensor ``name`` ('q', 'k', 'v' or 'do') at the given global token positions: (B, len(positions), heads, D)."""
    positions = np.asarray(positions, dtype=np.uint64)
    out = np.empty((batch, len(positions), heads, head_dim), dtype=dtype)
    if name == "do":
        key, mult = np.uint64(seed & 0xFFFFFFFF) << np.uint64(32), np.uint64(_DO_MULT)
    else:
        key, mult = np.uint64((seed * 3 + _TENSOR[name]) & 0xFFFFFFFF) << np.uint64(32), np.uint64(_GOLDEN)
    hd = np.arange(heads * head_dim, dtype=np.uint64).reshape(1, 1, heads, head_dim)
    for b in range(batch):
        for c0 in range(0, len(positions), chunk):
            t = positions[c0 : c0 + chunk].reshape(1, -1, 1, 1)
            with np.errstate(over="ignore"):
                idx = (np.uint64(b) * np.uint64(seq_len) + t) * np.uint64(heads * head_dim) + hd
                bits = _splitmix64(idx ^ key * mult)
            u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)  # [0, 1)
            out[b : b + 1, c0 : c0 + chunk] = (2.0 * u - 1.0) * _SQRT3
    return out
