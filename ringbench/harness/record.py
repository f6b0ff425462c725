"""The run record: what rank 0 assembles from every rank's gathered part, and the summary ``ringbench run`` prints.

Pure: no MPI, no file I/O, no printing (the runner gathers, stores and prints). :func:`assemble` makes the
store.Run of a run from the gathered parts, the provenance and the traffic the engine reports; :func:`phase_record`
one timed phase (samples (R, P, ...), summary, check); :func:`format_summary` the lines a run prints.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ringbench import store
from ringbench.analysis import measure, model
from ringbench.config import point_id
from ringbench.engine import comm, serving
from ringbench.engine.backend import thread_limit
from ringbench.harness import check, nodes
from ringbench.kernels import backward, kernel
from ringbench.layout import balanced_chunks, unmasked_pairs
from ringbench.provenance import argv, conditions, git_commit, loaded, utc_now, versions


def stack_passes(passes, prefix: str) -> dict:
    names = ("compute_s", "comm_s", "step_s")
    out = {prefix + n: np.array([p[i] for p in passes]) for i, n in enumerate(names)}
    out[prefix + "total_s"] = np.array([p[3] for p in passes])
    return out


def stack_marks(marks: list, offset: float) -> dict | None:
    """One rank's per-pass transfer marks (ring.Ring.marks, each {key: (S, K)}) as {key: (R, S, K)} on rank 0's clock
    (this rank's ``offset`` from comm.clock_offset subtracted); None when a pass kept none (engines other than the ring)."""
    if not marks or any(m is None for m in marks):
        return None
    return {k: np.stack([m[k] for m in marks]) - offset for k in marks[0]}


def phase_record(cfg, parts, nranks, phase: str, bytes_per_rank: int) -> store.Phase:
    """One timed phase's samples (R, P, ...), summary and check, from every rank's part."""
    got = [p["phases"][phase] for p in parts]
    samples = {}
    for key in got[0]["samples"]:
        samples[key] = np.stack([g["samples"][key] for g in got], axis=1)  # (R, P, ...)
    for key in got[0]["warmup"]:
        samples[key] = np.stack([g["warmup"][key] for g in got], axis=1)
    samples["comm_only_s"] = np.stack([g["comm_only"] for g in got], axis=1)  # (C, P, steps)
    if all(g.get("marks") is not None for g in got):  # the exposed time split: partner wait / unhidden (schema 3)
        marks = {k: np.stack([g["marks"][k] for g in got], axis=1) for k in got[0]["marks"]}  # (R, P, S, K)
        alone = samples["comm_only_s"].min(axis=0) if samples["comm_only_s"].shape[0] else None  # (P, steps)
        samples["partner_wait_s"], samples["unhidden_s"] = measure.split_exposed(
            samples["comm_s"], marks["post_t"], marks["wait_start_t"], marks["wait_end_t"], alone, marks.get("post_bytes")
        )
    if cfg.pass_ in serving.SERVING:  # the new tokens' queries against the whole context
        pairs = serving.unmasked_pairs(cfg)
    else:
        shape = model.Shape.from_config(cfg.to_dict(), nranks)
        pairs = unmasked_pairs(cfg.layout, nranks, cfg.seq_len, cfg.causal, **model.mask_kw(shape))
        samples["pairs"] = model.strategy_pairs(shape)  # (P, S): the balance of the plans the strategy ran
    flops = backward.phase_flops(phase, cfg.batch, cfg.heads, cfg.head_dim, pairs)  # backward: 2.5 x forward
    summary = measure.summarize(samples, flops=flops, bytes_per_rank=bytes_per_rank, unmasked_pairs=pairs)
    check_res = check.summary(cfg, [g["check"] for g in got], phase) if cfg.check else {}
    return store.Phase(samples=samples, summary=summary, check=check_res)


def rank_facts(backend, load) -> dict:
    """What every rank's gathered part says about where it ran: host, device, thread pools, the load it saw (run and probe)."""
    import socket

    from ringbench.provenance import thread_pools

    return {"host": socket.gethostname(), "device": backend.device_name, "threads": thread_pools(), "load": load}


def assemble(cfg, parts: list, nranks: int, prov: dict, *, traffic: dict, itemsize: int, compute_itemsize: int) -> store.Run:
    """The run record from every rank's gathered part (what ``run`` gathers), the provenance and what the ring
    reports: ``traffic`` {phase: bytes per rank per pass}, the storage and compute dtypes' ``itemsize``.

    Pure: no MPI, no printing, no file I/O (``_finish`` stores and prints it).
    """
    phases = {ph: phase_record(cfg, parts, nranks, ph, traffic[ph]) for ph in cfg.phases}
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
    if parts[0].get("kv_cache") is not None:  # a serving pass: the K/V cache each rank holds, and the least it could
        memory["kv_cache_bytes"] = np.array([p["kv_cache"] for p in parts])
        memory["kv_cache_min_bytes"] = serving.kv_cache_bytes(cfg, nranks, itemsize)[1]
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
        chunks_per_rank=balanced_chunks_of(cfg, nranks),
    )


def balanced_chunks_of(cfg, nranks: int) -> int:
    """The chunks per rank the balanced layout dealt for this training run (layout.balanced_chunks of its documents,
    window and causality; schema 5's run attribute); 0 for the other layouts and the serving passes (which deal
    their cached and new tokens apart)."""
    if cfg.layout != "balanced" or cfg.pass_ in serving.SERVING:
        return 0
    return balanced_chunks(nranks, cfg.seq_len, cfg.doc_lengths, cfg.window, cfg.causal)


def _global_tensors(cfg, parts) -> dict:
    """q, k, v, out (and do, dq, dk, dv with a backward) in global token order; a serving pass: :func:`_serving_tensors`."""
    if cfg.pass_ in serving.SERVING:
        return _widen(_serving_tensors(cfg, parts))
    hk = cfg.kv_heads_resolved
    shapes = {"q": cfg.heads, "k": hk, "v": hk, "out": cfg.heads}
    if "bwd" in cfg.phases:
        shapes.update(do=cfg.heads, dq=cfg.heads, dk=hk, dv=hk)
    first = parts[0]["tensors"][1]["q"]
    out = {k: np.empty((cfg.batch, cfg.seq_len, h, cfg.head_dim), first.dtype) for k, h in shapes.items()}
    for p in parts:
        pos, host, o, grads = p["tensors"][:4]
        for k in host:
            out[k][:, pos] = host[k]
        out["out"][:, pos] = o
        for k, g in zip(check.GRADS, grads or ()):
            out[k][:, pos] = g
    return _widen(out)


def _serving_tensors(cfg, parts) -> dict:
    """A serving pass's tensors by global position: k, v (B, N, H_kv, D) of the whole context (cached and new tokens);
    the pass's queries' positions q_pos (T,) (prefill: C .. N - 1; decode: N - t .. N - 1), and at those positions q,
    out (B, T, H, D) and lse (B, T, H), the natural-log log-sum-exp of each query's scores (scaled by 1/sqrt(D))."""
    hk, b, n, d = cfg.kv_heads_resolved, cfg.batch, cfg.seq_len, cfg.head_dim
    first = parts[0]["tensors"][1]["q"]
    q_all = np.unique(np.concatenate([p["tensors"][0] for p in parts]))  # every query position, ascending
    t = len(q_all)
    out = {"k": np.empty((b, n, hk, d), first.dtype), "v": np.empty((b, n, hk, d), first.dtype)}
    out.update(q=np.empty((b, t, cfg.heads, d), first.dtype), out=np.empty((b, t, cfg.heads, d), first.dtype))
    lse = None
    for p in parts:
        pos, host, o, _, kv_pos, rank_lse = p["tensors"]
        rows = np.searchsorted(q_all, pos)
        out["k"][:, kv_pos], out["v"][:, kv_pos] = host["k"], host["v"]
        out["q"][:, rows] = host["q"]
        if o is not None:  # decode --merge gather: only rank 0 holds the output (of every query)
            out["out"][:, rows] = o
            if lse is None:
                lse = np.empty((b, t, cfg.heads), rank_lse.dtype)
            lse[:, rows] = rank_lse
    out["lse"], out["q_pos"] = lse, q_all.astype(np.int64)
    return out


def _widen(out: dict) -> dict:
    """h5py cannot store bfloat16: its tensors widened to float32."""
    if any(v.dtype.kind == "V" or str(v.dtype) == "bfloat16" for v in out.values()):
        return {k: v.astype(np.float32) if v.dtype.kind == "V" or str(v.dtype) == "bfloat16" else v for k, v in out.items()}
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
        if cfg.pass_ in serving.SERVING:
            lines.append(_serving_line(cfg, nranks, s))
        elif titled:
            lines.append(f"  {'forward' if name == 'fwd' else 'backward'}:")
        lines += [
            f"{ind}time {_ms(s['time_s'])} (median of {cfg.repeat}; min {_ms(s['time_min_s'])}, max {_ms(s['time_max_s'])})"
            f"   {s['tflops']:.3f} TFLOP/s",
            f"{ind}compute {_ms(s['compute_s'])}   exposed comm {_ms(s['exposed_comm_s'])}{_split(s)}   comm alone "
            f"{_ms(s['comm_alone_s'])}   overlap {_pct(s['overlap_eff'])}   link {s['bandwidth_gbps']:.2f} GB/s   "
            f"imbalance {_pct(s['imbalance'])}",
        ]
        if not math.isnan(s.get("pairs_imbalance", math.nan)):  # the balance: of the plans, and as measured
            lines.append(
                f"{ind}load balance (max / mean over ranks): pairs {s['pairs_imbalance']:.3f}, compute {s['compute_imbalance']:.3f}"
                f"{_docs_text(cfg)}{_chunks_text(cfg, nranks)}"
            )
        steps = measure.per_step_split(ph.samples)
        if steps is not None and nranks > 1:
            shown = [_step(i, steps) for i in range(min(len(steps["alone"]), STEPS_SHOWN))]
            more = len(steps["alone"]) - len(shown)
            lines.append(f"{ind}per step (slowest rank): " + "; ".join(shown) + (f"; ... {more} more (ringbench report)" if more else ""))
        if chk and name == "fwd":
            lines.append(
                f"{ind}check vs float64: max abs err {chk['max_abs_err']:.2e}, rel {chk['rel_err']:.2e} "
                f"(tol {chk['tol']:.0e}) {'ok' if chk['passed'] else 'FAILED'}"
            )
        elif chk:
            errs = ", ".join(f"{n} {chk[n + '_rel_err']:.2e}" for n in check.GRADS)
            lines.append(f"{ind}check vs float64 gradients: rel err {errs} (tol {chk['tol']:.0e}) {'ok' if chk['passed'] else 'FAILED'}")
    theo = f"theoretical minimum {memory['theoretical_bytes'] / 2**20:.1f} MiB/rank"
    if "kv_cache_bytes" in memory:  # a serving pass: its minimum is the KV cache's (the line below)
        theo = ""
    if "theoretical_bwd_bytes" in memory:
        theo += f" (forward), {memory['theoretical_bwd_bytes'] / 2**20:.1f} MiB/rank (backward)"
    lines.append(
        f"  peak RSS {max(memory['peak_rss_bytes']) / 2**20:.0f} MiB/rank "
        f"({max(memory['peak_rss_bytes'] - memory['baseline_rss_bytes']) / 2**20:.1f} MiB above the interpreter "
        f"and libraries{', --check included' if cfg.check else ''}){'   ' + theo if theo else ''}"
    )
    node_line = nodes.format_nodes(prov.get("nodes"))
    if node_line:
        lines.append(node_line)
    if "kv_cache_bytes" in memory:
        lines.append(
            f"  KV cache {max(memory['kv_cache_bytes']) / 2**20:.3f} MiB/rank (theoretical minimum "
            f"{memory['kv_cache_min_bytes'] / 2**20:.3f} MiB/rank: the whole cache / P)"
        )
    if loaded(prov.get("conditions")):
        lines.append(f"  warning: measured on a loaded machine ({loaded(prov['conditions'])}): its times include the load")
    if where:
        lines.append(f"  saved {where}")
    return "\n".join(lines)


def _serving_line(cfg, nranks: int, s: dict) -> str:
    """The title of a serving pass's figures: what was run, and (decode) the step time in microseconds."""
    if cfg.pass_ == "prefill":
        t = cfg.seq_len - cfg.cached_tokens
        return f"  prefill: {t} new tokens against {cfg.cached_tokens} cached (cached fraction {cfg.cached_tokens / cfg.seq_len:.2f}):"
    return f"  decode step ({cfg.merge} merge, {cfg.new_tokens} new token(s) per sequence): {s['time_s'] * 1e6:.1f} us per step:"


STEPS_SHOWN = 8  # the run's summary shows the first steps' split; ringbench report shows every step


def _split(s: dict) -> str:
    """' (not hidden X, waiting for a slower rank Y)': the two parts of the exposed time, where the run has them."""
    if math.isnan(s.get("unhidden_comm_s", math.nan)):
        return ""
    return f" (not hidden {_ms(s['unhidden_comm_s'])}, waiting for a slower rank {_ms(s['partner_wait_s'])})"


def _step(i: int, steps: dict) -> str:
    hidden = steps["hidden"][i]
    head = f"{i}: " + ("no transfer" if math.isnan(hidden) else f"{_pct(hidden)} of {_ms(steps['alone'][i])} hidden")
    return head + (f", waited {_ms(steps['partner_wait'][i])} for a slower rank" if steps["partner_wait"][i] >= 5e-5 else "")


def _chunks_text(cfg, nranks: int) -> str:
    """'   balanced: 4 chunks per rank' for a balanced training run (what its deal chose), else ''."""
    k = balanced_chunks_of(cfg, nranks)
    return f"   balanced: {k} chunk{'s' if k > 1 else ''} per rank" if k else ""


def _docs_text(cfg) -> str:
    """'   (12 documents, window 256)': what shaped the mask, where documents or a window did."""
    docs, window = cfg.docs, cfg.window
    if not docs and not window:
        return ""
    what = []
    if docs:
        what.append(f"{len(cfg.doc_lengths)} documents ({docs})")
    if window:
        what.append(f"window {window}")
    return "   (" + ", ".join(what) + ")"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"
