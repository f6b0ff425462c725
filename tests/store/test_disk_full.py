"""A full disk while a result is stored, on a real 2 MiB tmpfs: an error naming the file and "no space left on
device", exit status 2 from the CLI, and nothing left behind (no journal, no temporary, an existing file as it was)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ringbench import store

from conftest import child_env, mpiexec

# (bytes left free, whether the result file exists before): some KiB free, none free, a new file on a full disk
LEVELS = [
    pytest.param(16 << 10, True, id="16KiB-free"),
    pytest.param(0, True, id="0-free"),
    pytest.param(0, False, id="new-file-0-free"),
]


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (needs root), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip() or f'mount exited {res.returncode}'}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(mnt, free: int) -> None:
    """Leave exactly ``free`` bytes free on ``mnt`` (a filler file takes the rest)."""
    st = os.statvfs(mnt)
    fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - free)
    finally:
        os.close(fd)
    st = os.statvfs(mnt)
    assert st.f_bavail * st.f_frsize == free


def small_run(pid: str) -> store.Run:
    return store.Run(point_id=pid, nranks=2, config={"seq_len": 8}, provenance={"hosts": ["h"]}, summary={"time_s": 1.0})


def big_run() -> store.Run:
    """A run with 256 KiB of incompressible tensors: more than the space left at every level."""
    q = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
    return store.Run(point_id="big", nranks=2, config={}, provenance={}, summary={"time_s": 2.0}, tensors={"q": q})


# the append in a child process: a writer that crashes (h5py segfaulted here) must not take pytest with it
APPEND_BIG = """
import errno, sys
from test_disk_full import big_run
from ringbench import store

try:
    store.append(sys.argv[1], big_run())
except OSError as exc:
    print(errno.errorcode.get(exc.errno), exc.filename)
else:
    print("stored")
"""


def full_disk(fs, name: str, free: int, existing: bool):
    """FILE on the small file system (with one earlier run if ``existing``: its bytes, else None), the disk then filled
    to leave ``free`` bytes."""
    path, before = fs / name, None
    if existing:
        store.append(path, small_run("a"))
        before = path.read_bytes()
    fill(fs, free)
    return path, before


@pytest.mark.parametrize("free, existing", LEVELS)
def test_append_on_a_full_disk_raises_enospc_and_leaves_nothing_behind(small_fs, free, existing):
    path, before = full_disk(small_fs, "r.h5", free, existing)
    here = Path(__file__).parent  # test_disk_full and, above it, conftest (which it imports)
    env = child_env({"PYTHONPATH": os.pathsep.join([str(here), str(here.parent), child_env()["PYTHONPATH"]])})
    res = subprocess.run([sys.executable, "-c", APPEND_BIG, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[0] == "ENOSPC" and res.stdout.split()[1].startswith(str(path)), res.stdout
    assert sorted(p.name for p in small_fs.iterdir()) == (["fill", "r.h5"] if existing else ["fill"])
    if existing:
        assert path.read_bytes() == before
        assert [r.point_id for r in store.read(path)] == ["a"]
    (small_fs / "fill").unlink()  # space again: the next append works
    store.append(path, big_run())
    assert [r.point_id for r in store.read(path)] == (["a", "big"] if existing else ["big"])
    assert sorted(p.name for p in small_fs.iterdir()) == ["r.h5"]


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("free, existing", LEVELS)
def test_run_out_on_a_full_disk_is_one_line_exit_2(small_fs, free, existing):
    path, before = full_disk(small_fs, "d.h5", free, existing)
    args = ["--seq-len", 256, "--heads", 2, "--head-dim", 8, "--repeat", 1, "--warmup", 0, "--save-tensors", "--quiet"]
    res = mpiexec(2, "run", *args, "--out", path, env={"RINGBENCH_EXP": "2"})
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"ringbench run: --out: cannot write {path}: ") and "no space left on device" in lines[0]
    assert sorted(p.name for p in small_fs.iterdir()) == (["d.h5", "fill"] if existing else ["fill"])
    if existing:
        assert path.read_bytes() == before
        assert [r.point_id for r in store.read(path)] == ["a"]
