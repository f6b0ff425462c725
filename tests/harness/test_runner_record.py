"""The run record (record.assemble) from fake gathered per-rank parts, the memory check: no MPI launched."""

import numpy as np
import pytest

from ringbench.analysis import measure
from ringbench.config import RunConfig, point_id
from ringbench.harness import memory, record

P, R, W = 2, 3, 1  # ranks, repeats, warm-ups


def _passes(rng, n: int, steps: int) -> list:
    """``n`` passes as Ring.forward returns them: (compute_s, comm_s, step_s) per step, then the pass's total."""
    out = []
    for _ in range(n):
        compute, comm = rng.uniform(1e-3, 2e-3, steps), rng.uniform(0, 1e-4, steps)
        out.append((compute, comm, compute + comm, float((compute + comm).sum())))
    return out


def _part(cfg: RunConfig, rank: int, rng) -> dict:
    steps = {"fwd": P, "bwd": P + 1}
    only = {"fwd": P - 1, "bwd": P}
    phases = {
        ph: {
            "samples": record.stack_passes(_passes(rng, R, steps[ph]), ""),
            "warmup": record.stack_passes(_passes(rng, W, steps[ph]), "warmup_"),
            "comm_only": rng.uniform(1e-4, 2e-4, (R, only[ph])),
            "check": None,
        }
        for ph in cfg.phases
    }
    return {
        "phases": phases,
        "host": f"node{rank}",
        "device": "cpu",
        "peak_rss": 200 << 20,
        "baseline_rss": 100 << 20,
        "pool": 0,
        "tensors": None,
        "score_tile": 4096,
        "score_tile_bwd": 8192,
        "threads": [],
    }


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_assemble_builds_the_run_record(pass_):
    rng = np.random.default_rng(0)
    cfg = RunConfig(seq_len=64, heads=4, kv_heads=2, head_dim=8, pass_=pass_)
    parts = [_part(cfg, r, rng) for r in range(P)]
    prov = {"utc": "2026-01-01T00:00:00Z", "hosts": ["node0", "node1"]}
    traffic = {"fwd": 1000, "bwd": 3000}
    rec = record.assemble(cfg, parts, P, prov, traffic=traffic, itemsize=4, compute_itemsize=4)

    assert rec.point_id == point_id(cfg, P)
    assert rec.nranks == P and rec.config == cfg.to_dict()
    assert rec.provenance is prov and rec.created_utc == prov["utc"]
    assert rec.phases() == list(cfg.phases)
    for ph in cfg.phases:
        got = rec.phase(ph)
        assert got.samples["total_s"].shape == (R, P)
        assert got.samples["compute_s"].shape == (R, P, P if ph == "fwd" else P + 1)
        assert got.samples["warmup_total_s"].shape == (W, P)
        assert got.samples["comm_only_s"].shape == (R, P, P - 1 if ph == "fwd" else P)
        assert tuple(got.summary) == measure.SUMMARY_KEYS
        assert got.summary["bytes_per_rank"] == traffic[ph]
        assert got.summary["bytes_total"] == traffic[ph] * P
        expect = np.median(np.max([[p["phases"][ph]["samples"]["total_s"][i] for p in parts] for i in range(R)], axis=1))
        assert got.summary["time_s"] == pytest.approx(expect)
        assert got.check == {}
    if pass_ == "fwd":
        assert rec.bwd is None
    mem = rec.memory
    assert list(mem["peak_rss_bytes"]) == [200 << 20] * P
    assert list(mem["baseline_rss_bytes"]) == [100 << 20] * P
    assert list(mem["device_pool_bytes"]) == [0] * P
    shape = dict(batch=1, local_q=32, heads=4, kv_heads=2, head_dim=8, itemsize=4, compute_itemsize=4)
    assert mem["theoretical_bytes"] == measure.theoretical_bytes(**shape, score_tile_elems=4096)
    if "bwd" in cfg.phases:
        assert mem["theoretical_bwd_bytes"] == measure.theoretical_bwd_bytes(**shape, score_tile_elems=8192)
    else:
        assert "theoretical_bwd_bytes" not in mem
    assert rec.tensors == {}
    assert rec.chunks_per_rank == 0  # not a balanced run


def test_a_balanced_run_records_its_chunks_per_rank():
    """Schema 5: the record of a balanced training run carries the k its deal chose for the run's mask (one causal
    document: 2, zigzag's pairing; a spec contiguous already balances: 1); the summary line says it."""
    rng = np.random.default_rng(1)
    for docs, want in (("", 2), ("2048,2048", 1)):
        cfg = RunConfig(seq_len=4096, heads=4, kv_heads=2, head_dim=8, causal=True, layout="balanced", docs=docs)
        parts = [_part(cfg, r, rng) for r in range(P)]
        prov = {"utc": "2026-01-01T00:00:00Z", "hosts": ["node0", "node1"], "mpi_library": "mpich"}
        rec = record.assemble(cfg, parts, P, prov, traffic={"fwd": 1000}, itemsize=4, compute_itemsize=4)
        assert rec.chunks_per_rank == want, docs
        text = record.format_summary(cfg, P, {"fwd": rec.phase("fwd")}, rec.memory, prov, "")
        assert f"balanced: {want} chunk" in text


def test_auto_memory_refusal_names_the_cgroup_that_binds(monkeypatch):
    """--memory-limit auto refuses what the job's cgroup would OOM-kill, and says the cgroup is the bound."""
    from ringbench.config import RunConfig
    from ringbench.engine.backend import get_backend

    cfg = RunConfig(seq_len=4096, heads=2, head_dim=16)
    backend = get_backend("numpy")
    monkeypatch.setattr(memory, "host_memory", lambda: (2**20, "its memory cgroup leaves (/sys/fs/cgroup/slurm/job_7)"))
    msg = memory.memory_problem(cfg, 1, 0, backend)
    assert (
        msg.startswith("this problem needs about ")
        and "more than the 1.0 MiB its memory cgroup leaves (/sys/fs/cgroup/slurm/job_7);" in msg
    )
    monkeypatch.setattr(memory, "host_memory", lambda: (2**50, "available there"))
    assert memory.memory_problem(cfg, 1, 0, backend) is None


def test_reset_peak_rss_forgets_a_transient_before_the_baseline(tmp_path):
    """After the reset the peak is this process's RSS from then on: a freed 256 MiB array before it is not counted
    (the run's baseline would otherwise be compared with a peak of importing or compiling)."""
    import sys

    from ringbench.engine.backend import current_rss_bytes, peak_rss_bytes
    from ringbench.harness.runner import reset_peak_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("the peak RSS is reset through Linux's /proc/self/clear_refs")
    big = np.ones(32 * 2**20)  # 256 MiB, touched
    del big
    assert peak_rss_bytes() >= current_rss_bytes() + 200 * 2**20
    assert reset_peak_rss()
    assert peak_rss_bytes() < current_rss_bytes() + 64 * 2**20
    assert not reset_peak_rss(str(tmp_path / "missing" / "clear_refs"))  # no reset offered: False, nothing raised
