"""A seeded random search over shapes, against the float64 reference: odd head dims, one token per rank, GQA ratios.

Round shapes never find a library bug that shows at one row stride: NumPy 2.4.6's in-place negative on a column
view whose rows are 16 bytes apart (float32; 64 bytes float64) stored wrong dQ and dK at head dim 3 (7 in float64),
in every mode (README, known problems). Three levels:

- the in-place and ``out=`` ufuncs the hot paths use, on column views of every row width 1..40 (a probe of NumPy);
- the kernels alone (OnlineSoftmax, BlockBackward over an emulated ring on one process, no MPI): random shapes,
  layouts, rank counts 1..4, tiles, exponential bases, GEMM providers; cheap, so many examples;
- under MPI at 1..4 ranks: random configurations through the real ring and strategy objects, one launch per rank
  count for all its cases (tests/engine/mpi_random_shapes.py).

The pinned regression cases (head dim 3 and 7 backward) run in every level. The default run is bounded (about a
minute); ``RINGBENCH_RANDOM_EXAMPLES=500`` draws 500 cases per level and rank count instead (the nightly size) and
``RINGBENCH_RANDOM_SEED`` another seed. A failure names the seed and the case that reproduces it.
"""

from __future__ import annotations

import os
from pathlib import Path

import mpi_random_shapes as mpi_cases
import numpy as np
import pytest

from ringbench.config import DTYPES, MODES
from ringbench.engine.backend import MklMatmul, get_backend
from ringbench.harness import inputs
from ringbench.kernels import kernel, reference
from ringbench.kernels.backward import BlockBackward, heads_to_kv
from ringbench.kernels.reference import TOLERANCE, TOLERANCE_BWD, reference_attention_grad
from ringbench.layout import LAYOUTS, positions, step_plan

from conftest import mpi_worker


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdecimal():
        raise pytest.UsageError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


SEED = _env_int("RINGBENCH_RANDOM_SEED", 0)
EXAMPLES = _env_int("RINGBENCH_RANDOM_EXAMPLES", 0)  # 0: the default, bounded sizes below
DEFAULT_KERNEL_EXAMPLES, DEFAULT_MPI_EXAMPLES = 60, 20  # the MPI level's per rank count
KERNEL_EXAMPLES = EXAMPLES or DEFAULT_KERNEL_EXAMPLES
MPI_EXAMPLES = EXAMPLES or DEFAULT_MPI_EXAMPLES
BACKEND = get_backend("numpy")
MKL = MklMatmul.load()


# ---------------------------------------------------------------------------------------------
# NumPy itself: the ufuncs the hot paths call in place or with out= on strided views
# ---------------------------------------------------------------------------------------------
def _column_views(dtype):
    """(array, column index) for row widths 1..40: the columns 16 and 64 bytes apart among them."""
    for width in range(1, 41):
        for rows in (3, 9, 33):
            a = (np.arange(rows * width, dtype=np.float64).reshape(rows, width) % 7 + 1.25).astype(dtype)
            for col in sorted({0, width // 2, width - 1}):
                yield a, col


IN_PLACE = {  # name -> f(view, out) as the kernels call it
    "negate": lambda x, out: kernel.negate(np, x, out=out),
    "multiply": lambda x, out: np.multiply(x, x.dtype.type(-1.4426950408889634), out=out),
    "add": lambda x, out: np.add(x, x, out=out),
    "subtract": lambda x, out: np.subtract(x, x.dtype.type(0.5), out=out),
    "divide": lambda x, out: np.divide(x, x.dtype.type(3.0), out=out),
    "maximum": lambda x, out: np.maximum(x, x.dtype.type(3.0), out=out),
}
TRANSCENDENTAL = {
    "exp": lambda x, out: np.exp(x, out=out),
    "exp2": lambda x, out: np.exp2(x, out=out),
    "log": lambda x, out: np.log(x, out=out),
    "log2": lambda x, out: np.log2(x, out=out),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_place_ufuncs_are_right_on_column_views_of_every_row_width(dtype):
    """Every ufunc the hot paths run in place, on a column view of every row width 1..40, in place and into another
    strided view: the same numbers as on a contiguous copy (exact, the transcendental ones within 4 ulp). NumPy
    2.4.6's np.negative fails this at 16-byte (float32) and 64-byte (float64) rows; ``kernel.negate`` does not."""
    dt = np.dtype(dtype)
    wrong = []
    for a0, col in _column_views(dt):
        want_in = a0[:, col].copy()
        for name, f in {**IN_PLACE, **TRANSCENDENTAL}.items():
            want = f(want_in, None)
            a = a0.copy()
            f(a[:, col], a[:, col])  # in place on the view
            other = np.zeros_like(a0)
            f(a0[:, col], other[:, col])  # from one strided view into another
            exact = name in IN_PLACE
            for got in (a[:, col], other[:, col]):
                ok = np.array_equal(got, want) if exact else np.allclose(got, want, rtol=4 * np.finfo(dt).eps, atol=0)
                if not ok:
                    wrong.append((name, a0.shape[1] * dt.itemsize))
        s = np.zeros_like(a0)
        np.sum(a0 * a0, axis=-1, out=s[:, col])  # the row sum into a column view (BlockBackward.set_delta's form)
        if not np.array_equal(s[:, col], np.sum(a0 * a0, axis=-1)):
            wrong.append(("sum", a0.shape[1] * dt.itemsize))
    assert not wrong, f"NumPy {np.__version__}: wrong results (ufunc, row stride in bytes): {sorted(set(wrong))}"


@pytest.mark.parametrize("dtype,head_dim", [("float32", 3), ("float16", 3), ("bfloat16", 3), ("float64", 7)])
def test_backward_delta_column_is_right_at_the_strides_numpy_gets_wrong(dtype, head_dim):
    """-D = -rowsum(dO * O) in BlockBackward's widened dO column (rows D + 1 elements apart), as set by the
    constructor, read by delta() and loaded by load(): the column NumPy's in-place negative got wrong."""
    rng = np.random.default_rng(1)
    st = BACKEND.dtype(dtype)
    z, g, n = 2, 3, 5
    q, do, o = (rng.standard_normal((z, g, n, head_dim)).astype(st) for _ in range(3))
    lse = rng.standard_normal((z, g, n)).astype(st)
    bb = BlockBackward(np, q, do, o, lse)
    ct = bb.dtype
    want = (do.astype(ct) * o.astype(ct)).sum(-1)
    np.testing.assert_allclose(bb.delta(), want, rtol=1e-6 if ct == np.float32 else 1e-14)
    np.testing.assert_allclose(-bb.doa[..., head_dim].transpose(0, 2, 1), want, rtol=1e-6 if ct == np.float32 else 1e-14)
    delta = rng.standard_normal((z, g, n)).astype(ct)
    bb.load(q, do, lse, delta)
    np.testing.assert_array_equal(bb.delta(), delta)


# ---------------------------------------------------------------------------------------------
# The kernels alone: an emulated ring on one process
# ---------------------------------------------------------------------------------------------
def kernel_cases(seed: int, examples: int) -> list[dict]:
    """Pinned regression cases (the backward at head dim 3 and 7), then ``examples`` random ones."""
    pinned = [
        dict(nranks=1, layout="contiguous", causal=False, n=4, head_dim=3, kv_heads=2, g=1, batch=1, dtype="float32"),
        dict(nranks=2, layout="zigzag", causal=True, n=6, head_dim=3, kv_heads=1, g=2, batch=2, dtype="float16"),
        dict(nranks=3, layout="striped", causal=True, n=5, head_dim=3, kv_heads=2, g=3, batch=1, dtype="bfloat16"),
        dict(nranks=4, layout="contiguous", causal=False, n=3, head_dim=7, kv_heads=1, g=1, batch=2, dtype="float64"),
    ]
    rng = np.random.default_rng([seed, 12345])
    cases = [dict(c, exp="e", tile_q=None, tile_k=None, head_chunk=None, matmul="numpy", reload=False, seed=1) for c in pinned]
    for _ in range(examples):
        while True:
            layout = str(rng.choice(LAYOUTS))
            n = mpi_cases.log_int(rng, 1, mpi_cases.MAX_TOKENS)
            if layout in ("zigzag", "doc-zigzag"):
                n += n % 2
            c = dict(
                nranks=int(rng.integers(1, 5)),
                layout=layout,
                causal=bool(rng.integers(2)),
                n=n,
                head_dim=mpi_cases.log_int(rng, 1, mpi_cases.MAX_HEAD_DIM),
                kv_heads=int(rng.integers(1, 5)),
                g=int(rng.integers(1, 5)),
                batch=int(rng.integers(1, 4)),
                dtype=str(rng.choice(DTYPES)),
                exp=str(rng.choice(["2", "e", "fused"])),
                tile_q=int(rng.integers(-(-n // 32), n + 1)) if rng.random() < 0.5 else None,  # at most 32 tiles a piece
                tile_k=int(rng.integers(-(-n // 32), n + 1)) if rng.random() < 0.5 else None,
                head_chunk=int(rng.integers(1, 5)) if rng.random() < 0.5 else None,
                matmul="mkl" if MKL is not None and rng.random() < 0.3 else "numpy",
                reload=bool(rng.integers(2)),  # the rows reloaded through delta() and load(), as pass-Q moves them
                seed=int(rng.integers(0, 2**30)),
            )
            total = c["n"] * c["nranks"]
            if c["exp"] == "fused" and c["dtype"] not in ("float32", "float64"):  # fused: float32 and float64 only
                c["exp"] = "2"
            if total >= 2 and c["batch"] * c["kv_heads"] * c["g"] * total**2 * c["head_dim"] <= mpi_cases.COST_BUDGET:
                cases.append(c)
                break
    return cases


def emulate(c: dict):
    """Global (out, dq, dk, dv) in float64 from each emulated rank's forward (OnlineSoftmax) and backward
    (BlockBackward) over its step plans, the dK/dV accumulators travelling with their K/V block; and the reference's."""
    p, n, d, b = c["nranks"], c["n"], c["head_dim"], c["batch"]
    hk, h = c["kv_heads"], c["kv_heads"] * c["g"]
    total = n * p
    dims = dict(batch=b, seq_len=total, head_dim=d)
    allpos = np.arange(total)
    st = BACKEND.dtype(c["dtype"])
    q, k, v = (inputs.tokens(x, c["seed"], allpos, heads=h if x == "q" else hk, **dims).astype(st) for x in "qkv")
    do = inputs.tokens("do", c["seed"], allpos, heads=h, **dims).astype(st)
    ct = BACKEND.compute_dtype(st)
    pos = [positions(c["layout"], r, p, total) for r in range(p)]
    kv = [(kernel.kv_to_heads(np, k[:, x], ct), kernel.kv_to_heads(np, v[:, x], ct)) for x in pos]
    plans = [[step_plan(c["layout"], r, (r - s) % p, p, n, c["causal"]) for s in range(p)] for r in range(p)]
    matmul = MKL if c["matmul"] == "mkl" else None
    tiles = dict(tile_q=c["tile_q"], tile_k=c["tile_k"], head_chunk=c["head_chunk"], matmul=matmul)
    out = np.zeros(q.shape)
    ranks = []
    for r in range(p):
        qh = kernel.q_to_heads(np, q[:, pos[r]], hk, ct) * ct.type(kernel.softmax_scale(d))  # (Z, G, n, D)
        fwd = kernel.OnlineSoftmax(np, qh, exp=c["exp"], **tiles)
        for s in range(p):
            fwd.update(*kv[(r - s) % p], plans[r][s])
        o, lse = fwd.finalize(st)
        out[:, pos[r]] = kernel.heads_to_out(o, b)
        doh = kernel.q_to_heads(np, do[:, pos[r]], hk)
        bb = BlockBackward(np, qh, doh, o, lse, exp_base=c["exp"], **tiles)
        if c["reload"]:
            bb.load(qh, doh, lse, bb.delta())
        ranks.append(bb)
    held = [(np.zeros(kv[r][0].shape, ct), np.zeros(kv[r][0].shape, ct)) for r in range(p)]  # rank r holds block (r - s)
    for s in range(p):
        for r in range(p):
            ranks[r].update(*kv[(r - s) % p], *held[r], plans[r][s])
        held = [held[(r - 1) % p] for r in range(p)]
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for r in range(p):
        dq[:, pos[r]] = kernel.heads_to_out(ranks[r].dq(st), b)
        dk[:, pos[r]] = heads_to_kv(held[r][0].astype(st), b)
        dv[:, pos[r]] = heads_to_kv(held[r][1].astype(st), b)
    ref_out = reference.reference_attention(q, k, v, causal=c["causal"])
    ref_grads = reference_attention_grad(q, k, v, do, causal=c["causal"])
    return (out, dq, dk, dv), (ref_out, *ref_grads)


KERNEL_CASES = kernel_cases(SEED, KERNEL_EXAMPLES)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[f"k{i}" for i in range(len(KERNEL_CASES))])
def test_kernels_match_the_float64_reference_on_random_shapes(case):
    got, ref = emulate(case)
    assert all(np.isfinite(g).all() for g in got), (SEED, case)
    errs = [float(np.abs(g - r).max()) for g, r in zip(got, ref)]
    rel_out = mpi_cases.rel_errors(errs[:1], [float(np.abs(ref[0]).max())])[0]
    rel = mpi_cases.rel_errors(errs[1:], [float(np.abs(r).max()) for r in ref[1:]])
    tol, tol_bwd = TOLERANCE[case["dtype"]], TOLERANCE_BWD[case["dtype"]]
    assert rel_out <= tol and max(rel) <= tol_bwd, (
        f"RINGBENCH_RANDOM_SEED={SEED} case {case}: rel err out {rel_out:.2e} (tol {tol:.0e}), dq, dk, dv "
        f"{', '.join(f'{e:.2e}' for e in rel)} (tol {tol_bwd:.0e})"
    )


def test_kernel_cases_cover_odd_head_dims_one_token_and_every_choice():
    """The default draw (seed 0) reaches what the search is for: odd head dims, 1 token per rank, every layout,
    dtype and exponential, GQA, and the pinned head dims 3 and 7."""
    cases = kernel_cases(0, DEFAULT_KERNEL_EXAMPLES)
    assert {3, 7} <= {c["head_dim"] for c in cases} and any(c["head_dim"] % 2 and c["head_dim"] > 8 for c in cases)
    assert any(c["n"] <= 2 for c in cases) and any(c["n"] >= 100 for c in cases)
    assert {c["layout"] for c in cases} == set(LAYOUTS) and {c["dtype"] for c in cases} == set(DTYPES)
    assert {c["exp"] for c in cases} == {"2", "e", "fused"} and {c["nranks"] for c in cases} == {1, 2, 3, 4}
    assert len({c["g"] for c in cases}) == 4 and {c["causal"] for c in cases} == {False, True}


# ---------------------------------------------------------------------------------------------
# Under MPI: the real ring and strategies, one launch per rank count
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_every_mode_matches_the_float64_reference_on_random_shapes(nranks):
    """The pinned cases and MPI_EXAMPLES random configurations (tests/engine/mpi_random_shapes.py) at this rank count:
    each output, or dQ, dK and dV, within the run check's tolerance of the float64 reference."""
    cases = mpi_cases.draw_cases(SEED, nranks, MPI_EXAMPLES)
    spec = {"seed": SEED, "examples": MPI_EXAMPLES}
    results = mpi_worker(Path(__file__).with_name("mpi_random_shapes.py"), nranks, spec, timeout=120 + 10 * len(cases))
    assert [r["case"] for r in results] == [mpi_cases.describe(c, exp) for c, exp in cases]
    bad = [
        f"{r['case']}: {', '.join(f'{x} {e:.2e}' for x, e in zip(r['names'], r['rel']))} (tol {r['tol']:.0e})"
        for r in results
        if not r["shapes_ok"] or not all(e <= r["tol"] for e in r["rel"])
    ]
    assert not bad, f"RINGBENCH_RANDOM_SEED={SEED}, {nranks} ranks, {len(bad)} of {len(results)} cases wrong:\n" + "\n".join(bad)


def test_mpi_cases_cover_every_mode_layout_dtype_and_pass():
    """The default draw (seed 0) over the rank counts 1..4 reaches every mode (hybrid with U > 1 too), layout, dtype,
    pass, causal flag, odd head dims and GQA; every rank count has the pinned backward cases."""
    cases = [c for p in (1, 2, 3, 4) for c, _ in mpi_cases.draw_cases(0, p, DEFAULT_MPI_EXAMPLES)]
    assert {c.mode for c in cases} == set(MODES) and {c.layout for c in cases} == set(LAYOUTS)
    assert {c.dtype for c in cases} == set(DTYPES) and {c.pass_ for c in cases} == {"fwd", "bwd"}
    assert {c.causal for c in cases} == {False, True} and any(c.mode == "hybrid" and c.ulysses_degree > 1 for c in cases)
    assert any(c.head_dim % 2 and c.head_dim > 8 for c in cases) and any(c.heads != c.kv_heads_resolved for c in cases)
    for p in (1, 2, 3, 4):
        pinned = [c for c in mpi_cases.pinned_cases(p) if c.pass_ == "bwd"]
        assert {(c.head_dim, c.dtype) for c in pinned} >= {(3, "float32"), (7, "float64")}
