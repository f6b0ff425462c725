"""The HDF5 result file: round trip, never overwrite, crash-safe append, schema refusal."""

import errno
import fcntl
import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ringbench import SCHEMA_VERSION, store

from conftest import child_env, mpiexec, ringbench, write_v1


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
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 5 and f.attrs["format"] == "ringbench-results"
        assert json.loads(f["runs/p1"].attrs["provenance"]) == {"hosts": ["h"]}
        assert f["runs/p1"].attrs["run_id"] == run.run_id
    assert len(run.run_id) == 32 and run.run_id != make_run().run_id  # every run gets its own id


def test_chunks_per_rank_round_trips_and_version_4_files_read_it_as_absent(tmp_path):
    """Schema 5's run attribute: a balanced run's chunks per rank is written, read back (read, latest, merge); a run
    without one (another layout) has no attribute and reads 0, as does every run of a version-4 file, which an
    append upgrades in place to 5."""
    path = tmp_path / "r.h5"
    bal = make_run("bal")
    bal.chunks_per_rank = 4
    store.append(path, bal)
    store.append(path, make_run("other"))
    got = {r.point_id: r for r in store.read(path)}
    assert got["bal"].chunks_per_rank == 4 and got["other"].chunks_per_rank == 0
    assert store.latest(path)["bal"].chunks_per_rank == 4
    with h5py.File(path) as f:
        assert f["runs/bal"].attrs["chunks_per_rank"] == 4 and "chunks_per_rank" not in f["runs/other"].attrs
    merged = tmp_path / "m.h5"
    store.merge(merged, [path])
    assert {r.point_id: r.chunks_per_rank for r in store.read(merged)} == {"bal": 4, "other": 0}
    old = tmp_path / "v4.h5"
    store.append(old, make_run("old"))
    with h5py.File(old, "r+") as f:  # a version-4 file: no such attribute anywhere
        f.attrs["schema_version"] = 4
    assert store.check_file(old) == 4 and store.read(old)[0].chunks_per_rank == 0
    store.append(old, bal)
    assert store.check_file(old) == SCHEMA_VERSION == 5
    assert {r.point_id: r.chunks_per_rank for r in store.read(old)} == {"old": 0, "bal": 4}


def test_same_point_twice_is_kept_not_overwritten(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run(value=1.0))
    assert store.append(path, make_run(value=2.0)) == "p1~2"
    assert store.append(path, make_run(value=3.0)) == "p1~3"
    assert [r.summary["time_s"] for r in store.read(path)] == [1.0, 2.0, 3.0]
    assert {r.point_id for r in store.read(path) if r.status == "ok"} == {"p1"}


def test_crash_mid_write_leaves_earlier_runs_readable(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    before = path.read_bytes()

    def explode(group, run):
        group.attrs["point_id"] = run.point_id
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store, "write_run_group", explode)
    with pytest.raises(KeyboardInterrupt):
        store.append(path, make_run("b"))
    assert path.read_bytes() == before
    assert [r.point_id for r in store.read(path)] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]  # no temporary, journal or lock file left


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
    assert {r.point_id for r in store.read(path) if r.status == "ok"} == {f"{t}{i}" for t in "xy" for i in range(5)}


def test_other_files_are_refused(tmp_path):
    bad = tmp_path / "old.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "ringbench-results"
        f.attrs["schema_version"] = 0
    with pytest.raises(store.SchemaError, match="schema version 0 is not supported; this ringbench reads versions 1, 2, 3, 4 and 5"):
        store.read(bad)
    assert "schema version 0" in store.check_writable(bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(store.SchemaError, match="not an HDF5 file"):
        store.read(text)
    assert store.check_writable(tmp_path / "missing" / "r.h5") == f"directory {tmp_path / 'missing'} does not exist"


# ---------------------------------------------------------------------------------------------
# Run ids and merge
# ---------------------------------------------------------------------------------------------
def test_two_runs_of_one_point_in_the_same_second_both_survive_merge(tmp_path):
    a, b = make_run(value=1.0), make_run(value=2.0)  # same point, time, config and provenance
    store.append(tmp_path / "part1.h5", a)
    store.append(tmp_path / "part2.h5", b)
    dest = tmp_path / "all.h5"
    assert store.merge(dest, [tmp_path / "part1.h5", tmp_path / "part2.h5"]) == (2, 0)
    runs = store.read(dest)
    assert sorted(r.summary["time_s"] for r in runs) == [1.0, 2.0]
    assert {r.run_id for r in runs} == {a.run_id, b.run_id}
    before = dest.read_bytes()
    assert store.merge(dest, [tmp_path / "part1.h5", tmp_path / "part2.h5"]) == (0, 2)  # merge twice: a no-op
    assert dest.read_bytes() == before


def _probe(value=1.0):
    return store.Probe(
        nranks=2,
        config={"dtype": "float32"},
        provenance={"hosts": ["h"]},
        samples={"msg_bytes": np.array([8, 64])},
        summary={"rate_flops": value},
        created_utc="2026-01-01T00:00:00+00:00",
        name="probe-P2",
    )


def test_merge_copies_probes_once(tmp_path):
    part = tmp_path / "part.h5"
    store.append(part, make_run())
    store.append_probe(part, _probe(1.0))
    store.append_probe(part, _probe(2.0))
    dest = tmp_path / "all.h5"
    assert store.merge(dest, [part]) == (1, 0)
    assert store.merge(dest, [part]) == (0, 1)
    probes = store.read_probes(dest)
    assert [p.summary["rate_flops"] for p in probes] == [1.0, 2.0]
    assert [p.probe_id for p in probes] == [p.probe_id for p in store.read_probes(part)]
    assert [p.name for p in probes] == ["probe-P2", "probe-P2~2"]


def test_merge_refuses_the_destination_as_a_source(tmp_path):
    dest = tmp_path / "all.h5"
    store.append(dest, make_run())
    (tmp_path / "link.h5").symlink_to(dest)
    with pytest.raises(store.MergeError, match="is the destination file"):
        store.merge(dest, [tmp_path / "link.h5"])


# ---------------------------------------------------------------------------------------------
# Schema version 1
# ---------------------------------------------------------------------------------------------
def test_version_1_file_is_read_with_stable_derived_ids(tmp_path):
    v1 = write_v1(tmp_path / "v1.h5")
    assert store.check_file(v1) == 1
    runs = store.read(v1)
    assert [r.summary["time_s"] for r in runs] == [0.0, 1.0]
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)  # same second, same point: still two runs
    assert [r.run_id for r in store.read(v1)] == ids
    assert store.latest(v1)["p1"].run_id == ids[1]
    (probe,) = store.read_probes(v1)
    assert probe.probe_id == store.read_probes(v1)[0].probe_id


def test_version_1_files_merge_idempotently(tmp_path):
    part = write_v1(tmp_path / "part.h5")
    old_collected = write_v1(tmp_path / "old.h5", names=("p1",), probe=False)  # what 0.1's collect kept: one of the two
    assert store.merge(old_collected, [part]) == (1, 1)  # the run 0.1 dropped is recovered, the other is present
    assert store.check_file(old_collected) == SCHEMA_VERSION  # upgraded in place
    assert sorted(r.summary["time_s"] for r in store.read(old_collected)) == [0.0, 1.0]
    assert store.merge(old_collected, [part]) == (0, 2)
    dest = tmp_path / "new.h5"
    assert store.merge(dest, [part]) == (2, 0)
    assert store.merge(dest, [part, old_collected]) == (0, 4)
    assert {r.run_id for r in store.read(dest)} == {r.run_id for r in store.read(part)}
    assert len(store.read_probes(dest)) == 1


def test_appending_to_a_version_1_file_upgrades_it_and_keeps_its_runs(tmp_path):
    v1 = write_v1(tmp_path / "v1.h5")
    ids = [r.run_id for r in store.read(v1)]
    assert store.append(v1, make_run()) == "p1~3"
    assert store.check_file(v1) == SCHEMA_VERSION
    runs = store.read(v1)
    assert [r.run_id for r in runs[:2]] == ids and runs[2].summary["time_s"] == 1.0
    np.testing.assert_array_equal(runs[1].samples["total_s"], np.ones((3, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.h5"]


# ---------------------------------------------------------------------------------------------
# Links, modes, read-only files
# ---------------------------------------------------------------------------------------------
def test_append_through_a_symbolic_link_writes_the_target(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "r.h5"
    store.append(target, make_run("a"))
    link = tmp_path / "link.h5"
    link.symlink_to(os.path.relpath(target, tmp_path))
    assert store.check_writable(link) is None
    store.append(link, make_run("b"))
    assert link.is_symlink() and link.resolve() == target
    assert [r.point_id for r in store.read(target)] == ["a", "b"]
    dangling = tmp_path / "new.h5"
    dangling.symlink_to(tmp_path / "data" / "new.h5")
    store.append(dangling, make_run("c"))
    assert dangling.is_symlink() and [r.point_id for r in store.read(tmp_path / "data" / "new.h5")] == ["c"]


@pytest.mark.parametrize("mode", [0o644, 0o664, 0o600])
def test_append_keeps_the_mode(tmp_path, mode):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    os.chmod(path, mode)
    store.append(path, make_run("b"))
    assert stat.S_IMODE(path.stat().st_mode) == mode
    store.merge(path, [_v2_part(tmp_path)])
    assert stat.S_IMODE(path.stat().st_mode) == mode


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_append_keeps_the_owner(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    os.chown(path, 4321, 4321)
    store.append(path, make_run("b"))
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321)
    assert [r.point_id for r in store.read(path)] == ["a", "b"]


def _v2_part(tmp_path):
    part = tmp_path / "part.h5"
    store.append(part, make_run("c"))
    return part


def test_a_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        store.append(tmp_path / "r.h5", make_run())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.h5").stat().st_mode) == 0o644


def test_a_read_only_file_is_refused(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    os.chmod(path, 0o444)
    before = path.read_bytes()
    assert store.check_writable(path).startswith("the file is read-only")
    with pytest.raises(PermissionError, match="read-only"):
        store.append(path, make_run("b"))
    with pytest.raises(store.MergeError, match="read-only"):
        store.merge(path, [_v2_part(tmp_path)])
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o444
    assert [r.point_id for r in store.read(path)] == ["a"]  # still readable


@pytest.mark.mpi
def test_run_out_to_a_read_only_file_is_one_line_exit_2(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    os.chmod(path, 0o444)
    res = mpiexec(1, "run", "--seq-len", 64, "--heads", 2, "--head-dim", 8, "--repeat", 1, "--warmup", 0, "--quiet", "--out", path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "read-only" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


# ---------------------------------------------------------------------------------------------
# Nothing left behind: failed appends, stale files, killed writers
# ---------------------------------------------------------------------------------------------
def unwritable_run():
    run = make_run("bad")
    run.samples = {"total_s": np.array(["not", "a", "number"])}  # fails inside the write
    return run


def test_a_failed_append_leaves_nothing_behind(tmp_path):
    path = tmp_path / "r.h5"
    with pytest.raises(ValueError):
        store.append(path, unwritable_run())  # a new file
    assert list(tmp_path.iterdir()) == []
    store.append(path, make_run("a"))
    before = path.read_bytes()
    with pytest.raises(ValueError):
        store.append(path, unwritable_run())  # an existing file
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
    assert store.append(path, make_run("b")) == "b"


def test_stale_temporaries_and_lock_files_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    for name in ("r.h5.k2j3h4.tmp", "r.h5.lock", "r.h5.x9.tmp"):
        (tmp_path / name).write_bytes(b"\0" * 1000)
    (tmp_path / "other.h5.abc.tmp").write_bytes(b"")  # another file's: not ours to remove
    busy = tmp_path / "r.h5.busy.tmp"  # a live writer's: locked
    busy.write_bytes(b"")
    with open(busy) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        store.append(path, make_run("b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.h5.abc.tmp", "r.h5", "r.h5.busy.tmp"]
    assert [r.point_id for r in store.read(path)] == ["a", "b"]


KILLED_WRITER = """
import sys, time
import numpy as np
from ringbench import SCHEMA_VERSION, store

path, stage, marker = sys.argv[1:4]
big = np.random.default_rng(0).standard_normal(1 << 23).astype(np.float32)  # 32 MiB, stored with gzip
run = store.Run(point_id="big", nranks=2, config={}, provenance={}, tensors={"q": big})


def pause():
    open(marker, "w").close()
    time.sleep(600)


if stage == "writing":  # HDF5 has written the run and flushed its metadata; nothing committed
    write_run = store.write_run_group

    def write_run_group(g, r):
        write_run(g, r)
        g.file.flush()
        pause()

    store.write_run_group = write_run_group
elif stage == "commit":  # the journal holds the pre-images and the new metadata overwrote the old: not yet fsynced
    apply = store.JournaledFile.apply

    def _apply(self):
        apply(self)
        pause()

    store.JournaledFile.apply = _apply
else:  # no hook: killed at whatever moment the test sees the file grow
    open(marker, "w").close()
store.append(path, run)
"""


@pytest.mark.parametrize("stage", ["writing", "commit", "anywhere"])
def test_a_killed_writer_leaves_earlier_runs_readable_and_nothing_behind(tmp_path, stage):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    store.append(path, make_run("b"))
    before = path.read_bytes()
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), stage, str(marker)], env=child_env())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or (stage == "anywhere" and path.stat().st_size <= len(before)):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before it could be killed"
            time.sleep(0.005)
        assert stage == "anywhere" or (tmp_path / "r.h5.journal").exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    if stage != "anywhere":
        assert path.stat().st_size > len(before)  # the writer got far
    names = [r.point_id for r in store.read(path)]  # the reader rolls the journal back
    assert names == ["a", "b"] or (stage == "anywhere" and names == ["a", "b", "big"])
    if names == ["a", "b"]:
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
    store.append(path, make_run("c"))
    assert [r.point_id for r in store.read(path)][-1] == "c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


def test_a_writer_rolls_back_a_dead_writers_journal(tmp_path):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    before = path.read_bytes()
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), "commit", str(marker)], env=child_env())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert path.read_bytes() != before  # torn: metadata overwritten, not rolled back yet
    assert store.append(path, make_run("b")) == "b"
    assert [r.point_id for r in store.read(path)] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


def test_a_short_journal_write_is_an_error_and_rolls_back(tmp_path, monkeypatch):
    """A journal write the kernel cuts short without an error (a signal, a size limit reached mid-write) cannot be
    produced on demand by a real file system (a full one gives ENOSPC: tests/store/test_disk_full.py), so ``os.write``
    is cut short here, for the journal only: the header (36 bytes), then the records (the pre-images, longer)."""
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    before = path.read_bytes()
    journal = tmp_path / "r.h5.journal"
    real_write = os.write
    for at_least in (1, 37):  # the header's write, then the records'

        def short_write(fd, data, at_least=at_least):
            if len(data) >= at_least and os.readlink(f"/proc/self/fd/{fd}") == str(journal):
                return real_write(fd, bytes(data)[: len(data) // 2])
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", short_write)
        with pytest.raises(OSError, match="short write") as err:
            store.append(path, make_run("b"))
        monkeypatch.undo()
        assert err.value.errno == errno.EIO and err.value.filename == str(journal)
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
    assert [r.point_id for r in store.read(path)] == ["a"]
    assert store.append(path, make_run("b")) == "b"


def test_readers_skip_groups_they_cannot_parse_with_a_one_line_warning(tmp_path, capsys):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    store.append_probe(path, _probe())
    with h5py.File(path, "r+") as f:
        f.copy(f["probes/probe-P2"], f["probes"].create_group("a"), name="b")  # what `probe --name a/b` wrote
        f["runs"].create_group("x").attrs["point_id"] = "x"  # no nranks, config, provenance
        f["runs"].create_dataset("y", data=[1, 2])
        f["runs"].create_group("z").attrs.update(point_id="z", nranks=2, config="{not json", provenance="{}")
    runs, probes, latest = store.read(path), store.read_probes(path), store.latest(path)
    assert [r.point_id for r in runs] == ["a"] and [p.name for p in probes] == ["probe-P2"] and list(latest) == ["a", "z"]
    err = capsys.readouterr().err.splitlines()
    prefix = f"ringbench: warning: {path}: "
    assert err[:4] == [
        prefix + "/runs/x: skipped, not a readable run (no attribute 'nranks')",
        prefix + "/runs/y: skipped, not a readable run (not a group)",
        prefix + "/runs/z: skipped, not a readable run (JSONDecodeError: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        prefix + "/probes/a: skipped, not a readable probe (no attribute 'nranks')",
    ]
    assert err[4:] == err[:2]  # latest() reads what it needs: z's config is not among it


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
@pytest.mark.mpi
def test_a_journal_path_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / "r.h5"
    store.append(path, make_run("a"))
    before = path.read_bytes()
    journal = tmp_path / "r.h5.journal"
    {"directory": journal.mkdir, "fifo": lambda: os.mkfifo(journal), "symlink": lambda: journal.symlink_to(path)}[kind]()
    what = {"directory": "a directory", "fifo": "not a regular file", "symlink": "a symbolic link"}[kind]
    why = f"{journal}: is {what}, not an undo journal (ringbench keeps the undo journal of r.h5 at this path); move it away"
    res = ringbench("report", path, timeout=60)  # first, in a subprocess: a FIFO once blocked the reader forever
    assert res.returncode == 2 and res.stderr.strip() == f"ringbench report: {why}"
    args = ["--seq-len", 64, "--heads", 2, "--head-dim", 8, "--repeat", 1, "--warmup", 0, "--quiet"]
    res = mpiexec(1, "run", *args, "--out", path, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == f"ringbench run: --out: cannot write {path}: {why}"
    assert store.check_writable(path) == why
    with pytest.raises(store.SchemaError) as err:
        store.read(path)
    assert str(err.value) == why
    with pytest.raises(store.SchemaError):
        store.append(path, make_run("b"))
    assert path.read_bytes() == before
    new = tmp_path / "new.h5"  # a file to create beside a journal path of that kind
    os.rename(journal, tmp_path / "new.h5.journal")
    assert store.check_writable(new) == why.replace("r.h5", "new.h5")
    with pytest.raises(store.SchemaError):
        store.append(new, make_run("b"))
    assert not new.exists()
    (tmp_path / "new.h5.journal").rename(journal)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.h5.journal"]  # nothing created, nothing removed
