"""Packed documents and sliding windows in the analysis (issue 20): the model's pair counts come from the mask (every
(rank, source) plan where the step classes do not hold), the stored balance figures, `advise --docs` ranking strategies
and layouts, and report and plot on a real file of packed runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ringbench import layout, store
from ringbench.analysis import advise, measure, model, results
from ringbench.analysis.model import Calibration, Shape
from ringbench.config import validate
from ringbench.documents import doc_lengths

from conftest import append_runs, ringbench

RNG_SEED = 20


def random_specs(rng, nranks: int, seq_len: int) -> list[str]:
    """Document specs over ``seq_len`` of every kind: an explicit odd list, fixed, uniform and log-normal."""
    cuts = np.sort(rng.choice(np.arange(1, seq_len), size=int(rng.integers(1, 5)), replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [seq_len]]))
    return [
        ",".join(str(int(x)) for x in lengths),
        f"fixed:{seq_len // 4}",
        f"uniform:16-{seq_len // 2}:seed={int(rng.integers(100))},quantum=8",
        f"lognormal:mean={seq_len // 5},sigma=1.1,seed={int(rng.integers(100))},quantum={2 * nranks}",
    ]


def shapes(seed: int = RNG_SEED):
    """Random packed shapes at P = 1..4 over every layout that takes documents, causal or not, with and without a
    window; only those config.validate accepts."""
    rng = np.random.default_rng(seed)
    for nranks in (1, 2, 3, 4):
        seq_len = 2 * nranks * int(rng.integers(5, 14))
        for spec, lay, causal in itertools.product(random_specs(rng, nranks, seq_len), layout.DOC_LAYOUTS, (True, False)):
            for window in (0, int(rng.integers(1, seq_len))) if causal else (0,):
                sh = Shape(nranks=nranks, seq_len=seq_len, heads=4, kv_heads=2, causal=causal, layout=lay, docs=spec, window=window)
                if not validate(sh.to_config(), nranks):
                    yield sh


def test_the_models_pairs_come_from_the_mask():
    """On random specs the model's per-step pairs are layout.plan_pairs (the plans the ring runs), their sum the
    mask's count, and what every strategy computes sums to the same count; the step classes are left alone."""
    seen = 0
    for sh in shapes():
        docs = doc_lengths(sh.docs, sh.seq_len)
        want = layout.plan_pairs(sh.layout, sh.nranks, sh.seq_len, sh.causal, docs, sh.window)
        got = model.step_pairs(sh)
        assert not model.classed(sh) and np.array_equal(got, want), sh
        assert np.array_equal(model.busiest_pairs(sh), want.max(axis=0)), sh
        total = layout.unmasked_pairs(sh.layout, sh.nranks, sh.seq_len, sh.causal, docs, sh.window)
        assert got.sum() == total, sh
        for mode in ("pass-q", "ulysses") + (("hybrid",) if sh.nranks == 4 else ()):
            pairs = model.strategy_pairs(sh.with_(mode=mode, ulysses_degree=2 if mode == "hybrid" else 1))
            assert pairs.sum() == pytest.approx(total, rel=1e-12), (sh, mode)
        uly = model.strategy_pairs(sh.with_(mode="ulysses")).sum(axis=1)  # every rank: its heads of the whole mask
        assert np.allclose(uly, total / sh.nranks), sh
        assert measure.ratio_imbalance(got.sum(axis=1)) == pytest.approx(layout.imbalance(want)), sh
        seen += 1
    assert seen > 100


def test_the_step_classes_and_every_plan_agree_on_the_old_mask(monkeypatch):
    """Without documents the model keeps its O(P) step classes; forcing it through every (rank, source) plan gives the
    same prediction (per rank, per step) for every mode and pass, with per-piece and with fitted rates."""
    fitted = Calibration.simple(1e11, 2e-6, 1e10, bwd_rate=5e10)
    probe = Calibration(
        rates={1: [(1e6, 5e10), (1e8, 1e11)]},
        links={1: (2e-6, 1e10)},
        diag_rates={1: [(1e6, 2e10), (1e8, 6e10)]},
        bwd_rates={1: [(1e6, 2e10), (1e8, 5e10)]},
        bwd_diag_rates={1: [(1e6, 1e10), (1e8, 4e10)]},
        copy_bw={1: 2e10},
    )
    cases = itertools.product(
        (fitted, probe), ("contiguous", "zigzag", "striped"), (2, 4), ("overlap", "allgather", "ulysses", "hybrid", "pass-q")
    )
    for cal, lay, nranks, mode in cases:
        sh = Shape(nranks=nranks, seq_len=nranks * 2 * 40, heads=4, kv_heads=2, layout=lay, mode=mode, causal=True, pass_="fwd+bwd")
        sh = sh.with_(ulysses_degree=2 if mode == "hybrid" else 1)
        assert model.classed(sh)
        want = model.predict(sh, cal)
        with monkeypatch.context() as m:
            m.setattr(model, "classed", lambda s: False)
            got = model.predict(sh, cal)
            pairs = model.strategy_pairs(sh)
        assert np.allclose(got.compute_s, want.compute_s, rtol=1e-12) and got.time_s == pytest.approx(want.time_s, rel=1e-12), sh
        assert np.array_equal(pairs, model.strategy_pairs(sh)), sh


def test_small_pieces_cost_their_call_overhead():
    """Below the probe's smallest block a piece's time follows the line through the two smallest points (a call's
    fixed cost c), so many small pieces cost about c each, far more than their FLOPs at the table's rates."""
    c, rate = 1e-4, 1e11  # 0.1 ms per call, then 100 GFLOP/s
    pts = [(f, f / (c + f / rate)) for f in (1e7, 1e8, 1e9)]
    diag = [(f, f / 2 / (c + f / 2 / rate)) for f in (1e7, 1e8, 1e9)]  # a probe's: the causal square's own FLOPs / its time
    cal = Calibration(rates={1: pts}, links={1: (0.0, 1e12)}, diag_rates={1: diag}, bwd_rates={1: pts}, bwd_diag_rates={1: diag})
    tiny = 1e5  # far below the table
    assert cal.piece_rate(tiny, 1, masked=False) == pytest.approx(tiny / (c + tiny / rate))
    assert cal.piece_rate(5e8, 1, masked=True) == pytest.approx(float(np.interp(np.log(5e8), np.log([1e8, 1e9]), [diag[1][1], diag[2][1]])))
    one = Shape(nranks=2, seq_len=4096, heads=1, head_dim=16, causal=True, layout="contiguous", mode="overlap")
    many = one.with_(docs="fixed:64")
    t_many = model.predict(many, cal).time_s
    pieces = len(model.piece_table(many).pairs)
    work = model.flops(1, 1, 16, model.step_pairs(many).sum(axis=0).max()) / rate  # the busiest rank's FLOPs alone
    assert pieces >= 64 and t_many >= 0.9 * pieces / 2 * c > 10 * work  # half the pieces on each rank, each about c
    assert model.predict(one, cal).time_s == pytest.approx(model.predict(one, Calibration.simple(1e11, 0.0, 1e12)).time_s, rel=0.1)


def test_summary_balance_figures():
    """pairs_imbalance: max / mean of the stored pairs' per-rank sums; compute_imbalance: of the summed compute_s, the
    median over repeats; both 1.0 when perfect, and nan / absent where a run stored no pairs."""
    compute = np.array([[[1.0, 1.0], [3.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [2.0, 2.0]]])  # (R, P, S)
    samples = {"total_s": compute.sum(axis=2), "compute_s": compute, "comm_s": 0 * compute, "pairs": np.array([[3.0, 0.0], [1.0, 0.0]])}
    s = measure.summarize(samples, flops=1.0, bytes_per_rank=0, unmasked_pairs=4)
    assert s["pairs_imbalance"] == pytest.approx(1.5)
    assert s["compute_imbalance"] == pytest.approx(np.median([4 / 3, 1.0, 4 / 3]))
    del samples["pairs"]
    assert np.isnan(measure.summarize(samples, flops=1.0, bytes_per_rank=0, unmasked_pairs=4)["pairs_imbalance"])
    assert measure.ratio_imbalance([0.0, 0.0]) == 1.0


def test_packed_advice_names_a_strategy_and_a_layout():
    cal = Calibration.simple(1e11, 2e-6, 1e10)
    base = Shape(nranks=1, seq_len=1, heads=8, kv_heads=2, causal=True, docs="lognormal:mean=700,sigma=1.3,seed=4")
    text = advise.format_advice(base, [8192], [2, 4], cal)
    winners = [line for line in text.splitlines() if line.strip().startswith("winner:")]
    assert len(winners) == 2, text
    for line in winners:
        assert " with layout " in line and line.split(" with layout ")[1].split(",")[0] in layout.DOC_LAYOUTS, line
    assert "ring pairs imbalance" in text and "nan" not in text
    # the balanced layout is within 10% of perfect on this long tail, where global zigzag is not
    sh = base.with_(seq_len=8192, nranks=4)
    assert advise.layout_balance(sh.with_(layout="balanced")) < 1.1 < advise.layout_balance(sh.with_(layout="zigzag"))


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    """A result file holding one 2-rank probe with per-piece rates, written without MPI (as test_advise.py's)."""
    path = tmp_path_factory.mktemp("probe") / "probe.h5"
    flops = np.array([1e6, 1e8, 1e10])

    def seconds(work, rate):
        return np.ones((3, 2, 2)) * (1e-5 + work / rate)[:, None, None]  # 10 us per call

    samples = {"block_flops": flops, "compute_s": seconds(flops, 5e10), "bwd_block_flops": 2.5 * flops}
    samples.update(bwd_compute_s=seconds(2.5 * flops, 4e10), causal_flops=flops / 2, causal_compute_s=seconds(flops / 2, 3e10))
    samples["bwd_causal_compute_s"] = seconds(2.5 * flops / 2, 2e10)
    probe = store.Probe(
        nranks=2,
        config={"dtype": "float32"},
        provenance={"hosts": ["h"]},
        samples=samples,
        summary={"latency_s": 3e-6, "bandwidth_Bps": 1e10, "copy_Bps": 2e10},
        created_utc="2026-12-01T00:00:00+00:00",
        name="probe-P2",
    )
    store.append_probe(path, probe)
    return path


def one_line_exit_2(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-300:], res.stderr[-300:])
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and not res.stdout, res.stderr
    return res.stderr


def test_advise_docs_by_cli(probe_file):
    """`advise --docs` names a strategy and a layout; a spec that does not hold, a window of 0, a layout that cannot cut
    the documents (given by --layout), too many ranks: one line naming the option and the rule, exit 2."""
    common = ("advise", "--probe", probe_file, "--heads", 4, "--causal", "--seq-len", 4096, "--ranks", "2,4")
    ok = ringbench(*common, "--docs", "lognormal:mean=600,sigma=1.2,seed=2", "--window", 512, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("winner: ") == 2 and " with layout " in ok.stdout and "window 512" in ok.stdout, ok.stdout
    preset = ("advise", "--machine", "h100-sxm5-8x", "--heads", 32, "--kv-heads", 8, "--head-dim", 128, "--dtype", "bfloat16")
    gpu = ringbench(*preset, "--causal", "--seq-len", 131072, "--ranks", 8, "--docs", "lognormal:mean=8192,sigma=1.2,seed=1", timeout=120)
    assert gpu.returncode == 0 and "winner: " in gpu.stdout and "machine preset h100-sxm5-8x" in gpu.stdout, gpu.stderr
    listed = ringbench(*common, "--docs", "2044,2052", timeout=120)  # doc-zigzag cannot cut 2044 into 8: listed as refused
    assert listed.returncode == 0 and "refused: doc-zigzag: --docs: layout doc-zigzag cuts every document" in listed.stdout, listed.stdout
    cases = [
        (("--docs", "4000,1000"), "--docs: the document lengths sum to 5000"),
        (("--docs", "0,4096"), "--docs:"),
        (("--docs", "zipf:3"), "--docs:"),
        (("--window", 0), "--window: must be >= 1"),
        (("--docs", "2044,2052", "--layout", "doc-zigzag"), "document 0 has 2044 tokens, not a multiple of 8"),
        (("--docs", "fixed:64", "--layout", "striped"), "layout striped takes no documents or window"),
    ]
    for extra, want in cases:
        assert want in one_line_exit_2(ringbench(*common, *extra, timeout=60)), extra
    over = ringbench("advise", "--probe", probe_file, "--causal", "--seq-len", 65536, "--ranks", 128, "--docs", "fixed:512", timeout=60)
    assert f"--ranks: at most {advise.MAX_PACKED_RANKS} ranks with --docs" in one_line_exit_2(over)
    over = ringbench("advise", "--probe", probe_file, "--causal", "--seq-len", 65536, "--ranks", 128, "--layout", "balanced", timeout=60)
    assert f"--ranks: at most {advise.MAX_PACKED_RANKS} ranks with --layout balanced" in one_line_exit_2(over)
    one = ringbench("advise", "--probe", probe_file, "--causal", "--seq-len", 4096, "--ranks", 4, "--layout", "balanced", timeout=60)
    assert one.returncode == 0 and "one document" in one.stdout and "winner: " in one.stdout and "with layout balanced" in one.stdout


@pytest.fixture(scope="module")
def packed_results(tmp_path_factory):
    """A real result file of packed runs: a long-tailed spec over four layouts and three strategies at P = 2, and a
    window, in two launches."""
    path = tmp_path_factory.mktemp("packed") / "packed.h5"
    common = ["--seq-len", 512, "--heads", 2, "--head-dim", 16, "--causal", "--repeat", 3, "--warmup", 1, "--quiet", "--out", path]
    docs = ["--docs", "lognormal:mean=96,sigma=1.2,seed=5,quantum=16"]
    runs = [(2, [*common, *docs, "--layout", lay, "--mode", mode]) for lay in ("zigzag", "balanced") for mode in ("overlap", "ulysses")]
    runs += [(2, [*common, *docs, "--layout", "doc-zigzag"]), (2, [*common, "--window", 64, "--layout", "contiguous"])]
    append_runs(runs)
    return path


@pytest.mark.mpi
def test_runs_store_the_plans_pairs_and_the_balance(packed_results):
    runs = store.read(packed_results)
    assert len(runs) == 6
    for run in runs:
        sh = Shape.from_config(run.config, run.nranks)
        pairs = run.samples["pairs"]
        assert np.array_equal(pairs, model.strategy_pairs(sh)), run.name
        assert run.summary["pairs_imbalance"] == pytest.approx(measure.ratio_imbalance(pairs.sum(axis=1)))
        assert run.summary["compute_imbalance"] >= 1.0 and run.summary["unmasked_pairs"] == pytest.approx(pairs.sum())
        if run.config["mode"] == "ulysses":
            assert run.summary["pairs_imbalance"] == pytest.approx(1.0)
    rows = {(r["layout"], r["mode"], r["docs"], r["window"]): r for r in results.rows(runs)}
    assert rows[("balanced", "overlap", runs[0].config["docs"], 0)]["pairs_imbalance"] < 1.1
    assert rows[("contiguous", "overlap", "", 64)]["window"] == 64


@pytest.mark.mpi
def test_report_and_plot_show_the_balance(packed_results, tmp_path):
    rep = ringbench("report", packed_results, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "balance" in rep.stdout and "docs=lognormal:mean=96" in rep.stdout and "window=64" in rep.stdout, rep.stdout
    runs = store.read(packed_results)
    zig = next(r for r in runs if r.config["layout"] == "zigzag" and r.config["mode"] == "overlap")
    assert f"{zig.summary['pairs_imbalance']:.2f}/{zig.summary['compute_imbalance']:.2f}" in rep.stdout
    res = ringbench("plot", packed_results, "-o", tmp_path, timeout=180)  # documents in the file: drawn by default
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "packed.png").stat().st_size > 5000 and (tmp_path / "packed.pdf").exists()
    pytest.importorskip("matplotlib")
    from ringbench.analysis import plot

    fig = plot.packed_figure(runs)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "docs lognormal:mean=96" in titles and "window 64" in titles and "N=512 P=2" in titles
