"""Single-GPU figures a machine preset needs, measured on a lent GPU (benchmarks/gpu_check.sh runs it):

    python benchmarks/gpu_kernels.py [--out FILE.json] [--tokens 1024 4096 8192 16384]

For each length: flash-attn (flash_attn_func) and torch SDPA, forward and backward, causal and not, Llama-3.1-8B
heads (32 / 8, head dim 128, bf16, batch 1), TFLOP/s from CUDA events (median of 10 after 3 warm-ups): the preset's
kernel tables. And ring-flash-attention's merge as eager PyTorch runs it (update_out_and_lse's ops on the fp32 output)
at the table's shape, in bytes per element per second: the term benchmarks/README.md says to measure first.
Without CUDA: one line, exit 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def timed(fn, reps=10, warm=3) -> float:
    import torch

    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def attention(name: str, fa, q, k, v, causal: bool):
    """One call of ``name`` on (B, S, H, D) tensors."""
    import torch.nn.functional as F

    if name == "flash-attn":
        return fa(q, k, v, causal=causal)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True).transpose(1, 2)


def measure(name: str, fa, q, k, v, causal: bool) -> dict:
    """TFLOP/s of the forward and of the backward (fwd+bwd time less the forward's) of one call."""
    import torch

    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    work = 4 * h * d * n * n * (0.5 if causal else 1.0)
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            attention(name, fa, q, k, v, causal)

    def both():
        torch.autograd.grad(attention(name, fa, q, k, v, causal), (q, k, v), do)

    t_fwd, t_both = timed(fwd), timed(both)
    return dict(
        kernel=name, tokens=n, causal=causal, fwd_tflops=work / t_fwd / 1e12, bwd_tflops=2.5 * work / max(t_both - t_fwd, 1e-9) / 1e12
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", metavar="FILE.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ns = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_kernels: torch is not installed: nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device: nothing to measure")
        return 0
    import torch.nn.functional as F

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    h, hk, d, dt = 32, 8, 128, torch.bfloat16
    rows = []
    for n in ns.tokens:
        q = torch.randn(1, n, h, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(1, n, hk, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(1, n, hk, d, device="cuda", dtype=dt, requires_grad=True)
        for causal in (False, True):
            for name in ("sdpa", "flash-attn") if flash_attn_func is not None else ("sdpa",):
                rows.append(measure(name, flash_attn_func, q, k, v, causal))
                print(json.dumps(rows[-1]))
    n = 8192  # the merge of update_out_and_lse, op by op as eager PyTorch runs it
    out = torch.randn(1, n, h, d, device="cuda", dtype=torch.float32)
    lse = torch.randn(1, n, h, 1, device="cuda", dtype=torch.float32)
    bo, bl = torch.randn(1, n, h, d, device="cuda", dtype=dt), torch.randn(1, h, n, device="cuda", dtype=torch.float32)

    def merge():
        b = bo.to(torch.float32)
        blt = bl.transpose(-2, -1).unsqueeze(dim=-1)
        o = out - torch.sigmoid(blt - lse) * (out - b)
        return o, lse - F.logsigmoid(lse - blt)

    t = timed(merge)
    elems = n * h * d
    merge_row = dict(tokens=n, seconds=t, bytes_per_element_at_hbm_if_38=38 * elems / t / 1e9)
    print(json.dumps({"merge": merge_row}))
    if ns.out:
        with open(ns.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "merge": merge_row}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
