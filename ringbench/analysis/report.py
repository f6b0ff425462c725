"""The terminal report of ``ringbench report``: runs (one row per timed phase), the forward and backward of each
configuration side by side, modes side by side within each phase, and the overlap model's error per phase.

Pure formatting of rows (ringbench.analysis.results) and predictions (ringbench.analysis.model); prints nothing itself.
"""

from __future__ import annotations

import math

import numpy as np

from ringbench.analysis import inference, measure, model, results
from ringbench.layout import divisor
from ringbench.provenance import calibration_warning


def table(header: list[str], body: list[list[str]], left: int = 1) -> str:
    """Plain aligned columns; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in body]
    return "\n".join(lines)


def _num(v, fmt: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v * scale, fmt)


def time_cell(t, rel) -> str:
    """``332.10 ±1.3%``: a time in ms and the relative half-width of its confidence interval (none: no '±')."""
    return _num(t, ".2f", 1e3) + ("" if rel is None or (isinstance(rel, float) and math.isnan(rel)) else f" ±{rel:.1%}")


def speedup_cell(d: dict) -> str:
    """``1.21x [1.15, 1.27]``: a speed-up and its confidence interval, when it has one."""
    if d["speedup_ci_lo"] is None:
        return f"{d['speedup']:.2f}x"
    return f"{d['speedup']:.2f}x [{d['speedup_ci_lo']:.2f}, {d['speedup_ci_hi']:.2f}]"


def verdict_cell(d: dict) -> str:
    """``significant: overlap faster``, ``not significant (noise)`` or ``too few repeats``."""
    if d["verdict"] == measure.SIGNIFICANT:
        return f"significant: {d['mode'] if d['speedup'] > 1 else d['other']} faster"
    if d["verdict"] == measure.NOT_SIGNIFICANT:
        return "not significant (noise)"
    return d["verdict"]


def spread_note() -> str:
    """How to read '±', the speed-up's interval and the verdict (printed under the tables)."""
    return (
        f"±: half the width of the {measure.CONFIDENCE:.0%} bootstrap confidence interval of the median over repeats "
        f"({measure.RESAMPLES} resamples, fixed seed), relative to it; none with fewer than {measure.MIN_REPEATS} repeats.\n"
        f"A vs B = time B / time A (> 1: A is faster) [{measure.CONFIDENCE:.0%} bootstrap interval of that ratio]; "
        f"significant when the interval excludes 1, 'too few repeats' below {measure.MIN_REPEATS} repeats a side.\n"
        "The intervals cover the noise between the repeats of a run, not drift between runs; "
        "with 3-4 repeats they are about the repeats' range and less sure than their level (use 5 or more)."
    )


def shape_label(r: dict) -> str:
    """``1x8/2x64``: batch x heads / kv heads x head dim."""
    return f"{r['batch']}x{r['heads']}/{r['kv_heads']}x{r['head_dim']}"


def config_label(r: dict) -> str:
    """``zigzag causal`` / ``contiguous`` / ``balanced causal docs=fixed:512 window=128``: the layout and mask of a row."""
    docs, window = results.value(r, "docs"), results.value(r, "window")
    return r["layout"] + (" causal" if r["causal"] else "") + (f" docs={docs}" if docs else "") + (f" window={window}" if window else "")


def balance_cell(r: dict) -> str:
    """``1.50/1.34``: the pairs' and the measured compute's imbalance (max / mean over ranks), ``-`` where absent."""
    pairs, comp = r.get("pairs_imbalance"), r.get("compute_imbalance")
    if pairs is None and comp is None:
        return "-"
    return f"{_num(pairs, '.2f')}/{_num(comp, '.2f')}"


def predictions(runs, cal: model.Calibration) -> dict:
    """{(file, group name, phase): model.Prediction} for each timed phase of the successful runs that the
    calibration can predict (the backward needs a backward rate: ``Calibration.has_phase``)."""
    out = {}
    for run in runs:
        if run.status != "ok":
            continue
        shape = model.Shape.from_config(run.config, run.nranks)
        for phase in run.phases() if hasattr(run, "phases") else ["fwd"]:
            if cal.has_phase(phase):
                out[(run.path, run.name, phase)] = model.predict(shape.with_(pass_=phase), cal)
    return out


def _pred(preds: dict, r: dict):
    return preds.get((r["file"], r["name"], r.get("phase", "fwd")))


def runs_table(rows: list[dict], preds: dict | None) -> str:
    header = [
        "mode",
        "layout",
        "dtype",
        "BxH/Hkv xD",
        "N",
        "P",
        "n/rank",
        "time ms",
        "balance",
        "TFLOP/s",
        "GB/s",
        "overlap",
        "exposed ms",
        "KiB/rank",
    ]
    header += ["rel err"]
    if preds is not None:
        header += ["model ms", "model err"]
    body = []
    for r in sorted(rows, key=results.sort_key):
        line = [
            results.strategy_label(r) + ("" if r.get("phase", "fwd") == "fwd" else f" ({r['phase']})"),
            config_label(r),
            r["dtype"],
            shape_label(r),
            str(r["seq_len"]),
            str(r["nranks"]),
            str(r["tokens_per_rank"]),
            time_cell(r["time_s"], r.get("time_ci_rel")),
            balance_cell(r),
            _num(r["tflops"], ".3f"),
            _num(r["bandwidth_gbps"], ".2f"),
            _num(r["overlap_eff"], ".0%"),
            _num(r["exposed_comm_s"], ".2f", 1e3),
            _num(r.get("bytes_per_rank"), ".0f", 1 / 1024),
            _num(r["rel_err"], ".1e") + (" FAILED" if r.get("check_passed") is False else ""),
        ]
        if r["status"] != "ok":
            line[7:] = ["failed: " + (r.get("error") or "?")[:40]] + [""] * (len(header) - 8)
        elif preds is not None:
            p = _pred(preds, r)  # None: a phase the calibration cannot predict
            line += ["-", "-"] if p is None else [_num(p.time_s, ".2f", 1e3), _num(model.relative_error(p.time_s, r["time_s"]), "+.0%")]
        body.append(line)
    text = table(header, body, left=4)
    failed = sum(r["status"] == "ok" and r.get("check_passed") is False for r in rows)
    if failed:
        text += (
            f"\nrel err FAILED: {failed} timed phase(s) failed --check (wrong numbers, though timed); "
            "their runs are left out of the model's fit"
        )
    return text


def modes_table(rows: list[dict]) -> str:
    comp = results.compare_modes(rows)
    if not comp:
        return "(no configuration was run in more than one mode)"
    header = ["A vs B", "phase", "layout", "dtype", "BxH/Hkv xD", "N", "P", "A ms", "B ms", "speed-up [CI]", "verdict"]
    body = []
    for d in comp:
        body.append(
            [
                f"{d['mode']} vs {d['other']}",
                d.get("phase", "fwd"),
                config_label(d),
                d["dtype"],
                shape_label(d),
                str(d["seq_len"]),
                str(d["nranks"]),
                time_cell(d["time_s"], d["time_ci_rel"]),
                time_cell(d["time_other_s"], d["time_other_ci_rel"]),
                speedup_cell(d),
                verdict_cell(d),
            ]
        )
    return table(header, body, left=5)


def _pair(a, b, fmt: str, scale: float = 1.0) -> str:
    """``a / b``: a forward and a backward value in one cell."""
    return f"{_num(a, fmt, scale)} / {_num(b, fmt, scale)}"


def phases_table(rows: list[dict], preds: dict | None) -> str:
    """Forward and backward of each configuration side by side (results.phase_pairs): one fwd+bwd run, or matched
    fwd and bwd runs of the same configuration."""
    pairs = results.phase_pairs(rows)
    if not pairs:
        return "(no configuration has both a forward and a backward measured: run --pass fwd+bwd, or fwd and bwd)"
    header = ["mode", "layout", "dtype", "BxH/Hkv xD", "N", "P", "fwd ms", "bwd ms", "bwd/fwd", "fwd+bwd ms", "TFLOP/s"]
    header += ["overlap", "exposed ms", "KiB/rank"]
    if preds is not None:
        header += ["model fwd+bwd", "model err"]
    body = []
    for d in pairs:
        f, b = d["fwd"], d["bwd"]
        line = [
            results.strategy_label(d)  # hybrid once per Ulysses degree, as in the runs table
            + ("" if d["same_run"] else " *")
            + (" check FAILED" if False in (f.get("check_passed"), b.get("check_passed")) else ""),
            config_label(d),
            d["dtype"],
            shape_label(f),
            str(d["seq_len"]),
            str(d["nranks"]),
            time_cell(f["time_s"], f.get("time_ci_rel")),
            time_cell(b["time_s"], b.get("time_ci_rel")),
            _num(b["time_s"] / f["time_s"] if f["time_s"] else None, ".2f") + "x",
            time_cell(d["total_s"], d["total_ci_rel"]),
            _pair(f["tflops"], b["tflops"], ".3f"),
            _pair(f["overlap_eff"], b["overlap_eff"], ".0%"),
            _pair(f["exposed_comm_s"], b["exposed_comm_s"], ".2f", 1e3),
            _pair(f.get("bytes_per_rank"), b.get("bytes_per_rank"), ".0f", 1 / 1024),
        ]
        if preds is not None:
            pf, pb = _pred(preds, f), _pred(preds, b)
            if pf is None or pb is None:
                line += ["-", "-"]
            else:
                t = pf.time_s + pb.time_s
                line += [_num(t, ".2f", 1e3), _num(model.relative_error(t, d["total_s"]), "+.0%")]
        body.append(line)
    note = (
        "cells 'a / b': forward / backward. fwd+bwd: median of the per-repeat sums (± its interval) for one fwd+bwd run; "
        "'*': separate fwd and bwd runs, the sum of their medians (no interval). Backward FLOPs = 2.5 x forward."
    )
    return table(header, body, left=4) + "\n" + note


def calibration_text(cal: model.Calibration) -> str:
    lines = [f"calibration: {cal.source}"]
    for p in sorted(cal.rates):
        pts = cal.rates[p]
        lines.append(
            f"  compute rate at P={p}: "
            + ", ".join(f"{r / 1e9:.1f}" for _, r in pts)
            + f" GFLOP/s per rank (blocks of {pts[0][0] / 1e9:.2g} .. {pts[-1][0] / 1e9:.2g} GFLOP)"
        )
    for p in sorted(cal.bwd_rates):
        pts = cal.bwd_rates[p]
        lines.append(
            f"  backward compute rate at P={p}: "
            + ", ".join(f"{r / 1e9:.1f}" for _, r in pts)
            + f" GFLOP/s per rank (blocks of {pts[0][0] / 1e9:.2g} .. {pts[-1][0] / 1e9:.2g} GFLOP, 2.5 x the forward's)"
        )
    if not cal.bwd_rates:
        lines.append("  backward compute rate: none (probe again, or store runs with --pass bwd or fwd+bwd): backward not predicted")
    for layout in sorted(k for k in cal.causal_rates if k != "*"):
        table = cal.causal_rates[layout]
        lines.append(
            f"  causal {layout}: "
            + "; ".join(f"P={p} " + ", ".join(f"{r / 1e9:.1f}" for _, r in table[p]) for p in sorted(table))
            + " GFLOP/s per rank"
        )
    for p in sorted(cal.links):
        lat, bw = cal.links[p]
        lines.append(f"  link at P={p}: latency {lat * 1e6:.1f} us, bandwidth {bw / 1e9:.2f} GB/s")
    lines += [f"  note: {n}" for n in cal.notes]
    return "\n".join(lines)


def error_text(rows: list[dict], preds: dict, in_sample: bool) -> str:
    """The model's error over the measured phases, per phase and mode."""
    errs: dict = {}
    for r in rows:
        p = _pred(preds, r)
        if p is not None and r["time_s"]:
            errs.setdefault((r.get("phase", "fwd"), r["mode"]), []).append(model.relative_error(p.time_s, r["time_s"]))
    allv = np.abs([e for v in errs.values() for e in v])
    if not allv.size:
        return "model error: no successful runs"
    phases = sorted({ph for ph, _ in errs}, key=lambda ph: ph != "fwd")
    per = "; ".join(
        f"{ph}: " + ", ".join(f"{m} {np.median(np.abs(errs[ph, m])):.0%}" for m in sorted(m for q, m in errs if q == ph)) for ph in phases
    )
    note = " (in-sample: the model was fitted to these same runs)" if in_sample else ""
    what = "runs" if phases == ["fwd"] else "timed phases"
    return (
        f"model error on {allv.size} {what}: median |predicted - measured| / measured {np.median(allv):.0%}, "
        f"max {allv.max():.0%}; by {'phase and ' if phases != ['fwd'] else ''}mode: {per}{note}"
    )


def crossover_text(rows: list[dict], cal: model.Calibration) -> str:
    """n* per configuration and phase measured (the backward's where the calibration has a backward rate)."""
    seen: dict = {}
    for r in rows:
        phase = r.get("phase", "fwd")
        if r["status"] != "ok" or r["nranks"] < 2 or not cal.has_phase(phase):
            continue
        shape = results.shape(r).with_(pass_=phase)
        key = (
            shape.layout,
            shape.causal,
            shape.dtype,
            shape.batch,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            shape.nranks,
            phase != "fwd",
        )
        if key not in seen:
            seen[key] = model.crossover_tokens(shape, cal)
    if not seen:
        return "crossover: needs runs with 2 or more ranks"
    body = []
    for (layout, causal, dtype, b, h, hk, d, p, bwd), n in sorted(seen.items()):
        acc = model.ACC_ITEMSIZE[dtype] if bwd else 0
        per_token = 2 * b * hk * d * (max(model.ITEMSIZE[dtype], acc) if p == 2 else model.ITEMSIZE[dtype] + acc)  # P=2: one or the other
        kv = per_token * n
        row = [layout + (" causal" if causal else ""), "bwd" if bwd else "fwd", dtype, f"{b}x{h}/{hk}x{d}", str(p)]
        body.append(row + [_num(n, ".0f"), _num(kv / 2**10, ".0f")])
    return (
        "crossover: least tokens per rank n* = N/P at which compute covers each step's transfers (overlap mode); "
        "bwd: K/V + dK/dV per step\n"
        + table(["layout", "phase", "dtype", "BxH/Hkv xD", "P", "n* tokens", "moved per step KiB"], body, left=4)
    )


def prediction_table(rows: list[dict], cal: model.Calibration, ranks: list[int]) -> str:
    """Predicted pass time at rank counts not run, for each configuration at fixed N."""
    groups: dict = {}
    for r in rows:
        if r["status"] == "ok" and cal.has_phase(r.get("phase", "fwd")):
            key = (
                r.get("phase", "fwd"),
                results.strategy_label(r),  # hybrid once per Ulysses degree
                r["layout"],
                bool(r["causal"]),
                r["dtype"],
                r["batch"],
                r["heads"],
                r["kv_heads"],
                r["head_dim"],
                r["seq_len"],
            )
            groups.setdefault(key, r)
    header = ["mode", "phase", "layout", "dtype", "BxH/Hkv xD", "N"] + [f"P={p} ms" for p in ranks]
    body = []
    for _key, r in sorted(groups.items(), key=lambda kv: results.sort_key(kv[1])):
        cells = []
        for p in ranks:
            if r["seq_len"] % divisor(r["layout"], p):
                cells.append("-")
                continue
            cells.append(_num(model.predict(results.shape(r, nranks=p), cal).time_s, ".2f", 1e3))
        body.append(
            [results.strategy_label(r), r.get("phase", "fwd"), config_label(r), r["dtype"], shape_label(r), str(r["seq_len"])] + cells
        )
    return "predicted pass time ('-': N is not divisible for that layout)\n" + table(header, body, left=5)


def nodes_table(runs) -> str | None:
    """The runs across nodes (provenance ``nodes``, count > 1): nodes and ranks per node, the ring hops and all-to-all
    pairs that crossed a node boundary, and the bytes per rank each link class carried in one pass; None without any."""
    body = []
    for run in runs:
        nd = getattr(run, "provenance", {}).get("nodes") or {}
        if nd.get("count", 1) <= 1:
            continue
        c = run.config
        mode = f"hybrid U={c.get('ulysses_degree')}" if c.get("mode") == "hybrid" else str(c.get("mode"))
        for ph, b in sorted(nd.get("bytes_per_rank", {}).items(), key=lambda kv: kv[0] != "fwd"):
            body.append(
                [
                    mode,
                    str(c.get("seq_len")),
                    str(run.nranks),
                    ph,
                    f"{nd['count']} ({'/'.join(map(str, nd['ranks_per_node']))})",
                    f"{len(nd['ring_hops_inter'])} of {nd['ring_hops']}",
                    f"{len(nd['a2a_pairs_inter'])} of {nd['a2a_pairs']}",
                    f"{max(b['intra']) / 2**20:.2f}",
                    f"{max(b['inter']) / 2**20:.2f}",
                ]
            )
    if not body:
        return None
    head = ["mode", "N", "P", "phase", "nodes (ranks)", "ring hops across", "a2a pairs across", "intra MiB/rank", "inter MiB/rank"]
    return "across nodes: which links crossed a node boundary, bytes per rank by link class (one pass, busiest rank)\n" + table(
        head, body, left=4
    )


def format_report(runs, cal: model.Calibration | None, predict_ranks: list[int] | None = None) -> str:
    served = inference.serving_text(results.rows(runs), table, cal)  # prefill and decode runs: their own tables
    runs = [r for r in runs if r.config.get("pass") not in inference.SERVING]
    text = _format_training(runs, cal, predict_ranks) if runs or not served else ""
    return "\n\n".join(t for t in (text, served) if t)


def _format_training(runs, cal: model.Calibration | None, predict_ranks: list[int] | None = None) -> str:
    rows = results.rows(runs)
    hosts = sorted({h for r in rows for h in r["host"].split(",") if h})
    backends = sorted({r["backend_device"] for r in rows})
    nruns = len({(r["file"], r["name"]) for r in rows})  # a fwd+bwd run is one run with two rows (timed phases)
    what = f"{nruns} run{'s' if nruns != 1 else ''}" + (f" ({len(rows)} timed phases)" if len(rows) != nruns else "")
    out = [(f"{what} from {len({r['file'] for r in rows})} file(s); hosts {', '.join(hosts) or '?'}; {'; '.join(backends)}")]
    preds = predictions(runs, cal) if cal is not None else None
    out += ["", runs_table(rows, preds)]
    across = nodes_table(runs)
    if across:
        out += ["", across]
    if any(r.get("phase") == "bwd" for r in rows):
        out += ["", "forward and backward side by side", phases_table(rows, preds)]
    split = split_text(runs, cal)
    if split:
        out += ["", split]
    out += [
        "",
        "modes side by side within each phase: A vs B (speed-up = time B / time A; > 1: A is faster)",
        modes_table(rows),
        spread_note(),
    ]
    if cal is None:
        out += ["", "model: left out (--no-model, or nothing to calibrate from: no probes and no successful runs)"]
    else:
        out += [
            "",
            calibration_text(cal),
            *filter(None, [calibration_warning(cal, runs)]),  # measured on a loaded machine, or the runs were
            error_text(rows, preds, in_sample=cal.source.startswith("fitted")),
            "",
            crossover_text(rows, cal),
        ]
        strategies = strategy_text(rows, cal)
        if strategies:
            out += ["", strategies]
        if predict_ranks:
            out += ["", prediction_table(rows, cal, predict_ranks)]
    return "\n".join(out)


def split_text(runs, cal: model.Calibration | None) -> str | None:
    """Each timed phase's exposed communication step by step (runs with the split, schema 3): the transfer alone, the
    share of it compute hid, the wait it left (not hidden) and the time spent waiting for a slower rank, measured
    (the slowest rank's median) and, with a calibration that covers the phase, predicted (model.predict_split)."""
    header = ["run", "phase", "step", "alone ms", "hidden", "not hidden ms", "model", "slower-rank wait ms", "model"]
    body = []
    for run in runs:
        if run.status != "ok" or run.nranks < 2:
            continue
        for phase in run.phases():
            steps = measure.per_step_split(run.phase(phase).samples)
            if steps is None:
                continue
            pred = None
            if cal is not None and cal.has_phase(phase):
                pred = model.predict_split(model.Shape.from_config(run.config, run.nranks).with_(pass_=phase), cal)
            for i in range(len(steps["alone"])):
                p_unh = "-" if pred is None else _num(pred["unhidden"][:, i].max(), ".2f", 1e3)
                p_wait = "-" if pred is None else _num(pred["partner_wait"][:, i].max(), ".2f", 1e3)
                body.append([
                    (run.name or run.point_id) if i == 0 else "", phase if i == 0 else "", str(i), _num(steps["alone"][i], ".2f", 1e3),
                    _num(steps["hidden"][i], ".0%"), _num(steps["unhidden"][i], ".2f", 1e3), p_unh,
                    _num(steps["partner_wait"][i], ".2f", 1e3), p_wait,
                ])  # fmt: skip
    if not body:
        return None
    note = (
        "exposed communication step by step (slowest rank, median over repeats): 'not hidden' waited for a transfer "
        "both neighbours had posted, at most its time alone (overlap = 1 - not hidden / alone), 'slower-rank wait' for a "
        "neighbour that had not yet posted or was computing without calling MPI (imbalance); model: max(0, transfer - "
        "compute) and the layout's per-rank work replayed"
    )
    return note + "\n" + table(header, body, left=2)


def strategy_text(rows: list[dict], cal: model.Calibration) -> str | None:
    """Per configuration run with two or more strategies: measured winner (or a tie), predicted winner, and the line
    'the predicted winner was the measured winner on a of b points ...; median error ...'. None without such points."""
    points = results.strategy_points(rows)
    if not points:
        return None
    agreement = results.strategy_agreement(points, lambda r: model.predict(results.shape(r), cal).time_s)
    body = []
    for p in points:
        ci = "" if p["ci_lo"] is None else f" [{p['ci_lo']:.2f}, {p['ci_hi']:.2f}]"
        measured = p["winner"] if p["winner"] else f"tie: {p['best']} ~ {p['runner_up']}"
        errs = p["errors"]
        body.append(
            [
                p.get("phase") or "fwd",
                config_label(p),
                p["dtype"],
                shape_label(p),
                str(p["seq_len"]),
                str(p["nranks"]),
                measured,
                f"{p['speedup']:.2f}x{ci} over {p['runner_up']}",
                p["predicted_winner"] or "-",
                {True: "yes", False: "NO", None: "-"}[p["agree"]],
                _num(float(np.median(np.abs(list(errs.values())))) if errs else None, ".0%"),
            ]
        )
    head = [
        "phase",
        "layout",
        "dtype",
        "BxH/Hkv xD",
        "N",
        "P",
        "measured winner",
        "margin [CI]",
        "predicted winner",
        "agree",
        "median |err|",
    ]
    return "\n".join(
        [
            "strategies: measured winner (the fastest, when its margin over the runner-up is significant) vs the model's",
            table(head, body, left=4),
            strategy_summary(agreement),
        ]
    )


def strategy_summary(agreement: dict) -> str:
    """The winner-agreement line of ``results.strategy_agreement``."""
    a, d, t = agreement["agree"], agreement["decided"], agreement["ties"]
    share = f" ({a / d:.0%})" if d else ""
    errs = agreement["errors"]
    err = f"{agreement['median_abs_error']:.0%} over {len(errs)} strategy times" if errs else "no predicted times"
    return (
        f"strategy winners: the predicted winner was the measured winner on {a} of {d} points{share} where the measured "
        f"times differ by more than their spread ({t} tie{'s' if t != 1 else ''} within the noise left out); "
        f"median |predicted - measured| / measured of the strategies' times: {err}"
    )
