"""Machine presets (ringbench/analysis/machines/*.yaml) and the model's device terms (docs/model.md "Machine presets")."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ringbench.analysis import advise, model, presets
from ringbench.layout import CAUSAL, FULL, Piece
from ringbench.yamlfile import ExperimentError

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"a100-sxm4-8x", "h800-8x", "h100-sxm5-8x", "h200-8x", "b200-8x"}


def test_the_shipped_presets_load_and_carry_a_device():
    assert REQUIRED <= set(presets.names())
    for name in presets.names():
        m = advise.load_machine(presets.path_of(name))
        assert m.ranks_per_node == 8 and m.source == name
        assert m.device is not None and m.device.memory_bytes > 2**35 and m.device.price_per_hour > 0
        assert set(m.collectives) == {"intra", "inter"}
        assert m.intra[1] > m.inter[1]  # NVLink beats the NIC
        for key, pts in m.device.tables.items():
            assert [t for t, _ in pts] == sorted(t for t, _ in pts) and all(r > 1e12 for _, r in pts), (name, key)


def test_every_number_in_a_preset_names_its_source():
    """Each line holding a number carries a comment with a source tag ([FA3], [SPEC], [EST], ...), or belongs to a
    mapping line that does (the comment covers the flow mapping)."""
    for path in presets.PRESET_DIR.glob("*.yaml"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            body = line.split("#")[0]
            if re.search(r":\s*[\[{]?\s*-?\d", body) and not re.search(r"#.*\[(FA2|FA3|SPEC|NCCL|RFA|EST)\]", line):
                if "name:" in body or "ranks_per_node" in body or "head_dim" in body or "tokens:" in body:
                    continue  # names, counts and the table's own axis, not measurements
                raise AssertionError(f"{path.name}:{i}: a number without a source: {line.strip()}")


def test_a_machine_file_without_the_new_keys_still_loads(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("ranks_per_node: 4\nintra: {latency_us: 2, bandwidth_gbps: 150}\ninter: {latency_us: 5, bandwidth_gbps: 25}\n")
    m = advise.load_machine(path)
    assert m.device is None and m.collectives == {} and m.intra == (2e-6, 150e9)


@pytest.mark.parametrize(
    "edit, where",
    [
        (("memory_gib: 79.6", "memory_gib: -1"), "device.memory_gib"),
        (("overlap_slowdown: 0.06", "overlap_slowdwn: 0.06"), "device.overlap_slowdwn: unknown key (did you mean 'overlap_slowdown'?)"),
        (("fwd_tflops:        [467, 565,", "fwd_tflops:        [467,"), "device.kernel.fwd_tflops: expected a list of 6"),
        (("[512, 1024, 2048,", "[1024, 512, 2048,"), "device.kernel.tokens: expected token counts in ascending order"),
        (("all_gather_busbw_gbps: 360", "all_gather_busbw_gbps: .nan"), "collectives.intra.all_gather_busbw_gbps"),
        (("hbm_gbps: 3000", "hbm_gbps: true"), "device.hbm_gbps"),
    ],
)
def test_bad_preset_values_name_file_line_and_key(tmp_path, edit, where):
    text = (presets.PRESET_DIR / "h100-sxm5-8x.yaml").read_text()
    assert edit[0] in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ExperimentError) as exc:
        advise.load_machine(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:") and where in msg and "\n" not in msg


def test_device_rate_interpolates_and_falls_below_the_table():
    d = advise.load_machine(presets.path_of("h800-8x")).device
    assert d.rate("fwd", False, 8192) == pytest.approx(370e12)
    assert d.rate("fwd", True, 8192) == pytest.approx(333e12)
    assert 362e12 < d.rate("fwd", False, 3000) < 368e12  # between 2k and 4k, linear in log tokens
    assert d.rate("fwd", False, 1 << 20) == pytest.approx(370e12)  # clamped above
    assert d.rate("bwd", False, 256) == pytest.approx(214e12 / 2)  # below 512: proportional to the tokens


def test_a_call_is_overhead_plus_work_at_its_rate_plus_its_merge():
    d = advise.load_machine(presets.path_of("h800-8x")).device
    b, h, hk, dim, n = 1, 32, 8, 128, 4096
    full = Piece(0, n, 0, n, FULL)
    want = d.call_overhead_s + 4 * b * h * dim * n * n / d.rate("fwd", False, n) + 38 * b * n * h * dim / d.hbm_Bps
    assert d.call_seconds(b, h, hk, dim, full, "fwd") == pytest.approx(want, rel=1e-12)
    diag = Piece(0, n, 0, n, CAUSAL)
    want_b = d.call_overhead_s + 2.5 * 4 * b * h * dim * diag.pairs() / d.rate("bwd", True, n)
    want_b += (10 * b * n * h * dim + 2 * 10 * b * n * hk * dim) / d.hbm_Bps
    assert d.call_seconds(b, h, hk, dim, diag, "bwd") == pytest.approx(want_b, rel=1e-12)
    assert d.single_call_seconds(b, h, dim, n, True, "fwd") < d.call_seconds(b, h, hk, dim, diag, "fwd")  # no merge


def test_the_preset_drives_the_model_per_piece_with_its_terms():
    m = advise.load_machine(presets.path_of("h100-sxm5-8x"))
    cal = presets.calibration(m)
    shape = model.Shape(nranks=8, seq_len=8 * 8192, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", causal=True, layout="zigzag")
    pred = model.predict(shape, cal, m)
    # step 0 of zigzag: two causal c x c pieces and one full c x c piece, each a call of the device
    c = 4096
    step0 = sum(m.device.call_seconds(1, 32, 8, 128, p, "fwd") for p in model.class_plans("zigzag", 8, 8192, True)[model.SAME])
    assert pred.compute_s[0, 0] == pytest.approx(step0, rel=1e-12) and pred.step_s[0] >= step0
    assert step0 > 2 * m.device.call_seconds(1, 32, 8, 128, Piece(0, c, 0, c, CAUSAL), "fwd")
    # the overlap slowdown stretches a step's compute by sigma min(compute, transfer)
    sends = model.comm_time(model.block_bytes(shape), *m.intra)
    busy = pred.compute_s[:, 1].max()
    assert pred.step_s[1] == pytest.approx(max(busy + m.device.overlap_slowdown * min(busy, sends), sends), rel=1e-12)


def test_node_boundary_and_collectives_bus_bandwidth():
    m = advise.load_machine(presets.path_of("h100-sxm5-8x"))
    cal = presets.calibration(m)
    nbytes = 2**25
    inside = model.allgather_time(nbytes, 8, cal, m)
    assert inside == pytest.approx(7 * (m.intra[0] + nbytes / m.collectives["intra"]["all_gather"]))
    across = model.allgather_time(nbytes, 16, cal, m)
    assert across == pytest.approx(15 * (m.inter[0] + nbytes / m.collectives["inter"]["all_gather"]))
    assert model.alltoall_time(nbytes, 8, cal, m, 64) == pytest.approx(7 * (m.intra[0] + nbytes / m.collectives["intra"]["all_to_all"]))
    assert model.alltoall_time(nbytes, 16, cal, m, 64) == pytest.approx(15 * (m.inter[0] + nbytes / m.collectives["inter"]["all_to_all"]))
    # the ring's links: intra-node within a node, inter-node across
    assert model.ring_link(cal, m, 8, 1) == m.intra and model.ring_link(cal, m, 16, 1) == m.inter


def test_memory_estimate_counts_what_each_strategy_holds():
    base = model.Shape(nranks=8, seq_len=8 * 4096, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", causal=True)
    q, kv = 4096 * 32 * 128, 2 * 4096 * 8 * 128
    local = (2 * q + kv) * 2 + q * 4 + 4096 * 32 * 4
    assert advise.memory_bytes(base) == local + kv * 2
    assert advise.memory_bytes(base.with_(mode="allgather")) == local + 7 * kv * 2
    assert advise.memory_bytes(base.with_(pass_="fwd+bwd")) == local + kv * 2 + q * 2 + q * 4 + 2 * kv * 4


def test_preset_from_a_probe_loads_back(tmp_path):
    """The probe -> preset path on the CPU: a calibration as a probe gives it, written as a preset, read back."""
    flops = np.array([4 * 8 * 64 * n * n for n in (256, 1024, 4096)], dtype=float)
    cal = model.Calibration(
        rates={2: list(zip(flops, [5e10, 7e10, 8e10]))},
        links={2: (3e-6, 1e10)},
        bwd_rates={2: list(zip(2.5 * flops, [4e10, 5e10, 6e10]))},
        diag_rates={2: list(zip(flops, [3e10, 5e10, 6e10]))},
        copy_bw={2: 2e10},
        source="probe test",
    )
    base = advise.load_machine(presets.path_of("h100-sxm5-8x"))
    path = tmp_path / "probed.yaml"
    path.write_text(presets.preset_from_calibration(cal, base, "probed", 1, 8, 64))
    m = advise.load_machine(path)
    assert m.intra == pytest.approx((3e-6, 1e10)) and m.inter == base.inter and m.collectives == base.collectives
    assert [t for t, _ in m.device.tables[("fwd", False)]] == [256, 1024, 4096]
    assert m.device.rate("fwd", False, 1024) == pytest.approx(7e10)
    assert m.device.rate("fwd", True, 4096) == pytest.approx(6e10)
    assert m.device.rate("bwd", False, 256) == pytest.approx(4e10)
    assert m.device.hbm_Bps == pytest.approx(2e10)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ringbench", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_advise_with_a_preset_by_name_and_nodes():
    res = run_cli(
        "advise", "--machine", "h100-sxm5-8x", "--nodes", 8, "--seq-len", 1048576, "--heads", 32, "--kv-heads", 8,
        "--head-dim", 128, "--dtype", "bfloat16", "--causal", "--pass", "fwd+bwd",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "N=1048576 P=64" in out and "machine preset h100-sxm5-8x" in out
    for label in ("ring", "allgather", "hybrid U=2", "hybrid U=32", "pass-q"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(label + " "))
        assert re.search(r"\d\.\d{3} (s|ms) ", line) and "sends" in line and "of 79.6 GiB" in line and "/M tokens" in line, line
    assert "ulysses      refused" in out  # 64 ranks, 32 heads
    assert re.search(r"winner: \S.*ahead of the next", out) and "P=64: the winner" in out
    assert re.search(r"P=64: the ring hides its transfers from n = \d+ tokens per rank", out)  # the crossover
    ring = next(ln for ln in out.splitlines() if ln.strip().startswith("ring "))
    assert re.search(r"\s\d\.\d{3} s ", ring), ring  # a time over a second in seconds, not 1778.123 ms


def test_advise_marks_what_does_not_fit_and_lists_machines(tmp_path):
    res = run_cli("advise", "--machine", "a100-sxm4-8x", "--ranks", 8, "--seq-len", 16 * 2**20, "--heads", 32, "--kv-heads", 8,
                  "--head-dim", 128, "--dtype", "bfloat16", "--causal", "--layout", "zigzag")  # fmt: skip
    assert res.returncode == 0, res.stderr
    ag = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("allgather"))
    assert "DOES NOT FIT" in ag  # 16M tokens of K/V (64 GiB) on every GPU
    res = run_cli("advise", "--list-machines")
    assert res.returncode == 0 and all(n in res.stdout for n in REQUIRED)


@pytest.mark.parametrize(
    "args, msg",
    [
        (("--machine", "h100-sxm5", "--ranks", 8, "--seq-len", 64), "--machine: h100-sxm5: cannot read"),
        (("--nodes", 2, "--seq-len", 64, "--probe", "x.h5"), "--nodes: needs --machine"),
        (("--machine", "h100-sxm5-8x", "--seq-len", 64), "the following arguments are required: --ranks"),
    ],
)
def test_advise_preset_errors_are_one_line_exit_2(args, msg):
    res = run_cli("advise", *args)
    assert res.returncode == 2 and msg in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_device_calibration_needs_no_probe_and_has_every_phase():
    cal = presets.calibration(advise.load_machine(presets.path_of("b200-8x")))
    assert cal.has_phase("fwd+bwd") and cal.per_piece("bwd") and math.isfinite(cal.rate(1e12, 8))
