"""ringbench.engine.api: every registered engine, built from a RankContext and used only through the Engine interface,
matches the float64 reference forward and backward at 1..4 ranks (one launch per rank count), and the harness builds
every mode the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringbench.config import MODES
from ringbench.engine import api

from conftest import mpi_worker

WORKER = Path(__file__).with_name("mpi_engine_api.py")


def test_every_mode_has_an_engine():
    assert set(api.ENGINES) == set(MODES)


@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_every_engine_through_the_interface_matches_float64(nranks):
    got = mpi_worker(WORKER, nranks, {})["checked"]
    assert {"overlap", "blocking", "allgather", "pass-q"} <= set(got)
    if nranks in (2, 4):
        assert "ulysses" in got and "hybrid/U=2" in got
