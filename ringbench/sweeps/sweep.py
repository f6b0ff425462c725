"""Running the points of an experiment: the result layout, launchers, one subprocess per point, point states.

Result layout (``--results DIR``, default ``results``)::

    DIR/<experiment>.h5                 the collected file: every run of every point (ringbench collect)
    DIR/<experiment>/experiment.yaml    the resolved experiment (profile merged in) that sweeps and jobs ran
    DIR/<experiment>/parts/<id>.h5      one file per point, written only by the task that runs that point
    DIR/<experiment>/logs/<id>.log      output of every attempt at the point (launcher + ringbench run)
    DIR/<experiment>/logs/*.out         Slurm's output of each array task
    DIR/<experiment>/scripts/           rendered job scripts (*.sbatch) and their task lists (*.tasks)
    DIR/<experiment>/jobs.json          submitted job arrays: job id, rank count, script, points per task

A point is run as ``LAUNCHER -n P python -m ringbench run ... --out parts/<id>.h5``: the launcher is
``mpiexec`` (the one beside this python, or on PATH) or ``srun --mpi=...`` inside a Slurm job. Scheduler
(run here, or sbatch) and launcher (mpiexec, srun) are independent choices.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

import ringbench
from ringbench import store
from ringbench.config import LEGACY_ID_HEX, legacy_point_id, stored_point_id
from ringbench.provenance import utc_now
from ringbench.sweeps.experiment import (
    Experiment,
    ExperimentError,
    Point,
    SlurmSpec,
    default_time,
    fmt_value,
)

TAIL_LINES = 20
TAIL_CHARS = 2000
KILL_GRACE_S = 5


@dataclass
class ResultDir:
    """Where an experiment's files live under a results directory."""

    results: Path
    name: str

    @property
    def root(self) -> Path:
        return self.results / self.name

    @property
    def collected(self) -> Path:
        return self.results / f"{self.name}.h5"

    @property
    def snapshot(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    def part(self, pid: str) -> Path:
        return self.parts / f"{pid}.h5"

    def log(self, pid: str) -> Path:
        return self.logs / f"{pid}.log"

    def make(self) -> None:
        for d in (self.parts, self.logs, self.scripts):
            d.mkdir(parents=True, exist_ok=True)


def write_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename: never half-written.

    The file is created with permission bits ``mode`` less the umask (as open() does with 0o666)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a crash could carry wider bits: O_EXCL creates afresh
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_snapshot(exp: Experiment, lay: ResultDir) -> None:
    from ringbench.sweeps.slurm import control_char

    source = exp.path if control_char(str(exp.path)) is None else ascii(str(exp.path))  # a newline would end the comment
    text = (
        f"# resolved copy of {source}, written by ringbench {ringbench.__version__}; "
        f"sweeps and jobs of this directory run it\n" + yaml.safe_dump(exp.resolved(), sort_keys=False)
    )
    if not lay.snapshot.exists() or lay.snapshot.read_text() != text:
        write_atomic(lay.snapshot, text)


# ---------------------------------------------------------------------------------------------
# Launchers: how ranks start
# ---------------------------------------------------------------------------------------------
def default_mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch_prefix(launcher: str, nranks: int, spec: SlurmSpec | None = None) -> list[str]:
    """The command that starts ``nranks`` ranks of what follows it."""
    if launcher == "srun":
        mpi = spec.mpi if spec else "pmi2"
        return ["srun", f"--mpi={mpi}", "--kill-on-bad-exit=1", "-n", str(nranks)]
    mpiexec = spec.mpiexec if spec and spec.mpiexec else default_mpiexec()
    return [mpiexec, "-n", str(nranks)]


def run_command(point: Point, out: Path, launcher: str, spec: SlurmSpec | None = None) -> list[str]:
    from ringbench.config import to_argv

    return [
        *launch_prefix(launcher, point.nranks, spec),
        sys.executable,
        "-m",
        "ringbench",
        "run",
        *to_argv(point.config),
        "--out",
        str(out),
    ]


def source_root() -> Path:
    """The directory holding the ringbench package that is running (put first on the children's path)."""
    return Path(ringbench.__file__).resolve().parent.parent


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    root = str(source_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------
# One point
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # "ok" or "failed"
    seconds: float
    error: str = ""
    run: store.Run | None = None


def run_point(
    point: Point, lay: ResultDir, launcher: str, timeout: float, spec: SlurmSpec | None = None, env: dict | None = None
) -> Outcome:
    """Run one point as a subprocess (``env``: variables added to its environment); a failure (exit status, timeout,
    signal) is stored as a failed run."""
    part = lay.part(point.id)
    cmd = run_command(point, part, launcher, spec)
    log = lay.log(point.id)
    earlier = store.latest(part).get(point.id) if part.exists() else None
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"# {utc_now()} {shlex.join(cmd)}\n".encode())
        fh.flush()
        start = fh.tell()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=child_env(env), start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
            why = _exit_reason(rc)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            why = f"timed out after {timeout:g} s (killed)"
        except BaseException:
            _kill_group(proc)
            raise
    seconds = time.monotonic() - t0
    latest = store.latest(part).get(point.id) if part.exists() else None
    if why is None and (latest is None or latest.status != "ok"):
        why = "exit status 0 but no run was stored"
    if why is None:
        return Outcome("ok", seconds, run=latest)
    tail = _tail(log, start)
    error = f"{why}: {tail}" if tail else why
    checked = latest is not None and latest.status == "ok" and (earlier is None or latest.run_id != earlier.run_id)
    reason = check_reason(latest) if checked else None
    if reason:  # the run was stored, its --check failed (exit status 1): that is the reason, not the run's banner
        error = f"{reason}\n{tail}" if tail else reason
    store.append(part, store.failed_run(point.id, point.nranks, point.config.to_dict(), error, {"argv": shlex.join(cmd)}))
    return Outcome("failed", seconds, error=error)


def check_reason(run: store.Run | None) -> str | None:
    """``check failed: dq rel err 1.37 (tol 2e-05)`` for a stored run whose --check failed, else None."""
    return None if run is None else store.check_failure(run)


def _exit_reason(rc: int) -> str | None:
    if rc == 0:
        return None
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def _kill_group(proc: subprocess.Popen) -> None:
    """End the launcher and everything it started (its own process group): TERM, a grace period, KILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
    proc.wait()


def _tail(log: Path, start: int) -> str:
    with open(log, "rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()][-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]


# ---------------------------------------------------------------------------------------------
# Point states
# ---------------------------------------------------------------------------------------------
def stored(exp: Experiment, lay: ResultDir) -> dict[str, store.Run]:
    """The latest stored run of each point (parts first, else the collected file).

    A run counts for the point whose id is recomputed from its stored configuration and rank count
    (``config.stored_point_id``), not for the id string it carries: a part or collected file written with the
    older 8-hex-digit ids still marks its points as done. Such a part file has the old id as its name.
    """
    state = {}
    collected = runs_by_point(lay.collected)
    have = {f.stem for f in lay.parts.glob("*.h5")} if lay.parts.is_dir() else set()
    legacy = any(_LEGACY_STEM.search(stem) for stem in have)  # files of a sweep from before the longer ids
    for p in exp.points:
        names = [p.id] + ([legacy_point_id(p.config, p.nranks)] if legacy else [])
        runs = [runs_by_point(lay.part(name)).get(p.id) for name in names if name in have]
        runs = [r for r in runs if r is not None]
        run = max(runs, key=_order) if runs else collected.get(p.id)
        if run is not None:
            state[p.id] = run
    return state


_LEGACY_STEM = re.compile(rf"-[0-9a-f]{{{LEGACY_ID_HEX}}}$")


def runs_by_point(path: Path) -> dict[str, store.Run]:
    """The latest run of each point in result file ``path`` (no samples), keyed by the point id recomputed
    from the run's configuration; empty if the file does not exist."""
    out: dict[str, store.Run] = {}
    if not path.exists():
        return out
    for run in store.read(path, samples=False):
        pid = stored_point_id(run.config, run.nranks, run.point_id)
        if pid not in out or _order(run) > _order(out[pid]):
            out[pid] = run
    return out


def _order(run: store.Run) -> tuple:
    """Later runs sort higher: by creation time, then by the ~k suffix that append gives repeats of a point."""
    _, _, k = run.name.partition("~")
    return (run.created_utc, int(k) if k.isdigit() else 1)


def todo(exp: Experiment, lay: ResultDir, points: list[Point], force: bool) -> tuple[list[Point], int]:
    """The points to run (those not done, or all with force) and how many are skipped as done."""
    if force:
        return list(points), 0
    state = stored(exp, lay)
    run = [p for p in points if p.id not in state or state[p.id].status != "ok"]
    return run, len(points) - len(run)


def read_tasks(path: Path, task: int, exp: Experiment) -> list[Point]:
    """The points of array task ``task`` (line ``task`` of a .tasks file, counting from 0)."""
    lines = [ln.split("#")[0].split() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not 0 <= task < len(lines):
        raise ExperimentError(f"{path}: task {task} does not exist; the file lists tasks 0..{len(lines) - 1}")
    points = []
    for pid in lines[task]:
        p = exp.point(pid)
        if p is None:
            raise ExperimentError(f"{path}: point {pid} of task {task} is not in experiment {exp.name}")
        points.append(p)
    return points


def collect(lay: ResultDir) -> tuple[int, int, int]:
    """Merge every part file into the collected file. Returns (files, runs added, runs already present)."""
    parts = sorted(lay.parts.glob("*.h5")) if lay.parts.is_dir() else []
    if not parts:
        return 0, 0, 0
    added, present = store.merge(lay.collected, parts)
    return len(parts), added, present


def load_jobs(lay: ResultDir) -> list[dict]:
    if not lay.jobs.exists():
        return []
    return json.loads(lay.jobs.read_text())


def record_job(lay: ResultDir, entry: dict) -> None:
    jobs = load_jobs(lay)
    jobs.append(entry)
    write_atomic(lay.jobs, json.dumps(jobs, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Commands' bodies: plan, sweep, submit, status (printing; the CLI parses and dispatches)
# ---------------------------------------------------------------------------------------------
def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _params(exp: Experiment) -> list[str]:
    return [k for k in exp.swept_keys() if k != "ranks"]


def _state_word(run: store.Run | None) -> str:
    return "-" if run is None else ("done" if run.status == "ok" else "failed")


def _shapes(exp: Experiment, points: list[Point]) -> dict[int, list[list[Point]]]:
    """Points grouped by rank count (one job array each), chunked into array tasks."""
    per = exp.slurm.points_per_task if exp.slurm else 1
    by: dict[int, list[Point]] = {}
    for p in points:
        by.setdefault(p.nranks, []).append(p)
    return {n: [ps[i : i + per] for i in range(0, len(ps), per)] for n, ps in sorted(by.items())}


def plan_text(exp: Experiment, lay: ResultDir) -> str:
    state = stored(exp, lay) if lay.parts.is_dir() or lay.collected.exists() else {}  # nothing stored yet: no file to look at
    keys = _params(exp)
    rows = [["#", "id", "P", *keys, "GFLOP", "state"]]
    work = 0.0
    for i, p in enumerate(exp.points, 1):
        w = p.work()
        work += w
        rows.append([str(i), p.id, str(p.nranks), *(fmt_value(p.params[k]) for k in keys), f"{w / 1e9:.3g}", _state_word(state.get(p.id))])
    head = [
        (
            f"experiment {exp.name} ({exp.path}): {len(exp.points)} points, {exp.excluded} excluded; "
            f"estimated work {work / 1e9:.3g} GFLOP (warm-ups and repeats)"
        ),
        f"  results: {lay.collected} (per point: {lay.parts}/<id>.h5)",
    ]
    if exp.description:
        head.insert(1, f"  {exp.description}")
    if exp.slurm is not None:
        arrays = ", ".join(f"P={n} x {len(tasks)} task(s)" for n, tasks in _shapes(exp, exp.points).items())
        prof = f" (profile {exp.slurm.profile})" if exp.slurm.profile else ""
        head.append(f"  slurm{prof}: launcher {exp.slurm.launcher}; job arrays {arrays}")
    return "\n".join(head) + "\n\n" + _table(rows)


def _point_result(run: store.Run | None) -> str:
    if run is None or not run.summary:
        return ""
    s = run.summary
    text = f"time {s.get('time_s', float('nan')) * 1e3:.2f} ms  {s.get('tflops', float('nan')):.3f} TFLOP/s"
    failed = check_reason(run)
    if failed:
        text += f"  {failed}"
    elif any(run.phase(p).check for p in run.phases()):
        text += "  check ok"
    return text


class _Progress:
    """A one-line bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int):
        self.total, self.tty = total, sys.stderr.isatty()

    def show(self, done: int, current: str) -> None:
        if self.tty and self.total:
            fill = round(20 * done / self.total)
            sys.stderr.write(f"\r\033[K[{'#' * fill}{'.' * (20 - fill)}] {done}/{self.total} running {current}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def one_exponential(points: list[Point]) -> tuple[dict, str]:
    """The environment that fixes the exponential of the native NumPy kernel for every point of this sweep, and a
    phrase saying which: $RINGBENCH_EXP if set (inherited as it is); else, when every point runs that kernel, the
    one this machine measures fastest now (``kernel.exp_base``, once). Each run would otherwise measure its own, and
    on a loaded machine two runs of one sweep can pick different ones: their times (and the bitwise identity of
    their outputs) would then differ for a reason that is not the point's. Other backends or kernels: each run's own."""
    from ringbench.kernels import kernel

    given = os.environ.get(kernel.EXP_ENV, "")
    if given and given != "auto":
        return {}, f"{given} ({kernel.EXP_ENV})"
    if not points or any(p.config.backend != "numpy" or p.config.kernel != "native" for p in points):
        return {}, "each run's own (not every point runs the native NumPy kernel)"
    name = kernel.exp_base(choice="auto").name
    return {kernel.EXP_ENV: name}, f"{name} (measured once for the sweep; {kernel.EXP_ENV} overrides)"


def run_sweep(exp: Experiment, lay: ResultDir, points: list[Point], *, launcher: str, force: bool, collect_after: bool) -> int:
    """Run the points not yet done, one line per finished point; 0 if all ok, 1 if any failed."""
    run, skipped = todo(exp, lay, points, force)
    env, exp_text = one_exponential(run)
    print(
        f"sweep {exp.name}: {len(points)} points, {skipped} already done (skipped), {len(run)} to run "
        f"with {launcher}; results in {lay.root}; exponential {exp_text}",
        flush=True,
    )
    bar, failed, width = _Progress(len(run)), 0, len(str(len(run)))
    for i, p in enumerate(run, 1):
        bar.show(i - 1, p.id)
        out = run_point(p, lay, launcher, exp.timeout, exp.slurm, env)
        bar.clear()
        head = f"[{i:{width}d}/{len(run)}] {'ok' if out.status == 'ok' else 'FAILED':6s} {out.seconds:6.1f}s  {p.id}"
        if out.status == "ok":
            print(f"{head}  {_point_result(out.run)}", flush=True)
        else:
            failed += 1
            last = out.error.splitlines()[-1] if out.error else ""
            print(f"{head}  {out.error.splitlines()[0]}" + (f" ... {last}" if last and "\n" in out.error else ""), flush=True)
    tail = ""
    if collect_after:
        files, added, _ = collect(lay)
        if files:
            tail = f"; collected into {lay.collected} ({added} new runs)"
    retry = " (run the same command again to retry the failed points)" if failed else ""
    print(f"sweep {exp.name}: {len(run) - failed} ok, {failed} failed{retry}{tail}", flush=True)
    return 1 if failed else 0


def submit_arrays(exp: Experiment, lay: ResultDir, points: list[Point], *, dry_run: bool, force: bool, workdir: Path) -> int:
    """Write one job-array script per rank count for ``points`` and (unless dry_run) sbatch them."""
    from ringbench.sweeps import slurm

    spec = exp.slurm or SlurmSpec()
    template_path = Path(spec.template or slurm.TEMPLATE)
    # a job script is no more readable than its template (the owner may always read and write it)
    script_mode = (template_path.stat().st_mode & 0o666) | 0o600
    try:
        template = template_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ExperimentError(f"{template_path}: job script template is not UTF-8 text") from None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    python = spec.python or sys.executable
    root = source_root()
    pythonpath = str(root) if python == sys.executable and not _installed(root) else None
    for nranks, tasks in _shapes(exp, points).items():
        base = lay.scripts / f"{stamp}-P{nranks}"
        job = slurm.JobArray(
            experiment=exp.name,
            nranks=nranks,
            ntasks=len(tasks),
            job_name=f"{spec.job_name or 'rb-' + exp.name}-P{nranks}",
            time=spec.time or default_time(exp),
            snapshot=lay.snapshot.resolve(),
            results=lay.results.resolve(),
            tasks=base.with_suffix(".tasks").resolve(),
            script=base.with_suffix(".sbatch").resolve(),
            logs=lay.logs.resolve(),
            workdir=workdir,
            python=python,
            launcher=spec.launcher,
            force=force,
            pythonpath=pythonpath,
        )
        write_atomic(job.tasks, "".join(" ".join(p.id for p in t) + "\n" for t in tasks))
        write_atomic(job.script, slurm.render(job, spec, template, ringbench.__version__, utc_now()), script_mode)
        if dry_run:
            print(f"wrote {job.script} (P={nranks}, {len(tasks)} array tasks; not submitted)")
            continue
        job_id = slurm.submit(job.script)
        record_job(
            lay,
            {
                "job_id": job_id,
                "nranks": nranks,
                "script": str(job.script),
                "tasks": str(job.tasks),
                "points": [[p.id for p in t] for t in tasks],
                "submitted_utc": utc_now(),
            },
        )
        print(f"submitted job {job_id}: {job.script.name} (P={nranks}, {len(tasks)} array tasks)", flush=True)
    return 0


def _installed(root: Path) -> bool:
    import site

    paths = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    return root in paths


QUEUED = ("PENDING", "REQUEUED", "SUSPENDED", "CONFIGURING", "RUNNING", "COMPLETING")
RUNNING = ("CONFIGURING", "RUNNING", "COMPLETING")


def _submitted(jobs: list[dict]) -> dict[str, tuple[str, int]]:
    """Each submitted point's latest (job id, array task)."""
    where = {}
    for job in jobs:
        for k, ids in enumerate(job["points"]):
            for pid in ids:
                where[pid] = (job["job_id"], k)
    return where


def queued_points(lay: ResultDir) -> set[str]:
    """Points whose latest array task is still pending or running (so submit does not queue them twice)."""
    from ringbench.sweeps import slurm

    jobs = load_jobs(lay)
    if not jobs:
        return set()
    queued = slurm.queue(sorted({j["job_id"] for j in jobs}, key=int))
    return {pid for pid, job in _submitted(jobs).items() if queued.get(job) in QUEUED}


_REASON_RE = re.compile(r"^(timed out after .*? \(killed\)|killed by signal \S+|exit status \d+)(: |$)")


def failure_detail(error: str, log: Path) -> str:
    """One line for a failed point: the launcher's reason (a timeout, a signal) or the error's first line, and the log."""
    first = error.splitlines()[0] if error else "failed"
    m = _REASON_RE.match(first)
    rest = first[m.end() :] if m else ""
    if m and not (first.startswith("exit status") and any(c.isalnum() for c in rest)):
        first = m.group(1)  # what followed is the launcher's banner ('=====') or nothing: the log has it
    return f"{first}; log {log}" if log.exists() else first


def status_text(exp: Experiment, lay: ResultDir) -> str:
    """Each point's state: done, failed, running, pending (in the queue), missing (submitted, gone), not run."""
    from ringbench.sweeps import slurm

    state = stored(exp, lay)
    jobs = load_jobs(lay)
    where = _submitted(jobs)
    note = ""
    try:
        queued = slurm.queue(sorted({j["job_id"] for j in jobs}, key=int))
    except slurm.SlurmError as exc:
        queued, note = {}, f"  note: {exc}"
    rows, counts = [["id", "P", "state", "detail"]], {}
    for p in exp.points:
        run, job = state.get(p.id), where.get(p.id)
        q = queued.get(job) if job else None
        if q in QUEUED:
            word = "running" if q in RUNNING else "pending"
            detail = f"job {job[0]}_{job[1]} {q.lower()}" + (" (retry)" if run is not None else "")
        elif run is not None:
            word = _state_word(run)
            detail = _point_result(run) if run.status == "ok" else failure_detail(run.error, lay.log(p.id))
        elif job:
            word, detail = "missing", f"job {job[0]}_{job[1]} ended without a result; see {lay.logs}"
        else:
            word, detail = "not run", ""
        counts[word] = counts.get(word, 0) + 1
        rows.append([p.id, str(p.nranks), word, detail])
    summary = ", ".join(f"{n} {w}" for w, n in counts.items())
    head = [f"experiment {exp.name} ({lay.root}): {len(exp.points)} points: {summary}"]
    if jobs:
        head.append("  jobs: " + ", ".join(f"{j['job_id']} (P={j['nranks']}, {len(j['points'])} tasks)" for j in jobs))
    if note:
        head.append(note)
    return "\n".join(head) + "\n\n" + _table(rows)
