"""The fused score-tile pass (ringbench.kernels.fused, numba) on its own, and how the kernel chooses it.

The kernel with the fused pass against the float64 reference (tilings, masks, GQA, large logits, fully masked rows,
float32 and float64) is in test_kernel_tiling.py: every test there runs in each exponential, "fused" included.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from ringbench.kernels import kernel
from ringbench.layout import CAUSAL, STRICT, first_hidden

fused = pytest.importorskip("ringbench.kernels.fused", reason="numba is not installed (the test extra installs it)")

TOL = {"float32": 2e-7, "float64": 1e-15}  # max relative error of 2^x against float64's


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exp2_against_float64_over_the_whole_range(dtype):
    x = np.linspace(-140.0, 140.0, 700_001).astype(dtype).reshape(1, 1, -1)
    p = x.copy()
    r = np.empty((1, 1), dtype)
    fused.exp2_rows(p, r, fused.NO_BOUND, 1)
    want = np.exp2(x.astype(np.float64))
    normal = (x >= -126) & (x <= 127)
    assert (np.abs(p - want)[normal] / want[normal]).max() < TOL[dtype]
    if dtype == "float32":  # below float32's normal range: 0; above it: finite, and far above the kernel's SUM_HI
        assert np.all(p[x < -126] == 0) and np.all(np.isfinite(p)) and np.all(p[x > 127] >= 2.0**127)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 100, 512])
@pytest.mark.parametrize("mask,g", [(None, 1), (CAUSAL, 1), (STRICT, 3), (CAUSAL, 2)])
def test_rows_hide_the_layouts_keys_and_sum(dtype, cols, mask, g):
    """Every row: 2^s on its visible columns, 0 on the hidden ones (layout.first_hidden, query = row // g), its sum."""
    rng = np.random.default_rng(1)
    tq, off = 7, 3 - cols // 2  # query rows i0 .. i0 + tq against keys from j0: off = i0 - j0
    s = (rng.standard_normal((2, tq * g, cols)) * 4).astype(dtype)
    got, r = s.copy(), np.full((2, tq * g), np.nan, dtype)
    bound = fused.NO_BOUND if mask is None else np.asarray(first_hidden(mask, np.arange(tq) + off), np.int64)
    fused.exp2_rows(got, r, bound, g)
    want = np.exp2(s.astype(np.float64))
    if mask is not None:  # the layout's own rule, row by row
        query = np.arange(tq * g) // g + off
        want[:, np.arange(cols)[None, :] >= first_hidden(mask, query)[:, None]] = 0
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=0)
    np.testing.assert_allclose(r, want.sum(-1), rtol=4 * TOL[dtype] if dtype == "float64" else 1e-6, atol=0)


def test_nan_stays_nan():
    """A NaN score (inputs with inf or NaN) gives a NaN term and a NaN row sum, as NumPy's exp2 does: the kernel's
    sum check then sends the tile to the exact path, which gives NaN, never a silently finite result."""
    s = np.zeros((1, 2, 40), np.float32)
    s[0, 1, 33] = np.nan
    r = np.empty((1, 2), np.float32)
    fused.exp2_rows(s, r, fused.NO_BOUND, 1)
    assert np.isnan(s[0, 1, 33]) and np.isnan(r[0, 1]) and r[0, 0] == 40


def test_sums_are_in_a_fixed_order():
    """Equal rows give bitwise equal sums, wherever they sit in the tile (no order depending on alignment)."""
    row = np.random.default_rng(2).standard_normal(301).astype(np.float32)
    s = np.broadcast_to(row, (3, 4, 301)).copy()
    r = np.empty((3, 4), np.float32)
    fused.exp2_rows(s, r, fused.NO_BOUND, 1)
    assert np.all(r == r[0, 0]) and np.all(s == s[0, 0])


def test_forced_state_records_it_and_compiles_at_creation():
    q = np.random.default_rng(3).standard_normal((2, 1, 8, 4)).astype(np.float32)
    st = kernel.OnlineSoftmax(np, q, exp="fused")
    assert st.base.name == "fused" and st.base.fused and st.fused is fused
    assert st.base.scale == kernel.EXP_BASES["2"].scale  # base 2 underneath
    assert st.compile_s >= 0
    assert kernel.OnlineSoftmax(np, q, exp="2").fused is None
    with pytest.raises(ValueError, match="fused computes in float32 or float64"):
        kernel.OnlineSoftmax(np, q.astype(np.float16), exp="fused")


def test_fused_is_refused_off_numpy():
    class FakeXp:  # an array module that is not NumPy (CuPy on a GPU)
        __name__ = "fake"

    with pytest.raises(ValueError, match="RINGBENCH_EXP: fused needs the NumPy backend"):
        kernel.exp_base(FakeXp(), "fused")


HIDDEN_NUMBA = """
import sys
sys.modules["numba"] = None  # import numba now raises ModuleNotFoundError, as where it is not installed
import numpy as np
from ringbench.kernels import kernel
assert kernel.fused_module() is None
name, per_elem = kernel.measure_exp(np, rows=4, cols=256, repeat=2)
assert set(per_elem) == {"2", "e"} and name in per_elem, per_elem
assert kernel.exp_base(np, "auto").name in ("2", "e")
q = np.ones((1, 1, 4, 4), np.float32)
assert kernel.OnlineSoftmax(np, q).fused is None
try:
    kernel.exp_base(np, "fused")
except ValueError as exc:
    print(exc)
assert "numba" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
"""


def test_without_numba_auto_never_picks_fused_and_forcing_it_says_why():
    done = subprocess.run([sys.executable, "-c", HIDDEN_NUMBA], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "RINGBENCH_EXP: fused needs numba (pip install 'ringbench[numba]'); 2 and e need nothing"


def bench(*args, env=None):
    from conftest import ROOT, child_env

    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_bench.py"), "--head-dim", "16", "--block", "64", "--heads", "2"]
    return subprocess.run(
        [*cmd, "--repeat", "1", "--warmup", "0", *args], capture_output=True, text=True, env=child_env(env), timeout=300, cwd=ROOT
    )


def test_kernel_bench_runs_the_fused_pass_and_records_it(tmp_path):
    out = tmp_path / "k.json"
    res = bench("--exp", "fused", "--causal", "both", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "kernel exponential: fused (fused;" in res.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["numba"]["numba"] and set(data["provenance"]["exp_ns_per_elem"]) == {"2", "e", "fused"}
    assert all(r["exp_base"] == "fused" and r["compile_s"] >= 0 and r["max_rel_err"] < 1e-4 for r in data["rows"])


def test_kernel_bench_fused_without_numba_is_one_line(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "numba.py").write_text("raise ModuleNotFoundError('hidden by the test', name='numba')\n")
    from conftest import ROOT

    res = bench("--exp", "fused", env={"PYTHONPATH": f"{fake}:{ROOT}"})
    assert res.returncode == 2 and res.stdout == ""
    assert (
        res.stderr.strip()
        == "kernel_bench: --exp fused: RINGBENCH_EXP: fused needs numba (pip install 'ringbench[numba]'); 2 and e need nothing"
    )
