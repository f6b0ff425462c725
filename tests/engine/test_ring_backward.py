"""The ring backward pass (`ringbench run --pass bwd|fwd+bwd`) under a real mpiexec: gradients against float64,
the three modes bit for bit, the stored phases, and the `pass` key."""

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import results
from ringbench.config import ConfigError, RunConfig, option_name, point_id
from ringbench.harness import inputs
from ringbench.kernels.reference import TOLERANCE_BWD, reference_attention_grad
from ringbench.layout import LAYOUTS

from conftest import mpi_worker, mpiexec, ringbench

WORKER = Path(__file__).with_name("ring_backward_worker.py")
SMALL = ["--heads", 4, "--head-dim", 16, "--repeat", 2, "--warmup", 1, "--quiet"]


def launch_cases(nranks, **spec):
    """Run tests/engine/ring_backward_worker.py at ``nranks`` ranks; its cases (layouts x modes x causal) as dicts."""
    return mpi_worker(WORKER, nranks, spec)


def assert_cases(cases):
    for c in cases:
        rel = [e / r for e, r in zip(c["errs"], c["refs"])]
        assert c["finite"], c
        assert max(rel) < c["tol"], f"dq, dk, dv relative errors {rel} >= {c['tol']:.0e} in {c}"
        assert c["identical"], f"{c['mode']} differs from overlap: {c}"


@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_every_layout_mode_and_causal_flag_matches_float64_and_modes_agree_bitwise(nranks):
    """every layout x 2 causal flags x 3 modes per rank count, dtypes (float64, float32, bfloat16, float16) and kv heads
    (GQA 2, MQA 1, MHA 4) rotating over the cases; every mode's dq, dk, dv equal overlap's bit for bit."""
    cases = launch_cases(
        nranks, dtypes=["float64", "float32", "bfloat16", "float16"], kv_heads=[2, 1, 4], tokens_per_rank=12, head_dim=8, scale_q=1.0
    )
    assert len(cases) == 6 * len(LAYOUTS)
    assert {c["dtype"] for c in cases} == {"float64", "float32", "bfloat16", "float16"}
    assert {c["kv_heads"] for c in cases} == {1, 2, 4}
    assert_cases(cases)
    tight = [e / r for c in cases if c["dtype"] == "float64" for e, r in zip(c["errs"], c["refs"])]
    assert max(tight) < 1e-12  # float64 is tight, well inside its tolerance


@pytest.mark.mpi
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install -e '.[torch]')")
@pytest.mark.parametrize("nranks", [2, 3])
def test_the_torch_backward_in_row_and_head_chunks_matches_float64_and_modes_agree_bitwise(nranks):
    """--kernel torch: FusedBackward's calls split by heads and (bwd_rows: 5 rows and up) by query rows, the overlap
    backward's last step in 1, 2 or 4 head groups (MQA, GQA 2, MHA) with its dK/dV slices home on up to HOME_LAG
    exchanges; against float64, and every mode's gradients equal overlap's bit for bit."""
    cases = launch_cases(
        nranks, dtypes=["float32", "float64", "bfloat16"], kv_heads=[4, 2, 1], tokens_per_rank=22, head_dim=7, scale_q=1.0,
        kernel="torch", bwd_rows=5,
    )  # fmt: skip
    assert len(cases) == 6 * len(LAYOUTS) and {c["kv_heads"] for c in cases} == {1, 2, 4}
    assert_cases(cases)


@pytest.mark.mpi
def test_large_logits_give_finite_gradients():
    """Scores of size ~100 (q scaled by 40): the saved LSE keeps every exp in range; half-masked diagonal blocks
    and striped steps whose first row sees no key (a fully masked row within the block) included."""
    cases = launch_cases(3, dtypes=["float32", "float64"], kv_heads=[2, 1], tokens_per_rank=8, head_dim=8, scale_q=40.0)
    assert_cases(cases)


def run_file(nranks, tmp_path, *args, name="r.h5", env=None):
    out = tmp_path / name
    res = mpiexec(nranks, "run", *SMALL, "--out", out, *args, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.mark.mpi
def test_done_when_command_measures_and_checks_both_phases(tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(
        3, "run", "--pass", "fwd+bwd", "--causal", "--layout", "zigzag", "--kv-heads", 2, "--check",
        "--seq-len", 192, "--heads", 4, "--head-dim", 16, "--repeat", 3, "--out", out,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    assert "pass fwd+bwd" in text and "  forward:" in text and "  backward:" in text
    assert text.count("TFLOP/s") == 2 and "check vs float64: " in text and "check vs float64 gradients:" in text
    assert "FAILED" not in text
    (run,) = store.read(out)
    assert run.config["pass"] == "fwd+bwd" and run.phases() == ["fwd", "bwd"]
    assert run.point_id == point_id(RunConfig.from_dict(run.config), 3) and "-fwdbwd-" in run.point_id
    p, n = 3, 64
    for ph in (run.phase("fwd"), run.bwd):
        for key in ("compute_s", "comm_s", "step_s"):
            assert ph.samples[key].shape == (3, p, p) and ph.samples["warmup_" + key].shape == (1, p, p)
        assert ph.samples["total_s"].shape == (3, p)
        assert ph.check["passed"] and ph.summary["time_s"] > 0 and ph.summary["tflops"] > 0
    assert run.samples["comm_only_s"].shape == (3, p, p - 1)
    assert run.bwd.samples["comm_only_s"].shape == (3, p, p)  # the last step carries the dK/dV hop home
    kv_block = 2 * n * 2 * 16 * 4  # K and V, n tokens, 2 kv heads, D = 16, float32
    assert run.summary["bytes_per_rank"] == (p - 1) * kv_block
    assert run.bwd.summary["bytes_per_rank"] == (p - 1) * kv_block + p * kv_block  # P dK/dV hops, float32
    assert run.bwd.summary["flops"] == pytest.approx(2.5 * run.summary["flops"])
    for name in ("dq", "dk", "dv"):
        assert run.bwd.check[f"{name}_rel_err"] < TOLERANCE_BWD["float32"]
    assert run.memory["theoretical_bwd_bytes"] > run.memory["theoretical_bytes"] > 0
    with h5py.File(out) as f:  # the documented layout: the forward where version 1 has it, the backward in bwd/
        g = f["runs"][run.name]
        assert {"samples", "summary", "check", "bwd", "memory", "config"} <= set(g)
        assert {"samples", "summary", "check"} == set(g["bwd"])
        assert set(g["bwd/samples"]) == set(g["samples"])
        assert g["bwd/check"].attrs["passed"] and "dk_rel_err" in g["bwd/check"].attrs
        assert json.loads(g.attrs["config"])["pass"] == "fwd+bwd" and g["config"].attrs["pass"] == "fwd+bwd"
    table = results.rows(store.read(out))
    assert [r["phase"] for r in table] == ["fwd", "bwd"] and {r["pass"] for r in table} == {"fwd+bwd"}
    assert table[1]["time_s"] == run.bwd.summary["time_s"] and table[1]["check_passed"] is True
    assert len(table[1]["time_repeats_s"]) == 3


@pytest.mark.mpi
def test_modes_give_identical_saved_gradients_that_reverify(tmp_path):
    grads = {}
    # one exponential for the three runs: each run picks its own by measuring (runner: RINGBENCH_EXP auto), and on a
    # loaded machine two runs can pick differently; the modes are bitwise identical for one exponential
    one_exp = {"RINGBENCH_EXP": "2"}
    for mode in ("overlap", "blocking", "allgather"):
        out = run_file(3, tmp_path, "--pass", "bwd", "--seq-len", 96, "--causal", "--layout", "striped", "--kv-heads", 1,
                       "--mode", mode, "--save-tensors", "--check", name=f"{mode}.h5", env=one_exp)  # fmt: skip
        (run,) = store.read(out, tensors=True)
        assert run.phases() == ["bwd"] and not run.samples and not run.summary and run.bwd.check["passed"]
        grads[mode] = run.tensors
    t = grads["overlap"]
    assert {"q", "k", "v", "out", "do", "dq", "dk", "dv"} == set(t)
    for mode, other in grads.items():
        for name in ("out", "dq", "dk", "dv"):
            np.testing.assert_array_equal(other[name], t[name], err_msg=f"{mode} {name}")  # bitwise identical
    # anyone can re-verify from the stored global tensors (global token order)
    do = inputs.tokens("do", 0, np.arange(96), batch=1, seq_len=96, heads=4, head_dim=16).astype(np.float32)
    np.testing.assert_array_equal(t["do"], do)
    ref = reference_attention_grad(t["q"], t["k"], t["v"], t["do"], causal=True)
    for name, r in zip(("dq", "dk", "dv"), ref):
        assert np.abs(t[name] - r).max() / np.abs(r).max() < TOLERANCE_BWD["float32"], name
    assert t["dq"].shape == (1, 96, 4, 16) and t["dk"].shape == (1, 96, 1, 16)


@pytest.mark.mpi
def test_report_and_plot_read_a_file_with_every_pass(tmp_path):
    out = tmp_path / "r.h5"
    for p, extra in [
        (2, ["--pass", "fwd"]),
        (2, ["--pass", "bwd"]),
        (2, ["--pass", "fwd+bwd"]),
        (1, ["--pass", "fwd+bwd", "--mode", "blocking"]),
    ]:
        run_file(p, tmp_path, "--seq-len", 64, "--repeat", 3, "--check", *extra)
    runs = store.read(out)
    table = results.rows(runs)
    assert [(r["pass"], r["phase"]) for r in table] == [("fwd", "fwd"), ("bwd", "bwd"), ("fwd+bwd", "fwd"), ("fwd+bwd", "bwd")] * 1 + [
        ("fwd+bwd", "fwd"),
        ("fwd+bwd", "bwd"),
    ]
    res = ringbench("report", out, "--csv", tmp_path / "r.csv")
    assert res.returncode == 0, res.stderr
    assert "overlap (bwd)" in res.stdout
    assert (tmp_path / "r.csv").read_text().splitlines()[0].split(",")[5] == "phase"
    pytest.importorskip("matplotlib")
    res = ringbench("plot", out, "-o", tmp_path / "fig")
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# The `pass` key, without MPI
# ---------------------------------------------------------------------------------------------
def test_pass_is_a_config_key_everywhere():
    cfg = RunConfig.from_dict({"pass": "fwd+bwd", "seq_len": 64})
    assert cfg.pass_ == "fwd+bwd" and cfg.phases == ("fwd", "bwd")
    assert cfg.to_dict()["pass"] == "fwd+bwd" and "pass_" not in cfg.to_dict()
    assert "pass" in RunConfig.field_names() and option_name("pass_") == "--pass" and option_name("pass") == "--pass"
    with pytest.raises(ConfigError, match=r"pass: expected one of fwd, bwd, fwd\+bwd, prefill, decode; got 'bw' \(did you mean 'bwd'\?\)"):
        RunConfig.from_dict({"pass": "bw"})


def test_forward_point_ids_are_what_they_were_before_pass():
    """The id of a forward-only point is the hash of its configuration without `pass` (what main computed): fields
    added after ids were first stored (pass, kernel, ulysses_degree) enter the hash only away from their default."""
    import hashlib

    cfg = RunConfig(seq_len=256, causal=True, layout="zigzag", kv_heads=2)
    ident = {k: v for k, v in cfg.to_dict().items() if k not in RunConfig.NON_IDENTITY and k not in RunConfig.ADDED_IDENTITY}
    ident["nranks"] = 4
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    assert point_id(cfg, 4) == f"overlap-zigzag-causal-float32-N256-P4-{digest}"
    ids = {point_id(RunConfig(seq_len=256, pass_=p), 4) for p in ("fwd", "bwd", "fwd+bwd")}
    assert len(ids) == 3 and any("-bwd-" in i for i in ids)


def test_cli_rejects_a_bad_pass_with_one_line():
    res = ringbench("run", "--pass", "backward")
    assert res.returncode == 2 and "--pass" in res.stderr and "fwd+bwd" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_save_tensors_limit_counts_the_gradients():
    from ringbench.config import validate

    big = dict(seq_len=2**13, heads=16, head_dim=64, save_tensors=True)
    assert not validate(RunConfig(**big, kv_heads=2), 1)  # 8 B x 2^13 x (2*16 + 2*2) x 64 = 144 MiB: allowed
    ((key, msg),) = validate(RunConfig(**big, kv_heads=2, pass_="bwd"), 1)  # twice that with do, dq, dk, dv
    assert key == "save_tensors" and "do, dq, dk and dv" in msg


def test_version_1_runs_read_as_forward_only(tmp_path):
    from conftest import write_v1

    runs = store.read(write_v1(tmp_path / "v1.h5"))
    assert all(r.bwd is None and r.phases() == ["fwd"] for r in runs)
    assert [r["phase"] for r in results.rows(runs)] == ["fwd", "fwd"] and {r["pass"] for r in results.rows(runs)} == {"fwd"}


def test_a_run_with_both_phases_round_trips(tmp_path):
    fwd = dict(samples={"total_s": np.ones((3, 2))}, summary={"time_s": 1.0}, check={"passed": True})
    bwd = store.Phase(samples={"total_s": np.full((3, 2), 2.0)}, summary={"time_s": 2.0}, check={"passed": False, "dq_rel_err": 0.5})
    run = store.Run(point_id="p", nranks=2, config={"pass": "fwd+bwd"}, provenance={}, bwd=bwd, **fwd)
    store.append(tmp_path / "r.h5", run)
    (got,) = store.read(tmp_path / "r.h5")
    assert got.summary == {"time_s": 1.0} and got.check == {"passed": True}
    assert got.bwd.summary == {"time_s": 2.0} and got.bwd.check == {"passed": False, "dq_rel_err": 0.5}
    np.testing.assert_array_equal(got.bwd.samples["total_s"], np.full((3, 2), 2.0))
    latest = store.latest(tmp_path / "r.h5")["p"]
    assert latest.bwd.summary == {"time_s": 2.0}


def test_do_is_its_own_tensor_and_leaves_q_k_v_unchanged():
    dims = dict(batch=2, seq_len=24, heads=3, head_dim=4)
    do = inputs.tokens("do", 3, np.arange(24), **dims)
    np.testing.assert_array_equal(inputs.tokens("do", 3, [5, 23, 0], chunk=2, **dims), do[:, [5, 23, 0]])
    assert abs(do.std() - 1.0) < 0.2
    for seed in range(5):
        for name in ("q", "k", "v"):
            assert not np.array_equal(do, inputs.tokens(name, seed, np.arange(24), **dims))
    # q, k, v are what they were before `do` existed (pinned values of seed 0)
    q = inputs.tokens("q", 0, np.arange(2), batch=1, seq_len=2, heads=1, head_dim=2)
    np.testing.assert_allclose(q.ravel(), PINNED_Q, rtol=0, atol=1e-15)


PINNED_Q = [1.3278275898326373, 0.23057606006041131, 0.3158905055195494, -1.3390472944107574]


@pytest.mark.mpi
def test_the_exposed_time_split_is_stored_and_the_grouped_last_step_keeps_the_bits(tmp_path):
    """768 tokens per rank: one head per chunk, so the overlap backward's last step runs in 4 head groups (its dK/dV
    go home slice by slice); its gradients equal blocking's bit for bit. Both phases store the split of comm_s
    (schema 3): partner wait + not hidden = comm_s, both >= 0, and the summary carries both."""
    runs = {}
    for mode in ("overlap", "blocking"):
        out = run_file(2, tmp_path, "--pass", "fwd+bwd", "--seq-len", 1536, "--head-dim", 8, "--mode", mode, "--save-tensors",
                       name=f"{mode}.h5", env={"RINGBENCH_EXP": "2"})  # fmt: skip
        (runs[mode],) = store.read(out, tensors=True)
    for mode, run in runs.items():
        for phase in ("fwd", "bwd"):
            ph = run.phase(phase)
            comm, partner, unhidden = (np.asarray(ph.samples[k]) for k in ("comm_s", "partner_wait_s", "unhidden_s"))
            assert partner.shape == unhidden.shape == comm.shape == (2, 2, 2)
            assert np.all(partner >= 0) and np.all(unhidden >= 0)
            np.testing.assert_allclose(partner + unhidden, comm, rtol=0, atol=1e-12)
            assert np.isfinite(ph.summary["unhidden_comm_s"]) and np.isfinite(ph.summary["partner_wait_s"]), (mode, phase)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(runs["overlap"].tensors[name], runs["blocking"].tensors[name], err_msg=name)
