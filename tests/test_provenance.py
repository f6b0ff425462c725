"""ringbench.provenance: one format for time, versions without importing MPI, CPU and SIMD level."""

import re
import subprocess
import sys

from ringbench import provenance
from ringbench.provenance import simd_level


def test_utc_now_is_iso_seconds_with_offset():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", provenance.utc_now())


def test_versions_name_ringbench_schema_python_and_installed_packages():
    import ringbench

    v = provenance.versions()
    assert v["ringbench"] == ringbench.__version__ and v["schema_version"] == ringbench.SCHEMA_VERSION
    assert v["python"] == sys.version.split()[0]
    assert {"numpy", "h5py", "mpi4py"} <= set(v)
    assert "no-such-package" not in provenance.versions(("no-such-package",))


def test_provenance_initialises_no_mpi_and_loads_no_array_library():
    loaded = "print([m for m in ('mpi4py', 'numpy', 'h5py') if m in sys.modules])"
    code = "import sys, ringbench.provenance as p; p.versions(), p.cpu(); " + loaded
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_simd_level_names_the_widest_and_what_is_missing():
    assert simd_level({"sse4_2", "avx", "avx2", "fma"}) == "AVX2, no AVX-512"
    assert simd_level({"avx2", "avx512f"}) == "AVX-512"
    assert simd_level({"fp", "asimd"}) == "NEON, no SVE"
    assert simd_level(set()) == "SIMD level unknown"
    assert provenance.cpu().endswith(")")


def test_thread_pools_report_threads_per_library():
    import numpy  # noqa: F401 - loads its BLAS

    pools = provenance.thread_pools()
    assert any(p["user_api"] == "blas" for p in pools) and all(p["num_threads"] >= 1 for p in pools)
