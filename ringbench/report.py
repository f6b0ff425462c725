"""The terminal report of ``ringbench report``: runs, modes side by side, and the overlap model's error.

Pure formatting of rows (ringbench.results) and predictions (ringbench.model); prints nothing itself.
"""

from __future__ import annotations

import math

import numpy as np

from ringbench import measure, model, results
from ringbench.layout import divisor


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
    """``zigzag causal`` / ``contiguous``: the layout and mask of a row."""
    return r["layout"] + (" causal" if r["causal"] else "")


def predictions(runs, cal: model.Calibration) -> dict:
    """{(file, group name): model.Prediction} for the successful runs."""
    out = {}
    for run in runs:
        if run.status == "ok":
            out[(run.path, run.name)] = model.predict(model.Shape.from_config(run.config, run.nranks), cal)
    return out


def runs_table(rows: list[dict], preds: dict | None) -> str:
    header = ["mode", "layout", "dtype", "BxH/Hkv xD", "N", "P", "n/rank", "time ms", "TFLOP/s", "GB/s", "overlap", "exposed ms", "rel err"]
    if preds is not None:
        header += ["model ms", "model err"]
    body = []
    for r in sorted(rows, key=results.sort_key):
        line = [
            r["mode"],
            config_label(r),
            r["dtype"],
            shape_label(r),
            str(r["seq_len"]),
            str(r["nranks"]),
            str(r["tokens_per_rank"]),
            time_cell(r["time_s"], r.get("time_ci_rel")),
            _num(r["tflops"], ".3f"),
            _num(r["bandwidth_gbps"], ".2f"),
            _num(r["overlap_eff"], ".0%"),
            _num(r["exposed_comm_s"], ".2f", 1e3),
            _num(r["rel_err"], ".1e"),
        ]
        if r["status"] != "ok":
            line[7:] = ["failed: " + (r.get("error") or "?")[:40]] + [""] * (len(header) - 8)
        elif preds is not None:
            p = preds.get((r["file"], r["name"]))
            line += [_num(p.time_s, ".2f", 1e3), _num(model.relative_error(p.time_s, r["time_s"]), "+.0%")]
        body.append(line)
    return table(header, body, left=4)


def modes_table(rows: list[dict]) -> str:
    comp = results.compare_modes(rows)
    if not comp:
        return "(no configuration was run in more than one mode)"
    header = ["A vs B", "layout", "dtype", "BxH/Hkv xD", "N", "P", "A ms", "B ms", "speed-up [CI]", "verdict"]
    body = []
    for d in comp:
        body.append(
            [
                f"{d['mode']} vs {d['other']}",
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
    return table(header, body, left=4)


def calibration_text(cal: model.Calibration) -> str:
    lines = [f"calibration: {cal.source}"]
    for p in sorted(cal.rates):
        pts = cal.rates[p]
        lines.append(
            f"  compute rate at P={p}: "
            + ", ".join(f"{r / 1e9:.1f}" for _, r in pts)
            + f" GFLOP/s per rank (blocks of {pts[0][0] / 1e9:.2g} .. {pts[-1][0] / 1e9:.2g} GFLOP)"
        )
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
    errs: dict = {}
    for r in rows:
        p = preds.get((r["file"], r["name"]))
        if p is not None and r["time_s"]:
            errs.setdefault(r["mode"], []).append(model.relative_error(p.time_s, r["time_s"]))
    allv = np.abs([e for v in errs.values() for e in v])
    if not allv.size:
        return "model error: no successful runs"
    per = ", ".join(f"{m} {np.median(np.abs(v)):.0%}" for m, v in sorted(errs.items()))
    note = " (in-sample: the model was fitted to these same runs)" if in_sample else ""
    return (
        f"model error on {allv.size} runs: median |predicted - measured| / measured {np.median(allv):.0%}, "
        f"max {allv.max():.0%}; by mode: {per}{note}"
    )


def crossover_text(rows: list[dict], cal: model.Calibration) -> str:
    seen = {}
    for r in rows:
        if r["status"] != "ok" or r["nranks"] < 2:
            continue
        shape = results.shape(r)
        key = (shape.layout, shape.causal, shape.dtype, shape.batch, shape.heads, shape.kv_heads, shape.head_dim, shape.nranks)
        if key not in seen:
            seen[key] = model.crossover_tokens(shape, cal)
    if not seen:
        return "crossover: needs runs with 2 or more ranks"
    body = []
    for (layout, causal, dtype, b, h, hk, d, p), n in sorted(seen.items()):
        kv = 2 * b * hk * d * model.ITEMSIZE[dtype] * n
        body.append([layout + (" causal" if causal else ""), dtype, f"{b}x{h}/{hk}x{d}", str(p), _num(n, ".0f"), _num(kv / 2**10, ".0f")])
    return "crossover: least tokens per rank n* = N/P at which compute covers each K/V transfer (overlap mode)\n" + table(
        ["layout", "dtype", "BxH/Hkv xD", "P", "n* tokens", "K/V block KiB"], body, left=3
    )


def prediction_table(rows: list[dict], cal: model.Calibration, ranks: list[int]) -> str:
    """Predicted pass time at rank counts not run, for each configuration at fixed N."""
    groups: dict = {}
    for r in rows:
        if r["status"] == "ok":
            key = (
                r["mode"],
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
    header = ["mode", "layout", "dtype", "BxH/Hkv xD", "N"] + [f"P={p} ms" for p in ranks]
    body = []
    for _key, r in sorted(groups.items(), key=lambda kv: results.sort_key(kv[1])):
        cells = []
        for p in ranks:
            if r["seq_len"] % divisor(r["layout"], p):
                cells.append("-")
                continue
            cells.append(_num(model.predict(results.shape(r, nranks=p), cal).time_s, ".2f", 1e3))
        body.append([r["mode"], config_label(r), r["dtype"], shape_label(r), str(r["seq_len"])] + cells)
    return "predicted pass time ('-': N is not divisible for that layout)\n" + table(header, body, left=4)


def format_report(runs, cal: model.Calibration | None, predict_ranks: list[int] | None = None) -> str:
    rows = results.rows(runs)
    hosts = sorted({h for r in rows for h in r["host"].split(",") if h})
    backends = sorted({r["backend_device"] for r in rows})
    out = [(f"{len(rows)} runs from {len({r['file'] for r in rows})} file(s); hosts {', '.join(hosts) or '?'}; {'; '.join(backends)}")]
    preds = predictions(runs, cal) if cal is not None else None
    out += [
        "",
        runs_table(rows, preds),
        "",
        "modes side by side: A vs B (speed-up = time B / time A; > 1: A is faster)",
        modes_table(rows),
        spread_note(),
    ]
    if cal is None:
        out += ["", "model: left out (--no-model, or nothing to calibrate from: no probes and no successful runs)"]
    else:
        out += [
            "",
            calibration_text(cal),
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
    head = ["layout", "dtype", "BxH/Hkv xD", "N", "P", "measured winner", "margin [CI]", "predicted winner", "agree", "median |err|"]
    return "\n".join(
        [
            "strategies: measured winner (the fastest, when its margin over the runner-up is significant) vs the model's",
            table(head, body, left=3),
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
