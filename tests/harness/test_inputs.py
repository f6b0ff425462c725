import numpy as np

from ringbench.harness import inputs


def test_any_subset_of_tokens_matches_the_global_tensor():
    dims = dict(batch=2, seq_len=40, heads=3, head_dim=5)
    full = inputs.tokens("k", 7, np.arange(40), **dims)
    part = inputs.tokens("k", 7, [3, 17, 39], chunk=2, **dims)
    np.testing.assert_array_equal(full[:, [3, 17, 39]], part)
    assert abs(full.std() - 1.0) < 0.1 and np.unique(full).size == full.size


def test_tensors_and_seeds_differ():
    dims = dict(batch=1, seq_len=16, heads=2, head_dim=4)
    q = inputs.tokens("q", 0, np.arange(16), **dims)
    assert not np.array_equal(q, inputs.tokens("k", 0, np.arange(16), **dims))
    assert not np.array_equal(q, inputs.tokens("q", 1, np.arange(16), **dims))
