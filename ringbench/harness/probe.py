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


def _compute_times(opts: ProbeOptions, backend, mask: str = FULL) -> np.ndarray:
    """(K, R) seconds of one kernel update of an n x n block on this rank, per block size and repeat: a full
    block (``mask`` FULL), or the causal diagonal block (CAUSAL: the masked tiles every causal layout computes)."""
    from ringbench.engine import comm
    from ringbench.kernels.api import make_forward

    xp = backend.xp
    hk = opts.kv_heads or opts.heads
    dtype = backend.dtype(opts.dtype)
    compute = backend.compute_dtype(dtype)
    out = np.zeros((len(opts.block_sizes), opts.repeat))
    for i, n in enumerate(opts.block_sizes):
        pos = np.arange(n)
        dims = {"batch": opts.batch, "seq_len": n, "head_dim": opts.head_dim}
        q = backend.asarray(inputs.tokens("q", 0, pos, heads=opts.heads, **dims).astype(dtype))  # (B, n, H, D)
        k = backend.asarray(inputs.tokens("k", 0, pos, heads=hk, **dims).astype(dtype))  # (B, n, H_kv, D)
        v = backend.asarray(inputs.tokens("v", 0, pos, heads=hk, **dims).astype(dtype))
        qh = kernel.q_to_heads(xp, q, hk, compute)  # (Z, G, n, D), read only
        kh, vh = kernel.kv_to_heads(xp, k, compute), kernel.kv_to_heads(xp, v, compute)  # (Z, n, D)
        scale = kernel.softmax_scale(opts.head_dim)
        state = make_forward(backend, qh, n, matmul=backend.matmul("auto")[0], scale=scale)  # tiled as the ring tiles it
        piece = [Piece(0, n, 0, n, mask)]
        for r in range(-1, opts.repeat):  # one warm-up
            comm.barrier()
            state.reset()
            backend.synchronize()
            timer = backend.timer()
            timer.start()
            state.update(kh, vh, piece)
            timer.stop()
            backend.synchronize()
            if r >= 0:
                out[i, r] = timer.seconds()
    return out


def _bwd_compute_times(opts: ProbeOptions, backend, mask: str = FULL) -> np.ndarray:
    """(K, R) seconds of one backward update (dQ, dK, dV) of an n x n block (full, or the causal diagonal block
    with ``mask`` CAUSAL) on this rank, per block size and repeat.

    Prepared as the ring's backward prepares a rank (ring._Backward.prepare): an untimed forward gives O and the
    log-sum-exp, then BlockBackward with the ring's tiles and GEMM; what is timed is one ``update`` with a
    K/V block into zeroed dK/dV accumulators in the compute dtype."""
    from ringbench.engine import comm
    from ringbench.kernels.api import make_forward

    xp = backend.xp
    hk = opts.kv_heads or opts.heads
    dtype = backend.dtype(opts.dtype)
    compute = backend.compute_dtype(dtype)
    matmul = backend.matmul("auto")[0]
    out = np.zeros((len(opts.block_sizes), opts.repeat))
    for i, n in enumerate(opts.block_sizes):
        pos = np.arange(n)
        dims = {"batch": opts.batch, "seq_len": n, "head_dim": opts.head_dim}
        q, do = (backend.asarray(inputs.tokens(name, 0, pos, heads=opts.heads, **dims).astype(dtype)) for name in ("q", "do"))
        k = backend.asarray(inputs.tokens("k", 0, pos, heads=hk, **dims).astype(dtype))  # (B, n, H_kv, D)
        v = backend.asarray(inputs.tokens("v", 0, pos, heads=hk, **dims).astype(dtype))
        scale = kernel.softmax_scale(opts.head_dim)
        kh, vh = kernel.kv_to_heads(xp, k, compute), kernel.kv_to_heads(xp, v, compute)  # (Z, n, D)
        piece = [Piece(0, n, 0, n, mask)]
        state = make_forward(backend, kernel.q_to_heads(xp, q, hk, compute), n, matmul=matmul, scale=scale)
        state.update(kh, vh, piece)  # untimed forward: O and the log-sum-exp
        o, lse = state.finalize(dtype)
        del state
        qh = kernel.q_to_heads(xp, q, hk, compute) * compute.type(scale)  # (Z, G, n, D), as the ring scales it
        z, g = qh.shape[:2]
        tile_q, tile_k, head_chunk = backward.auto_tiles(n, n, g, z, gpu=backend.is_gpu)
        grad = backward.BlockBackward(
            xp, qh, kernel.q_to_heads(xp, do, hk), o, lse, tile_q=tile_q, tile_k=tile_k, head_chunk=head_chunk, matmul=matmul
        )
        dk, dv = xp.zeros(kh.shape, compute), xp.zeros(kh.shape, compute)  # (Z, n, D) accumulators
        for r in range(-1, opts.repeat):  # one warm-up
            comm.barrier()
            grad.reset()
            dk.fill(0)
            dv.fill(0)
            backend.synchronize()
            timer = backend.timer()
            timer.start()
            grad.update(kh, vh, dk, dv, piece)
            timer.stop()
            backend.synchronize()
            if r >= 0:
                out[i, r] = timer.seconds()
    return out


COPY_REPEAT = 5


def _copy_times(opts: ProbeOptions, backend) -> tuple[int, np.ndarray]:
    """(bytes, (R,) seconds) of one strided copy on this rank, every rank at once: a (B, n, H, D) array of the
    largest block into (H, B, n, D) order, the kind of copy the strategies' packing and merges make (bytes = what
    is read plus what is written)."""
    from ringbench.engine import comm

    xp = backend.xp
    n = max(opts.block_sizes)
    src = xp.ones((opts.batch, n, opts.heads, opts.head_dim), backend.dtype(opts.dtype))
    dst = xp.empty((opts.heads, opts.batch, n, opts.head_dim), src.dtype)
    out = np.zeros(COPY_REPEAT)
    for r in range(-1, COPY_REPEAT):  # one warm-up
        comm.barrier()
        backend.synchronize()
        timer = backend.timer()
        timer.start()
        dst[...] = src.transpose(2, 0, 1, 3)
        timer.stop()
        backend.synchronize()
        if r >= 0:
            out[r] = timer.seconds()
    return 2 * int(src.nbytes), out


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


def _size(nbytes: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def run(opts: ProbeOptions, out: str, name: str | None, quiet: bool) -> int:
    """The probe on every rank; rank 0 stores the /probes group and prints a summary."""
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
    copy_bytes, copy = _copy_times(opts, backend)
    pp = _pingpong_all(opts, rank, nranks)
    load = load_interval(load)
    local = {
        "compute": compute,
        "causal": causal,
        "bwd_compute": bwd_compute,
        "bwd_causal": bwd_causal,
        "copy_bytes": copy_bytes,
        "copy": copy,
        "pingpong": pp,
        **record.rank_facts(backend, load),
    }
    parts = comm.gather(local)
    if rank != 0:
        return 0
    probe = assemble(opts, parts, backend, name)
    try:
        where = store.append_probe(out, probe)
    except (OSError, store.SchemaError) as exc:  # a full disk, a quota, the file replaced meanwhile
        from ringbench.config import UserError

        raise UserError(f"--out: cannot write {out}: {store.write_error(out, exc)}") from None
    if not quiet:
        print(format_probe(probe, f"{out}:/probes/{where}"))
    return 0


def assemble(opts: ProbeOptions, parts: list, backend, name: str | None) -> store.Probe:
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
    from ringbench.harness import record

    spread = {  # max / min of each timed kernel's repeats (the median over block sizes and ranks): noise, load
        key: repeat_spread(np.stack([p[key] for p in parts], axis=2).transpose(1, 0, 2))  # (R, K, P)
        for key in ("compute", "causal", "bwd_compute", "bwd_causal")
    }
    spread["copy"] = repeat_spread(copy_s)
    prov = record.provenance(parts, backend, cuda_aware=False, blas=backend.matmul("auto")[1], spread=spread)
    cfg = asdict(opts)
    cfg["kv_heads"] = hk
    cfg["block_sizes"] = list(opts.block_sizes)
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
            "copy_bytes": np.array([parts[0]["copy_bytes"]]),
            "copy_s": np.stack([p["copy"] for p in parts], axis=1),
            "msg_bytes": sizes,
            "links": links,
            "pingpong_s": pingpong_s,
        },
        summary=summary,
    )


def format_probe(probe: store.Probe, where: str) -> str:
    c, prov = probe.config, probe.provenance
    per_block = np.median(np.median(probe.samples["compute_s"], axis=1), axis=1)  # (K,)
    rates = probe.samples["block_flops"] / per_block
    lines = [
        (f"ringbench probe: P={probe.nranks} on {', '.join(prov['hosts'])} [{prov['backend']}, {prov['mpi_library']}]"),
        f"  compute (per rank, all ranks busy; B={c['batch']} H={c['heads']}/{c['kv_heads']} D={c['head_dim']} "
        f"{c['dtype']}): " + ", ".join(f"n={int(k)} {r / 1e9:.1f}" for k, r in zip(probe.samples["block_tokens"], rates)) + " GFLOP/s",
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
    sizes = probe.samples["msg_bytes"]
    for i, (a, b) in enumerate(probe.samples["links"]):
        lat, bw = model.fit_link(sizes, np.median(probe.samples["pingpong_s"][i], axis=1))
        lines.append(f"  link {a}->{b}: latency {lat * 1e6:.1f} us, bandwidth {bw / 1e9:.2f} GB/s")
    if probe.nranks < 2:
        lines.append("  links: one rank, nothing to measure (run under mpiexec -n 2 or more)")
    cond = prov.get("conditions")
    if cond:  # probes from before 2026-12 recorded none
        lines.append(f"  conditions: {conditions_text(cond)}")
        if loaded(cond):
            lines.append(f"  warning: measured on a loaded machine ({loaded(cond)}): predictions from it are off; probe again when quiet")
    lines.append(f"  saved {where}")
    return "\n".join(lines)
