"""`ringbench advise`: the model's predicted time of every context-parallel strategy for a workload. Pure: no MPI.

For each rank count P the candidates are the overlapped ring (``overlap``), the all-gather of K/V
(``allgather``), ``ulysses``, ``hybrid`` at every Ulysses degree 1 < U < P dividing P, and ``pass-q``; a
candidate the configuration rules refuse (heads not divisible, sequence not divisible) is listed with the rule.
The winner is the least predicted time; the margin is the runner-up's time over the winner's. The block sizes
at which the winner changes come from scanning tokens per rank n over powers of two at the same P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ringbench.analysis import model
from ringbench.config import did_you_mean, validate
from ringbench.layout import DOC_LAYOUTS, imbalance
from ringbench.provenance import calibration_warning
from ringbench.yamlfile import Source

PASS_NAMES = {"fwd": "forward pass", "bwd": "backward pass", "fwd+bwd": "forward + backward passes"}
SCAN_TOKENS = [2**k for k in range(4, 21)]  # tokens per rank scanned for the winner's changes
# The most ranks advise predicts. Its cost per candidate is O(P) (the model's per-step vectors; its step plans and
# piece sums do not grow with P): every strategy at P = 16384 takes well under a second (benchmarks/advise_bench.py),
# at 2^16 about half a second, and it grows linearly beyond.
MAX_RANKS = 2**16


def check_ranks(ranks: list[int], machine: model.Machine | None = None) -> str | None:
    """None if every rank count is within MAX_RANKS (and, with a machine, fills its nodes: a P larger than a node that
    its ranks per node do not divide cannot be laid out), else the one-line refusal (``--ranks: ...``)."""
    over = [p for p in ranks if p > MAX_RANKS]
    if machine is not None and not over:
        rpn = machine.ranks_per_node
        bad = [p for p in ranks if p > rpn and p % rpn]
        if bad:
            return (
                f"--ranks: {bad[0]} ranks cannot fill nodes of {rpn} (ranks_per_node of {machine.source}): use a multiple "
                f"of {rpn}, or at most {rpn} (one node)"
            )
    if not over:
        return None
    return f"--ranks: at most {MAX_RANKS} ranks (2^16) can be predicted (the model's cost grows with P); got {over[0]}"


@dataclass
class Candidate:
    label: str  # "hybrid U=2"
    shape: model.Shape
    time_s: float | None  # None: refused
    refused: str = ""
    bytes_per_rank: int = 0


def label(mode: str, u: int) -> str:
    return f"hybrid U={u}" if mode == "hybrid" else "ring" if mode == "overlap" else mode


def divisors(p: int) -> list[int]:
    """The divisors of ``p``, ascending, in O(sqrt p)."""
    low = [d for d in range(1, math.isqrt(p) + 1) if p % d == 0]
    return low + [p // d for d in reversed(low) if d * d != p]


def candidates(base: model.Shape, nranks: int, cal: model.Calibration, machine: model.Machine | None = None) -> list[Candidate]:
    """Every strategy at ``nranks`` ranks with its predicted time (or why it cannot run)."""
    modes = [("overlap", 1), ("allgather", 1), ("ulysses", 1)]
    modes += [("hybrid", u) for u in divisors(nranks) if 1 < u < nranks]
    modes.append(("pass-q", 1))
    out = []
    for mode, u in modes:
        shape = base.with_(nranks=nranks, mode=mode, ulysses_degree=u)
        problems = validate(shape.to_config(), nranks)
        if problems:
            key, msg = problems[0]
            out.append(Candidate(label(mode, u), shape, None, f"--{key.replace('_', '-')}: {msg}"))
            continue
        pred = model.predict(shape, cal, machine, per_rank=False)  # O(P): no per-rank matrices
        out.append(Candidate(label(mode, u), shape, pred.time_s, bytes_per_rank=model.strategy_bytes(shape)))
    return out


def winner(cands: list[Candidate]) -> tuple[Candidate | None, float]:
    """The fastest candidate and the runner-up's time over it (inf if it is the only one)."""
    ok = sorted((c for c in cands if c.time_s is not None), key=lambda c: c.time_s)
    if not ok:
        return None, float("nan")
    return ok[0], (ok[1].time_s / ok[0].time_s if len(ok) > 1 and ok[0].time_s > 0 else float("inf"))


def changes(base: model.Shape, nranks: int, cal: model.Calibration, machine: model.Machine | None = None) -> list[tuple[int, str, str]]:
    """(tokens per rank n, winner below n, winner from n on) wherever the winner changes over SCAN_TOKENS."""
    out, prev = [], None
    for n in SCAN_TOKENS:
        w, _ = winner(candidates(base.with_(seq_len=n * nranks), nranks, cal, machine))
        name = w.label if w else None
        if prev is not None and name != prev:
            out.append((n, prev, name))
        prev = name
    return out


def format_advice(
    base: model.Shape, seq_lens: list[int], ranks: list[int], cal: model.Calibration, machine=None, layouts: list[str] | None = None
) -> str:
    """The advice text. With documents or a window (``base.masked``) also the layout: :func:`format_packed_advice` over
    ``layouts`` (default: every layout that takes documents, layout.DOC_LAYOUTS)."""
    if base.masked:
        return format_packed_advice(base, seq_lens, ranks, cal, machine, layouts or list(DOC_LAYOUTS))
    if not model.classed(base):  # doc-zigzag or balanced for one document: every plan, as with documents
        return format_packed_advice(base, seq_lens, ranks, cal, machine, layouts or [base.layout])
    lines = [
        f"ringbench advise: B={base.batch} H={base.heads}/{base.kv_heads} D={base.head_dim} {base.dtype}"
        f"{' causal' if base.causal else ''} layout {base.layout}, {PASS_NAMES[base.pass_]}",
        *calibration_lines(cal, machine),
    ]
    for p in ranks:
        for nseq in seq_lens:
            cands = candidates(base.with_(seq_len=nseq), p, cal, machine)
            w, margin = winner(cands)
            lines.append(f"\nN={nseq} P={p} (n={nseq // p} tokens per rank)")
            width = max(len(c.label) for c in cands)
            for c in cands:
                if c.time_s is None:
                    lines.append(f"  {c.label:{width}s}  refused: {c.refused}")
                else:
                    mark = "  <- winner" if c is w else f"  x{c.time_s / w.time_s:.2f}"
                    lines.append(
                        f"  {c.label:{width}s}  {fmt_time(c.time_s)}  sends {fmt_bytes(c.bytes_per_rank)}/GPU{cost_text(c, machine)}{mark}"
                    )
            if w is not None:
                by = "the only candidate" if margin == float("inf") else f"{(margin - 1) * 100:.0f}% ahead of the next"
                lines.append(f"  winner: {w.label}, {by}")
            else:
                lines.append(f"  winner: none: every strategy is refused at N={nseq} P={p}")
        moves = changes(base, p, cal, machine)
        # no change over the scan: the winner at its first block size is the winner at all of them (or none can run)
        steady = None if moves else winner(candidates(base.with_(seq_len=SCAN_TOKENS[0] * p), p, cal, machine))[0]
        lines.append("\n" + scan_text(p, moves, steady))
        if machine is not None and machine.device is not None:  # with a preset: where the ring's transfers hide
            lines.append(crossover_text(base, p, cal))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Packed documents and sliding windows (issue 20): strategies x layouts
# ---------------------------------------------------------------------------------------------
# The model evaluates every (rank, source) plan with documents (model.classed): O(P^2) plans per layout and strategy.
MAX_PACKED_RANKS = 64


def check_packed_ranks(ranks: list[int]) -> str | None:
    """The one-line refusal of rank counts too large to predict with documents or a window, else None."""
    over = [p for p in ranks if p > MAX_PACKED_RANKS]
    if not over:
        return None
    return (
        f"--ranks: at most {MAX_PACKED_RANKS} ranks with --docs or --window (the model then evaluates every (rank, source) "
        f"plan, P^2 of them); got {over[0]}"
    )


def packed_candidates(
    base: model.Shape, nranks: int, cal: model.Calibration, machine: model.Machine | None, layouts: list[str]
) -> dict[str, list[Candidate]]:
    """{layout: :func:`candidates` of that layout} at ``nranks`` ranks, ``base`` carrying the documents and window."""
    return {lay: candidates(base.with_(layout=lay), nranks, cal, machine) for lay in layouts}


def packed_winner(table: dict[str, list[Candidate]]) -> tuple[tuple[str, Candidate] | None, float, tuple[str, Candidate] | None]:
    """((layout, candidate) of the least predicted time, the runner-up's time over it, the runner-up) over every
    strategy and layout."""
    ok = sorted(((lay, c) for lay, cs in table.items() for c in cs if c.time_s is not None), key=lambda t: t[1].time_s)
    if not ok:
        return None, float("nan"), None
    if len(ok) == 1 or ok[0][1].time_s <= 0:
        return ok[0], float("inf"), None
    return ok[0], ok[1][1].time_s / ok[0][1].time_s, ok[1]


def layout_balance(shape: model.Shape) -> float | None:
    """The ring's pairs imbalance of a layout (layout.imbalance of its plans: max / mean over ranks), None if refused."""
    if validate(shape.with_(mode="overlap", ulysses_degree=1).to_config(), shape.nranks):
        return None
    return imbalance(model.step_pairs(shape.with_(mode="overlap", ulysses_degree=1)))


def calibration_lines(cal: model.Calibration, machine) -> list[str]:
    """The header's calibration line (and machine), and one warning line when it was measured on a loaded machine."""
    return [f"calibration: {cal.source}" + (f"; machine: {machine.source}" if machine else ""), *filter(None, [calibration_warning(cal)])]


def format_packed_advice(
    base: model.Shape, seq_lens: list[int], ranks: list[int], cal: model.Calibration, machine, layouts: list[str]
) -> str:
    """Every strategy at every layout for packed documents and a window: a table of predicted times per (N, P) (rows:
    strategies, columns: layouts), the ring's pairs imbalance of each layout, and the winning strategy and layout."""
    mask = (f"documents {base.docs}" if base.docs else "one document") + (f", window {base.window}" if base.window else "")
    lines = [
        f"ringbench advise: B={base.batch} H={base.heads}/{base.kv_heads} D={base.head_dim} {base.dtype}"
        f"{' causal' if base.causal else ''}, {mask}, {PASS_NAMES[base.pass_]}; layouts {', '.join(layouts)}",
        *calibration_lines(cal, machine),
    ]
    for p in ranks:
        for nseq in seq_lens:
            shape = base.with_(seq_len=nseq, nranks=p)
            docs = shape.doc_lengths
            table = packed_candidates(shape, p, cal, machine, layouts)
            best, margin, second = packed_winner(table)
            what = f"{len(docs)} document{'s' if len(docs) != 1 else ''}" if base.docs else "one document"
            lengths = f", lengths {min(docs)}..{max(docs)}" if base.docs else ""
            lines.append(f"\nN={nseq} P={p} (n={nseq // p} tokens per rank), {what}{lengths}")
            labels = [c.label for c in next(iter(table.values()))]
            width = max(len(x) for x in labels + ["ring pairs imbalance"])
            cols = [max(12, len(lay)) for lay in layouts]
            lines.append("  " + " " * width + "  " + "  ".join(f"{lay:>{w}s}" for lay, w in zip(layouts, cols)))
            refusals: dict[str, str] = {}
            for i, lab in enumerate(labels):
                cells = []
                for lay, w in zip(layouts, cols):
                    c = table[lay][i]
                    if c.time_s is None:
                        refusals.setdefault(f"{lab} {lay}" if not c.refused.startswith(("--docs", "--layout")) else lay, c.refused)
                        cells.append(f"{'refused':>{w}s}")
                    else:
                        mark = " <" if best is not None and c is best[1] else "  "
                        cells.append(f"{fmt_time(c.time_s).strip():>{w - 2}s}{mark}")
                lines.append(f"  {lab:{width}s}  " + "  ".join(cells))
            bal = [layout_balance(shape.with_(layout=lay)) for lay in layouts]
            lines.append(
                f"  {'ring pairs imbalance':{width}s}  " + "  ".join(f"{'-' if b is None else f'{b:.3f}':>{w}s}" for b, w in zip(bal, cols))
            )
            for what_refused, why in refusals.items():
                lines.append(f"  refused: {what_refused}: {why}")
            if best is None:
                lines.append(f"  winner: none: every strategy and layout is refused at N={nseq} P={p}")
                continue
            lay, w = best
            if second is None:
                by = "the only candidate"
            else:
                by = f"{(margin - 1) * 100:.0f}% ahead of the next ({second[1].label} {second[0]})"
            lines.append(f"  winner: {w.label} with layout {lay}, {by}")
    lines.append(
        "\n(< marks the winner; times are the model's, every (rank, source) plan of the documents and window with its own "
        "pieces; the block-size scan is left out with documents: they are drawn for each N)"
    )
    return "\n".join(lines)


def fmt_time(seconds: float) -> str:
    """A time in ms below one second, in s from one second on (10 characters)."""
    return f"{seconds:8.3f} s " if seconds >= 1 else f"{seconds * 1e3:7.3f} ms"


def fmt_bytes(nbytes: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{nbytes / 2**30:8.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:8.2f} MiB"


def memory_bytes(shape: model.Shape) -> int:
    """Predicted peak bytes per GPU of one strategy's pass (docs/model.md "Memory and cost"): the local Q, K, V and O
    in the storage dtype, the float32 output accumulator and log-sum-exp, and what the strategy holds besides: the K/V
    block in flight (ring; hybrid: its group's), every rank's K/V (allgather), the all-to-all's send and receive
    buffers and the re-sharded Q, K, V (ulysses, hybrid), the visiting query block and its partial (pass-q). The
    backward (bwd, fwd+bwd) adds dO, dQ and the dK/dV accumulators (float32 for half precision) and one in flight.
    The kernel's own workspace and the framework's allocator slack are not counted."""
    b, n, h, hk, d = shape.batch, shape.n_local, shape.heads, shape.kv_heads, shape.head_dim
    s, acc, P = model.ITEMSIZE[shape.dtype], model.ACC_ITEMSIZE[shape.dtype], shape.nranks
    q, kv = b * n * h * d, 2 * b * n * hk * d  # elements
    total = (2 * q + kv) * s + q * acc + b * n * h * acc  # Q, O, K, V; the accumulator; the log-sum-exp
    if shape.mode in ("ulysses", "hybrid"):
        u = model.strategy_degree(shape)
        hl, hkl = h // u, max(1, hk // u) if hk % u == 0 else 1
        regrouped = b * u * n * (2 * hl + 2 * hkl) * d  # Q, O and K, V of U ranks' tokens for h / U heads
        total += 2 * regrouped * s  # the re-sharded tensors and the all-to-all buffers
        if P // u > 1:
            total += 2 * b * u * n * hkl * d * s  # the group K/V block in flight
    elif shape.mode == "allgather":
        total += (P - 1) * kv * s
    elif shape.mode == "pass-q":
        total += 2 * (q * s + q * acc + b * n * h * acc)  # the visiting block and its partial, double-buffered
    else:
        total += kv * s  # the next K/V block
    if "bwd" in shape.pass_:
        total += q * s + q * acc + 2 * kv * acc  # dO; dQ; the dK/dV accumulator and the one in flight
    return int(total)


def cost_text(c: Candidate, machine: model.Machine | None) -> str:
    """``  peak X of Y GiB[ DOES NOT FIT]  $Z/M tokens`` with a preset's GPU; empty without one."""
    dev = machine.device if machine is not None else None
    if dev is None:
        return ""
    mem = memory_bytes(c.shape)
    fits = "" if mem <= dev.memory_bytes else " DOES NOT FIT"
    text = f"  peak {mem / 2**30:7.2f} of {dev.memory_bytes / 2**30:.1f} GiB{fits}"
    if dev.price_per_hour > 0:
        tokens = c.shape.seq_len * c.shape.batch
        text += f"  {c.time_s * c.shape.nranks * dev.price_per_hour / 3600 / tokens * 1e6:.4g}/M tokens"
    return text


def crossover_text(base: model.Shape, nranks: int, cal: model.Calibration) -> str:
    """The line on the ring's crossover block size: the least tokens per rank from which its compute hides every
    transfer (model.crossover_tokens; the Ring Attention condition)."""
    n = model.crossover_tokens(base.with_(nranks=max(nranks, 2), seq_len=max(nranks, 2) * 1024, mode="overlap"), cal)
    if not math.isfinite(n):
        return f"P={nranks}: the ring never hides its transfers (a step computes nothing)"
    return f"P={nranks}: the ring hides its transfers from n = {math.ceil(n)} tokens per rank (N = {math.ceil(n) * nranks}; crossover)"


def scan_text(nranks: int, moves: list[tuple[int, str | None, str | None]], steady: Candidate | None) -> str:
    """The line on the winner over the scanned block sizes: where it changes (``changes``; None: every strategy
    refused there), else ``steady``, the winner at every one, or that none can run at any (``steady`` None)."""
    span = f"n = {SCAN_TOKENS[0]}..{SCAN_TOKENS[-1]} tokens per rank"
    if moves:
        name = {None: "none (every strategy refused)"}
        text = "; ".join(f"{name.get(a, a)} -> {name.get(b, b)} at n={n} (N={n * nranks})" for n, a, b in moves)
        return f"P={nranks}: the winner changes with the block size: {text}"
    if steady is None:
        return f"P={nranks}: no strategy can run at any {span}: every one is refused"
    return f"P={nranks}: the winner does not change for {span}: {steady.label} at every one"


# ---------------------------------------------------------------------------------------------
# Machine description (YAML)
# ---------------------------------------------------------------------------------------------
MACHINE_KEYS = ("name", "ranks_per_node", "intra", "inter", "collectives", "device")  # the last two optional (presets)
LINK_KEYS = ("latency_us", "bandwidth_gbps")
# What a link may be (closed ranges): a latency from 0 to one second, a bandwidth from 1 kB/s to 100 TB/s (today's
# fastest links move about 2 TB/s); nan, inf and values such as 1e300 are refused. ranks_per_node: 1 to MAX_RANKS.
LINK_RANGES = {"latency_us": (0.0, 1e6), "bandwidth_gbps": (1e-6, 1e5)}
LINK_UNITS = {"latency_us": "microseconds", "bandwidth_gbps": "GB/s"}


def load_machine(path, text: str | None = None) -> model.Machine:
    """A machine description::

        name: my-cluster            # optional
        ranks_per_node: 4
        intra: {latency_us: 2, bandwidth_gbps: 150}    # between ranks of one node (GB/s = 1e9 bytes/s)
        inter: {latency_us: 5, bandwidth_gbps: 25}     # between nodes

    Ranges: LINK_RANGES (latency 0..1e6 us, bandwidth 1e-6..1e5 GB/s), ranks_per_node 1..MAX_RANKS.
    Errors: ExperimentError naming file:line: key.
    """
    src = Source(path, text)
    data = src.data
    if not isinstance(data, dict):
        raise src.error((), "expected a mapping with keys ranks_per_node, intra, inter")
    for key in data:
        if key not in MACHINE_KEYS:
            raise src.error((key,), f"unknown key{did_you_mean(key, MACHINE_KEYS)}; allowed: {', '.join(MACHINE_KEYS)}")
    for key in ("ranks_per_node", "intra", "inter"):
        if key not in data:
            raise src.error((), f"missing key {key}")
    rpn = data["ranks_per_node"]
    if isinstance(rpn, bool) or not isinstance(rpn, int) or not 1 <= rpn <= MAX_RANKS:
        raise src.error(("ranks_per_node",), f"expected an integer from 1 to {MAX_RANKS}, got {rpn!r}")
    links = {}
    for key in ("intra", "inter"):
        link = data[key]
        if not isinstance(link, dict):
            raise src.error((key,), f"expected a mapping with {' and '.join(LINK_KEYS)}")
        for k in link:
            if k not in LINK_KEYS:
                raise src.error((key, k), f"unknown key{did_you_mean(k, LINK_KEYS)}; allowed: {', '.join(LINK_KEYS)}")
        vals = []
        for k in LINK_KEYS:
            if k not in link:
                raise src.error((key,), f"missing key {k}")
            v = link[k]
            lo, hi = LINK_RANGES[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:  # nan fails both
                raise src.error((key, k), f"expected a finite number of {LINK_UNITS[k]} from {lo:g} to {hi:g}, got {v!r}")
            vals.append(float(v))
        links[key] = (vals[0] * 1e-6, vals[1] * 1e9)
    name = str(data.get("name", src.name))
    from ringbench.analysis import presets  # the optional keys of a preset (docs/model.md "Machine presets")

    coll = presets.parse_collectives(src, data["collectives"]) if "collectives" in data else {}
    device = presets.parse_device(src, data["device"])[0] if "device" in data else None
    return model.Machine(ranks_per_node=rpn, intra=links["intra"], inter=links["inter"], source=name, collectives=coll, device=device)


def machine_listing() -> str:
    """One line per shipped preset: name, GPU, ranks per node, links, kernel, memory, price."""
    from ringbench.analysis import presets

    lines = [f"machine presets in {presets.PRESET_DIR} (copy one and edit it; --machine NAME or --machine FILE):"]
    for n in presets.names():
        m = load_machine(presets.path_of(n))
        d = m.device
        lines.append(
            f"  {n:14s} {m.ranks_per_node} x {d.gpu if d else '?'}, intra {m.intra[1] / 1e9:g} GB/s, inter {m.inter[1] / 1e9:g} GB/s"
            + (f", {d.kernel}, {d.memory_bytes / 2**30:g} GiB, {d.price_per_hour:g}/GPU-h" if d else "")
        )
    return "\n".join(lines)


def machine_from_probes(probes) -> model.Machine | None:
    """The machine a probe across nodes measured (``ringbench probe`` on 2+ nodes with 2+ ranks on a node: its
    intra- and inter-node pairs' latency and bandwidth, its ranks per node, its all-to-alls as ``collectives``), the
    probe of most nodes; None when no
    probe measured both link classes (then the calibration's one link stands for every link)."""
    both = [p for p in probes if "intra_bandwidth_Bps" in p.summary and "inter_bandwidth_Bps" in p.summary]
    if not both:
        return None
    pr = max(both, key=lambda p: (p.summary.get("nodes", 0), p.created_utc))
    s = pr.summary
    return model.Machine(
        ranks_per_node=int(s["ranks_per_node"]),
        intra=(float(s["intra_latency_s"]), float(s["intra_bandwidth_Bps"])),
        inter=(float(s["inter_latency_s"]), float(s["inter_bandwidth_Bps"])),
        source=f"link classes measured by {pr.path}:/probes/{pr.name} ({s.get('nodes')} nodes, {int(s['ranks_per_node'])} ranks per node)",
        collectives=probe_collectives(s),
    )


def probe_collectives(summary: dict) -> dict:
    """A probe's all-to-alls within and across nodes as a preset's ``collectives`` (the model prices each pairwise
    round at it): the fitted per-peer bandwidth is the all-to-all's bus bandwidth (busbw = algbw (U - 1) / U, algbw =
    U m / ((U - 1) m / bw)). Empty when the probe measured neither."""
    out = {}
    for cls in ("intra", "inter"):
        bw = summary.get(f"a2a_{cls}_bandwidth_Bps")
        if bw is not None and math.isfinite(bw) and bw > 0:
            out[cls] = {"all_to_all": float(bw)}
    return out
