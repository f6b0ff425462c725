"""Layouts and step plans: every causal pair is computed exactly once, nothing masked is computed."""

import numpy as np
import pytest

from ringbench import layout
from ringbench.layout import LAYOUTS, Piece, positions, step_plan, unmasked_pairs


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 5])
def test_positions_partition_the_sequence(name, nranks):
    n = 2 * nranks * 3
    held = np.concatenate([positions(name, r, nranks, n) for r in range(nranks)])
    assert sorted(held.tolist()) == list(range(n))
    for r in range(nranks):
        p = positions(name, r, nranks, n)
        assert len(p) == n // nranks and np.all(np.diff(p) > 0)


def test_zigzag_holds_chunks_r_and_mirror():
    assert positions("zigzag", 0, 2, 8).tolist() == [0, 1, 6, 7]
    assert positions("zigzag", 1, 2, 8).tolist() == [2, 3, 4, 5]
    assert positions("striped", 1, 3, 9).tolist() == [1, 4, 7]


def _visibility(name, nranks, n_total, causal):
    """Dense (N, N) count of how often each (query, key) token pair is computed by the step plans."""
    n = n_total // nranks
    seen = np.zeros((n_total, n_total), int)
    for r in range(nranks):
        qp = positions(name, r, nranks, n_total)
        for s in range(nranks):
            src = (r - s) % nranks
            kp = positions(name, src, nranks, n_total)
            for piece in step_plan(name, r, src, nranks, n, causal):
                qi = qp[piece.q0 : piece.q1]
                ki = kp[piece.k0 : piece.k1]
                vis = np.ones((len(qi), len(ki)), bool)
                m = layout.mask_for(piece, 0, len(qi), 0, len(ki))
                if m is not None:
                    vis &= ~m
                np.add.at(seen, (qi[:, None].repeat(len(ki), 1)[vis], ki[None, :].repeat(len(qi), 0)[vis]), 1)
    return seen


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_plans_cover_each_visible_pair_once(name, nranks, causal):
    n_total = 4 * nranks
    seen = _visibility(name, nranks, n_total, causal)
    want = np.tril(np.ones((n_total, n_total), int)) if causal else np.ones((n_total, n_total), int)
    np.testing.assert_array_equal(seen, want)
    expect = n_total * (n_total + 1) // 2 if causal else n_total**2
    assert unmasked_pairs(name, nranks, n_total, causal) == expect


def test_causal_skips_fully_masked_blocks_and_halves_zigzag():
    assert step_plan("contiguous", 0, 1, 2, 8, True) == []
    assert step_plan("contiguous", 1, 0, 2, 8, True) == [Piece(0, 8, 0, 8)]
    # zigzag off-diagonal steps compute exactly half of the block
    for r, src in [(0, 1), (1, 0), (2, 0), (0, 3)]:
        pieces = step_plan("zigzag", r, src, 4, 8, True)
        assert sum(p.pairs() for p in pieces) == 32


def test_divisor_and_unknown_layout():
    assert layout.divisor("zigzag", 3) == 6
    assert layout.divisor("striped", 3) == 3
    with pytest.raises(ValueError, match="unknown layout"):
        layout.divisor("spiral", 2)


def _pairs_by_step_plans(name: str, nranks: int, n_total: int, causal: bool) -> int:
    """The reference: the pairs of every piece of all P^2 step plans (what unmasked_pairs summed before its closed form)."""
    n = n_total // nranks
    return sum(p.pairs() for r in range(nranks) for s in range(nranks) for p in step_plan(name, r, (r - s) % nranks, nranks, n, causal))


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_unmasked_pairs_closed_form_matches_the_step_plans(name, causal):
    for nranks in range(1, 9):
        for multiple in (1, 2, 3, 7, 64):
            n_total = layout.divisor(name, nranks) * multiple
            assert unmasked_pairs(name, nranks, n_total, causal) == _pairs_by_step_plans(name, nranks, n_total, causal), (nranks, n_total)


def test_unmasked_pairs_refuses_a_length_the_layout_cannot_split():
    with pytest.raises(ValueError, match="not a multiple of 6"):
        unmasked_pairs("zigzag", 3, 9, True)


def test_one_rule_for_hidden_keys():
    """first_hidden is the rule; hidden and mask_for (and the kernel) are built on it."""
    assert layout.first_hidden(layout.CAUSAL, 3) == 4 and layout.first_hidden(layout.STRICT, 3) == 3
    rows, cols = np.arange(4)[:, None], np.arange(4)[None, :]
    np.testing.assert_array_equal(layout.hidden(layout.CAUSAL, rows, cols), np.triu(np.ones((4, 4), bool), 1))
    np.testing.assert_array_equal(layout.hidden(layout.STRICT, rows, cols), np.triu(np.ones((4, 4), bool), 0))
    assert layout.hidden(layout.FULL, rows, cols) is None and layout.mask_for(Piece(0, 4, 0, 4), 0, 4, 0, 4) is None
    np.testing.assert_array_equal(layout.mask_for(Piece(0, 8, 0, 8, layout.CAUSAL), 2, 5, 1, 6), np.arange(1, 6) > np.arange(2, 5)[:, None])
    with pytest.raises(ValueError, match="hides no key"):
        layout.first_hidden(layout.FULL, 0)
