"""Throughput of the per-rank backward kernel against PyTorch's CPU autograd backward of SDPA, in one run.

    python benchmarks/bwd_kernel_bench.py [--head-dim 64 128] [--block 1024 2048 4096] [--heads 8]
                                          [--repeat N] [--causal both] [--blas auto] [--breakdown] [--out FILE.json]

For every (head dim, block) shape, one rank's backward on one ring step is timed: a block of ``block``
queries against a K/V block of ``block`` keys, ``heads`` heads (``--kv-heads`` for GQA), fp32, one thread.
The forward that produces O and the log-sum-exp runs untimed first. Candidates:

    kernel   ringbench.kernels.backward.BlockBackward: construction (D = rowsum(dO * O), the query-side copies),
             update() with the block, dq(): everything a rank does for this step, tiles from backward.auto_tiles
    tiles    the five GEMMs alone over the kernel's own tiles: the ceiling of the kernel's tiling
    torch    torch.autograd.grad of torch.nn.functional.scaled_dot_product_attention's output (CPU, graph
             built untimed: only the backward is timed), if torch is importable

Rounds interleave the candidates (the order rotates every round), as benchmarks/kernel_bench.py does, whose
timing helpers this script uses: a candidate's time is the median over rounds, a ratio the median over
rounds of the per-round ratio, on this process's CPU clock by default (--clock wall for elapsed time).
GFLOP/s count the backward as 2.5 x the forward's matmul FLOPs of the unmasked pairs (FlashAttention's
convention: 2.5 x 4 * B * H * D * pairs); tiles always computes every pair. --breakdown also times each
operation of one score tile alone (the five GEMMs, the exponential, the dP * P product): where the time goes.
The target (issue 9): kernel >= 0.8x torch, fp32, D = 64 and 128, blocks of 1024+ tokens, no mask; other
rows are reported without a verdict. Exit status 0, or 1 with --strict when a target row fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
from _common import fmt, interleaved, timing  # noqa: E402

from ringbench.kernels import backward, kernel, reference  # noqa: E402

TARGET = 0.8  # kernel / torch backward, fp32 (the other conditions: _common.verdict)


class Shape(common.Shape):
    """The forward's shape, plus the upstream gradient dO; FLOPs are the backward's (2.5 x the forward's)."""

    flop_count = staticmethod(backward.flops)

    def draw_more(self, rng) -> None:
        self.do = rng.standard_normal(self.q.shape).astype(self.dtype)  # upstream gradient, (B, N, H, D)


# ---------------------------------------------------------------------------------------------
# The candidates: each is a no-argument callable doing one step's work on preallocated arrays
# ---------------------------------------------------------------------------------------------
class KernelStep:
    """One rank's backward for one ring step: BlockBackward(...), update() with the block, dq()."""

    def __init__(self, sh: Shape, tile_q: int = 0, tile_k: int = 0, head_chunk: int = 0, matmul=np.matmul, exp_base: str = "auto"):
        self.exp_base = backward.fast_exp_base(np) if exp_base == "auto" else exp_base
        g, z = sh.h // sh.hk, sh.b * sh.hk
        auto = backward.auto_tiles(sh.n, sh.n, g, z)
        self.tile_q, self.tile_k = tile_q or auto[0], tile_k or auto[1]
        self.head_chunk = head_chunk or (auto[2] if not (tile_q or tile_k) else backward.auto_tiles(self.tile_q, self.tile_k, g, z)[2])
        # (Z, G, n, D); q_to_heads may return a read-only view of q: scale into a new array
        self.qh = kernel.q_to_heads(np, sh.q, sh.hk, sh.dtype) * sh.dtype.type(kernel.softmax_scale(sh.d))
        self.k = kernel.kv_to_heads(np, sh.k, sh.dtype)  # (Z, n, D)
        self.v = kernel.kv_to_heads(np, sh.v, sh.dtype)
        self.do = kernel.q_to_heads(np, sh.do, sh.hk, sh.dtype)
        fwd = kernel.OnlineSoftmax(np, self.qh.copy(), tile_q=512, tile_k=512, matmul=matmul)  # untimed: O and LSE
        fwd.update(self.k, self.v, [sh.piece])
        self.out, self.lse = fwd.finalize()
        self.matmul, self.pieces, self.batch = matmul, [sh.piece], sh.b
        self.dk = np.zeros_like(self.k)
        self.dv = np.zeros_like(self.v)
        self.dq = None

    def prepare(self) -> None:
        self.dk.fill(0)
        self.dv.fill(0)

    def __call__(self) -> None:
        bwd = backward.BlockBackward(
            np,
            self.qh,
            self.do,
            self.out,
            self.lse,
            tile_q=self.tile_q,
            tile_k=self.tile_k,
            head_chunk=self.head_chunk,
            matmul=self.matmul,
            exp_base=self.exp_base,
        )
        bwd.update(self.k, self.v, self.dk, self.dv, self.pieces)
        self.dq = bwd.dq()

    def grads(self) -> tuple[np.ndarray, ...]:
        """(dq, dk, dv) in the public layout."""
        return (
            kernel.heads_to_out(self.dq, self.batch),
            backward.heads_to_kv(self.dk, self.batch),
            backward.heads_to_kv(self.dv, self.batch),
        )


class TiledGemms:
    """The backward's five GEMMs over the kernel's tiles, every pair, nothing else: S, dV, dP, dQ, dK."""

    def __init__(self, step: KernelStep, matmul=np.matmul):
        self.mm = matmul
        self.add = getattr(matmul, "matmul_add", None)
        z, g, n, d = step.qh.shape
        self.tq, self.tk, self.g, self.d = step.tile_q, step.tile_k, g, d
        self.q = np.ascontiguousarray(step.qh.transpose(0, 2, 1, 3)).reshape(z, n * g, d)  # (Z, n*G, D)
        self.do = np.ascontiguousarray(step.do.transpose(0, 2, 1, 3)).reshape(z, n * g, d)
        self.kt = np.ascontiguousarray(step.k.swapaxes(-1, -2))  # (Z, D, m)
        self.vt = np.ascontiguousarray(step.v.swapaxes(-1, -2))
        self.k = step.k
        self.dq, self.dk, self.dv = np.zeros_like(self.q), np.zeros_like(step.k), np.zeros_like(step.v)
        rq = self.tq * g
        self.s = np.empty((rq, self.tk), self.q.dtype)
        self.dp = np.empty_like(self.s)
        self.tmp = np.empty((max(rq, self.tk), d), self.q.dtype)

    def prepare(self) -> None:
        pass

    def _gemm_add(self, a, b, c) -> None:
        if self.add is not None:
            self.add(a, b, c)
        else:
            t = self.tmp[: c.shape[0]]
            self.mm(a, b, out=t)
            c += t

    def __call__(self) -> None:
        z, rows, _ = self.q.shape
        m = self.k.shape[1]
        for zi in range(z):
            for r0 in range(0, rows, self.tq * self.g):
                r1 = min(r0 + self.tq * self.g, rows)
                for j0 in range(0, m, self.tk):
                    j1 = min(j0 + self.tk, m)
                    s, dp = self.s[: r1 - r0, : j1 - j0], self.dp[: r1 - r0, : j1 - j0]
                    q, do = self.q[zi, r0:r1], self.do[zi, r0:r1]
                    self.mm(q, self.kt[zi, :, j0:j1], out=s)
                    self._gemm_add(s.T, do, self.dv[zi, j0:j1])
                    self.mm(do, self.vt[zi, :, j0:j1], out=dp)
                    self._gemm_add(dp, self.k[zi, j0:j1], self.dq[zi, r0:r1])
                    self._gemm_add(dp.T, q, self.dk[zi, j0:j1])


class TorchBackward:
    """torch.autograd.grad of SDPA's output with the upstream gradient; the forward graph is built untimed."""

    def __init__(self, sh: Shape, torch):
        self.torch = torch

        def leaf(x):  # (B, N, H, D) -> (B, H, N, D), a leaf that wants its gradient
            return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).requires_grad_()

        self.inputs = (leaf(sh.q), leaf(sh.k), leaf(sh.v))
        self.do = torch.from_numpy(np.ascontiguousarray(sh.do.transpose(0, 2, 1, 3)))
        self.out = torch.nn.functional.scaled_dot_product_attention(*self.inputs, is_causal=sh.causal, enable_gqa=sh.h != sh.hk)
        self.grad_fn = type(self.out.grad_fn).__name__  # which backward torch picked (provenance)
        self.result = None

    def prepare(self) -> None:
        self.result = None

    def __call__(self) -> None:
        self.result = self.torch.autograd.grad(self.out, self.inputs, self.do, retain_graph=True)

    def grads(self) -> tuple[np.ndarray, ...]:
        return tuple(g.numpy().transpose(0, 2, 1, 3) for g in self.result)


# ---------------------------------------------------------------------------------------------
# Where the time goes: each operation of one score tile, timed alone
# ---------------------------------------------------------------------------------------------
def tile_breakdown(d: int, rows: int, keys: int, matmul, exp_base: str, repeat: int = 20) -> dict[str, float]:
    """Median seconds of each operation of one (rows x keys) score tile of BlockBackward._tile, run alone."""
    rng = np.random.default_rng(1)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    qa, kt, doa, vt = f(1, rows, d + 1), f(1, d + 1, keys), f(1, rows, d + 1), f(1, d + 1, keys)
    kj, dq, dk, dv = f(1, keys, d), f(1, rows, d), f(1, keys, d), f(1, keys, d)
    s, dp, logits = np.empty((1, rows, keys), np.float32), np.empty((1, rows, keys), np.float32), -np.abs(f(1, rows, keys))
    tmp = np.empty((1, max(rows, keys), d), np.float32)
    add = getattr(matmul, "matmul_add", None)

    def gemm_add(a, b, c):
        if add is not None:
            add(a, b, c)
        else:
            matmul(a, b, out=tmp[:, : c.shape[1]])
            c += tmp[:, : c.shape[1]]

    ops = {
        "S gemm": lambda: matmul(qa, kt, out=s),
        f"exp{'2' if exp_base == '2' else ''}": lambda: (np.exp2 if exp_base == "2" else np.exp)(logits, out=s),
        "dV gemm": lambda: gemm_add(s.swapaxes(-1, -2), doa[..., :d], dv),
        "dP gemm": lambda: matmul(doa, vt, out=dp),
        "dS = P*dP": lambda: np.multiply(dp, s, out=dp),
        "dQ gemm": lambda: gemm_add(dp, kj, dq),
        "dK gemm": lambda: gemm_add(dp.swapaxes(-1, -2), qa[..., :d], dk),
    }
    samples = {k: [] for k in ops}
    for _ in range(repeat):
        for name, op in ops.items():
            t0 = time.process_time()
            op()
            samples[name].append(time.process_time() - t0)
    return {k: float(np.median(v)) for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------
# One shape
# ---------------------------------------------------------------------------------------------
def verdict(sh: Shape, ratio: float | None) -> str:
    return common.verdict(sh, ratio, TARGET)


def bench_shape(
    sh: Shape, torch, repeat: int, warmup: int, clock: str, tile_q=0, tile_k=0, head_chunk=0, matmul=np.matmul, exp_base="auto"
) -> dict:
    step = KernelStep(sh, tile_q, tile_k, head_chunk, matmul, exp_base)
    cands = {"kernel": step, "tiles": TiledGemms(step, matmul)}
    grad_fn = None
    if torch is not None:
        cands["torch"] = TorchBackward(sh, torch)
        grad_fn = cands["torch"].grad_fn
    # correctness of what is timed, untimed: the kernel's gradients against torch's (or the float64 reference)
    step.prepare()
    step()
    got = step.grads()
    if torch is not None:
        cands["torch"]()
        want = cands["torch"].grads()
        against = "torch"
    else:
        want = reference.reference_attention_grad(sh.q, sh.k, sh.v, sh.do, causal=sh.causal)
        against = "float64 reference"
    err = max(float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max()) for a, b in zip(got, want))
    del got, want

    t = timing(sh, interleaved(cands, repeat, warmup), clock, dense=("tiles",))
    return {
        **sh.fields(),
        "tile_q": step.tile_q,
        "tile_k": step.tile_k,
        "head_chunk": step.head_chunk,
        "exp_base": step.exp_base,
        **t,
        "max_rel_err": err,
        "err_against": against,
        "torch_grad_fn": grad_fn,
        "target": verdict(sh, t["ratios"]["k/torch"]),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
TABLE_HEAD = (
    f"{'D':>4} {'block':>6} {'mask':>6} | {'GFLOP/s: kernel':>15} {'tiles':>7} {'torch':>7} |"
    f" {'k/torch':>7} {'k/tiles':>7} | {'err':>8} {'target':>6}"
)


def table_row(r: dict) -> str:
    g, q = r["gflops"], r["ratios"]
    return (
        f"{r['head_dim']:>4} {r['block']:>6} {'causal' if r['causal'] else 'full':>6} | "
        f"{g['kernel']:>15.1f} {g['tiles']:>7.1f} {fmt(g.get('torch'), '7.1f'):>7} |"
        f" {fmt(q['k/torch'], '7.2f'):>7} {q['k/tiles']:>7.2f} | {r['max_rel_err']:>8.1e} {r['target']:>6}"
    )


def breakdown_table(parts: dict[int, dict[str, float]], rows: int, keys: int) -> str:
    names = list(next(iter(parts.values())))
    lines = [f"one {rows} x {keys} score tile, each operation alone (median us, share of their sum):"]
    for d, t in parts.items():
        total = sum(t.values())
        lines.append(f"  D={d:<4} " + "  ".join(f"{n} {t[n] * 1e6:.0f} ({t[n] / total:.0%})" for n in names))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser("bwd_kernel_bench", __doc__, tiles="backward.auto_tiles", baselines="tiles")
    p.add_argument(
        "--exp",
        choices=("auto", "2", "e"),
        default="auto",
        help="P as exp2 or exp (auto: backward.fast_exp_base, by the CPU's SIMD level)",
    )
    p.add_argument("--breakdown", action="store_true", help="also time each operation of one score tile alone")
    return common.parse(p, argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    ready = common.setup("bwd_kernel_bench", a.blas)
    if ready is None:
        return 2
    torch, note, matmul, prov = ready
    prov["simd"] = simd_level()
    prov["exp_base"] = backward.fast_exp_base(np) if a.exp == "auto" else a.exp
    exp_name = "exp2" if prov["exp_base"] == "2" else "exp"
    print(
        common.header("bwd_kernel_bench", prov, a, "float32", f"{prov['cpu']} ({prov['simd']})")
        + f"\n  kernel and tiles: {prov['kernel_blas']}; P by {exp_name}",
        flush=True,
    )
    if note:
        print(f"  note: {note}")
    print(TABLE_HEAD + "\n" + "-" * len(TABLE_HEAD), flush=True)
    rows = []
    for sh in common.shapes(a, Shape):
        rows.append(bench_shape(sh, torch, a.repeat, a.warmup, a.clock, a.tile_q, a.tile_k, a.head_chunk, matmul, a.exp))
        print(table_row(rows[-1]), flush=True)  # row by row: a full run takes minutes
    if rows and rows[0]["torch_grad_fn"]:
        print(f"torch backward: {rows[0]['torch_grad_fn']}")
    line, fails = common.target_summary(rows, f"kernel >= {TARGET}x torch backward", "float32")
    print(line)
    print(
        "GFLOP/s: backward = 2.5 x forward FLOPs of the unmasked pairs (tiles: every pair); ratios: median over rounds of the"
        " per-round ratio; err: max over dq, dk, dv of max |kernel - " + (rows[0]["err_against"] if rows else "ref") + "| / max |ref|"
    )
    breakdown = None
    if a.breakdown and rows:
        r0 = rows[-1]
        rq, tk = min(r0["tile_q"], r0["block"]) * (a.heads // a.kv_heads), min(r0["tile_k"], r0["block"])
        breakdown = {d: tile_breakdown(d, rq, tk, matmul, r0["exp_base"]) for d in a.head_dim}
        print(breakdown_table(breakdown, rq, tk))
    record = {"bench": "bwd_kernel", "schema_version": 1, "provenance": prov, "args": vars(a), "rows": rows, "tile_breakdown_s": breakdown}
    common.save(a.out, record)
    return 1 if (a.strict and fails) else 0


def simd_level() -> str:
    """The widest x86 vector extensions the CPU reports (/proc/cpuinfo flags), and what NumPy dispatches to."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    level = next(
        (name for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"), ("SSE4.2", "sse4_2")) if flag in flags),
        "unknown",
    )
    try:
        from numpy.lib._utils_impl import _opt_info  # NumPy >= 2: the SIMD targets compiled in and found

        level += f"; numpy dispatch: {_opt_info()}"
    except (ImportError, AttributeError):
        pass
    return level


if __name__ == "__main__":
    sys.exit(main())
