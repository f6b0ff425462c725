"""Experiment files: one YAML file describes one experiment, expanded into sweep points.

An experiment names base values for every run option, the swept parameters (a cartesian ``matrix``, ``zip``
groups that vary together, ``exclude`` rules), the rank counts, the per-point timeout and, optionally, a
``slurm`` section (possibly from a site profile under ``slurm/profiles/``). The format is documented in
docs/experiments.md.

Everything is validated on load, before anything runs. A problem raises :class:`ExperimentError` whose text
is one line naming the file, the line where known, and the key path::

    experiments/scale.yaml:7: matrix.seq_len[2]: expected an integer, got 'abc'

Only ``yaml.safe_load`` builds values; the node tree of ``yaml.compose`` (SafeLoader) gives line numbers.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ringbench.config import (
    ConfigError,
    RunConfig,
    coerce,
    did_you_mean,
    point_id,
    validate,
)
from ringbench.sweeps import slurm
from ringbench.yamlfile import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, ExperimentError, Source, fmt_path, read_regular_file  # noqa: F401

TOP_KEYS = ("name", "description", "base", "matrix", "zip", "exclude", "ranks", "timeout", "slurm")
RANKS = "ranks"
SWEEP_KEYS = tuple(RunConfig.field_names()) + (RANKS,)
DEFAULT_TIMEOUT_S = 600
MAX_TIMEOUT_S = 7 * 86400  # a point's timeout: at most a week (1e300 s made a Slurm --time of 300 digits)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: $ would let a trailing newline through
PROFILE_RE = NAME_RE  # a profile is named, never a path: slurm/profiles/NAME.yaml
MAX_POINTS = 100_000  # the most points an experiment may expand to (before exclude rules)


def _mapping(src: Source, path: tuple, value, allowed=None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        got = _kind(value) if path == () else _show(value)  # a whole file is never echoed
        raise src.error(path, f"expected a mapping of keys to values, got {got}")
    for key in value:
        if not isinstance(key, str):
            raise src.error(path, f"keys must be strings, got {key!r}")
        if allowed is not None and key not in allowed:
            raise src.error(path + (key,), f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
    return value


def _list(src: Source, path: tuple, value, *, allow_scalar: bool = False) -> list:
    if isinstance(value, list):
        if not value:
            raise src.error(path, "expected a non-empty list")
        return value
    if allow_scalar and value is not None and not isinstance(value, dict):
        return [value]
    raise src.error(path, f"expected a list, got {_show(value)}")


def _show(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _kind(value) -> str:
    """What a value is, without its content."""
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return _show(value)
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _value(src: Source, path: tuple, key: str, value):
    """A run option (or ``ranks``) value checked and normalised; errors name ``path``."""
    if key == RANKS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise src.error(path, f"expected a positive integer rank count, got {value!r}")
        return value
    try:
        return coerce(key, value)
    except ConfigError as exc:
        raise src.error(path, exc.message) from None


def _axis_values(src: Source, path: tuple, key: str, values) -> list:
    values = [_value(src, path + (i,), key, v) for i, v in enumerate(_list(src, path, values))]
    first: dict = {}
    for i, v in enumerate(values):  # one axis holds one type, so a dict finds repeats in O(n)
        if first.setdefault(v, i) != i:
            raise src.error(path + (i,), f"{v!r} is listed twice")
    return values


# ---------------------------------------------------------------------------------------------
# Slurm settings (the section of an experiment, or a site profile)
# ---------------------------------------------------------------------------------------------
LAUNCHERS = ("srun", "mpiexec")
_WORD = r"[A-Za-z0-9_.+-]+"
_PATTERNS = {
    "partition": (re.compile(rf"{_WORD}(,{_WORD})*"), "a partition name (letters, digits, _ . + -, comma-separated)"),
    "account": (re.compile(_WORD), "an account name (letters, digits, _ . + -)"),
    "qos": (re.compile(_WORD), "a QOS name (letters, digits, _ . + -)"),
    "constraint": (re.compile(r"[A-Za-z0-9_.,:&|\[\]*()!+-]+"), "a feature expression without spaces, e.g. 'a100&ib'"),
    "time": (re.compile(r"\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2}"), "a Slurm time limit: MM, HH:MM:SS or D-HH:MM:SS"),
    "job_name": (NAME_RE, "letters, digits, _ . - (at most 64, not starting with . - _)"),
    "mpi": (re.compile(r"[a-z0-9_]+"), "an srun --mpi plugin name such as pmi2"),
}
_INTS = {"gpus_per_node": 0, "cpus_per_task": 1, "ntasks_per_node": 1, "points_per_task": 1}
_PATHS = ("python", "mpiexec", "template")
SLURM_KEYS = (
    "profile",
    "partition",
    "account",
    "qos",
    "time",
    "constraint",
    "job_name",
    "gpus_per_node",
    "cpus_per_task",
    "ntasks_per_node",
    "points_per_task",
    "sbatch",
    "setup",
    "env",
    "launcher",
    "mpi",
    "python",
    "mpiexec",
    "template",
)
PROFILE_KEYS = tuple(k for k in SLURM_KEYS if k != "profile")
# sbatch options ringbench sets itself from other keys: extra lines may not repeat them
RESERVED_SBATCH = {
    "array": None,
    "job-name": "job_name",
    "output": None,
    "error": None,
    "ntasks": None,
    "nodes": "ntasks_per_node or gpus_per_node",
    "ntasks-per-node": "ntasks_per_node",
    "chdir": None,
    "parsable": None,
    "wait": None,
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time",
    "constraint": "constraint",
    "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
}
# sbatch options that would replace, redirect or not run the job script: never allowed
FORBIDDEN_SBATCH = {
    "wrap": "it replaces the job script with a command",
    "input": "it redirects the job script's standard input",
    "test-only": "it submits nothing",
}
# full sbatch options that are also abbreviations of a reserved one (sbatch, like getopt, takes any unique prefix)
_FULL_PREFIXES = {"gpus"}
_SBATCH_OPTION_RE = re.compile(r"--([a-z][a-z0-9-]*)(=.+)?", re.DOTALL)  # one word, matched whole
_HETJOB_WORDS = ("hetjob", "packjob")  # a word sbatch reads as the start of another job component
_SHELL_META = ";&|<>`$(){}\\"
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # matched whole (fullmatch)


@dataclass
class SlurmSpec:
    """Where and how a job array runs on a Slurm cluster (all values validated: safe to render)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # None: derived from points_per_task x timeout
    constraint: str | None = None
    job_name: str | None = None  # prefix of the job names; default rb-<experiment name>
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    ntasks_per_node: int | None = None
    points_per_task: int = 1
    sbatch: list = field(default_factory=list)  # extra '#SBATCH' options, e.g. '--mem=8G'
    setup: list = field(default_factory=list)  # simple commands run before the sweep (module load ...)
    env: dict = field(default_factory=dict)  # exported variables
    launcher: str = "srun"
    mpi: str = "pmi2"
    python: str | None = None  # default: the python that submits
    mpiexec: str | None = None  # default: mpiexec beside that python, else on PATH
    template: str | None = None  # default: ringbench/sweeps/templates/sbatch.sh
    profile: str | None = None  # the profile the values came from (for the record)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in PROFILE_KEYS if getattr(self, k) not in (None, [], {})}


def _no_control(src: Source, path: tuple, value: str) -> None:
    """Refuse a value with a control character (a newline would end a line of the job script)."""
    problem = slurm.control_problem(value)
    if problem:
        raise src.error(path, f"{value!r} {problem}")


def _slurm_values(src: Source, path: tuple, data: dict, out: dict) -> None:
    """Validate the slurm keys of ``data`` (from ``src`` at ``path``) into ``out``."""
    for key, value in data.items():
        p = path + (key,)
        if key == "profile":
            continue
        if value is None:
            out[key] = None
        elif key in _PATTERNS:
            regex, what = _PATTERNS[key]
            if isinstance(value, int) and not isinstance(value, bool) and key == "time":
                value = str(value)
            if not isinstance(value, str) or not regex.fullmatch(value):
                raise src.error(p, f"expected {what}, got {value!r}")
            out[key] = value
        elif key in _INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
                raise src.error(p, f"expected an integer >= {_INTS[key]}, got {value!r}")
            out[key] = value
        elif key == "launcher":
            if value not in LAUNCHERS:
                raise src.error(p, f"expected one of {', '.join(LAUNCHERS)}; got {value!r}{did_you_mean(value, LAUNCHERS)}")
            out[key] = value
        elif key in _PATHS:
            if not isinstance(value, str) or not value:
                raise src.error(p, f"expected a path, got {value!r}")
            _no_control(src, p, value)
            if key == "template":
                value = _template(src, p, value)
            out[key] = value
        elif key == "sbatch":
            out[key] = [_sbatch_line(src, p + (i,), v) for i, v in enumerate(_list(src, p, value, allow_scalar=True))]
        elif key == "setup":
            out[key] = [_setup_line(src, p + (i,), v) for i, v in enumerate(_list(src, p, value, allow_scalar=True))]
        elif key == "env":
            env = {}
            for name, v in _mapping(src, p, value).items():
                if not _ENV_RE.fullmatch(name):
                    raise src.error(p + (name,), f"expected an environment variable name (letters, digits, _), got {name!r}")
                if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                    raise src.error(p + (name,), f"expected a one-line string or number, got {v!r}")
                _no_control(src, p + (name,), str(v))
                env[name] = str(v)
            out[key] = env


def _template(src: Source, path: tuple, value: str) -> str:
    """A job-script template: a regular file this user can read (a script rendered from it gets its permission bits)."""
    tpl = (src.path.parent / value).resolve()
    try:
        mode = tpl.stat().st_mode
    except OSError:
        raise src.error(path, f"template {value!r} not found (looked at {tpl})") from None
    if not stat.S_ISREG(mode):
        raise src.error(path, f"template {value!r} is not a regular file ({tpl})")
    if not os.access(tpl, os.R_OK):
        raise src.error(path, f"template {value!r} is not readable by this user ({tpl})")
    return str(tpl)


def _sbatch_line(src: Source, path: tuple, value) -> str:
    """One ``slurm.sbatch`` entry, read as sbatch reads an ``#SBATCH`` line (:func:`ringbench.sweeps.slurm.sbatch_words`),
    every option in it checked; returned as those words re-quoted, so the rendered line holds exactly what was checked.

    Each word is a long option ``--name`` or ``--name=value``, or the value of the option before it
    (``--mem 8G``). Short options, a stray word and the heterogeneous-job separator are refused, so no word can
    set an option that the checks did not see."""
    example = "such as '--mem=8G' or '--exclusive'"
    if not isinstance(value, str):
        raise src.error(path, f"expected a long sbatch option {example}, got {value!r}")
    _no_control(src, path, value)
    try:
        words = slurm.sbatch_words(value)
    except ValueError as exc:
        raise src.error(path, f"sbatch cannot read {value!r}: {exc}") from None
    if not words:
        raise src.error(path, f"expected a long sbatch option {example}, got {value!r} (sbatch reads no option from it)")
    seen = f" (sbatch reads {value!r} as the words {', '.join(map(repr, words))})" if len(words) > 1 else ""
    out, wants_value = [], False
    for word in words:
        if word.lower() in _HETJOB_WORDS:
            raise src.error(path, f"{word!r} starts another component of a heterogeneous job: not allowed{seen}")
        if not word.startswith("-"):
            if not wants_value:
                raise src.error(path, f"{word!r} is not an option: expected a long sbatch option {example}{seen}")
            out.append(slurm.sbatch_quote(word))
            wants_value = False
            continue
        m = _SBATCH_OPTION_RE.fullmatch(word)
        if not m:
            raise src.error(
                path, f"{word!r} is not a long option --name or --name=value (no short options such as -o; spell options out in full){seen}"
            )
        _check_sbatch_option(src, path, m.group(1), seen)
        name, eq, arg = word.partition("=")
        out.append(f"{name}={slurm.sbatch_quote(arg)}" if eq else name)
        wants_value = not eq
    return " ".join(out)


def _check_sbatch_option(src: Source, path: tuple, opt: str, seen: str) -> None:
    """Refuse an sbatch option (a name, or a prefix sbatch would expand) that is forbidden or that ringbench sets itself."""
    if opt in FORBIDDEN_SBATCH:
        raise src.error(path, f"--{opt} may not be given: {FORBIDDEN_SBATCH[opt]}{seen}")
    if opt in RESERVED_SBATCH:
        instead = RESERVED_SBATCH[opt]
        hint = f"use slurm.{instead}" if instead else "ringbench sets it"
        raise src.error(path, f"--{opt} may not be given here: {hint}{seen}")
    full = sorted(k for k in (*FORBIDDEN_SBATCH, *RESERVED_SBATCH) if k.startswith(opt))
    if full and opt not in _FULL_PREFIXES:
        raise src.error(path, f"--{opt} abbreviates --{full[0]}, which may not be given here; spell options out in full{seen}")


def _setup_line(src: Source, path: tuple, value) -> str:
    """A setup line is one simple command (words only): rendered re-quoted, so it cannot run anything else."""
    if not isinstance(value, str):
        raise src.error(path, f"expected a one-line command such as 'module load cuda', got {value!r}")
    _no_control(src, path, value)
    bad = sorted(set(value) & set(_SHELL_META))
    if bad:
        raise src.error(
            path,
            f"a setup line is one simple command; {''.join(bad)!r} is not allowed "
            f"(allowed: words, quotes, = / . - etc.; put anything more in a script and "
            f"'source' it), got {value!r}",
        )
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise src.error(path, f"cannot split {value!r} into words: {exc}") from None
    if not words:
        raise src.error(path, "expected a command, got an empty line")
    return shlex.join(words)


def profile_dirs(exp_path: Path) -> list[Path]:
    """Where ``slurm.profile: NAME`` is looked up, first hit wins."""
    dirs = [Path(d) for d in os.environ.get("RINGBENCH_PROFILES", "").split(os.pathsep) if d]
    here = exp_path.resolve().parent
    dirs += [here / "slurm" / "profiles", here.parent / "slurm" / "profiles", Path.cwd() / "slurm" / "profiles"]
    return dirs


def _load_profile(src: Source, path: tuple, name) -> tuple[Source, dict]:
    if not isinstance(name, str) or not PROFILE_RE.match(name):
        raise src.error(
            path,
            f"expected a profile name (letters, digits, _ . -, not starting with . - _: slurm/profiles/NAME.yaml), got {name!r}",
        )
    candidates = [d / f"{name}.yaml" for d in profile_dirs(src.path)]
    for cand in candidates:
        if cand.is_file():
            prof = Source(cand)
            return prof, _mapping(prof, (), prof.data, PROFILE_KEYS)
    known = sorted({p.stem for d in profile_dirs(src.path) if d.is_dir() for p in d.glob("*.yaml")})
    raise src.error(
        path,
        f"profile {name!r} not found{did_you_mean(name, known)}; "
        f"available: {', '.join(known) or 'none'} (searched {', '.join(map(str, candidates))})",
    )


def load_slurm(src: Source, data) -> SlurmSpec:
    path = ("slurm",)
    data = _mapping(src, path, data, SLURM_KEYS)
    values: dict = {}
    if data.get("profile") is not None:
        prof, pdata = _load_profile(src, path + ("profile",), data["profile"])
        _slurm_values(prof, (), pdata, values)
        values["profile"] = data["profile"]
    _slurm_values(src, path, data, values)
    return SlurmSpec(**{k: v for k, v in values.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Experiments and points
# ---------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One resolved sweep point: a run configuration at a rank count."""

    id: str
    nranks: int
    config: RunConfig
    params: dict  # the swept values that made this point (ranks included), in axis order

    def flops(self) -> float:
        """Floating-point work of one repeat (all ranks): its timed passes', the backward at 2.5 x the forward
        (forward x1, backward x2.5, fwd+bwd x3.5; :func:`backward.phase_flops`, as the runner counts them)."""
        from ringbench.kernels import backward
        from ringbench.layout import unmasked_pairs

        c = self.config
        pairs = unmasked_pairs(c.layout, self.nranks, c.seq_len, c.causal, c.doc_lengths, c.window)
        return sum(backward.phase_flops(phase, c.batch, c.heads, c.head_dim, pairs) for phase in c.phases)

    def work(self) -> float:
        """Estimated floating-point work of the whole point (warm-ups and repeats)."""
        return self.flops() * (self.config.warmup + self.config.repeat)

    def label(self) -> str:
        return " ".join(f"{k}={fmt_value(v)}" for k, v in self.params.items())


def fmt_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class Experiment:
    name: str
    path: str
    description: str
    base: dict
    matrix: dict
    zip: list
    exclude: list
    ranks: list | None  # None when ranks are swept in matrix or zip
    timeout: float
    slurm: SlurmSpec | None
    points: list = field(default_factory=list)
    excluded: int = 0
    _by_id: dict = field(default_factory=dict, repr=False, compare=False)

    def swept_keys(self) -> list[str]:
        keys = list(self.matrix)
        for group in self.zip:
            keys += list(group)
        if self.ranks is not None:
            keys.append(RANKS)
        return keys

    def resolved(self) -> dict:
        """A self-contained copy of the experiment (profile merged in): written beside submitted results."""
        out = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["base"] = dict(self.base)
        if self.matrix:
            out["matrix"] = {k: list(v) for k, v in self.matrix.items()}
        if self.zip:
            out["zip"] = [{k: list(v) for k, v in g.items()} for g in self.zip]
        if self.exclude:
            out["exclude"] = [dict(r) for r in self.exclude]
        if self.ranks is not None:
            out["ranks"] = list(self.ranks)
        out["timeout"] = self.timeout
        if self.slurm is not None:
            out["slurm"] = self.slurm.to_dict()
        return out

    def point(self, pid: str) -> Point | None:
        if len(self._by_id) != len(self.points):
            self._by_id = {p.id: p for p in self.points}
        return self._by_id.get(pid)


def _entries(src: Source, data: dict, key: str) -> list[tuple[tuple, dict]]:
    """The items of a list-of-mappings key (zip, exclude) with their key paths; none may be empty."""
    raw = data.get(key)
    out = []
    for i, item in enumerate(_list(src, (key,), raw) if raw is not None else []):
        item = _mapping(src, (key, i), item, SWEEP_KEYS)
        if not item:
            raise src.error((key, i), "expected a non-empty mapping")
        out.append(((key, i), item))
    return out


def _load_zip(src: Source, data: dict, origin: dict) -> list[dict]:
    """Zip groups: lists of one group advance together, so they must have the same length."""
    groups = []
    for gpath, group in _entries(src, data, "zip"):
        resolved, first = {}, None
        for key, values in group.items():
            if key in origin and origin[key][0] != "base":
                raise src.error(gpath + (key,), f"{key} is already swept in {fmt_path(origin[key])}")
            resolved[key] = _axis_values(src, gpath + (key,), key, values)
            origin[key] = gpath + (key,)
            if first is None:
                first = key
            elif len(resolved[key]) != len(resolved[first]):
                raise src.error(
                    gpath + (key,),
                    f"has {len(resolved[key])} values but {first} has "
                    f"{len(resolved[first])}: zip lists vary together and must "
                    f"have the same length",
                )
        groups.append(resolved)
    return groups


def _load_exclude(src: Source, data: dict) -> list[dict]:
    """Exclude rules: key -> the values (one, or a list) a point must have to be left out."""
    rules = []
    for path, rule in _entries(src, data, "exclude"):
        values = {}
        for k, v in rule.items():
            if isinstance(v, list):
                values[k] = [_value(src, path + (k, i), k, x) for i, x in enumerate(v)]
            else:
                values[k] = [_value(src, path + (k,), k, v)]
        rules.append(values)
    return rules


def load(path, text: str | None = None) -> Experiment:
    """Read, validate and expand an experiment file; ExperimentError (one line) on any problem."""
    src = Source(path, text)
    data = src.data
    if not isinstance(data, dict):
        raise src.error((), f"expected a mapping with keys {', '.join(TOP_KEYS)}, got {_show(data)}")
    _mapping(src, (), data, TOP_KEYS)

    name = data.get("name", src.path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise src.error(("name",), f"expected a name of letters, digits, _ . - (at most 64), got {name!r}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise src.error(("description",), f"expected a string, got {_show(description)}")

    base = {}
    for key, value in _mapping(src, ("base",), data.get("base"), RunConfig.field_names()).items():
        base[key] = _value(src, ("base", key), key, value)

    origin: dict[str, tuple] = {k: ("base", k) for k in base}  # key -> path of the place that sets it
    matrix = {}
    for key, values in _mapping(src, ("matrix",), data.get("matrix"), SWEEP_KEYS).items():
        matrix[key] = _axis_values(src, ("matrix", key), key, values)
        origin[key] = ("matrix", key)
    groups = _load_zip(src, data, origin)

    ranks = None
    if RANKS in origin:
        if "ranks" in data:
            raise src.error(("ranks",), f"ranks are also swept in {fmt_path(origin[RANKS])}; keep one")
    else:
        raw = data.get("ranks", [1])
        ranks = _axis_values(src, ("ranks",), RANKS, raw if isinstance(raw, list) else [raw])
        origin[RANKS] = ("ranks",)

    timeout = data.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise src.error(("timeout",), f"expected a finite positive number of seconds, got {timeout!r}")
    if timeout > MAX_TIMEOUT_S:
        raise src.error(("timeout",), f"expected at most {MAX_TIMEOUT_S} seconds (7 days) per point, got {timeout!r}")

    exclude = _load_exclude(src, data)

    slurm = load_slurm(src, data["slurm"]) if data.get("slurm") is not None else None
    exp = Experiment(
        name=name,
        path=str(path),
        description=description,
        base=base,
        matrix=matrix,
        zip=groups,
        exclude=exclude,
        ranks=ranks,
        timeout=timeout,
        slurm=slurm,
    )
    _check_size(src, exp)
    _expand(src, exp, origin)
    return exp


def _check_size(src: Source, exp: Experiment) -> None:
    """Refuse an experiment that expands to more than MAX_POINTS points, before building any of them."""
    sizes = [(("matrix", k), len(v)) for k, v in exp.matrix.items()]
    sizes += [(("zip", i, next(iter(g))), len(next(iter(g.values())))) for i, g in enumerate(exp.zip)]
    if exp.ranks is not None:
        sizes.append((("ranks",), len(exp.ranks)))
    total = math.prod(n for _, n in sizes)
    if total > MAX_POINTS:
        largest = max(sizes, key=lambda s: s[1])[0]
        factors = " x ".join(f"{fmt_path(p)} {n}" for p, n in sizes)
        raise src.error(
            largest,
            f"the experiment expands to {total} points ({factors}), before exclude rules; at most {MAX_POINTS} are allowed: "
            f"split it into several experiment files",
        )


def _axes(exp: Experiment) -> list[list[dict]]:
    axes = [[{k: v} for v in values] for k, values in exp.matrix.items()]
    for group in exp.zip:
        n = len(next(iter(group.values())))
        axes.append([{k: vs[i] for k, vs in group.items()} for i in range(n)])
    if exp.ranks is not None:
        axes.append([{RANKS: r} for r in exp.ranks])
    return axes


def _expand(src: Source, exp: Experiment, origin: dict) -> None:
    used = [False] * len(exp.exclude)
    seen: dict[str, Point] = {}
    for combo in itertools.product(*_axes(exp)):
        params = {}
        for part in combo:
            params.update(part)
        nranks = params[RANKS]
        cfg = RunConfig.from_dict({k: v for k, v in {**exp.base, **params}.items() if k != RANKS})
        hits = []
        if exp.exclude:
            values = {**cfg.to_dict(), RANKS: nranks}  # every key as written in files (pass, not pass_), kv_heads resolved
            hits = [i for i, rule in enumerate(exp.exclude) if all(values[k] in vs for k, vs in rule.items())]
        if hits:
            for i in hits:
                used[i] = True
            exp.excluded += 1
            continue
        problems = validate(cfg, nranks)
        if problems:
            key, message = problems[0]
            where = _value_path(exp, origin, key, params)
            at = f" (point {_label(params)})" if params else ""
            raise src.error(where, f"{message}{at}; change the value or add an exclude rule")
        pid = point_id(cfg, nranks)
        if pid in seen:
            raise src.error(
                ("matrix",) if exp.matrix else ("zip",),
                f"points {seen[pid].label()} and {_label(params)} are the same measurement "
                f"(id {pid}): {', '.join(RunConfig.NON_IDENTITY)} do not change what is measured",
            )
        point = Point(id=pid, nranks=nranks, config=cfg, params=params)
        seen[pid] = point
        exp.points.append(point)
    for i, hit in enumerate(used):
        if not hit:
            raise src.error(("exclude", i), "matches no point; remove it or fix its values")
    if not exp.points:
        raise src.error(("exclude",), "every point is excluded; nothing to run")


def _label(params: dict) -> str:
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in params.items())


def _value_path(exp: Experiment, origin: dict, key: str, params: dict) -> tuple:
    """The key path that set ``key`` for this point (the list index for swept values)."""
    path = origin.get(key, ("base", key))
    if path[0] == "matrix":
        return path + (exp.matrix[key].index(params[key]),)
    if path[0] == "zip":
        return path + (exp.zip[path[1]][key].index(params[key]),)
    if path == ("ranks",):
        return path + (exp.ranks.index(params[RANKS]),)
    return path


def default_time(exp: Experiment) -> str:
    """Slurm time limit when none is configured: the per-point timeout for each point of a task, plus 5 min."""
    per_task = exp.slurm.points_per_task if exp.slurm else 1
    minutes = math.ceil(per_task * exp.timeout / 60) + 5
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"
