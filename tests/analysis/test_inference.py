"""ringbench.analysis.inference: the serving passes' model (Meta's rule, the bytes of pass-KV and pass-Q, the decode
merges' latencies) and their report tables."""

import math

import numpy as np
import pytest

from ringbench.analysis import advise, model, presets
from ringbench.analysis import inference as aserving
from ringbench.analysis.report import table
from ringbench.layout import LAYOUTS, divisor, prefill_plan

from conftest import ringbench


def test_model_rules():
    assert aserving.prefill_rule(1000, 0, 8, 1) == "pass-kv"
    assert aserving.prefill_rule(10, 990, 8, 1) == "pass-q"  # 0.01 < 2 / 8
    r = dict(nranks=4, seq_len=1024, cached_tokens=768, batch=1, heads=8, kv_heads=1, head_dim=64)
    b = aserving.prefill_bytes(r, 4, 4)
    assert b["pass-kv"] == 3 * 256 * 2 * 64 * 4 and b["pass-q"] == 3 * 64 * 8 * (64 * 4 + 65 * 4)


RATE = 1e10


def _w(**kw):
    return {**dict(batch=2, heads=6, kv_heads=3, head_dim=5, dtype="float32", layout="contiguous", new_tokens=1), **kw}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_compute_is_the_busiest_rank_per_step_brute_forced(layout):
    """With one rate and a free link the prefill's pass-KV time is the sum over steps of the busiest rank's pairs
    (every rank's prefill plan at every step, counted one by one); pass-Q computes the same pieces, the roles swapped,
    and so takes the same time; all-gather too. Random odd shapes, P = 1..4, every cached size."""
    rng = np.random.default_rng(len(layout))
    cal = model.Calibration.simple(rate=RATE, latency=0.0, bandwidth=math.inf)
    for _ in range(12):
        P = int(rng.integers(1, 5))
        div = divisor(layout, P)
        n = div * int(rng.integers(1, 7))
        c = div * int(rng.integers(0, n // div))
        w = _w(nranks=P, seq_len=n, cached_tokens=c, layout=layout, batch=int(rng.integers(1, 3)))
        nn, nc = (n - c) // P, c // P
        per_pair = 4 * w["batch"] * w["heads"] * w["head_dim"] / RATE
        kv = sum(max(sum(p.pairs() for p in prefill_plan(layout, r, (r - s) % P, P, nn, nc)) for r in range(P)) for s in range(P))
        q = sum(max(sum(p.pairs() for p in prefill_plan(layout, (r - s) % P, r, P, nn, nc)) for r in range(P)) for s in range(P))
        got = aserving.predict_prefill(w, cal)
        assert got["pass-kv"] == pytest.approx(kv * per_pair, rel=1e-12, abs=1e-18), (P, n, c)
        assert got["pass-q"] == pytest.approx(q * per_pair, rel=1e-12, abs=1e-18), (P, n, c)
        assert got["allgather"] == pytest.approx(kv * per_pair, rel=1e-12, abs=1e-18)
    # contiguous at C = 0, P = 2: the diagonal block, then rank 1's full block of rank 0's keys: 1.5 blocks, not 1
    w = _w(nranks=2, seq_len=64, cached_tokens=0)
    per_pair = 4 * 2 * 6 * 5 / RATE
    assert aserving.predict_prefill(w, cal)["pass-kv"] == pytest.approx((32 * 33 // 2 + 32 * 32) * per_pair)


def test_prefill_transfers_and_the_crossover():
    """pass-KV sends P - 1 K/V blocks of N / P tokens, pass-Q P - 1 query blocks of T / P tokens and their partials:
    with a fast compute and a slow link, few new tokens favour pass-Q and many favour pass-KV (Meta's rule)."""
    lat, bw = 1e-5, 1e8
    cal = model.Calibration.simple(rate=1e15, latency=lat, bandwidth=bw)
    w = _w(nranks=4, seq_len=8192, cached_tokens=8064, heads=8, kv_heads=1, head_dim=64, batch=1)
    steps = aserving.prefill_steps(w, cal)
    kv_block = 2 * 2048 * 1 * 64 * 4
    assert steps["pass-kv"][:3] == pytest.approx([lat + kv_block / bw] * 3, rel=1e-3) and steps["pass-kv"][3] < 1e-6
    q_block, part = 32 * 8 * 64 * 4, 32 * 8 * 65 * 4
    assert steps["pass-q"][1] == pytest.approx(lat + q_block / bw, rel=1e-3)
    assert steps["pass-q"][2] == pytest.approx(2 * lat + (q_block + part) / bw, rel=1e-3)
    assert steps["pass-q"][4] == pytest.approx(lat + part / bw, rel=1e-3)
    few_new = aserving.predict_prefill(w, cal)
    all_new = aserving.predict_prefill({**w, "cached_tokens": 0}, cal)
    assert min(few_new, key=few_new.get) == "pass-q" and all_new["pass-kv"] < all_new["pass-q"]


def test_decode_merges_latency_and_the_memory_bound():
    lat, bw = 1e-5, 1e9
    cal = model.Calibration.simple(rate=1e12, latency=lat, bandwidth=bw)
    w = _w(seq_len=2**16, batch=1, heads=8, kv_heads=1, head_dim=63)
    part = 8 * 64 * 4
    m = {P: aserving.decode_merge_s({**w, "nranks": P}, cal) for P in (1, 4, 16)}
    assert m[1] == {"ring": 0.0, "tree": 0.0, "gather": 0.0}
    assert m[16]["ring"] == pytest.approx(15 * (lat + part / bw))
    assert m[16]["tree"] == pytest.approx(4 * (2 * lat + (part + 8 * 4) / bw))  # log2 P rounds of two all-reduces
    assert m[16]["gather"] == pytest.approx(lat + 15 * part / bw)
    assert m[16]["tree"] < m[16]["ring"] and m[4]["ring"] < m[4]["tree"]  # 3 hops against 2 x 2 rounds
    flops_s = 4 * 8 * 63 * 2**14 / 1e12
    assert aserving.decode_compute_s({**w, "nranks": 4}, cal) == pytest.approx(flops_s)
    cal.copy_bw = {1: 1e9}  # reading the shard's K and V (2 x 2^14 x 63 x 4 bytes) at 1 GB/s binds
    assert aserving.decode_compute_s({**w, "nranks": 4}, cal) == pytest.approx(2 * 2**14 * 63 * 4 / 1e9)


def test_a_machine_gives_the_links_by_node_boundary():
    cal = model.Calibration.simple(rate=1e12, latency=1e-6, bandwidth=1e10)
    machine = model.Machine(ranks_per_node=4, intra=(2e-6, 1e11), inter=(5e-5, 1e9), source="test")
    w = _w(seq_len=4096, batch=1, heads=8, kv_heads=1, head_dim=64)
    part = 8 * 65 * 4
    inside = aserving.decode_merge_s({**w, "nranks": 4}, cal, machine)
    across = aserving.decode_merge_s({**w, "nranks": 8}, cal, machine)
    assert inside["ring"] == pytest.approx(3 * (2e-6 + part / 1e11)) and across["ring"] == pytest.approx(7 * (5e-5 + part / 1e9))
    pre = aserving.predict_prefill({**w, "nranks": 8, "cached_tokens": 0}, cal, machine)
    assert pre["pass-kv"] > aserving.predict_prefill({**w, "nranks": 8, "cached_tokens": 0}, cal)["pass-kv"]


@pytest.mark.parametrize("pass_", ["prefill", "decode"])
def test_advise_with_a_preset_uses_its_links_and_device(pass_):
    """`advise --pass prefill|decode --machine h100-sxm5-8x`: the preset's device times the pieces and its links (NVLink
    inside the node of 8, InfiniBand across) the transfers: the figures are the model's with that machine, and the
    decode ring's step jumps at the node boundary."""
    machine = advise.load_machine(presets.path_of("h100-sxm5-8x"))
    cal = presets.calibration(machine)
    c = 126976 if pass_ == "prefill" else 0
    args = ["--pass", pass_, "--machine", "h100-sxm5-8x", "--seq-len", 131072, "--ranks", "8,16", "--cached-tokens", c]
    res = ringbench("advise", *args, "--heads", 32, "--kv-heads", 8, "--head-dim", 128, "--dtype", "bfloat16", "--causal")
    assert res.returncode == 0, res.stderr
    assert "machine: h100-sxm5-8x" in res.stdout
    w = _w(batch=1, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", seq_len=131072, cached_tokens=c)
    names, scale = (aserving.PREFILL, 1e3) if pass_ == "prefill" else (aserving.MERGES, 1e6)
    rows = {int(ln.split()[1]): ln.split() for ln in res.stdout.splitlines() if ln.startswith("131072")}
    for P in (8, 16):
        pred = (aserving.predict_prefill if pass_ == "prefill" else aserving.predict_decode)({**w, "nranks": P}, cal, machine)
        assert [float(x) for x in rows[P][2:5]] == pytest.approx([pred[k] * scale for k in names], abs=1e-3)
        assert rows[P][5] == min(names, key=pred.get)
    if pass_ == "decode":
        ring = {P: float(rows[P][2]) for P in (8, 16)}
        assert ring[16] > 2 * ring[8]  # 15 hops over InfiniBand against 7 over NVLink


def _row(**kw):
    base = dict(phase="prefill", status="ok", layout="contiguous", dtype="float32", batch=1, heads=8, kv_heads=1, head_dim=8)
    return {**base, "nranks": 2, "seq_len": 64, **kw}


def test_tables_name_the_winners_and_the_rule():
    rows = [
        _row(mode="overlap", cached_tokens=0, time_s=1e-3),
        _row(mode="pass-q", cached_tokens=0, time_s=2e-3),
        _row(mode="overlap", cached_tokens=60, time_s=3e-3),
        _row(mode="pass-q", cached_tokens=60, time_s=1e-3),
        _row(phase="decode", mode="overlap", merge="ring", new_tokens=1, time_s=5e-5),
        _row(phase="decode", mode="overlap", merge="tree", new_tokens=1, time_s=4e-5),
        _row(phase="fwd", mode="overlap", time_s=1.0),  # a training row: not in these tables
    ]
    text = aserving.serving_text(rows, table)
    assert "names the measured best of pass-KV and pass-Q at 2 of 2 points" in text
    assert "50" in text and "40" in text and "tree" in text.splitlines()[-1]
    assert aserving.serving_text([rows[-1]], table) is None
    cal = model.Calibration.simple(rate=RATE, latency=0.0, bandwidth=math.inf)
    text = aserving.prefill_text(rows, table, cal)
    head, _, first = text.splitlines()[1:4]
    assert "model overlap ms" in head and "model pass-q ms" in head
    pred = aserving.predict_prefill(dict(rows[0], nranks=2, cached_tokens=0), cal)
    assert f"{pred['pass-kv'] * 1e3:.2f}" in first.split() and first.split()[-1] == "pass-kv"


def test_advice_names_the_winner_by_the_model():
    from ringbench.analysis.model import Calibration

    # a fast compute and a slow link: the transfers decide
    cal = Calibration.simple(rate=1e12, latency=1e-5, bandwidth=1e8)
    w = dict(batch=1, heads=8, kv_heads=1, head_dim=64, dtype="float32", layout="contiguous", new_tokens=1)
    few_new = aserving.predict_prefill({**w, "nranks": 4, "seq_len": 8192, "cached_tokens": 8064}, cal)
    all_new = aserving.predict_prefill({**w, "nranks": 4, "seq_len": 8192, "cached_tokens": 0}, cal)
    assert min(few_new, key=few_new.get) == "pass-q"  # T / (T + C) = 1/64 < 2 H_kv / H = 1/4
    assert all_new["pass-kv"] <= all_new["pass-q"]
    dec = {P: aserving.predict_decode({**w, "nranks": P, "seq_len": 2**20, "batch": 1}, cal) for P in (2, 64)}
    assert dec[64]["tree"] < dec[64]["ring"] and dec[2]["ring"] <= dec[2]["tree"]
    text = aserving.format_advice({**w, "pass": "prefill", "cached_tokens": 8064}, [8192], [4], cal, table)
    assert "pass-q" in text.splitlines()[-2] and "Meta's rule" in text
    text = aserving.format_advice({**w, "pass": "decode", "cached_tokens": 0}, [2**20], [2, 64], cal, table)
    assert text.splitlines()[-2].split()[-2] == "tree"
