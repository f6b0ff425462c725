"""Packed documents and sliding windows under mpiexec: every strategy and layout, forward and backward, every dtype the
check has tolerances for, random odd document lengths and windows, checked against the float64 reference with the same
mask (--check: a failed check exits 1); one launch per rank count (tests/mpi_cli_runs.py)."""

from __future__ import annotations

import random

import pytest

from ringbench.documents import doc_lengths
from ringbench.kernels.torch_kernel import unavailable
from ringbench.layout import balanced_chunks, unmasked_pairs

from conftest import Batch, ringbench

MODES = ["overlap", "blocking", "allgather", "ulysses", "hybrid", "pass-q"]
LAYOUTS = ["contiguous", "zigzag", "doc-zigzag", "balanced"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
RUNS_PER_RANK_COUNT = 9


def _torch_here() -> bool:
    from ringbench.engine.backend import get_backend

    return unavailable("torch", get_backend("numpy"), "float32", backward=True) is None


def _docs(rng: random.Random, n_total: int, unit: int) -> str:
    k = n_total // unit
    cuts = sorted(rng.sample(range(1, k), rng.randint(1, min(5, k - 1))))
    bounds = [0] + cuts + [k]
    return ",".join(str((b - a) * unit) for a, b in zip(bounds[:-1], bounds[1:]))


def packed_cases(nranks: int) -> dict:
    """RUNS_PER_RANK_COUNT random runs at ``nranks``: every mode and layout over the rank counts, random documents
    (a list, or a drawn distribution) and window (or none), dtypes, the torch kernel on the ring where it imports."""
    rng = random.Random(f"packed-{nranks}")
    torch_ok = _torch_here()
    cases = {}
    for i in range(RUNS_PER_RANK_COUNT):
        mode = MODES[(i + nranks) % len(MODES)]
        lay = LAYOUTS[(i + 2 * nranks) % len(LAYOUTS)]
        n_total = 2 * nranks * rng.randint(9, 20)
        unit = 2 * nranks if lay == "doc-zigzag" else 1
        if rng.random() < 0.25 and lay != "doc-zigzag":
            docs = f"lognormal:mean={rng.randint(8, 40)},sigma=1.3,seed={i},quantum=3"
        else:
            docs = _docs(rng, n_total, unit)
        window = rng.choice([None, 3, 11, 40])
        opts = ["--mode", mode, "--layout", lay, "--seq-len", n_total, "--docs", docs, "--causal", "--pass", "fwd+bwd"]
        opts += ["--dtype", DTYPES[i % len(DTYPES)], "--head-dim", rng.choice([5, 8, 13])]
        if window:
            opts += ["--window", window]
        if mode in ("ulysses", "hybrid"):
            opts += ["--heads", 2 * nranks, "--kv-heads", 1]
            if mode == "hybrid":
                u = rng.choice([d for d in range(1, nranks + 1) if nranks % d == 0])
                opts += ["--ulysses-degree", u, "--ulysses-groups", "any"]
        else:
            opts += ["--heads", 6, "--kv-heads", rng.choice([1, 2, 3, 6])]
        if torch_ok and mode in ("overlap", "blocking") and i % 3 == 0:
            opts += ["--kernel", "torch"]
        cases[i] = opts
    return cases


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    common = ["--check", "--repeat", 1, "--warmup", 0, "--quiet"]
    return Batch(tmp_path_factory.mktemp("packed"), packed_cases, common)


@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_every_strategy_and_layout_with_documents_and_windows_is_checked(nranks, packed):
    for i in range(RUNS_PER_RANK_COUNT):
        run = packed.run(nranks, i)
        fwd, bwd = run.phase("fwd").check, run.phase("bwd").check
        assert fwd["passed"] and bwd["passed"], (run.config, fwd, bwd)
        assert "masked by" in fwd["reference"] and "masked by" in bwd["reference"]
        cfg = run.config
        docs = doc_lengths(cfg["docs"], cfg["seq_len"])  # the config stores the spec as written
        assert (
            unmasked_pairs(cfg["layout"], nranks, cfg["seq_len"], True, docs, cfg["window"]) <= cfg["seq_len"] * (cfg["seq_len"] + 1) // 2
        )
        # schema 5: a balanced run records the chunks per rank its deal chose (the rule's, for this mask); others 0
        want = balanced_chunks(nranks, cfg["seq_len"], docs, cfg["window"], True) if cfg["layout"] == "balanced" else 0
        assert run.chunks_per_rank == want, (cfg, run.chunks_per_rank)


def test_cli_refuses_documents_and_windows_that_cannot_hold_with_one_line():
    for argv, words in [
        (["--seq-len", 64, "--docs", "30,30"], ["--docs", "sum to 60"]),
        (["--seq-len", 64, "--docs", "0,64"], ["--docs", ">= 1"]),
        (["--seq-len", 64, "--window", 0, "--causal"], ["--window", ">= 1"]),
        (["--seq-len", 64, "--docs", "31,33", "--layout", "doc-zigzag", "--causal"], ["--docs", "document 0 has 31 tokens"]),
        (["--seq-len", 64, "--docs", "32,32", "--layout", "striped"], ["--docs", "striped takes no documents"]),
        (["--seq-len", 64, "--window", 8], ["--window", "add --causal"]),
    ]:
        res = ringbench("run", *map(str, argv))
        err = res.stderr.strip()
        assert res.returncode == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), (argv, err)
