"""Document specs (--docs): the lengths each grammar gives, their determinism, and the refusals naming the rule."""

import random

import pytest

from ringbench.documents import QUANTUM, doc_lengths


def test_explicit_fixed_and_empty_specs():
    assert doc_lengths("", 100) == (100,)
    assert doc_lengths("4096,1024,3072", 8192) == (4096, 1024, 3072)
    assert doc_lengths(" 3, 7 ", 10) == (3, 7)
    assert doc_lengths("fixed:4", 16) == (4, 4, 4, 4)


@pytest.mark.parametrize(
    "spec", ["uniform:100-1000", "uniform:64-4096:seed=3", "lognormal:mean=2048,sigma=1.2", "lognormal:mean=512,sigma=2,seed=9,quantum=8"]
)
def test_drawn_lengths_sum_to_n_are_quantized_and_depend_only_on_spec_and_n(spec):
    rng = random.Random(spec)
    for _ in range(5):
        n = rng.randint(1, 200_000)
        lengths = doc_lengths(spec, n)
        q = int(spec.split("quantum=")[1]) if "quantum=" in spec else QUANTUM
        assert sum(lengths) == n and all(x >= 1 for x in lengths)
        assert all(x % q == 0 and x >= q for x in lengths[:-1])  # the last one is truncated to what is left
        assert doc_lengths(spec, n) == lengths  # deterministic (no rank count enters)


def test_uniform_bounds_and_lognormal_mean_and_seed():
    lengths = doc_lengths("uniform:256-1024,quantum=1", 10**6)[:-1]
    assert min(lengths) >= 256 and max(lengths) <= 1024 and 600 < sum(lengths) / len(lengths) < 680
    drawn = doc_lengths("lognormal:mean=1000,sigma=0.8,quantum=1", 4 * 10**6)[:-1]
    assert 900 < sum(drawn) / len(drawn) < 1100 and max(drawn) > 4000  # long-tailed
    assert doc_lengths("lognormal:mean=1000,sigma=1,seed=1", 10**5) != doc_lengths("lognormal:mean=1000,sigma=1,seed=2", 10**5)


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ("3,8", "sum to 11, not to the sequence length 10"),
        ("0,10", "must be >= 1"),
        ("-2,12", "must be >= 1"),
        ("fixed:3", "not a multiple of 3"),
        ("fixed:0", "L >= 1"),
        ("uniform:5", "LO-HI"),
        ("uniform:9-5", "LO <= HI"),
        ("lognormal:mean=1", "mean=M,sigma=S"),
        ("lognormal:mean=-1,sigma=1", "mean > 0"),
        ("lognormal:mean=100,sigma=1,zz=1", "unknown option 'zz=1'"),
        ("uniform:1-5,quantum=0", "quantum="),
        ("poisson:3", "unknown document distribution 'poisson'"),
        ("a,b", "expected an integer"),
    ],
)
def test_bad_specs_name_the_rule(spec, rule):
    with pytest.raises(ValueError, match=rule.replace("(", r"\(")):
        doc_lengths(spec, 10)
