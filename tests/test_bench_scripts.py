"""The benchmark scripts run end to end on tiny shapes and print what they promise. No timing is asserted:
speed targets are checked by running the scripts themselves (benchmarks/README.md)."""

import importlib.util
import json
import subprocess
import sys

import pytest  # noqa: E402

from ringbench import layout

from conftest import MPIEXEC, ROOT, child_env

pytestmark = pytest.mark.slow  # the full set (pytest --all, CI): docs/testing.md

BENCH = ROOT / "benchmarks"


def script(name: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *map(str, args)], capture_output=True, text=True, env=child_env(env), timeout=timeout, cwd=ROOT
    )


KERNEL_TINY = ("--head-dim", 16, "--block", 64, 96, "--heads", 4, "--kv-heads", 2, "--repeat", 1, "--warmup", 0)


def test_kernel_bench_prints_the_table_and_saves_every_sample(tmp_path):
    out = tmp_path / "k.json"
    res = script("kernel_bench.py", *KERNEL_TINY, "--out", out)
    assert res.returncode == 0, res.stderr
    for col in ("kernel", "matmul", "tiles", "torch", "k/torch", "k/matmul", "k/tiles", "err", "target"):
        assert col in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("16 ")]
    assert len(lines) == 4  # 2 blocks x (full, causal)
    assert all(ln.split()[-1] == "-" for ln in lines)  # tiny shapes are outside the target
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["provenance"]["blas_threads"] == 1
    assert all(p["num_threads"] == 1 for p in data["provenance"]["blas_runtime"])
    row = data["rows"][0]
    has_torch = importlib.util.find_spec("torch") is not None  # torch is the optional [bench] extra
    assert set(row["samples_s"]) == {"cpu", "wall"}
    assert set(row["samples_s"]["cpu"]) == {"kernel", "matmul", "tiles"} | ({"torch"} if has_torch else set())
    assert all(len(v) == 1 for v in row["samples_s"]["wall"].values())
    assert row["max_rel_err"] < 1e-4
    assert row["err_against"] == ("torch" if has_torch else "float64 reference")
    assert row["target"] == "-"


def test_kernel_bench_without_torch(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('hidden by the test')\n")
    res = script("kernel_bench.py", *KERNEL_TINY, "--causal", "no", env={"PYTHONPATH": f"{fake}:{ROOT}"})
    assert res.returncode == 0, res.stderr
    assert "torch not importable" in res.stdout and "n/a" in res.stdout
    assert "float64 reference" in res.stdout


def test_kernel_bench_user_error_is_one_line():
    res = script("kernel_bench.py", "--heads", 3, "--kv-heads", 2)
    assert res.returncode == 2
    assert "--kv-heads" in res.stderr.strip().splitlines()[-1]


@pytest.mark.mpi
def test_memory_bench_reports_peak_against_theory(tmp_path):
    assert MPIEXEC.exists()
    out = tmp_path / "m.json"
    res = script("memory_bench.py", "--ranks", 2, "--seq-len", 512, "--heads", 2, "--head-dim", 16, "--passes", 1, "--out", out)
    assert res.returncode == 0, res.stderr
    for col in ("peak MiB", "theory MiB", "peak/theory", "largest MiB", "allowed", "NxN MiB", "P blocks MiB", "RSS MiB"):
        assert col in res.stdout
    summary = {s["mode"]: s for s in json.loads(out.read_text())["summary"]}
    assert set(summary) == {"overlap", "blocking", "allgather"}
    assert summary["allgather"]["verdict"] == "by design"
    for mode in ("overlap", "blocking"):
        s = summary[mode]
        assert s["peak_bytes"] > 0 and s["theoretical_bytes"] > 0
        assert s["largest_bytes"] <= s["allowed_largest_bytes"]  # nothing that grows with P or N^2
        assert s["verdict"] == "PASS" and s["ratio"] < 1.5  # memory is deterministic: safe to assert
    assert summary["allgather"]["largest_bytes"] >= summary["allgather"]["p_blocks_bytes"]


def test_memory_bench_measures_the_backward(tmp_path):
    out = tmp_path / "m.json"
    res = script(
        "memory_bench.py", "--pass", "bwd", "--ranks", 2, "--seq-len", 512, "--heads", 2, "--head-dim", 16, "--passes", 1,
        "--modes", "overlap", "allgather", "--out", out,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "bwd passes" in res.stdout
    summary = {s["mode"]: s for s in json.loads(out.read_text())["summary"]}
    s = summary["overlap"]
    assert s["largest_bytes"] <= s["allowed_largest_bytes"] and s["verdict"] in ("PASS", "FAIL")  # tiny: fixed costs dominate
    assert summary["allgather"]["verdict"] == "by design"


def test_memory_bench_user_error_is_one_line():
    res = script("memory_bench.py", "--ranks", 3, "--seq-len", 100)
    assert res.returncode == 2
    assert "--seq-len" in res.stderr.strip().splitlines()[-1]


def test_append_bench_reports_ratios_and_cleans_up(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "a.json"
    res = script("append_bench.py", "--sizes", 0.05, 0.2, "--repeat", 1, "--dir", work, "--out", out)
    assert res.returncode == 0, res.stderr
    for col in ("file MB", "new ms", "old ms", "new/tiny", "old/tiny", "old/new"):
        assert col in res.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["provenance"]["simd"]["baseline"]
    rows = data["rows"]
    assert len(rows) == 3 and rows[0]["new_over_tiny"] == rows[0]["old_over_tiny"] == 1.0
    assert rows[0]["size_bytes"] < 50_000 <= rows[1]["size_bytes"] < 200_000 <= rows[2]["size_bytes"]
    assert all(len(r["samples_s"]["new"]) == len(r["samples_s"]["old"]) == 1 for r in rows)
    assert "results.h5" in data["left"] and not any(n.endswith((".tmp", ".journal")) for n in data["left"])
    assert list(work.iterdir()) == []  # every file removed


def test_append_bench_user_error_is_one_line():
    res = script("append_bench.py", "--sizes", 100, 1)
    assert res.returncode == 2
    assert "--sizes" in res.stderr.strip().splitlines()[-1]


def test_plan_bench_prints_every_case():
    res = script("plan_bench.py", "--ranks", 4, 64, "--points", 14, "--max-ranks", 64, "--reject-points", 250000, "--loop-ranks", 8)
    assert res.returncode == 0, res.stderr
    assert "SIMD" in res.stdout.splitlines()[0]
    rows = {ln.split("  ")[0]: ln for ln in res.stdout.splitlines()[2:]}
    assert set(rows) == {"one point", "matrix", "reject", "baseline loop"}
    assert " 14 " in rows["matrix"] and "target cpu < 1 s:" in rows["matrix"]
    assert "expands to 250000 points" in rows["reject"]
    assert "loop/point" in rows["baseline loop"]


def test_plan_bench_user_error_is_one_line():
    res = script("plan_bench.py", "--points", 13, "--max-ranks", 64)
    assert res.returncode == 2
    assert "--points" in res.stderr.strip().splitlines()[-1]


def test_bwd_kernel_bench_prints_the_table_and_saves_every_sample(tmp_path):
    out = tmp_path / "b.json"
    res = script("bwd_kernel_bench.py", *KERNEL_TINY, "--breakdown", "--out", out)
    assert res.returncode == 0, res.stderr
    for col in ("kernel", "tiles", "torch", "k/torch", "k/tiles", "err", "target", "dK gemm", "exp"):
        assert col in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("16 ")]
    assert len(lines) == 4  # 2 blocks x (full, causal)
    assert all(ln.split()[-1] == "-" for ln in lines)  # tiny shapes are outside the target
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["provenance"]["simd"] and data["provenance"]["blas_threads"] == 1
    has_torch = importlib.util.find_spec("torch") is not None  # torch is the optional [bench] extra
    row = data["rows"][0]
    assert set(row["samples_s"]["cpu"]) == {"kernel", "tiles"} | ({"torch"} if has_torch else set())
    assert all(len(v) == 1 for v in row["samples_s"]["wall"].values())
    assert row["max_rel_err"] < 1e-4  # dq, dk and dv of the timed kernel against torch's (or float64) gradients
    assert row["err_against"] == ("torch" if has_torch else "float64 reference")
    assert row["flops"] == 2.5 * 4 * 1 * 4 * 16 * 64 * 64  # backward = 2.5 x forward FLOPs
    assert set(data["tile_breakdown_s"]["16"]) >= {"S gemm", "dV gemm", "dP gemm", "dQ gemm", "dK gemm"}
    assert row["exp_base"] == data["provenance"]["exp_base"] in ("2", "e")


def test_bwd_kernel_bench_without_torch_and_user_error(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('hidden by the test')\n")
    res = script("bwd_kernel_bench.py", *KERNEL_TINY, "--causal", "no", "--exp", "e", env={"PYTHONPATH": f"{fake}:{ROOT}"})
    assert res.returncode == 0, res.stderr
    assert "torch not importable" in res.stdout and "n/a" in res.stdout and "float64 reference" in res.stdout
    res = script("bwd_kernel_bench.py", "--heads", 3, "--kv-heads", 2)


def test_torch_kernel_bench_prints_ratios_and_saves_every_sample(tmp_path):
    import pytest

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install -e '.[torch]')")
    out = tmp_path / "t.json"
    res = script("torch_kernel_bench.py", "--head-dim", 16, "--block", 64, "--heads", 4, "--kv-heads", 2, "--repeat", 2, "--warmup", 0,
                 "--causal", "both", "--out", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "ring/op" in res.stdout and "ring/sdpa" in res.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["provenance"]["simd"].startswith("torch ") and data["provenance"]["torch_threads"] == 1
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert set(row["samples_s"]["cpu"]) == {"ring", "op", "sdpa"} and all(len(v) == 2 for v in row["samples_s"]["cpu"].values())
        assert row["max_rel_err"] < 1e-5 and row["target"] == "-"  # tiny shapes are outside the target


def test_torch_kernel_bench_user_error_is_one_line():
    res = script("torch_kernel_bench.py", "--heads", 3, "--kv-heads", 2)
    assert res.returncode == 2
    assert "--kv-heads" in res.stderr.strip().splitlines()[-1]


@pytest.mark.mpi
def test_strategy_bench_probes_sweeps_and_compares(tmp_path):
    assert MPIEXEC.exists()
    out = tmp_path / "s.json"
    tiny = ("--seq-len", 128, 256, "--heads", 4, "--kv-heads", 2, "--head-dim", 16, "--repeat", 3, "--probe-blocks", 64, 128)
    tiny += ("--layout", "zigzag", "--rounds", 2)
    res = script("strategy_bench.py", *tiny, "--ranks", 2, "--work", tmp_path / "work", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "load average" in res.stdout and "calibration: probe" in res.stdout  # calibrated from the probe, not the runs
    assert "strategy winners: the predicted winner was the measured winner on" in res.stdout
    assert "target >= 90%" in res.stdout and "target <= 20%" in res.stdout and "local/time" in res.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["calibration"].startswith("probe")
    assert {(p["phase"], p["layout"], p["seq_len"], p["nranks"]) for p in data["points"]} == {
        ("fwd", "zigzag", 128, 2),
        ("fwd", "zigzag", 256, 2),
    }
    assert all(set(p["times_s"]) == {"overlap", "allgather", "ulysses", "pass-q"} for p in data["points"])
    lengths = [len(reps) for p in data["points"] for reps in p["repeats_s"].values()]
    assert lengths == [2 * 3] * len(lengths), lengths  # 2 rounds of 3 repeats, pooled
    assert sum(s["points"] for s in data["summary"].values()) == 2  # "within the cores" or "oversubscribed"
    assert {t["strategy"] for t in data["step_terms"]} == {"ulysses", "pass-q"}
    assert all(t["local_model_s"] > 0 for t in data["step_terms"])  # the probe's copy rate prices the local copies
    assert set(data["ablation"]) == {
        "full model",
        "without the copy term",
        "without per-piece rates",
        "without both (the 2026-11-25 model)",
    }
    assert "the model without each of its newer terms" in res.stdout
    assert (tmp_path / "work" / "probe.h5").exists() and (tmp_path / "work" / "results" / "strategy-bench.h5").exists()


def test_strategy_bench_user_error_is_one_line():
    res = script("strategy_bench.py", "--repeat", 1)
    assert res.returncode == 2
    assert "--repeat" in res.stderr.strip().splitlines()[-1]


def test_overlap_bench_prints_the_split_per_phase_and_saves_every_sample(tmp_path):
    out = tmp_path / "o.json"
    res = script("overlap_bench.py", "--ranks", 2, "--kernel", "native", "--causal", "no", "--seq-len", 64, "--heads", 2,
                 "--head-dim", 8, "--repeat", 1, "--warmup", 0, "--out", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "CPU: " in res.stdout and "SIMD" in res.stdout and "load average" in res.stdout
    for col in ("alone ms", "not hidden ms", "slower-rank ms", "overlap", "target"):
        assert col in res.stdout
    data = json.loads(out.read_text())
    assert [r["phase"] for r in data["rows"]] == ["fwd", "bwd"]
    for r in data["rows"]:
        assert "error" not in r, r
        assert set(r["samples"]) >= {"comm_s", "unhidden_s", "partner_wait_s", "comm_only_s"}
        assert len(r["step_hidden"]) == 2 and 0 <= r["overlap_eff"] <= 1


def test_overlap_bench_user_error_is_one_line():
    res = script("overlap_bench.py", "--seq-len", 7, "--ranks", 2)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) <= 2 and "--seq-len" in res.stderr


def test_published_prints_both_tables_against_their_sources(tmp_path):
    out = tmp_path / "p.json"
    res = script("published.py", "--json", out)
    assert res.returncode == 0, res.stderr
    assert "zhuzilin/ring-flash-attention" in res.stdout and "feifeibear/long-context-attention" in res.stdout
    assert (
        res.stdout.count("| fwd | ") == 2 and res.stdout.count("| fwd+bwd | ") == 2 and "target: every row within 10 points" in res.stdout
    )
    data = json.loads(out.read_text())
    assert [(r["pass_"], r["preset"]) for r in data["rows"]] == [
        ("fwd", "h800-8x"),
        ("fwd+bwd", "h800-8x"),
        ("fwd", "a100-sxm4-8x"),
        ("fwd+bwd", "a100-sxm4-8x"),
    ]
    for r in data["rows"]:  # the published figures are the README's, the predictions are percentages of ideal
        assert set(r["published"]) == set(r["predicted"]) == {"ring", "zigzag", "stripe"}
        assert all(0 < v < 110 for v in r["predicted"].values())
        assert all(abs(r["diff"][v] - (r["predicted"][v] - r["published"][v])) < 1e-9 for v in r["diff"])
    assert [r["ulysses_degree"] for r in data["yunchang"]] == [8, 4, 2, 1]


@pytest.mark.mpi
def test_probe_to_preset_on_the_cpu_with_the_native_kernel(tmp_path):
    """`ringbench probe` (2 ranks, the NumPy kernel) -> benchmarks/probe_preset.py -> a preset advise reads."""
    probe = tmp_path / "probe.h5"
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "ringbench", "probe", "--out", str(probe), "--heads", "4", "--head-dim", "16"]
    cmd += ["--block-sizes", "32,64,128", "--repeat", "2", "--max-bytes", "65536", "--iters", "3", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(None), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    preset = tmp_path / "probed.yaml"
    res = script("probe_preset.py", probe, "--base", "h100-sxm5-8x", "--out", preset)
    assert res.returncode == 0, res.stderr
    text = preset.read_text()
    assert "tokens: [32, 64, 128]" in text and "fwd_causal_tflops" in text and "bwd_tflops" in text
    res = subprocess.run(
        [sys.executable, "-m", "ringbench", "advise", "--machine", str(preset), "--ranks", "8", "--seq-len", "4096", "--heads", "4"],
        capture_output=True,
        text=True,
        env=child_env(None),
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert "machine preset probed" in res.stdout and "winner:" in res.stdout


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    env = child_env({"PATH": f"{tmp_path}:/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # a driver tool that finds no GPU
    (tmp_path / "nvidia-smi").chmod(0o755)
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.count("\n") == 1 and "no GPU" in res.stdout
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_gpu_check_runs_every_step_under_its_budget_with_stub_tools(tmp_path):
    """The flow on a 'GPU' machine, with nvidia-smi, python and mpiexec stubbed: every step logged under $OUT, a
    summary line each, and steps past the budget skipped, not run."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool, body in (("nvidia-smi", "echo 'GPU 0: stub'"), ("python3", f'echo "$@" >> {tmp_path}/calls'), ("mpiexec", 'shift 2; "$@"')):
        (bin_ / tool).write_text(f"#!/bin/sh\n{body}\nexit 0\n")
        (bin_ / tool).chmod(0o755)
    out = tmp_path / "out"
    env = child_env({"PATH": f"{bin_}:/usr/bin:/bin", "OUT": str(out), "RINGBENCH_GPU_CHECK_NO_INSTALL": "1"})
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    summary = (out / "summary.txt").read_text()
    for step in (
        "02 test_cupy rc=0",
        "03 doctor rc=0",
        "04 run-overlap-fwd rc=0",
        "04 run-pass-q-fwd rc=0",
        "04 run-kernel-flash-attn rc=0",
    ):
        assert step in summary, summary
    assert "05 gpu_kernels rc=0" in summary and "06 probe rc=0" in summary and "07 preset rc=0" in summary
    assert "run-pass-q-fwd_bwd" not in summary and "total" in summary  # pass-q runs its forward only
    calls = (tmp_path / "calls").read_text()
    assert "--backend cupy --mode hybrid --ulysses-degree 2" in calls and "--check" in calls and "probe --backend cupy" in calls
    env["RINGBENCH_GPU_CHECK_BUDGET_S"] = "0"
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "02 test_cupy skipped: the 8-minute budget is spent" in (out / "summary.txt").read_text()


def test_multinode_bench_needs_the_cluster(tmp_path):
    """Without the emulated cluster: one line naming it, exit 2 (the bench itself runs on slurm/multinode.sh's
    cluster: benchmarks/README.md; tests/harness/test_multinode.py runs every piece of it for real)."""
    res = script("multinode_bench.py", env={"RINGBENCH_MULTINODE_DIR": str(tmp_path)})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"multinode_bench: the emulated cluster is down ({tmp_path}/net.up missing): run slurm/multinode.sh up (as root)\n"


PEERS_TINY = ("--seq-len", 256, "--heads", 4, "--kv-heads", 2, "--head-dim", 16, "--rounds", 2, "--causal", "both", "--attn", "gqa")


@pytest.mark.slow
def test_peers_without_their_environments_still_reports_ringbench(tmp_path):
    """No peer environment (an empty --env-dir): one line per peer says it is missing and how to create it, and
    ringbench's rows are still measured and checked against float64 (no network install in CI)."""
    out = tmp_path / "p.json"
    res = script("peers.py", *PEERS_TINY, "--env-dir", tmp_path / "envs", "--out", out)
    assert res.returncode == 0, res.stderr
    missing = [ln for ln in res.stdout.splitlines() if ln.startswith("peers: ") and "missing" in ln]
    assert len(missing) == 2 and all("--setup --peers" in ln and "pip install" in ln for ln in missing)
    assert {ln.split()[1] for ln in missing} == {"torch", "jax"}
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["provenance"]["load_avg_end"]
    rows = data["rows"]
    assert len(rows) == 4  # full/causal x fwd/fwd+bwd
    for row in rows:
        rb = row["cands"]["ringbench"]
        assert set(row["cands"]) == {"ringbench"}
        assert len(rb["round_s"]) == 2 and all(t > 0 for t in rb["round_s"])
        assert len(rb["peak_rss"]) == 2 and all(p > b > 0 for p, b in zip(rb["peak_rss"], rb["base_rss"]))
        names = {"out", "dq", "dk", "dv"} if row["pass"] == "fwd+bwd" else {"out"}
        assert set(rb["check"]["rel_err"]) == names and rb["check"]["ok"]
        assert max(rb["check"]["rel_err"].values()) < 2e-5  # the float32 tolerance of ringbench.kernels.reference
    table = [ln.split() for ln in res.stdout.splitlines() if ln.startswith("N=256 ")]
    assert sum(cells[5] == "ringbench" for cells in table) == 4  # N=256 gqa 4/2 full fwd  ringbench ...


def test_peers_user_error_is_one_line():
    res = script("peers.py", "--heads", 3, "--kv-heads", 2)
    assert res.returncode == 2
    assert "--kv-heads" in res.stderr.strip().splitlines()[-1]


def test_serving_bench_compares_the_strategies_and_the_merges(tmp_path):
    out = tmp_path / "s.json"
    args = ["--seq-len", 64, "--cached", 0, 0.75, "--heads", 4, "--kv-heads", 1, "--head-dim", 8, "--batch", 1]
    args += ["--rounds", 1, "--probe-blocks", "32,64", "--probe-repeat", 3]
    res = script("serving_bench.py", *args, "--decode-ranks", 2, "--decode-seq-len", 64, "--repeat", 3, "--work", tmp_path, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "predicted = measured winner" in res.stdout and "tree/ring" in res.stdout
    data = json.loads(out.read_text())
    assert len(data["prefill"]) == 2 and {f["C"] for f in data["prefill"]} == {0, 48}
    assert set(data["decode"][0]["measured_s"]) == {"ring", "tree", "gather"}
    assert script("serving_bench.py", "--cached", 1.5).returncode == 2
    bad = script("serving_bench.py", "--nodes", -1)
    assert bad.returncode == 2 and "--nodes" in bad.stderr


def test_packed_bench_probes_sweeps_and_reports_the_targets(tmp_path):
    """Two specs in one run: a table per spec, the targets and the model's winner over both (one point per spec; one
    per strategy and spec for the layout), balanced's chunks per rank the stored runs' and the rule's."""
    out = tmp_path / "p.json"
    specs = ("lognormal:mean=96,sigma=1.2,seed=5,quantum=16", "256,128,64,64")
    tiny = ("--seq-len", 512, "--docs", *specs, "--heads", 2, "--kv-heads", 1, "--layouts", "zigzag", "balanced")
    tiny += ("--head-dim", 16, "--repeat", 3, "--rounds", 2, "--probe-blocks", 32, 64, 128, "--modes", "overlap", "ulysses")
    res = script("packed_bench.py", *tiny, "--ranks", 2, "--work", tmp_path / "work", "--out", out, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "load average" in res.stdout and "calibration: probe" in res.stdout and "warning" not in res.stdout
    assert "target <= 1.10" in res.stdout and "target >= 90%" in res.stdout and "target <= 20%" in res.stdout
    assert all(f"{d} over N=512:" in res.stdout for d in specs) and "all rank counts:" in res.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["cpu"] and data["calibration"].startswith("probe")
    assert [s["docs"] for s in data["specs"]] == list(specs) and data["specs"][1]["doc_lengths"] == [256, 128, 64, 64]
    (p2,) = data["per_rank_count"]
    assert p2["nranks"] == 2 and not p2["oversubscribed"]
    cells = {(c["strategy"], c["layout"], c["docs"]) for c in p2["cells"]}
    assert cells == {(m, lay, d) for m in ("overlap", "ulysses") for lay in ("zigzag", "balanced") for d in specs}
    assert all(len(c["repeats_s"]) == 2 * 3 for c in p2["cells"])  # 2 rounds of 3 repeats, pooled
    assert all(c["pairs_imbalance"] >= 1.0 and c["compute_imbalance"] >= 1.0 and c["ring_pieces"] >= 1 for c in p2["cells"])
    assert all(c["pairs_imbalance"] == 1.0 for c in p2["cells"] if c["strategy"] == "ulysses")
    for c in p2["cells"]:
        docs = tuple(data["specs"][specs.index(c["docs"])]["doc_lengths"])
        assert c["chunks_per_rank"] == (layout.balanced_chunks(2, 512, docs) if c["layout"] == "balanced" else None)
    zig = {(c["strategy"], c["docs"]): c["pairs_imbalance"] for c in p2["cells"] if c["layout"] == "zigzag"}
    assert all(s["zigzag_imbalance"] == zig[(s["strategy"], s["docs"])] > 1.3 for s in p2["speedups"])  # each spec's own
    assert len(p2["points"]) == 2  # one per (spec, N, P): every strategy x layout a candidate
    assert len(p2["layout_points"]) == 4  # one per strategy and spec: the layouts the candidates
    assert p2["winner"]["decided"] + p2["winner"]["ties"] == 2


def test_packed_bench_user_error_is_one_line():
    res = script("packed_bench.py", "--docs", "100,200", "--seq-len", 512)
    assert res.returncode == 2
    assert "--docs" in res.stderr.strip().splitlines()[-1]
