"""The HDF5 result schema: write, read, merge, and append safely in place.

Schema version 5 (``SCHEMA_VERSION``), documented in docs/results.md::

    /                       attrs: format="ringbench-results", schema_version=5
    /runs/<name>/           one run; <name> is the point id (``~2``, ``~3`` ... for later runs of the same point)
        attrs               run_id (32 hex digits, unique to this run), point_id, nranks, status ("ok" | "failed"),
                            created_utc, config (JSON: the resolved RunConfig), provenance (JSON), error (failed runs),
                            chunks_per_rank (version 5, layout balanced only: the k chunks per rank its deal used)
        config/             attrs: the same resolved config, one attribute per field (for h5ls/HDFView)
        samples/            datasets of timing samples, seconds (see ringbench.analysis.measure):
                            compute_s, comm_s, step_s (R, P, P); total_s (R, P); comm_only_s (C, P, P-1);
                            warmup_compute_s, warmup_comm_s, warmup_step_s (W, P, P); warmup_total_s (W, P);
                            partner_wait_s, unhidden_s (R, P, P): comm_s split (version 3; ring modes only)
        summary             attrs: the metrics of ringbench.analysis.measure.summarize (measure.SUMMARY: keys, definitions)
        memory/             datasets peak_rss_bytes, baseline_rss_bytes, device_pool_bytes (P,); attr theoretical_bytes
        check               attrs (with --check): max_abs_err, rel_err, tol, passed
        bwd/                (config pass bwd or fwd+bwd) the backward phase, laid out as the forward's above:
            samples/        the same datasets as samples/ (comm_only_s (C, P, P): step P-1 includes the dK/dV's hop home)
            summary         attrs: the same metrics, for the backward (flops = 2.5 x the forward's, bytes_per_rank
                            = (P-1) K/V blocks + P dK/dV accumulators)
            check           attrs (with --check): max_abs_err, rel_err (the largest of dq, dk, dv), tol, passed, and
                            per tensor dq_max_abs_err, dq_rel_err, dk_..., dv_...
        tensors/            (with --save-tensors) q, k, v, out in global token order, (B, N, H|H_kv, D); with a
                            backward also do, dq (B, N, H, D) and dk, dv (B, N, H_kv, D)
    /probes/<name>/         one machine probe (``ringbench probe``, see ringbench.harness.probe); optional group
        attrs               probe_id (32 hex digits, unique to this probe), nranks, created_utc,
                            config (JSON: the probe's options), provenance (JSON)
        summary             attrs: rate_flops (per-rank attention FLOP/s at the largest block), bwd_rate_flops (the
                            same for the backward kernel), bandwidth_Bps and latency_s (the slowest ring link's
                            Hockney fit t = latency + bytes / bandwidth), slowest_link
        samples/            block_tokens (K,), block_flops (K,) and compute_s (K, R, P): the real kernel on one full
                            K/V block of each size, per repeat and rank; bwd_block_flops (K,) (2.5 x block_flops) and
                            bwd_compute_s (K, R, P): the same for the backward kernel (dQ, dK, dV of one block);
                            msg_bytes (S,), links (L, 2) rank pairs and pingpong_s (L, S, I): one-way times
                            (round trip / 2) per ring link, size and iteration. Probes written before the backward
                            lack bwd_rate_flops, bwd_block_flops and bwd_compute_s (still read; no backward rate).
                            Version 4: piece_rows (Q,), piece_keys (K',) and piece_compute_s, bwd_piece_compute_s
                            (Q, K', R, P): the same kernels on skinny q x k pieces (every row count against every
                            key count), merge_s (Q, R, P): one merge of two partials of q rows per head; probes of
                            versions 1-3 lack them (read as before: no per-call fit).

The forward phase (samples/, summary, check) sits at the top of the run group, where version 1 keeps it, so a
forward-only run is laid out as before; a backward-only run (pass bwd) has only bwd/ (and no top-level
samples/ or summary). In memory: ``Run.samples/summary/check`` are the forward's, ``Run.bwd`` (a ``Phase``, or
None) the backward's; ``Run.phase(name)`` gives either. memory/ has theoretical_bwd_bytes beside
theoretical_bytes when the run has a backward.

Version 4 is version 5 without the run attribute ``chunks_per_rank`` (read as 0: not recorded; balanced runs
of versions 1-4 were dealt with ``layout.legacy_balanced_chunks``, 8 chunks per rank where 8P divides N).
Version 4 is version 3 with the probes' skinny pieces (above); its runs are laid out as version 3's.
Version 2 is version 3 without ``partner_wait_s``/``unhidden_s`` (samples) and ``partner_wait_s``/``unhidden_comm_s``
(summary; read as absent), its ``overlap_eff`` computed from comm_s. Version 1 is the same layout without ``run_id``,
``probe_id`` and ``bwd/`` (every version-1 run is forward-only).
All five versions are read; a run or probe
without an id (every one of a version-1 file) gets a stable derived id on read: a hash of what identified
it before (point id, creation time, status, config, provenance; for a probe: ranks, time, config,
provenance) and its rank among the file's id-less runs with that same fingerprint. The rank, not the group
name, keeps two runs of one point made in the same second apart while staying the same in a file that an
older ``collect`` filled (where the group of a run may be ``p~2`` although it was ``p`` in its part).
Readers ignore attributes they do not know and treat missing optional ones as absent.

Writers write version 5. Appending to a version-1, 2, 3 or 4 file upgrades it in place: the root attribute becomes 5
(in the same atomic append), its version-1 runs stay as they are and keep reading with derived ids; a
ringbench that reads only version 1 then refuses the file with a message naming the versions.

A run that could not complete (non-zero exit, timeout, killed) is stored by the sweep as a run with
status "failed", its error (exit status and the tail of its output) and no samples (``failed_run``).

``merge`` copies the runs and probes of several compatible files into one; a run (probe) whose id is
already in the destination is not copied twice, so merging again is a no-op. A copied version-1 run gets
its derived id written as ``run_id``, so the copy keeps the identity of its source.

Appending (``append``, ``append_probe``, ``merge``): the cost depends on what is added, not on the size of
the file, and a crash (even SIGKILL or power loss) at any moment leaves every earlier run readable.

- Locking: ``flock`` on the result file itself, exclusive for writers and shared for readers (the kernel
  drops it when a process dies, so no lock files are needed; HDF5's own file locking is switched off so it
  does not fight this one). Concurrent writers take turns; readers never see a half-written append.
- An existing file is appended to in place, under an undo journal ``FILE.journal``. HDF5 opens the file
  through a Python file object (h5py's ``fileobj`` driver) that knows the original size S. Writes at or
  past S (the new objects: nearly every byte) go straight to the file. Writes below S (the few metadata
  blocks HDF5 updates: superblock, group B-tree and heap nodes; a few KB) are kept in memory until
  commit; reads see them. The journal, holding S and the file's device and inode (so it is never applied
  to another file), is created before HDF5 opens the file. Commit: the original bytes of every range about
  to change below S are appended to the journal (one record each: offset, length, CRC32, bytes), the
  journal and its directory are fsynced, the buffered writes are applied, the file is fsynced, and the
  journal is deleted: that deletion is the commit point. Rollback (after an exception here, or by the next
  reader or writer that finds a journal a dead process left, under the exclusive lock): write the saved
  bytes back, truncate to S, fsync, delete the journal. A torn last record (its CRC fails) is one whose
  overwrite never started; a journal whose header never reached the disk (power loss before commit) was
  followed by writes past S only, which HDF5 ignores (bytes past its end of allocation). Why buffer the
  writes below S rather than journal each one just before it happens: the file below S stays untouched
  until commit, and an append costs three fsyncs (journal, directory, file) whatever HDF5 writes, instead
  of one per metadata block. The old method (copy the file, write, rename) cost one fsync plus a copy of
  the whole file; on a tiny file it is a few ms faster (benchmarks/append_bench.py).
  Durability: like the rename it replaces, the journal's deletion is not fsynced to the directory; after a
  power loss right after an append, that append may be rolled back (never half-kept).
- A file that does not exist yet is created whole in ``FILE.<random>.tmp`` in the same directory, fsynced
  and linked into place (``link`` is atomic and never replaces a file another writer created meanwhile:
  that writer's file is then appended to instead); the temporary is removed on any error. Writers also
  remove ``FILE.*.tmp`` and ``FILE.lock`` left by dead writers (older ringbench versions wrote whole copies
  and used ``FILE.lock``): only files nobody holds a lock on.
- A write that fails (a full disk, a quota, a write cut short: ``_write_fully``) rolls the append back as above,
  or removes the temporary of a new file, and raises OSError naming the file (ENOSPC for a full disk; EIO for a
  write cut short twice). HDF5 is never handed the exception: both kinds of write go through ``JournaledFile``,
  which keeps the first error, writes nothing more and raises it once HDF5 has returned (h5py 3.16 crashed the
  process on an exception in its driver's callbacks). ``write_error`` words it for ``--out``.
- The journal path must be free or a regular file: a directory, FIFO or link there is refused (SchemaError) by
  readers and writers alike, never read or removed.
- ``--out`` through a symbolic link writes to its target; the file's mode and owner never change. A file
  whose owner has no write permission (``chmod a-w``) is refused, even for root.

All writers of one file must be this version: an older one replaces the file by rename and would drop
runs appended in place meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import stat
import struct
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ringbench import SCHEMA_VERSION

FORMAT = "ringbench-results"
READABLE = (1, 2, 3, 4, 5)  # schema versions this ringbench reads


class SchemaError(Exception):
    """A file is not a ringbench result file this version can read."""


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Probe:
    """One machine probe as stored (see ringbench.harness.probe)."""

    nranks: int
    config: dict
    provenance: dict
    samples: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    created_utc: str = ""
    name: str = ""  # the group name, set on read (the writer's wish before that)
    path: str = ""  # the file, set on read
    probe_id: str = field(default_factory=_new_id)  # unique to this probe (derived on read for version-1 files)


@dataclass
class Phase:
    """One timed phase of a run: its samples, summary metrics and check (see ringbench.analysis.measure)."""

    samples: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)


PHASES = ("fwd", "bwd")


@dataclass
class Run:
    """One run as stored: what the reader returns and the writer takes.

    ``samples``, ``summary`` and ``check`` are the forward phase's (empty for a backward-only run); ``bwd`` is the
    backward phase, or None for a forward-only run.
    """

    point_id: str
    nranks: int
    config: dict
    provenance: dict
    samples: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    status: str = "ok"
    error: str = ""
    created_utc: str = ""
    name: str = ""  # the group name, set on read
    path: str = ""  # the file, set on read
    run_id: str = field(default_factory=_new_id)  # unique to this run (derived on read for version-1 files)
    bwd: Phase | None = None  # the backward phase (schema 2, pass bwd or fwd+bwd)
    chunks_per_rank: int = 0  # layout balanced: the chunks per rank its deal used (schema 5); 0: other layouts, or older

    def phase(self, name: str) -> Phase | None:
        """The phase ``name`` ('fwd' or 'bwd') as a Phase, or None if the run has no such phase."""
        if name == "bwd":
            return self.bwd
        if name != "fwd":
            raise ValueError(f"unknown phase {name!r}; allowed: {', '.join(PHASES)}")
        if not (self.samples or self.summary or self.check):
            return None
        return Phase(self.samples, self.summary, self.check)

    def phases(self) -> list[str]:
        """The names of the phases this run has, in order."""
        return [p for p in PHASES if self.phase(p) is not None]


# ---------------------------------------------------------------------------------------------
# Locks, journal, temporaries
# ---------------------------------------------------------------------------------------------
_MAGIC = b"RBJRNL02"
_HEAD = struct.Struct("<8sQQQI")  # magic, original size S, st_dev, st_ino, crc32 of the rest
_REC = struct.Struct("<QQI")  # offset, length, crc32(offset, length, bytes)


def _real(path) -> Path:
    """The file ``path`` names, through symbolic links (a dangling link names the file to create)."""
    return Path(os.path.realpath(path))


def _journal(real: Path) -> Path:
    return real.with_name(real.name + ".journal")


def _journal_problem(real: Path) -> str | None:
    """Why the journal path of ``real`` cannot serve as its undo journal (it is not a regular file), or None."""
    jpath = _journal(real)
    try:
        mode = os.lstat(jpath).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    return f"{jpath}: is {kind}, not an undo journal (ringbench keeps the undo journal of {real.name} at this path); move it away"


def _check_journal(real: Path) -> None:
    why = _journal_problem(real)
    if why:
        raise SchemaError(why)


def _write_fully(fd: int, data: bytes, offset: int | None, name) -> None:
    """Write all of ``data`` to ``fd`` (at ``offset``, or at its position); OSError naming ``name`` if it cannot.

    A write cut short is retried once for the rest, so that a cause (no space left, quota, file too large) is
    raised as itself; cut short again, it is an error (EIO): a journal or file is never silently shorter."""
    mv = memoryview(data)
    done = 0
    for _ in range(2):
        try:
            done += os.write(fd, mv[done:]) if offset is None else os.pwrite(fd, mv[done:], offset + done)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(name)) from None
        if done == len(mv):
            return
    raise OSError(errno.EIO, f"short write ({done} of {len(mv)} bytes written)", str(name))


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _lock(real: Path, flags: int, how: int) -> int | None:
    """An fd of ``real`` holding flock ``how``, or None if the file does not exist (or was replaced meanwhile: retry)."""
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, how)
        st = os.fstat(fd)
        now = os.stat(real)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return -1


def _rollback(real: Path, fd: int) -> None:
    """Undo the append a journal describes (the caller holds the exclusive lock and a writable ``fd``)."""
    _check_journal(real)
    jpath = _journal(real)
    try:
        data = jpath.read_bytes()
    except FileNotFoundError:
        return
    st = os.fstat(fd)
    if len(data) >= _HEAD.size:
        magic, size, dev, ino, crc = _HEAD.unpack_from(data)
        if magic == _MAGIC and crc == zlib.crc32(data[: _HEAD.size - 4]) and (dev, ino) == (st.st_dev, st.st_ino):
            records, pos = [], _HEAD.size
            while pos + _REC.size <= len(data):
                off, n, crc = _REC.unpack_from(data, pos)
                body = data[pos + _REC.size : pos + _REC.size + n]
                if len(body) != n or zlib.crc32(data[pos : pos + 16] + body) != crc:
                    break  # torn last record: its overwrite never started
                records.append((off, body))
                pos += _REC.size + n
            for off, body in reversed(records):
                _write_fully(fd, body, off, real)
            os.ftruncate(fd, size)
            os.fsync(fd)
    # a journal with no valid header was never followed by a write; one of another file is stale
    jpath.unlink(missing_ok=True)
    _fsync_dir(real.parent)


def _recover_for_reading(real: Path, fd: int) -> None:
    """Roll back a journal a dead writer left, from a reader holding the shared lock on ``fd``: the exclusive
    lock is taken on a writable descriptor (flock over NFS needs one), then the shared lock again."""
    _check_journal(real)
    while _journal(real).exists():
        try:
            wfd = os.open(real, os.O_RDWR)
        except OSError as exc:
            raise SchemaError(
                f"{real}: an interrupted append must be rolled back ({_journal(real).name}) and the file is not writable"
                f" ({exc.strerror}); open it once with write access"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(wfd, fcntl.LOCK_EX)
            _rollback(real, wfd)
        finally:
            os.close(wfd)
            fcntl.flock(fd, fcntl.LOCK_SH)


@contextlib.contextmanager
def _reading(path):
    """``path`` open for reading under a shared lock, a dead writer's journal rolled back first; yields an h5py.File."""
    real = _real(path)
    while True:
        try:
            fd = _lock(real, os.O_RDONLY, fcntl.LOCK_SH)
        except OSError as exc:
            raise SchemaError(f"{path}: not an HDF5 file ({exc.__class__.__name__})") from None
        if fd is None:
            raise SchemaError(f"{path}: not an HDF5 file (FileNotFoundError)")
        if fd >= 0:
            break
    try:
        _recover_for_reading(real, fd)
        try:
            f = h5py.File(real, "r", locking=False)
        except OSError as exc:
            raise SchemaError(f"{path}: not an HDF5 file ({exc.__class__.__name__})") from None
        with f:
            _check_root(f, path)
            yield f
    finally:
        os.close(fd)


def _sweep(real: Path) -> None:
    """Remove ``FILE.*.tmp`` and ``FILE.lock`` that dead writers left (only those no one holds a lock on)."""
    old_lock = real.with_name(real.name + ".lock")
    if old_lock.exists():  # an older ringbench's lock file: while one of its writers holds it, leave everything
        try:
            lfd = os.open(old_lock, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lfd)
            return
        try:
            old_lock.unlink(missing_ok=True)
        finally:
            os.close(lfd)
    prefix = real.name + "."
    try:
        names = [e.name for e in os.scandir(real.parent) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        p = real.with_name(name)
        try:
            tfd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(tfd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live creator holds its temporary locked
            p.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(tfd)


class JournaledFile:
    """The result file as h5py's ``fileobj`` driver sees it: bytes at or past ``size`` are written through,
    writes below it are buffered until ``commit`` (see the module docstring).

    A write that fails (no space left on the device, a quota, a write cut short) is never raised into HDF5:
    an exception inside h5py's driver callbacks can crash the process (h5py 3.16 segfaulted on a full disk).
    The first error is kept in ``error``, nothing more is written, HDF5 carries on, and ``raise_error`` raises
    it once HDF5 has returned; the append is then rolled back (a new file removed)."""

    def __init__(self, fd: int, size: int, journal_fd: int | None, name: Path):
        self.fd, self.size0, self.jfd, self.name = fd, size, journal_fd, name
        self.size = size  # the logical end of file
        self.pos = 0
        self.below: list[tuple[int, bytes]] = []  # buffered writes below size0, in order
        self.dead = False
        self.error: OSError | None = None  # the first failed write or truncate

    # --- the interface h5py's fileobj driver calls: seek, tell, readinto/read, write, truncate, flush
    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        mv = memoryview(buf).cast("B")
        n, pos = len(mv), self.pos
        end = min(pos + n, self.size)
        got = os.preadv(self.fd, [mv[: max(end - pos, 0)]], pos) if end > pos else 0
        mv[got:] = bytes(n - got)
        for off, data in self.below:  # later writes win
            lo, hi = max(off, pos), min(off + len(data), pos + n)
            if lo < hi:
                mv[lo - pos : hi - pos] = data[lo - off : hi - off]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else n
        buf = bytearray(max(n, 0))
        self.readinto(buf)
        return bytes(buf)

    def write(self, buf) -> int:
        if self.dead or self.error:
            return len(buf)
        data = bytes(buf)
        pos, n = self.pos, len(data)
        split = min(max(self.size0 - pos, 0), n)
        if split:
            self.below.append((pos, data[:split]))
        if split < n:
            try:
                _write_fully(self.fd, data[split:], pos + split, self.name)
            except OSError as exc:
                self.error = exc
        self.pos += n
        self.size = max(self.size, pos + n)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if not (self.dead or self.error):
            if size >= self.size0:
                try:
                    os.ftruncate(self.fd, size)
                except OSError as exc:
                    self.error = OSError(exc.errno, exc.strerror, str(self.name))
            self.size = size  # below size0: applied at commit
        return size

    def raise_error(self) -> None:
        """Raise the first write error HDF5 was not told about, if any."""
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        pass

    # --- commit
    def _ranges(self) -> list[tuple[int, int]]:
        spans = sorted((off, off + len(d)) for off, d in self.below)
        if self.size < self.size0:
            spans = sorted(spans + [(self.size, self.size0)])
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return [(lo, hi) for lo, hi in merged]

    def save_preimages(self, directory: Path) -> None:
        """Append the original bytes of every range commit will change below S to the journal; fsync it and its directory."""
        out = bytearray()
        for lo, hi in self._ranges():
            old = os.pread(self.fd, hi - lo, lo)
            head = struct.pack("<QQ", lo, len(old))
            out += head + struct.pack("<I", zlib.crc32(head + old)) + old
        _write_fully(self.jfd, bytes(out), None, _journal(self.name))
        os.fsync(self.jfd)
        _fsync_dir(directory)  # the journal's name is durable too

    def apply(self) -> None:
        """Write the buffered changes below S into the file."""
        for off, data in self.below:
            _write_fully(self.fd, data, off, self.name)
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)

    def commit(self, directory: Path) -> None:
        self.raise_error()
        self.save_preimages(directory)
        self.apply()
        os.fsync(self.fd)


def _read_only(real: Path) -> str | None:
    """Why an existing file may not be written, or None."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return None
    if not st.st_mode & stat.S_IWUSR:
        return "the file is read-only (no write permission; chmod u+w to allow appending)"
    if not os.access(real, os.W_OK):
        return "the file is not writable by this user"
    return None


def _append_in_place(real: Path, fd: int, fn):
    """Run ``fn(h5py.File)`` on the existing, locked file ``real`` under an undo journal; commit or roll back."""
    _rollback(real, fd)  # a dead writer's journal
    _sweep(real)
    st = os.fstat(fd)
    jpath = _journal(real)
    try:
        jfd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(jpath)) from None
    try:
        with contextlib.suppress(OSError):  # whoever may write the file may roll its journal back
            os.fchmod(jfd, stat.S_IMODE(st.st_mode) & 0o666)
        wrapper = JournaledFile(fd, st.st_size, jfd, real)
        f = None
        try:
            head = struct.pack("<8sQQQ", _MAGIC, st.st_size, st.st_dev, st.st_ino)
            _write_fully(jfd, head + struct.pack("<I", zlib.crc32(head)), None, jpath)  # fsynced with the records
            try:
                f = h5py.File(wrapper, "r+", locking=False)
            except OSError as exc:
                wrapper.raise_error()
                raise SchemaError(f"{real}: not an HDF5 file ({exc.__class__.__name__})") from None
            _check_root(f, real)
            _init_root(f)
            result = fn(f)
            f.close()
            wrapper.commit(real.parent)
        except BaseException as exc:
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
            wrapper.dead = True  # nothing more reaches the file from HDF5
            _rollback(real, fd)  # also removes a journal whose header never got written
            _raise_write_error(wrapper, exc)
            raise
    finally:
        os.close(jfd)
    jpath.unlink(missing_ok=True)  # the commit point
    return result


_RETRY = object()


def _raise_write_error(wrapper: JournaledFile, exc: BaseException) -> None:
    """Raise the write error that ``wrapper`` kept from HDF5 instead of ``exc`` (what HDF5 made of it), if any."""
    if wrapper.error is not None and isinstance(exc, Exception) and exc is not wrapper.error:
        raise wrapper.error from None


def _create(real: Path, fn):
    """Create ``real`` whole in a temporary, run ``fn`` on it and link it into place; _RETRY if another writer won."""
    _check_journal(real)
    _journal(real).unlink(missing_ok=True)  # a journal without its file is stale
    _sweep(real)
    while True:
        tmp = real.with_name(f"{real.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        st, now = os.fstat(fd), None
        with contextlib.suppress(FileNotFoundError):
            now = os.stat(tmp)
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            break
        os.close(fd)  # swept by another writer between open and flock: take another name
    wrapper = JournaledFile(fd, 0, None, real)  # every write goes straight to the temporary; errors kept from HDF5
    try:
        try:
            with h5py.File(wrapper, "w", locking=False) as f:
                _init_root(f)
                result = fn(f)
            wrapper.raise_error()
        except BaseException as exc:
            wrapper.dead = True
            _raise_write_error(wrapper, exc)
            raise
        os.fsync(fd)
        try:
            os.link(tmp, real)  # never replaces a file that appeared meanwhile
        except FileExistsError:
            return _RETRY
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV) or real.exists():
                raise
            os.replace(tmp, real)  # a file system without hard links
        _fsync_dir(real.parent)
        return result
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)  # the lock is released only now, once the file is in place


def _update(path, fn):
    """Run ``fn(h5py.File)`` on the result file ``path`` (created if missing), atomically; returns its result."""
    real = _real(path)
    while True:
        why = _read_only(real)
        if why:
            raise PermissionError(errno.EACCES, f"{path}: {why}")
        fd = _lock(real, os.O_RDWR, fcntl.LOCK_EX)
        if fd is None:
            result = _create(real, fn)
            if result is not _RETRY:
                return result
            continue
        if fd < 0:
            continue
        try:
            return _append_in_place(real, fd, fn)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def check_writable(path) -> str | None:
    """None if a result file can be written at ``path`` (through a symbolic link: at its target); otherwise a one-line reason."""
    path = Path(path)
    real = _real(path)
    parent = real.parent
    if real.is_dir():
        return f"{path} is a directory"
    if not parent.exists():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    why = _journal_problem(real)
    if why:
        return why
    if _no_space(parent):
        return f"no space left on device ({parent} has no free space)"
    if real.exists():
        why = _read_only(real)
        if why:
            return why
        try:
            check_file(real)
        except SchemaError as exc:
            return str(exc)
    return None


def _no_space(directory: Path) -> bool:
    """True if the file system of ``directory`` has no free block left for this user (root may use reserved blocks)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def write_error(path, exc: Exception) -> str:
    """The one-line reason an append to the result file ``path`` failed with ``exc`` (an OSError or SchemaError):
    what the command prints after ``--out: cannot write PATH: ``. Nothing of the failed append is left behind."""
    if isinstance(exc, OSError) and exc.strerror:
        why = exc.strerror[0].lower() + exc.strerror[1:]
        if exc.filename and _real(exc.filename) != _real(path):
            why = f"{exc.filename}: {why}"
    else:
        why = str(exc)
    if Path(path).exists():
        return f"{why} (nothing was added; the file is as it was)"
    return f"{why} (nothing was written)"


def append(path, run: Run) -> str:
    """Add ``run`` to the result file ``path`` (created if missing); returns the group name used."""

    def add(f):
        name = _free_name(f["runs"], run.point_id)
        write_run_group(f["runs"].create_group(name), run)
        return name

    return _update(path, add)


def append_probe(path, probe: Probe) -> str:
    """Add ``probe`` to ``/probes`` of the result file ``path`` (created if missing); returns the group name."""

    def add(f):
        probes = f.require_group("probes")
        name = _free_name(probes, probe.name or f"probe-P{probe.nranks}")
        _write_probe(probes.create_group(name), probe)
        return name

    return _update(path, add)


def failed_run(point_id: str, nranks: int, config: dict, error: str, provenance: dict | None = None) -> Run:
    """The record of a run that did not complete: status "failed", the error, no samples."""
    from ringbench.provenance import host, utc_now, versions

    utc = utc_now()
    prov = {**versions(), "hosts": [host()], "utc": utc}
    prov.update(provenance or {})
    return Run(point_id=point_id, nranks=nranks, config=config, provenance=prov, status="failed", error=error or "failed", created_utc=utc)


class MergeError(Exception):
    """Files that cannot be merged; the text is one line."""


_RUN_KEYS = ("point_id", "created_utc", "status", "config", "provenance")
_PROBE_KEYS = ("nranks", "created_utc", "config", "provenance")


def _ids(group: h5py.Group, attr: str, keys: tuple) -> dict[str, str]:
    """The id of every member of ``group`` (runs or probes): stored, or derived for version-1 members."""
    ids, seen = {}, {}
    for name, g in group.items():
        stored = g.attrs.get(attr)
        if stored is not None:
            ids[name] = str(_py(stored))
            continue
        fp = "\0".join(str(_py(g.attrs.get(k, ""))) for k in keys)
        k = seen[fp] = seen.get(fp, -1) + 1  # the rank among id-less members with this fingerprint
        ids[name] = hashlib.sha256(f"{fp}\0{k}".encode()).hexdigest()[:32]
    return ids


def merge(dest, sources) -> tuple[int, int]:
    """Copy every run and probe of ``sources`` into ``dest`` (created if missing), skipping those already there.

    All files must be ringbench result files of a version this ringbench reads, otherwise MergeError names
    the first incompatible one and nothing is written. Runs (probes) are the same when their run_id
    (probe_id) is. Returns (runs added, runs already present).
    """
    dest = Path(dest)
    sources = [Path(s) for s in sources]
    for path in ([dest] if dest.exists() else []) + sources:
        try:
            check_file(path)
        except SchemaError as exc:
            raise MergeError(f"cannot merge: {exc}") from None
        if path is not dest and dest.exists() and os.path.samefile(path, dest):
            raise MergeError(f"cannot merge: {path} is the destination file")
    why = check_writable(dest)
    if why:
        raise MergeError(f"cannot merge into {dest}: {why}")

    def copy(out):
        counts = [0, 0]
        have: dict[str, set] = {}  # the ids in dest, per group
        for src in sources:
            with _reading(src) as f:
                for key, attr, keys in (("runs", "run_id", _RUN_KEYS), ("probes", "probe_id", _PROBE_KEYS)):
                    if key not in f:
                        continue
                    into = out.require_group(key)
                    if key not in have:
                        have[key] = set(_ids(into, attr, keys).values())
                    for name, rid in _ids(f[key], attr, keys).items():
                        if rid in have[key]:
                            counts[1] += key == "runs"
                            continue
                        g = f[key][name]
                        base = str(_py(g.attrs["point_id"])) if key == "runs" else name.partition("~")[0]
                        new = _free_name(into, base)
                        f.copy(g, into, name=new)
                        into[new].attrs[attr] = rid  # a version-1 member keeps its derived id
                        have[key].add(rid)
                        counts[0] += key == "runs"
        return tuple(counts)

    return _update(dest, copy)


def _check_root(f: h5py.File, path) -> int:
    fmt = _py(f.attrs.get("format"))
    ver = f.attrs.get("schema_version")
    if fmt != FORMAT or ver is None:
        raise SchemaError(f"{path}: not a ringbench result file (no format/schema_version attributes)")
    if int(ver) not in READABLE:
        versions = " and ".join(", ".join(map(str, READABLE)).rsplit(", ", 1))
        raise SchemaError(f"{path}: result schema version {int(ver)} is not supported; this ringbench reads versions {versions}")
    return int(ver)


def _init_root(f: h5py.File) -> None:
    f.attrs.setdefault("format", FORMAT)
    if f.attrs.get("schema_version") != SCHEMA_VERSION:
        f.attrs["schema_version"] = SCHEMA_VERSION  # new file, or a version-1 file upgraded in place
    if "runs" not in f:
        f.create_group("runs", track_order=True)  # read back in the order runs were added


def _free_name(runs: h5py.Group, base: str) -> str:
    if base not in runs:
        return base
    k = 2
    while f"{base}~{k}" in runs:
        k += 1
    return f"{base}~{k}"


def write_run_group(g: h5py.Group, run: Run) -> None:
    g.attrs["run_id"] = run.run_id
    g.attrs["point_id"] = run.point_id
    g.attrs["nranks"] = int(run.nranks)
    g.attrs["status"] = run.status
    g.attrs["created_utc"] = run.created_utc
    g.attrs["config"] = json.dumps(run.config, sort_keys=True)
    g.attrs["provenance"] = json.dumps(run.provenance, sort_keys=True)
    if run.error:
        g.attrs["error"] = run.error
    if run.chunks_per_rank:
        g.attrs["chunks_per_rank"] = int(run.chunks_per_rank)
    cg = g.create_group("config")
    for k, v in run.config.items():
        cg.attrs[k] = "none" if v is None else v
    if run.samples or run.summary or run.bwd is None:  # the forward phase, where version 1 keeps it
        _write_phase(g, Phase(run.samples, run.summary, run.check))
    if run.bwd is not None:
        _write_phase(g.create_group("bwd"), run.bwd)
    mg = g.create_group("memory")
    for k, v in run.memory.items():
        if np.ndim(v):
            mg.create_dataset(k, data=np.asarray(v))
        else:
            mg.attrs[k] = v
    if run.tensors:
        tg = g.create_group("tensors")
        for k, v in run.tensors.items():
            tg.create_dataset(k, data=np.asarray(v), compression="gzip", compression_opts=1)


def _write_phase(g: h5py.Group, phase: Phase) -> None:
    sg = g.create_group("samples")
    for k, v in phase.samples.items():
        sg.create_dataset(k, data=np.asarray(v, dtype=np.float64))
    g.create_group("summary").attrs.update({k: _attr(v) for k, v in phase.summary.items()})
    if phase.check:
        g.create_group("check").attrs.update({k: _attr(v) for k, v in phase.check.items()})


def _read_phase(g: h5py.Group, samples: bool) -> Phase:
    phase = Phase()
    if samples and "samples" in g:
        phase.samples = {k: d[()] for k, d in g["samples"].items()}
    if "summary" in g:
        phase.summary = {k: _py(v) for k, v in g["summary"].attrs.items()}
    if "check" in g:
        phase.check = {k: _py(v) for k, v in g["check"].attrs.items()}
    return phase


def _write_probe(g: h5py.Group, probe: Probe) -> None:
    g.attrs["probe_id"] = probe.probe_id
    g.attrs["nranks"] = int(probe.nranks)
    g.attrs["created_utc"] = probe.created_utc
    g.attrs["config"] = json.dumps(probe.config, sort_keys=True)
    g.attrs["provenance"] = json.dumps(probe.provenance, sort_keys=True)
    sg = g.create_group("samples")
    for k, v in probe.samples.items():
        sg.create_dataset(k, data=np.asarray(v))
    g.create_group("summary").attrs.update({k: _attr(v) for k, v in probe.summary.items()})


def _attr(v):
    return "none" if v is None else v


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def check_file(path) -> int:
    """The schema version of ``path``; SchemaError with a one-line reason if this version cannot read it."""
    with _reading(path) as f:
        return _check_root(f, path)


_RUN_ATTRS = ("point_id", "nranks", "config", "provenance")  # what a group needs to be read as a run
_PROBE_ATTRS = ("nranks", "config", "provenance")


def _readable(path, kind: str, name: str, g, attrs: tuple, read):
    """``read()`` of the member ``name`` of /runs or /probes, or None (with a one-line warning on stderr naming the
    file and the group) when it cannot be read as one: not a group, an attribute missing, or a value that does not parse
    (a group that something other than ringbench wrote, or nested groups from a name with a slash)."""
    where = f"/{kind}s/{name}"
    why = None
    if not isinstance(g, h5py.Group):
        why = "not a group"
    else:
        missing = [a for a in attrs if a not in g.attrs]
        if missing:
            why = f"no attribute {missing[0]!r}"
    if why is None:
        try:
            return read()
        except (KeyError, ValueError, TypeError, AttributeError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
    print(f"ringbench: warning: {path}: {where}: skipped, not a readable {kind} ({why})", file=sys.stderr)
    return None


def read(path, *, samples: bool = True, tensors: bool = False) -> list[Run]:
    """Every run in a result file, in the file's order (a group that cannot be read as a run is skipped with a warning)."""
    with _reading(path) as f:
        ids = _ids(f["runs"], "run_id", _RUN_KEYS)
        runs = [
            _readable(path, "run", name, g, _RUN_ATTRS, lambda g=g, name=name: _read_run(g, name, ids[name], str(path), samples, tensors))
            for name, g in f["runs"].items()
        ]
        return [r for r in runs if r is not None]


def _read_run(g: h5py.Group, name: str, run_id: str, path: str, samples: bool, tensors: bool) -> Run:
    run = _read_state(g, name, run_id, path, samples=samples, config=True)
    if "memory" in g:
        run.memory = {k: d[()] for k, d in g["memory"].items()}
        run.memory.update({k: _py(v) for k, v in g["memory"].attrs.items()})
    if tensors and "tensors" in g:
        run.tensors = {k: d[()] for k, d in g["tensors"].items()}
    return run


def read_probes(path) -> list[Probe]:
    """Every probe in a result file (``/probes``), in the file's order; empty if it has none (a group that cannot be
    read as a probe is skipped with a warning)."""
    probes = []
    with _reading(path) as f:
        group = f.get("probes", {})
        ids = _ids(group, "probe_id", _PROBE_KEYS) if group else {}
        for name, g in group.items():
            probe = _readable(path, "probe", name, g, _PROBE_ATTRS, lambda g=g, name=name: _read_probe(g, name, ids[name], str(path)))
            if probe is not None:
                probes.append(probe)
    return probes


def _read_probe(g: h5py.Group, name: str, probe_id: str, path: str) -> Probe:
    return Probe(
        nranks=int(g.attrs["nranks"]),
        config=json.loads(g.attrs["config"]),
        provenance=json.loads(g.attrs["provenance"]),
        samples={k: d[()] for k, d in g["samples"].items()},
        summary={k: _py(v) for k, v in g["summary"].attrs.items()},
        created_utc=str(g.attrs.get("created_utc", "")),
        name=name,
        path=path,
        probe_id=probe_id,
    )


def _py(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def latest(path) -> dict[str, Run]:
    """The most recent run of each point in ``path`` (attributes only, no samples): the point's state."""
    if not Path(path).exists():
        return {}
    out: dict[str, Run] = {}
    with _reading(path) as f:
        ids = _ids(f["runs"], "run_id", _RUN_KEYS)
        for name, g in f["runs"].items():
            run = _readable(path, "run", name, g, _RUN_ATTRS[:2], lambda g=g, name=name: _read_state(g, name, ids[name], str(path)))
            if run is None:
                continue
            old = out.get(run.point_id)
            if old is None or _order(run) > _order(old):
                out[run.point_id] = run
    return out


def _read_state(g: h5py.Group, name: str, run_id: str, path: str, samples: bool = False, config: bool = False) -> Run:
    """A run's attributes, summaries and checks (what ``latest`` needs: no samples, no config, unless asked for)."""
    run = Run(
        point_id=str(g.attrs["point_id"]),
        nranks=int(g.attrs["nranks"]),
        config=json.loads(g.attrs["config"]) if config else {},
        provenance=json.loads(g.attrs["provenance"]) if config else {},
        status=str(g.attrs.get("status", "ok")),
        error=str(g.attrs.get("error", "")),
        created_utc=str(g.attrs.get("created_utc", "")),
        name=name,
        path=path,
        run_id=run_id,
        chunks_per_rank=int(g.attrs.get("chunks_per_rank", 0)),
    )
    fwd = _read_phase(g, samples)
    run.samples, run.summary, run.check = fwd.samples, fwd.summary, fwd.check
    if "bwd" in g:
        run.bwd = _read_phase(g["bwd"], samples)
    return run


def _order(run: Run) -> tuple:
    """Later runs sort higher: by creation time, then by the ~k suffix that append gives repeats."""
    _, _, k = run.name.partition("~")
    return (run.created_utc, int(k) if k.isdigit() else 1)


# ---------------------------------------------------------------------------------------------
# What a stored run's check says
# ---------------------------------------------------------------------------------------------
def check_failure(run: Run) -> str | None:
    """Why a run's --check failed, ``check failed: dq rel err 1.37 (tol 2e-05)`` (the first phase that failed; its
    worst tensor: ``out`` for the forward, dq, dk or dv for the backward); None when every check passed or none ran.
    A stored run whose check failed has status "ok" (it ran) but wrong numbers: not something to fit a model to."""
    for name in run.phases():
        chk = run.phase(name).check
        if not chk or chk.get("passed", True):
            continue
        # the backward stores dq_rel_err, dk_rel_err, dv_rel_err; the forward only rel_err (of the output)
        per = {k[: -len("_rel_err")]: v for k, v in chk.items() if k.endswith("_rel_err") and isinstance(v, (int, float))}
        what = max(per, key=lambda k: per[k] if math.isfinite(per[k]) else math.inf) if per else "out"
        rel = per[what] if per else chk.get("rel_err")
        tol = chk.get("tol")
        text = f"check failed: {what} rel err {_g(rel)}" + ("" if tol is None else f" (tol {_g(tol)})")
        if isinstance(rel, (int, float)) and isinstance(tol, (int, float)) and rel <= tol:
            text += f"; non-finite values in the {'output' if name == 'fwd' else 'gradients'}"
        return text
    return None


def _g(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else str(v)
