"""ringbench.engine.serving: the serving passes' layout and plans (pure, brute force against the causal mask by global
position), their rules and point ids (config), and their engines against float64 at 1..4 ranks (one launch per rank
count, many random cases each: tests/engine/mpi_serving.py), the CLI's refusals, the record and the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import report, results
from ringbench.config import RunConfig, point_id, validate
from ringbench.engine import serving
from ringbench.harness import inputs
from ringbench.kernels import reference
from ringbench.layout import LAYOUTS, divisor
from ringbench.sweeps import experiment

from conftest import child_env, mpi_worker, mpiexec, ringbench

WORKER = Path(__file__).with_name("mpi_serving.py")


def _mask(pieces, nq, nk):
    m = np.zeros((nq, nk), int)
    for p in pieces:
        block = np.ones((p.q1 - p.q0, p.k1 - p.k0), int)
        if p.mask != "full":
            i = np.arange(p.q1 - p.q0)[:, None]
            j = np.arange(p.k1 - p.k0)[None, :]
            block = (j <= i) if p.mask == "causal" else (j < i)
        m[p.q0 : p.q1, p.k0 : p.k1] += block
    return m


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_plans_cover_exactly_the_causal_pairs_by_global_position(layout):
    rng = np.random.default_rng(1)
    for P in (1, 2, 3, 4):
        div = divisor(layout, P)
        for _ in range(6):
            n = div * int(rng.integers(1, 6))
            c = div * int(rng.integers(0, n // div))
            cfg = RunConfig(seq_len=n, causal=True, layout=layout, pass_="prefill", cached_tokens=c)
            assert not validate(cfg, P), validate(cfg, P)
            qs = [serving.rank_positions(cfg, r, P) for r in range(P)]
            for r in range(P):
                q_pos = qs[r][0]
                for src in range(P):
                    k_pos = qs[src][1]
                    pieces = serving.prefill_plan(layout, r, src, P, len(q_pos), c // P)
                    want = (k_pos[None, :] <= q_pos[:, None]).astype(int)
                    assert np.array_equal(_mask(pieces, len(q_pos), len(k_pos)), want), (layout, P, n, c, r, src)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_new_and_cached_tokens_are_balanced_over_every_rank(layout):
    """Every rank holds T / P new tokens (queries) and C / P cached ones, whatever C; together they are the context
    once each; with C = 0 the new tokens are the training layout."""
    for P in (1, 2, 3, 4):
        div = divisor(layout, P)
        n = 6 * div
        for c in range(0, n, div):
            cfg = RunConfig(seq_len=n, causal=True, layout=layout, pass_="prefill", cached_tokens=c)
            parts = [serving.rank_positions(cfg, r, P) for r in range(P)]
            assert all(len(q) == (n - c) // P for q, _ in parts)
            assert all(len(kv) == n // P and np.sum(kv < c) == c // P for _, kv in parts)
            assert np.array_equal(np.sort(np.concatenate([kv for _, kv in parts])), np.arange(n))
            assert np.array_equal(np.sort(np.concatenate([q for q, _ in parts])), np.arange(c, n))
            assert all(np.all(np.diff(kv) > 0) for _, kv in parts)  # ascending: the plans rely on it
            if c == 0:
                train = RunConfig(seq_len=n, causal=True, layout=layout)
                assert all(np.array_equal(q, serving.rank_positions(train, r, P)[0]) for r, (q, _) in enumerate(parts))


def test_visible_pieces_cover_exactly_the_causal_pairs():
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        k_pos = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False))
        t = int(rng.integers(1, n + 1))
        q_pos = np.arange(n - t, n)
        want = (k_pos[None, :] <= q_pos[:, None]).astype(int)
        assert np.array_equal(_mask(serving.visible_pieces(q_pos, k_pos), t, len(k_pos)), want)


def test_pairs_and_kv_cache_bytes():
    pre = RunConfig(seq_len=10, causal=True, pass_="prefill", cached_tokens=4)
    assert serving.unmasked_pairs(pre) == sum(i + 1 for i in range(4, 10))
    dec = RunConfig(seq_len=10, causal=True, pass_="decode", new_tokens=3, batch=2, heads=4, kv_heads=2, head_dim=8)
    assert serving.unmasked_pairs(dec) == 8 + 9 + 10
    assert serving.unmasked_pairs(RunConfig(seq_len=10, causal=True, pass_="prefill")) == 55  # C = 0: the causal forward
    per_rank, least = serving.kv_cache_bytes(dec, 2, 4)
    assert per_rank == 2 * 2 * 5 * 2 * 8 * 4 and least == per_rank


def test_rules_refuse_what_does_not_apply():
    def problems(nranks=2, **kw):
        return [k for k, _ in validate(RunConfig(**{"causal": True, "seq_len": 96, **kw}), nranks)]

    assert problems(pass_="prefill", cached_tokens=48) == []
    assert problems(pass_="prefill", cached_tokens=48, causal=False) == ["causal"]
    assert problems(pass_="prefill", cached_tokens=96) == ["cached_tokens"]
    assert problems(pass_="prefill", cached_tokens=3) == ["cached_tokens"]  # not divisible by P
    assert problems(pass_="prefill", mode="ulysses", heads=8) == ["mode"]
    assert problems(pass_="prefill", cached_tokens=48, save_tensors=True) == []
    assert problems(pass_="decode", save_tensors=True) == []
    assert problems(cached_tokens=48) == ["cached_tokens"]  # only for prefill
    assert problems(new_tokens=2) == ["new_tokens"]
    assert problems(merge="ring") == ["merge"]
    assert problems(pass_="decode", merge="gather", new_tokens=5, layout="striped") == []
    assert problems(pass_="decode", mode="blocking") == ["mode"]
    assert problems(pass_="decode", new_tokens=97) == ["new_tokens"]


def test_point_ids_of_old_configurations_do_not_change():
    # computed by the code before the serving passes existed (main at f37916a)
    assert point_id(RunConfig(), 4) == "overlap-contiguous-float32-N6144-P4-212375abc2c0e41d"
    old = RunConfig(causal=True, layout="zigzag", pass_="fwd+bwd", mode="pass-q")
    assert point_id(old, 2) == "pass-q-fwdbwd-zigzag-causal-float32-N6144-P2-f7e04e64879a1fea"
    a = point_id(RunConfig(causal=True, pass_="prefill", cached_tokens=1024), 2)
    b = point_id(RunConfig(causal=True, pass_="prefill", cached_tokens=2048), 2)
    assert a.startswith("overlap-prefill-contiguous-causal") and a != b
    d = {m: point_id(RunConfig(causal=True, pass_="decode", merge=m), 2) for m in ("ring", "tree", "gather")}
    assert d["ring"].startswith("ring-decode-") and len(set(d.values())) == 3
    assert point_id(RunConfig(causal=True, pass_="decode", new_tokens=4), 2) != d["tree"]


@pytest.mark.mpi
@pytest.mark.parametrize(
    "nranks", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_serving_engines_match_float64_at_every_rank_count(nranks):
    got = mpi_worker(WORKER, nranks, {"seed": 0}, timeout=600)
    assert {k: got[k] for k in ("prefill", "decode", "bitwise")} == {"prefill": 48, "decode": 36, "bitwise": 12}
    assert got["torch"] in (0, 7)  # 0: torch not installed


def _cli(*args):
    cmd = [sys.executable, "-m", "ringbench", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)


def test_cli_refusals_are_one_line_exit_2():
    cases = [
        (["--pass", "prefill", "--cached-tokens", "8", "--seq-len", "16"], "--causal"),
        (["--pass", "decode", "--causal", "--mode", "pass-q", "--seq-len", "16"], "--mode"),
        (["--pass", "decode", "--causal", "--seq-len", "4096", "--batch", "64", "--memory-limit", "1MiB"], "KV cache shard"),
        (["--pass", "prefill", "--causal", "--kernel", "flash-attn", "--seq-len", "16"], "flash-attn"),
    ]
    for args, word in cases:
        res = _cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], (args, res.stderr)


@pytest.mark.mpi
def test_runs_are_stored_read_back_and_reported(tmp_path):
    out = tmp_path / "serving.h5"
    base = ["run", "--causal", "--seq-len", "48", "--heads", "4", "--kv-heads", "1", "--head-dim", "5", "--repeat", "3", "--check"]
    base += ["--out", out, "--quiet"]
    for args in (
        ["--pass", "prefill", "--cached-tokens", "32", "--mode", "overlap"],
        ["--pass", "prefill", "--cached-tokens", "32", "--mode", "pass-q"],
    ):
        res = mpiexec(2, *base, *args)
        assert res.returncode == 0, res.stderr
    for merge in ("ring", "gather"):
        res = mpiexec(2, *base, "--pass", "decode", "--merge", merge, "--new-tokens", "2")
        assert res.returncode == 0, res.stderr
    runs = results.load(out)
    assert [r.config["pass"] for r in runs] == ["prefill", "prefill", "decode", "decode"]
    assert all(r.check["passed"] for r in runs)
    assert [r.config["merge"] for r in runs[2:]] == ["ring", "gather"]
    mem = runs[2].memory
    assert list(mem["kv_cache_bytes"]) == [2 * 24 * 1 * 5 * 4] * 2 and mem["kv_cache_min_bytes"] == 2 * 24 * 5 * 4
    assert runs[0].samples["total_s"].shape == (3, 2)
    rows = results.rows(runs)
    assert [r["phase"] for r in rows] == ["prefill", "prefill", "decode", "decode"]
    assert rows[0]["cached_tokens"] == 32 and rows[2]["new_tokens"] == 2
    text = report.format_report(runs, None)
    assert "prefill against a KV cache" in text and "decode with a sharded KV cache" in text
    assert store.read(out)[0].point_id == point_id(RunConfig.from_dict(runs[0].config), 2)
    from ringbench.analysis import plot

    written, skipped = plot.render(runs, str(tmp_path), formats=("png",))
    assert [Path(w).name for w in written] == ["decode.png"]  # only serving runs: only their figures
    assert skipped == ["prefill: needs prefill runs (--pass prefill) at 2 or more cached sizes"]


def _lse64(q, k, q_pos):
    """float64 log-sum-exp (natural log) of q (B, T, H, D) against every key k (B, N, H_kv, D), causal by position."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    kh = np.repeat(np.asarray(k, np.float64).transpose(0, 2, 1, 3), g, axis=1)  # (B, H, N, D)
    s = np.asarray(q, np.float64).transpose(0, 2, 1, 3) @ kh.swapaxes(-1, -2) / np.sqrt(d)  # (B, H, T, N)
    s = np.where(np.arange(k.shape[1])[None, :] > np.asarray(q_pos)[:, None], -np.inf, s)
    m = s.max(axis=-1, keepdims=True)
    return (m[..., 0] + np.log(np.exp(s - m).sum(axis=-1))).transpose(0, 2, 1)  # (B, T, H)


# one random case per launch: (P, pass, mode or merge, layout), odd shapes drawn from the case's seed
SAVE_CASES = [
    (3, "prefill", "pass-q", "striped"),
    (2, "decode", "gather", "contiguous"),
    pytest.param(4, "prefill", "overlap", "zigzag", marks=pytest.mark.slow),
    pytest.param(3, "decode", "tree", "striped", marks=pytest.mark.slow),
]


@pytest.mark.mpi
@pytest.mark.parametrize("nranks,pass_,how,layout", SAVE_CASES)
def test_save_tensors_of_the_serving_passes_match_float64(tmp_path, nranks, pass_, how, layout):
    """--save-tensors: k, v of the whole context and q at the queries' positions are the generated inputs there; the
    stored out and lse, loaded from the file, equal the float64 reference's over the global positions."""
    rng = np.random.default_rng([nranks, len(pass_), len(how), len(layout)])
    div = divisor(layout, nranks)
    n = div * int(rng.integers(3, 9))
    hk = int(rng.choice([1, 2]))
    h, d, b = hk * int(rng.integers(1, 4)), int(rng.integers(3, 12)), int(rng.integers(1, 3))
    if pass_ == "prefill":
        c = div * int(rng.integers(1, n // div))
        extra, q_pos = ["--mode", how, "--cached-tokens", c], np.arange(c, n)
    else:
        t = int(rng.integers(1, 4))
        extra, q_pos = ["--merge", how, "--new-tokens", t], np.arange(n - t, n)
    out = tmp_path / "t.h5"
    shape = ["--seq-len", n, "--heads", h, "--kv-heads", hk, "--head-dim", d, "--batch", b, "--layout", layout]
    shape += ["--repeat", 1, "--warmup", 0, "--seed", 7, "--out", out, "--quiet"]
    res = mpiexec(nranks, "run", "--pass", pass_, "--causal", *shape, *extra, "--save-tensors")
    assert res.returncode == 0, res.stderr
    (run,) = store.read(out, tensors=True)
    got = run.tensors
    assert set(got) == {"q", "k", "v", "out", "lse", "q_pos"}
    assert np.array_equal(got["q_pos"], q_pos)
    dims = dict(batch=b, seq_len=n, head_dim=d)
    allpos = np.arange(n)
    for name, pos, heads in (("q", q_pos, h), ("k", allpos, hk), ("v", allpos, hk)):
        assert np.array_equal(got[name], inputs.tokens(name, 7, pos, heads=heads, **dims).astype(np.float32)), name
    ref = reference.reference_attention(got["q"], got["k"], got["v"], causal=True, q_pos=q_pos, k_pos=allpos)
    assert got["out"].shape == ref.shape == (b, len(q_pos), h, d)
    assert reference.within(got["out"], ref, "float32"), reference.rel_err(got["out"], ref)
    lse = _lse64(got["q"], got["k"], q_pos)
    assert got["lse"].shape == lse.shape
    assert np.abs(got["lse"] - lse).max() <= 1e-4 * max(1.0, np.abs(lse).max())


@pytest.mark.mpi
def test_a_serving_experiment_is_planned_swept_reported_and_plotted_by_the_cli(tmp_path):
    """ringbench plan / sweep / status / report / plot on a tiny serving experiment (prefill at two cached sizes, one
    decode step): the plan's work is the runs' own FLOP count (the new tokens' queries against the whole context)."""
    exp = tmp_path / "serve.yaml"
    exp.write_text(
        "name: serve\n"
        "base: {seq_len: 32, heads: 2, kv_heads: 1, head_dim: 4, causal: true, repeat: 2, warmup: 0, check: true}\n"
        "matrix:\n  pass: [prefill, decode]\n  cached_tokens: [0, 24]\n"
        "ranks: [2]\n"
        "exclude:\n  - {pass: decode, cached_tokens: 24}\n"
    )
    plan = ringbench("plan", exp, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "3 points" in plan.stdout
    res = ringbench("sweep", exp, "--results", tmp_path / "results", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 ok, 0 failed" in res.stdout
    status = ringbench("status", tmp_path / "results" / "serve", cwd=tmp_path)
    assert status.returncode == 0 and "3 points: 3 done" in status.stdout, status.stdout + status.stderr
    merged = tmp_path / "results" / "serve.h5"
    runs = {r.point_id: r for r in store.read(merged)}
    points = experiment.load(exp).points
    assert set(runs) == {p.id for p in points}
    for p in points:
        run = runs[p.id]
        assert run.status == "ok" and run.check["passed"]
        assert p.flops() == run.summary["flops"]  # (T (N - T) + T (T + 1) / 2) 4 B H D
        t = 32 - p.config.cached_tokens if p.config.pass_ == "prefill" else 1
        assert p.flops() == 4 * 2 * 4 * (t * (32 - t) + t * (t + 1) // 2)
    report = ringbench("report", merged, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "prefill against a KV cache" in report.stdout and "decode with a sharded KV cache" in report.stdout
    figs = ringbench("plot", merged, "-o", tmp_path / "figs", cwd=tmp_path)
    assert figs.returncode == 0, figs.stderr
    assert {"prefill.png", "decode.png"} <= {f.name for f in (tmp_path / "figs").iterdir()}
