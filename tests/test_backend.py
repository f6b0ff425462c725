"""Backend selection and dtype support (the CuPy object is built without a GPU: only its rules are tested)."""

import numpy as np
import pytest

from ringbench.backend import Backend, BackendError, get_backend, local_rank


def test_numpy_backend_dtypes_and_compute_dtype():
    be = get_backend("numpy")
    assert be.dtype("float16") == np.float16
    assert be.compute_dtype(np.float16) == np.float32 and be.compute_dtype(np.float64) == np.float64
    assert "bfloat16" in be.dtypes()          # ml_dtypes is a dependency
    assert be.compute_dtype(be.dtype("bfloat16")) == np.float32


def test_a_dtype_the_backend_lacks_names_what_is_allowed():
    gpu = Backend("cupy", xp=None)
    with pytest.raises(BackendError, match=r"--dtype bfloat16 is not supported by backend cupy; "
                                           r"allowed: float32, float64, float16"):
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
    for var in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "PMI_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID"):
        monkeypatch.delenv(var, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3
