"""Backend selection and dtype support (the CuPy object is built without a GPU: only its rules are tested)."""

import numpy as np
import pytest

from ringbench.engine.backend import Backend, BackendError, get_backend, local_rank


def test_numpy_backend_dtypes_and_compute_dtype():
    be = get_backend("numpy")
    assert be.dtype("float16") == np.float16
    assert be.compute_dtype(np.float16) == np.float32 and be.compute_dtype(np.float64) == np.float64
    assert "bfloat16" in be.dtypes()  # ml_dtypes is a dependency
    assert be.compute_dtype(be.dtype("bfloat16")) == np.float32


def test_a_dtype_the_backend_lacks_names_what_is_allowed():
    gpu = Backend("cupy", xp=None)
    with pytest.raises(
        BackendError,
        match=r"--dtype bfloat16 is not supported by backend cupy; "
        r"allowed: float32, float64, float16",
    ):
        gpu.dtype("bfloat16")


def test_unknown_backend_and_missing_cupy():
    with pytest.raises(BackendError, match="allowed: numpy, cupy"):
        get_backend("jax")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="--backend cupy needs CuPy"):
            get_backend("cupy")


def test_local_rank_from_launcher_environment(monkeypatch):
    for var in (
        "MPI_LOCALRANKID",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
        "PMI_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "PALS_LOCAL_RANKID",
    ):
        monkeypatch.delenv(var, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3


def _mkl():
    from ringbench.kernels.mkl import MklMatmul

    mkl = MklMatmul.load()
    if mkl is None:
        pytest.skip("Intel MKL is not installed (pip install -e '.[mkl]')")
    return mkl


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mkl_matmul_matches_numpy_on_every_layout(dtype):
    mkl = _mkl()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 7)).astype(dtype)
    b = rng.standard_normal((3, 7, 4)).astype(dtype)
    wide = rng.standard_normal((3, 7, 10)).astype(dtype)
    bt = rng.standard_normal((3, 4, 7)).astype(dtype).swapaxes(-1, -2)
    cases = [
        (a, b),
        (a, b[:1]),
        (a[:1], b),
        (a[0], b[0]),
        (a, wide[..., 2:6]),
        (a, bt),
        (a[:, 1:4], b),
        (a.astype(np.float16), b.astype(np.float16)),
    ]  # last: not a BLAS dtype, falls back
    for x, y in cases:
        want = np.matmul(x, y)
        got = mkl(x, y, out=np.empty_like(want))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    out = np.zeros((3, 5, 9), dtype)  # an output view with a row stride
    mkl(a, b, out=out[..., 2:6])
    np.testing.assert_allclose(out[..., 2:6], a @ b, rtol=1e-5, atol=1e-5)
    assert np.all(out[..., :2] == 0) and np.all(out[..., 6:] == 0)
    acc = np.ones((3, 5, 4), dtype)
    mkl.matmul_add(a, b, acc)
    np.testing.assert_allclose(acc, 1 + a @ b, rtol=1e-5, atol=1e-5)


def test_blas_choice(monkeypatch):
    from ringbench.kernels.mkl import MklMatmul

    be = get_backend("numpy")
    fn, desc = be.matmul("numpy")
    assert fn is np.matmul and desc.startswith("numpy.matmul")
    with pytest.raises(BackendError, match="allowed: auto, numpy, mkl"):
        be.matmul("eigen")
    with pytest.raises(BackendError, match="--blas mkl applies to --backend numpy"):
        Backend("cupy", xp=None).matmul("mkl")
    monkeypatch.setattr(MklMatmul, "load", classmethod(lambda cls, threads=1: None))
    assert be.matmul("auto")[0] is np.matmul
    with pytest.raises(BackendError, match=r"--blas mkl needs Intel MKL.*pip install 'ringbench\[mkl\]'"):
        be.matmul("mkl")


def test_thread_limit_rule():
    from ringbench.engine.backend import thread_limit

    assert thread_limit({}) == (1, "default")
    assert thread_limit({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert thread_limit({"OMP_NUM_THREADS": "3", "RINGBENCH_THREADS": "2"}) == (2, "RINGBENCH_THREADS")
    assert thread_limit({"OPENBLAS_NUM_THREADS": "", "MKL_NUM_THREADS": "x"}) == (1, "default")  # libraries ignore these too
    with pytest.raises(BackendError, match="RINGBENCH_THREADS: expected a positive integer, got '0'"):
        thread_limit({"RINGBENCH_THREADS": "0"})


def test_limit_threads_limits_the_blas_pools_now():
    from threadpoolctl import threadpool_info, threadpool_limits

    from ringbench.engine.backend import limit_threads

    with threadpool_limits(limits=2):  # restored on exit
        assert limit_threads(1) == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")


@pytest.mark.parametrize("count", [1, 2, 4])
def test_more_ranks_than_gpus_share_them_round_robin_with_one_warning(count):
    from ringbench.engine.backend import select_device

    picks = [select_device(r, count) for r in range(3 * count)]
    assert [d for d, _ in picks] == [r % count for r in range(3 * count)]
    warned = [r for r, (_, w) in enumerate(picks) if w]
    assert warned == [count]  # once per node: the first rank that wraps around
    assert f"{count} visible" in picks[count][1] and "round-robin" in picks[count][1]


def test_cupy_backend_binds_the_shared_gpu_and_warns_once(monkeypatch, capsys):
    """get_backend('cupy') with 3 ranks on a 2-GPU node (a fake cupy: no GPU needed)."""
    import sys
    import types

    used = []
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 2, getDeviceProperties=lambda dev: {"name": b"Fake GPU"})
    device = lambda dev: types.SimpleNamespace(use=lambda: used.append(dev))  # noqa: E731
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=device)))
    devs = [get_backend("cupy", rank_on_node=r).device_id for r in range(3)]
    assert devs == used == [0, 1, 0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ringbench: warning: more ranks than GPUs") and "(2 visible)" in err[0]


def test_blas_auto_takes_mkl_on_intel_cpus_only(monkeypatch):
    """MKL's GEMMs measured 5-25% slower than OpenBLAS on AMD EPYC: auto leaves them to --blas mkl there."""
    from ringbench.engine import backend as backend_mod
    from ringbench.kernels.mkl import MklMatmul

    fake = object.__new__(MklMatmul)
    monkeypatch.setattr(MklMatmul, "load", classmethod(lambda cls, threads=1: fake))
    monkeypatch.setattr(MklMatmul, "describe", lambda self: "MKL (fake)")
    be = get_backend("numpy")
    monkeypatch.setattr(backend_mod, "cpu_vendor", lambda: "GenuineIntel")
    assert be.matmul("auto")[0] is fake
    monkeypatch.setattr(backend_mod, "cpu_vendor", lambda: "AuthenticAMD")
    assert be.matmul("auto")[0] is np.matmul
    assert be.matmul("mkl")[0] is fake  # asked for by name: given


def test_run_help_says_what_blas_auto_takes():
    """`ringbench run --help` describes --blas auto as the rule above: MKL on Intel CPUs only, not 'if present'."""
    from conftest import ringbench

    res = ringbench("run", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())  # argparse wraps the help
    blas = text[text.index("--blas {auto,numpy,mkl} GEMM") :].split(" --", 1)[0]  # the option's help, not the usage line
    assert "if present" not in blas
    assert "auto (MKL where it loads, on Intel CPUs; numpy on others)" in blas


# ---------------------------------------------------------------------------------------------
# memory cgroups (a Slurm job's --mem): fake /proc/self/cgroup and /sys/fs/cgroup trees
# ---------------------------------------------------------------------------------------------
GiB = 2**30
V1_NO_LIMIT = 9223372036854771712  # what cgroup v1 writes for "no limit"


def fake_cgroup(tmp_path, lines: str, files: dict[str, object]):
    """/proc/self/cgroup with ``lines``, and a cgroup tree under tmp_path/cg: {relative file path: content}."""
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    root = tmp_path / "cg"
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{content}\n")
    return proc, root


def test_cgroup_v2_limit_of_the_job_binds_below_a_step_without_one(tmp_path):
    """Slurm limits the job's cgroup; the step's below it says 'max'. Reclaimable page cache (inactive_file) is free."""
    from ringbench.engine.backend import cgroup_memory_headroom

    proc, root = fake_cgroup(
        tmp_path,
        "0::/slurm/job_7/step_0\n",
        {
            "slurm/job_7/memory.max": 8 * GiB,
            "slurm/job_7/memory.current": 5 * GiB,
            "slurm/job_7/memory.stat": f"anon 123\ninactive_file {GiB}\nactive_file 7",
            "slurm/job_7/step_0/memory.max": "max",
            "slurm/job_7/step_0/memory.current": 4 * GiB,
            "memory.stat": "anon 1",  # the root cgroup has no memory.max
        },
    )
    assert cgroup_memory_headroom(proc, root) == (4 * GiB, str(root / "slurm" / "job_7"))
    (root / "slurm/job_7/step_0/memory.max").write_text(f"{5 * GiB}\n")  # a tighter step limit wins
    assert cgroup_memory_headroom(proc, root) == (GiB, str(root / "slurm/job_7/step_0"))


def test_cgroup_v1_memory_controller_and_no_limit(tmp_path):
    from ringbench.engine.backend import cgroup_memory_headroom

    lines = "5:cpu,cpuacct:/slurm/uid_1/job_7\n4:memory:/slurm/uid_1/job_7/step_0\n0::/\n"
    files = {
        "memory/memory.limit_in_bytes": V1_NO_LIMIT,
        "memory/memory.usage_in_bytes": 50 * GiB,
        "memory/slurm/uid_1/job_7/memory.limit_in_bytes": 2 * GiB,
        "memory/slurm/uid_1/job_7/memory.usage_in_bytes": 3 * GiB // 2,
        "memory/slurm/uid_1/job_7/memory.stat": f"inactive_file 0\ntotal_inactive_file {GiB // 2}\n",
        "memory/slurm/uid_1/job_7/step_0/memory.limit_in_bytes": V1_NO_LIMIT,
        "memory/slurm/uid_1/job_7/step_0/memory.usage_in_bytes": GiB,
    }
    proc, root = fake_cgroup(tmp_path, lines, files)
    assert cgroup_memory_headroom(proc, root) == (GiB, str(root / "memory/slurm/uid_1/job_7"))
    (root / "memory/slurm/uid_1/job_7/memory.limit_in_bytes").write_text(f"{V1_NO_LIMIT}\n")
    assert cgroup_memory_headroom(proc, root) is None  # no level with a limit
    assert cgroup_memory_headroom(tmp_path / "missing", root) is None  # no /proc/self/cgroup (not Linux)


def test_cgroup_of_a_container_is_the_mount_root(tmp_path):
    """Without a cgroup namespace a container sees the host's path, but its own cgroup is mounted at the root."""
    from ringbench.engine.backend import cgroup_memory_headroom

    proc, root = fake_cgroup(tmp_path, "0::/docker/abc\n", {"memory.max": 4 * GiB, "memory.current": GiB})
    assert cgroup_memory_headroom(proc, root) == (3 * GiB, str(root))


def test_host_memory_is_the_smaller_of_memavailable_and_the_cgroup_and_says_which(tmp_path):
    from ringbench.engine.backend import host_memory

    proc, root = fake_cgroup(tmp_path, "0::/job\n", {"job/memory.max": 4 * GiB, "job/memory.current": GiB})
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {64 * 2**20} kB\nMemAvailable: {16 * 2**20} kB\n")
    avail, what = host_memory(meminfo, proc, root)
    assert avail == 3 * GiB and "cgroup" in what and str(root / "job") in what
    meminfo.write_text(f"MemAvailable: {2 * 2**20} kB\n")
    assert host_memory(meminfo, proc, root) == (2 * GiB, "available there")  # MemAvailable binds: as before
    assert host_memory(meminfo, tmp_path / "missing", root) == (2 * GiB, "available there")
    assert host_memory(tmp_path / "missing", proc, root)[0] == 3 * GiB
