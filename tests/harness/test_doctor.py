"""``ringbench doctor``: a healthy CPU setup here, missing GPU items named, problems decided from the gathered records."""

import importlib.util

import pytest

from ringbench.harness.doctor import Combo, report

from conftest import ROOT, mpiexec

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _gpu_present() -> bool:
    from ringbench.engine.backend import BackendError, get_backend

    try:
        get_backend("cupy")
        return True
    except BackendError:
        return False


@pytest.mark.mpi
def test_doctor_reports_a_healthy_cpu_setup():
    res = mpiexec(2, "doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.count("ringbench doctor: 2 rank(s)") == 1  # rank 0 prints, once
    assert "MPICH" in out and "no problems found" in out
    rows = [ln.split() for ln in out.splitlines()]
    assert any(r[:4] == ["numpy", "native", "float32", "ok"] for r in rows)
    if HAVE_TORCH:
        assert any(r[:4] == ["numpy", "torch", "float32", "ok"] for r in rows)
    assert any(r[:2] == ["numpy", "flash-attn"] and "not available" in " ".join(r) for r in rows)
    if not _gpu_present():
        assert any(r[:2] == ["cupy", "native"] and "not available" in " ".join(r) for r in rows)


@pytest.mark.mpi
@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: --backend cupy is available here")
def test_doctor_asked_for_cupy_without_a_gpu_fails_naming_it():
    res = mpiexec(2, "doctor", "--backend", "cupy")
    assert res.returncode != 0
    problems = [ln for ln in res.stdout.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 1 and problems[0].startswith("problem: --backend cupy: not available on every rank")
    assert "CuPy" in problems[0] or "GPU" in problems[0]


@pytest.mark.mpi
def test_doctor_asked_for_torch_without_torch_fails_naming_it(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('hidden by the test')\n")
    res = mpiexec(1, "doctor", "--backend", "numpy", "--kernel", "torch", env={"PYTHONPATH": f"{fake}:{ROOT}"})
    assert res.returncode == 1, res.stdout + res.stderr
    problems = [ln for ln in res.stdout.splitlines() if ln.startswith("problem:")]
    assert problems == ["problem: --kernel torch on --backend numpy: not available on every rank: --kernel torch needs PyTorch: "
                        "pip install 'ringbench[torch]' (hidden by the test)"]  # fmt: skip


def test_doctor_usage_error_is_one_line():
    from conftest import ringbench

    res = ringbench("doctor", "--backend", "jax")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--backend" in res.stderr


RANK = {
    "host": "h",
    "local_rank": 0,
    "device": "cpu",
    "cuda_aware": False,
    "libs": dict.fromkeys(("numpy", "mkl", "torch", "flash_attn", "cupy"), "-"),
}


def test_problems_partial_availability_and_failed_checks():
    combos = [Combo("numpy", "native", "float32"), Combo("numpy", "torch", "float32"), Combo("cupy", "native", "float32")]
    results = [
        ("FAILED", 3e-3),
        ("n/a", [(1, ("kernel", "--kernel torch needs PyTorch"))]),  # rank 1 lacks torch, rank 0 has it
        ("n/a", [(0, ("backend", "no GPU")), (1, ("backend", "no GPU"))]),  # nowhere, not asked: fine
    ]
    lines, problems = report([RANK, RANK], combos, results, None, None, "MPICH")
    assert problems[0].startswith("--backend numpy --kernel native: checked ring pass FAILED: rel err 3.0e-03")
    assert problems[1] == "--kernel torch on --backend numpy: not available on rank(s) 1: --kernel torch needs PyTorch"
    assert len(problems) == 2 and lines[-2:] == [f"problem: {p}" for p in problems]
    _, asked = report([RANK, RANK], combos[2:], results[2:], ["cupy"], None, "MPICH")
    assert asked == ["--backend cupy: not available on every rank: no GPU"]


def test_node_report_flags_a_slow_node():
    from ringbench.harness.doctor import node_report

    # three nodes of two ranks, the ring node-major; node 2's link to the others is 10x slower
    node_of = [0, 0, 1, 1, 2, 2]
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0)]
    bw = [10e9, 1e9, 10e9, 0.1e9, 10e9, 0.1e9]  # both pairs through node c are slow
    nodes = {"node_of": node_of, "hosts": ["a", "b", "c"], "pairs": pairs, "bandwidth": bw}
    lines, problems = node_report(nodes)
    text = "\n".join(lines)
    assert "nodes: 3" in text and "3->4  inter-node" in text and "0->1  intra-node" in text
    assert len(problems) == 1 and problems[0].startswith("node c: its inter-node link delivers 0.100 GB/s")
    bw[3] = bw[5] = 1e9  # every node's link alike: nothing flagged
    assert node_report(nodes)[1] == []


def test_the_packed_pass_is_valid_and_banded_at_every_rank_count():
    """doctor's second tiny pass (packed documents and a window, balanced) is a valid run at P = 1..4 whose plans
    hold windowed bands and cut at documents (fewer pairs than the causal triangle); its check runs in the healthy
    test above."""
    from ringbench.config import RunConfig, validate
    from ringbench.harness.doctor import CHECK, TOKENS_PER_RANK, packed_changes
    from ringbench.layout import BAND, step_plan, unmasked_pairs

    for p in (1, 2, 3, 4):
        cfg = RunConfig(seq_len=TOKENS_PER_RANK * p, **dict(CHECK, **packed_changes(p)))
        assert not validate(cfg, p) and len(cfg.doc_lengths) == 3 and cfg.window
        pieces = [
            x
            for r in range(p)
            for s in range(p)
            for x in step_plan(cfg.layout, r, s, p, TOKENS_PER_RANK, True, cfg.doc_lengths, cfg.window)
        ]
        assert any(x.mask == BAND and x.window for x in pieces)
        n = cfg.seq_len
        assert unmasked_pairs(cfg.layout, p, n, True, cfg.doc_lengths, cfg.window) < n * (n + 1) // 2
    assert packed_changes(2, gpu_fused=True)["window"] == 0
