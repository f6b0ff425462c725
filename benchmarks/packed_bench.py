"""Packed documents: does the work-balanced layout balance, is it faster than global zigzag, does the model pick the
winning strategy and layout? Probe, sweep, then compare (issue 20's targets).

    python benchmarks/packed_bench.py [--ranks 2 4] [--seq-len 8192] [--docs lognormal:mean=1024,sigma=1.3,seed=7]
                                      [--window W] [--modes overlap allgather ulysses pass-q]
                                      [--layouts zigzag doc-zigzag balanced contiguous] [--heads 4] [--kv-heads 2]
                                      [--head-dim 64] [--repeat 5] [--rounds 3] [--work DIR] [--out FILE.json]

1. Calibration, apart from the sweep: ``mpiexec -n P ringbench probe`` at every rank count (strategy_bench's probe:
   per-piece rates, the causal diagonal blocks, the link, the copy rate); the model is ``model.calibrate([], probes)``.
2. The sweep: every strategy (``--modes``) x layout (``--layouts``) on one long-tailed document spec (``--docs``),
   causal, at each ``--ranks``, ``--rounds`` whole sweeps one after the other (sweep --force: interleaved rounds, the
   repeats of a point pooled), so a burst of other jobs' load spoils one round of a point, not all of it.
3. Per rank count (reported apart; a P above this machine's cores is oversubscribed and says so), per strategy and
   layout: the pass time (median of the pooled repeats), the pairs' imbalance (max / mean over ranks of the pairs the
   plans gave each rank), the measured compute imbalance (max / mean of the summed compute_s), the model's time and
   its error, and the time of global zigzag over this layout's, for the same strategy in the same sweep
   (``measure.compare``: its bootstrap interval and verdict).
   Targets: balanced's pairs imbalance <= 1.10 (within 10% of perfect); its time >= 1.2x better than zigzag's (same
   strategy) wherever zigzag's pairs imbalance exceeds 1.3; the model's predicted winner (over every strategy and
   layout of a point: the spec, N, P) is the measured one on >= 90% of the points with a significant measured winner;
   the median |error| of its times <= 20%.

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
POINT_KEYS = ("winner", "best", "runner_up", "predicted_winner", "verdict")  # what the JSON keeps of a point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="rank counts (default 2 4)")
    p.add_argument("--seq-len", type=int, default=8192, help="N (default 8192)")
    p.add_argument("--docs", default="lognormal:mean=1024,sigma=1.3,seed=7", help="the documents' spec (a long-tailed one)")
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
    for opt in ("ranks", "probe_blocks"):
        if any(v < 1 for v in getattr(a, opt)):
            p.exit(2, f"packed_bench: --{opt.replace('_', '-')}: expected positive integers, got {getattr(a, opt)}\n")
    bad = [m for m in a.modes if m not in ("overlap", "blocking", "allgather", "ulysses", "pass-q")]
    if bad:
        p.exit(2, f"packed_bench: --modes: {bad[0]!r} is not one of overlap, blocking, allgather, ulysses, pass-q\n")
    from ringbench.config import RunConfig, validate

    for nranks in a.ranks:
        for lay in a.layouts:
            cfg = RunConfig(seq_len=a.seq_len, causal=True, layout=lay, docs=a.docs, window=a.window, heads=a.heads, kv_heads=a.kv_heads)
            problems = validate(cfg, nranks)
            if problems:
                key, msg = problems[0]
                p.exit(2, f"packed_bench: --{key.replace('_', '-')}: {msg} (layout {lay}, P={nranks})\n")
    return a


def experiment_text(a: argparse.Namespace) -> str:
    import yaml

    base = {"heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "causal": True, "seq_len": a.seq_len}
    base.update(docs=a.docs, repeat=a.repeat, warmup=1)
    if a.window:
        base["window"] = a.window
    data = {
        "name": "packed-bench",
        "description": "built-in variant of experiments/packed.yaml (benchmarks/packed_bench.py)",
        "base": base,
        "matrix": {"mode": list(a.modes), "layout": list(a.layouts)},
        "ranks": list(a.ranks),
        "timeout": int(a.timeout),
    }
    return yaml.safe_dump(data, sort_keys=False)


def pooled(rows: list[dict]) -> dict:
    """{(strategy, layout): {"repeats", "row", "pairs", "compute"}} of one rank count's rows, repeated runs pooled."""
    out: dict = {}
    for r in rows:
        if r["status"] != "ok" or r.get("time_s") is None:
            continue
        d = out.setdefault((results.strategy_label(r), r["layout"]), {"repeats": [], "row": r, "pairs": [], "compute": []})
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


def per_rank_count(rows: list[dict], cal: model.Calibration, nranks: int, cores: int) -> dict:
    """The table, the targets and the model's agreement at one rank count."""
    sub = [r for r in rows if r["nranks"] == nranks]
    by = pooled(sub)
    body, cells = [], []
    for (strat, lay), d in sorted(by.items(), key=lambda kv: (kv[0][0] != "overlap", kv[0])):
        med = float(np.median(d["repeats"]))
        pred = model.predict(results.shape(d["row"]), cal).time_s
        base = by.get((strat, "zigzag"))
        # zigzag's time over this layout's (> 1: this layout is faster), its interval and verdict
        cmp_ = measure.compare(base["repeats"], d["repeats"]) if base is not None and lay != "zigzag" else None
        pairs = float(np.median([x for x in d["pairs"] if x is not None])) if any(x is not None for x in d["pairs"]) else float("nan")
        comp = float(np.median([x for x in d["compute"] if x is not None])) if any(x is not None for x in d["compute"]) else float("nan")
        cell = {
            "strategy": strat,
            "layout": lay,
            "time_s": med,
            "repeats_s": list(map(float, d["repeats"])),
            "pairs_imbalance": pairs,
            "compute_imbalance": comp,
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
                lay,
                f"{med * 1e3:.2f}",
                f"{pairs:.3f}",
                f"{comp:.3f}",
                f"{pred * 1e3:.2f}",
                f"{cell['error']:+.0%}",
                "-" if cmp_ is None else f"{cmp_.ratio:.2f}x [{cmp_.lo:.2f}, {cmp_.hi:.2f}] {cmp_.verdict}",
            ]
        )
    head = ["strategy", "layout", "time ms", "pairs imb", "compute imb", "model ms", "model err", "zigzag / this (same strategy)"]
    table = report.table(head, body, left=2)
    # targets
    bal = [c for c in cells if c["layout"] == "balanced" and c["strategy"] in RING_MODES]
    balance_ok = bool(bal) and all(c["pairs_imbalance"] <= BALANCE_TARGET for c in bal)
    speed = []
    for c in cells:
        if c["layout"] != "balanced" or c["strategy"] not in RING_MODES:
            continue
        zig = next((z for z in cells if z["layout"] == "zigzag" and z["strategy"] == c["strategy"]), None)
        if zig is not None and zig["pairs_imbalance"] > ZIGZAG_IMBALANCE:
            speed.append(
                {
                    "strategy": c["strategy"],
                    "speedup": c["zigzag_over_this"],
                    "ci": c["ci"],
                    "pass": c["zigzag_over_this"] >= SPEEDUP_TARGET,
                }
            )
    bal_text = ", ".join(f"{c['strategy']} {c['pairs_imbalance']:.3f}" for c in bal)
    points = results.strategy_points(candidate_rows(sub))
    agr = results.strategy_agreement(points, lambda r: model.predict(results.shape(r["orig"]), cal).time_s)
    share = agr["agree"] / agr["decided"] if agr["decided"] else float("nan")
    # which layout for each strategy: one point per strategy, its layouts the candidates
    lay_points = results.strategy_points(layout_rows(sub))
    lay_agr = results.strategy_agreement(lay_points, lambda r: model.predict(results.shape(r["orig"]), cal).time_s)
    lay_share = lay_agr["agree"] / lay_agr["decided"] if lay_agr["decided"] else float("nan")
    lines = [
        f"P = {nranks}{' (oversubscribed: more ranks than the ' + str(cores) + ' cores)' if nranks > cores else ''}",
        table,
        f"  balanced's pairs imbalance (ring modes): {bal_text or 'none run'} -> {'PASS' if balance_ok else 'MISS'}"
        f" (target <= {BALANCE_TARGET:.2f})",
    ]
    if speed:
        lines.append(
            "  balanced vs zigzag where zigzag's imbalance > 1.3: "
            + ", ".join(f"{s['strategy']} {s['speedup']:.2f}x {'PASS' if s['pass'] else 'MISS'}" for s in speed)
            + f" (target >= {SPEEDUP_TARGET:.1f}x)"
        )
    else:
        lines.append("  balanced vs zigzag: zigzag's imbalance is at most 1.3 here (no speed-up target applies)")
    for p in agr["points"]:
        lines.append(
            f"  winner: measured {p['winner'] or 'none (a tie within the noise: ' + p['best'] + ' vs ' + p['runner_up'] + ')'}, "
            f"predicted {p['predicted_winner']}"
        )
    err = agr["median_abs_error"]
    won = "PASS" if agr["decided"] and share >= WINNER_TARGET else "MISS"
    lines.append(
        f"  model: winner over strategies x layouts {agr['agree']}/{agr['decided']} decided points {won} (target >= {WINNER_TARGET:.0%}); "
        f"median |error| {err:.1%} {'PASS' if err <= ERROR_TARGET else 'MISS'} (target <= {ERROR_TARGET:.0%})"
    )
    for p in lay_agr["points"]:
        strat = p["layout"]  # layout_rows keys the strategy there
        measured = p["winner"] or f"none (a tie within the noise: {p['best']} vs {p['runner_up']})"
        lines.append(f"  layout for {strat}: measured {measured}, predicted {p['predicted_winner']}")
    lay_won = "PASS" if lay_agr["decided"] and lay_share >= WINNER_TARGET else "MISS"
    lines.append(f"  model: the layout for each strategy {lay_agr['agree']}/{lay_agr['decided']} decided points {lay_won}")
    return {
        "text": "\n".join(lines),
        "nranks": nranks,
        "oversubscribed": nranks > cores,
        "cells": cells,
        "balance_pass": balance_ok,
        "speedups": speed,
        "winner": {"agree": agr["agree"], "decided": agr["decided"], "ties": agr["ties"], "share": share},
        "layout_winner": {"agree": lay_agr["agree"], "decided": lay_agr["decided"], "ties": lay_agr["ties"], "share": lay_share},
        "layout_points": [
            {"strategy": p["layout"], **{k: p[k] for k in ("winner", "best", "runner_up", "predicted_winner", "verdict")}}
            for p in lay_agr["points"]
        ],
        "points": [
            {
                "winner": p["winner"],
                "best": p["best"],
                "runner_up": p["runner_up"],
                "predicted_winner": p["predicted_winner"],
                "verdict": p["verdict"],
            }
            for p in agr["points"]
        ],
        "median_abs_error": err,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    cores = os.cpu_count() or 1
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="packed_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    docs = model.Shape(nranks=1, seq_len=a.seq_len, docs=a.docs).doc_lengths
    print(f"packed_bench: {provenance.cpu()}, {cores} cores, load average {load_start:.2f} (1 min) at the start", flush=True)
    print(
        f"documents {a.docs} over N={a.seq_len}: {len(docs)} of {min(docs)}..{max(docs)} tokens (median {int(np.median(docs))})"
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
    print(report.calibration_text(cal))
    out = []
    for p in a.ranks:
        res = per_rank_count(rows, cal, p, cores)
        print("\n" + res.pop("text"))
        out.append(res)
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
            "docs": a.docs,
            "doc_lengths": list(map(int, docs)),
            "window": a.window,
            "seq_len": a.seq_len,
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
