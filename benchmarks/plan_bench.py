"""How long ``ringbench plan`` takes: load, expand and tabulate an experiment, in this process.

    python benchmarks/plan_bench.py [--ranks 1024 4096 16384 100000] [--points 10000] [--max-ranks 16384]
                                    [--reject-points 1000000] [--loop-ranks 1024] [--repeat 3]

Cases, each one experiment file written to a temporary directory and planned as ``ringbench plan`` does
(``experiment.load`` then ``sweep.plan_text``; no subprocess, so interpreter start-up is left out):

    one point   a single point at each of --ranks rank counts (causal zigzag: the layout with the most pieces)
    matrix      --points points: seeds x 10 rank counts, powers of two up to --max-ranks (the target case)
    reject      a matrix of --reject-points points (seed x batch), which must be refused with one line

The baseline measured in the same run is the step-plan loop that counted the unmasked pairs of one point
before the closed form (P^2 step plans), at --loop-ranks ranks: the ``loop/point`` column says how many
closed-form plans of one point fit in the time of that loop. Times are the median of --repeat runs, on the
wall clock and on this process's CPU clock. The target (ring issue 7, item 8): the matrix case (10,000
points, P up to 16,384) in under 1 s; the verdict reads the CPU clock, because on a shared machine the wall
clock counts the time other processes hold the core (planning is one thread, no I/O to speak of).
Exit status 0, or 2 on bad options.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import print_table, timed  # noqa: E402

from ringbench import (
    layout,  # noqa: E402
    provenance,  # noqa: E402
)
from ringbench.sweeps import experiment, sweep
from ringbench.sweeps.experiment import ExperimentError  # noqa: E402

TARGET_S = 1.0


def plan(path: Path, results: Path) -> int:
    exp = experiment.load(path)
    sweep.plan_text(exp, sweep.ResultDir(results, exp.name))
    return len(exp.points)


def reject(path: Path) -> str:
    try:
        experiment.load(path)
    except ExperimentError as exc:
        return str(exc)
    return "NOT REJECTED"


def loop_pairs(nranks: int, seq_len: int) -> int:
    """The step-plan loop the closed form replaced (the baseline): P^2 step plans of one causal zigzag point."""
    n = seq_len // nranks
    return sum(
        p.pairs() for r in range(nranks) for s in range(nranks) for p in layout.step_plan("zigzag", r, (r - s) % nranks, nranks, n, True)
    )


def rank_counts(max_ranks: int, count: int = 10) -> list[int]:
    out = []
    p = max_ranks
    while p >= 1 and len(out) < count:
        out.append(p)
        p //= 2
    return sorted(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="plan_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096, 16384, 100000], help="rank counts of the one-point case")
    p.add_argument("--points", type=int, default=10000, help="points of the matrix case (a multiple of the rank counts used)")
    p.add_argument("--max-ranks", type=int, default=16384, help="largest rank count of the matrix case")
    p.add_argument("--reject-points", type=int, default=1000000, help="points of the matrix that must be refused (0: skip)")
    p.add_argument("--loop-ranks", type=int, default=1024, help="rank count of the step-plan loop baseline (0: skip)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    ns = p.parse_args(argv)
    for opt in ("points", "max_ranks", "repeat"):
        if getattr(ns, opt) < 1:
            p.error(f"--{opt.replace('_', '-')}: expected an integer >= 1, got {getattr(ns, opt)}")
    if min(ns.ranks) < 1 or ns.reject_points < 0 or ns.loop_ranks < 0:
        p.error("--ranks, --reject-points, --loop-ranks: expected non-negative integers (ranks >= 1)")
    if ns.points % len(rank_counts(ns.max_ranks)):
        p.error(f"--points: expected a multiple of {len(rank_counts(ns.max_ranks))} (the rank counts of the matrix case)")
    return ns


def seq_len_for(ranks: list[int]) -> int:
    """The smallest power of two >= 1024 that every rank count's zigzag divisor divides."""
    n = 1024
    while any(n % (2 * r) for r in ranks):
        n *= 2
    return n


def main(argv=None) -> int:
    ns = parse_args(argv)
    model, simd = provenance.cpu_model(), provenance.simd_level(provenance.cpu_flags())
    print(f"plan_bench: {model}, SIMD {simd}, Python {platform.python_version()}; median of {ns.repeat} run(s), wall and CPU seconds")
    rows = [["case", "points", "P", "wall s", "cpu s", "result"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp, results = Path(tmp), Path(tmp) / "results"
        single = None
        for nranks in ns.ranks:
            path = tmp / f"one-{nranks}.yaml"
            path.write_text(f"name: one\nbase: {{seq_len: {2 * nranks * 64}, causal: true, layout: zigzag}}\nranks: [{nranks}]\n")
            wall, cpu, n = timed(lambda path=path: plan(path, results), ns.repeat)
            rows.append(["one point", str(n), str(nranks), f"{wall:.4f}", f"{cpu:.4f}", ""])
            single = single or (nranks, cpu)

        ranks = rank_counts(ns.max_ranks)
        seeds = ns.points // len(ranks)
        path = tmp / "matrix.yaml"
        path.write_text(
            f"name: matrix\nbase: {{seq_len: {seq_len_for(ranks)}, causal: true, layout: zigzag}}\n"
            f"matrix:\n  seed: [{', '.join(map(str, range(seeds)))}]\nranks: [{', '.join(map(str, ranks))}]\n"
        )
        wall, cpu, n = timed(lambda: plan(path, results), ns.repeat)
        verdict = "PASS" if cpu < TARGET_S else "FAIL"
        rows.append(["matrix", str(n), f"{ranks[0]}..{ranks[-1]}", f"{wall:.4f}", f"{cpu:.4f}", f"target cpu < {TARGET_S:g} s: {verdict}"])

        if ns.reject_points:
            side = max(1, round(ns.reject_points**0.5))
            path = tmp / "reject.yaml"
            path.write_text(
                f"name: reject\nmatrix:\n  seed: [{', '.join(map(str, range(side)))}]\n"
                f"  batch: [{', '.join(map(str, range(1, ns.reject_points // side + 1)))}]\n"
            )
            wall, cpu, msg = timed(lambda: reject(path), ns.repeat)
            rows.append(["reject", str(side * (ns.reject_points // side)), "1", f"{wall:.4f}", f"{cpu:.4f}", msg.split(": ", 1)[-1][:70]])

        if ns.loop_ranks:
            seq = 2 * ns.loop_ranks * 64
            wall, cpu, _ = timed(lambda: loop_pairs(ns.loop_ranks, seq), 1)
            ratio = f"loop/point {cpu / single[1]:.3g}x (one point at P={single[0]})" if single and single[1] > 0 else ""
            rows.append(["baseline loop", "1", str(ns.loop_ranks), f"{wall:.4f}", f"{cpu:.4f}", ratio])
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
