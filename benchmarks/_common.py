"""What benchmarks/kernel_bench.py (forward) and bwd_kernel_bench.py (backward) share: the shape of one ring
step and its inputs, the common options, the set-up (BLAS, one thread, torch, provenance), the interleaved timing,
the target's verdict and summary line, and the JSON record. Not a script: the two scripts import it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ringbench import provenance as prov  # noqa: E402
from ringbench.engine.backend import BackendError, get_backend, limit_threads  # noqa: E402
from ringbench.kernels import kernel  # noqa: E402
from ringbench.layout import CAUSAL, FULL, Piece  # noqa: E402

TARGET_MIN_BLOCK = 1024  # both targets: fp32, these head dims, blocks of this many tokens or more, no mask
TARGET_HEAD_DIMS = (64, 128)
MASKS = {"no": [False], "yes": [True], "both": [False, True]}  # --causal


class Shape:
    """One ring step of one rank: ``block`` queries against a K/V block of ``block`` keys, random inputs.

    ``flop_count`` (kernel.flops for the forward) gives the FLOPs of some query-key pairs; a subclass draws more
    inputs from the same generator in :meth:`draw_more`, after Q, K and V.
    """

    flop_count = staticmethod(kernel.flops)

    def __init__(self, batch, heads, kv_heads, head_dim, block, causal, dtype="float32", seed=0):
        self.b, self.h, self.hk, self.d, self.n, self.causal = batch, heads, kv_heads, head_dim, block, causal
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        self.q = rng.standard_normal((batch, block, heads, head_dim)).astype(self.dtype)  # (B, N, H, D)
        self.k = rng.standard_normal((batch, block, kv_heads, head_dim)).astype(self.dtype)  # (B, N, Hkv, D)
        self.v = rng.standard_normal((batch, block, kv_heads, head_dim)).astype(self.dtype)
        self.draw_more(rng)
        self.piece = Piece(0, block, 0, block, CAUSAL if causal else FULL)

    def draw_more(self, rng) -> None:
        pass

    @property
    def flops(self) -> float:
        return self.flop_count(self.b, self.h, self.d, self.piece.pairs())

    @property
    def dense_flops(self) -> float:
        return self.flop_count(self.b, self.h, self.d, self.n * self.n)

    def label(self) -> str:
        return f"D={self.d} block={self.n} {'causal' if self.causal else 'full'}"

    def fields(self) -> dict:
        """The shape as a result row's first fields."""
        return {
            "head_dim": self.d,
            "block": self.n,
            "heads": self.h,
            "kv_heads": self.hk,
            "batch": self.b,
            "causal": self.causal,
            "dtype": str(self.dtype),
        }


def shapes(a: argparse.Namespace, shape_cls=Shape, **kw):
    """Every (head dim, block, mask) shape of the command line, one at a time (the caller drops each after use)."""
    for d in a.head_dim:
        for n in a.block:
            for causal in MASKS[a.causal]:
                yield shape_cls(a.batch, a.heads, a.kv_heads, d, n, causal, **kw)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parser(prog: str, doc: str, tiles: str, baselines: str) -> argparse.ArgumentParser:
    """The options both scripts take; ``tiles`` names where tile sizes come from at 0, ``baselines`` what --blas also runs."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], metavar="D")
    p.add_argument(
        "--block",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096],
        metavar="N",
        help="tokens per query block and per K/V block (one ring step)",
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA); default: --heads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--causal",
        choices=tuple(MASKS),
        default="both",
        help="mask of the block: no (the target), yes (a diagonal block), or both",
    )
    p.add_argument("--repeat", type=int, default=7, metavar="N", help="timed rounds per shape")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds per shape")
    p.add_argument("--tile-q", type=int, default=0, metavar="N", help=f"query rows per tile (0: {tiles})")
    p.add_argument("--tile-k", type=int, default=0, metavar="N", help=f"keys per tile (0: {tiles})")
    p.add_argument("--head-chunk", type=int, default=0, metavar="N", help=f"batch-heads per tile (0: {tiles})")
    p.add_argument(
        "--blas",
        choices=("auto", "numpy", "mkl"),
        default="auto",
        help=f"GEMM library of the kernel and of {baselines}, as `ringbench run --blas`",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="cpu",
        help="cpu: process CPU time, robust to other processes on a shared machine (default); wall",
    )
    p.add_argument("--out", metavar="FILE.json", help="write every sample, the summary and provenance here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a row under the target fails it")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and check the common options: the first problem is the one-line usage error (exit status 2)."""
    a = p.parse_args(argv)
    a.kv_heads = a.kv_heads or a.heads
    problems = [
        f"--{k}: expected a positive int, got {v}"
        for k, v in (("heads", a.heads), ("kv-heads", a.kv_heads), ("batch", a.batch), ("repeat", a.repeat))
        if v < 1
    ]
    problems += [f"--head-dim/--block: expected positive ints, got {x}" for x in a.head_dim + a.block if x < 1]
    problems += [
        f"--{k}: expected an int >= 0, got {v}"
        for k, v in (("warmup", a.warmup), ("tile-q", a.tile_q), ("tile-k", a.tile_k), ("head-chunk", a.head_chunk))
        if v < 0
    ]
    if a.heads % a.kv_heads:
        problems.append(f"--kv-heads: {a.kv_heads} does not divide --heads {a.heads}")
    if problems:
        p.error(problems[0])
    return a


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def load_torch():
    """torch, set to one thread, or None with the reason (the torch column then reads n/a)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable ({exc}): the torch column is n/a"
    torch.set_num_threads(1)
    return torch, ""


def provenance(torch_note: str, torch, threads: int) -> dict:
    info = {
        "utc": prov.utc_now(),
        "cpu": prov.cpu(),
        "cores": os.cpu_count(),
        "python": prov.versions()["python"],
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_note": torch_note,
        "git_commit": prov.git_commit(),
        "blas_threads": threads,
        "argv": prov.argv(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        cfg = np.show_config(mode="dicts")
        info["blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("openblas configuration")
    except TypeError:  # pragma: no cover - numpy < 1.25
        info["blas"] = None
    info["blas_runtime"] = prov.thread_pools()  # the BLAS kernels picked at run time (DYNAMIC_ARCH builds) and threads
    return info


def setup(prog: str, blas: str):
    """torch (or None), the GEMM (``--blas``), every candidate on one thread, and provenance.

    Returns (torch, note, matmul, info), or None after one line on stderr when the BLAS asked for is not there.
    """
    torch, note = load_torch()
    try:
        matmul, name = get_backend("numpy").matmul(blas)
    except BackendError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    threads = limit_threads(1)  # every candidate on one thread (one rank per core), whatever the environment says
    info = provenance(note, torch, threads)
    info["kernel_blas"] = name
    return torch, note, matmul, info


def header(prog: str, info: dict, a: argparse.Namespace, dtype: str, cpu: str) -> str:
    """The run's first line: the CPU, the libraries, the shape options and how the time is taken."""
    return (
        f"{prog}: {cpu}, {info['cores']} cores, 1 thread; numpy {np.__version__}, "
        f"torch {info['torch'] or 'n/a'}; {dtype}, B={a.batch} H={a.heads}/{a.kv_heads}; "
        f"median of {a.repeat} interleaved rounds, {a.clock} clock"
    )


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``fn()`` over ``repeat`` calls, and its last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def print_table(rows: list[list[str]]) -> None:
    """Rows of cells (the first one the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def interleaved(cands: dict, repeat: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each candidate on both clocks, ``repeat`` rounds; the order rotates every round.

    cpu: this process's CPU time (every candidate runs on this one thread), which leaves out the time other
    processes hold the core; wall: elapsed time. Both are kept for every sample.
    """
    names = list(cands)
    for _ in range(warmup):
        for name in names:
            cands[name].prepare()
            cands[name]()
    samples = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c = cands[name]
            c.prepare()
            w0, c0 = time.perf_counter(), time.process_time()
            c()
            c1, w1 = time.process_time(), time.perf_counter()
            samples["cpu"][name].append(c1 - c0)
            samples["wall"][name].append(w1 - w0)
    return samples


def paired_ratio(t_base: list[float], t_kernel: list[float]) -> float:
    """Median over rounds of base_time / kernel_time (> 1: the kernel is faster)."""
    return float(np.median(np.asarray(t_base) / np.asarray(t_kernel)))


def timing(sh: Shape, all_samples: dict, clock: str, dense: tuple[str, ...]) -> dict:
    """A row's timing fields from :func:`interleaved`'s samples, on ``clock``: medians, GFLOP/s and ratios.

    The candidates named in ``dense`` compute every pair (their GFLOP/s count ``sh.dense_flops``, and their ratio
    to the kernel is scaled to GFLOP/s terms); the others count the unmasked pairs. ``k/<name>``: the median
    over rounds of name's time / the kernel's, for every candidate but the kernel; k/torch is None without torch.
    """
    samples = all_samples[clock]
    med = {k: float(np.median(v)) for k, v in samples.items()}
    gflops = {k: (sh.dense_flops if k in dense else sh.flops) / med[k] / 1e9 for k in med}
    ratios = {
        f"k/{k}": paired_ratio(v, samples["kernel"]) * (sh.flops / sh.dense_flops if k in dense else 1.0)
        for k, v in samples.items()
        if k != "kernel"
    }
    ratios.setdefault("k/torch", None)
    return {
        "flops": sh.flops,
        "dense_flops": sh.dense_flops,
        "clock": clock,
        "samples_s": all_samples,
        "median_s": med,
        "gflops": gflops,
        "ratios": ratios,
    }


# ---------------------------------------------------------------------------------------------
# Target and output
# ---------------------------------------------------------------------------------------------
def verdict(sh: Shape, ratio: float | None, target: float) -> str:
    """PASS or FAIL for a row under the target (fp32, TARGET_HEAD_DIMS, TARGET_MIN_BLOCK+, no mask), else '-'."""
    applies = not sh.causal and sh.dtype == np.float32 and sh.d in TARGET_HEAD_DIMS and sh.n >= TARGET_MIN_BLOCK
    if not applies or ratio is None:
        return "-"
    return "PASS" if ratio >= target else "FAIL"


def target_summary(rows: list[dict], goal: str, dtype: str) -> tuple[str, list[dict]]:
    """The line that counts the rows under the target that pass (``goal``: 'kernel >= 0.9x torch SDPA'), and the failures."""
    applicable = [r for r in rows if r["target"] != "-"]
    fails = [r for r in applicable if r["target"] == "FAIL"]
    line = f"target: {goal} ({dtype}, D in {TARGET_HEAD_DIMS}, block >= {TARGET_MIN_BLOCK}, no mask): " + (
        f"{len(applicable) - len(fails)}/{len(applicable)} rows pass" if applicable else "no row of this run is under the target"
    )
    return line, fails


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def save(path: str | None, record: dict) -> None:
    """Write ``record`` (bench, schema_version, provenance, args, rows, ...) as JSON to ``path`` (--out), if given."""
    if path:
        Path(path).write_text(json.dumps(record, indent=1))
        print(f"saved {path}")
