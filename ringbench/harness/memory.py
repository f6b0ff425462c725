"""Will it fit? Each rank's peak memory, estimated before anything big is allocated (``--memory-limit``).

:func:`memory_estimate` counts, phase by phase, what a rank of a run allocates above its baseline (the interpreter
and the libraries it loaded); :func:`memory_problem` (collective) compares the ranks of a node with what the node
has (MemAvailable, the memory cgroup's headroom, a GPU's free memory) or with ``--memory-limit`` and says, in one
line, why a run cannot fit. Used by the runner and the probe; tests/harness/test_run_mpi.py holds the estimate to the
measured peak.
"""

from __future__ import annotations

import socket

from ringbench.config import RunConfig
from ringbench.engine import comm, serving, strategies
from ringbench.engine.backend import host_memory
from ringbench.kernels import backward, kernel
from ringbench.kernels.mkl import MklMatmul
from ringbench.kernels.tiling import tiling

TOKENS_CHUNK = 2048  # tokens per chunk of inputs.tokens' hashing (its ``chunk``)
TOKENS_TEMPS = 5  # 8-byte arrays of one chunk alive at once while inputs.tokens hashes (measured: 3-4)
REFERENCE_CHUNK = 256  # query rows per chunk of reference.reference_attention (its ``chunk``)
RANK_OVERHEAD = 16 * 2**20  # host: MPI and BLAS buffers, Python objects, pickles of small results (measured 2-4 MiB)
REFERENCE_TEMPS = 5  # float64 score chunks alive at once there (the last chunk's scores and weights, the next's)


def memory_estimate(cfg: RunConfig, nranks: int, rank: int, backend, mkl: bool = False) -> tuple[int, int]:
    """Estimated peak (host, device) bytes of rank ``rank`` of this run, beyond the interpreter and libraries.

    On NumPy everything is host memory (device 0). Counted, phase by phase (the peak is the largest phase)
    (with a backward, also dO, the backward's own copies, its dK/dV accumulators and tiles, and the gradients;
    pass-q: its visitor bundles and dQ partials instead of travelling accumulators):
    generating q, k, v (float64, then the storage dtype); building the ring: the query copy in the compute
    dtype, the state's widened queries, accumulators and row statistics, the K/V home block, its two ring
    buffers, the compute-dtype K/V copy (half precision), allgather's P blocks, the score tile and its
    buffers; the output; --check's global K/V and float64 reference (its K/V repeated per query head, one
    chunk of scores); --save-tensors' global arrays on rank 0 (gathered, assembled, widened from bfloat16);
    a fixed allowance for the rest (RANK_OVERHEAD). Ulysses and hybrid: the inner ring's blocks of the group's
    tokens, the inputs they keep, their all-to-all buffers (and the backward's, the kept O, the gradients).
    """
    gpu = backend.is_gpu
    if cfg.pass_ in serving.SERVING:  # prefill, decode: queries and K/V of different lengths (serving.memory_need)
        s, c = backend.dtype(cfg.dtype).itemsize, backend.compute_dtype(backend.dtype(cfg.dtype)).itemsize
        need = serving.memory_need(cfg, nranks, s, c, TOKENS_CHUNK, TOKENS_TEMPS, REFERENCE_CHUNK)
        return RANK_OVERHEAD + need, (need if gpu else 0)
    hk = cfg.kv_heads_resolved
    g = cfg.heads // hk
    b, d, N = cfg.batch, cfg.head_dim, cfg.seq_len
    n = N // nranks
    s = backend.dtype(cfg.dtype).itemsize
    c = backend.compute_dtype(backend.dtype(cfg.dtype)).itemsize
    qe, kve = b * n * cfg.heads * d, b * n * hk * d  # elements of q and of k (or v) on this rank

    # generating q, k, v on the host: each in float64, then cast; the hash's chunk temporaries
    gen, held = 0, 0
    for heads in (cfg.heads, hk, hk):
        e = b * n * heads * d
        gen = max(gen, held + (8 + s) * e + TOKENS_TEMPS * 8 * min(TOKENS_CHUNK, n) * heads * d)
        held += s * e
    inputs = held  # q, k, v in the storage dtype (on the device too, on CuPy)

    # ulysses / hybrid: the inner ring's blocks are the group's U n tokens x this member's H/U query heads (as many
    # query elements as q) and h_kv kv heads (kvr elements per K or V: more than kve when kv heads are replicated)
    u = strategies.degree(cfg.mode, cfg.ulysses_degree, nranks) if cfg.mode in ("ulysses", "hybrid") else 1
    hkr = strategies.kv_head_map(hk, u).shape[1] if u > 1 else hk
    nr, g = u * n, cfg.heads // u // hkr
    kvr = b * nr * hkr * d
    head_chunk, tile_q, tile_k = tiling(backend, b * hkr, g, nr, nr, cfg.tile_q, mkl)
    # the state's work buffers over a whole block: [k^T; 1], the score tile, its row sums and p @ v, the ones
    tiles = c * sum(kernel.OnlineSoftmax.scratch_elems(g, d, nr, nr, head_chunk=head_chunk, tile_q=tile_q, tile_k=tile_k).values())
    state = c * (b * n * cfg.heads * (d + 1) + qe + 2 * b * n * cfg.heads)  # [q, -m], acc, m, l
    kv = 3 * 2 * kvr * s  # home block + two ring buffers
    kv += 2 * kvr * c if c != s else 0  # the compute-dtype copy of a half-precision block
    kv += nranks * 2 * kvr * s if cfg.mode == "allgather" else 0
    if cfg.mode == "pass-q":  # the K/V stay (with a compute copy); the queries travel (home, two ring buffers); partials
        rows = b * n * cfg.heads  # [out | lse] sent, received and the merged one, with the merge's temporaries
        kv = 2 * kve * (s + c) + 3 * s * qe + 3 * c * rows * (d + 1) + 3 * c * (qe + rows)
    # ulysses / hybrid: the inputs stay referenced; all-to-all buffers in (q | k | v) and out (O), sent and received; the output
    a2a = inputs + s * (2 * (qe + 2 * kvr) + 3 * qe) if cfg.mode in ("ulysses", "hybrid") else 0
    # building: q in the compute dtype is freed before the K/V home block is made (from two head-major copies);
    # the ring buffers are first written in the first pass (the inputs are gone by then, unless kept)
    build = inputs + a2a + state + max(c * qe, 2 * 2 * kvr * s)
    output = c * qe + c * b * n * cfg.heads + (s * qe if s != c else 0) + s * qe  # normalised, row sums, storage dtype, token-major
    ring = state + kv + tiles + a2a  # what the ring (or strategy) holds from its construction to the end of the run
    if "bwd" in cfg.phases:  # dO; the backward's widened q and dO copies, dQ, dK/dV accumulators, two score tiles + K^T, V^T
        accs = 2 * kvr * c * (2 * nranks + 1 if cfg.mode == "allgather" else 3)
        if cfg.mode == "pass-q":  # dK/dV stay (one accumulator); three visitor bundles (home, two ring buffers), four dQ partials
            accs = 2 * kve * c + 3 * (2 * qe * s + 2 * b * n * cfg.heads * c) + 4 * qe * c
        tq, tk, hc = backward.auto_tiles(nr, nr, g, b * hkr, gpu=gpu)  # as the backward tiles a whole block
        need = backward.BlockBackward.scratch_elems(g, d, nr, nr, head_chunk=hc, tile_q=cfg.tile_q or tq, tile_k=tk, in_place=mkl)
        bwd_tiles = c * sum(need.values())
        ring += s * qe + c * (2 * b * n * cfg.heads * (d + 1) + qe) + accs + bwd_tiles
        if a2a:  # dO's all-to-all buffers, the kept O, dQ | dK | dV's (compute dtype), the gradients, a replicated head's sum
            ring += 3 * s * qe + c * (2 * (qe + 2 * kvr) + 2 * kve) + s * (qe + 2 * kve)
    keep = inputs if (cfg.check or cfg.save_tensors) else 0  # host copies kept for the check / the file
    after = [0]  # host memory needed after the passes, beside the output on the host
    if "bwd" in cfg.phases:  # the gradients, and --check's float64 reference gradients (reference.reference_attention_grad)
        grads = 3 * s * qe
        if cfg.check:  # float64: q, dO and dQ here; K, V, dK, dV as given and returned; K, V, dK, dV repeated to every
            # query head over all N keys and the two (B, H, N, D) products of a chunk's dK/dV update; the score chunks
            ge = b * N * hk * d
            bwd_ref = 8 * (3 * qe + 4 * ge + 6 * b * cfg.heads * N * d) + REFERENCE_TEMPS * 8 * b * cfg.heads * min(REFERENCE_CHUNK, n) * N
            grads += 2 * s * ge + bwd_ref  # the global K, V it is given (storage dtype)
        after.append(grads)
    if cfg.check:
        ge = b * N * hk * d  # global K (or V)
        kv_global = (8 + s) * ge + s * ge + TOKENS_TEMPS * 8 * min(TOKENS_CHUNK, N) * hk * d
        ref = 8 * (2 * qe + 2 * ge + 2 * b * cfg.heads * N * d) + REFERENCE_TEMPS * 8 * b * cfg.heads * min(REFERENCE_CHUNK, n) * N
        after.append(max(kv_global, 2 * s * ge + ref, 2 * s * ge + 8 * 3 * qe))
    if cfg.save_tensors:  # every rank pickles its tensors to rank 0, which unpickles them all and assembles them
        global_elems = b * N * (2 * cfg.heads + 2 * hk) * d
        on_root = 3 * s * global_elems + (4 * global_elems if cfg.dtype == "bfloat16" else 0)
        after.append(inputs + s * qe + (on_root if rank == 0 else 0))
    if not gpu:
        return RANK_OVERHEAD + max(gen, build, keep + ring + output, keep + ring + s * qe + max(after)), 0
    staging = (nranks + 1 if cfg.mode == "allgather" else 2) * 2 * kve * s if not cuda_aware(cfg, backend) else 0
    host = RANK_OVERHEAD + max(gen, inputs + staging, keep + staging + s * qe + max(after))
    return host, max(build, ring + output)


def memory_problem(cfg: RunConfig, nranks: int, rank: int, backend) -> str | None:
    """Collective: why this run cannot fit in memory (one line, with the estimate and what is available), or None."""
    if cfg.memory_limit == "none":
        return None
    mkl = isinstance(backend.matmul(cfg.blas)[0], MklMatmul)
    host, device = memory_estimate(cfg, nranks, rank, backend, mkl)
    hint = "use more ranks or a smaller problem, or set --memory-limit (a size, or none to skip this check)"
    if cfg.pass_ in serving.SERVING:  # the KV cache's shard is what has to fit
        shard = serving.kv_cache_bytes(cfg, nranks, backend.dtype(cfg.dtype).itemsize)[0]
        hint = f"its KV cache shard alone is {_size(shard)} per rank; {hint}"
    if cfg.memory_limit != "auto":
        need = max(host, device)
        if need <= cfg.memory_limit:
            return None
        where = "device" if device > host else "host"
        return (
            f"this problem needs about {_size(need)} of {where} memory per rank (estimate), more than --memory-limit "
            f"{_size(cfg.memory_limit)}; {hint}"
        )
    # auto: the ranks of a node share its available memory, or what their memory cgroup leaves if that is less
    # (and ranks on one GPU that GPU's free memory)
    mine = (host, device, backend.device_id, host_memory(), backend.device_free_bytes(), socket.gethostname())
    node = comm.node_allgather(mine)
    avail, bound = node[0][3]
    if avail is not None and sum(r[0] for r in node) > avail:
        return _too_big(max(r[0] for r in node), "host", node, node[0][5], f"the {_size(avail)} {bound}", hint)
    if backend.is_gpu:
        same = [r for r in node if r[2] == backend.device_id]
        free = min(r[4] for r in same)
        if sum(r[1] for r in same) > free:
            return _too_big(
                max(r[1] for r in same), "device", same, f"GPU {backend.device_id} of {node[0][5]}", f"the {_size(free)} free there", hint
            )
    return None


def _too_big(per_rank: int, kind: str, ranks: list, where: str, have: str, hint: str) -> str:
    total = sum(r[0 if kind == "host" else 1] for r in ranks)
    n = len(ranks)
    return (
        f"this problem needs about {_size(per_rank)} of {kind} memory per rank (estimate; {_size(total)} for the {n} "
        f"rank{'s' if n > 1 else ''} on {where}), more than {have}; {hint}"
    )


def _size(nbytes: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def cuda_aware(cfg: RunConfig, backend) -> bool:
    if not backend.is_gpu:
        return False
    if cfg.cuda_aware == "auto":
        return comm.detect_cuda_aware()
    return cfg.cuda_aware == "yes"
