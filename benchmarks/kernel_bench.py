"""Throughput of the per-rank blockwise kernel against a plain matmul and PyTorch SDPA, in one run.

    python benchmarks/kernel_bench.py [--head-dim 64 128] [--block 1024 2048 4096] [--heads 8]
                                      [--repeat N] [--causal both] [--out FILE.json]

For every (head dim, block) shape, one ring step of one rank is timed: a block of ``block`` queries against
a K/V block of ``block`` keys, ``heads`` heads (``--kv-heads`` for GQA). Candidates, all fp32 on one thread:

    kernel   ringbench.kernel.OnlineSoftmax.update with the tiles the ring picks (ring.auto_tile_q/k)
    matmul   the two GEMMs alone, whole block, one head at a time: S = Q K^T (block x block), O = S V
    tiles    the same two GEMMs over the kernel's own tiles: the ceiling of the kernel's tiling
    torch    torch.nn.functional.scaled_dot_product_attention on the CPU (if torch is importable)

Rounds interleave the candidates (the order rotates every round), so load on a shared machine hits all of
them alike. Times are this process's CPU time by default (--clock cpu: time other processes hold the core is
left out; every candidate runs on this one thread), wall time with --clock wall; both are kept in --out. A
candidate's time is the median over rounds; a ratio is the median over rounds of the per-round ratio.
GFLOP/s count the matmul FLOPs of the unmasked pairs only (4 * B * H * D * pairs); matmul and tiles always
compute every pair. The target (ring issue): kernel >= 0.9x torch SDPA for fp32, D = 64 and 128,
blocks of 1024+ tokens, no mask; other rows are reported without a verdict. Timed assertions do not belong
in tests: this script is the check. Exit status 0, or 1 with --strict when a target row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ringbench import kernel  # noqa: E402
from ringbench import provenance as prov  # noqa: E402
from ringbench.backend import BackendError, get_backend, limit_threads  # noqa: E402
from ringbench.layout import CAUSAL, FULL, Piece  # noqa: E402
from ringbench.mkl import MklMatmul  # noqa: E402
from ringbench.ring import HOST_TILE_ELEMS, HOST_TILE_ELEMS_MKL, auto_head_chunk, auto_tile_k, auto_tile_q  # noqa: E402

TARGET = 0.9  # kernel / torch SDPA, fp32
TARGET_MIN_BLOCK = 1024
TARGET_HEAD_DIMS = (64, 128)
EXP_LABELS = {"2": "exp2", "e": "exp", "fused": "fused"}  # the candidates of kernel.measure_exp, as printed
COLUMNS = ("D", "block", "mask", "kernel", "matmul", "tiles", "torch", "k/torch", "k/matmul", "k/tiles", "err", "target")


def load_torch():
    """torch, set to one thread, or None with the reason (the torch column then reads n/a)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable ({exc}): the torch column is n/a"
    torch.set_num_threads(1)
    return torch, ""


# ---------------------------------------------------------------------------------------------
# The candidates: each is a no-argument callable doing one step's work on preallocated arrays
# ---------------------------------------------------------------------------------------------
class Shape:
    def __init__(self, batch, heads, kv_heads, head_dim, block, causal, dtype, seed=0):
        self.b, self.h, self.hk, self.d, self.n, self.causal = batch, heads, kv_heads, head_dim, block, causal
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        self.q = rng.standard_normal((batch, block, heads, head_dim)).astype(self.dtype)  # (B, N, H, D)
        self.k = rng.standard_normal((batch, block, kv_heads, head_dim)).astype(self.dtype)  # (B, N, Hkv, D)
        self.v = rng.standard_normal((batch, block, kv_heads, head_dim)).astype(self.dtype)
        self.piece = Piece(0, block, 0, block, CAUSAL if causal else FULL)

    @property
    def flops(self) -> float:
        return kernel.flops(self.b, self.h, self.d, self.piece.pairs())

    @property
    def dense_flops(self) -> float:
        return kernel.flops(self.b, self.h, self.d, self.n * self.n)

    def label(self) -> str:
        return f"D={self.d} block={self.n} {'causal' if self.causal else 'full'}"


class KernelStep:
    """One ring step of ringbench's kernel: update() of a fresh state with one K/V block (reset untimed)."""

    def __init__(self, sh: Shape, tile_q: int = 0, tile_k: int = 0, head_chunk: int = 0, matmul=np.matmul, exp: str | None = None):
        backend = get_backend("numpy")
        g = sh.h // sh.hk
        self.tile_k = tile_k or auto_tile_k(backend, sh.n)
        budget = HOST_TILE_ELEMS_MKL if isinstance(matmul, MklMatmul) else HOST_TILE_ELEMS
        self.tile_q = tile_q or (
            auto_tile_q(backend, sh.n, g, sh.n, budget) if not tile_k else max(16, min(sh.n, budget // (g * self.tile_k)))
        )
        self.head_chunk = head_chunk or auto_head_chunk(sh.b * sh.hk, g * self.tile_q * self.tile_k)
        qh = kernel.q_to_heads(np, sh.q, sh.hk, sh.dtype)  # (Z, G, n, D), read only
        self.k = kernel.kv_to_heads(np, sh.k, sh.dtype)  # (Z, n, D)
        self.v = kernel.kv_to_heads(np, sh.v, sh.dtype)
        self.state = kernel.OnlineSoftmax(
            np,
            qh,
            head_chunk=self.head_chunk,
            tile_q=self.tile_q,
            tile_k=self.tile_k,
            matmul=matmul,
            exp=exp,
            scale=kernel.softmax_scale(sh.d),
        )
        self.pieces = [sh.piece]
        self.batch = sh.b

    def prepare(self) -> None:
        self.state.reset()

    def __call__(self) -> None:
        self.state.update(self.k, self.v, self.pieces)

    def output(self) -> np.ndarray:
        o, _ = self.state.finalize()
        return kernel.heads_to_out(o, self.batch)  # (B, N, H, D)


class PlainMatmul:
    """The two GEMMs of attention on the whole block, one (batch, head) at a time, nothing else."""

    def __init__(self, sh: Shape, matmul=np.matmul):
        self.matmul = matmul
        self.g = sh.h // sh.hk
        self.q = np.ascontiguousarray(sh.q.transpose(0, 2, 1, 3))  # (B, H, N, D)
        self.k = np.ascontiguousarray(sh.k.transpose(0, 2, 1, 3))  # (B, Hkv, N, D)
        self.v = np.ascontiguousarray(sh.v.transpose(0, 2, 1, 3))
        self.s = np.empty((sh.n, sh.n), sh.dtype)  # one head's scores
        self.o = np.empty((sh.n, sh.d), sh.dtype)

    def prepare(self) -> None:
        pass

    def __call__(self) -> None:
        b, h = self.q.shape[:2]
        for bi in range(b):
            for hi in range(h):
                self.matmul(self.q[bi, hi], self.k[bi, hi // self.g].T, out=self.s)
                self.matmul(self.s, self.v[bi, hi // self.g], out=self.o)


class TiledMatmul:
    """The same two GEMMs over the kernel's tiles (tile_q x tile_k scores, keys pre-transposed once)."""

    def __init__(self, sh: Shape, tile_q: int, tile_k: int, matmul=np.matmul):
        self.matmul = matmul
        self.g = sh.h // sh.hk
        self.tq, self.tk = tile_q, tile_k
        self.q = np.ascontiguousarray(sh.q.transpose(0, 2, 1, 3))  # (B, H, N, D)
        self.kt = np.ascontiguousarray(sh.k.transpose(0, 2, 3, 1))  # (B, Hkv, D, N)
        self.v = np.ascontiguousarray(sh.v.transpose(0, 2, 1, 3))
        self.s = np.empty((tile_q, tile_k), sh.dtype)
        self.o = np.empty((tile_q, sh.d), sh.dtype)

    def prepare(self) -> None:
        pass

    def __call__(self) -> None:
        b, h, n, _ = self.q.shape
        for bi in range(b):
            for hi in range(h):
                for i0 in range(0, n, self.tq):
                    i1 = min(i0 + self.tq, n)
                    for j0 in range(0, n, self.tk):
                        j1 = min(j0 + self.tk, n)
                        s = self.s[: i1 - i0, : j1 - j0]
                        self.matmul(self.q[bi, hi, i0:i1], self.kt[bi, hi // self.g, :, j0:j1], out=s)
                        self.matmul(s, self.v[bi, hi // self.g, j0:j1], out=self.o[: i1 - i0])


class TorchSDPA:
    def __init__(self, sh: Shape, torch):
        self.torch = torch
        self.F = torch.nn.functional
        self.q = torch.from_numpy(np.ascontiguousarray(sh.q.transpose(0, 2, 1, 3)))  # (B, H, N, D)
        self.k = torch.from_numpy(np.ascontiguousarray(sh.k.transpose(0, 2, 1, 3)))  # (B, Hkv, N, D)
        self.v = torch.from_numpy(np.ascontiguousarray(sh.v.transpose(0, 2, 1, 3)))
        self.causal = sh.causal
        self.gqa = sh.h != sh.hk
        self.out = None

    def prepare(self) -> None:
        self.out = None

    def __call__(self) -> None:
        with self.torch.no_grad():
            self.out = self.F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal, enable_gqa=self.gqa)

    def output(self) -> np.ndarray:
        return self.out.numpy().transpose(0, 2, 1, 3)  # (B, N, H, D)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


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


def verdict(sh: Shape, ratio: float | None) -> str:
    applies = not sh.causal and sh.dtype == np.float32 and sh.d in TARGET_HEAD_DIMS and sh.n >= TARGET_MIN_BLOCK
    if not applies or ratio is None:
        return "-"
    return "PASS" if ratio >= TARGET else "FAIL"


def bench_shape(
    sh: Shape,
    torch,
    repeat: int,
    warmup: int,
    clock: str,
    tile_q: int = 0,
    tile_k: int = 0,
    head_chunk: int = 0,
    matmul=np.matmul,
    exp: str | None = None,
) -> dict:
    """Kernel, plain and tiled GEMMs (all through ``matmul``) and torch SDPA, interleaved."""
    step = KernelStep(sh, tile_q, tile_k, head_chunk, matmul, exp)
    cands = {"kernel": step, "matmul": PlainMatmul(sh, matmul), "tiles": TiledMatmul(sh, step.tile_q, step.tile_k, matmul)}
    if torch is not None:
        cands["torch"] = TorchSDPA(sh, torch)
    # correctness of what is timed, untimed: the kernel against SDPA (or the float64 reference)
    step.prepare()
    step()
    out = step.output().astype(np.float64)
    if torch is not None:
        cands["torch"]()
        ref = cands["torch"].output().astype(np.float64)
        against = "torch"
    else:
        ref = kernel.reference_attention(sh.q, sh.k, sh.v, causal=sh.causal)
        against = "float64 reference"
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    del out, ref

    all_samples = interleaved(cands, repeat, warmup)
    samples = all_samples[clock]
    med = {k: float(np.median(v)) for k, v in samples.items()}
    gflops = {k: (sh.flops if k in ("kernel", "torch") else sh.dense_flops) / med[k] / 1e9 for k in med}
    ratios = {
        "k/matmul": paired_ratio(samples["matmul"], samples["kernel"]) * sh.flops / sh.dense_flops,
        "k/tiles": paired_ratio(samples["tiles"], samples["kernel"]) * sh.flops / sh.dense_flops,
    }
    ratios["k/torch"] = paired_ratio(samples["torch"], samples["kernel"]) if "torch" in samples else None
    return {
        "head_dim": sh.d,
        "block": sh.n,
        "heads": sh.h,
        "kv_heads": sh.hk,
        "batch": sh.b,
        "causal": sh.causal,
        "dtype": str(sh.dtype),
        "tile_q": step.tile_q,
        "tile_k": step.tile_k,
        "head_chunk": step.head_chunk,
        "exp_base": step.state.base.name,
        "compile_s": step.state.compile_s,  # the fused pass's compile or cache load at state creation (untimed)
        "flops": sh.flops,
        "dense_flops": sh.dense_flops,
        "clock": clock,
        "samples_s": all_samples,
        "median_s": med,
        "gflops": gflops,
        "ratios": ratios,
        "max_rel_err": err,
        "err_against": against,
        "target": verdict(sh, ratios["k/torch"]),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
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


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = (
        f"{'D':>4} {'block':>6} {'mask':>6} | {'GFLOP/s: kernel':>15} {'matmul':>7} {'tiles':>7} {'torch':>7} |"
        f" {'k/torch':>7} {'k/matmul':>8} {'k/tiles':>7} | {'err':>8} {'target':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        g, q = r["gflops"], r["ratios"]
        lines.append(
            f"{r['head_dim']:>4} {r['block']:>6} {'causal' if r['causal'] else 'full':>6} | "
            f"{g['kernel']:>15.1f} {g['matmul']:>7.1f} {g['tiles']:>7.1f} {_fmt(g.get('torch'), '7.1f'):>7} |"
            f" {_fmt(q['k/torch'], '7.2f'):>7} {q['k/matmul']:>8.2f} {q['k/tiles']:>7.2f} |"
            f" {r['max_rel_err']:>8.1e} {r['target']:>6}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kernel_bench", description=__doc__.split("\n\n")[0])
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
        choices=("no", "yes", "both"),
        default="both",
        help="mask of the block: no (the target), yes (a diagonal block), or both",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeat", type=int, default=7, metavar="N", help="timed rounds per shape")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed rounds per shape")
    p.add_argument("--tile-q", type=int, default=0, metavar="N", help="query rows per tile (0: the ring's choice)")
    p.add_argument("--tile-k", type=int, default=0, metavar="N", help="keys per tile (0: the ring's choice)")
    p.add_argument("--head-chunk", type=int, default=0, metavar="N", help="batch-heads per tile (0: the ring's choice)")
    p.add_argument(
        "--blas",
        choices=("auto", "numpy", "mkl"),
        default="auto",
        help="GEMM library of the kernel and of the matmul baselines, as `ringbench run --blas`",
    )
    p.add_argument(
        "--exp",
        choices=("auto", *kernel.EXP_BASES),
        default="auto",
        help="the kernel's exponential: auto measures exp2, exp and (numba installed) the fused pass here, as a run does;"
        " 2, e or fused force one",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="cpu",
        help="cpu: process CPU time, robust to other processes on a shared machine (default); wall",
    )
    p.add_argument("--out", metavar="FILE.json", help="write every sample, the summary and provenance here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a row under the target fails it")
    a = p.parse_args(argv)
    a.kv_heads = a.kv_heads or a.heads
    problems = [
        f"--{k}: expected a positive int, got {v}"
        for k, v in (("heads", a.heads), ("kv-heads", a.kv_heads), ("batch", a.batch), ("repeat", a.repeat))
        if v < 1
    ]
    problems += [f"--head-dim/--block: expected positive ints, got {x}" for x in a.head_dim + a.block if x < 1]
    if a.heads % a.kv_heads:
        problems.append(f"--kv-heads: {a.kv_heads} does not divide --heads {a.heads}")
    if a.warmup < 0:
        problems.append(f"--warmup: expected an int >= 0, got {a.warmup}")
    if problems:
        p.error(problems[0])
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    torch, note = load_torch()
    try:
        matmul, blas = get_backend("numpy").matmul(a.blas)
    except BackendError as exc:
        print(f"kernel_bench: {exc}", file=sys.stderr)
        return 2
    threads = limit_threads(1)  # every candidate on one thread, whatever the environment says
    info = provenance(note, torch, threads)
    info["kernel_blas"] = blas
    try:
        base = kernel.exp_base(np, a.exp)
    except ValueError as exc:
        print(f"kernel_bench: --exp {a.exp}: {exc}", file=sys.stderr)
        return 2
    info["exp_base"] = base.name
    info["exp_ns_per_elem"] = {k: v * 1e9 for k, v in kernel.measure_exp(np)[1].items()}  # exp + row sums, per element
    fused = kernel.fused_module()
    info["numba"] = None if fused is None else fused.versions()
    print(
        f"kernel_bench: {info['cpu']}, {info['cores']} cores, 1 thread; numpy {np.__version__}, "
        f"torch {info['torch'] or 'n/a'}; {a.dtype}, B={a.batch} H={a.heads}/{a.kv_heads}; "
        f"median of {a.repeat} interleaved rounds, {a.clock} clock\n  kernel and matmul baselines: {blas}\n"
        f"  kernel exponential: {base.name} ({a.exp}; float32 exponential and row sums, ns/element here: "
        + ", ".join(f"{EXP_LABELS[k]} {v:.2f}" for k, v in info["exp_ns_per_elem"].items())
        + ")",
        flush=True,
    )
    if note:
        print(f"  note: {note}")
    masks = {"no": [False], "yes": [True], "both": [False, True]}[a.causal]
    rows = []
    for d in a.head_dim:
        for n in a.block:
            for causal in masks:
                sh = Shape(a.batch, a.heads, a.kv_heads, d, n, causal, a.dtype)
                rows.append(bench_shape(sh, torch, a.repeat, a.warmup, a.clock, a.tile_q, a.tile_k, a.head_chunk, matmul, base.name))
                del sh
    print(table(rows))
    applicable = [r for r in rows if r["target"] != "-"]
    fails = [r for r in applicable if r["target"] == "FAIL"]
    print(
        f"target: kernel >= {TARGET}x torch SDPA ({a.dtype}, D in {TARGET_HEAD_DIMS}, block >= {TARGET_MIN_BLOCK},"
        f" no mask): "
        + (f"{len(applicable) - len(fails)}/{len(applicable)} rows pass" if applicable else "no row of this run is under the target")
    )
    print(
        "ratios: median over rounds of the per-round ratio, in GFLOP/s terms (matmul and tiles do every pair);"
        " err: max |kernel - " + (rows[0]["err_against"] if rows else "ref") + "| / max |ref|"
    )
    if a.out:
        Path(a.out).write_text(
            json.dumps({"bench": "kernel", "schema_version": 1, "provenance": info, "args": vars(a), "rows": rows}, indent=1)
        )
        print(f"saved {a.out}")
    return 1 if (a.strict and fails) else 0


if __name__ == "__main__":
    sys.exit(main())
