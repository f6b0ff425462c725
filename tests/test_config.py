"""RunConfig validation, stable point ids, and the CLI spelling of a config."""

import re

import pytest

from ringbench.cli import config_from_args, run_parser
from ringbench.config import ConfigError, RunConfig, coerce, legacy_point_id, memory_limit, point_id, stored_point_id, to_argv, validate


def test_defaults_are_valid():
    assert validate(RunConfig(), 4) == []


@pytest.mark.parametrize(
    "changes,nranks,key,text",
    [
        ({"seq_len": 1000}, 3, "seq_len", "not divisible by 3"),
        ({"seq_len": 1020, "layout": "zigzag"}, 4, "seq_len", "not divisible by 8"),
        ({"heads": 8, "kv_heads": 3}, 2, "kv_heads", "must divide heads=8"),
        ({"layout": "spiral"}, 2, "layout", "expected one of contiguous, zigzag, striped"),
        ({"mode": "overlapp"}, 2, "mode", "did you mean 'overlap'"),
        ({"batch": 0}, 1, "batch", ">= 1"),
        ({"causal": "yes"}, 1, "causal", "true or false"),
        ({"save_tensors": True, "seq_len": 1 << 20}, 1, "save_tensors", "MiB"),
    ],
)
def test_check_names_the_key(changes, nranks, key, text):
    cfg = RunConfig(**changes)
    problems = validate(cfg, nranks)
    assert problems and problems[0][0] == key and text in problems[0][1], problems


def test_from_dict_rejects_unknown_keys_with_hint():
    with pytest.raises(ConfigError, match=r"base\.seqlen: unknown key \(did you mean 'seq_len'\?\)"):
        RunConfig.from_dict({"seqlen": 4}, where="base.")
    with pytest.raises(ConfigError, match="expected an integer"):
        RunConfig.from_dict({"heads": "8"})


def test_point_id_is_stable_and_ignores_non_identity_fields():
    a = point_id(RunConfig(seq_len=2048), 4)
    assert a == point_id(RunConfig(seq_len=2048, repeat=9, check=True), 4)
    assert a != point_id(RunConfig(seq_len=2048), 2)
    assert a == point_id(RunConfig(seq_len=2048, memory_limit=2**30), 4) == point_id(RunConfig(seq_len=2048, memory_limit="none"), 4)
    assert a != point_id(RunConfig(seq_len=2048, kv_heads=2), 4)
    assert point_id(RunConfig(kv_heads=None), 2) == point_id(RunConfig(kv_heads=8), 2)  # resolved value
    assert a.startswith("overlap-contiguous-float32-N2048-P4-")
    assert a == "overlap-contiguous-float32-N2048-P4-" + a.rsplit("-", 1)[1]  # fixed shape, hash last


def test_argv_round_trip():
    cfg = RunConfig(seq_len=512, causal=True, layout="zigzag", kv_heads=2, check=True, progress="none", memory_limit=2**30)
    back = config_from_args(run_parser().parse_args(to_argv(cfg)))
    assert back == cfg
    assert config_from_args(run_parser().parse_args(["--memory-limit", "none"])).memory_limit == "none"
    assert to_argv(RunConfig()) == []


# Two configurations whose old 32-bit (8 hex digit) ids were the same, found by brute force over seed x batch
COLLIDING = (RunConfig(seq_len=4096, seed=73, batch=217), RunConfig(seq_len=4096, seed=127, batch=87))  # found with the old default N


def test_colliding_configurations_get_different_ids():
    a, b = COLLIDING
    assert legacy_point_id(a, 4) == legacy_point_id(b, 4) == "overlap-contiguous-float32-N4096-P4-57957bdc"
    assert point_id(a, 4) != point_id(b, 4)
    assert len(point_id(a, 4).rsplit("-", 1)[1]) == 16


def test_stored_runs_are_matched_by_their_configuration():
    a = COLLIDING[0]
    stored = a.to_dict()
    assert stored_point_id(stored, 4, legacy_point_id(a, 4)) == point_id(a, 4)
    assert stored_point_id({**stored, "repeat": 9, "check": True}, 4, "x") == point_id(a, 4)
    assert stored_point_id(stored, 2, "x") == point_id(a, 2)
    assert stored_point_id({**stored, "future_key": 1}, 4, "as-stored") == "as-stored"
    assert stored_point_id({}, 4, "as-stored") == "as-stored"  # unreadable: the stored string


@pytest.mark.parametrize(
    "key,bad,bound",
    [
        ("seq_len", 2**63, "<= 4294967296 (2^32)"),
        ("batch", 2**16 + 1, "<= 65536 (2^16)"),
        ("heads", 5000, "<= 4096 (2^12)"),
        ("kv_heads", 5000, "<= 4096 (2^12)"),
        ("head_dim", 100000, "<= 65536 (2^16)"),
        ("warmup", 10**4 + 1, "<= 10000"),
        ("repeat", 10**5 + 1, "<= 100000"),
        ("seed", 2**30, "<= 1073741823 (2^30 - 1)"),
        ("tile_q", 2**24 + 1, "<= 16777216 (2^24)"),
    ],
)
def test_every_integer_field_is_bounded(key, bad, bound):
    with pytest.raises(ConfigError, match=rf"^x\.{key}: expected an integer {re.escape(bound)}, got {bad}$"):
        coerce(key, bad, "x.")
    hi = int(bound.split()[1])
    assert coerce(key, hi) == hi
    problems = validate(RunConfig(**{key: bad}), 1)
    assert problems[0][0] == key and bound in problems[0][1]


@pytest.mark.parametrize(
    "value,expect",
    [("auto", "auto"), ("None", "none"), ("20GiB", 20 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096), (7, 7)],
)
def test_memory_limit_values(value, expect):
    assert memory_limit(value) == expect
    assert RunConfig.from_dict({"memory_limit": value}).memory_limit == expect


@pytest.mark.parametrize("value", ["lots", "0", 0, -1, True, "1e3", "20 GiBs", "9" * 400, 2**61])
def test_memory_limit_rejects(value):
    with pytest.raises(ConfigError, match=r"^memory_limit: expected auto, none, or a size"):
        memory_limit(value)


def test_point_ids_without_documents_or_window_are_what_they_were():
    """docs and window enter the point id only away from their defaults: ids stored before they existed stay
    (the digests below are what main computed before the keys were added)."""
    zig = RunConfig(seq_len=256, causal=True, layout="zigzag", kv_heads=2)
    assert point_id(zig, 4) == "overlap-zigzag-causal-float32-N256-P4-9ab904e64150bdea"
    passq = RunConfig(seq_len=6144, pass_="fwd+bwd", mode="pass-q")
    assert point_id(passq, 3) == "pass-q-fwdbwd-contiguous-float32-N6144-P3-fe824836bfdad853"
    assert point_id(RunConfig(), 1) == "overlap-contiguous-float32-N6144-P1-504beeeaf62c1ec4"
    ids = {point_id(RunConfig(causal=True, docs=d, window=w), 2) for d in ("", "fixed:1024", "4096,2048") for w in (0, 256)}
    assert len(ids) == 6
    cfg = RunConfig(causal=True, docs="lognormal:mean=1024,sigma=1", window=512, layout="balanced")
    assert config_from_args(run_parser().parse_args(to_argv(cfg))) == cfg
    assert point_id(RunConfig.from_dict(cfg.to_dict()), 2) == point_id(cfg, 2)


@pytest.mark.parametrize(
    ("changes", "key", "text"),
    [
        (dict(docs="1000,2000"), "docs", "sum to 3000, not to the sequence length 6144"),
        (dict(docs="0,6144"), "docs", "must be >= 1"),
        (dict(docs="zipf:3"), "docs", "unknown document distribution"),
        (dict(docs="fixed:1000"), "docs", "not a multiple of 1000"),
        (dict(window=64), "window", "add --causal"),
        (dict(causal=True, docs="fixed:1024", pass_="prefill", cached_tokens=1024), "docs", "not for --pass prefill"),
        (dict(causal=True, window=64, pass_="decode"), "window", "not for --pass decode"),
        (dict(causal=True, docs="fixed:1024", layout="striped"), "docs", "layout striped takes no documents"),
        (dict(causal=True, window=9, layout="striped"), "layout", "layout striped takes no documents"),
        (dict(causal=True, docs="1030,5114", layout="doc-zigzag"), "docs", "document 0 has 1030 tokens, not a multiple of 4"),
    ],
)
def test_documents_and_windows_are_refused_naming_the_rule(changes, key, text):
    problems = validate(RunConfig(**changes), 2)
    assert problems and problems[0][0] == key and text in problems[0][1], problems


def test_documents_and_windows_that_hold_are_accepted():
    for layout in ("contiguous", "zigzag", "doc-zigzag", "balanced"):
        assert not validate(RunConfig(causal=True, docs="fixed:1536", window=700, layout=layout), 2)
    assert not validate(RunConfig(docs="lognormal:mean=1024,sigma=1.5,seed=3"), 4)  # full attention inside documents
    assert RunConfig(docs="fixed:1536").doc_lengths == (1536,) * 4 and RunConfig().doc_lengths == (6144,)
    assert RunConfig.from_dict({"docs": 6144, "window": 64}).docs == "6144"  # an experiment file's `docs: 6144`
    with pytest.raises(ConfigError, match="docs: expected a document spec"):
        RunConfig.from_dict({"docs": [1, 2]})


@pytest.mark.parametrize("argv", [["--window", "0"], ["--window", "-2"]])
def test_cli_refuses_a_window_of_zero(argv):
    with pytest.raises(ConfigError, match="--window: must be >= 1"):
        config_from_args(run_parser().parse_args(argv))
