"""ringbench.analysis.inference: the serving passes' model (Meta's rule, the bytes of pass-KV and pass-Q, the decode
merges' latencies) and their report tables."""

from ringbench.analysis import inference as aserving
from ringbench.analysis.report import table


def test_model_rules():
    assert aserving.prefill_rule(1000, 0, 8, 1) == "pass-kv"
    assert aserving.prefill_rule(10, 990, 8, 1) == "pass-q"  # 0.01 < 2 / 8
    r = dict(nranks=4, seq_len=1024, cached_tokens=768, batch=1, heads=8, kv_heads=1, head_dim=64)
    b = aserving.prefill_bytes(r, 4, 4)
    assert b["pass-kv"] == 3 * 256 * 2 * 64 * 4 and b["pass-q"] == 3 * 64 * 8 * (64 * 4 + 65 * 4)
    t = aserving.decode_times(16, 1000, 1e-4, 1e-5, 1e9)  # 2 log2 P = 8 latencies against the ring's P - 1 = 15
    assert (
        t["tree"] < t["ring"]
        and aserving.decode_times(4, 1000, 1e-4, 1e-5, 1e9)["tree"] > aserving.decode_times(4, 1000, 1e-4, 1e-5, 1e9)["ring"]
    )
    assert aserving.decode_times(1, 1000, 1e-4, 1e-5, 1e9)["ring"] == 1e-4


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
