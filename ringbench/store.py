"""The HDF5 result schema: write, read, and append safely.

Schema version 1 (``SCHEMA_VERSION``), documented in the README::

    /                       attrs: format="ringbench-results", schema_version=1
    /runs/<name>/           one run; <name> is the point id (``~2``, ``~3`` ... for later runs of the same point)
        attrs               point_id, nranks, status ("ok" | "failed"), created_utc,
                            config (JSON: the resolved RunConfig), provenance (JSON), error (failed runs)
        config/             attrs: the same resolved config, one attribute per field (for h5ls/HDFView)
        samples/            datasets of timing samples, seconds (see ringbench.measure):
                            compute_s, comm_s, step_s (R, P, P); total_s (R, P); comm_only_s (C, P, P-1);
                            warmup_compute_s, warmup_comm_s, warmup_step_s (W, P, P); warmup_total_s (W, P)
        summary             attrs: the metrics of ringbench.measure.summarize
        memory/             datasets peak_rss_bytes, baseline_rss_bytes, device_pool_bytes (P,); attr theoretical_bytes
        check               attrs (with --check): max_abs_err, rel_err, tol, passed
        tensors/            (with --save-tensors) q, k, v, out in global token order, (B, N, H|H_kv, D)
    /probes/<name>/         one machine probe (``ringbench probe``, see ringbench.probe); optional group
        attrs               nranks, created_utc, config (JSON: the probe's options), provenance (JSON)
        summary             attrs: rate_flops (per-rank attention FLOP/s at the largest block), bandwidth_Bps and
                            latency_s (the slowest ring link's Hockney fit t = latency + bytes / bandwidth), slowest_link
        samples/            block_tokens (K,), block_flops (K,) and compute_s (K, R, P): the real kernel on one full
                            K/V block of each size, per repeat and rank; msg_bytes (S,), links (L, 2) rank pairs and
                            pingpong_s (L, S, I): one-way times (round trip / 2) per ring link, size and iteration

A file may hold runs, probes or both; readers of runs ignore ``/probes``, so files from before the probe
group existed are still version 1.

A run that could not complete (non-zero exit, timeout, killed) is stored by the sweep as a run with
status "failed", its error (exit status and the tail of its output) and no samples (``failed_run``).

``merge`` copies the runs of several compatible files (same format and schema version) into one; a run
already in the destination (same point id, creation time, status, config and provenance) is not copied
twice, so merging again is a no-op.

Writing never damages runs already in a file: the new run is written into a copy that replaces the file
with an atomic rename, under an exclusive lock on ``FILE.lock``, so a crash mid-write leaves the earlier
runs readable and concurrent writers on one machine take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ringbench import SCHEMA_VERSION

FORMAT = "ringbench-results"


class SchemaError(Exception):
    """A file is not a ringbench result file this version can read."""


@dataclass
class Probe:
    """One machine probe as stored (see ringbench.probe)."""

    nranks: int
    config: dict
    provenance: dict
    samples: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    created_utc: str = ""
    name: str = ""  # the group name, set on read (the writer's wish before that)
    path: str = ""  # the file, set on read


@dataclass
class Run:
    """One run as stored: what the reader returns and the writer takes."""

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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(path: Path):
    path = Path(path)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_writable(path) -> str | None:
    """None if a result file can be written at ``path``; otherwise a one-line reason."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        return f"{path} is a directory"
    if not parent.exists():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    if path.exists():
        try:
            check_file(path)
        except SchemaError as exc:
            return str(exc)
    return None


def append(path, run: Run) -> str:
    """Add ``run`` to the result file ``path`` (created if missing); returns the group name used."""
    with rewriting(path) as f:
        name = _free_name(f["runs"], run.point_id)
        _write_run(f["runs"].create_group(name), run)
    return name


def append_probe(path, probe: Probe) -> str:
    """Add ``probe`` to ``/probes`` of the result file ``path`` (created if missing); returns the group name."""
    with rewriting(path) as f:
        probes = f.require_group("probes")
        name = _free_name(probes, probe.name or f"probe-P{probe.nranks}")
        _write_probe(probes.create_group(name), probe)
    return name


@contextlib.contextmanager
def rewriting(path):
    """An open copy of the result file ``path`` (new if missing) that replaces it atomically on success."""
    path = Path(path)
    with locked(path):
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
        os.close(fd)
        try:
            if path.exists():
                check_file(path)
                shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as f:
                _init_root(f)
                yield f
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def failed_run(point_id: str, nranks: int, config: dict, error: str, provenance: dict | None = None) -> Run:
    """The record of a run that did not complete: status "failed", the error, no samples."""
    from ringbench.provenance import host, utc_now, versions

    utc = utc_now()
    prov = {**versions(), "hosts": [host()], "utc": utc}
    prov.update(provenance or {})
    return Run(point_id=point_id, nranks=nranks, config=config, provenance=prov, status="failed", error=error or "failed", created_utc=utc)


class MergeError(Exception):
    """Files that cannot be merged; the text is one line."""


def _fingerprint(g: h5py.Group) -> tuple:
    return tuple(str(g.attrs.get(k, "")) for k in ("point_id", "created_utc", "status", "config", "provenance"))


def merge(dest, sources) -> tuple[int, int]:
    """Copy every run of ``sources`` into ``dest`` (created if missing), skipping runs already there.

    All files must be ringbench result files of this schema version, otherwise MergeError names the first
    incompatible one and nothing is written. Returns (runs added, runs already present).
    """
    dest = Path(dest)
    for path in ([dest] if dest.exists() else []) + list(sources):
        try:
            check_file(path)
        except SchemaError as exc:
            raise MergeError(f"cannot merge: {exc}") from None
    added = present = 0
    with rewriting(dest) as out:
        runs = out["runs"]
        have = {_fingerprint(g) for g in runs.values()}
        for src in sources:
            with h5py.File(src, "r") as f:
                for g in f["runs"].values():
                    fp = _fingerprint(g)
                    if fp in have:
                        present += 1
                        continue
                    f.copy(g, runs, name=_free_name(runs, str(g.attrs["point_id"])))
                    have.add(fp)
                    added += 1
    return added, present


def _init_root(f: h5py.File) -> None:
    f.attrs.setdefault("format", FORMAT)
    f.attrs.setdefault("schema_version", SCHEMA_VERSION)
    if "runs" not in f:
        f.create_group("runs", track_order=True)  # read back in the order runs were added


def _free_name(runs: h5py.Group, base: str) -> str:
    if base not in runs:
        return base
    k = 2
    while f"{base}~{k}" in runs:
        k += 1
    return f"{base}~{k}"


def _write_run(g: h5py.Group, run: Run) -> None:
    g.attrs["point_id"] = run.point_id
    g.attrs["nranks"] = int(run.nranks)
    g.attrs["status"] = run.status
    g.attrs["created_utc"] = run.created_utc
    g.attrs["config"] = json.dumps(run.config, sort_keys=True)
    g.attrs["provenance"] = json.dumps(run.provenance, sort_keys=True)
    if run.error:
        g.attrs["error"] = run.error
    cg = g.create_group("config")
    for k, v in run.config.items():
        cg.attrs[k] = "none" if v is None else v
    sg = g.create_group("samples")
    for k, v in run.samples.items():
        sg.create_dataset(k, data=np.asarray(v, dtype=np.float64))
    g.create_group("summary").attrs.update({k: _attr(v) for k, v in run.summary.items()})
    mg = g.create_group("memory")
    for k, v in run.memory.items():
        if np.ndim(v):
            mg.create_dataset(k, data=np.asarray(v))
        else:
            mg.attrs[k] = v
    if run.check:
        g.create_group("check").attrs.update({k: _attr(v) for k, v in run.check.items()})
    if run.tensors:
        tg = g.create_group("tensors")
        for k, v in run.tensors.items():
            tg.create_dataset(k, data=np.asarray(v), compression="gzip", compression_opts=1)


def _write_probe(g: h5py.Group, probe: Probe) -> None:
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
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            ver = f.attrs.get("schema_version")
    except OSError as exc:
        raise SchemaError(f"{path}: not an HDF5 file ({exc.__class__.__name__})") from None
    if fmt != FORMAT or ver is None:
        raise SchemaError(f"{path}: not a ringbench result file (no format/schema_version attributes)")
    if int(ver) != SCHEMA_VERSION:
        raise SchemaError(f"{path}: result schema version {int(ver)} is not supported; this ringbench reads version {SCHEMA_VERSION}")
    return int(ver)


def read(path, *, samples: bool = True, tensors: bool = False) -> list[Run]:
    """Every run in a result file, in the file's order."""
    check_file(path)
    runs = []
    with h5py.File(path, "r") as f:
        for name, g in f["runs"].items():
            runs.append(_read_run(g, name, str(path), samples, tensors))
    return runs


def _read_run(g: h5py.Group, name: str, path: str, samples: bool, tensors: bool) -> Run:
    run = Run(
        point_id=str(g.attrs["point_id"]),
        nranks=int(g.attrs["nranks"]),
        config=json.loads(g.attrs["config"]),
        provenance=json.loads(g.attrs["provenance"]),
        status=str(g.attrs.get("status", "ok")),
        error=str(g.attrs.get("error", "")),
        created_utc=str(g.attrs.get("created_utc", "")),
        name=name,
        path=path,
    )
    if samples and "samples" in g:
        run.samples = {k: d[()] for k, d in g["samples"].items()}
    if "summary" in g:
        run.summary = {k: _py(v) for k, v in g["summary"].attrs.items()}
    if "memory" in g:
        run.memory = {k: d[()] for k, d in g["memory"].items()}
        run.memory.update({k: _py(v) for k, v in g["memory"].attrs.items()})
    if "check" in g:
        run.check = {k: _py(v) for k, v in g["check"].attrs.items()}
    if tensors and "tensors" in g:
        run.tensors = {k: d[()] for k, d in g["tensors"].items()}
    return run


def read_probes(path) -> list[Probe]:
    """Every probe in a result file (``/probes``), in the file's order; empty if it has none."""
    check_file(path)
    probes = []
    with h5py.File(path, "r") as f:
        for name, g in f.get("probes", {}).items():
            probes.append(
                Probe(
                    nranks=int(g.attrs["nranks"]),
                    config=json.loads(g.attrs["config"]),
                    provenance=json.loads(g.attrs["provenance"]),
                    samples={k: d[()] for k, d in g["samples"].items()},
                    summary={k: _py(v) for k, v in g["summary"].attrs.items()},
                    created_utc=str(g.attrs.get("created_utc", "")),
                    name=name,
                    path=str(path),
                )
            )
    return probes


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
    check_file(path)
    out: dict[str, Run] = {}
    with h5py.File(path, "r") as f:
        for name, g in f["runs"].items():
            run = Run(
                point_id=str(g.attrs["point_id"]),
                nranks=int(g.attrs["nranks"]),
                config={},
                provenance={},
                status=str(g.attrs.get("status", "ok")),
                error=str(g.attrs.get("error", "")),
                created_utc=str(g.attrs.get("created_utc", "")),
                name=name,
                path=str(path),
            )
            if "summary" in g:
                run.summary = {k: _py(v) for k, v in g["summary"].attrs.items()}
            if "check" in g:
                run.check = {k: _py(v) for k, v in g["check"].attrs.items()}
            old = out.get(run.point_id)
            if old is None or _order(run) > _order(old):
                out[run.point_id] = run
    return out


def _order(run: Run) -> tuple:
    """Later runs sort higher: by creation time, then by the ~k suffix that append gives repeats."""
    _, _, k = run.name.partition("~")
    return (run.created_utc, int(k) if k.isdigit() else 1)


def point_ids(path, status: str | None = "ok") -> set[str]:
    """Point ids stored in ``path`` (with the given status; None for any); empty if the file is absent."""
    if not Path(path).exists():
        return set()
    check_file(path)
    with h5py.File(path, "r") as f:
        return {str(g.attrs["point_id"]) for g in f["runs"].values() if status is None or str(g.attrs.get("status", "ok")) == status}
