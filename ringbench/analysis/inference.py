"""What stored serving runs mean (``--pass prefill``, ``--pass decode``): their tables in the report, the winners, and the
simple model of both. Pure: rows in (ringbench.analysis.results), text and numbers out.

The model (docs/model.md, "Serving passes"), built from the training model's terms (ringbench.analysis.model):

* prefill: bulk-synchronous steps, each as long as its busiest rank (:func:`prefill_steps`): the rank's pieces of
  ringbench.layout.prefill_plan timed per piece (:func:`prefill_class_seconds`), with the strategy's transfers:
  pass-KV P - 1 K/V blocks of N / P tokens x 2 H_kv D storage bytes behind the compute; all-gather the P blocks first;
  pass-Q (model._pass_q's schedule) P - 1 query blocks of T / P tokens x H D storage bytes and P - 1 partials of
  T / P tokens x H (D + 1) compute bytes returning home, the loads and merges at the copy rate. Meta's rule
  (context-parallel inference, 2024): pass-KV when T / (T + C) > 2 H_kv / H (or when its transfer is hidden behind
  the compute anyway), pass-Q below: :func:`prefill_rule`.
* pieces: every piece through model.Calibration.pieces_seconds: a schema-4 probe's per-call fit prices those the square
  tables miss (decode's t x N / P pieces per head and sequence, T / P new queries against the cached keys); the merges
  of partials (decode's, pass-Q's returns) at the probe's timed merges (Calibration.merge_seconds), else at the copy rate.
* decode, one step: the partial over N / P keys, at least the time to read the shard (:func:`decode_compute_s`), then
  the merge (:func:`decode_merge_s`): ring P - 1 sequential hops of one partial [O | LSE] (B t H (D + 1) compute
  bytes); tree two all-reduces of ceil(log2 P) rounds each; gather one round in which rank 0 receives P - 1 partials.
* ``machine`` (``advise --machine``, model.Machine): the links by node boundary and the collectives, as the training
  advice uses them; a preset's GPU comes as its calibration (model.DeviceCalibration: each piece one kernel call).
"""

from __future__ import annotations

import math

import numpy as np

from ringbench.analysis import model, results
from ringbench.kernels.kernel import flops as kflops
from ringbench.layout import FULL, Piece, prefill_plan

SERVING = ("prefill", "decode")
PASS_KV = ("overlap", "blocking")  # the ring modes are pass-KV


def serving_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("phase") in SERVING and r.get("status") == "ok" and r.get("time_s") is not None]


def prefill_rule(new_tokens: int, cached_tokens: int, heads: int, kv_heads: int) -> str:
    """Meta's rule: 'pass-kv' when the new fraction T / (T + C) exceeds 2 H_kv / H, else 'pass-q'."""
    frac = new_tokens / (new_tokens + cached_tokens)
    return "pass-kv" if frac > 2 * kv_heads / heads else "pass-q"


def prefill_bytes(r: dict, itemsize: int, compute_itemsize: int) -> dict:
    """Bytes a rank sends in one prefill, per strategy (pass-kv, pass-q, allgather) of row or config ``r``."""
    P, n, c = r["nranks"], r["seq_len"], r.get("cached_tokens") or 0
    t = n - c
    b, h, hk, d = r["batch"], r["heads"], r["kv_heads"], r["head_dim"]
    kv = (P - 1) * b * (n // P) * 2 * hk * d * itemsize
    q = (P - 1) * b * (t // P) * h * (d * itemsize + (d + 1) * compute_itemsize)
    return {"pass-kv": kv, "pass-q": q, "allgather": kv}


def _label(r: dict) -> str:
    return "pass-kv" if r["mode"] in PASS_KV else r["mode"]


def _times_by(rs: list[dict], keys: tuple, column) -> dict:
    """{(row[k] for k in keys): {column(row): [time_s, ...]}}: the rows' times grouped by configuration and column."""
    groups: dict = {}
    for r in rs:
        key = tuple(results.value(r, k) for k in keys)  # a key the row lacks: its value before it existed
        groups.setdefault(key, {}).setdefault(column(r), []).append(r["time_s"])
    return groups


def prefill_text(rows: list[dict], table, cal=None) -> str | None:
    """Prefill runs: time per strategy by cached fraction, the measured winner and Meta's rule's."""
    rs = [r for r in serving_rows(rows) if r["phase"] == "prefill"]
    if not rs:
        return None
    keys = ("layout", "dtype", "batch", "heads", "kv_heads", "head_dim", "nranks", "seq_len", "cached_tokens")
    groups = _times_by(rs, keys, lambda r: r["mode"])
    modes = sorted({m for g in groups.values() for m in g})
    body, agree, decided = [], 0, 0
    for key in sorted(groups):
        layout, dtype, b, h, hk, d, P, n, c = key
        times = {m: sorted(v)[len(v) // 2] for m, v in groups[key].items()}
        best = min(times, key=times.get)
        rule = prefill_rule(n - c, c, h, hk)
        measured = "pass-kv" if best in PASS_KV else best
        if measured in ("pass-kv", "pass-q"):
            decided += 1
            agree += measured == rule
        model_cells = []
        if cal is not None:
            w = dict(nranks=P, seq_len=n, cached_tokens=c, batch=b, heads=h, kv_heads=hk, head_dim=d, dtype=dtype, layout=layout)
            pred = predict_prefill(w, cal)
            names = {"pass-kv" if m in PASS_KV else m for m in times} & set(pred)
            model_cells = [f"{pred[_label({'mode': m})] * 1e3:.2f}" if m in times else "-" for m in modes]
            model_cells.append(min(sorted(names), key=pred.get) if names else "-")
        body.append(
            [f"{layout} {dtype} B={b} H={h}/{hk} D={d}", str(P), str(n), f"{c / n:.2f}"]
            + [f"{times[m] * 1e3:.2f}" if m in times else "-" for m in modes]
            + [best, rule]
            + model_cells
        )
    head = ["shape", "P", "N", "cached"] + [f"{m} ms" for m in modes] + ["measured best", "rule (T/(T+C) > 2 H_kv/H)"]
    head += [f"model {m} ms" for m in modes] + ["model best"] if cal is not None else []
    lines = ["prefill against a KV cache: time per strategy (overlap, blocking: pass-KV) by cached fraction C / N", table(head, body)]
    if decided:
        lines.append(f"Meta's rule names the measured best of pass-KV and pass-Q at {agree} of {decided} points")
    return "\n".join(lines)


def decode_text(rows: list[dict], table, cal=None) -> str | None:
    """Decode runs: step time in microseconds per merge, by P and B."""
    rs = [r for r in serving_rows(rows) if r["phase"] == "decode"]
    if not rs:
        return None
    keys = ("layout", "dtype", "heads", "kv_heads", "head_dim", "seq_len", "new_tokens", "nranks", "batch")
    groups = _times_by(rs, keys, lambda r: r.get("merge") or "tree")
    merges = [m for m in ("ring", "tree", "gather") if any(m in g for g in groups.values())]
    body = []
    for key in sorted(groups):
        layout, dtype, h, hk, d, n, t, P, b = key
        times = {m: sorted(v)[len(v) // 2] for m, v in groups[key].items()}
        model_cells = []
        if cal is not None:
            w = dict(nranks=P, seq_len=n, new_tokens=t, batch=b, heads=h, kv_heads=hk, head_dim=d, dtype=dtype, layout=layout)
            pred = predict_decode(w, cal)
            model_cells = [f"{pred[m] * 1e6:.0f}" if m in times else "-" for m in merges]
        body.append(
            [f"{layout} {dtype} H={h}/{hk} D={d}", str(n), str(t), str(P), str(b)]
            + [f"{times[m] * 1e6:.0f}" if m in times else "-" for m in merges]
            + [min(times, key=times.get)]
            + model_cells
        )
    head = ["shape", "N", "t", "P", "B"] + [f"{m} us" for m in merges] + ["fastest"]
    head += [f"model {m} us" for m in merges] if cal is not None else []
    return "\n".join(["decode with a sharded KV cache: one step's time per merge (microseconds)", table(head, body)])


def serving_text(rows: list[dict], table, cal=None) -> str | None:
    """The report's section on serving runs (None without any); ``table(header, body)`` formats a table (report.table);
    with a calibration (model.Calibration) the model's winner (prefill) and times (decode) beside the measured."""
    parts = [t for t in (prefill_text(rows, table, cal), decode_text(rows, table, cal)) if t]
    return "\n\n".join(parts) if parts else None


# what the model predicts: `ringbench advise --pass prefill|decode` -----------------------------------------------------
ITEMSIZE = model.ITEMSIZE
PREFILL = ("pass-kv", "pass-q", "allgather")
MERGES = ("ring", "tree", "gather")


def _shape(w: dict, nranks: int) -> model.Shape:
    hk = w.get("kv_heads") or w["heads"]
    return model.Shape(
        nranks=nranks,
        seq_len=w["seq_len"],
        batch=w["batch"],
        heads=w["heads"],
        kv_heads=hk,
        head_dim=w["head_dim"],
        dtype=w["dtype"],
        causal=True,
        layout=w.get("layout") or "contiguous",
    )


def prefill_class_seconds(w: dict, cal) -> dict:
    """{SAME, BELOW, ABOVE: compute seconds of one prefill step of that class} (model.class_plans' classes: the K/V
    block's rank is the query rank, below it or above it): the pieces of :func:`ringbench.layout.prefill_plan` timed
    as the training model times a ring step's (model.pieces_seconds: each piece at the probe's rate of its own size,
    masked ones at the diagonal blocks' rate, a preset's device per kernel call; or one rate fitted to runs, keyed by
    the block of N / P keys by T / P queries). The new tokens' small pieces (T / P queries, their causal corner) are
    slow per FLOP: the probe's smallest blocks give their rate (serving_bench probes blocks down to 32 tokens)."""
    P, n, c = w["nranks"], w["seq_len"], w.get("cached_tokens") or 0
    shape = _shape(w, P)
    nn, nc = (n - c) // P, c // P
    key = kflops(shape.batch, shape.heads, shape.head_dim, (n // P) * nn)
    plans = {model.SAME: prefill_plan(shape.layout, 0, 0, P, nn, nc)}
    if P > 1:
        plans[model.BELOW] = prefill_plan(shape.layout, 1, 0, P, nn, nc)
        plans[model.ABOVE] = prefill_plan(shape.layout, 0, 1, P, nn, nc)
    return {k: model.pieces_seconds(v, cal, shape, shape.heads, "fwd", key) for k, v in plans.items()}


def prefill_steps(w: dict, cal, machine=None) -> dict:
    """{strategy: (P,) or (P + 1,) predicted step seconds} of a prefill (module docstring): bulk-synchronous, each step
    as long as its busiest rank (model.busiest of :func:`prefill_class_seconds`), with the strategy's transfers."""
    P = w["nranks"]
    shape = _shape(w, P)
    b, h, hk, d, s = shape.batch, shape.heads, shape.kv_heads, shape.head_dim, ITEMSIZE[shape.dtype]
    cs = model.ACC_ITEMSIZE[shape.dtype]
    n, c = w["seq_len"], w.get("cached_tokens") or 0
    nn, nk = (n - c) // P, n // P
    busy = model.busiest(prefill_class_seconds(w, cal), P)  # (P,) the busiest rank's compute per step
    lat, bw = model.ring_link(cal, machine, P, 1)
    block = 2 * b * nk * hk * d * s  # a K/V block of cached and new tokens
    sends = np.where(np.arange(P) < P - 1, model.comm_time(block, lat, bw), 0.0) if P > 1 else np.zeros(P)
    kv_busy = model.overlapped(busy, sends, cal)
    out = {"pass-kv": np.maximum(kv_busy, sends)}
    gather = busy.copy()
    gather[0] += model.allgather_time(block, P, cal, machine)
    out["allgather"] = gather
    # pass-Q (model._pass_q's schedule): steps 0..P-1 compute the visiting queries against the local block, the next
    # query block travels meanwhile (s < P - 1) and the previous step's partial returns home (2 <= s <= P); the
    # queries' loads into the softmax state and the returned partials' merges at the probe's copy rate.
    rows = b * nn * h
    q_block, part = rows * d * s, rows * (d + 1) * cs
    per_step = cal.copy_seconds(2 * (model.LOAD_PASSES + 2) * rows * d * cs, P)
    per_return = cal.merge_seconds(rows * (d + 1), P, cs)  # a probe's timed merges (schema 4), else passes at the copy rate
    q_busy = np.zeros(P + 1)
    q_busy[:P] = busy + per_step
    q_busy[2:] += per_return
    steps = np.arange(P + 1)
    tq, tr = model.comm_time(q_block, lat, bw), model.comm_time(part, lat, bw)
    comm = np.where(steps < P - 1, tq, 0.0) + np.where((steps >= 2) & (steps <= P), tr, 0.0) if P > 1 else np.zeros(P + 1)
    out["pass-q"] = np.maximum(q_busy, comm)
    return out


def predict_prefill(w: dict, cal, machine=None) -> dict:
    """Predicted seconds per prefill strategy (pass-kv, pass-q, allgather) of workload ``w`` (a row-like dict: nranks,
    seq_len, cached_tokens, batch, heads, kv_heads, head_dim, dtype, layout) with calibration ``cal``
    (model.Calibration, or a preset's model.DeviceCalibration) and, optionally, the machine (model.Machine: its links
    by node boundary and collectives, as the training model uses them): the sum of :func:`prefill_steps`."""
    return {k: float(v.sum()) for k, v in prefill_steps(w, cal, machine).items()}


def decode_compute_s(w: dict, cal) -> float:
    """Seconds of one rank's partial over its shard: t queries against N / P keys (all visible but the new tokens'
    causal corner, which a contiguous shard's last rank masks), as one kernel call (model.pieces_seconds), and at
    least the time to read the shard's K and V once at the calibration's memory rate (a probe's copy rate, a preset's
    HBM bandwidth): with few queries per key a decode step is bound by reading its KV cache, not by its FLOPs."""
    P = w["nranks"]
    shape = _shape(w, P)
    t, nk = w.get("new_tokens") or 1, w["seq_len"] // P
    key = kflops(shape.batch, shape.heads, shape.head_dim, t * nk)
    flops_s = model.pieces_seconds([Piece(0, t, 0, nk, FULL)], cal, shape, shape.heads, "fwd", key)
    kv_bytes = 2 * shape.batch * nk * shape.kv_heads * shape.head_dim * ITEMSIZE[shape.dtype]
    return max(flops_s, cal.copy_seconds(kv_bytes, P))


def decode_merge_s(w: dict, cal, machine=None) -> dict:
    """{merge: seconds of the merge of one decode step}: the partial [O | LSE] is B t H (D + 1) compute-dtype bytes;
    ring: P - 1 sequential hops, each followed by a merge; tree: an all-reduce (recursive doubling, ceil(log2 P)
    rounds) of the LSE's max, then of the weighted [O w | w]; gather: rank 0 receives P - 1 partials, then merges
    them. Hops on the ring's link (with a machine: intra-node while the P ranks fit a node, else inter-node)."""
    P = w["nranks"]
    if P == 1:
        return {m: 0.0 for m in MERGES}
    shape = _shape(w, P)
    t, cs = w.get("new_tokens") or 1, model.ACC_ITEMSIZE[shape.dtype]
    rows = shape.batch * t * shape.heads
    partial = rows * (shape.head_dim + 1) * cs
    lat, bw = model.ring_link(cal, machine, P, 1)
    merge = cal.merge_seconds(rows * (shape.head_dim + 1), P, cs)  # a probe's timed merges (schema 4), else the copy rate
    rounds = math.ceil(math.log2(P))
    return {
        "ring": (P - 1) * (model.comm_time(partial, lat, bw) + merge),
        "tree": rounds * (model.comm_time(rows * cs, lat, bw) + model.comm_time(partial, lat, bw)) + merge,
        "gather": model.comm_time((P - 1) * partial, lat, bw) + (P - 1) * merge,
    }


def predict_decode(w: dict, cal, machine=None) -> dict:
    """Predicted seconds of one decode step per merge of workload ``w`` (nranks, seq_len, new_tokens, batch, heads,
    kv_heads, head_dim, dtype, layout): the partial (:func:`decode_compute_s`) plus the merge (:func:`decode_merge_s`)."""
    comp = decode_compute_s(w, cal)
    return {m: comp + v for m, v in decode_merge_s(w, cal, machine).items()}


def format_advice(w: dict, seq_lens: list[int], ranks: list[int], cal, table, machine=None) -> str:
    """`ringbench advise --pass prefill|decode`: the predicted time of each strategy (prefill) or merge (decode) at
    every N and P of the workload ``w``, the winner and the margin; prefill also Meta's rule's choice. ``machine``
    (``--machine``, model.Machine): its links by node boundary and collectives (a preset's device comes as ``cal``)."""
    pass_ = w["pass"]
    body = []
    names = ("pass-kv", "pass-q", "allgather") if pass_ == "prefill" else ("ring", "tree", "gather")
    for n in seq_lens:
        for P in ranks:
            row = {**w, "seq_len": n, "nranks": P}
            if pass_ == "prefill" and not (0 <= (w.get("cached_tokens") or 0) < n):
                body.append([str(n), str(P)] + ["-"] * len(names) + ["refused: --cached-tokens must be below N", ""])
                continue
            times = predict_prefill(row, cal, machine) if pass_ == "prefill" else predict_decode(row, cal, machine)
            order = sorted(names, key=lambda k: times[k])
            margin = times[order[1]] / times[order[0]] if times[order[0]] > 0 else math.nan
            scale, unit = (1e3, "ms") if pass_ == "prefill" else (1e6, "us")
            extra = [prefill_rule(n - w["cached_tokens"], w["cached_tokens"], w["heads"], w["kv_heads"])] if pass_ == "prefill" else []
            body.append([str(n), str(P)] + [f"{times[k] * scale:.3f}" for k in names] + [order[0], f"{margin:.2f}x"] + extra)
    unit = "ms" if pass_ == "prefill" else "us"
    head = ["N", "P"] + [f"{k} {unit}" for k in names] + ["winner", "margin"] + (["Meta's rule"] if pass_ == "prefill" else [])
    shape = f"(B={w['batch']} H={w['heads']}/{w['kv_heads']} D={w['head_dim']} {w['dtype']})"
    if pass_ == "prefill":
        title = f"prefill against a KV cache of {w['cached_tokens']} tokens {shape}"
    else:
        title = f"one decode step, {w.get('new_tokens') or 1} new token(s) per sequence {shape}"
    where = f"; machine: {machine.source}" if machine is not None else ""
    notes = f"calibration: {cal.source}{where}; the model: docs/model.md (serving passes)"
    return "\n".join([title, table(head, body), notes])
