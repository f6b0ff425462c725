"""One ring-attention run across the MPI ranks: set up, warm up, repeat, check, gather, store.

Called by ``ringbench run`` on every rank. User errors are agreed on collectively (every rank exits
with status 2 and rank 0 prints one line); any other exception aborts the whole job.
"""

from __future__ import annotations

import os

import numpy as np

from ringbench import store
from ringbench.config import RunConfig, UserError, option_name, validate
from ringbench.engine import api as engine
from ringbench.engine import comm, serving
from ringbench.engine.api import RankContext
from ringbench.engine.backend import (
    BackendError,
    current_rss_bytes,
    get_backend,
    limit_threads,
    peak_rss_bytes,
)
from ringbench.engine.hybrid import degree
from ringbench.engine.ring import parse_fault
from ringbench.harness import check, inputs, memory, nodes, progress, record
from ringbench.kernels import kernel
from ringbench.kernels.torch_kernel import unavailable
from ringbench.provenance import (
    load_interval,
    load_snapshot,
    repeat_spread,
)


def run(cfg: RunConfig, out: str | None = None, quiet: bool = False) -> int:
    # the ranks in node-major order (comm.node_major: the world's order when each node holds consecutive ranks): the
    # ring, hybrid's groups and the layout's positions follow it, so a group of U = ranks per node is one node
    world = comm.node_major(comm.WORLD)
    rank, nranks = world.rank, world.size
    node_ids, node_hosts = comm.node_map(comm.WORLD)
    world_ranks = world.allgather(comm.WORLD.rank)
    node_of = [node_ids[w] for w in world_ranks]  # the node of each position
    err = _validate(cfg, out, nranks) or nodes.layout_problem(cfg.mode, cfg.ulysses_degree, cfg.ulysses_groups, node_of)
    err = comm.first_error(err)
    if err:
        raise UserError(err)
    try:
        backend = get_backend(cfg.backend)
        dtype = backend.dtype(cfg.dtype)
        backend.matmul(cfg.blas)
        limit_threads()  # after the GEMM library is loaded: its pool is limited too
        err = unavailable(
            cfg.kernel, backend, cfg.dtype, backward="bwd" in cfg.phases, window=bool(cfg.window)
        )  # torch / flash-attn missing, or not for this backend or dtype
    except BackendError as exc:
        err = str(exc)
    err = comm.first_error(err)
    if err:
        raise UserError(err)
    cuda_aware = memory.cuda_aware(cfg, backend)
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
    err = comm.first_error(memory.memory_problem(cfg, nranks, rank, backend))
    if err:
        raise UserError(err)

    baseline_rss = current_rss_bytes()  # interpreter + libraries, before any array of the run
    reset_peak_rss()  # the peak recorded below is the run's, not an earlier transient's (importing, compiling)
    # inputs: this rank's tokens of the global q, k, v (and dO for a backward)
    phases = cfg.phases
    names = ("q", "k", "v", "do") if "bwd" in phases else ("q", "k", "v")
    hk = cfg.kv_heads_resolved
    pos, kv_pos = serving.rank_positions(cfg, rank, nranks)  # the queries' and the K/V's tokens (the same but for prefill, decode)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    host = {
        name: inputs.tokens(
            name, cfg.seed, kv_pos if name in ("k", "v") else pos, heads=hk if name in ("k", "v") else cfg.heads, **dims
        ).astype(dtype)
        for name in names
    }
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
    sent = {}  # phase -> bytes to each WORLD rank in the first timed pass (the link classes of the node map)
    marks = {ph: [] for ph in phases}  # each pass's per-step transfer marks (ring.Ring.marks; None for other engines)
    for i in range(cfg.repeat):  # each repeat: the forward, then the backward (fwd+bwd)
        for ph in phases:
            comm.barrier()
            if i == 0:
                comm.TRAFFIC.start()
            reps[ph].append(shown.tick(passes[ph]()))
            if i == 0:
                sent[ph] = comm.TRAFFIC.stop()
            marks[ph].append(getattr(ring, "marks", None))
    shown.close()
    offset = comm.clock_offset(world)  # the marks onto rank 0's clock (collective; ~0 on one host)
    alone = {ph: [] for ph in phases}
    if nranks > 1:
        for ph in phases:
            for _ in range(cfg.repeat):
                comm.barrier()
                alone[ph].append(ring.comm_only(ph))
    load = load_interval(load)
    output = backend.asnumpy(ring.output()) if getattr(ring, "holds_output", True) else None  # decode --merge gather: rank 0
    grads = tuple(backend.asnumpy(x) for x in ring.grads()) if "bwd" in phases else None

    checks = {}
    if cfg.check:
        if "fwd" in phases:
            checks["fwd"] = check.forward_errors(cfg, host, output, pos) if output is not None else None
        if "bwd" in phases:
            checks["bwd"] = check.backward_errors(cfg, host, grads, pos)
    local = {
        "phases": {
            ph: {
                "samples": record.stack_passes(reps[ph], ""),
                "warmup": record.stack_passes(warm[ph], "warmup_"),
                "comm_only": np.array(alone[ph]).reshape(len(alone[ph]), -1) if alone[ph] else np.zeros((0, _comm_only_steps(ph, nranks))),
                "marks": record.stack_marks(marks[ph], offset),
                "check": checks.get(ph),
            }
            for ph in phases
        },
        "peak_rss": peak_rss_bytes(),  # --check included (it ran above)
        "baseline_rss": baseline_rss,
        "pool": backend.device_pool_bytes(),
        "tensors": (pos, host, output, grads) if cfg.save_tensors else None,
        "score_tile": ring.score_tile_elems,
        "score_tile_bwd": ring.bwd_score_tile_elems,
        "sent": sent,
        "kv_cache": int(ring.kv_home.nbytes) if cfg.pass_ in serving.SERVING else None,
        **record.rank_facts(backend, load),
    }
    parts = comm.gather(local, comm=world)  # in position order
    if rank != 0:
        return 0
    node_map = (node_of, node_hosts, world_ranks)
    return _finish(cfg, parts, nranks, backend, cuda_aware, ring, out, quiet, node_map)


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


def _finish(cfg, parts, nranks, backend, cuda_aware, ring, out, quiet, node_map) -> int:
    """Rank 0: the run record from the gathered parts (assemble), stored in ``out`` and printed (format_summary)."""
    spread = {ph: repeat_spread(np.max([p["phases"][ph]["samples"]["total_s"] for p in parts], axis=0)) for ph in cfg.phases}
    prov = record.provenance(parts, backend, cuda_aware, ring.blas, spread)  # spread: of the pass time (slowest rank) over repeats
    node_of, node_hosts, world_ranks = node_map
    u = degree(cfg.mode, cfg.ulysses_degree, nranks)
    sent = {ph: [p["sent"].get(ph, {}) for p in parts] for ph in cfg.phases}
    prov["nodes"] = nodes.node_record(node_of, node_hosts, world_ranks, cfg.mode, u, sent)
    rec = record.assemble(
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
        print(record.format_summary(cfg, nranks, phases, rec.memory, prov, where))
    return 1 if any(ph.check and not ph.check["passed"] for ph in phases.values()) else 0
