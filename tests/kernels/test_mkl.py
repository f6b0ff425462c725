"""The MKL binding's layout steps (pure: no MKL needed) and the views it must leave to numpy.matmul."""

import numpy as np
import pytest

from ringbench.kernels import mkl
from ringbench.kernels.mkl import (
    NO_TRANS,
    TRANS,
    batch_strides,
    element_strides,
    matrix_layout,
    output_layout,
    plan,
    single_product_strides,
)


def test_element_strides_rejects_reversed_and_split_elements():
    a = np.zeros((3, 4), np.float32)
    assert element_strides(a) == (4, 1)
    assert element_strides(a[::-1]) is None
    assert element_strides(a[:, ::-1]) is None
    rec = np.zeros(3, dtype=[("x", np.float32), ("y", np.int8)])
    assert element_strides(rec["x"]) is None  # 5-byte stride: not a whole number of float32


def test_matrix_layout_rows_columns_and_neither():
    a = np.zeros((5, 7), np.float32)
    assert matrix_layout(a.shape, element_strides(a)) == (NO_TRANS, 7)
    wide = np.zeros((5, 10), np.float32)[:, 2:9]  # rows contiguous, 10 apart
    assert matrix_layout(wide.shape, element_strides(wide)) == (NO_TRANS, 10)
    t = a.T  # columns contiguous: the storage of the transpose
    assert matrix_layout(t.shape, element_strides(t)) == (TRANS, 7)
    row = a[:1, ::2]  # one row: contiguous whichever way it is read
    assert matrix_layout(row.shape, element_strides(row)) == (TRANS, 2)  # its transpose: 4 rows, 2 apart
    neither = a[::2, ::2]
    assert matrix_layout(neither.shape, element_strides(neither)) is None


def test_output_layout_needs_contiguous_rows():
    out = np.zeros((5, 9), np.float32)
    assert output_layout(out[:, 2:6].shape, element_strides(out[:, 2:6])) == 9
    assert output_layout(out.T.shape, element_strides(out.T)) is None
    assert output_layout(out[:, :1].shape, element_strides(out[:, :1])) == 9  # one column: any row stride


def test_batch_strides_broadcast_and_mismatch():
    shape_a, shape_b, shape_c = (3, 5, 7), (1, 7, 4), (3, 5, 4)
    assert batch_strides(shape_a, (35, 7, 1), shape_b, (28, 4, 1), shape_c, (20, 4, 1)) == (35, 0, 20)
    assert batch_strides((2, 5, 7), (35, 7, 1), shape_b, (28, 4, 1), shape_c, (20, 4, 1)) is None  # 2 of a batch of 3
    assert batch_strides(shape_a, (35, 7, 1), shape_b, (28, 4, 1), shape_c, (0, 4, 1)) is None  # every product into one C


def test_single_product_strides_cover_one_matrix():
    assert single_product_strides(7, 4, 9, m=5, n=4, k=7) == (49, 28, 45)


def test_plan_of_a_batch_and_what_it_refuses():
    a = np.zeros((3, 5, 7), np.float32)
    b = np.zeros((3, 4, 7), np.float32).swapaxes(-1, -2)
    out = np.zeros((3, 5, 4), np.float32)
    g = plan(a, b, out)
    assert (g.trans_a, g.trans_b, g.m, g.n, g.k, g.batch) == (NO_TRANS, TRANS, 5, 4, 7, 3)
    assert (g.lda, g.stride_a, g.ldb, g.stride_b, g.ldc, g.stride_c) == (7, 35, 7, 28, 4, 20)
    assert plan(a, np.zeros((3, 6, 4), np.float32), out) is None  # inner dimensions differ
    assert plan(a[:, ::-1], b, out) is None  # reversed rows
    assert plan(a[0], b[0], out[0]).batch == 1


def test_reversed_views_fall_back_to_numpy():
    """A view with a negative stride was handed to MKL as if it ran forwards (wrong result, or an MKL error)."""
    fn = mkl.MklMatmul.load()
    if fn is None:
        pytest.skip("Intel MKL is not installed (pip install -e '.[mkl]')")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    b = rng.standard_normal((3, 7, 4)).astype(np.float32)
    for x, y in [(a[:, ::-1], b), (a[::-1], b), (a, b[:, ::-1])]:
        want = np.matmul(x, y)
        np.testing.assert_allclose(fn(x, y, out=np.empty_like(want)), want, rtol=1e-5, atol=1e-5)
