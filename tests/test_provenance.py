"""ringbench.provenance: one format for time, versions without importing MPI, CPU and SIMD level."""

import re
import subprocess
import sys
import time

import pytest

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


# --- conditions: how busy the machine was while a probe or run measured ------------------------------------------
def _host(cpus=2, ranks=2, own=2.0, other=0.05, load=(0.3, 0.4)):
    return {
        "cpus": cpus,
        "ranks": ranks,
        "seconds": 5.0,
        "load_start": [load[0], 0.2, 0.1, 1],
        "load_end": [load[1], 0.2, 0.1, 3],
        "busy_cpus": None if other is None else own + other,
        "own_cpus": own,
        "other_cpus": other,
    }


def _cond(spread=None, **host):
    return {"hosts": {"node1": _host(**host)}, "spread": spread or {"compute": 1.1}}


class _Cal:  # what calibration_warning reads of a model.Calibration: the conditions of what it was measured on
    def __init__(self, *conds):
        self.conditions = list(conds)


class _Run:
    def __init__(self, cond):
        self.provenance = {"conditions": cond} if cond is not None else {}


def test_loaded_says_why_a_measurement_was_not_quiet_and_nothing_for_a_quiet_or_old_one():
    assert provenance.loaded(_cond()) is None
    assert provenance.loaded(None) is None and provenance.loaded({}) is None  # recorded before conditions were
    # 2 cores, 2 ranks: half a core of other work already shares a rank's core
    assert provenance.loaded(_cond(other=1.8)) == "other work kept 1.8 of 2 cores of node1 busy"
    assert provenance.loaded(_cond(other=0.4)) is None
    # 64 cores, 2 ranks: 10 other busy cores leave the ranks theirs; 64 ranks on 64 cores: 4 other busy cores do not
    assert provenance.loaded(_cond(cpus=64, own=2.0, other=10.0)) is None
    assert provenance.loaded(_cond(cpus=64, ranks=64, own=64.0, other=4.0)) is not None
    # no /proc/stat: the load average per core decides
    assert provenance.loaded(_cond(other=None, load=(0.5, 1.5))) is None
    assert provenance.loaded(_cond(other=None, load=(0.5, 5.2))) == "load average 5.2 on 2 cores of node1"
    # repeats that spread more than QUIET_SPREAD (nan: too few or too short repeats, never counted)
    assert provenance.loaded(_cond(spread={"compute": 3.5, "copy": float("nan")})) == "its compute repeats spread x3.5"
    assert provenance.loaded(_cond(spread={"bwd_compute": float("nan")})) is None


def test_calibration_warning_one_line_when_the_calibration_or_only_the_runs_were_loaded():
    quiet, busy = _cond(), _cond(other=1.7)
    w = provenance.calibration_warning(_Cal(busy), [_Run(quiet)])
    assert w.startswith("warning: the model's calibration was measured on a loaded machine") and "\n" not in w
    assert "other work kept 1.7 of 2 cores" in w and "probe again on a quiet machine" in w
    assert "1 of 2 of its measurements" in provenance.calibration_warning(_Cal(quiet, busy))  # advise: no runs
    w = provenance.calibration_warning(_Cal(quiet), [_Run(quiet), _Run(busy)])
    assert w.startswith("warning: 1 of 2 runs were measured on a loaded machine") and "calibration on a quiet one" in w
    assert provenance.calibration_warning(_Cal(quiet), [_Run(quiet)]) is None
    # old probes and runs (no conditions) give no warning, nor a given calibration without any
    assert provenance.calibration_warning(_Cal(None), [_Run(None), _Run(busy)]) is None
    assert provenance.calibration_warning(object(), []) is None


def test_conditions_combine_the_ranks_of_each_host():
    def iv(host, own, busy=8.0, cpus=4):
        return {
            "host": host,
            "wall_s": 2.0,
            "own_cpu_s": own,
            "busy_cpu_s": busy,
            "cpus": cpus,
            "load_start": [1.0, 1, 1, 2],
            "load_end": [2.0, 1, 1, 3],
        }

    cond = provenance.conditions([iv("a", 1.5), iv("a", 1.5), iv("b", 2.0, busy=None)], {"compute": 1.2})
    a, b = cond["hosts"]["a"], cond["hosts"]["b"]
    assert a["ranks"] == 2 and a["busy_cpus"] == 4.0 and a["own_cpus"] == 1.5 and a["other_cpus"] == 2.5
    assert b["ranks"] == 1 and b["busy_cpus"] is None and b["other_cpus"] is None and b["own_cpus"] == 1.0
    assert cond["spread"] == {"compute": 1.2} and a["load_start"][0] == 1.0 and a["load_end"][0] == 2.0
    assert "a: load 1.0 -> 2.0 on 4 cores, other work 2.5 cores busy" in provenance.conditions_text(cond)


def test_load_interval_measures_this_process_and_its_host():
    import json

    start = provenance.load_snapshot()
    end = time.process_time() + 0.2
    while time.process_time() < end:  # 0.2 s of this process's own CPU
        pass
    iv = provenance.load_interval(start)
    assert iv["wall_s"] > 0 and iv["own_cpu_s"] >= 0.15 and iv["cpus"] >= 1
    if sys.platform.startswith("linux"):
        assert iv["busy_cpu_s"] >= 0.1 and len(iv["load_start"]) == 4 and len(iv["load_end"]) == 4
    cond = provenance.conditions([iv], {})
    assert json.loads(json.dumps(cond)) == cond  # stored as JSON in the provenance


def test_repeat_spread_over_repeats_leaving_out_the_shortest_measurements():
    import numpy as np

    t = np.array([[0.010, 0.002, 1e-5], [0.011, 0.004, 5e-5], [0.012, 0.002, 1e-5]])  # (R, K): repeats first
    assert provenance.repeat_spread(t) == pytest.approx(np.median([1.2, 2.0]))  # the 10 us one is jitter: left out
    assert provenance.repeat_spread(t[:1]) != provenance.repeat_spread(t[:1])  # one repeat: nan
    assert provenance.repeat_spread(t[:, 2:]) != provenance.repeat_spread(t[:, 2:])  # only short ones: nan
