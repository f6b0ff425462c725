"""A ring step with ``--kernel torch`` against torch's own attention op on the same block, in one run.

    python benchmarks/torch_kernel_bench.py [--head-dim 64 128] [--block 1024 2048 4096] [--heads 8]
                                            [--repeat N] [--causal no|yes|both] [--out FILE.json]

For every (head dim, block) shape: a block of ``block`` queries against a K/V block of ``block`` keys, ``heads``
heads (``--kv-heads`` for GQA), fp32, one thread. Candidates:

    ring   ringbench.kernels.torch_kernel.FusedAttention.update on the block, as the ring calls it in the steady state
           (NumPy arrays in, zero-copy views to torch, the fused op, the in-place log-sum-exp merge into rows
           that already hold a partial result)
    op     the same aten op alone on the same torch tensors: aten._scaled_dot_product_flash_attention_for_cpu
    sdpa   torch.nn.functional.scaled_dot_product_attention on (1, H, n, D) (enable_gqa for GQA)

Rounds interleave the candidates (the order rotates every round). Times are this process's CPU time (--clock
cpu, the default: time other processes hold the core is left out) or wall time; both are kept in --out. A time is
the median over rounds; a ratio is the median over rounds of the per-round ratio ring / op (< 1.05 is the
target: the merge and the ring's bookkeeping cost little) and ring / sdpa. Exit status 0, or 1 with --strict
when a target row misses.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread, before torch loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ringbench.engine.backend import get_backend  # noqa: E402
from ringbench.harness import inputs  # noqa: E402
from ringbench.kernels import kernel, reference  # noqa: E402
from ringbench.layout import CAUSAL, FULL, Piece  # noqa: E402
from ringbench.provenance import git_commit  # noqa: E402

TARGET = 1.05  # ring / op
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
BACKEND = get_backend("numpy")


class Step:
    """The three candidates on one block; each is a zero-argument call."""

    def __init__(self, torch, heads: int, kv_heads: int, d: int, n: int, causal: bool):
        from ringbench.kernels.torch_kernel import FusedAttention, to_torch

        self.torch = torch
        dims = dict(batch=1, seq_len=n, head_dim=d)
        pos = np.arange(n)
        q = inputs.tokens("q", 0, pos, heads=heads, **dims).astype(np.float32)
        k = inputs.tokens("k", 0, pos, heads=kv_heads, **dims).astype(np.float32)
        v = inputs.tokens("v", 0, pos, heads=kv_heads, **dims).astype(np.float32)
        self.ref_inputs = (q, k, v)
        qh = kernel.q_to_heads(np, q, kv_heads, np.float32) * np.float32(kernel.softmax_scale(d))  # (Z, G, n, D)
        self.kh, self.vh = kernel.kv_to_heads(np, k), kernel.kv_to_heads(np, v)  # (Z, n, D)
        self.pieces = [Piece(0, n, 0, n, CAUSAL if causal else FULL)]
        self.state = FusedAttention(BACKEND, qh, kernel="torch", dtype=np.float32)
        self.state.reset()
        self.state.update(self.kh, self.vh, self.pieces)  # rows now hold a partial: every timed update merges
        self.causal = causal
        self.qt = to_torch(qh)  # (Z, G, n, D)
        self.kt, self.vt = to_torch(self.kh)[:, None], to_torch(self.vh)[:, None]  # (Z, 1, n, D)
        # SDPA's own layout: (1, H, n, D) and (1, H_kv, n, D)
        self.qs = torch.from_numpy(np.ascontiguousarray(q.transpose(0, 2, 1, 3)))
        self.ks = torch.from_numpy(np.ascontiguousarray(k.transpose(0, 2, 1, 3)))
        self.vs = torch.from_numpy(np.ascontiguousarray(v.transpose(0, 2, 1, 3)))
        self.gqa = heads != kv_heads

    def ring(self) -> None:
        self.state.update(self.kh, self.vh, self.pieces)

    def op(self) -> None:
        with self.torch.inference_mode():
            self.torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(self.qt, self.kt, self.vt, 0.0, self.causal, scale=1.0)

    def sdpa(self) -> None:
        with self.torch.inference_mode():
            kw = {"enable_gqa": True} if self.gqa else {}
            self.torch.nn.functional.scaled_dot_product_attention(self.qs, self.ks, self.vs, is_causal=self.causal, **kw)

    def error(self) -> float:
        """max |out - ref| / max |ref| of the ring step's state (a block merged with itself is that block's attention)."""
        q, k, v = self.ref_inputs
        o, _ = self.state.finalize()
        out = kernel.heads_to_out(o, 1).astype(np.float64)
        ref = reference.reference_attention(q, k, v, causal=self.causal)
        return float(np.abs(out - ref).max() / np.abs(ref).max())


def interleaved(cands: dict, repeat: int, warmup: int) -> dict:
    names = list(cands)
    for _ in range(warmup):
        for name in names:
            cands[name]()
    samples = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            cands[name]()
            c1, w1 = time.process_time(), time.perf_counter()
            samples["cpu"][name].append(c1 - c0)
            samples["wall"][name].append(w1 - w0)
    return samples


def bench(torch, heads, kv_heads, d, n, causal, repeat, warmup, clock) -> dict:
    step = Step(torch, heads, kv_heads, d, n, causal)
    all_samples = interleaved({"ring": step.ring, "op": step.op, "sdpa": step.sdpa}, repeat, warmup)
    s = {k: np.asarray(v) for k, v in all_samples[clock].items()}
    ratios = {"ring/op": float(np.median(s["ring"] / s["op"])), "ring/sdpa": float(np.median(s["ring"] / s["sdpa"]))}
    applies = not causal and d in (64, 128) and n >= 1024
    return {
        "head_dim": d,
        "block": n,
        "heads": heads,
        "kv_heads": kv_heads,
        "causal": causal,
        "dtype": "float32",
        "clock": clock,
        "samples_s": all_samples,
        "median_s": {k: float(np.median(v)) for k, v in s.items()},
        "ratios": ratios,
        "max_rel_err": step.error(),
        "target": ("PASS" if ratios["ring/op"] <= TARGET else "MISS") if applies else "-",
    }


def simd_level(torch) -> str:
    """torch's CPU capability (the kernels it dispatched to) and NumPy's highest SIMD features."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    top = [f for f in ("AVX512_SPR", "AVX512_ICL", "AVX512_SKX", "AVX512F", "AVX2", "FMA3", "NEON", "SVE") if feats.get(f)]
    return f"torch {torch.backends.cpu.get_cpu_capability()}; numpy {', '.join(top[:2]) or 'baseline'}"


def provenance(torch) -> dict:
    return {
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": BACKEND.device_name,
        "simd": simd_level(torch),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "argv": " ".join(sys.argv),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def table(rows: list[dict]) -> str:
    head = f"{'D':>4} {'block':>6} {'mask':>6} | {'ms: ring':>9} {'op':>9} {'sdpa':>9} | {'ring/op':>7} {'ring/sdpa':>9} |"
    head += f" {'err':>8} {'target':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"{r['head_dim']:>4} {r['block']:>6} {'causal' if r['causal'] else 'full':>6} | {m['ring'] * 1e3:>9.2f} {m['op'] * 1e3:>9.2f}"
            f" {m['sdpa'] * 1e3:>9.2f} | {r['ratios']['ring/op']:>7.3f} {r['ratios']['ring/sdpa']:>9.3f} |"
            f" {r['max_rel_err']:>8.1e} {r['target']:>6}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--block", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    p.add_argument("--causal", choices=("no", "yes", "both"), default="no")
    p.add_argument("--repeat", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    p.add_argument("--out", metavar="FILE.json", help="write every sample and the provenance here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target row misses")
    ns = p.parse_args(argv)
    ns.kv_heads = ns.kv_heads or ns.heads
    bad = [(o, v) for o, v in (("--heads", ns.heads), ("--repeat", ns.repeat)) if v < 1] + [("--warmup", ns.warmup)] * (ns.warmup < 0)
    if bad or ns.heads % ns.kv_heads or min(ns.head_dim + ns.block) < 1:
        opt = bad[0][0] if bad else ("--kv-heads" if ns.heads % ns.kv_heads else "--head-dim/--block")
        print(f"torch_kernel_bench: {opt}: expected positive integers (--kv-heads dividing --heads)", file=sys.stderr)
        raise SystemExit(2)
    return ns


def main(argv=None) -> int:
    ns = parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"torch_kernel_bench: needs torch: pip install 'ringbench[torch]' ({exc})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    prov = provenance(torch)
    print(f"# {prov['cpu']} ({prov['simd']}), torch {torch.__version__}, 1 thread, fp32, {ns.clock} clock, load {prov['load_avg']}")
    causal = {"no": [False], "yes": [True], "both": [False, True]}[ns.causal]
    rows = []
    for d in ns.head_dim:
        for n in ns.block:
            for c in causal:
                rows.append(bench(torch, ns.heads, ns.kv_heads, d, n, c, ns.repeat, ns.warmup, ns.clock))
    print(table(rows))
    if ns.out:
        Path(ns.out).write_text(json.dumps({"provenance": prov, "rows": rows}, indent=1))
    return 1 if ns.strict and any(r["target"] == "MISS" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
