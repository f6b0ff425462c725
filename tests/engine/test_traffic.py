"""Every strategy's own count of what it sends (``bytes_per_rank``, the report's bandwidth and the model's traffic)
is what MPI was handed in the same run: ``comm.TRAFFIC`` counts every buffer to every other rank (provenance ``nodes``),
per phase, per rank."""

import pytest

from ringbench.analysis import model

from conftest import Batch

SMALL = ["--heads", 4, "--kv-heads", 2, "--head-dim", 8, "--seq-len", 96, "--repeat", 1, "--warmup", 0, "--quiet"]
MODES = {
    "overlap": [],
    "blocking": [],
    "allgather": [],
    "ulysses": [],
    "hybrid": ["--ulysses-degree", 2],
    "pass-q": [],
}


@pytest.fixture(scope="module")
def traffic_runs(tmp_path_factory):
    def cases(nranks):
        return {m: ["--mode", m, *extra] for m, extra in MODES.items()}

    return Batch(tmp_path_factory.mktemp("traffic"), cases, [*SMALL, "--pass", "fwd+bwd", "--causal"])


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
def test_bytes_per_rank_is_what_mpi_was_handed(mode, traffic_runs):
    run = traffic_runs.run(4, mode)
    sent = run.provenance["nodes"]["bytes_per_rank"]
    shape = model.Shape.from_config(run.config, 4)
    assert run.phases() == ["fwd", "bwd"]
    for ph in run.phases():
        phase = run.phase(ph)
        counted = [a + b for a, b in zip(sent[ph]["intra"], sent[ph]["inter"])]
        assert max(counted) == phase.summary["bytes_per_rank"], (ph, counted, phase.summary["bytes_per_rank"])
        assert model.strategy_bytes(shape, ph) == phase.summary["bytes_per_rank"], ph
