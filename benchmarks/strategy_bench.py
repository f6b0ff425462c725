"""Does the model pick the fastest context-parallel strategy? Probe, sweep, then compare (issue 11's targets).

    python benchmarks/strategy_bench.py [--ranks 2] [--experiment experiments/strategies.yaml]
                                        [--seq-len 1024 2048 4096] [--layout zigzag contiguous] [--pass fwd]
                                        [--repeat 5] [--rounds 3] [--work DIR] [--out FILE.json]

1. Calibration, separate from the sweep: ``mpiexec -n P ringbench probe --out WORK/probe.h5`` at every rank count
   (compute rate at several block sizes, ring link latency / bandwidth).
2. The sweep: ``ringbench sweep`` of ``--experiment`` (its matrix, at ``--ranks``), or by default a built-in variant
   of experiments/strategies.yaml (overlap, allgather, ulysses, pass-q, and hybrid U=2 where P > 2; causal, GQA 8/2,
   D=64, every point --check'ed) over ``--layout`` (zigzag: balanced ring; contiguous: the causal ring is
   unbalanced, Ulysses is not) and ``--seq-len``, timing ``--pass``.
   ``--rounds`` K sweeps every point K times, one whole sweep after the other, and the comparison pools their
   repeats (``results.strategy_points`` pools the runs of a point): on a shared machine a burst of other jobs'
   load then spoils one run of a point rather than all its samples.
3. The comparison, with the model calibrated from the probes only (``model.calibrate([], probes)``): per point
   (an (N, P) run with two or more strategies), the measured winner where ``measure.compare`` of the best and
   the runner-up is significant (else a tie within the noise), the predicted winner, and the error of each
   strategy's predicted time. Targets: predicted = measured winner on >= 90% of the points with a measured
   winner; median |error| <= 20%. Rank counts above this machine's cores oversubscribe them and are reported
   apart. Then per strategy, where the model's time goes wrong: the measured compute of each step (median over
   repeats of the slowest rank) against the model's, and the local work of the all-to-all steps (packing copies)
   and of pass-Q's return step (the last merge) against the model's copy term.

Prints the CPU (ringbench.provenance.cpu()) and the load average; --out keeps every figure as JSON.
Exit status 0; 2 on bad options (one line).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ringbench import provenance, store  # noqa: E402
from ringbench.analysis import measure, model, report, results  # noqa: E402

WINNER_TARGET = 0.90
ERROR_TARGET = 0.20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts (default 2)")
    p.add_argument("--experiment", help="sweep this experiment file's matrix instead of the built-in variant (ranks from --ranks)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096], help="built-in variant: sequence lengths")
    p.add_argument(
        "--layout",
        nargs="+",
        default=["zigzag", "contiguous"],
        choices=["zigzag", "contiguous", "striped"],
        help="built-in variant: causal layouts",
    )
    p.add_argument("--pass", dest="pass_", default="fwd", choices=["fwd", "bwd", "fwd+bwd"], help="built-in variant: the pass timed")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="built-in variant: timed passes per run")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="sweep every point this many times, one whole sweep after the other (sweep --force), and pool the repeats: "
        "a burst of other jobs' load then spoils one run of a point, not all its samples (default 3)",
    )
    p.add_argument("--probe-blocks", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="probe block sizes")
    p.add_argument("--work", help="directory for the probe and result files (default: a temporary one, removed)")
    p.add_argument("--out", help="write every figure here (JSON)")
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.exit(2, f"strategy_bench: --rounds: expected a positive integer, got {a.rounds}\n")
    for opt in ("ranks", "seq_len", "probe_blocks"):
        if any(v < 1 for v in getattr(a, opt)):
            p.exit(2, f"strategy_bench: --{opt.replace('_', '-')}: expected positive integers, got {getattr(a, opt)}\n")
    if a.repeat < measure.MIN_REPEATS:
        p.exit(2, f"strategy_bench: --repeat: at least {measure.MIN_REPEATS} (a winner needs a confidence interval), got {a.repeat}\n")
    if a.experiment and not Path(a.experiment).is_file():
        p.exit(2, f"strategy_bench: --experiment: no such file {a.experiment}\n")
    return a


def mpiexec() -> str:
    near = Path(sys.executable).parent / "mpiexec"
    return str(near) if near.exists() else (shutil.which("mpiexec") or "mpiexec")


def run(cmd: list, timeout: float) -> None:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"strategy_bench: {' '.join(map(str, cmd[:6]))} ... failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")


def experiment_text(a: argparse.Namespace) -> str:
    """The experiment to sweep: --experiment with its ranks replaced, or the built-in variant."""
    import yaml

    if a.experiment:
        data = yaml.safe_load(Path(a.experiment).read_text())
        data["ranks"] = list(a.ranks)
        data["name"] = "strategy-bench"
        return yaml.safe_dump(data, sort_keys=False)
    modes = ["overlap", "allgather", "ulysses", "pass-q"] + (["hybrid"] if any(p > 2 and p % 2 == 0 for p in a.ranks) else [])
    data = {
        "name": "strategy-bench",
        "description": "built-in variant of experiments/strategies.yaml (benchmarks/strategy_bench.py)",
        "base": {
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "head_dim": a.head_dim,
            "causal": True,
            "pass": a.pass_,
            "check": True,
            "repeat": a.repeat,
            "warmup": 1,
        },
        "matrix": {
            "mode": modes,
            "ulysses_degree": [1, 2] if "hybrid" in modes else [1],
            "layout": list(a.layout),
            "seq_len": list(a.seq_len),
        },
        "ranks": list(a.ranks),
        "timeout": int(a.timeout),
    }
    if "hybrid" in modes:
        data["exclude"] = [{"mode": [m for m in modes if m != "hybrid"], "ulysses_degree": 2}, {"mode": "hybrid", "ulysses_degree": 1}]
    return yaml.safe_dump(data, sort_keys=False)


def step_terms(runs, cal: model.Calibration) -> list[dict]:
    """Per strategy run: the measured compute of each step (median over repeats of the slowest rank) and the model's.

    ``local_s``: the measured local work of the all-to-all steps (0 and last: packing copies, the loads and the
    finalize) of ulysses / hybrid, and of pass-Q's last step (the return and its merge); ``local_model_s`` the model's
    (its copy term at the probe's copy rate)."""
    out = []
    for run in runs:
        if run.status != "ok" or run.config["mode"] not in ("ulysses", "hybrid", "pass-q"):
            continue
        for phase in run.phases():
            ph = run.phase(phase)
            shape = model.Shape.from_config(run.config, run.nranks).with_(pass_=phase)
            pred = model.predict(shape, cal)
            measured = np.median(np.asarray(ph.samples["compute_s"]).max(axis=1), axis=0)  # (S,)
            predicted = np.asarray(pred.compute_s).max(axis=0)
            ends = [0, -1] if shape.mode != "pass-q" else [-1]
            local, local_model = measured[ends].sum(), predicted[ends].sum()
            out.append(
                {
                    "strategy": results.strategy_label(results.row(run)),
                    "phase": phase,
                    "layout": shape.layout,
                    "seq_len": shape.seq_len,
                    "nranks": run.nranks,
                    "time_s": float(ph.summary["time_s"]),
                    "predicted_s": float(pred.time_s),
                    "compute_measured_s": measured.tolist(),
                    "compute_predicted_s": predicted.tolist(),
                    "local_s": float(local),
                    "local_model_s": float(local_model),
                    "local_share": float(local / ph.summary["time_s"]),
                }
            )
    return out


def ablate(rows: list[dict], cal: model.Calibration) -> dict:
    """Winner agreement and median |error| of the model without its per-piece rates (causal diagonal blocks at their
    own measured rate) and / or its local-copy term, on the points within the cores: which term earns its keep."""
    cores = os.cpu_count() or 1
    points = results.strategy_points([r for r in rows if r["nranks"] <= cores])
    variants = {
        "full model": cal,
        "without the copy term": dataclasses.replace(cal, copy_bw={}),
        "without per-piece rates": dataclasses.replace(cal, diag_rates={}, bwd_diag_rates={}),
        "without both (the 2026-11-25 model)": dataclasses.replace(cal, copy_bw={}, diag_rates={}, bwd_diag_rates={}),
    }
    out = {}
    for name, c in variants.items():
        agr = results.strategy_agreement(copy.deepcopy(points), lambda r, c=c: model.predict(results.shape(r), c).time_s)
        out[name] = {"agree": agr["agree"], "decided": agr["decided"], "median_abs_error": agr["median_abs_error"]}
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    cores = os.cpu_count() or 1
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="strategy_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"strategy_bench: {provenance.cpu()}, {cores} cores, load average {os.getloadavg()[0]:.2f} (1 min) at the start", flush=True)
    probe = work / "probe.h5"
    for p in a.ranks:
        cmd = [mpiexec(), "-n", p, sys.executable, "-m", "ringbench", "probe", "--out", probe, "--quiet"]
        cmd += ["--heads", a.heads, "--kv-heads", a.kv_heads, "--head-dim", a.head_dim, "--block-sizes", ",".join(map(str, a.probe_blocks))]
        run(cmd, a.timeout)
    exp = work / "strategy-bench.yaml"
    exp.write_text(experiment_text(a))
    for k in range(a.rounds):  # whole sweeps one after the other: the runs of a point are minutes apart
        run([sys.executable, "-m", "ringbench", "sweep", exp, "--results", work / "results"] + (["--force"] if k else []), a.timeout)
    runs = results.load(work / "results" / "strategy-bench.h5")
    probes = store.read_probes(probe)
    cal = model.calibrate([], probes)
    load_end = os.getloadavg()[0]

    rows = results.rows(runs)
    print(report.calibration_text(cal))
    print(report.strategy_text(rows, cal) or "no point has two strategies")
    summary = {}
    for name, keep in (("within the cores", lambda p: p <= cores), ("oversubscribed", lambda p: p > cores)):
        sub = [r for r in rows if keep(r["nranks"])]
        points = results.strategy_points(sub)
        if not points:
            continue
        agr = results.strategy_agreement(points, lambda r: model.predict(results.shape(r), cal).time_s)
        share = agr["agree"] / agr["decided"] if agr["decided"] else float("nan")
        err = agr["median_abs_error"]
        verdict = (
            f"winner {'PASS' if share >= WINNER_TARGET else 'MISS'} (target >= {WINNER_TARGET:.0%}), "
            f"error {'PASS' if err <= ERROR_TARGET else 'MISS'} (target <= {ERROR_TARGET:.0%})"
        )
        ranks = sorted({p["nranks"] for p in points})
        print(f"\nP = {', '.join(map(str, ranks))} ({name}, {cores} cores): {report.strategy_summary(agr)}\n  {verdict}")
        by = {}
        for p in points:
            for s, e in p["errors"].items():
                by.setdefault(s, []).append(e)
        print("  median signed error by strategy: " + ", ".join(f"{s} {np.median(v):+.0%}" for s, v in sorted(by.items())))
        summary[name] = {
            "ranks": ranks,
            "points": len(points),
            "decided": agr["decided"],
            "agree": agr["agree"],
            "ties": agr["ties"],
            "winner_share": share,
            "median_abs_error": err,
            "signed_error_by_strategy": {s: float(np.median(v)) for s, v in by.items()},
            "verdict": verdict,
        }
    ablation = ablate(rows, cal)
    print("\nthe model without each of its newer terms, on the same runs (within the cores):")
    for name, a_ in ablation.items():
        print(f"  {name:34s} winner {a_['agree']}/{a_['decided']}, median |error| {a_['median_abs_error']:.1%}")
    terms = step_terms(runs, cal)
    if terms:
        print("\nlocal work (all-to-all steps' pack/load/finalize, pass-Q's last merge): measured and the model's copy term")
        body = [
            [
                t["strategy"],
                t["phase"],
                t["layout"],
                str(t["seq_len"]),
                str(t["nranks"]),
                f"{t['time_s'] * 1e3:.2f}",
                f"{t['predicted_s'] * 1e3:.2f}",
                f"{sum(t['compute_measured_s']) * 1e3:.2f}",
                f"{sum(t['compute_predicted_s']) * 1e3:.2f}",
                f"{t['local_s'] * 1e3:.2f}",
                f"{t['local_model_s'] * 1e3:.2f}",
                f"{t['local_share']:.1%}",
            ]
            for t in terms
        ]
        head = [
            "strategy",
            "phase",
            "layout",
            "N",
            "P",
            "time ms",
            "model ms",
            "compute ms",
            "model compute ms",
            "local ms",
            "model local ms",
            "local/time",
        ]
        print(report.table(head, body, left=3))
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min) at the end; the machine is shared: times carry other jobs' load")
    if a.out:
        per_point = [
            {
                "phase": p["phase"],
                "layout": p["layout"],
                "seq_len": p["seq_len"],
                "nranks": p["nranks"],
                "times_s": p["times"],
                "repeats_s": p["repeats"],
                "predicted_s": p["predicted"],
                "winner": p["winner"],
                "best": p["best"],
                "runner_up": p["runner_up"],
                "speedup": p["speedup"],
                "ci": [p["ci_lo"], p["ci_hi"]],
                "verdict": p["verdict"],
                "predicted_winner": p["predicted_winner"],
                "errors": p["errors"],
            }
            for p in results.strategy_agreement(results.strategy_points(rows), lambda r: model.predict(results.shape(r), cal).time_s)[
                "points"
            ]
        ]
        Path(a.out).write_text(
            json.dumps(
                {
                    "bench": "strategy",
                    "provenance": {
                        "cpu": provenance.cpu(),
                        "cores": cores,
                        "loadavg_end": load_end,
                        "git_commit": provenance.git_commit(),
                    },
                    "calibration": cal.source,
                    "summary": summary,
                    "points": per_point,
                    "step_terms": terms,
                    "ablation": ablation,
                },
                indent=1,
            )
        )
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
