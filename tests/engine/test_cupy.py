"""The CuPy path, for real, where a GPU is present (skipped with the reason elsewhere)."""

import pytest

from ringbench import store

from conftest import mpiexec


def _gpu_reason():
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install -e '.[gpu]')"
    try:
        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA GPU visible"
    except Exception as exc:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
        return f"no usable CUDA GPU ({exc.__class__.__name__})"


pytestmark = [pytest.mark.mpi, pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))]


@pytest.mark.parametrize("nranks", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("cuda_aware", ["no", "auto"])
@pytest.mark.parametrize("mode", ["overlap", "blocking", "allgather"])
def test_cupy_ring_is_correct(nranks, dtype, cuda_aware, mode, tmp_path):
    out = tmp_path / "r.h5"
    res = mpiexec(
        nranks,
        "run",
        "--backend",
        "cupy",
        "--seq-len",
        512 * nranks,
        "--heads",
        4,
        "--kv-heads",
        2,
        "--head-dim",
        64,
        "--dtype",
        dtype,
        "--causal",
        "--layout",
        "zigzag",
        "--mode",
        mode,
        "--cuda-aware",
        cuda_aware,
        "--repeat",
        2,
        "--check",
        "--quiet",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    (run,) = store.read(out)
    assert run.check["passed"], run.check
    assert run.provenance["backend"] == "cupy" and run.memory["device_pool_bytes"].min() > 0
