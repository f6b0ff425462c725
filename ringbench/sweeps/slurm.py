"""Slurm as a scheduler: render a job-array script (a pure function), submit it, ask the queue.

The script runs ``ringbench sweep`` on the experiment's resolved copy for the points of one array task;
that sweep starts each point's ranks with the configured launcher (``srun`` or ``mpiexec``, see
ringbench.sweeps.sweep). One job array per resource shape (the rank count), one array task per chunk of
``points_per_task`` points. Every value that reaches the script was validated on load
(ringbench.sweeps.experiment) and is shell-quoted here.
"""

from __future__ import annotations

import math
import shlex
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "templates" / "sbatch.sh"


class SlurmError(Exception):
    """sbatch or squeue failed; the text is one line with the tool's own message."""


@dataclass
class JobArray:
    """What one job array needs, all validated: the input of the pure renderer."""

    experiment: str  # experiment name
    nranks: int
    ntasks: int  # array tasks
    job_name: str
    time: str
    snapshot: Path  # the resolved experiment file the tasks run
    results: Path  # the results directory (parent of <experiment>/)
    tasks: Path  # the .tasks file: line K lists the point ids of array task K
    script: Path  # where the script is written (for its own comment)
    logs: Path
    workdir: Path
    python: str
    launcher: str
    force: bool = False
    pythonpath: str | None = None  # prepended to PYTHONPATH in the job when ringbench is not installed


def sbatch_options(job: JobArray, spec) -> list[str]:
    """The ``#SBATCH`` options of a job array, in a fixed order."""
    opts = [f"--job-name={job.job_name}", f"--array=0-{job.ntasks - 1}", f"--ntasks={job.nranks}"]
    per_node = spec.ntasks_per_node or spec.gpus_per_node
    if per_node:
        opts += [f"--nodes={math.ceil(job.nranks / per_node)}", f"--ntasks-per-node={min(job.nranks, per_node)}"]
    opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    opts.append(f"--time={job.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            opts.append(f"--{key}={getattr(spec, key)}")
    opts += [f"--output={job.logs}/%x-%A_%a.out", f"--chdir={job.workdir}"]
    opts += list(spec.sbatch)
    return opts


def render(job: JobArray, spec, template: str, version: str, utc: str) -> str:
    """The text of the job script: a pure function of its inputs."""
    q = shlex.quote
    setup = list(spec.setup)  # each already one re-quoted simple command
    setup += [f"export {k}={q(v)}" for k, v in spec.env.items()]
    if job.pythonpath:
        setup.append(f"export PYTHONPATH={q(job.pythonpath)}" + "${PYTHONPATH:+:$PYTHONPATH}")
    command = [
        q(job.python),
        "-m",
        "ringbench",
        "sweep",
        q(str(job.snapshot)),
        "--results",
        q(str(job.results)),
        "--launcher",
        job.launcher,
        "--tasks",
        q(str(job.tasks)),
        "--task",
        '"$SLURM_ARRAY_TASK_ID"',
    ]
    if job.force:
        command.append("--force")
    values = {
        "experiment": job.experiment,
        "nranks": job.nranks,
        "ntasks": job.ntasks,
        "version": version,
        "utc": utc,
        "tasks": q(str(job.tasks)),
        "launcher": job.launcher,
        "parts": q(str(job.results / job.experiment / "parts")),
        "script": q(str(job.script)),
        "sbatch": "\n".join(f"#SBATCH {o}" for o in sbatch_options(job, spec)),
        "setup": "\n".join(setup),
        "command": " ".join(command),
    }
    try:
        return string.Template(template).substitute(values)
    except (KeyError, ValueError) as exc:
        raise SlurmError(
            f"job script template: bad placeholder {exc}; allowed: {', '.join('$' + k for k in values)} ($$ for a literal $)"
        ) from None


def sbatch_lines(script: str) -> set[str]:
    """The set of ``#SBATCH`` lines of a script (what golden tests compare)."""
    return {ln.strip() for ln in script.splitlines() if ln.startswith("#SBATCH")}


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; the job id, or SlurmError with sbatch's own message."""
    try:
        res = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        raise SlurmError(
            "sbatch not found: is this a Slurm login node? (or start slurm/localcluster.sh up and export SLURM_CONF)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError("sbatch did not answer within 120 s") from None
    if res.returncode != 0:
        msg = " ".join(res.stderr.split()) or f"exit status {res.returncode}"
        raise SlurmError(f"sbatch failed for {script}: {msg}")
    job_id = res.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {res.stdout.strip()!r}, not a job id")
    return job_id


def queue(job_ids: list[str]) -> dict[tuple[str, int], str]:
    """State of each array task still known to the queue: {(job id, task): 'PENDING' | 'RUNNING' | ...}.

    One squeue call for all jobs of an experiment; finished jobs leave the queue (no accounting needed:
    what they did is read from the result files). SlurmError if squeue cannot be asked.
    """
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%F %K %T"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise SlurmError("squeue not found: queue state unknown") from None
    except subprocess.TimeoutExpired:
        raise SlurmError("squeue did not answer within 60 s") from None
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return {}  # every job has left the queue
        raise SlurmError(f"squeue failed: {' '.join(res.stderr.split())}")
    out = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            out[(parts[0], int(parts[1]))] = parts[2]
    return out
