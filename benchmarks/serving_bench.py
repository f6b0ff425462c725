"""Does the serving model pick the fastest prefill strategy, and how does the decode merge's latency grow with P?

    python benchmarks/serving_bench.py [--ranks 2] [--decode-ranks 2 3 4] [--seq-len 2048] [--cached 0 0.5 0.875 0.97]
                                       [--heads 8] [--kv-heads 1] [--head-dim 64] [--batch 1 8] [--repeat 5]
                                       [--rounds 3] [--probe-blocks 32,64,...] [--probe-repeat 15] [--work DIR]
                                       [--out FILE.json] [--nodes K]

1. ``--rounds`` rounds, each: the calibration, apart from the measured runs (``mpiexec -n P ringbench probe`` at every
   prefill rank count, blocks of ``--probe-blocks`` tokens: the new tokens' small pieces need the small blocks' rates),
   then ``ringbench run --pass prefill`` of pass-KV (``overlap``) and pass-Q (``pass-q``) at every cached fraction of
   ``--cached`` (rounded to a multiple of 2P), each checked against float64, in an order that alternates by round.
   On a shared machine the load drifts: each round's runs are predicted by that round's probe.
2. Decode at ``--decode-ranks`` and ``--batch``: a probe (its skinny pieces, 1, 8, 32 query rows, against the blocks
   and the shard of N / P keys: schema 4), then ``ringbench run --pass decode`` per merge (ring, tree, gather), checked.
3. The comparison with the model calibrated from the probes only (analysis.inference.predict_prefill/predict_decode):
   per prefill point the measured winner where ``measure.compare`` of the two strategies' pass times over all rounds
   is significant (else a tie), the predicted one (from the round-median predictions), and the error of every
   predicted time against its own round's measured median. Targets: predicted = measured winner on >= 90% of the
   decided points and median |error| <= 20% at P = 2; rank counts above this machine's cores oversubscribe it
   (reported apart). Decode: the step time per merge and P (microseconds), tree against ring, and the model's.

Prints the CPU and the load average per round; --out keeps every figure as JSON. Exit status 0; 2 on bad options
(one line).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from ringbench.analysis import inference, measure, model, results  # noqa: E402

WINNER_TARGET = 0.90
ERROR_TARGET = 0.20
MPIEXEC = Path(sys.executable).parent / "mpiexec"
MULTINODE = Path(os.environ.get("RINGBENCH_MULTINODE_DIR", "/tmp/ringbench-multinode"))  # slurm/multinode.sh's state


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="prefill rank counts (default 2)")
    p.add_argument("--decode-ranks", type=int, nargs="+", default=[2, 3, 4], help="decode rank counts (default 2 3 4)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--cached", type=float, nargs="+", default=[0.0, 0.5, 0.875, 0.97], help="cached fractions C / N")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--decode-seq-len", type=int, default=24576, help="decode: KV cache tokens per sequence")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="probe + prefill rounds (default 3)")
    p.add_argument("--probe-blocks", default="32,64,128,256,512,1024", help="the probes' block sizes (tokens)")
    p.add_argument("--probe-repeat", type=int, default=15, help="the probes' timed kernel calls per block size (default 15)")
    p.add_argument("--work", help="keep the probe and result files here (default: a temporary folder)")
    p.add_argument("--out", help="write every figure as JSON")
    p.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="run every launch across this many emulated nodes (slurm/multinode.sh up; ceil(P / nodes) ranks per node), "
        "where the node link's rate (slurm/multinode.sh rate R) makes the transfers show; default 0: this machine",
    )
    ns = p.parse_args(argv)
    if ns.nodes < 0:
        p.exit(2, "serving_bench.py: --nodes: expected an integer >= 0\n")
    if ns.nodes and not (MULTINODE / "net.up").exists():
        down = f"the emulated cluster is down ({MULTINODE}/net.up missing): run slurm/multinode.sh up (as root)"
        p.exit(2, f"serving_bench.py: --nodes: {down}\n")
    for name in ("seq_len", "heads", "kv_heads", "head_dim", "repeat", "decode_seq_len", "rounds", "probe_repeat"):
        if getattr(ns, name) < 1:
            p.exit(2, f"serving_bench.py: --{name.replace('_', '-')}: expected an integer >= 1\n")
    if any(not 0 <= c < 1 for c in ns.cached):
        p.exit(2, "serving_bench.py: --cached: fractions in [0, 1)\n")
    return ns


def launch(nranks: int, *args, nodes: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [str(MPIEXEC), "-n", str(nranks)]
    if nodes:  # slurm/multinode.sh's launcher: hydra enters each node's namespace; TCP between nodes (its env file)
        env["RINGBENCH_MPIEXEC"] = str(MPIEXEC)
        cmd = [str(MULTINODE / "mpiexec"), "-ppn", str(-(-nranks // nodes)), "-n", str(nranks)]
    cmd += [sys.executable, "-m", "ringbench", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"serving_bench.py: {' '.join(map(str, args[:3]))} at P={nranks} failed: {res.stderr.strip()[-500:]}")


def median_time(run) -> float:
    return float(np.median(np.max(run.samples["total_s"], axis=1)))


def without_fits(cal):
    """The calibration as a probe without skinny pieces (schema 3) gives it: every piece from the square tables."""
    return dataclasses.replace(cal, piece_fits={}, bwd_piece_fits={}, merge_fits={})


def load() -> float:
    return os.getloadavg()[0]


def main(argv=None) -> int:
    ns = parse_args(argv)
    work = Path(ns.work or tempfile.mkdtemp(prefix="serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = ["--heads", ns.heads, "--kv-heads", ns.kv_heads, "--head-dim", ns.head_dim]
    probe_args = [*shape, "--block-sizes", ns.probe_blocks, "--repeat", ns.probe_repeat, "--quiet"]
    if ns.nodes:  # a shaped node link takes seconds per 16 MiB ping-pong: 4 MiB is well above these shapes' blocks
        probe_args += ["--max-bytes", 4 << 20, "--iters", 5]
    cores = os.cpu_count() or 1
    print(f"cpu: {provenance.cpu_model()}; {cores} cores")
    rounds = []  # per round: (calibration, {(P, N, C): {mode: run}}, load before, load after)
    for i in range(ns.rounds):
        probe, out = work / f"probe-{i}.h5", work / f"prefill-{i}.h5"
        for f in (probe, out):
            f.unlink(missing_ok=True)
        before = load()
        for P in ns.ranks:
            launch(P, "probe", "--out", probe, *probe_args, nodes=ns.nodes)
        common = [*shape, "--causal", "--check", "--repeat", ns.repeat, "--out", out, "--quiet"]
        for P in ns.ranks:
            n = ns.seq_len - ns.seq_len % (2 * P)
            for frac in ns.cached:
                c = min(int(frac * n) // (2 * P) * (2 * P), n - 2 * P)
                for mode in ("overlap", "pass-q")[:: 1 if i % 2 == 0 else -1]:
                    launch(P, "run", "--pass", "prefill", "--seq-len", n, "--cached-tokens", c, "--mode", mode, *common, nodes=ns.nodes)
        points: dict = {}
        for r in results.load(out):
            points.setdefault((r.nranks, r.config["seq_len"], r.config["cached_tokens"]), {})[r.config["mode"]] = r
        rounds.append((model.calibrate([], store.read_probes(probe)), points, before, load()))
        print(f"round {i + 1}: load average {before:.1f} -> {rounds[-1][3]:.1f}")
    dprobe, dout = work / "decode-probe.h5", work / "decode.h5"
    for f in (dprobe, dout):
        f.unlink(missing_ok=True)
    dload = load()
    for P in ns.decode_ranks:  # the skinny pieces against the probe's blocks and this P's shard (N / P keys)
        keys = sorted({*map(int, ns.probe_blocks.split(",")), ns.decode_seq_len // P})
        launch(P, "probe", "--out", dprobe, *probe_args, "--piece-keys", ",".join(map(str, keys)), nodes=ns.nodes)
    common = [*shape, "--causal", "--check", "--repeat", ns.repeat, "--out", dout, "--quiet"]
    for P in ns.decode_ranks:
        n = ns.decode_seq_len - ns.decode_seq_len % (2 * P)
        for b in ns.batch:
            for merge in ("ring", "tree", "gather"):
                launch(P, "run", "--pass", "decode", "--seq-len", n, "--batch", b, "--merge", merge, *common, nodes=ns.nodes)
    dcal = model.calibrate([], store.read_probes(dprobe))
    print(f"decode: load average {dload:.1f} -> {load():.1f}; calibration: {dcal.source}")
    figures = {"prefill": [], "decode": [], "rounds": [{"load": [r[2], r[3]], "calibration": r[0].source} for r in rounds]}

    print("\nprefill: pass-KV (overlap) vs pass-Q, measured and predicted (ms; medians over rounds)")
    print(f"{'P':>2} {'N':>6} {'C/N':>5} {'pass-kv':>9} {'pass-q':>9} {'pred kv':>9} {'pred q':>9}  measured  predicted  rule     errors")
    for key in sorted(rounds[0][1]):
        P, n, c = key
        per = [(cal, pts[key]) for cal, pts, _, _ in rounds if set(pts.get(key, {})) == {"overlap", "pass-q"}]
        if not per:
            continue
        meas = {"pass-kv": [median_time(m["overlap"]) for _, m in per], "pass-q": [median_time(m["pass-q"]) for _, m in per]}
        preds = [inference.predict_prefill({**m["overlap"].config, "nranks": P}, cal) for cal, m in per]
        errs = [model.relative_error(pr[k], meas[k][j]) for j, pr in enumerate(preds) for k in ("pass-kv", "pass-q")]
        olds = [inference.predict_prefill({**m["overlap"].config, "nranks": P}, without_fits(cal)) for cal, m in per]
        old_errs = [model.relative_error(pr[k], meas[k][j]) for j, pr in enumerate(olds) for k in ("pass-kv", "pass-q")]
        kv_s = np.concatenate([np.max(m["overlap"].samples["total_s"], axis=1) for _, m in per])
        q_s = np.concatenate([np.max(m["pass-q"].samples["total_s"], axis=1) for _, m in per])
        cmp = measure.compare(kv_s, q_s)
        tkv, tq = float(np.median(kv_s)), float(np.median(q_s))
        measured = ("pass-kv" if tkv < tq else "pass-q") if cmp.verdict == measure.SIGNIFICANT else None
        pred = {k: float(np.median([p[k] for p in preds])) for k in preds[0]}
        predicted = "pass-kv" if pred["pass-kv"] <= pred["pass-q"] else "pass-q"
        rule = inference.prefill_rule(n - c, c, ns.heads, ns.kv_heads)
        figures["prefill"].append(
            dict(
                P=P,
                N=n,
                C=c,
                measured_s={"pass-kv": tkv, "pass-q": tq},
                measured_rounds_s=meas,
                predicted_s=pred,
                predicted_rounds_s=preds,
                measured=measured,
                predicted=predicted,
                rule=rule,
                errors=errs,
                errors_without_fit=old_errs,
                oversubscribed=P > cores,
            )
        )
        print(
            f"{P:>2} {n:>6} {c / n:>5.2f} {tkv * 1e3:>9.2f} {tq * 1e3:>9.2f} {pred['pass-kv'] * 1e3:>9.2f} "
            f"{pred['pass-q'] * 1e3:>9.2f}  {measured or 'tie':>8}  {predicted:>9}  {rule}  " + " ".join(f"{e:+.0%}" for e in errs)
        )
    for over in (False, True):
        sel = [f for f in figures["prefill"] if f["oversubscribed"] == over]
        decided = [f for f in sel if f["measured"]]
        if not sel:
            continue
        agree = sum(f["measured"] == f["predicted"] for f in decided)
        errs = [abs(e) for f in sel for e in f["errors"] if e == e]
        med = float(np.median(errs)) if errs else float("nan")
        old = [abs(e) for f in sel for e in f["errors_without_fit"] if e == e]
        tag = "oversubscribed" if over else f"P <= {cores} cores"
        ok = decided and agree / len(decided) >= WINNER_TARGET and med <= ERROR_TARGET
        print(
            f"{tag}: predicted = measured winner at {agree} of {len(decided)} decided points; "
            f"median |error| {med:.0%} (without the per-call fit: {float(np.median(old)) if old else float('nan'):.0%}) "
            f"-> {'met' if ok else 'not met'}"
        )
    print("\ndecode: one step per merge (us), measured and predicted")
    print(
        f"{'P':>2} {'B':>3} {'ring':>9} {'tree':>9} {'gather':>9} {'tree/ring':>9} {'pred ring':>9} {'pred tree':>9} "
        f"{'pred gath':>9} {'tables ring':>11} {'tree':>9} {'gather':>9}"
    )
    steps: dict = {}
    for r in results.load(dout):
        steps.setdefault((r.nranks, r.config["batch"]), [r.config, {}])[1][r.config["merge"]] = median_time(r)
    for (P, b), (config, t) in sorted(steps.items()):
        ratio = t["tree"] / t["ring"] if "tree" in t and "ring" in t else float("nan")
        pred = inference.predict_decode({**config, "nranks": P}, dcal)
        old = inference.predict_decode({**config, "nranks": P}, without_fits(dcal))
        figures["decode"].append(dict(P=P, B=b, measured_s=t, predicted_s=pred, predicted_without_fit_s=old, oversubscribed=P > cores))
        cells = " ".join(f"{t.get(m, float('nan')) * 1e6:>9.0f}" for m in ("ring", "tree", "gather"))
        pcells = " ".join(f"{pred[m] * 1e6:>9.0f}" for m in ("ring", "tree", "gather"))
        ocells = " ".join(f"{old[m] * 1e6:>9.0f}" for m in ("ring", "tree", "gather"))
        print(f"{P:>2} {b:>3} {cells} {ratio:>9.2f} {pcells} {ocells}{'  (oversubscribed)' if P > cores else ''}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(figures, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
