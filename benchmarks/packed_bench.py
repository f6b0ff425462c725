"""Packed documents: does the work-balanced layout balance, is it faster than global zigzag, does the model pick the
winning strategy and layout? Probe, sweep, then compare (issue 20's targets).

    python benchmarks/packed_bench.py [--ranks 2 4] [--seq-len 8192 [N ...]] [--docs SPEC [SPEC ...]]
                                      [--window W] [--modes overlap allgather ulysses pass-q]
                                      [--layouts zigzag doc-zigzag balanced contiguous] [--heads 4] [--kv-heads 2]
                                      [--head-dim 64] [--repeat 5] [--rounds 3] [--work DIR] [--out FILE.json]

1. Calibration, apart from the sweep: ``mpiexec -n P ringbench probe`` at every rank count (strategy_bench's probe:
   per-piece rates, the causal diagonal blocks, the link, the copy rate); the model is ``model.calibrate([], probes)``.
2. The sweep: every strategy (``--modes``) x layout (``--layouts``) x document spec (``--docs``, default the
   three long-tailed specs of benchmarks/README.md) x N (``--seq-len``), causal, at each ``--ranks``, ``--rounds``
   whole sweeps one after the other (sweep --force: interleaved rounds, the repeats of a point pooled), so a burst
   of other jobs' load spoils one round of a point, not all of it.
3. Per rank count (reported apart; a P above this machine's cores is oversubscribed and says so), one table per
   spec and N, per strategy and layout: the most pieces (kernel calls) a rank's ring plans have in a pass, balanced's
   chunks per rank k (layout.balanced_chunks), the pass time (median of the pooled repeats), the pairs' imbalance
   (max / mean over ranks of the pairs the plans gave each rank), the measured compute imbalance (max / mean of the
   summed compute_s), the model's time and its error, and the time of global zigzag over this layout's, for the same
   strategy in the same sweep (``measure.compare``: its bootstrap interval and verdict).
   Targets, over every spec and N of the rank count (then summed over the rank counts): balanced's pairs imbalance
   <= 1.10 (within 10% of perfect) everywhere; its time >= 1.2x better than zigzag's (same ring strategy) wherever
   zigzag's pairs imbalance exceeds 1.3; the model's predicted winner is the measured one on >= 90% of the points
   with a significant measured winner, both over every strategy x layout of a point (the spec, N, P) and over the
   layouts of each strategy at a point; the median |error| of its times <= 20%.

Prints the CPU model and SIMD level (ringbench.provenance.cpu()) and the load average at the start and the end;
--out keeps every figure as JSON. Exit status 0; 2 on bad options (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from strategy_bench import mpiexec, run  # noqa: E402  (the probe and sweep launchers: one copy)

from ringbench import layout, provenance, store  # noqa: E402
from ringbench.analysis import measure, model, report, results  # noqa: E402

BALANCE_TARGET = 1.10  # balanced's pairs imbalance: within 10% of perfect
SPEEDUP_TARGET = 1.2  # balanced over zigzag, where zigzag's imbalance exceeds ZIGZAG_IMBALANCE
ZIGZAG_IMBALANCE = 1.3
WINNER_TARGET = 0.90
ERROR_TARGET = 0.20
RING_MODES = ("overlap", "blocking", "allgather")  # the modes whose work follows the layout's ring plans
DEFAULT_SPECS = ("lognormal:mean=768,sigma=1.3,seed=1", "lognormal:mean=1024,sigma=1.0,seed=3", "lognormal:mean=768,sigma=1.3,seed=5")
POINT_KEYS = ("winner", "best", "runner_up", "predicted_winner", "verdict")  # what the JSON keeps of a point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="rank counts (default 2 4)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096], help="N, one or more (default 4096)")
    p.add_argument("--docs", nargs="+", default=list(DEFAULT_SPECS), help="the documents' specs (long-tailed ones), one or more")
    p.add_argument("--window", type=int, default=0, help="sliding window (default 0: none)")
    p.add_argument("--modes", nargs="+", default=["overlap", "allgather", "ulysses", "pass-q"], help="strategies")
    p.add_argument("--layouts", nargs="+", default=["zigzag", "doc-zigzag", "balanced", "contiguous"], choices=layout.DOC_LAYOUTS)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="timed passes per run")
    p.add_argument("--rounds", type=int, default=3, help="whole sweeps one after the other, their repeats pooled (default 3)")
    p.add_argument("--probe-blocks", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048], help="probe block sizes")
    p.add_argument("--work", help="directory for the probe and result files (default: a temporary one, removed)")
    p.add_argument("--out", help="write every figure here (JSON)")
    p.add_argument("--reuse", action="store_true", help="with --work: compare the probe and results already there (no new runs)")
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args(argv)
    if a.reuse and not (a.work and (Path(a.work) / "probe.h5").is_file()):
        p.exit(2, "packed_bench: --reuse: needs --work DIR holding an earlier run's probe.h5 and results\n")
    if a.rounds < 1:
        p.exit(2, f"packed_bench: --rounds: expected a positive integer, got {a.rounds}\n")
    if a.repeat < measure.MIN_REPEATS:
        p.exit(2, f"packed_bench: --repeat: at least {measure.MIN_REPEATS} (a winner needs a confidence interval), got {a.repeat}\n")
    if a.window < 0:
        p.exit(2, f"packed_bench: --window: expected an integer >= 1 (0: none), got {a.window}\n")
    for opt in ("ranks", "probe_blocks", "seq_len"):
        if any(v < 1 for v in getattr(a, opt)):
            p.exit(2, f"packed_bench: --{opt.replace('_', '-')}: expected positive integers, got {getattr(a, opt)}\n")
    bad = [m for m in a.modes if m not in ("overlap", "blocking", "allgather", "ulysses", "pass-q")]
    if bad:
        p.exit(2, f"packed_bench: --modes: {bad[0]!r} is not one of overlap, blocking, allgather, ulysses, pass-q\n")
    from ringbench.config import RunConfig, validate

    for nranks in a.ranks:
        for lay in a.layouts:
            for docs in a.docs:
                for n in a.seq_len:
                    cfg = RunConfig(seq_len=n, causal=True, layout=lay, docs=docs, window=a.window, heads=a.heads, kv_heads=a.kv_heads)
                    problems = validate(cfg, nranks)
                    if problems:
                        key, msg = problems[0]
                        p.exit(2, f"packed_bench: --{key.replace('_', '-')}: {msg} (docs {docs}, N={n}, layout {lay}, P={nranks})\n")
    return a


def experiment_text(a: argparse.Namespace) -> str:
    import yaml

    base = {"heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "causal": True}
    base.update(repeat=a.repeat, warmup=1)
    if a.window:
        base["window"] = a.window
    data = {
        "name": "packed-bench",
        "description": "built-in variant of experiments/packed.yaml (benchmarks/packed_bench.py)",
        "base": base,
        "matrix": {"mode": list(a.modes), "layout": list(a.layouts), "docs": list(a.docs), "seq_len": list(a.seq_len)},
        "ranks": list(a.ranks),
        "timeout": int(a.timeout),
    }
    return yaml.safe_dump(data, sort_keys=False)


def pooled(rows: list[dict]) -> dict:
    """{(strategy, layout, docs, N): {"repeats", "row", "pairs", "compute"}} of one rank count's rows, repeated runs
    pooled."""
    out: dict = {}
    for r in rows:
        if r["status"] != "ok" or r.get("time_s") is None:
            continue
        key = (results.strategy_label(r), r["layout"], r.get("docs") or "", r["seq_len"])
        d = out.setdefault(key, {"repeats": [], "row": r, "pairs": [], "compute": []})
        d["repeats"] += list(r.get("time_repeats_s") or (r["time_s"],))
        d["pairs"].append(r.get("pairs_imbalance"))
        d["compute"].append(r.get("compute_imbalance"))
    return out


def candidate_rows(rows: list[dict]) -> list[dict]:
    """Rows relabelled so that results.strategy_points takes every strategy x layout of one (spec, N, P) as one point:
    the candidate is "strategy layout" (its mode), the layout is pooled ("*"); the original row rides along."""
    out = []
    for r in rows:
        c = dict(r, mode=f"{results.strategy_label(r)} {r['layout']}", ulysses_degree=1, layout="*")
        c["orig"] = r
        out.append(c)
    return out


def layout_rows(rows: list[dict]) -> list[dict]:
    """Rows relabelled so that results.strategy_points takes the layouts of one strategy at one (spec, N, P) as one
    point: the candidate is the layout (its mode), the strategy keyed in ``layout``; the original row rides along."""
    out = []
    for r in rows:
        c = dict(r, mode=r["layout"], ulysses_degree=1, layout=results.strategy_label(r))
        c["orig"] = r
        out.append(c)
    return out


def _median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else float("nan")


def ring_pieces(lay: str, nranks: int, seq_len: int, docs: tuple, window: int) -> int:
    """The most pieces (kernel calls) one rank's ring plans have over a pass of this layout: what cutting costs."""
    n = seq_len // nranks
    kw = {"docs": docs, "window": window} if (len(docs) > 1 or window) else {}
    return max(sum(len(layout.step_plan(lay, r, (r - s) % nranks, nranks, n, True, **kw)) for s in range(nranks)) for r in range(nranks))


def spec_cells(by: dict, cal: model.Calibration, nranks: int, docs: str, seq_len: int, window: int) -> tuple[list, list]:
    """The cells (one per strategy x layout) of one (spec, N) at one rank count, and their table's rows."""
    lengths = model.Shape(nranks=nranks, seq_len=seq_len, docs=docs).doc_lengths
    keys = sorted((k for k in by if k[2] == docs and k[3] == seq_len), key=lambda k: (k[0] != "overlap", k[0], k[1]))
    body, cells = [], []
    for strat, lay, _, _ in keys:
        d = by[(strat, lay, docs, seq_len)]
        med = float(np.median(d["repeats"]))
        pred = model.predict(results.shape(d["row"]), cal).time_s
        base = by.get((strat, "zigzag", docs, seq_len))
        # zigzag's time over this layout's (> 1: this layout is faster), its interval and verdict
        cmp_ = measure.compare(base["repeats"], d["repeats"]) if base is not None and lay != "zigzag" else None
        k = layout.balanced_chunks(nranks, seq_len, lengths, window, True) if lay == "balanced" else None
        cell = {
            "strategy": strat,
            "layout": lay,
            "docs": docs,
            "seq_len": seq_len,
            "chunks_per_rank": k,
            "ring_pieces": ring_pieces(lay, nranks, seq_len, lengths, window),
            "time_s": med,
            "repeats_s": list(map(float, d["repeats"])),
            "pairs_imbalance": _median(d["pairs"]),
            "compute_imbalance": _median(d["compute"]),
            "predicted_s": float(pred),
            "error": float(model.relative_error(pred, med)),
            "zigzag_over_this": None if cmp_ is None else float(cmp_.ratio),
            "ci": None if cmp_ is None else [float(cmp_.lo), float(cmp_.hi)],
            "verdict": None if cmp_ is None else cmp_.verdict,
        }
        cells.append(cell)
        body.append(
            [
                strat,
                lay + (f" (k={k})" if k else ""),
                str(cell["ring_pieces"]),
                f"{med * 1e3:.2f}",
                f"{cell['pairs_imbalance']:.3f}",
                f"{cell['compute_imbalance']:.3f}",
                f"{pred * 1e3:.2f}",
                f"{cell['error']:+.0%}",
                "-" if cmp_ is None else f"{cmp_.ratio:.2f}x [{cmp_.lo:.2f}, {cmp_.hi:.2f}] {cmp_.verdict}",
            ]
        )
    return cells, body


def speedups(cells: list[dict]) -> list[dict]:
    """Balanced against zigzag (same strategy, ring modes) wherever zigzag's pairs imbalance exceeds ZIGZAG_IMBALANCE."""
    out = []
    for c in cells:
        if c["layout"] != "balanced" or c["strategy"] not in RING_MODES or c["zigzag_over_this"] is None:
            continue
        same = (c["strategy"], c["docs"], c["seq_len"])
        zig = next((z for z in cells if z["layout"] == "zigzag" and (z["strategy"], z["docs"], z["seq_len"]) == same), None)
        if zig is not None and zig["pairs_imbalance"] > ZIGZAG_IMBALANCE:
            s = {"strategy": c["strategy"], "docs": c["docs"], "seq_len": c["seq_len"], "zigzag_imbalance": zig["pairs_imbalance"]}
            s.update(speedup=c["zigzag_over_this"], ci=c["ci"], verdict=c["verdict"], **{"pass": c["zigzag_over_this"] >= SPEEDUP_TARGET})
            out.append(s)
    return out


def _tie(p: dict) -> str:
    return p["winner"] or f"none (a tie within the noise: {p['best']} vs {p['runner_up']})"


def per_rank_count(rows: list[dict], cal: model.Calibration, nranks: int, cores: int, specs: list, window: int = 0) -> dict:
    """The tables (one per spec and N), the targets over all of them and the model's agreement at one rank count."""
    sub = [r for r in rows if r["nranks"] == nranks]
    by = pooled(sub)
    lines = [f"P = {nranks}{' (oversubscribed: more ranks than the ' + str(cores) + ' cores)' if nranks > cores else ''}"]
    head = ["strategy", "layout", "pieces", "time ms", "pairs imb", "compute imb", "model ms", "model err", "zigzag / this (same strategy)"]
    cells = []
    for docs, seq_len in specs:
        c, body = spec_cells(by, cal, nranks, docs, seq_len, window)
        if not c:
            continue
        cells += c
        lines += [f"  {docs} over N={seq_len}:", report.table(head, body, left=2)]
    bal = [c for c in cells if c["layout"] == "balanced" and c["strategy"] in RING_MODES]
    balance_ok = bool(bal) and all(c["pairs_imbalance"] <= BALANCE_TARGET for c in bal)
    worst = max(bal, key=lambda c: c["pairs_imbalance"]) if bal else None
    speed = speedups(cells)
    lines.append(
        f"  balanced's pairs imbalance (ring modes, {len(bal)} cells): worst "
        + (f"{worst['pairs_imbalance']:.3f} ({worst['strategy']}, {worst['docs']})" if worst else "none run")
        + f" -> {'PASS' if balance_ok else 'MISS'} (target <= {BALANCE_TARGET:.2f})"
    )
    if speed:
        hit = sum(s["pass"] for s in speed)
        lines.append(f"  balanced vs zigzag where zigzag's imbalance > {ZIGZAG_IMBALANCE}: {hit}/{len(speed)} >= {SPEEDUP_TARGET:.1f}x")
        lines += [
            f"    {s['docs']} N={s['seq_len']} {s['strategy']}: zigzag {s['zigzag_imbalance']:.3f}, "
            f"{s['speedup']:.2f}x [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] {'PASS' if s['pass'] else 'MISS'}"
            for s in speed
        ]
    else:
        lines.append(f"  balanced vs zigzag: zigzag's imbalance is at most {ZIGZAG_IMBALANCE} here (no speed-up target applies)")
    predict = lambda r: model.predict(results.shape(r["orig"]), cal).time_s  # noqa: E731
    agr = results.strategy_agreement(results.strategy_points(candidate_rows(sub)), predict)
    lay_agr = results.strategy_agreement(results.strategy_points(layout_rows(sub)), predict)
    for p in agr["points"]:
        lines.append(f"  winner at {p['docs']} N={p['seq_len']}: measured {_tie(p)}, predicted {p['predicted_winner']}")
    for p in lay_agr["points"]:  # layout_rows keys the strategy in "layout"
        lines.append(f"  layout for {p['layout']} at {p['docs']}: measured {_tie(p)}, predicted {p['predicted_winner']}")
    err = agr["median_abs_error"]
    lines += [
        f"  model: winner over strategies x layouts {_share(agr)}; the layout for each strategy {_share(lay_agr)}"
        f" (target >= {WINNER_TARGET:.0%} of decided points); median |error| {err:.1%} "
        f"{'PASS' if err <= ERROR_TARGET else 'MISS'} (target <= {ERROR_TARGET:.0%})"
    ]
    return {
        "text": "\n".join(lines),
        "nranks": nranks,
        "oversubscribed": nranks > cores,
        "cells": cells,
        "balance_pass": balance_ok,
        "speedups": speed,
        "winner": _counts(agr),
        "layout_winner": _counts(lay_agr),
        "points": [{"docs": p["docs"], "seq_len": p["seq_len"], **{k: p[k] for k in POINT_KEYS}} for p in agr["points"]],
        "layout_points": [
            {"strategy": p["layout"], "docs": p["docs"], "seq_len": p["seq_len"], **{k: p[k] for k in POINT_KEYS}}
            for p in lay_agr["points"]
        ],
        "median_abs_error": err,
    }


def _counts(agr: dict) -> dict:
    return {
        "agree": agr["agree"],
        "decided": agr["decided"],
        "ties": agr["ties"],
        "share": agr["agree"] / agr["decided"] if agr["decided"] else float("nan"),
    }


def _share(agr: dict) -> str:
    """'5/6 decided points (83%, 2 ties) MISS'."""
    d, a = agr["decided"], agr["agree"]
    verdict = "PASS" if d and a / d >= WINNER_TARGET else "MISS"
    return f"{a}/{d} decided points{f' ({a / d:.0%})' if d else ''}, {agr['ties']} ties, {verdict}"


def overall(out: list[dict]) -> str:
    """The targets summed over every rank count (each P also reported apart above)."""
    tot = {
        k: {"agree": sum(o[k]["agree"] for o in out), "decided": sum(o[k]["decided"] for o in out), "ties": sum(o[k]["ties"] for o in out)}
        for k in ("winner", "layout_winner")
    }
    speed = [s for o in out for s in o["speedups"]]
    errs = [abs(c["error"]) for o in out for c in o["cells"]]
    return (
        f"all rank counts: balanced's imbalance {'PASS' if all(o['balance_pass'] for o in out) else 'MISS'}; "
        f"speed-up {sum(s['pass'] for s in speed)}/{len(speed)}; winner over strategies x layouts {_share(tot['winner'])}; "
        f"layout per strategy {_share(tot['layout_winner'])}; median |error| {float(np.median(errs)) if errs else float('nan'):.1%}"
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    cores = os.cpu_count() or 1
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="packed_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    specs = [(d, n) for d in a.docs for n in a.seq_len]
    print(f"packed_bench: {provenance.cpu()}, {cores} cores, load average {load_start:.2f} (1 min) at the start", flush=True)
    spec_info = []
    for d, n in specs:
        lengths = model.Shape(nranks=1, seq_len=n, docs=d).doc_lengths or (n,)
        spec_info.append({"docs": d, "seq_len": n, "doc_lengths": list(map(int, lengths))})
        print(
            f"documents {d} over N={n}: {len(lengths)} of {min(lengths)}..{max(lengths)} tokens (median {int(np.median(lengths))})"
            + (f", window {a.window}" if a.window else ""),
            flush=True,
        )
    probe = work / "probe.h5"
    for p in [] if a.reuse else a.ranks:
        cmd = [mpiexec(), "-n", p, sys.executable, "-m", "ringbench", "probe", "--out", probe, "--quiet"]
        cmd += ["--heads", a.heads, "--kv-heads", a.kv_heads, "--head-dim", a.head_dim, "--block-sizes", ",".join(map(str, a.probe_blocks))]
        run(cmd, a.timeout)
    exp = work / "packed-bench.yaml"
    exp.write_text(experiment_text(a))
    for k in range(0 if a.reuse else a.rounds):  # whole sweeps one after the other: the runs of a point are minutes apart
        run([sys.executable, "-m", "ringbench", "sweep", exp, "--results", work / "results"] + (["--force"] if k else []), a.timeout)
    runs = results.load(work / "results" / "packed-bench.h5")
    cal = model.calibrate([], store.read_probes(probe))
    rows = results.rows(runs, phases=("fwd",))
    for r in runs:  # schema 5: each balanced run stores the chunks per rank it was dealt; the rule must agree
        if r.status == "ok" and r.config.get("layout") == "balanced":
            lengths = model.Shape(nranks=r.nranks, seq_len=r.config["seq_len"], docs=r.config["docs"]).doc_lengths
            want = layout.balanced_chunks(r.nranks, r.config["seq_len"], lengths, a.window, True)
            if r.chunks_per_rank != want:
                print(f"packed_bench: warning: run {r.name} stored {r.chunks_per_rank} chunks per rank, the rule says {want}")
    print(report.calibration_text(cal))
    out = []
    for p in a.ranks:
        res = per_rank_count(rows, cal, p, cores, specs, a.window)
        print("\n" + res.pop("text"))
        out.append(res)
    print("\n" + overall(out))
    load_end = os.getloadavg()[0]
    print(f"\nload average {load_end:.2f} (1 min) at the end; the machine is shared: times carry other jobs' load")
    if a.out:
        record = {
            "bench": "packed",
            "provenance": {
                "cpu": provenance.cpu(),
                "cores": cores,
                "loadavg_start": load_start,
                "loadavg_end": load_end,
                "git_commit": provenance.git_commit(),
            },
            "specs": spec_info,
            "window": a.window,
            "shape": {"heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "repeat": a.repeat, "rounds": a.rounds},
            "calibration": cal.source,
            "per_rank_count": out,
        }
        Path(a.out).write_text(json.dumps(record, indent=1))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
