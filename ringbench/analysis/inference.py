"""What stored serving runs mean (``--pass prefill``, ``--pass decode``): their tables in the report, the winners, and the
simple model of both. Pure: rows in (ringbench.analysis.results), text and numbers out.

The model (docs/model.md, "Serving passes"):

* prefill, per rank: pass-KV moves P - 1 K/V blocks of (C + T) / P tokens x 2 H_kv D storage bytes; pass-Q moves P - 1
  query blocks of T / P tokens x H D storage bytes and P - 1 partials of T / P tokens x H (D + 1) compute bytes. Both do
  the same arithmetic. Meta's rule (context-parallel inference, 2024): pass-KV when T / (T + C) > 2 H_kv / H (or when
  its transfer is hidden behind the compute anyway), pass-Q below: :func:`prefill_rule`. With a link (alpha, beta)
  and the compute time the exposed transfer of each is max(0, hops (alpha + bytes / beta) - compute): :func:`prefill_times`.
* decode, one step: the partial over N / P keys, then the merge: ring P - 1 sequential hops of one partial
  [O | LSE] (B t H (D + 1) compute bytes); tree two all-reduces of ceil(log2 P) rounds each; gather one round in which
  rank 0 receives P - 1 partials: :func:`decode_times`.
"""

from __future__ import annotations

import math

from ringbench.analysis import results

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


def prefill_times(r: dict, compute_s: float, alpha: float, bandwidth: float, itemsize: int, compute_itemsize: int) -> dict:
    """Predicted prefill seconds per strategy: the compute plus the exposed part of the P - 1 transfers (allgather: all
    of it, nothing overlaps)."""
    P = r["nranks"]
    out = {}
    for name, nbytes in prefill_bytes(r, itemsize, compute_itemsize).items():
        comm = (P - 1) * alpha + nbytes / bandwidth if P > 1 else 0.0
        out[name] = compute_s + (comm if name == "allgather" else max(0.0, comm - compute_s))
    return out


def decode_times(nranks: int, partial_bytes: int, compute_s: float, alpha: float, bandwidth: float) -> dict:
    """Predicted seconds of one decode step per merge: the partial's compute plus the merge's latency and bytes."""
    P = nranks
    if P == 1:
        return {m: compute_s for m in ("ring", "tree", "gather")}
    hop = alpha + partial_bytes / bandwidth
    rounds = math.ceil(math.log2(P))
    return {
        "ring": compute_s + (P - 1) * hop,
        "tree": compute_s + 2 * rounds * alpha + rounds * partial_bytes * (1 + 1 / 8) / bandwidth,
        "gather": compute_s + alpha + (P - 1) * partial_bytes / bandwidth,
    }


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
            model_cells = [min(sorted(names), key=pred.get) if names else "-"]
        body.append(
            [f"{layout} {dtype} B={b} H={h}/{hk} D={d}", str(P), str(n), f"{c / n:.2f}"]
            + [f"{times[m] * 1e3:.2f}" if m in times else "-" for m in modes]
            + [best, rule]
            + model_cells
        )
    head = ["shape", "P", "N", "cached"] + [f"{m} ms" for m in modes] + ["measured best", "rule (T/(T+C) > 2 H_kv/H)"]
    head += ["model best"] if cal is not None else []
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
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _compute_s(cal, flops: float, block_flops: float, nranks: int, layout: str) -> float:
    rate = cal.rate(block_flops, nranks, causal=True, layout=layout)
    return flops / rate if rate > 0 else math.inf


def predict_prefill(w: dict, cal) -> dict:
    """Predicted seconds per prefill strategy of workload ``w`` (a row-like dict: nranks, seq_len, cached_tokens,
    batch, heads, kv_heads, head_dim, dtype, layout) with calibration ``cal`` (model.Calibration): the arithmetic
    over P ranks at the calibration's compute rate for blocks of N / P keys by T / P queries, the transfers at its link."""
    P, n, c = w["nranks"], w["seq_len"], w.get("cached_tokens") or 0
    t = n - c
    s = ITEMSIZE[w["dtype"]]
    pairs = t * c + t * (t + 1) // 2
    flops = 4 * w["batch"] * w["heads"] * w["head_dim"] * pairs / P
    block = 4 * w["batch"] * w["heads"] * w["head_dim"] * (n / P) * (t / P)
    comp = _compute_s(cal, flops, block, P, w["layout"])
    alpha, bw = cal.link(P)
    return prefill_times(w, comp, alpha, bw, s, 8 if s == 8 else 4)


def predict_decode(w: dict, cal) -> dict:
    """Predicted seconds of one decode step per merge of workload ``w`` (nranks, seq_len, new_tokens, batch, heads,
    kv_heads, head_dim, dtype, layout)."""
    P, n, t = w["nranks"], w["seq_len"], w.get("new_tokens") or 1
    s = ITEMSIZE[w["dtype"]]
    flops = 4 * w["batch"] * w["heads"] * w["head_dim"] * t * n / P
    comp = _compute_s(cal, flops, flops, P, w["layout"])
    partial = w["batch"] * t * w["heads"] * (w["head_dim"] + 1) * (8 if s == 8 else 4)
    alpha, bw = cal.link(P)
    return decode_times(P, partial, comp, alpha, bw)


def format_advice(w: dict, seq_lens: list[int], ranks: list[int], cal, table) -> str:
    """`ringbench advise --pass prefill|decode`: the predicted time of each strategy (prefill) or merge (decode) at
    every N and P of the workload ``w``, the winner and the margin; prefill also Meta's rule's choice."""
    pass_ = w["pass"]
    body = []
    names = ("pass-kv", "pass-q", "allgather") if pass_ == "prefill" else ("ring", "tree", "gather")
    for n in seq_lens:
        for P in ranks:
            row = {**w, "seq_len": n, "nranks": P}
            if pass_ == "prefill" and not (0 <= (w.get("cached_tokens") or 0) < n):
                body.append([str(n), str(P)] + ["-"] * len(names) + ["refused: --cached-tokens must be below N", ""])
                continue
            times = predict_prefill(row, cal) if pass_ == "prefill" else predict_decode(row, cal)
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
    notes = f"calibration: {cal.source}; the model: docs/model.md (serving passes)"
    return "\n".join([title, table(head, body), notes])
