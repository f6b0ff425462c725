"""Time to append one small run to a result file, against the file's size: in place (ringbench.store.append)
and by the copy-and-rename method ringbench 0.1 used (kept below as ``old_append``, the baseline).

    python benchmarks/append_bench.py [--sizes 1 100 1000] [--repeat 3] [--dir DIR] [--out FILE.json]

One result file grows through ``--sizes`` (MB; filler runs of up to 64 MB of float64 samples each, written by
``store.append``). At each size, ``--repeat`` rounds each append one small run (a few KB, like a failed run or
a short measurement) by both methods, in alternating order; times are wall-clock seconds (appending is I/O:
the copy, the fsyncs). Reported, per size:

    new ms, old ms        the median time of one append
    new/tiny, old/tiny    that median over the same method's median on a tiny file (a few KB), measured in this
                          run: how the cost of an append grows with the file (1.0: not at all)
    old/new               how much faster the in-place append is at that size

The target (ring issue 7): the cost of an append depends on the run's size, not the file's: new/tiny stays
near 1 while old/tiny grows with the file. Every file is written under a temporary directory in ``--dir``
(default: the system's temporary directory; use one on the file system you care about) and removed at the
end, whatever happens. Exit status 0; 2 with one line for a bad option.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from ringbench import store  # noqa: E402

FILLER_MB = 64


# ---------------------------------------------------------------------------------------------
# The baseline: ringbench 0.1's append, verbatim but for names (copy the file, write, fsync, rename)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _old_locked(path: Path):
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _old_rewriting(path):
    path = Path(path)
    with _old_locked(path):
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
        os.close(fd)
        try:
            if path.exists():
                store.check_file(path)
                shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as f:
                store._init_root(f)
                yield f
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def old_append(path, run: store.Run) -> str:
    with _old_rewriting(path) as f:
        name = store._free_name(f["runs"], run.point_id)
        store.write_run_group(f["runs"].create_group(name), run)
    return name


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def small_run(i: int) -> store.Run:
    return store.Run(
        point_id=f"small-{i}",
        nranks=4,
        config={"seq_len": 4096, "heads": 8},
        provenance={"hosts": ["bench"]},
        samples={"step_s": np.random.default_rng(i).random((5, 4, 4)), "total_s": np.ones((5, 4))},
        summary={"time_s": 1.0},
        created_utc="2026-01-01T00:00:00+00:00",
    )


def grow(path: Path, mb: float, block: np.ndarray) -> None:
    """Append filler runs until ``path`` holds about ``mb`` MB."""
    k = 0
    while (left := mb * 1e6 - (path.stat().st_size if path.exists() else 0)) > 0:
        n = min(block.size, max(int(left // 8), 1))
        run = store.Run(point_id=f"filler-{k}", nranks=1, config={}, provenance={}, samples={"filler": block[:n]})
        store.append(path, run)
        k += 1


def measure(path: Path, repeat: int, counter: list) -> dict:
    times = {"new": [], "old": []}
    for r in range(repeat):
        order = ("new", "old") if r % 2 == 0 else ("old", "new")
        for method in order:
            counter[0] += 1
            run = small_run(counter[0])
            fn = store.append if method == "new" else old_append
            t0 = time.perf_counter()
            fn(path, run)
            times[method].append(time.perf_counter() - t0)
    return times


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def simd() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__
    return {"baseline": list(__cpu_baseline__), "dispatch_available": [k for k in __cpu_dispatch__ if __cpu_features__.get(k)]}


def file_system(d: Path) -> str:
    best, fs = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(d.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fs = parts[1], parts[2]
    return fs


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 100, 1000], help="file sizes in MB, increasing (default 1 100 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="appends per method and size (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary files go (default: the system's temporary directory)")
    ap.add_argument("--out", type=Path, default=None, help="write every sample and the provenance as JSON")
    a = ap.parse_args(argv)
    if any(s <= 0 for s in a.sizes) or a.sizes != sorted(a.sizes):
        ap.exit(2, f"append_bench: --sizes: expected increasing positive sizes in MB, got {a.sizes}\n")
    if a.repeat < 1:
        ap.exit(2, f"append_bench: --repeat: expected a positive integer, got {a.repeat}\n")
    if a.dir is not None and not a.dir.is_dir():
        ap.exit(2, f"append_bench: --dir: {a.dir} is not a directory\n")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    prov = {
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "simd": simd(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "argv": " ".join(sys.argv),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    block = np.random.default_rng(0).random(int(FILLER_MB * 1e6 // 8))
    rows, counter = [], [0]
    with tempfile.TemporaryDirectory(prefix="append_bench.", dir=a.dir) as d:
        prov["file_system"] = file_system(Path(d))
        print(f"append_bench: {prov['cpu']}, {prov['cores']} cores, SIMD {prov['simd']['baseline']} + {prov['simd']['dispatch_available']}")
        print(f"h5py {prov['h5py']}, HDF5 {prov['hdf5']}; files in {d} ({prov['file_system']})")
        path = Path(d) / "results.h5"
        store.append(path, small_run(0))  # the tiny file: one small run
        for target in [None, *a.sizes]:
            if target is not None:
                grow(path, target, block)
            size = path.stat().st_size
            times = measure(path, a.repeat, counter)
            rows.append({"size_bytes": size, "samples_s": times, "median_s": {m: statistics.median(t) for m, t in times.items()}})
        left = sorted(p.name for p in Path(d).iterdir())
    tiny = rows[0]["median_s"]
    for r in rows:
        m = r["median_s"]
        r["new_over_tiny"], r["old_over_tiny"], r["old_over_new"] = m["new"] / tiny["new"], m["old"] / tiny["old"], m["old"] / m["new"]
    header = ["file MB", "new ms", "old ms", "new/tiny", "old/tiny", "old/new"]
    table = [header] + [
        [
            f"{r['size_bytes'] / 1e6:.3f}" if r["size_bytes"] < 1e6 else f"{r['size_bytes'] / 1e6:.0f}",
            f"{r['median_s']['new'] * 1e3:.1f}",
            f"{r['median_s']['old'] * 1e3:.1f}",
            f"{r['new_over_tiny']:.2f}",
            f"{r['old_over_tiny']:.2f}",
            f"{r['old_over_new']:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"files in the directory at the end: {left} (the old method leaves FILE.lock; the new leaves nothing)")
    if a.out:
        a.out.write_text(json.dumps({"bench": "append", "provenance": prov, "rows": rows, "left": left}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
