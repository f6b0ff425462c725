"""What `advise` (and `plan`) refuse: too many ranks, machine files with non-finite or absurd values, input files that
are not regular files (a FIFO, /dev/zero) or are too large. Every refusal: one line on stderr, exit status 2.

The subprocesses have timeouts, so a regression that blocks on a FIFO or reads /dev/zero forever fails instead of
hanging the suite."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import advise
from ringbench.sweeps import experiment
from ringbench.sweeps.experiment import ExperimentError

from conftest import ROOT, child_env, ringbench

LINKS = "intra: {latency_us: 1, bandwidth_gbps: 100}\ninter: {latency_us: 5, bandwidth_gbps: 25}\n"
TIMEOUT_S = 60  # far above what any of these takes; only a hang reaches it


@pytest.fixture
def probe_file(tmp_path):
    """A result file holding one 2-rank probe (per-piece rates, a link, a copy rate), written without MPI."""
    path = tmp_path / "probe.h5"
    flops = np.array([1e6, 1e8, 1e10])

    def seconds(work, rate):
        return np.ones((3, 2, 2)) * (work / rate)[:, None, None]

    probe = store.Probe(
        nranks=2,
        config={"dtype": "float32"},
        provenance={"hosts": ["h"]},
        samples={
            "block_flops": flops,
            "compute_s": seconds(flops, 5e10),
            "bwd_block_flops": 2.5 * flops,
            "bwd_compute_s": seconds(2.5 * flops, 4e10),
            "causal_flops": flops / 2,
            "causal_compute_s": seconds(flops / 2, 3e10),
            "bwd_causal_compute_s": seconds(2.5 * flops / 2, 2e10),
        },
        summary={"latency_s": 3e-6, "bandwidth_Bps": 1e10, "copy_Bps": 2e10},
        created_utc="2026-12-01T00:00:00+00:00",
        name="probe-P2",
    )
    store.append_probe(path, probe)
    return path


def one_line_exit_2(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-300:], res.stderr[-300:])
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and not res.stdout, res.stderr
    return res.stderr


# ---------------------------------------------------------------------------------------------
# Item 6: the rank bound
# ---------------------------------------------------------------------------------------------
def test_advise_refuses_more_ranks_than_its_bound(probe_file):
    """advise --ranks 1000000 raised MemoryError (a (P, P) array of 7.28 TiB); now one line, exit 2; the bound
    itself is predicted, every strategy, both passes."""
    res = ringbench("advise", "--probe", probe_file, "--ranks", "1024,1000000", "--seq-len", 1048576000, timeout=TIMEOUT_S)
    err = one_line_exit_2(res)
    assert f"--ranks: at most {advise.MAX_RANKS} ranks" in err and "got 1000000" in err
    args = ("--ranks", advise.MAX_RANKS, "--seq-len", 64 * advise.MAX_RANKS, "--causal", "--layout", "zigzag", "--pass", "fwd+bwd")
    ok = ringbench("advise", "--probe", probe_file, *args, timeout=TIMEOUT_S)
    assert ok.returncode == 0, ok.stderr
    assert f"P={advise.MAX_RANKS}" in ok.stdout and "winner: ring" in ok.stdout and "nan" not in ok.stdout


# ---------------------------------------------------------------------------------------------
# Item 9: machine files with non-finite or absurd values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,where,allowed",
    [
        ("intra: {latency_us: .nan, bandwidth_gbps: 100}", "m.yaml:2: intra.latency_us", "from 0 to 1e+06, got nan"),
        ("intra: {latency_us: .inf, bandwidth_gbps: 100}", "m.yaml:2: intra.latency_us", "got inf"),
        ("intra: {latency_us: -1, bandwidth_gbps: 100}", "m.yaml:2: intra.latency_us", "got -1"),
        ("intra: {latency_us: 1.0e+300, bandwidth_gbps: 100}", "m.yaml:2: intra.latency_us", "got 1e+300"),
        ("intra: {latency_us: 1, bandwidth_gbps: .nan}", "m.yaml:2: intra.bandwidth_gbps", "GB/s from 1e-06 to 100000, got nan"),
        ("intra: {latency_us: 1, bandwidth_gbps: .inf}", "m.yaml:2: intra.bandwidth_gbps", "got inf"),
        ("intra: {latency_us: 1, bandwidth_gbps: -.inf}", "m.yaml:2: intra.bandwidth_gbps", "got -inf"),
        ("intra: {latency_us: 1, bandwidth_gbps: 1.0e+300}", "m.yaml:2: intra.bandwidth_gbps", "got 1e+300"),
        ("intra: {latency_us: 1, bandwidth_gbps: 1.0e-300}", "m.yaml:2: intra.bandwidth_gbps", "got 1e-300"),
        ("intra: {latency_us: 1, bandwidth_gbps: 0}", "m.yaml:2: intra.bandwidth_gbps", "got 0"),
    ],
)
def test_machine_links_must_be_finite_and_within_range(text, where, allowed, tmp_path, probe_file):
    path = tmp_path / "m.yaml"
    path.write_text(f"ranks_per_node: 4\n{text}\ninter: {{latency_us: 5, bandwidth_gbps: 25}}\n")
    with pytest.raises(ExperimentError) as exc:
        advise.load_machine(path)
    assert where in str(exc.value) and allowed in str(exc.value)
    res = ringbench("advise", "--probe", probe_file, "--seq-len", 64, "--ranks", 2, "--machine", path, timeout=TIMEOUT_S)
    err = one_line_exit_2(res)
    assert where in err and allowed in err


def test_machine_ranks_per_node_is_bounded_and_edges_are_accepted(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(f"ranks_per_node: {10**30}\n{LINKS}")
    with pytest.raises(ExperimentError, match=f"m.yaml:1: ranks_per_node: expected an integer from 1 to {advise.MAX_RANKS}"):
        advise.load_machine(path)
    edges = "intra: {latency_us: 0, bandwidth_gbps: 1.0e+5}\ninter: {latency_us: 1.0e+6, bandwidth_gbps: 1.0e-6}\n"
    path.write_text(f"ranks_per_node: {advise.MAX_RANKS}\n{edges}")
    m = advise.load_machine(path)
    assert m.ranks_per_node == advise.MAX_RANKS and m.intra == (0.0, 1e14) and m.inter == (1.0, 1e3)


def test_experiment_timeout_must_be_finite_and_at_most_a_week(tmp_path):
    """timeout: 1.0e+300 was accepted: `submit` wrote a Slurm --time of 300 digits."""
    path = tmp_path / "t.yaml"
    week = "expected at most 604800 seconds (7 days) per point, got"
    cases = [("1.0e+300", f"{week} 1e+300"), ("604801", f"{week} 604801"), (".inf", "finite positive number of seconds, got inf")]
    for value, want in cases:
        path.write_text(f"name: t\ntimeout: {value}\n")
        err = one_line_exit_2(ringbench("plan", path, timeout=TIMEOUT_S))
        assert f"t.yaml:2: timeout: {want}" in err or f"t.yaml:2: timeout: expected a {want}" in err, err
    path.write_text("name: t\ntimeout: 604800\n")
    assert experiment.load(path).timeout == experiment.MAX_TIMEOUT_S


# ---------------------------------------------------------------------------------------------
# Item 10: files that are not regular files, or too large
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    return path


def test_plan_refuses_a_fifo_and_dev_zero(fifo):
    """`ringbench plan /dev/zero` and a FIFO blocked forever (read_bytes on an endless device, open on a FIFO with
    no writer)."""
    err = one_line_exit_2(ringbench("plan", fifo, timeout=TIMEOUT_S))
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in err
    err = one_line_exit_2(ringbench("plan", "/dev/zero", timeout=TIMEOUT_S))
    assert "/dev/zero: is a character device, not a regular file" in err


def test_advise_refuses_a_machine_file_that_is_a_fifo_or_dev_zero(fifo, probe_file):
    for path, kind in [(fifo, "a FIFO (named pipe)"), ("/dev/zero", "a character device")]:
        res = ringbench("advise", "--probe", probe_file, "--seq-len", 64, "--ranks", 2, "--machine", path, timeout=TIMEOUT_S)
        assert f"{path}: is {kind}, not a regular file" in one_line_exit_2(res)


def test_a_yaml_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as fh:  # sparse: no disk used
        fh.truncate(experiment.MAX_YAML_BYTES + 1)
    err = one_line_exit_2(ringbench("plan", path, timeout=TIMEOUT_S))
    assert f"is {experiment.MAX_YAML_BYTES + 1} bytes; a YAML file may have at most {experiment.MAX_YAML_BYTES} bytes (16 MiB)" in err
    with pytest.raises(ExperimentError, match="may have at most 16"):
        advise.load_machine(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text("ranks_per_node: 2\n" + LINKS)
    assert experiment.read_regular_file(ok, "ok.yaml", limit=105) == ok.read_bytes()
    with pytest.raises(ExperimentError, match="ok.yaml: is 105 bytes; a YAML file may have at most 104 bytes$"):
        experiment.read_regular_file(ok, "ok.yaml", limit=104)


# ---------------------------------------------------------------------------------------------
# benchmarks/advise_bench.py runs (its speed is checked by running it, not here)
# ---------------------------------------------------------------------------------------------
def bench(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "advise_bench.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300, cwd=ROOT)


def test_advise_bench_prints_every_case():
    res = bench("--ranks", 8, "--baseline-ranks", 4, "--repeat", 1)
    assert res.returncode == 0, res.stderr
    assert "SIMD" in res.stdout.splitlines()[0]
    rows = [ln.split() for ln in res.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["advise"] * 4 + ["baseline"] * 2 + ["refuse"]
    assert all("target" in " ".join(r) for r in rows[:4]) and all("same: True" in " ".join(r) for r in rows[4:6])
    assert "--ranks: at most" in " ".join(rows[-1])
    bad = bench("--ranks", 10**7)
    assert bad.returncode == 2 and "--ranks" in bad.stderr.strip().splitlines()[-1]


def test_ranks_that_cannot_fill_the_machines_nodes_are_refused(tmp_path, probe_file):
    """A rank count above a node that ranks_per_node does not divide cannot be laid out: one line, exit 2; a multiple,
    or a job within one node, is predicted."""
    path = tmp_path / "m.yaml"
    path.write_text("ranks_per_node: 3\nintra: {latency_us: 2, bandwidth_gbps: 150}\ninter: {latency_us: 5, bandwidth_gbps: 25}\n")
    res = ringbench("advise", "--probe", probe_file, "--seq-len", 384, "--ranks", "3,4", "--machine", path, timeout=TIMEOUT_S)
    err = one_line_exit_2(res)
    assert "--ranks: 4 ranks cannot fill nodes of 3 (ranks_per_node of " in err
    ok = ringbench("advise", "--probe", probe_file, "--seq-len", 384, "--ranks", "2,6", "--machine", path, timeout=TIMEOUT_S)
    assert ok.returncode == 0, ok.stderr


def test_machine_from_a_probe_across_nodes():
    """advise takes the link classes a probe across nodes measured as its machine; a probe of one node gives none."""
    from ringbench import store

    s = {"nodes": 2, "ranks_per_node": 2, "intra_latency_s": 2e-6, "intra_bandwidth_Bps": 5e9}
    one = store.Probe(nranks=2, config={}, provenance={}, samples={}, summary=dict(s), name="one", created_utc="a")
    assert advise.machine_from_probes([one]) is None
    s.update(inter_latency_s=3e-5, inter_bandwidth_Bps=5e7)
    two = store.Probe(nranks=4, config={}, provenance={}, samples={}, summary=s, name="two", created_utc="b", path="p.h5")
    m = advise.machine_from_probes([one, two])
    assert m.ranks_per_node == 2 and m.intra == (2e-6, 5e9) and m.inter == (3e-5, 5e7) and "p.h5:/probes/two" in m.source
