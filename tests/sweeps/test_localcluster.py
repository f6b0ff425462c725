"""slurm/localcluster.sh: configurable ports, and a port already in use refused with one line before anything starts.

These tests never start a cluster, and use their own state directory, so a cluster running at
/tmp/ringbench-slurm (or anywhere) is left alone; they need no Slurm installed (the ports are checked first).
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from conftest import ROOT

SCRIPT = ROOT / "slurm" / "localcluster.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(tmp_path, **ports) -> subprocess.CompletedProcess:
    env = dict(os.environ, RINGBENCH_SLURM_DIR=str(tmp_path / "slurm"), **{k: str(v) for k, v in ports.items()})
    return subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def busy_port():
    """A port something listens on, for the duration of the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("var", ["RINGBENCH_SLURMCTLD_PORT", "RINGBENCH_SLURMD_PORT"])
def test_port_in_use_is_one_line_before_anything_starts(tmp_path, busy_port, var):
    other = "RINGBENCH_SLURMD_PORT" if var == "RINGBENCH_SLURMCTLD_PORT" else "RINGBENCH_SLURMCTLD_PORT"
    res = up(tmp_path, **{var: busy_port, other: free_port()})
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.strip() == (
        f"localcluster: port {busy_port} ({var}) is in use on this host; set {var} to a free port (another cluster may be running)"
    )
    assert res.stdout == ""
    assert not (tmp_path / "slurm").exists()  # nothing created, nothing started


@pytest.mark.parametrize(
    "ports, expected",
    [
        ({"RINGBENCH_SLURMCTLD_PORT": "abc"}, "RINGBENCH_SLURMCTLD_PORT=abc: expected a TCP port number 1-65535"),
        ({"RINGBENCH_SLURMD_PORT": "70000"}, "RINGBENCH_SLURMD_PORT=70000: expected a TCP port number 1-65535"),
        ({"RINGBENCH_SLURMCTLD_PORT": "7100", "RINGBENCH_SLURMD_PORT": "7100"}, "both 7100: the two daemons need two ports"),
    ],
)
def test_bad_port_values(tmp_path, ports, expected):
    ports.setdefault("RINGBENCH_SLURMCTLD_PORT", free_port())
    ports.setdefault("RINGBENCH_SLURMD_PORT", free_port())
    res = up(tmp_path, **ports)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("localcluster: ") and expected in line


def test_usage_names_the_port_variables():
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "RINGBENCH_SLURMCTLD_PORT" in res.stderr and "RINGBENCH_SLURMD_PORT" in res.stderr
