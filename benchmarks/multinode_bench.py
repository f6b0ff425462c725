"""Across two (emulated) nodes: does the model, calibrated by a probe of both link classes, pick the measured winner,
with the node link shaped and unshaped? Needs ``slurm/multinode.sh up`` (root).

    python benchmarks/multinode_bench.py [--rates 400mbit none] [--seq-len 2048 4096 8192] [--repeat 4]
                                         [--heads 4] [--head-dim 32] [--work DIR] [--out FILE.json]

For each link rate (``slurm/multinode.sh rate R``; ``none``: unshaped):

1. Calibration apart from the sweep: ``ringbench probe`` at P = 4, 2 ranks per node (the intra- and inter-node
   pairs and all-to-alls: the model's machine, ``advise.machine_from_probes``), and at every other swept P (one rank
   per node at P = 2): each P's points use the compute rates probed at that P, as a user probes the allocation the
   runs will have (P = 4 oversubscribes the 2 cores: its per-rank rate is not P = 2's).
2. The sweep, one launch per rank count (every point in it, this script's --worker under MPI): ring (overlap),
   allgather, ulysses, hybrid U=2 (node-local groups, P = 4 only) and pass-q, causal zigzag, timing fwd+bwd (a
   forward and a backward row each), at P = 2 (one rank per node: within the 2 cores) and P = 4 (two per node:
   oversubscribed 2x), reported apart.
3. The comparison (``results.strategy_points`` / ``strategy_agreement``, as benchmarks/strategy_bench.py): measured
   winner where the best and the runner-up differ by more than their spread, the predicted winner, the median
   |error| of the predicted times. Targets: winners agree on >= 90% of the decided points, median |error| <= 20%.
   Then the flip: points whose measured winner differs between the two rates, and whether the model's does too.

Prints the load average at the start and the end (the machine is shared). Exit status 0; 2 on bad options or when
the cluster is down (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WINNER_TARGET = 0.90
ERROR_TARGET = 0.20
SCRIPT = ROOT / "slurm" / "multinode.sh"
STATE = Path(os.environ.get("RINGBENCH_MULTINODE_DIR", "/tmp/ringbench-multinode"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", nargs="+", default=["400mbit", "none"], help="node link rates to compare (tc rates, or none)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], choices=[2, 4], help="rank counts (2: one per node, 4: two)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--probe-blocks", default="256,512,1024,2048")
    p.add_argument("--work", help="directory for the probe and result files (default: a temporary one)")
    p.add_argument("--out", help="write every figure here (JSON)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # under MPI: run the points of this JSON spec
    a = p.parse_args(argv)
    if a.worker is None and not (STATE / "net.up").exists():
        p.exit(2, f"multinode_bench: the emulated cluster is down ({STATE}/net.up missing): run slurm/multinode.sh up (as root)\n")
    return a


def worker(spec: dict) -> int:
    from ringbench.config import RunConfig
    from ringbench.engine import comm
    from ringbench.harness import runner

    for fields in spec["runs"]:
        runner.run(RunConfig.from_dict(fields), out=spec["out"], quiet=True)
    comm.barrier()
    return 0


def launch(n: int, ppn: int, argv: list, timeout: float) -> None:
    env = dict(os.environ, RINGBENCH_MPIEXEC=str(Path(sys.executable).parent / "mpiexec"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [str(STATE / "mpiexec"), "-ppn", str(ppn), "-n", str(n), sys.executable, *map(str, argv)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if res.returncode != 0:
        sys.exit(f"multinode_bench: {' '.join(cmd[:6])} ... failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")


def points_of(a: argparse.Namespace, nranks: int) -> list[dict]:
    base = dict(heads=a.heads, head_dim=a.head_dim, causal=True, layout="zigzag", repeat=a.repeat, warmup=1, memory_limit="none")
    base["pass"] = "fwd+bwd"
    modes = [("overlap", 1), ("allgather", 1), ("ulysses", 1), ("pass-q", 1)] + ([("hybrid", 2)] if nranks == 4 else [])
    return [{**base, "seq_len": n, "mode": m, "ulysses_degree": u} for n in a.seq_len for m, u in modes]


def compare(rows: list[dict], cal, machine) -> tuple[dict, list[dict]]:
    from ringbench.analysis import model, results

    points = results.strategy_points(rows)
    agr = results.strategy_agreement(points, lambda r: model.predict(results.shape(r), cal, machine).time_s)
    return agr, agr["points"]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker is not None:
        from ringbench.engine import comm

        return comm.run_or_abort(lambda: worker(json.loads(a.worker)))
    from ringbench import provenance, store
    from ringbench.analysis import advise, model, report, results

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="multinode_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"multinode_bench: {provenance.cpu()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    figures = {}
    by_rate = {}
    for rate in a.rates:
        subprocess.run([str(SCRIPT), "rate", rate], check=True, capture_output=True)
        tag = rate.replace(".", "_")
        cals, machine4 = {}, None
        for p in sorted(set(a.ranks) | {4}):  # the links from P = 4 (both classes); each P's compute from its own probe
            probe = work / f"probe-{tag}-P{p}.h5"
            launch(p, p // 2, ["-m", "ringbench", "probe", "--out", probe, "--quiet", "--heads", a.heads,
                               "--head-dim", a.head_dim, "--block-sizes", a.probe_blocks], a.timeout)  # fmt: skip
            probes = store.read_probes(probe)
            cals[p] = model.calibrate([], probes)
            s = probes[-1].summary
            if p == 4:
                machine4 = advise.machine_from_probes(probes)
                print(
                    f"\nlink {rate}: probe intra {s['intra_bandwidth_Bps'] / 1e9:.3f} GB/s ({s['intra_latency_s'] * 1e6:.0f} us), "
                    f"inter {s['inter_bandwidth_Bps'] / 1e9:.3f} GB/s ({s['inter_latency_s'] * 1e6:.0f} us)",
                    flush=True,
                )
            print(f"  probe at P = {p}: compute {s['rate_flops'] / 1e9:.1f} GFLOP/s per rank", flush=True)
        out = work / f"runs-{tag}.h5"
        for p in a.ranks:
            spec = {"out": str(out), "runs": points_of(a, p)}
            launch(p, p // 2, [Path(__file__).resolve(), "--worker", json.dumps(spec)], a.timeout)
        rows = results.rows(store.read(out))
        by_rate[rate] = {}
        for p in a.ranks:
            sub = [r for r in rows if r["nranks"] == p]
            machine = model.Machine(ranks_per_node=p // 2, intra=machine4.intra, inter=machine4.inter, source=machine4.source)
            agr, pts = compare(sub, cals[p], machine)
            share = agr["agree"] / agr["decided"] if agr["decided"] else float("nan")
            err = agr["median_abs_error"]
            verdict = (
                f"winner {'PASS' if share >= WINNER_TARGET else 'MISS'} (target >= {WINNER_TARGET:.0%}), "
                f"error {'PASS' if err <= ERROR_TARGET else 'MISS'} (target <= {ERROR_TARGET:.0%})"
            )
            label = "within the cores" if p <= (os.cpu_count() or 1) else "oversubscribed"
            print(f"  P = {p} ({p // 2} per node, {label}): {report.strategy_summary(agr)}\n    {verdict}")
            by = {}
            for q in pts:
                for strat, e in q["errors"].items():
                    by.setdefault(strat, []).append(e)
            print("    median signed error by strategy: " + ", ".join(f"{k} {np.median(v):+.0%}" for k, v in sorted(by.items())))
            body = [
                [q["phase"], str(q["seq_len"]), q["winner"] or "tie", q["predicted_winner"]]
                + [f"{q['times'][k] * 1e3:.1f}/{q['predicted'][k] * 1e3:.1f}" for k in sorted(q["times"])]
                for q in pts
            ]
            print(
                report.table(
                    ["phase", "N", "measured", "predicted"] + [f"{k} ms meas/model" for k in sorted(pts[0]["times"])], body, left=4
                )
            )
            by_rate[rate][p] = {(q["phase"], q["seq_len"]): (q["winner"], q["predicted_winner"]) for q in pts}
            figures[f"{rate} P={p}"] = {
                "decided": agr["decided"],
                "agree": agr["agree"],
                "winner_share": share,
                "median_abs_error": err,
                "signed_error_by_strategy": {k: float(np.median(v)) for k, v in by.items()},
                "points": [
                    {
                        "phase": q["phase"],
                        "seq_len": q["seq_len"],
                        "times_s": q["times"],
                        "predicted_s": q["predicted"],
                        "winner": q["winner"],
                        "predicted_winner": q["predicted_winner"],
                    }  # fmt: skip
                    for q in pts
                ],
            }
    if len(a.rates) >= 2:
        r0, r1 = a.rates[:2]
        print(f"\nwinner flips between link {r0} and {r1} (measured winners that differ; the model's at the same points):")
        flips = []
        for p in a.ranks:
            for key, (w0, pw0) in sorted(by_rate[r0][p].items()):
                w1, pw1 = by_rate[r1][p].get(key, (None, None))
                if w0 and w1 and w0 != w1:
                    flips.append({"P": p, "phase": key[0], "seq_len": key[1], "measured": [w0, w1], "predicted": [pw0, pw1]})
                    print(f"  P={p} {key[0]} N={key[1]}: measured {w0} -> {w1}; predicted {pw0} -> {pw1}"
                          f" ({'predicted' if (pw0, pw1) == (w0, w1) else 'missed'})")  # fmt: skip
        if not flips:
            print("  none")
        figures["flips"] = flips
    subprocess.run([str(SCRIPT), "rate", a.rates[0]], check=False, capture_output=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; the machine is shared: times carry other jobs' load")
    if a.out:
        Path(a.out).write_text(json.dumps({"bench": "multinode", "git_commit": provenance.git_commit(), "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
