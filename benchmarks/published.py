"""ringbench's model against published multi-GPU figures: the prediction beside the measurement, row by row.

Table 1, zhuzilin/ring-flash-attention README "Performance Summary" (batch api): 8 GPUs, Llama-3.1-8B attention
(32 query / 8 kv heads, head dim 128, bf16, causal), 8192 tokens per GPU, 100 (fwd+bwd) or 500 (fwd) iterations
timed end to end with CUDA events (benchmark/benchmark_kvpacked_func.py). "Ideal" is flash_attn_kvpacked_func on one
GPU over its own 8192 causal tokens, / 8: the ring computes 8 x that work (1 x 8^2 against 8 x 1^2), so
% of ideal = 8 t_single / t_ring. ringbench predicts both times with the same machine preset (model.predict of the
layout at P = 8, mode overlap; Device.single_call_seconds for the single call): the ratio, not absolute times.

Table 2, feifeibear/long-context-attention (yunchang, USP) README "Benchmark": "Throughput (iters/sec) of
LongContext Attention on 8xA100-SXM4-80GB NVLink fwd-only (Ring-Degree x Ulysses-Degree=8)" (media/
benchmark_results.png; benchmark/benchmark_longctx.py: float16, causal, batch 2, --seq_len the global length, CUDA
events around 10 synchronised iterations), the rows with head_size 128: 8 heads, 128K tokens, Ulysses degree 8, 4, 2, 1,
basic / zigzag / stripe ring, the "no_packed" column (LongContextAttention). ringbench: ulysses at U = 8, hybrid at
U = 4, 2, the ring (overlap) at U = 1, with the a100-sxm4-8x preset; absolute iterations per second, 1 / predicted time.

Discipline: nothing here is fitted. The presets' inputs are single-GPU kernel figures and link figures (their
comments name the sources); no number of the table below enters them.

    python benchmarks/published.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import dataclasses  # noqa: E402

from ringbench.analysis import advise, model, presets  # noqa: E402

SOURCE = "zhuzilin/ring-flash-attention README, Performance Summary (batch api), benchmark/benchmark_kvpacked_func.py"
WORKLOAD = dict(batch=1, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", causal=True)
TOKENS_PER_GPU, GPUS = 8192, 8
VARIANTS = {"ring": "contiguous", "zigzag": "zigzag", "stripe": "striped"}  # theirs -> ringbench's layout
# (pass, their GPU label, the preset): % of ideal per variant, as published
PUBLISHED = [
    ("fwd", "8xH800", "h800-8x", {"ring": 52.1, "zigzag": 85.2, "stripe": 74.4}),
    ("fwd+bwd", "8xH800", "h800-8x", {"ring": 53.9, "zigzag": 90.2, "stripe": 82.9}),
    ("fwd", "8xA100", "a100-sxm4-8x", {"ring": 51.4, "zigzag": 81.7, "stripe": 69.6}),
    ("fwd+bwd", "8xA100", "a100-sxm4-8x", {"ring": 52.5, "zigzag": 89.8, "stripe": 82.6}),
]
# Table 2: {Ulysses degree: (basic, zigzag, stripe) iters/s, no_packed}, head_size 128, 8 heads, bs 2, seqlen 128K
YUNCHANG_SOURCE = "feifeibear/long-context-attention README Benchmark, media/benchmark_results.png (8xA100-SXM4-80GB, fwd-only)"
YUNCHANG = {8: (20.983, 21.002, 20.976), 4: (15.496, 21.464, 20.54), 2: (13.181, 21.201, 20.355), 1: (11.332, 17.778, 17.057)}
YUNCHANG_WORKLOAD = dict(batch=2, heads=8, kv_heads=8, head_dim=128, dtype="float16", causal=True)
YUNCHANG_SEQ, YUNCHANG_PRESET = 131072, "a100-sxm4-8x"
TARGET_POINTS = 10.0  # every row within 10 percentage points, and the variants' order right


# The preset's device terms, each switched off in turn (the ablation: which term carries how much of a row)
ABLATIONS = {
    "without the merges": dict(merge_fwd_bytes=0.0, merge_bwd_q_bytes=0.0, merge_bwd_kv_bytes=0.0),
    "without the overlap slowdown": dict(overlap_slowdown=0.0),
    "without the per-call overhead": dict(call_overhead_s=0.0),
}


def predict_row(pass_: str, preset: str, without: dict | None = None) -> dict:
    """{variant: predicted % of ideal} for one published row (``without``: Device fields replaced, the ablation)."""
    machine = advise.load_machine(presets.path_of(preset))
    if without:
        machine = dataclasses.replace(machine, device=dataclasses.replace(machine.device, **without))
    cal, dev = presets.calibration(machine), machine.device
    w = WORKLOAD
    single = sum(dev.single_call_seconds(w["batch"], w["heads"], w["head_dim"], TOKENS_PER_GPU, True, ph) for ph in pass_.split("+"))
    out = {}
    for variant, layout in VARIANTS.items():
        shape = model.Shape(nranks=GPUS, seq_len=GPUS * TOKENS_PER_GPU, layout=layout, mode="overlap", pass_=pass_, **w)
        out[variant] = 100.0 * GPUS * single / model.predict(shape, cal, machine, per_rank=False).time_s
    return out


def order(row: dict) -> list[str]:
    return sorted(row, key=row.get)


def rows() -> list[dict]:
    out = []
    for pass_, gpus, preset, published in PUBLISHED:
        pred = predict_row(pass_, preset)
        diff = {v: pred[v] - published[v] for v in VARIANTS}
        out.append(
            dict(
                pass_=pass_,
                gpus=gpus,
                preset=preset,
                published=published,
                predicted=pred,
                diff=diff,
                within=all(abs(d) <= TARGET_POINTS for d in diff.values()),
                order_right=order(pred) == order(published),
            )
        )
    return out


def yunchang_rows() -> list[dict]:
    """Table 2: per Ulysses degree, {variant: (published, predicted iters/s)}."""
    machine = advise.load_machine(presets.path_of(YUNCHANG_PRESET))
    cal = presets.calibration(machine)
    out = []
    for u, published in YUNCHANG.items():
        mode = "ulysses" if u == GPUS else "overlap" if u == 1 else "hybrid"
        pred = {}
        for variant, layout in VARIANTS.items():
            shape = model.Shape(
                nranks=GPUS,
                seq_len=YUNCHANG_SEQ,
                layout=layout,
                mode=mode,
                ulysses_degree=u if mode == "hybrid" else 1,
                **YUNCHANG_WORKLOAD,
            )
            pred[variant] = 1.0 / model.predict(shape, cal, machine, per_rank=False).time_s
        out.append(dict(ulysses_degree=u, mode=mode, published=dict(zip(VARIANTS, published)), predicted=pred))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ns = ap.parse_args(argv)
    table = rows()
    w = WORKLOAD
    print(f"source: {SOURCE}")
    print(
        f"workload: {GPUS} GPUs, {TOKENS_PER_GPU} tokens per GPU (N={GPUS * TOKENS_PER_GPU}), "
        f"B={w['batch']} H={w['heads']}/{w['kv_heads']} "
        f"D={w['head_dim']} {w['dtype']} causal; % of ideal = 8 x t(single-GPU causal {TOKENS_PER_GPU}) / t(ring)"
    )
    print("| pass | GPUs | preset | " + " | ".join(f"{v} published / predicted (diff)" for v in VARIANTS) + " | within 10 pts | order |")
    print("|---|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    for r in table:
        cells = [f"{r['published'][v]:.1f}% / {r['predicted'][v]:.1f}% ({r['diff'][v]:+.1f})" for v in VARIANTS]
        flags = ["yes" if r["within"] else "NO", "right" if r["order_right"] else "WRONG"]
        print(f"| {r['pass_']} | {r['gpus']} | {r['preset']} | " + " | ".join(cells + flags) + " |")
    for what, fields in ABLATIONS.items():
        shifts = [predict_row(r["pass_"], r["preset"], fields)[v] - r["predicted"][v] for r in table for v in VARIANTS]
        print(f"  {what}: the predictions move {min(shifts):+.1f} to {max(shifts):+.1f} points")
    hit = sum(r["within"] and r["order_right"] for r in table)
    worst = max(abs(d) for r in table for d in r["diff"].values())
    print(
        f"target: every row within {TARGET_POINTS:g} points and in order: {hit} of {len(table)} rows; largest difference {worst:.1f} points"
    )
    t2 = yunchang_rows()
    w = YUNCHANG_WORKLOAD
    print(f"\nsource: {YUNCHANG_SOURCE}")
    print(
        f"workload: {GPUS} GPUs, N={YUNCHANG_SEQ} (global), B={w['batch']} H={w['heads']}/{w['kv_heads']} D={w['head_dim']} {w['dtype']} "
        f"causal, forward; preset {YUNCHANG_PRESET}; iterations per second"
    )
    print("| Ulysses degree | ringbench mode | " + " | ".join(f"{v} published / predicted (diff)" for v in VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    errs = []
    for r in t2:
        cells = []
        for v in VARIANTS:
            pub, pred = r["published"][v], r["predicted"][v]
            errs.append(pred / pub - 1)
            cells.append(f"{pub:.2f} / {pred:.2f} ({(pred / pub - 1) * 100:+.0f}%)")
        print(f"| {r['ulysses_degree']} | {r['mode']} | " + " | ".join(cells) + " |")
    errs.sort()
    best_pub = max((r["published"][v], r["ulysses_degree"], v) for r in t2 for v in VARIANTS)
    best_pred = max((r["predicted"][v], r["ulysses_degree"], v) for r in t2 for v in VARIANTS)
    med, top = sorted(abs(e) for e in errs)[len(errs) // 2], max(abs(e) for e in errs)
    print(
        f"median |error| {med * 100:.0f}%, largest {top * 100:.0f}%; fastest published: {best_pub[2]} at U={best_pub[1]} "
        f"({best_pub[0]:.2f}/s), predicted: {best_pred[2]} at U={best_pred[1]} ({best_pred[0]:.2f}/s)"
    )
    if ns.json:
        Path(ns.json).write_text(
            json.dumps({"source": SOURCE, "rows": table, "yunchang_source": YUNCHANG_SOURCE, "yunchang": t2}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
