"""Throughput of the per-rank blockwise kernel against a plain matmul and PyTorch SDPA, in one run.

    python benchmarks/kernel_bench.py [--head-dim 64 128] [--block 1024 2048 4096] [--heads 8]
                                      [--repeat N] [--causal both] [--out FILE.json]

For every (head dim, block) shape, one ring step of one rank is timed: a block of ``block`` queries against
a K/V block of ``block`` keys, ``heads`` heads (``--kv-heads`` for GQA). Candidates, all fp32 on one thread:

    kernel   ringbench.kernels.kernel.OnlineSoftmax.update with the tiles the ring picks (kernels.tiling.auto_tile_q/k)
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
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
from _common import Shape, fmt, interleaved, timing  # noqa: E402

from ringbench.engine.backend import get_backend  # noqa: E402
from ringbench.kernels import kernel, reference  # noqa: E402
from ringbench.kernels.mkl import MklMatmul  # noqa: E402
from ringbench.kernels.tiling import HOST_TILE_ELEMS, HOST_TILE_ELEMS_MKL, auto_head_chunk, auto_tile_k, auto_tile_q  # noqa: E402

TARGET = 0.9  # kernel / torch SDPA, fp32 (the other conditions: _common.verdict)
EXP_LABELS = {"2": "exp2", "e": "exp", "fused": "fused"}  # the candidates of kernel.measure_exp, as printed
COLUMNS = ("D", "block", "mask", "kernel", "matmul", "tiles", "torch", "k/torch", "k/matmul", "k/tiles", "err", "target")


# ---------------------------------------------------------------------------------------------
# The candidates: each is a no-argument callable doing one step's work on preallocated arrays
# ---------------------------------------------------------------------------------------------
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
# Timing one shape
# ---------------------------------------------------------------------------------------------
def verdict(sh: Shape, ratio: float | None) -> str:
    return common.verdict(sh, ratio, TARGET)


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
        ref = reference.reference_attention(sh.q, sh.k, sh.v, causal=sh.causal)
        against = "float64 reference"
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    del out, ref

    t = timing(sh, interleaved(cands, repeat, warmup), clock, dense=("matmul", "tiles"))
    return {
        **sh.fields(),
        "tile_q": step.tile_q,
        "tile_k": step.tile_k,
        "head_chunk": step.head_chunk,
        "exp_base": step.state.base.name,
        "compile_s": step.state.compile_s,  # the fused pass's compile or cache load at state creation (untimed)
        **t,
        "max_rel_err": err,
        "err_against": against,
        "target": verdict(sh, t["ratios"]["k/torch"]),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
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
            f"{g['kernel']:>15.1f} {g['matmul']:>7.1f} {g['tiles']:>7.1f} {fmt(g.get('torch'), '7.1f'):>7} |"
            f" {fmt(q['k/torch'], '7.2f'):>7} {q['k/matmul']:>8.2f} {q['k/tiles']:>7.2f} |"
            f" {r['max_rel_err']:>8.1e} {r['target']:>6}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser("kernel_bench", __doc__, tiles="the ring's choice", baselines="the matmul baselines")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--exp",
        choices=("auto", *kernel.EXP_BASES),
        default="auto",
        help="the kernel's exponential: auto measures exp2, exp and (numba installed) the fused pass here, as a run does;"
        " 2, e or fused force one",
    )
    return common.parse(p, argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    ready = common.setup("kernel_bench", a.blas)
    if ready is None:
        return 2
    torch, note, matmul, info = ready
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
        common.header("kernel_bench", info, a, a.dtype, info["cpu"]) + f"\n  kernel and matmul baselines: {info['kernel_blas']}\n"
        f"  kernel exponential: {base.name} ({a.exp}; float32 exponential and row sums, ns/element here: "
        + ", ".join(f"{EXP_LABELS[k]} {v:.2f}" for k, v in info["exp_ns_per_elem"].items())
        + ")",
        flush=True,
    )
    if note:
        print(f"  note: {note}")
    rows = [
        bench_shape(sh, torch, a.repeat, a.warmup, a.clock, a.tile_q, a.tile_k, a.head_chunk, matmul, base.name)
        for sh in common.shapes(a, dtype=a.dtype)
    ]
    print(table(rows))
    line, fails = common.target_summary(rows, f"kernel >= {TARGET}x torch SDPA", a.dtype)
    print(line)
    print(
        "ratios: median over rounds of the per-round ratio, in GFLOP/s terms (matmul and tiles do every pair);"
        " err: max |kernel - " + (rows[0]["err_against"] if rows else "ref") + "| / max |ref|"
    )
    common.save(a.out, {"bench": "kernel", "schema_version": 1, "provenance": info, "args": vars(a), "rows": rows})
    return 1 if (a.strict and fails) else 0


if __name__ == "__main__":
    sys.exit(main())
