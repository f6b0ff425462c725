"""ringbench probe under mpiexec writes /probes/<name>; the model picks it up; link phases are disjoint."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ringbench import store
from ringbench.analysis import inference, model
from ringbench.engine.backend import get_backend
from ringbench.harness import probe as probe_mod

from conftest import mpiexec, ringbench

SMALL = ["--heads", 2, "--head-dim", 16, "--block-sizes", "32,64", "--repeat", 2, "--max-bytes", 65536, "--iters", 3]


@pytest.mark.parametrize("nranks", [3, 4, 5, 8])
def test_link_phases_cover_the_ring_with_disjoint_pairs(nranks):
    phases = probe_mod.link_phases(nranks)
    links = [lk for ph in phases for lk in ph]
    assert sorted(links) == sorted((r, (r + 1) % nranks) for r in range(nranks))
    for ph in phases:
        ranks = [r for lk in ph for r in lk]
        assert len(ranks) == len(set(ranks))
    assert len(phases) == (2 if nranks % 2 == 0 else 3)


def test_link_phases_small():
    assert probe_mod.link_phases(1) == []
    assert probe_mod.link_phases(2) == [[(0, 1)]]  # one link: 0 -> 1 and 1 -> 0 are the same pair


def test_message_sizes():
    assert probe_mod.message_sizes(65536) == [8, 1024, 4096, 16384, 65536]
    assert probe_mod.message_sizes(5000) == [8, 1024, 4096, 5000]


@pytest.mark.mpi
def test_probe_two_ranks_writes_its_group(tmp_path):
    out = tmp_path / "p.h5"
    res = mpiexec(2, "probe", "--out", out, *SMALL)
    assert res.returncode == 0, res.stderr
    assert "link 0->1: latency" in res.stdout and f"saved {out}:/probes/probe-P2-float32" in res.stdout
    (p,) = store.read_probes(out)
    assert p.nranks == 2 and p.name == "probe-P2-float32"
    s = p.samples
    assert s["block_tokens"].tolist() == [32, 64]
    assert s["block_flops"].tolist() == [4 * 2 * 16 * 32 * 32, 4 * 2 * 16 * 64 * 64]
    assert s["compute_s"].shape == (2, 2, 2) and (s["compute_s"] > 0).all()
    assert s["msg_bytes"].tolist() == [8, 1024, 4096, 16384, 65536]
    assert s["links"].tolist() == [[0, 1]]
    assert s["pingpong_s"].shape == (1, 5, 3) and (s["pingpong_s"] > 0).all()
    assert p.summary["rate_flops"] > 0 and p.summary["bandwidth_Bps"] > 0 and p.summary["latency_s"] >= 0
    # the backward kernel's rate beside the forward's: 2.5 x the FLOPs, its own times
    assert s["bwd_block_flops"].tolist() == [2.5 * f for f in s["block_flops"].tolist()]
    assert s["bwd_compute_s"].shape == (2, 2, 2) and (s["bwd_compute_s"] > 0).all()
    assert p.summary["bwd_rate_flops"] == pytest.approx(s["bwd_block_flops"][-1] / np.median(np.median(s["bwd_compute_s"][-1], axis=0)))
    assert "backward (dQ, dK, dV; FLOPs = 2.5 x forward): n=32 " in res.stdout
    # causal diagonal blocks (forward and backward) and the local copy rate: the model's per-piece and copy terms
    assert s["causal_flops"].tolist() == [4 * 2 * 16 * 32 * 33 // 2, 4 * 2 * 16 * 64 * 65 // 2]
    assert s["causal_compute_s"].shape == (2, 2, 2) and (s["causal_compute_s"] > 0).all()
    assert s["bwd_causal_compute_s"].shape == (2, 2, 2) and (s["bwd_causal_compute_s"] > 0).all()
    assert s["copy_s"].shape == (5, 2) and s["copy_bytes"].tolist() == [2 * 64 * 2 * 16 * 4]
    assert p.summary["copy_Bps"] == pytest.approx(s["copy_bytes"][0] / np.median(s["copy_s"].max(axis=1)))
    assert "causal diagonal block (unmasked pairs' FLOPs): n=32 " in res.stdout and "local copies" in res.stdout
    cal = model.calibrate_from_probes([p])
    assert cal.per_piece("fwd") and cal.per_piece("bwd") and cal.copy_bw[2] == p.summary["copy_Bps"]
    per_block = np.median(np.median(s["causal_compute_s"], axis=1), axis=1)
    assert cal.piece_rate(s["block_flops"][0], 2, masked=True) == pytest.approx(s["causal_flops"][0] / per_block[0])
    assert cal.has_phase("bwd") and cal.rate(s["bwd_block_flops"][-1], 2, phase="bwd") == pytest.approx(p.summary["bwd_rate_flops"])
    assert p.provenance["backend"] == "numpy" and p.config["block_sizes"] == [32, 64]
    # schema 4: the skinny pieces (1, 8, 32 rows against every block size), forward and backward, and the model's fit
    assert s["piece_rows"].tolist() == [1, 8, 32] and s["piece_keys"].tolist() == [32, 64]
    assert p.config["piece_rows"] == [1, 8, 32] and p.config["piece_keys"] == [32, 64]
    for key in ("piece_compute_s", "bwd_piece_compute_s"):
        assert s[key].shape == (3, 2, 2, 2) and (s[key] > 0).all()
    assert s["merge_s"].shape == (3, 2, 2) and (s["merge_s"] > 0).all() and min(cal.merge_fits[2]) >= 0
    assert "skinny pieces, forward (q x k: us per call): 1x32 " in res.stdout and "per-call fit, backward: t = " in res.stdout
    q, k, t = model.probe_pieces(p)
    assert len(q) == 2 + 6 and (q[2:] <= 32).all() and t[0] == pytest.approx(np.median(np.median(s["compute_s"][0], axis=0)))
    assert set(cal.piece_fits) == set(cal.bwd_piece_fits) == {2} and cal.piece_fit(2).min_block == 32
    assert cal.piece_fit(2).heads == 2 and min(cal.piece_fit(2).c, cal.piece_fit(2).a, cal.piece_fit(2).b) >= 0
    w = dict(nranks=2, seq_len=4096, new_tokens=1, batch=1, heads=2, kv_heads=2, head_dim=16, dtype="float32", layout="contiguous")
    fitted = inference.decode_compute_s(w, cal)
    assert fitted == pytest.approx(max(float(cal.piece_fit(2).seconds(1, 2048, 1, 2, 2, 16)), cal.copy_seconds(2 * 2048 * 2 * 16 * 4, 2)))
    _old_probe_predicts_from_the_tables(out, tmp_path, w)
    assert store.read(out) == []  # a probe-only file has no runs
    # a second probe in the same file gets its own group
    res = mpiexec(2, "probe", "--out", out, "--quiet", *SMALL)
    assert res.returncode == 0 and res.stdout == ""
    assert [q.name for q in store.read_probes(out)] == ["probe-P2-float32", "probe-P2-float32~2"]


def _old_probe_predicts_from_the_tables(path, tmp_path, w):
    """A copy of probe file ``path`` as a schema-3 file (its probe without the skinny pieces) still reads, gets no
    per-call fit, and prices decode's 1 x n piece from the square tables as before schema 4."""
    import shutil

    import h5py

    old = tmp_path / "old.h5"
    shutil.copyfile(path, old)
    with h5py.File(old, "a") as f:
        f.attrs["schema_version"] = 3
        for g in f["probes"].values():
            for key in ("piece_rows", "piece_keys", "piece_compute_s", "bwd_piece_compute_s", "merge_s"):
                del g["samples"][key]
    assert store.check_file(old) == 3
    (p,) = store.read_probes(old)[:1]
    cal = model.calibrate([], [p])
    assert cal.per_piece("fwd") and cal.piece_fits == {} and cal.bwd_piece_fits == {} and cal.merge_fits == {}
    rect = 4 * 2 * 16 * 2048  # 1 query per head against N / P = 2048 keys: B H D FLOPs per pair
    table = max(rect / cal.piece_rate(rect, 2, masked=False), cal.copy_seconds(2 * 2048 * 2 * 16 * 4, 2))
    assert inference.decode_compute_s(w, cal) == pytest.approx(table)
    assert "skinny pieces" not in probe_mod.format_probe(p, "here")


@pytest.mark.mpi
def test_model_uses_the_probe_in_the_same_file(small_results, tmp_path):
    import shutil

    path = tmp_path / "both.h5"
    shutil.copyfile(small_results, path)
    res = mpiexec(2, "probe", "--out", path, "--name", "here", *SMALL)
    assert res.returncode == 0, res.stderr
    assert len(store.read(path)) == 6  # the runs are untouched
    rep = ringbench("report", path)
    assert rep.returncode == 0, rep.stderr
    assert f"calibration: probe {path}:/probes/here" in rep.stdout
    assert "in-sample" not in rep.stdout
    # --probe from another file
    rep = ringbench("report", small_results, "--probe", path)
    assert rep.returncode == 0 and f"calibration: probe {path}:/probes/here" in rep.stdout


@pytest.mark.mpi
def test_probe_one_rank_measures_compute_only(tmp_path):
    out = tmp_path / "p1.h5"
    res = mpiexec(1, "probe", "--out", out, *SMALL)
    assert res.returncode == 0, res.stderr
    (p,) = store.read_probes(out)
    assert p.samples["pingpong_s"].shape[0] == 0 and np.isnan(p.summary["bandwidth_Bps"])
    assert p.samples["bwd_compute_s"].shape == (2, 2, 1) and p.summary["bwd_rate_flops"] > 0
    assert p.samples["piece_compute_s"].shape == p.samples["bwd_piece_compute_s"].shape == (3, 2, 2, 1)
    cal = model.calibrate_from_probes([p])
    assert cal.rate(p.samples["bwd_block_flops"][0], 1, phase="bwd") > 0 and not cal.links
    assert "one rank, nothing to measure" in res.stdout


@pytest.mark.mpi
def test_probe_user_errors(tmp_path):
    res = ringbench("probe")
    assert res.returncode == 2 and res.stderr.strip() == "ringbench probe: the following arguments are required: --out"
    res = mpiexec(2, "probe", "--out", tmp_path / "no" / "p.h5", *SMALL)
    assert res.returncode == 2
    assert (
        res.stderr.strip() == f"ringbench probe: --out: cannot write {tmp_path / 'no' / 'p.h5'}: directory {tmp_path / 'no'} does not exist"
    )
    res = ringbench("probe", "--out", tmp_path / "p.h5", "--block-sizes", "32,x")
    assert res.returncode == 2 and "--block-sizes" in res.stderr and "positive integers" in res.stderr
    res = ringbench("probe", "--out", tmp_path / "p.h5", "--heads", 4, "--kv-heads", 3)
    assert res.returncode == 2 and "--kv-heads: must divide --heads=4" in res.stderr


@pytest.mark.parametrize("name", ["a/b", "../../x", "", ".hidden", "x" * 65])
def test_probe_name_must_be_a_group_name(tmp_path, name):
    res = ringbench("probe", "--out", tmp_path / "p.h5", "--name", name, *SMALL)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"ringbench probe: --name: expected a name of letters, digits, _ . - (at most 64, not starting with . - _), got {name!r}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, line",
    [
        (["--block-sizes", "64,99999999999"], "--block-sizes: expected an integer <= 4294967296 (2^32), got 99999999999"),
        (["--max-bytes", 99999999999], "--max-bytes: expected an integer from 1 to 4294967296, got 99999999999"),
        (["--iters", 10**6], "--iters: expected an integer from 1 to 100000, got 1000000"),
        (["--repeat", 10**6], "--repeat: expected an integer <= 100000, got 1000000"),
        (["--head-dim", 10**6], "--head-dim: expected an integer <= 65536 (2^16), got 1000000"),
    ],
)
def test_probe_options_are_bounded_as_run_bounds_them(tmp_path, args, line):
    res = ringbench("probe", "--out", tmp_path / "p.h5", *args)
    assert res.returncode == 2 and res.stderr.strip() == f"ringbench probe: {line}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.mpi
def test_probe_that_cannot_fit_in_memory_is_refused_before_it_allocates(tmp_path):
    res = mpiexec(2, "probe", "--out", tmp_path / "p.h5", "--block-sizes", 2**32, "--iters", 1, "--repeat", 1)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("ringbench probe: --block-sizes: the probe needs about ") and " TiB of host memory per rank (estimate; " in line
    assert line.endswith("; use smaller --block-sizes (or --batch, --heads, --head-dim, --max-bytes)")
    assert list(tmp_path.iterdir()) == []
    est, _ = probe_mod.memory_estimate(probe_mod.ProbeOptions(block_sizes=(2**32,)), get_backend("numpy"))
    small, _ = probe_mod.memory_estimate(probe_mod.ProbeOptions(), get_backend("numpy"))
    assert est > 2**40 and small < 2**30


@pytest.mark.slow
@pytest.mark.mpi
def test_report_plot_and_advise_skip_a_group_they_cannot_parse(small_results, tmp_path):
    """A file where an older ringbench stored ``probe --name a/b`` as nested groups, and a run group without attributes."""
    import shutil

    import h5py

    path = tmp_path / "both.h5"
    shutil.copyfile(small_results, path)
    res = mpiexec(2, "probe", "--out", path, "--name", "here", "--quiet", *SMALL)
    assert res.returncode == 0, res.stderr
    with h5py.File(path, "r+") as f:
        f.copy(f["probes/here"], f["probes"].create_group("a"), name="b")
        f["runs"].create_group("junk")
    warn = [
        f"ringbench: warning: {path}: /runs/junk: skipped, not a readable run (no attribute 'point_id')",
        f"ringbench: warning: {path}: /probes/a: skipped, not a readable probe (no attribute 'nranks')",
    ]
    rep = ringbench("report", path)
    assert rep.returncode == 0, rep.stderr
    assert rep.stderr.splitlines() == warn and f"calibration: probe {path}:/probes/here" in rep.stdout
    adv = ringbench("advise", path, "--seq-len", 4096, "--ranks", 2)
    assert adv.returncode == 0 and adv.stderr.splitlines() == warn and "winner" in adv.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        plot = ringbench("plot", path, "-o", tmp_path / "fig", "--only", "strong,model")
        # (a probe measured on a busy machine adds its own warning line: not what this test is about)
        lines = [ln for ln in plot.stderr.splitlines() if "measured on a loaded machine" not in ln]
        assert plot.returncode == 0 and lines == warn, plot.stderr


@pytest.mark.slow
@pytest.mark.mpi
def test_probe_records_its_conditions_and_report_plot_advise_warn_of_a_loaded_one(small_results, tmp_path):
    """A probe records how busy its host was (load average at start and end, cores busy with other work) and how
    much its repeats spread (provenance "conditions"). A calibration from a probe taken on a loaded machine makes
    report, plot and advise say so in one line; a quiet one, or an old probe without conditions (which still
    reads and calibrates), makes them say nothing."""
    import copy
    import dataclasses

    made = tmp_path / "made.h5"
    res = mpiexec(2, "probe", "--out", made, *SMALL)
    assert res.returncode == 0, res.stderr
    (p,) = store.read_probes(made)
    cond = p.provenance["conditions"]
    (host,) = cond["hosts"].values()
    assert host["ranks"] == 2 and host["cpus"] >= 1 and host["seconds"] > 0 and host["own_cpus"] > 0
    assert len(host["load_start"]) == 4 and len(host["load_end"]) == 4 and host["other_cpus"] >= 0
    assert set(cond["spread"]) == {"compute", "causal", "bwd_compute", "bwd_causal", "copy"}
    assert "\n  conditions: " in res.stdout
    runs = store.read(small_results)
    for kind, other in (("quiet", 0.0), ("loaded", 1.9), ("old", None)):
        path = tmp_path / f"{kind}.h5"
        for run in runs:  # runs as written before conditions were recorded: only the probe's decide
            prov = {k: v for k, v in run.provenance.items() if k != "conditions"}
            store.append(path, dataclasses.replace(run, provenance=prov))
        prov = copy.deepcopy(p.provenance)
        if other is None:
            del prov["conditions"]  # a probe written before conditions were recorded
        else:
            for h in prov["conditions"]["hosts"].values():
                h.update(cpus=2, own_cpus=2.0, busy_cpus=2.0 + other, other_cpus=other)
            prov["conditions"]["spread"] = dict.fromkeys(prov["conditions"]["spread"], 1.1)
        store.append_probe(path, dataclasses.replace(p, provenance=prov, name="here"))
        rep = ringbench("report", path)
        adv = ringbench("advise", path, "--seq-len", 4096, "--ranks", 2)
        plot = ringbench("plot", path, "-o", tmp_path / kind, "--only", "model")
        for res in (rep, adv, plot):
            assert res.returncode == 0, res.stderr
        assert f"calibration: probe {path}:/probes/here" in rep.stdout
        warning = "warning: the model's calibration was measured on a loaded machine"
        said = [out.count(warning) for out in (rep.stdout, adv.stdout, plot.stderr)]
        assert said == ([1, 1, 1] if kind == "loaded" else [0, 0, 0]), (kind, said)
        if kind == "loaded":
            assert "other work kept 1.9 of 2 cores" in adv.stdout


def test_class_pairs_and_the_machine_yaml(tmp_path):
    """The pairs that measure each link class, and the machine description written from their fits (read back by
    advise.load_machine); a probe without both classes writes none."""
    from ringbench import store
    from ringbench.analysis import advise
    from ringbench.harness import probe

    assert probe.class_pairs([0, 1, 0, 1]) == [(0, 2, probe.INTRA), (0, 1, probe.INTER)]
    assert probe.class_pairs([0, 0, 0]) == [(0, 1, probe.INTRA)]
    assert probe.class_pairs([0, 1]) == [(0, 1, probe.INTER)]
    assert probe.a2a_sizes(1 << 20, 2) == [1024, 4096, 16384, 65536, 262144, 524288]
    s = {"nodes": 2, "ranks_per_node": 2, "intra_latency_s": 2.5e-6, "intra_bandwidth_Bps": 8e9}
    pr = store.Probe(nranks=4, config={}, provenance={"nodes": {"hosts": ["a", "b"]}}, summary=s, name="p4")
    assert probe.machine_yaml(pr) is None
    s.update(inter_latency_s=4e-4, inter_bandwidth_Bps=5e7)
    path = tmp_path / "m.yaml"
    path.write_text(probe.machine_yaml(pr))
    m = advise.load_machine(path)
    assert m.ranks_per_node == 2 and m.source == "p4"
    assert m.intra == pytest.approx((2.5e-6, 8e9)) and m.inter == pytest.approx((4e-4, 5e7))


@pytest.mark.mpi
def test_probe_times_the_kernel_asked_for_and_refuses_one_that_cannot_run(tmp_path):
    """``--kernel torch`` times torch's fused forward and backward (on the CPU both exist), says so and stores it;
    ``--kernel flash-attn`` on the CPU is one line and exit 2, before anything is measured; the default is native.
    (On a GPU, ``probe --backend cupy --kernel flash-attn`` times flash-attn's forward and the native backward.)"""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install -e '.[torch]')")
    out = tmp_path / "p.h5"
    res = mpiexec(2, "probe", "--out", out, "--kernel", "torch", "--name", "t", *SMALL)
    assert res.returncode == 0, res.stderr
    assert ", kernel torch): n=32 " in res.stdout
    (p,) = store.read_probes(out)
    assert p.config["kernel"] == "torch" and p.config["bwd_kernel"] == "torch"
    for key in ("compute_s", "causal_compute_s", "bwd_compute_s", "bwd_causal_compute_s"):
        assert (p.samples[key] > 0).all(), key
    assert p.summary["rate_flops"] > 0 and p.summary["bwd_rate_flops"] > 0
    bad = mpiexec(2, "probe", "--out", tmp_path / "q.h5", "--kernel", "flash-attn", *SMALL)
    assert bad.returncode == 2 and not (tmp_path / "q.h5").exists()
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("ringbench probe: --kernel flash-attn runs on CUDA GPUs only"), bad.stderr


def test_the_probes_backward_kernel_is_the_asked_one_where_ringbench_runs_its_backward():
    cpu = get_backend("numpy")
    assert probe_mod.bwd_kernel(probe_mod.ProbeOptions(), cpu) == "native"
    if importlib.util.find_spec("torch") is not None:
        assert probe_mod.bwd_kernel(probe_mod.ProbeOptions(kernel="torch"), cpu) == "torch"
