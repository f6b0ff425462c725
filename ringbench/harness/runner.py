"""One ring-attention run across the MPI ranks: set up, warm up, repeat, check, gather, store.

Called by ``ringbench run`` on every rank. User errors are agreed on collectively (every rank exits
with status 2 and rank 0 prints one line); any other exception aborts the whole job.
"""

from __future__ import annotations

import math
import os
import socket

import numpy as np

from ringbench import store
from ringbench.analysis import measure
from ringbench.config import RunConfig, UserError, option_name, point_id, validate
from ringbench.engine import api as engine
from ringbench.engine import comm, strategies
from ringbench.engine.api import RankContext
from ringbench.engine.backend import (
    BackendError,
    current_rss_bytes,
    get_backend,
    host_memory,
    limit_threads,
    peak_rss_bytes,
    thread_limit,
)
from ringbench.engine.ring import parse_fault
from ringbench.harness import check, inputs, progress
from ringbench.kernels import backward, kernel
from ringbench.kernels.mkl import MklMatmul
from ringbench.kernels.tiling import tiling
from ringbench.kernels.torch_kernel import unavailable
from ringbench.layout import positions, unmasked_pairs
from ringbench.provenance import (
    argv,
    conditions,
    git_commit,
    load_interval,
    load_snapshot,
    loaded,
    repeat_spread,
    thread_pools,
    utc_now,
    versions,
)


def run(cfg: RunConfig, out: str | None = None, quiet: bool = False) -> int:
    world = comm.WORLD
    rank, nranks = world.rank, world.size
    err = _validate(cfg, out, nranks)
    err = comm.first_error(err)
    if err:
        raise UserError(err)
    try:
        backend = get_backend(cfg.backend)
        dtype = backend.dtype(cfg.dtype)
        backend.matmul(cfg.blas)
        limit_threads()  # after the GEMM library is loaded: its pool is limited too
        err = unavailable(
            cfg.kernel, backend, cfg.dtype, backward="bwd" in cfg.phases
        )  # torch / flash-attn missing, or not for this backend or dtype
    except BackendError as exc:
        err = str(exc)
    err = comm.first_error(err)
    if err:
        raise UserError(err)
    cuda_aware = _cuda_aware(cfg, backend)
    # one exponential for every rank and state of the run (forward, backward, strategies): rank 0's choice
    # (RINGBENCH_EXP if set, else measured), so that ranks on a noisy node never compute in different bases
    try:
        exp, err = (kernel.exp_base(backend.xp).name if rank == 0 else None), None
    except ValueError as exc:  # RINGBENCH_EXP set to something this machine cannot do
        exp, err = None, str(exc)
    err = comm.first_error(err)
    if err:
        raise UserError(err)
    os.environ[kernel.EXP_ENV] = comm.bcast(exp)
    # every rank loads what it needs now, before the baseline RSS: for fused, numba and the compiled pass for the
    # compute dtype (compiled or loaded from numba's cache: ~50 MB that rank 0's measurement had already paid, so
    # that the ring's construction on the other ranks counted it as the run's memory)
    if kernel.exp_base(backend.xp).fused:
        kernel.fused_module().compile(backend.compute_dtype(dtype))
    err = comm.first_error(_memory_problem(cfg, nranks, rank, backend))
    if err:
        raise UserError(err)

    baseline_rss = current_rss_bytes()  # interpreter + libraries, before any array of the run
    reset_peak_rss()  # the peak recorded below is the run's, not an earlier transient's (importing, compiling)
    # inputs: this rank's tokens of the global q, k, v (and dO for a backward)
    phases = cfg.phases
    names = ("q", "k", "v", "do") if "bwd" in phases else ("q", "k", "v")
    hk = cfg.kv_heads_resolved
    pos = positions(cfg.layout, rank, nranks, cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    host = {name: inputs.tokens(name, cfg.seed, pos, heads=hk if name in ("k", "v") else cfg.heads, **dims).astype(dtype) for name in names}
    dev = {k: backend.asarray(v) for k, v in host.items()}
    if not (cfg.check or cfg.save_tensors):
        host = None

    fault = parse_fault(os.environ.get("RINGBENCH_FAULT", ""), nranks)  # validated above
    fault_step = fault[1] if fault is not None and fault[0] == rank else None
    ring = engine.build(RankContext(cfg, backend, world, cuda_aware, fault_step), dev["q"], dev["k"], dev["v"], do=dev.get("do"))
    del dev
    if "bwd" in phases:
        ring.prepare_backward()  # the forward that gives O and the LSE: once, untimed
    passes = {"fwd": ring.forward, "bwd": getattr(ring, "backward", None)}  # a strategy without a backward is refused by config

    load = load_snapshot()  # how busy this host is while the passes are timed (provenance "conditions")
    shown = progress.for_run((cfg.warmup + cfg.repeat) * len(phases), cfg.warmup * len(phases), show=rank == 0 and not quiet)
    warm = {ph: [] for ph in phases}
    for _ in range(cfg.warmup):
        for ph in phases:
            warm[ph].append(shown.tick(passes[ph]()))
    reps = {ph: [] for ph in phases}
    for _ in range(cfg.repeat):  # each repeat: the forward, then the backward (fwd+bwd)
        for ph in phases:
            comm.barrier()
            reps[ph].append(shown.tick(passes[ph]()))
    shown.close()
    alone = {ph: [] for ph in phases}
    if nranks > 1:
        for ph in phases:
            for _ in range(cfg.repeat):
                comm.barrier()
                alone[ph].append(ring.comm_only(ph))
    load = load_interval(load)
    output = backend.asnumpy(ring.output())
    grads = tuple(backend.asnumpy(x) for x in ring.grads()) if "bwd" in phases else None

    checks = {}
    if cfg.check:
        if "fwd" in phases:
            checks["fwd"] = check.forward_errors(cfg, host, output, pos)
        if "bwd" in phases:
            checks["bwd"] = check.backward_errors(cfg, host, grads, pos)
    local = {
        "phases": {
            ph: {
                "samples": _stack(reps[ph], ""),
                "warmup": _stack(warm[ph], "warmup_"),
                "comm_only": np.array(alone[ph]).reshape(len(alone[ph]), -1) if alone[ph] else np.zeros((0, _comm_only_steps(ph, nranks))),
                "check": checks.get(ph),
            }
            for ph in phases
        },
        "host": socket.gethostname(),
        "device": backend.device_name,
        "peak_rss": peak_rss_bytes(),  # --check included (it ran above)
        "baseline_rss": baseline_rss,
        "pool": backend.device_pool_bytes(),
        "tensors": (pos, host, output, grads) if cfg.save_tensors else None,
        "score_tile": ring.score_tile_elems,
        "score_tile_bwd": ring.bwd_score_tile_elems,
        "threads": thread_pools(),
        "load": load,
    }
    parts = comm.gather(local)
    if rank != 0:
        return 0
    return _finish(cfg, parts, nranks, backend, cuda_aware, ring, out, quiet)


def reset_peak_rss(clear_refs: str = "/proc/self/clear_refs") -> bool:
    """Reset this process's peak RSS (Linux's high-water mark, which ``peak_rss_bytes`` reads) to its RSS now, so
    that a later peak counts only what came after: without it, a transient before the baseline (imports, numba
    compiling, rank 0's measurement of the exponential) that was freed again would be counted as the run's memory.
    False where the kernel offers no reset (not Linux, or /proc read-only): the peak is then the process's."""
    try:
        with open(clear_refs, "w") as f:
            f.write("5")  # 5: reset the peak RSS only (proc(5)); page flags are left alone
    except OSError:
        return False
    return True


def _comm_only_steps(phase: str, nranks: int) -> int:
    """Steps of a comm-only pass: P-1 K/V hops (fwd); P steps, the last with the dK/dV hop home (bwd)."""
    if nranks == 1:
        return 0
    return nranks - 1 if phase == "fwd" else nranks


def _validate(cfg: RunConfig, out: str | None, nranks: int) -> str | None:
    problems = validate(cfg, nranks)
    if problems:
        key, msg = problems[0]
        return f"{option_name(key)}: {msg}"
    try:
        parse_fault(os.environ.get("RINGBENCH_FAULT", ""), nranks)
    except ValueError as exc:
        return str(exc)
    if out is not None and comm.WORLD.rank == 0:
        why = store.check_writable(out)
        if why:
            return f"--out: cannot write {out}: {why}"
    return None


# ---------------------------------------------------------------------------------------------
# Will it fit? Each rank's peak memory, estimated before anything big is allocated
# ---------------------------------------------------------------------------------------------
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
    staging = (nranks + 1 if cfg.mode == "allgather" else 2) * 2 * kve * s if not _cuda_aware(cfg, backend) else 0
    host = RANK_OVERHEAD + max(gen, inputs + staging, keep + staging + s * qe + max(after))
    return host, max(build, ring + output)


def _memory_problem(cfg: RunConfig, nranks: int, rank: int, backend) -> str | None:
    """Collective: why this run cannot fit in memory (one line, with the estimate and what is available), or None."""
    if cfg.memory_limit == "none":
        return None
    mkl = isinstance(backend.matmul(cfg.blas)[0], MklMatmul)
    host, device = memory_estimate(cfg, nranks, rank, backend, mkl)
    hint = "use more ranks or a smaller problem, or set --memory-limit (a size, or none to skip this check)"
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


def _cuda_aware(cfg: RunConfig, backend) -> bool:
    if not backend.is_gpu:
        return False
    if cfg.cuda_aware == "auto":
        return comm.detect_cuda_aware()
    return cfg.cuda_aware == "yes"


def _stack(passes, prefix: str) -> dict:
    names = ("compute_s", "comm_s", "step_s")
    out = {prefix + n: np.array([p[i] for p in passes]) for i, n in enumerate(names)}
    out[prefix + "total_s"] = np.array([p[3] for p in passes])
    return out


def _phase(cfg, parts, nranks, phase: str, bytes_per_rank: int) -> store.Phase:
    """One timed phase's samples (R, P, ...), summary and check, from every rank's part."""
    got = [p["phases"][phase] for p in parts]
    samples = {}
    for key in got[0]["samples"]:
        samples[key] = np.stack([g["samples"][key] for g in got], axis=1)  # (R, P, ...)
    for key in got[0]["warmup"]:
        samples[key] = np.stack([g["warmup"][key] for g in got], axis=1)
    samples["comm_only_s"] = np.stack([g["comm_only"] for g in got], axis=1)  # (C, P, steps)
    pairs = unmasked_pairs(cfg.layout, nranks, cfg.seq_len, cfg.causal)
    flops = backward.phase_flops(phase, cfg.batch, cfg.heads, cfg.head_dim, pairs)  # backward: 2.5 x forward
    summary = measure.summarize(samples, flops=flops, bytes_per_rank=bytes_per_rank, unmasked_pairs=pairs)
    check_res = check.summary(cfg, [g["check"] for g in got], phase) if cfg.check else {}
    return store.Phase(samples=samples, summary=summary, check=check_res)


def _finish(cfg, parts, nranks, backend, cuda_aware, ring, out, quiet) -> int:
    """Rank 0: the run record from the gathered parts (assemble), stored in ``out`` and printed (format_summary)."""
    spread = {ph: repeat_spread(np.max([p["phases"][ph]["samples"]["total_s"] for p in parts], axis=0)) for ph in cfg.phases}
    prov = provenance(parts, backend, cuda_aware, ring.blas, spread)  # spread: of the pass time (slowest rank) over repeats
    rec = assemble(
        cfg,
        parts,
        nranks,
        prov,
        traffic={ph: ring.bytes_per_rank(ph) for ph in cfg.phases},  # each engine counts what it sends
        itemsize=np.dtype(ring.storage).itemsize,
        compute_itemsize=ring.compute.itemsize,
    )
    rec.memory["peak_rss_bytes"][0] = peak_rss_bytes()  # rank 0's with the gathered parts and global tensors in it
    phases = {ph: rec.phase(ph) for ph in cfg.phases}
    where = None
    if out is not None:
        try:
            where = f"{out}:/runs/{store.append(out, rec)}"
        except (OSError, store.SchemaError) as exc:  # a full disk, a quota, the file replaced meanwhile
            raise UserError(f"--out: cannot write {out}: {store.write_error(out, exc)}") from None
    if not quiet:
        print(format_summary(cfg, nranks, phases, rec.memory, prov, where))
    return 1 if any(ph.check and not ph.check["passed"] for ph in phases.values()) else 0


def assemble(cfg, parts: list, nranks: int, prov: dict, *, traffic: dict, itemsize: int, compute_itemsize: int) -> store.Run:
    """The run record from every rank's gathered part (what ``run`` gathers), the provenance and what the ring
    reports: ``traffic`` {phase: bytes per rank per pass}, the storage and compute dtypes' ``itemsize``.

    Pure: no MPI, no printing, no file I/O (``_finish`` stores and prints it).
    """
    phases = {ph: _phase(cfg, parts, nranks, ph, traffic[ph]) for ph in cfg.phases}
    shape = dict(
        batch=cfg.batch,
        local_q=cfg.seq_len // nranks,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads_resolved,
        head_dim=cfg.head_dim,
        itemsize=itemsize,
        compute_itemsize=compute_itemsize,
    )
    memory = {
        "peak_rss_bytes": np.array([p["peak_rss"] for p in parts]),
        "baseline_rss_bytes": np.array([p["baseline_rss"] for p in parts]),
        "device_pool_bytes": np.array([p["pool"] for p in parts]),
        "theoretical_bytes": measure.theoretical_bytes(**shape, score_tile_elems=parts[0]["score_tile"]),
    }
    if "bwd" in phases:
        memory["theoretical_bwd_bytes"] = measure.theoretical_bwd_bytes(**shape, score_tile_elems=parts[0]["score_tile_bwd"])
    tensors = _global_tensors(cfg, parts) if cfg.save_tensors else {}
    fwd = phases.get("fwd", store.Phase())
    return store.Run(
        point_id=point_id(cfg, nranks),
        nranks=nranks,
        config=cfg.to_dict(),
        provenance=prov,
        samples=fwd.samples,
        summary=fwd.summary,
        memory=memory,
        check=fwd.check,
        tensors=tensors,
        created_utc=prov["utc"],
        bwd=phases.get("bwd"),
    )


def _global_tensors(cfg, parts) -> dict:
    """q, k, v, out (and do, dq, dk, dv with a backward) in global token order."""
    hk = cfg.kv_heads_resolved
    shapes = {"q": cfg.heads, "k": hk, "v": hk, "out": cfg.heads}
    if "bwd" in cfg.phases:
        shapes.update(do=cfg.heads, dq=cfg.heads, dk=hk, dv=hk)
    first = parts[0]["tensors"][1]["q"]
    out = {k: np.empty((cfg.batch, cfg.seq_len, h, cfg.head_dim), first.dtype) for k, h in shapes.items()}
    for p in parts:
        pos, host, o, grads = p["tensors"]
        for k in host:
            out[k][:, pos] = host[k]
        out["out"][:, pos] = o
        for k, g in zip(check.GRADS, grads or ()):
            out[k][:, pos] = g
    if first.dtype.kind == "V" or str(first.dtype) == "bfloat16":  # h5py cannot store bfloat16: widen
        out = {k: v.astype(np.float32) for k, v in out.items()}
    return out


def provenance(parts, backend, cuda_aware: bool, blas: str, spread: dict | None = None) -> dict:
    """The run's (or probe's) provenance from the gathered per-rank parts: ringbench.provenance plus MPI and the backend;
    with each part's ``load`` (provenance.load_interval), the measurement's conditions (and the ``spread`` of its repeats)."""
    limit, set_by = thread_limit()
    info = {
        **versions(),
        "git_commit": git_commit(),
        "hosts": sorted({p["host"] for p in parts}),
        "rank_hosts": [p["host"] for p in parts],
        "devices": [p["device"] for p in parts],
        "backend": backend.name,
        "cuda_aware": bool(cuda_aware),
        "blas": blas,
        "utc": utc_now(),
        "argv": argv(),
        "threads": {"limit": limit, "set_by": set_by, "ranks": [p.get("threads", []) for p in parts]},
        "exp": os.environ.get(kernel.EXP_ENV, ""),  # the kernel's exponential: 2, e or fused (one for every rank)
    }
    if all("load" in p for p in parts):  # how busy each host was, for report, plot and advise (provenance.loaded)
        info["conditions"] = conditions([p["load"] for p in parts], spread or {})
    info.update(comm.mpi_info())
    info.update(backend.versions())
    return info


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def format_summary(cfg, nranks, phases: dict, memory, prov, where) -> str:
    hk = cfg.kv_heads_resolved
    lines = [
        f"ringbench run: {cfg.mode} {cfg.layout}{' causal' if cfg.causal else ''} {cfg.dtype} "
        f"N={cfg.seq_len} P={nranks} B={cfg.batch} H={cfg.heads}/{hk} D={cfg.head_dim} pass {cfg.pass_} "
        f"[{cfg.backend}, {prov['mpi_library']}]",
    ]
    titled = cfg.pass_ != "fwd"  # a forward-only run prints as before
    ind = "    " if titled else "  "
    for name, ph in phases.items():
        s, chk = ph.summary, ph.check
        if titled:
            lines.append(f"  {'forward' if name == 'fwd' else 'backward'}:")
        lines += [
            f"{ind}time {_ms(s['time_s'])} (median of {cfg.repeat}; min {_ms(s['time_min_s'])}, max {_ms(s['time_max_s'])})"
            f"   {s['tflops']:.3f} TFLOP/s",
            f"{ind}compute {_ms(s['compute_s'])}   exposed comm {_ms(s['exposed_comm_s'])}   comm alone "
            f"{_ms(s['comm_alone_s'])}   overlap {_pct(s['overlap_eff'])}   link {s['bandwidth_gbps']:.2f} GB/s   "
            f"imbalance {_pct(s['imbalance'])}",
        ]
        if chk and name == "fwd":
            lines.append(
                f"{ind}check vs float64: max abs err {chk['max_abs_err']:.2e}, rel {chk['rel_err']:.2e} "
                f"(tol {chk['tol']:.0e}) {'ok' if chk['passed'] else 'FAILED'}"
            )
        elif chk:
            errs = ", ".join(f"{n} {chk[n + '_rel_err']:.2e}" for n in check.GRADS)
            lines.append(f"{ind}check vs float64 gradients: rel err {errs} (tol {chk['tol']:.0e}) {'ok' if chk['passed'] else 'FAILED'}")
    theo = f"theoretical minimum {memory['theoretical_bytes'] / 2**20:.1f} MiB/rank"
    if "theoretical_bwd_bytes" in memory:
        theo += f" (forward), {memory['theoretical_bwd_bytes'] / 2**20:.1f} MiB/rank (backward)"
    lines.append(
        f"  peak RSS {max(memory['peak_rss_bytes']) / 2**20:.0f} MiB/rank "
        f"({max(memory['peak_rss_bytes'] - memory['baseline_rss_bytes']) / 2**20:.1f} MiB above the interpreter "
        f"and libraries{', --check included' if cfg.check else ''})   {theo}"
    )
    if loaded(prov.get("conditions")):
        lines.append(f"  warning: measured on a loaded machine ({loaded(prov['conditions'])}): its times include the load")
    if where:
        lines.append(f"  saved {where}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"
