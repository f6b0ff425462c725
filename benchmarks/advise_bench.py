"""How long ``ringbench advise`` takes at large rank counts, every strategy, in this process.

    python benchmarks/advise_bench.py [--ranks 1024 4096 16384 65536] [--baseline-ranks 32 64] [--repeat 3]

Each case is ``advise.format_advice`` as the CLI runs it (no subprocess, so interpreter start-up and reading the
calibration file are left out): one sequence length (64 tokens per rank) and the scan of SCAN_TOKENS block sizes
for the winner's changes, every candidate strategy (ring, allgather, ulysses, hybrid at every U dividing P,
pass-q), causal zigzag, forward + backward, with a probe-like calibration (per-piece rates, copy rate: the
model's costliest path). Two head counts:

    heads 8       the usual case: hybrid U > 8 and ulysses are refused by the heads rule before any prediction
    heads 4096    every strategy the configuration rules allow (U up to 4096) is predicted: the worst case

The baseline measured in the same run is the model before the step classes (tests/analysis/model_reference.py: the
(P, P) evaluation, P^2 step plans per strategy, P^2 U^2 pieces for hybrid) on the same cases at
--baseline-ranks; the ``old/new`` column is its time over the new model's at that P, and ``same`` says whether
every predicted time is identical, bit for bit. Times are the median of --repeat runs, wall clock and this
process's CPU clock. The target (issue 15, item 6): every case with P up to 16,384 in under 1 s; the verdict reads
the CPU clock (on a shared machine the wall clock counts the time other processes hold the core; advise is one
thread, no I/O). The last row is the refusal above advise.MAX_RANKS. Exit status 0, or 2 on bad options.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests" / "analysis"))  # model_reference: the old evaluation, the baseline

from _common import print_table, timed  # noqa: E402

from ringbench import provenance  # noqa: E402
from ringbench.analysis import advise, model  # noqa: E402

TARGET_S = 1.0
TARGET_RANKS = 16384
HEADS = (8, 4096)


def calibration() -> model.Calibration:
    """A probe's kind of calibration: full and diagonal-block rates over block sizes, a link, a copy rate."""
    pts = [(1e6, 2e10), (1e8, 6e10), (1e10, 9e10)]
    return model.Calibration(
        rates={2: pts},
        links={2: (3e-6, 1.2e10)},
        diag_rates={2: [(w, r / 3) for w, r in pts]},
        bwd_rates={2: [(2.5 * w, r * 0.8) for w, r in pts]},
        bwd_diag_rates={2: [(2.5 * w, r / 4) for w, r in pts]},
        copy_bw={2: 2.5e10},
        source="synthetic probe",
    )


def base(heads: int) -> model.Shape:
    return model.Shape(nranks=1, seq_len=1, heads=heads, kv_heads=heads, head_dim=64, causal=True, layout="zigzag", pass_="fwd+bwd")


def advise_times(heads: int, nranks: int, cal: model.Calibration) -> list:
    """Every predicted time of one case, in order (the candidates at the sequence length, then at each scanned size;
    None: refused), as advise computes them."""
    shape = base(heads)
    return [c.time_s for n in [64, *advise.SCAN_TOKENS] for c in advise.candidates(shape.with_(seq_len=n * nranks), nranks, cal)]


def identical(a: list, b: list) -> bool:
    """The same times bit for bit (nan as nan, refused as refused)."""
    return len(a) == len(b) and all(x == y or (x is not None and y is not None and x != x and y != y) for x, y in zip(a, b))


def run_case(heads: int, nranks: int, cal: model.Calibration) -> tuple[str, int]:
    """format_advice of one case (what the CLI prints) and how many strategies it predicted."""
    text = advise.format_advice(base(heads), [64 * nranks], [nranks], cal)
    block = text.split("\n\n")[1]  # the candidates at the sequence length
    return text, sum(1 for line in block.splitlines() if " ms " in line or " s  " in line)


class OldModel:
    """advise with the old (P, P) evaluation in place of model.predict (the baseline)."""

    def __enter__(self):
        import model_reference

        self.predict = model.predict
        model.predict = lambda shape, cal, machine=None, per_rank=True: model_reference.predict(shape, cal, machine)
        return self

    def __exit__(self, *exc):
        model.predict = self.predict


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="advise_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="rank counts of the new model's cases")
    p.add_argument("--baseline-ranks", type=int, nargs="*", default=[32, 64], help="rank counts of the old model's cases (none: skip)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (median; the baseline runs once)")
    ns = p.parse_args(argv)
    if ns.repeat < 1:
        p.error(f"--repeat: expected an integer >= 1, got {ns.repeat}")
    for opt in ("ranks", "baseline_ranks"):
        vals = getattr(ns, opt)
        if any(v < 1 or v > advise.MAX_RANKS for v in vals):
            p.error(f"--{opt.replace('_', '-')}: expected rank counts from 1 to {advise.MAX_RANKS}, got {vals}")
    return ns


def main(argv=None) -> int:
    ns = parse_args(argv)
    name, simd = provenance.cpu_model(), provenance.simd_level(provenance.cpu_flags())
    print(
        f"advise_bench: {name}, SIMD {simd}, Python {platform.python_version()}; median of {ns.repeat} run(s), wall and CPU seconds; "
        f"{1 + len(advise.SCAN_TOKENS)} block sizes per case"
    )
    cal = calibration()
    rows = [["case", "heads", "P", "predicted", "wall s", "cpu s", "result"]]
    new_cpu = {}
    for nranks in sorted(set(ns.ranks) | set(ns.baseline_ranks)):
        for heads in HEADS:
            wall, cpu, (_, npred) = timed(lambda h=heads, p=nranks: run_case(h, p, cal), ns.repeat)
            new_cpu[heads, nranks] = cpu
            verdict = ""
            if nranks <= TARGET_RANKS:
                verdict = f"target cpu < {TARGET_S:g} s: {'PASS' if cpu < TARGET_S else 'FAIL'}"
            rows.append(["advise", str(heads), str(nranks), str(npred), f"{wall:.4f}", f"{cpu:.4f}", verdict])
    for nranks in ns.baseline_ranks:
        for heads in HEADS:
            new = advise_times(heads, nranks, cal)
            with OldModel():
                wall, cpu, (_, npred) = timed(lambda h=heads, p=nranks: run_case(h, p, cal), 1)
                old = advise_times(heads, nranks, cal)
            same = identical(old, new)
            ratio = cpu / new_cpu[heads, nranks] if new_cpu[heads, nranks] > 0 else float("inf")
            rows.append(
                ["baseline (old)", str(heads), str(nranks), str(npred), f"{wall:.4f}", f"{cpu:.4f}", f"old/new {ratio:.3g}x, same: {same}"]
            )
    over = advise.MAX_RANKS * 16
    wall, cpu, msg = timed(lambda: advise.check_ranks([over]), ns.repeat)
    rows.append(["refuse", "-", str(over), "0", f"{wall:.4f}", f"{cpu:.4f}", msg or "NOT REFUSED"])
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
