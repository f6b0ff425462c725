"""The tiling policy of the score tiles: how many query rows, keys and batch-heads one tile holds, per backend.

Pure functions of shapes and of ``backend.is_gpu``; the forward kernels take their tiles from :func:`tiling`
(ringbench.kernels.api.make_forward), the memory estimate sizes its work buffers from the same numbers. The
backward's own policy is ``backward.auto_tiles``.
"""

from __future__ import annotations

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
