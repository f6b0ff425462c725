"""Slurm as a scheduler: render a job-array script (a pure function), submit it, ask the queue.

The script runs ``ringbench sweep`` on the experiment's resolved copy for the points of one array task;
that sweep starts each point's ranks with the configured launcher (``srun`` or ``mpiexec``, see
ringbench.sweeps.sweep). One job array per resource shape (the rank count), one array task per chunk of
``points_per_task`` points. Every value that reaches the script was validated on load
(ringbench.sweeps.experiment) and is quoted here: shell-quoted in the body, and quoted as sbatch reads them in
``#SBATCH`` lines (:func:`sbatch_words`, which sbatch 22.05 was checked against). No value may hold a control
character (:func:`control_char`): a newline would end a comment or an ``#SBATCH`` line, and sbatch stops
reading options at the first line that is not a comment.
"""

from __future__ import annotations

import math
import shlex
import string
import subprocess
import unicodedata
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


# ---------------------------------------------------------------------------------------------
# what may reach a job script, and how sbatch reads an #SBATCH line
# ---------------------------------------------------------------------------------------------
_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\0": "a NUL", "\x7f": "a DEL"}


def control_char(text: str) -> str | None:
    """The first control character of ``text`` (C0 including tab and newline, DEL, C1, the Unicode line and
    paragraph separators), or None: none of them may reach a job script."""
    for c in text:
        if unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return c
    return None


def control_problem(text: str) -> str | None:
    """One clause naming the control character of ``text`` (``"contains a newline (U+000A)"``), or None."""
    c = control_char(text)
    if c is None:
        return None
    return f"contains {_NAMES.get(c, 'a control character')} (U+{ord(c):04X}), which no value in a job script may hold"


_SBATCH_SPACE = " \t\n\v\f\r"  # C isspace(): what separates the words of an #SBATCH line
_SBATCH_SPECIAL = set(_SBATCH_SPACE) | set("\"'\\#")


def sbatch_words(text: str) -> list[str]:
    """The words sbatch reads from the rest of an ``#SBATCH`` line, as Slurm's get_argument (22.05) reads them.

    Whitespace separates words; ``'...'`` and ``"..."`` group characters (either quote may hold the other); a
    backslash takes the next character literally, inside quotes too; an unquoted ``#`` ends the line (a
    comment), and so does a word of no characters (``""``). ValueError for an unmatched quote or a word that
    starts with ``:`` (sbatch refuses both)."""
    words, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in _SBATCH_SPACE:
            i += 1
        if i < n and text[i] == ":":
            raise ValueError("a word may not start with ':' (sbatch: unexpected `:`)")
        word, quote, escape = [], None, False
        while i < n and text[i] != "\n" and (quote or text[i] not in _SBATCH_SPACE):
            c = text[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quote:
                if c == quote:
                    quote = None
                    continue
            elif c in "\"'":
                quote = c
                continue
            elif c == "#":
                i = n  # the rest of the line is a comment
                break
            word.append(c)
        if quote:
            raise ValueError(f"unmatched {quote} (sbatch: unmatched `{quote}`)")
        if not word:
            return words
        words.append("".join(word))


def sbatch_quote(word: str) -> str:
    """``word`` written so that :func:`sbatch_words` (and sbatch) read it back as one word, unchanged: bare when
    it holds nothing special, else in double quotes with ``\\`` and ``"`` escaped by a backslash."""
    if word and word[0] != ":" and not _SBATCH_SPECIAL.intersection(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_option(name: str, value) -> str:
    """``--name=value`` with the value quoted for an ``#SBATCH`` line."""
    return f"--{name}={sbatch_quote(str(value))}"


def output_pattern(directory: Path) -> str:
    """The ``--output`` file pattern of the array tasks' logs in ``directory``: a ``%`` of the path doubled
    (sbatch expands ``%x``, ``%A`` ... in it). A path with a backslash cannot be used: sbatch then drops the
    backslash and expands nothing (SlurmError)."""
    text = str(directory)
    if "\\" in text:
        raise SlurmError(
            f"{text}: a log directory with a backslash cannot be given to sbatch --output "
            f"(sbatch drops the backslash and expands none of %x %A %a); choose a results directory without one"
        )
    return text.replace("%", "%%") + "/%x-%A_%a.out"


def check_script_value(what: str, value: str) -> None:
    """SlurmError (one line naming ``what``) when ``value`` holds a control character."""
    problem = control_problem(str(value))
    if problem:
        raise SlurmError(f"{what}: {str(value)!r} {problem}")


def _check_job(job: JobArray, spec) -> None:
    """Every value that reaches the script is free of control characters (a last guard: the experiment's
    values were checked on load, the command line's options by ``submit``)."""
    for key in ("experiment", "job_name", "time", "snapshot", "results", "tasks", "script", "logs", "workdir", "python"):
        check_script_value(key, getattr(job, key))
    if job.pythonpath:
        check_script_value("PYTHONPATH", job.pythonpath)
    for key in ("partition", "account", "qos", "constraint"):
        check_script_value(f"slurm.{key}", getattr(spec, key) or "")
    for i, v in enumerate(list(spec.sbatch) + list(spec.setup)):
        check_script_value("slurm.sbatch" if i < len(spec.sbatch) else "slurm.setup", v)
    for k, v in spec.env.items():
        check_script_value(f"slurm.env.{k}", f"{k}={v}")


def sbatch_options(job: JobArray, spec) -> list[str]:
    """The ``#SBATCH`` options of a job array, in a fixed order, each quoted as sbatch reads it."""
    opts = [sbatch_option("job-name", job.job_name), f"--array=0-{job.ntasks - 1}", f"--ntasks={job.nranks}"]
    per_node = spec.ntasks_per_node or spec.gpus_per_node
    if per_node:
        opts += [f"--nodes={math.ceil(job.nranks / per_node)}", f"--ntasks-per-node={min(job.nranks, per_node)}"]
    opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    opts.append(sbatch_option("time", job.time))
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            opts.append(sbatch_option(key, getattr(spec, key)))
    opts += [sbatch_option("output", output_pattern(job.logs)), sbatch_option("chdir", job.workdir)]
    opts += list(spec.sbatch)  # each already one line of quoted words (ringbench.sweeps.experiment)
    return opts


def render(job: JobArray, spec, template: str, version: str, utc: str) -> str:
    """The text of the job script: a pure function of its inputs. SlurmError if a value holds a control character."""
    _check_job(job, spec)
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
