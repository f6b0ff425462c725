"""Measure this allocation's machine parameters for the overlap model (``ringbench probe``).

Run on every rank under ``mpiexec -n P``; MPI only through ringbench.engine.comm, imported by the functions that
run under MPI, so the pure helpers (link_phases, message_sizes) import without initialising MPI.

* Compute rate: every rank at once runs the real kernel (kernel.OnlineSoftmax, tiled as the ring tiles it)
  on one full K/V block of n tokens, for each n in ``block_sizes``; rate = 4 B H D n^2 / time.
* Backward compute rate: the same for the backward kernel (backward.BlockBackward with the O and log-sum-exp
  of an untimed forward, tiled and with the GEMM library as the ring's backward uses them); rate =
  2.5 x 4 B H D n^2 / time (FlashAttention's FLOP convention, as ``ringbench run`` counts the backward).
* Causal diagonal blocks: the same two measurements on the n x n block with its causal mask (rate = the
  unmasked pairs' FLOPs / time): the masked tiles every causal layout computes run at another rate than full ones.
* Piece shapes: the same forward (and backward) on skinny pieces, q rows in ``piece_rows`` (1, 8, 32) against
  k keys in ``block_sizes``: a piece of few queries against many keys costs far more per FLOP than a square of
  the same FLOPs (per-key work: loading and tiling K and V; a call's fixed cost). The model fits its per-call
  cost t = c + a q k + b k + e q to these and the squares (model.fit_piece_cost).
* Local copies: a strided copy of a (B, n, H, D) array, every rank at once (rate = bytes read + written / time):
  the memory-bound packing and merging around the strategies' collectives.
* Links: a ping-pong over the same communicator on each ring link (r, r+1 mod P), message sizes from
  8 bytes to ``max_bytes``; disjoint links are measured at the same time (2 phases, 3 for odd P), and
  each link is fitted with t = latency + bytes / bandwidth (model.fit_link).

The result is a /probes/<name> group of the result file (see ringbench.store).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass

import numpy as np

from ringbench import store
from ringbench.analysis import model
from ringbench.engine.backend import BackendError, get_backend, limit_threads
from ringbench.harness import inputs
from ringbench.kernels import backward, kernel
from ringbench.layout import CAUSAL, FULL, Piece
from ringbench.provenance import conditions_text, load_interval, load_snapshot, loaded, repeat_spread


@dataclass
class ProbeOptions:
    batch: int = 1
    heads: int = 8
    kv_heads: int = 0  # 0: same as heads
    head_dim: int = 64
    dtype: str = "float32"
    backend: str = "numpy"
    block_sizes: tuple = (256, 512, 1024, 2048)
    repeat: int = 5
    max_bytes: int = 16 << 20
    iters: int = 10
    kernel: str = "native"  # the per-step attention kernel timed (config.KERNELS); the backward's: bwd_kernel()
    piece_rows: tuple = (1, 8, 32)  # query rows of the skinny pieces; () for none
    piece_keys: tuple = ()  # their keys (): block_sizes; decode's shards are longer than any square block worth timing


def bwd_kernel(opts: ProbeOptions, backend) -> str:
    """The kernel whose backward the probe times: ``opts.kernel`` where it has a backward here (native; torch on the
    CPU), else the native one (flash-attn, and torch on a GPU: ringbench runs no fused backward there yet)."""
    from ringbench.kernels.torch_kernel import unavailable

    return opts.kernel if unavailable(opts.kernel, backend, opts.dtype, backward=True) is None else "native"


def link_phases(nranks: int) -> list[list[tuple[int, int]]]:
    """Ring links (r, r+1 mod P) grouped into phases of rank-disjoint pairs."""
    if nranks < 2:
        return []
    if nranks == 2:
        return [[(0, 1)]]
    links = [(r, (r + 1) % nranks) for r in range(nranks)]
    even = [lk for i, lk in enumerate(links) if i % 2 == 0 and not (nranks % 2 and i == nranks - 1)]
    odd = [lk for i, lk in enumerate(links) if i % 2 == 1]
    phases = [even, odd]
    if nranks % 2:
        phases.append([links[-1]])
    return phases


def message_sizes(max_bytes: int) -> list[int]:
    """8 bytes, then powers of 4 from 1 KiB up to ``max_bytes`` (included)."""
    sizes = [8]
    m = 1024
    while m < max_bytes:
        sizes.append(m)
        m *= 4
    sizes.append(int(max_bytes))
    return sorted(set(sizes))


def _square_shapes(opts: ProbeOptions) -> list[tuple[int, int]]:
    return [(int(n), int(n)) for n in opts.block_sizes]


def piece_shapes(opts: ProbeOptions) -> list[tuple[int, int]]:
    """(q rows, k keys) of the skinny pieces, rows-major: every row count of ``piece_rows`` against every key count of
    ``piece_keys`` (default: every block size)."""
    return [(int(q), int(k)) for q in opts.piece_rows for k in piece_keys(opts)]


def piece_keys(opts: ProbeOptions) -> tuple:
    return tuple(opts.piece_keys or opts.block_sizes)


def _inputs(opts: ProbeOptions, shapes, names=("q", "k", "v")) -> dict:
    """{name: (B, n, heads, D) float64} at positions 0..n-1, generated once, every piece takes a prefix: q and do with
    the query heads and n the most query rows of ``shapes``, k and v with the K/V heads and n the most keys."""
    top_q, top_k = max(nq for nq, _ in shapes), max(n for _, n in shapes)
    dims = {"batch": opts.batch, "seq_len": max(top_q, top_k), "head_dim": opts.head_dim}
    hk = opts.kv_heads or opts.heads
    kv = ("k", "v")
    return {t: inputs.tokens(t, 0, np.arange(top_k if t in kv else top_q), heads=hk if t in kv else opts.heads, **dims) for t in names}


def _timed(backend, repeat: int, call, *args, reset=None) -> np.ndarray:
    """(repeat,) seconds of ``call(*args)`` on this rank, every rank at once (a barrier before each), after one
    warm-up call; ``reset()``, if given, runs before each call, untimed."""
    from ringbench.engine import comm

    out = np.zeros(repeat)
    for r in range(-1, repeat):  # one warm-up
        comm.barrier()
        if reset is not None:
            reset()
        backend.synchronize()
        timer = backend.timer()
        timer.start()
        call(*args)
        timer.stop()
        backend.synchronize()
        if r >= 0:
            out[r] = timer.seconds()
    return out


def _compute_times(opts: ProbeOptions, backend, mask: str = FULL, shapes=None) -> np.ndarray:
    """(K, R) seconds of one kernel update of a q x k piece on this rank, per shape of ``shapes`` (default: the n x n
    blocks of ``block_sizes``) and repeat: a full piece (``mask`` FULL), or the causal diagonal block (CAUSAL: the
    masked tiles every causal layout computes)."""
    from ringbench.kernels.api import make_forward

    xp = backend.xp
    hk = opts.kv_heads or opts.heads
    dtype = backend.dtype(opts.dtype)
    compute = backend.compute_dtype(dtype)
    shapes = _square_shapes(opts) if shapes is None else shapes
    out = np.zeros((len(shapes), opts.repeat))
    src = _inputs(opts, shapes)
    for i, (nq, n) in enumerate(shapes):
        q = backend.asarray(src["q"][:, :nq].astype(dtype))  # (B, q, H, D)
        k = backend.asarray(src["k"][:, :n].astype(dtype))  # (B, k, H_kv, D)
        v = backend.asarray(src["v"][:, :n].astype(dtype))
        qh = kernel.q_to_heads(xp, q, hk, compute)  # (Z, G, q, D), read only
        kv_dtype = compute if opts.kernel == "native" else dtype  # a fused kernel takes K/V as stored (as the ring does)
        kh, vh = kernel.kv_to_heads(xp, k, kv_dtype), kernel.kv_to_heads(xp, v, kv_dtype)  # (Z, k, D)
        scale = kernel.softmax_scale(opts.head_dim)
        matmul = backend.matmul("auto")[0]
        # tiled as the ring tiles it (a skinny piece: as the serving passes' state of q queries tiles it)
        state = make_forward(backend, qh, n, matmul=matmul, scale=scale, kernel_name=opts.kernel, storage=dtype)
        piece = [Piece(0, nq, 0, n, mask)]
        out[i] = _timed(backend, opts.repeat, state.update, kh, vh, piece, reset=state.reset)
    return out


def _bwd_compute_times(opts: ProbeOptions, backend, mask: str = FULL, shapes=None) -> np.ndarray:
    """(K, R) seconds of one backward update (dQ, dK, dV) of a q x k piece (full, or the causal diagonal block with
    ``mask`` CAUSAL) on this rank, per shape of ``shapes`` (default: the n x n blocks of ``block_sizes``) and repeat.

    Prepared as the ring's backward prepares a rank (ring._Backward.prepare): an untimed forward gives O and the
    log-sum-exp, then BlockBackward with the ring's tiles and GEMM; what is timed is one ``update`` with a
    K/V block into zeroed dK/dV accumulators in the compute dtype."""
    from ringbench.kernels.api import make_backward, make_forward

    xp = backend.xp
    hk = opts.kv_heads or opts.heads
    dtype = backend.dtype(opts.dtype)
    compute = backend.compute_dtype(dtype)
    matmul = backend.matmul("auto")[0]
    name = bwd_kernel(opts, backend)
    shapes = _square_shapes(opts) if shapes is None else shapes
    out = np.zeros((len(shapes), opts.repeat))
    src = _inputs(opts, shapes, ("q", "do", "k", "v"))
    for i, (nq, n) in enumerate(shapes):
        q, do = (backend.asarray(src[t][:, :nq].astype(dtype)) for t in ("q", "do"))  # (B, q, H, D)
        k = backend.asarray(src["k"][:, :n].astype(dtype))  # (B, k, H_kv, D)
        v = backend.asarray(src["v"][:, :n].astype(dtype))
        scale = kernel.softmax_scale(opts.head_dim)
        kv_dtype = compute if name == "native" else dtype  # a fused kernel takes K/V as stored (as the ring does)
        kh, vh = kernel.kv_to_heads(xp, k, kv_dtype), kernel.kv_to_heads(xp, v, kv_dtype)  # (Z, k, D)
        piece = [Piece(0, nq, 0, n, mask)]
        q_heads = kernel.q_to_heads(xp, q, hk, compute)
        state = make_forward(backend, q_heads, n, matmul=matmul, scale=scale, kernel_name=name, storage=dtype)
        state.update(kh, vh, piece)  # untimed forward: O and the log-sum-exp
        o, lse = state.finalize(dtype)
        del state
        qh = kernel.q_to_heads(xp, q, hk, compute) * compute.type(scale)  # (Z, G, q, D), as the ring scales it
        if name == "native":
            z, g = qh.shape[:2]
            # tiled as the ring's backward of a rank of n queries tiles a q x k piece of a block of n keys (the
            # backward runs only in training passes, where a rank's state holds a whole block: a skinny piece is a
            # clipped tile of it)
            tile_q, tile_k, head_chunk = backward.auto_tiles(n, n, g, z, gpu=backend.is_gpu)
            grad = backward.BlockBackward(
                xp, qh, kernel.q_to_heads(xp, do, hk), o, lse, tile_q=tile_q, tile_k=tile_k, head_chunk=head_chunk, matmul=matmul
            )
        else:  # the ring's own call (ring._Backward.make_grad)
            grad = make_backward(backend, qh, kernel.q_to_heads(xp, do, hk), o, lse, kernel_name=name, matmul=matmul, storage=dtype)
        dk, dv = xp.zeros(kh.shape, compute), xp.zeros(kh.shape, compute)  # (Z, k, D) accumulators

        def reset(grad=grad, dk=dk, dv=dv):
            grad.reset()
            dk.fill(0)
            dv.fill(0)

        out[i] = _timed(backend, opts.repeat, grad.update, kh, vh, dk, dv, piece, reset=reset)
    return out


def _merge_times(opts: ProbeOptions, backend) -> np.ndarray:
    """(Q, R) seconds of one kernel.merge of two partials [O, LSE] of q query rows per head ((Z, G, q, D) and (Z, G, q)
    in the compute dtype), per row count of ``piece_rows`` and repeat, every rank at once: the small ops of decode's
    merges and pass-Q's returns, a few NumPy calls on small arrays whose cost is per call, not per byte."""

    xp = backend.xp
    hk = opts.kv_heads or opts.heads
    compute = backend.compute_dtype(backend.dtype(opts.dtype))
    z, g = opts.batch * hk, opts.heads // hk
    out = np.zeros((len(opts.piece_rows), opts.repeat))
    for i, q in enumerate(opts.piece_rows):
        rng = np.random.default_rng(i)
        o_a, o_b = (backend.asarray(rng.standard_normal((z, g, q, opts.head_dim)).astype(compute)) for _ in range(2))
        l_a, l_b = (backend.asarray(rng.standard_normal((z, g, q)).astype(compute)) for _ in range(2))
        out[i] = _timed(backend, opts.repeat, kernel.merge, xp, o_a, l_a, o_b, l_b)
    return out


COPY_REPEAT = 5


def _copy_times(opts: ProbeOptions, backend) -> tuple[int, np.ndarray]:
    """(bytes, (R,) seconds) of one strided copy on this rank, every rank at once: a (B, n, H, D) array of the
    largest block into (H, B, n, D) order, the kind of copy the strategies' packing and merges make (bytes = what
    is read plus what is written)."""

    xp = backend.xp
    n = max(opts.block_sizes)
    src = xp.ones((opts.batch, n, opts.heads, opts.head_dim), backend.dtype(opts.dtype))
    dst = xp.empty((opts.heads, opts.batch, n, opts.head_dim), src.dtype)

    def copy():
        dst[...] = src.transpose(2, 0, 1, 3)

    return 2 * int(src.nbytes), _timed(backend, COPY_REPEAT, copy)


def _pingpong_all(opts: ProbeOptions, rank: int, nranks: int) -> dict:
    """{link index: (S, I) one-way seconds} for the links this rank initiated."""
    from ringbench.engine import comm

    sizes = message_sizes(opts.max_bytes)
    buf = np.zeros(max(sizes), dtype=np.uint8)
    links = [(r, (r + 1) % nranks) for r in range(nranks)] if nranks > 2 else [(0, 1)] if nranks == 2 else []
    mine = {}
    for phase in link_phases(nranks):
        comm.barrier()
        for a, b in phase:
            if rank in (a, b):
                times = [comm.pingpong(buf[:m], b if rank == a else a, rank == a, opts.iters) for m in sizes]
                if rank == a:
                    mine[links.index((a, b))] = np.array(times)
    comm.barrier()
    return mine


INTRA, INTER = 0, 1  # link classes in the samples (class_kind, link_class)
CLASS_NAMES = ("intra", "inter")


def class_pairs(node_of: list[int]) -> list[tuple[int, int, int]]:
    """(a, b, class) of the pairs that measure each link class apart: the two lowest ranks of the first node with
    two ranks (intra-node), and the lowest ranks of nodes 0 and 1 (inter-node); a class this placement lacks
    (one rank per node, one node) is left out."""
    out = []
    by_node: dict[int, list[int]] = {}
    for r, n in enumerate(node_of):
        by_node.setdefault(n, []).append(r)
    two = [rs for _, rs in sorted(by_node.items()) if len(rs) >= 2]
    if two:
        out.append((two[0][0], two[0][1], INTRA))
    if len(by_node) >= 2:
        out.append((by_node[0][0], by_node[1][0], INTER))
    return out


def _class_pingpong(opts: ProbeOptions, rank: int, pairs) -> dict:
    """{pair index: (S, I) one-way seconds} of the class pairs this rank initiated, one pair at a time (the others
    wait): each link class measured alone."""
    from ringbench.engine import comm

    sizes = message_sizes(opts.max_bytes)
    buf = np.zeros(max(sizes), dtype=np.uint8)
    mine = {}
    for i, (a, b, _) in enumerate(pairs):
        comm.barrier()
        if rank in (a, b):
            times = [comm.pingpong(buf[:m], b if rank == a else a, rank == a, opts.iters) for m in sizes]
            if rank == a:
                mine[i] = np.array(times)
    comm.barrier()
    return mine


def a2a_sizes(max_bytes: int, group: int) -> list[int]:
    """Bytes to each peer of the all-to-all probe: 1 KiB, then powers of 4 up to ``max_bytes`` / group (at least 4 KiB)."""
    top = max(max_bytes // max(group, 1), 4096)
    sizes, m = [1024], 4096
    while m < top:
        sizes.append(m)
        m *= 4
    sizes.append(top)
    return sorted(set(sizes))


def _alltoall_times(opts: ProbeOptions, node_of: list[int]) -> dict:
    """{class: (per-peer bytes (A,), group size, (A, I) seconds on this rank)} of MPI_Alltoall within each node (every
    node at once: intra) and across nodes (the ranks with the same index on their node, each such group at once:
    inter), the two collectives hybrid's groups and Ulysses over all ranks use. A class with groups of one is left out."""
    from ringbench.engine import comm

    world = comm.WORLD
    local = sum(1 for r in range(world.rank) if node_of[r] == node_of[world.rank])  # this rank's index on its node
    out = {}
    for cls, color in (("intra", node_of[world.rank]), ("inter", local)):
        sub = world.Split(color=color, key=world.rank)
        size = min(world.allgather(sub.size))  # every group must have two ranks or more, or the class is skipped
        if size >= 2:
            sizes = a2a_sizes(opts.max_bytes, sub.size)
            t = np.zeros((len(sizes), opts.iters))
            for i, m in enumerate(sizes):
                send = np.zeros(m * sub.size, np.uint8)
                recv = np.empty_like(send)
                t[i] = comm.timed_alltoall(sub, send, recv, opts.iters)
            out[cls] = (np.array(sizes), sub.size, t)
        sub.Free()
    return out


def memory_estimate(opts: ProbeOptions, backend) -> tuple[int, int]:
    """Estimated peak (host, device) bytes of one rank of the probe, beyond the interpreter and libraries: the
    largest block's forward and backward, estimated as ``ringbench run`` estimates a one-rank run of that many
    tokens (memory.memory_estimate: inputs, state, tiles, the backward's buffers), or its strided copy, or the
    ping-pong buffer of --max-bytes, whichever is largest (they run one after the other)."""
    from ringbench.config import RunConfig
    from ringbench.harness import memory

    n = max(opts.block_sizes)
    cfg = RunConfig(
        batch=opts.batch,
        seq_len=n,
        heads=opts.heads,
        kv_heads=opts.kv_heads or opts.heads,
        head_dim=opts.head_dim,
        dtype=opts.dtype,
        backend=opts.backend,
        pass_="fwd+bwd",
    )
    host, device = memory.memory_estimate(cfg, 1, 0, backend)
    copy = 2 * opts.batch * n * opts.heads * opts.head_dim * backend.dtype(opts.dtype).itemsize  # source and destination
    host = max(host, memory.RANK_OVERHEAD + opts.max_bytes + (0 if backend.is_gpu else copy))
    if opts.piece_rows:  # the skinny pieces: float64 sources and stored copies of q, dO (most rows) and K, V (most keys)
        rows, keys = max(opts.piece_rows), max(piece_keys(opts))
        item = backend.dtype(opts.dtype).itemsize
        elems = opts.batch * opts.head_dim * (2 * rows * opts.heads + 2 * keys * (opts.kv_heads or opts.heads))
        host = max(host, memory.RANK_OVERHEAD + (8 + 3 * item) * elems + 8 * opts.batch * rows * opts.heads * keys)
    return host, max(device, copy) if backend.is_gpu else 0


def _memory_problem(opts: ProbeOptions, backend) -> str | None:
    """Collective: why the probe cannot fit in memory (one line: the estimate and what is available), or None. The
    ranks of a node share its available memory (or what their memory cgroup leaves); ranks on one GPU its free memory."""
    from ringbench.engine import comm
    from ringbench.engine.backend import host_memory

    host, device = memory_estimate(opts, backend)
    mine = (host, device, backend.device_id, host_memory(), backend.device_free_bytes(), socket.gethostname())
    node = comm.node_allgather(mine)
    (avail, bound), where = node[0][3], node[0][5]
    hint = "use smaller --block-sizes (or --batch, --heads, --head-dim, --max-bytes)"
    if avail is not None and sum(r[0] for r in node) > avail:
        total, ranks = sum(r[0] for r in node), f"{len(node)} rank{'s' if len(node) > 1 else ''}"
        return (
            f"--block-sizes: the probe needs about {_size(max(r[0] for r in node))} of host memory per rank (estimate; "
            f"{_size(total)} for the {ranks} on {where}), more than the {_size(avail)} {bound}; {hint}"
        )
    if backend.is_gpu:
        same = [r for r in node if r[2] == backend.device_id]
        free = min(r[4] for r in same)
        if sum(r[1] for r in same) > free:
            return (
                f"--block-sizes: the probe needs about {_size(max(r[1] for r in same))} of device memory per rank "
                f"(estimate), more than the {_size(free)} free on GPU {backend.device_id} of {where}; {hint}"
            )
    return None


def _text_file_problem(path: str) -> str | None:
    """One line when a text file cannot be written at ``path`` (a directory, a missing or read-only directory)."""
    import os
    from pathlib import Path

    p = Path(path)
    parent = p.resolve().parent
    if p.is_dir():
        return f"--machine-out: cannot write {path}: it is a directory"
    if not parent.is_dir():
        return f"--machine-out: cannot write {path}: directory {parent} does not exist"
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"--machine-out: cannot write {path}: permission denied"
    return None


def _size(nbytes: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def run(opts: ProbeOptions, out: str, name: str | None, quiet: bool, machine_out: str | None = None) -> int:
    """The probe on every rank; rank 0 stores the /probes group and prints a summary (and writes the machine
    description to ``machine_out``)."""
    from ringbench.engine import comm
    from ringbench.harness import record

    world = comm.WORLD
    rank, nranks = world.rank, world.size
    err = None
    if rank == 0:
        why = store.check_writable(out)
        err = f"--out: cannot write {out}: {why}" if why else None
    try:
        backend = get_backend(opts.backend)
        backend.dtype(opts.dtype)
        backend.matmul("auto")
        limit_threads()  # after the GEMM library is loaded: its pool is limited too
    except BackendError as exc:  # a user error, agreed on by every rank below
        err = err or str(exc)
    else:
        from ringbench.kernels.torch_kernel import unavailable

        err = err or unavailable(opts.kernel, backend, opts.dtype)
    node_of, node_hosts = comm.node_map(world)
    if machine_out and not err:
        kinds = {c for _, _, c in class_pairs(node_of)}
        per_node = "/".join(str(node_of.count(n)) for n in range(len(node_hosts)))
        if kinds != {INTRA, INTER}:
            err = (
                f"--machine-out: the machine description needs both link classes measured: ranks on 2 nodes or more and "
                f"2 ranks or more on a node; this job has {len(node_hosts)} node(s) with {per_node} ranks"
            )
        elif rank == 0:
            err = _text_file_problem(machine_out)
    err = comm.first_error(err)
    if not err:
        err = comm.first_error(_memory_problem(opts, backend))
    if err:
        from ringbench.config import UserError

        raise UserError(err)
    load = load_snapshot()  # how busy this host is while the probe measures (provenance "conditions")
    compute = _compute_times(opts, backend)
    causal = _compute_times(opts, backend, CAUSAL)
    bwd_compute = _bwd_compute_times(opts, backend)
    bwd_causal = _bwd_compute_times(opts, backend, CAUSAL)
    pieces = _compute_times(opts, backend, FULL, piece_shapes(opts))
    bwd_pieces = _bwd_compute_times(opts, backend, FULL, piece_shapes(opts))
    merges = _merge_times(opts, backend)
    copy_bytes, copy = _copy_times(opts, backend)
    pp = _pingpong_all(opts, rank, nranks)
    pairs = class_pairs(node_of)
    cpp = _class_pingpong(opts, rank, pairs)
    a2a = _alltoall_times(opts, node_of)
    load = load_interval(load)
    local = {
        "compute": compute,
        "causal": causal,
        "bwd_compute": bwd_compute,
        "bwd_causal": bwd_causal,
        "pieces": pieces,
        "bwd_pieces": bwd_pieces,
        "merges": merges,
        "copy_bytes": copy_bytes,
        "copy": copy,
        "pingpong": pp,
        "class_pingpong": cpp,
        "a2a": a2a,
        **record.rank_facts(backend, load),
    }
    parts = comm.gather(local)
    if rank != 0:
        return 0
    probe = assemble(opts, parts, backend, name, nodes=(node_of, node_hosts, pairs))
    try:
        where = store.append_probe(out, probe)
    except (OSError, store.SchemaError) as exc:  # a full disk, a quota, the file replaced meanwhile
        from ringbench.config import UserError

        raise UserError(f"--out: cannot write {out}: {store.write_error(out, exc)}") from None
    if machine_out:
        text = machine_yaml(probe)
        try:
            with open(machine_out, "w") as f:
                f.write(text)
        except OSError as exc:
            from ringbench.config import UserError

            raise UserError(f"--machine-out: cannot write {machine_out}: {exc.strerror or exc}") from None
    if not quiet:
        print(format_probe(probe, f"{out}:/probes/{where}"))
        if machine_out:
            print(f"  machine description (advise --machine): {machine_out}")
    return 0


def assemble(opts: ProbeOptions, parts: list, backend, name: str | None, nodes=None) -> store.Probe:
    """The probe record from every rank's gathered part; ``nodes``: (node of each rank, host of each node, the class
    pairs measured), None for a probe of parts without them (every rank on one node)."""
    nranks = len(parts)
    hk = opts.kv_heads or opts.heads
    sizes = np.array(message_sizes(opts.max_bytes))
    n = np.array(opts.block_sizes)
    block_flops = np.array([kernel.flops(opts.batch, opts.heads, opts.head_dim, int(k) * int(k)) for k in n])
    compute_s = np.stack([p["compute"] for p in parts], axis=2)  # (K, R, P)
    bwd_block_flops = np.array([backward.flops(opts.batch, opts.heads, opts.head_dim, int(k) * int(k)) for k in n])
    bwd_compute_s = np.stack([p["bwd_compute"] for p in parts], axis=2)  # (K, R, P)
    causal_flops = np.array([kernel.flops(opts.batch, opts.heads, opts.head_dim, int(k) * (int(k) + 1) // 2) for k in n])
    nlinks = nranks if nranks > 2 else (1 if nranks == 2 else 0)
    links = np.array([(r, (r + 1) % nranks) for r in range(nlinks)], dtype=np.int64).reshape(nlinks, 2)
    pingpong_s = np.zeros((nlinks, len(sizes), opts.iters))
    for p in parts:
        for i, t in p["pingpong"].items():
            pingpong_s[i] = t
    rate = float(block_flops[-1] / np.median(np.median(compute_s[-1], axis=0)))
    bwd_rate = float(bwd_block_flops[-1] / np.median(np.median(bwd_compute_s[-1], axis=0)))
    copy_s = np.stack([p["copy"] for p in parts], axis=1)  # (R, P)
    summary = {
        "rate_flops": rate,
        "rate_block_tokens": int(n[-1]),
        "bwd_rate_flops": bwd_rate,
        "copy_Bps": float(parts[0]["copy_bytes"] / np.median(copy_s.max(axis=1))),
    }
    fits = [model.fit_link(sizes, np.median(pingpong_s[i], axis=1)) for i in range(nlinks)]
    if fits:  # the ring moves at the pace of its slowest link: the one slowest for the largest message
        slowest = int(np.argmax([model.comm_time(sizes[-1], lat, bw) for lat, bw in fits]))
        summary["latency_s"], summary["bandwidth_Bps"] = fits[slowest]
        summary["slowest_link"] = slowest
    else:
        summary["latency_s"] = summary["bandwidth_Bps"] = float("nan")
    samples_nodes = _assemble_nodes(opts, parts, nodes, links, summary)
    from ringbench.harness import record

    spread = {  # max / min of each timed kernel's repeats (the median over block sizes and ranks): noise, load
        key: repeat_spread(np.stack([p[key] for p in parts], axis=2).transpose(1, 0, 2))  # (R, K, P)
        for key in ("compute", "causal", "bwd_compute", "bwd_causal")
    }
    spread["copy"] = repeat_spread(copy_s)
    prov = record.provenance(parts, backend, cuda_aware=False, blas=backend.matmul("auto")[1], spread=spread)
    if nodes is not None:
        prov["nodes"] = {"count": len(nodes[1]), "hosts": list(nodes[1]), "node_of_rank": list(nodes[0])}
    cfg = asdict(opts)
    cfg["kv_heads"] = hk
    cfg["bwd_kernel"] = bwd_kernel(opts, backend)
    cfg["block_sizes"] = list(opts.block_sizes)
    cfg["piece_rows"] = list(opts.piece_rows)
    cfg["piece_keys"] = list(piece_keys(opts))
    return store.Probe(
        nranks=nranks,
        config=cfg,
        provenance=prov,
        created_utc=prov["utc"],
        name=name or f"probe-P{nranks}-{opts.dtype}",
        samples={
            "block_tokens": n,
            "block_flops": block_flops,
            "compute_s": compute_s,
            "bwd_block_flops": bwd_block_flops,
            "bwd_compute_s": bwd_compute_s,
            "causal_flops": causal_flops,
            "causal_compute_s": np.stack([p["causal"] for p in parts], axis=2),
            "bwd_causal_compute_s": np.stack([p["bwd_causal"] for p in parts], axis=2),
            **_assemble_pieces(opts, parts),
            "copy_bytes": np.array([parts[0]["copy_bytes"]]),
            "copy_s": np.stack([p["copy"] for p in parts], axis=1),
            "msg_bytes": sizes,
            "links": links,
            "pingpong_s": pingpong_s,
            **samples_nodes,
        },
        summary=summary,
    )


def _assemble_pieces(opts: ProbeOptions, parts: list) -> dict:
    """The skinny pieces' samples (schema 4): piece_rows (Q,), piece_keys (K,) and piece_compute_s,
    bwd_piece_compute_s (Q, K, R, P) seconds of one forward / backward update of a q x k piece, merge_s (Q, R, P)
    seconds of one merge of two partials of q rows per head; none without ``piece_rows``."""
    if not opts.piece_rows or "pieces" not in parts[0]:
        return {}
    nq, nk = len(opts.piece_rows), len(piece_keys(opts))
    out = {"piece_rows": np.array(opts.piece_rows, dtype=np.int64), "piece_keys": np.array(piece_keys(opts), dtype=np.int64)}
    for key, name in (("pieces", "piece_compute_s"), ("bwd_pieces", "bwd_piece_compute_s")):
        t = np.stack([p[key] for p in parts], axis=2)  # (Q K, R, P)
        out[name] = t.reshape(nq, nk, t.shape[1], t.shape[2])
    out["merge_s"] = np.stack([p["merges"] for p in parts], axis=2)  # (Q, R, P)
    return out


def _assemble_nodes(opts: ProbeOptions, parts: list, nodes, links, summary: dict) -> dict:
    """The samples of the link classes (class pairs, their ping-pongs, the all-to-alls, each ring link's class); their
    fits go into ``summary`` (intra_/inter_latency_s, _bandwidth_Bps; a2a_intra_/a2a_inter_ the same per peer;
    nodes, ranks_per_node)."""
    if nodes is None:
        return {}
    node_of, hosts, pairs = nodes
    sizes = np.array(message_sizes(opts.max_bytes))
    counts = [node_of.count(n) for n in range(len(hosts))]
    summary["nodes"] = len(hosts)
    summary["ranks_per_node"] = min(counts)
    out = {
        "node_of_rank": np.array(node_of, dtype=np.int64),
        "link_class": np.array([INTRA if node_of[a] == node_of[b] else INTER for a, b in links], dtype=np.int64),
        "class_pairs": np.array([(a, b) for a, b, _ in pairs], dtype=np.int64).reshape(len(pairs), 2),
        "class_kind": np.array([c for _, _, c in pairs], dtype=np.int64),
    }
    cpp = np.zeros((len(pairs), len(sizes), opts.iters))
    for p in parts:
        for i, t in p["class_pingpong"].items():
            cpp[i] = t
    out["class_pingpong_s"] = cpp
    for i, (_, _, c) in enumerate(pairs):
        lat, bw = model.fit_link(sizes, np.median(cpp[i], axis=1))
        summary[f"{CLASS_NAMES[c]}_latency_s"], summary[f"{CLASS_NAMES[c]}_bandwidth_Bps"] = lat, bw
    for cls in CLASS_NAMES:
        if cls not in parts[0]["a2a"]:
            continue
        a2a_bytes, group, _ = parts[0]["a2a"][cls]
        t = np.stack([p["a2a"][cls][2] for p in parts], axis=2)  # (A, I, P): the collective ends with its slowest rank
        out[f"a2a_{cls}_bytes"] = a2a_bytes
        out[f"a2a_{cls}_s"] = t
        per_peer = np.median(t.max(axis=2), axis=1) / (group - 1)  # (group - 1) rounds of one message each
        lat, bw = model.fit_link(a2a_bytes, per_peer)
        summary[f"a2a_{cls}_group"] = int(group)
        summary[f"a2a_{cls}_latency_s"], summary[f"a2a_{cls}_bandwidth_Bps"] = lat, bw
    return out


def machine_yaml(probe: store.Probe, name: str | None = None) -> str | None:
    """The machine description ``advise --machine`` reads (ringbench.analysis.advise.load_machine) from a probe that
    measured both link classes (ranks on two nodes or more, two ranks or more on a node), else None."""
    s = probe.summary
    if "intra_bandwidth_Bps" not in s or "inter_bandwidth_Bps" not in s:
        return None
    hosts = probe.provenance.get("nodes", {}).get("hosts", [])
    lines = [
        f"# written by ringbench probe from {probe.name} ({s['nodes']} nodes: {', '.join(hosts)}; {probe.created_utc})",
        f"name: {name or probe.name}",
        f"ranks_per_node: {int(s['ranks_per_node'])}",
    ]
    for cls in CLASS_NAMES:
        lat_us = min(max(s[f"{cls}_latency_s"] * 1e6, 0.0), 1e6)  # the ranges load_machine accepts
        gbps = min(max(s[f"{cls}_bandwidth_Bps"] / 1e9, 1e-6), 1e5)
        lines.append(f"{cls}: {{latency_us: {lat_us:.6g}, bandwidth_gbps: {gbps:.6g}}}")
    from ringbench.analysis.advise import probe_collectives

    coll = probe_collectives(s)  # the all-to-alls within / across nodes, as a preset's bus bandwidths (GB/s)
    if coll:
        lines.append("collectives:")
        for cls, c in coll.items():
            lines.append(f"  {cls}: {{all_to_all_busbw_gbps: {min(max(c['all_to_all'] / 1e9, 1e-6), 1e5):.6g}}}")
    return "\n".join(lines) + "\n"


def _format_classes(probe: store.Probe) -> list[str]:
    """The link-class lines of a probe (none for probes from before they were measured)."""
    s, lines = probe.summary, []
    if "nodes" not in s:
        return lines
    hosts = probe.provenance.get("nodes", {}).get("hosts", [])
    lines.append(f"  nodes: {s['nodes']} ({', '.join(hosts)}), {s['ranks_per_node']}+ ranks per node")
    classes = probe.samples.get("link_class", [])
    for (a, b), c in zip(probe.samples["links"], classes):
        lines.append(f"    ring link {a}->{b}: {CLASS_NAMES[int(c)]}-node")
    for cls in CLASS_NAMES:
        if f"{cls}_bandwidth_Bps" in s:
            lines.append(
                f"  {cls}-node pair: latency {s[cls + '_latency_s'] * 1e6:.1f} us, bandwidth {s[cls + '_bandwidth_Bps'] / 1e9:.3f} GB/s"
            )
    for cls in CLASS_NAMES:
        if f"a2a_{cls}_bandwidth_Bps" in s:
            lines.append(
                f"  all-to-all {'within' if cls == 'intra' else 'across'} nodes (groups of {s['a2a_' + cls + '_group']}): "
                f"per peer latency {s['a2a_' + cls + '_latency_s'] * 1e6:.1f} us, "
                f"bandwidth {s['a2a_' + cls + '_bandwidth_Bps'] / 1e9:.3f} GB/s"
            )
    return lines


def _format_pieces(probe: store.Probe) -> list[str]:
    """The skinny pieces' lines (microseconds per call) and the model's per-call fits (none for probes before schema 4)."""
    s = probe.samples
    if "piece_compute_s" not in s or "causal_compute_s" not in s:
        return []
    lines = []
    for key, label in (("piece_compute_s", "skinny pieces, forward"), ("bwd_piece_compute_s", "backward")):
        per = np.median(np.median(s[key], axis=2), axis=2)  # (Q, K)
        cells = [f"{int(q)}x{int(k)} {per[i, j] * 1e6:.0f}" for i, q in enumerate(s["piece_rows"]) for j, k in enumerate(s["piece_keys"])]
        lines.append(f"  {label} (q x k: us per call): " + ", ".join(cells))
    if "merge_s" in s:
        per = np.median(np.median(s["merge_s"], axis=1), axis=1)  # (Q,)
        lines.append(
            "  merges of two partials (q rows per head: us per call): "
            + ", ".join(f"q={int(q)} {t * 1e6:.0f}" for q, t in zip(s["piece_rows"], per))
        )
    for label, fit in zip(("forward", "backward"), model.probe_piece_fits(probe)):
        lines.append(
            f"  per-call fit, {label}: t = {fit.c * 1e6:.1f} us + {fit.a * 1e9:.3g} ns q k + {fit.b * 1e9:.3g} ns k "
            f"+ {fit.e * 1e9:.3g} ns q (masked x{fit.masked:.2f}; pieces under {fit.min_block} tokens or over "
            f"{model.SKINNY_ASPECT}:1)"
        )
    return lines


def _kernels(c: dict) -> str:
    """', kernel torch' (', kernel flash-attn, native backward') for a probe of another kernel than native."""
    fwd, bwd = c.get("kernel", "native"), c.get("bwd_kernel", "native")  # probes from before --kernel: native
    if fwd == "native":
        return ""
    return f", kernel {fwd}" + ("" if bwd == fwd else f", {bwd} backward")


def format_probe(probe: store.Probe, where: str) -> str:
    c, prov = probe.config, probe.provenance
    per_block = np.median(np.median(probe.samples["compute_s"], axis=1), axis=1)  # (K,)
    rates = probe.samples["block_flops"] / per_block
    lines = [
        (f"ringbench probe: P={probe.nranks} on {', '.join(prov['hosts'])} [{prov['backend']}, {prov['mpi_library']}]"),
        f"  compute (per rank, all ranks busy; B={c['batch']} H={c['heads']}/{c['kv_heads']} D={c['head_dim']} "
        f"{c['dtype']}{_kernels(c)}): "
        + ", ".join(f"n={int(k)} {r / 1e9:.1f}" for k, r in zip(probe.samples["block_tokens"], rates))
        + " GFLOP/s",
    ]
    if "bwd_compute_s" in probe.samples:  # probes from before the backward have none
        per_block = np.median(np.median(probe.samples["bwd_compute_s"], axis=1), axis=1)  # (K,)
        rates = probe.samples["bwd_block_flops"] / per_block
        lines.append(
            "  backward (dQ, dK, dV; FLOPs = 2.5 x forward): "
            + ", ".join(f"n={int(k)} {r / 1e9:.1f}" for k, r in zip(probe.samples["block_tokens"], rates))
            + " GFLOP/s"
        )
    if "causal_compute_s" in probe.samples:  # probes from before 2026-11-26 have none
        for key, label, flops in (
            ("causal_compute_s", "causal diagonal block", "causal_flops"),
            ("bwd_causal_compute_s", "its backward", None),
        ):
            per_block = np.median(np.median(probe.samples[key], axis=1), axis=1)  # (K,)
            f = probe.samples["causal_flops"] * (1.0 if flops else backward.flops(1, 1, 1, 1) / kernel.flops(1, 1, 1, 1))
            lines.append(
                f"  {label} (unmasked pairs' FLOPs): "
                + ", ".join(f"n={int(k)} {r / 1e9:.1f}" for k, r in zip(probe.samples["block_tokens"], f / per_block))
                + " GFLOP/s"
            )
        lines.append(f"  local copies (strided, read + write): {probe.summary['copy_Bps'] / 1e9:.2f} GB/s per rank")
    lines += _format_pieces(probe)
    sizes = probe.samples["msg_bytes"]
    for i, (a, b) in enumerate(probe.samples["links"]):
        lat, bw = model.fit_link(sizes, np.median(probe.samples["pingpong_s"][i], axis=1))
        lines.append(f"  link {a}->{b}: latency {lat * 1e6:.1f} us, bandwidth {bw / 1e9:.2f} GB/s")
    if probe.nranks < 2:
        lines.append("  links: one rank, nothing to measure (run under mpiexec -n 2 or more)")
    lines += _format_classes(probe)
    cond = prov.get("conditions")
    if cond:  # probes from before 2026-12 recorded none
        lines.append(f"  conditions: {conditions_text(cond)}")
        if loaded(cond):
            lines.append(f"  warning: measured on a loaded machine ({loaded(cond)}): predictions from it are off; probe again when quiet")
    lines.append(f"  saved {where}")
    return "\n".join(lines)
