"""How much of each ring step's transfer compute hides, and how long ranks wait for a slower one (issue 21's targets).

    python benchmarks/overlap_bench.py [--ranks 2 3] [--kernel native torch] [--causal both] [--pass fwd+bwd]
                                       [--progress test async] [--seq-len 8192] [--heads 8] [--head-dim 64]
                                       [--repeat 3] [--out FILE.json]

For every combination it runs ``mpiexec -n P ringbench run --mode overlap`` (each rank one thread) into a temporary
result file and reads back, per timed phase: the overlap efficiency (1 - not hidden / transfer alone, from the
samples' ``unhidden_s``), the two parts of the exposed communication (``unhidden_comm_s``: waiting for a transfer
both neighbours had posted; ``partner_wait_s``: waiting for a neighbour still computing), the transfer alone (the
comm-only passes), and whether the target applies: >= 90% hidden wherever every step's compute (the fastest rank's,
median over repeats) is longer than that step's transfer alone.

``--progress``: how MPI progresses the transfers while a rank computes. ``test``: ringbench's MPI_Testall between
score tiles (the native kernel) or between the fused kernel's calls on chunks of heads (``--kernel torch``);
``async``: no Testall (``--progress none``) and MPICH's progress thread instead (``MPIR_CVAR_ASYNC_PROGRESS=1``,
which needs MPI_THREAD_MULTIPLE: mpi4py asks for it); ``none``: neither (the baseline: nothing moves until the wait).

Prints the CPU, NumPy's SIMD level and the load average; --out keeps every figure as JSON. Exit status 0; 2 on bad
options (one line).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ringbench import provenance, store  # noqa: E402
from ringbench.analysis import measure  # noqa: E402

TARGET = 0.90
MASKS = {"no": [False], "yes": [True], "both": [False, True]}
PROGRESS = {  # --progress: (ringbench --progress, extra environment)
    "test": ("test", {}),
    "async": ("none", {"MPIR_CVAR_ASYNC_PROGRESS": "1"}),
    "none": ("none", {}),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad option: one line on stderr, exit status 2."""
        sys.stderr.write(f"overlap_bench.py: {message}\n")
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3], help="rank counts (default 2 3)")
    p.add_argument("--kernel", nargs="+", default=["native", "torch"], choices=["native", "torch"])
    p.add_argument("--causal", default="both", choices=sorted(MASKS))
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "striped"], help="(default zigzag: balanced)")
    p.add_argument("--pass", dest="pass_", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    p.add_argument("--progress", nargs="+", default=["test"], choices=sorted(PROGRESS))
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument("--out", help="write every figure here (JSON)")
    a = p.parse_args(argv)
    for name in ("seq_len", "heads", "head_dim", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(a, name)}")
    if any(r < 1 for r in a.ranks):
        p.error(f"--ranks: expected positive ints, got {a.ranks}")
    for r in a.ranks:
        if a.seq_len % r:
            p.error(f"--seq-len: {a.seq_len} does not divide over {r} ranks")
    return a


def simd_level() -> str:
    """NumPy's baseline and the dispatched SIMD extensions it found on this CPU."""
    try:
        from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__
    except ImportError:  # pragma: no cover (older NumPy)
        return "?"
    found = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    return f"baseline {' '.join(__cpu_baseline__)}; found {' '.join(found) or '-'}"


def run_one(a, nranks: int, kernel: str, causal: bool, progress: str, work: Path) -> list[dict]:
    """One ringbench run; a row per timed phase."""
    flag, extra = PROGRESS[progress]
    out = work / f"r{nranks}-{kernel}-{int(causal)}-{progress}.h5"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(nranks), sys.executable, "-m", "ringbench", "run", "--mode", "overlap"]
    cmd += ["--layout", a.layout, "--causal" if causal else "--no-causal", "--kernel", kernel, "--progress", flag]
    cmd += ["--pass", a.pass_, "--seq-len", str(a.seq_len), "--heads", str(a.heads), "--head-dim", str(a.head_dim)]
    cmd += ["--repeat", str(a.repeat), "--warmup", str(a.warmup), "--no-check", "--quiet", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    base = {"nranks": nranks, "kernel": kernel, "causal": causal, "progress": progress}
    if res.returncode != 0:
        return [{**base, "phase": a.pass_, "error": (res.stderr or res.stdout).strip().splitlines()[-1:]}]
    (run,) = store.read(out)
    rows = []
    for phase in run.phases():
        ph = run.phase(phase)
        s, samples = ph.summary, ph.samples
        steps = measure.per_step_split(samples)
        compute = np.median(np.asarray(samples["compute_s"]), axis=0).min(axis=0)  # (S,) the fastest rank's, per step
        alone = steps["alone"] if steps is not None else np.zeros_like(compute)
        applies = bool(np.all((compute > alone) | (alone == 0)))
        rows.append(
            {
                **base,
                "phase": phase,
                "time_s": s["time_s"],
                "compute_s": s["compute_s"],
                "exposed_comm_s": s["exposed_comm_s"],
                "unhidden_comm_s": s["unhidden_comm_s"],
                "partner_wait_s": s["partner_wait_s"],
                "comm_alone_s": s["comm_alone_s"],
                "overlap_eff": s["overlap_eff"],
                "step_compute_s": compute.tolist(),
                "step_alone_s": alone.tolist(),
                "step_hidden": [] if steps is None else steps["hidden"].tolist(),
                "step_partner_wait_s": [] if steps is None else steps["partner_wait"].tolist(),
                "target_applies": applies,
                "meets_target": (s["overlap_eff"] >= TARGET) if applies else None,
                "samples": {k: np.asarray(v).tolist() for k, v in samples.items() if not k.startswith("warmup_")},
            }
        )
    return rows


def _ms(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x * 1e3:.2f}"


def table(rows: list[dict]) -> str:
    head = ["P", "kernel", "causal", "progress", "phase", "time ms", "alone ms", "not hidden ms", "slower-rank ms", "overlap", "target"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([str(r["nranks"]), r["kernel"], str(r["causal"]), r["progress"], r["phase"], "failed: " + " ".join(r["error"])])
            continue
        target = "-" if r["meets_target"] is None else ("ok" if r["meets_target"] else "MISSED")
        body.append(
            [
                str(r["nranks"]),
                r["kernel"],
                "yes" if r["causal"] else "no",
                r["progress"],
                r["phase"],
                _ms(r["time_s"]),
                _ms(r["comm_alone_s"]),
                _ms(r["unhidden_comm_s"]),
                _ms(r["partner_wait_s"]),
                "-" if not np.isfinite(r["overlap_eff"]) else f"{r['overlap_eff']:.0%}",
                target,
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body if i < len(b))) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    cpu = provenance.cpu()
    load0 = os.getloadavg()
    print(f"CPU: {cpu}; NumPy {np.__version__} SIMD: {simd_level()}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as work:
        for nranks, kernel, causal, progress in itertools.product(a.ranks, a.kernel, MASKS[a.causal], a.progress):
            rows += run_one(a, nranks, kernel, causal, progress, Path(work))
    load1 = os.getloadavg()
    print(table(rows))
    print(
        f"overlap = 1 - not hidden / alone (target >= {TARGET:.0%} where every step computes longer than its transfer "
        "alone; '-': the target does not apply); slower-rank: time waiting for a neighbour still computing"
    )
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if a.out:
        record = {
            "provenance": {"cpu": cpu, "simd": simd_level(), "numpy": np.__version__, "load_before": load0, "load_after": load1,
                           "utc": provenance.utc_now(), "argv": sys.argv},
            "options": vars(a),
            "rows": rows,
        }  # fmt: skip
        Path(a.out).write_text(json.dumps(record, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
