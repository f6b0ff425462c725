"""The HDF5 result file: round trip, never overwrite, crash-safe append, schema refusal."""

import json
import multiprocessing as mp

import h5py
import numpy as np
import pytest

from ringbench import store


def make_run(pid="p1", value=1.0):
    return store.Run(
        point_id=pid,
        nranks=2,
        config={"seq_len": 8, "kv_heads": 2},
        provenance={"hosts": ["h"]},
        samples={"total_s": np.full((3, 2), value)},
        summary={"time_s": value},
        memory={"peak_rss_bytes": np.array([1, 2]), "theoretical_bytes": 5},
        check={"passed": True, "rel_err": 1e-7},
        created_utc="2026-01-01T00:00:00+00:00",
    )


def test_round_trip(tmp_path):
    path = tmp_path / "r.h5"
    assert store.append(path, make_run()) == "p1"
    (run,) = store.read(path)
    assert run.point_id == "p1" and run.nranks == 2 and run.status == "ok"
    assert run.config == {"seq_len": 8, "kv_heads": 2}
    np.testing.assert_array_equal(run.samples["total_s"], np.ones((3, 2)))
    assert run.summary["time_s"] == 1.0 and run.check["passed"] is True
    assert run.memory["theoretical_bytes"] == 5
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == 1 and f.attrs["format"] == "ringbench-results"
        assert json.loads(f["runs/p1"].attrs["provenance"]) == {"hosts": ["h"]}


def test_same_point_twice_is_kept_not_overwritten(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run(value=1.0))
    assert store.append(path, make_run(value=2.0)) == "p1~2"
    assert store.append(path, make_run(value=3.0)) == "p1~3"
    assert [r.summary["time_s"] for r in store.read(path)] == [1.0, 2.0, 3.0]
    assert store.point_ids(path) == {"p1"}


def test_crash_mid_write_leaves_earlier_runs_readable(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    before = path.read_bytes()

    def explode(group, run):
        group.attrs["point_id"] = run.point_id
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store, "_write_run", explode)
    with pytest.raises(KeyboardInterrupt):
        store.append(path, make_run("b"))
    assert path.read_bytes() == before
    assert [r.point_id for r in store.read(path)] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.h5.lock"]  # no temporary left


def _append_many(path, tag):
    for i in range(5):
        store.append(path, make_run(f"{tag}{i}"))


def test_concurrent_writers_take_turns(tmp_path):
    path = tmp_path / "r.h5"
    procs = [mp.get_context("spawn").Process(target=_append_many, args=(path, t)) for t in "xy"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert store.point_ids(path) == {f"{t}{i}" for t in "xy" for i in range(5)}


def test_other_files_are_refused(tmp_path):
    bad = tmp_path / "old.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "ringbench-results"
        f.attrs["schema_version"] = 0
    with pytest.raises(store.SchemaError, match="schema version 0 is not supported; this ringbench reads version 1"):
        store.read(bad)
    assert "schema version 0" in store.check_writable(bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(store.SchemaError, match="not an HDF5 file"):
        store.read(text)
    assert store.check_writable(tmp_path / "missing" / "r.h5") == f"directory {tmp_path / 'missing'} does not exist"
