"""Command line: a dispatch table of small command functions.

    ringbench run ...            one ring-attention run (under mpiexec -n P)
    ringbench plan FILE          the points of an experiment file, nothing run
    ringbench sweep FILE         run an experiment's points here (resumable)
    ringbench submit FILE        run them as Slurm job arrays
    ringbench status FILE|DIR    done / failed / pending points of an experiment
    ringbench collect FILE|DIR   merge the per-point result files into one
    ringbench doctor             is this allocation ready for a sweep? libraries, devices, a checked ring (under mpiexec -n P)
    ringbench probe --out F.h5   measure compute rate and ring links for the model (under mpiexec -n P)
    ringbench report FILE...     terminal tables of stored runs, modes side by side, model error; --csv
    ringbench plot FILE... -o D  scaling, overlap, timeline, breakdown, causal-layout and model figures
    ringbench advise ...         predicted time of every context-parallel strategy for a workload, and the winner

Every user error is one line on stderr (from rank 0 only under MPI) and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from ringbench import env_int
from ringbench.config import CHOICES, ConfigError, RunConfig, UserError, field_key, memory_limit, option_name

PROG = "ringbench"


class UsageError(Exception):
    """Raised by the parsers instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def launcher_rank() -> int:
    """This process's rank as the launcher set it (before MPI is initialised); 0 outside MPI."""
    return env_int(("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"))


def fail(prog: str, message: str) -> int:
    if launcher_rank() == 0:
        print(f"{prog}: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
_HELP = {
    "batch": "batch size B",
    "seq_len": "global sequence length N (over all ranks)",
    "heads": "query heads H",
    "kv_heads": "key/value heads H_kv dividing H (GQA; 1 = MQA; default H)",
    "head_dim": "head dimension D",
    "dtype": "storage dtype (half precision accumulates in float32)",
    "causal": "causal mask",
    "layout": "how the sequence is split over ranks",
    "mode": "communication scheme being measured",
    "backend": "numpy (CPU) or cupy (one GPU per rank)",
    "progress": "'test': MPI_Testall between compute tiles to drive transfers; 'none': no MPI call during compute",
    "cuda_aware": "pass device buffers to MPI directly (auto: ask the MPI library)",
    "tile_q": "query rows per score tile (0: automatic)",
    "ulysses_degree": "--mode hybrid: ranks per all-to-all group U (consecutive ranks in node-major order; P = U x R, "
    "the ring runs over the R groups)",
    "ulysses_groups": "--mode hybrid: node (every group's ranks share a node: U must divide each node's rank count, "
    "else the run is refused) or any (groups may span nodes)",
    "blas": "GEMM library of the NumPy kernel: numpy (its own BLAS), mkl (Intel MKL, pip install 'ringbench[mkl]'), "
    "auto (MKL where it loads, on Intel CPUs; numpy on others)",
    "kernel": "attention per ring step: native (ringbench's NumPy/CuPy kernel), torch (PyTorch's fused attention, "
    "pip install 'ringbench[torch]'), flash-attn (CUDA only)",
    "warmup": "untimed-in-summary warm-up passes",
    "repeat": "timed passes",
    "seed": "input seed",
    "check": "compare with a float64 reference",
    "save_tensors": "store global q, k, v, out (and do, dq, dk, dv with a backward) in the result (small problems)",
    "memory_limit": "memory one rank may use (host; device on cupy): auto (what is free on the node or GPU, or left by the ranks' "
    "memory cgroup if less, shared by its ranks), "
    "a size (20GiB, 512MiB, bytes), or none (no check); a problem whose estimate exceeds it is refused",
    "pass_": "what is timed: the forward, the backward (after an untimed forward), or both as two phases; prefill (new "
    "tokens against a KV cache, --cached-tokens) or decode (one step against a sharded KV cache, --new-tokens, --merge)",
    "cached_tokens": "--pass prefill: tokens C of the seq_len already in the KV cache (the other N - C are new)",
    "new_tokens": "--pass decode: new tokens t per sequence per step (the last t of the seq_len cached tokens)",
    "docs": "packed documents (attention only inside each): lengths L1,L2,... summing to N, fixed:L, uniform:LO-HI[:seed=S], "
    "lognormal:mean=M,sigma=S[,seed=K] (drawn lengths: multiples of 64, or ,quantum=Q); default one document",
    "window": "sliding window W >= 1 (causal: each query sees the W keys up to itself); default none",
    "merge": "--pass decode: how the ranks' partial outputs and LSE are merged: ring (P - 1 hops), tree (all-reduce of "
    "max, then of the weighted sums: log P), gather (to rank 0)",
}


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} run", description="One ring-attention run; launch with mpiexec -n P.")
    defaults = RunConfig()
    for f in fields(RunConfig):
        opt, default = option_name(f.name), getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=_HELP[f.name])
        elif field_key(f.name) in CHOICES:
            p.add_argument(opt, dest=f.name, choices=CHOICES[field_key(f.name)], default=default, help=_HELP[f.name])
        elif f.name == "memory_limit":
            p.add_argument(opt, dest=f.name, default=default, metavar="auto|SIZE|none", help=_HELP[f.name])
        elif f.name == "docs":
            p.add_argument(opt, dest=f.name, default=default, metavar="SPEC", help=_HELP[f.name])
        elif f.name == "window":  # None: not given (0 internally); a given 0 is refused
            p.add_argument(opt, dest=f.name, type=int, default=None, metavar="W", help=_HELP[f.name])
        else:
            p.add_argument(opt, dest=f.name, type=int, default=default, metavar="N", help=_HELP[f.name])
    p.add_argument("--out", metavar="FILE.h5", help="append the run to this HDF5 result file")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    if ns.window is not None and ns.window < 1:
        why = f"must be >= 1 (each query sees the W keys up to itself; leave it out for none), got {ns.window}"
        raise ConfigError(option_name("window"), why)
    ns.window = ns.window or 0
    cfg = RunConfig(**{f.name: getattr(ns, f.name) for f in fields(RunConfig)})
    cfg.memory_limit = memory_limit(cfg.memory_limit, option_name("memory_limit"))
    return cfg


def cmd_run(argv: list[str]) -> int:
    """Run ring attention on the ranks of this MPI job."""
    try:
        ns = run_parser().parse_args(argv)
        cfg = config_from_args(ns)
    except (UsageError, ConfigError) as exc:
        return fail(f"{PROG} run", str(exc))
    from ringbench.engine import comm  # initialises MPI

    try:
        from ringbench.harness import runner

        return runner.run(cfg, ns.out, ns.quiet)
    except UserError as exc:
        if comm.WORLD.rank == 0:
            print(f"{PROG} run: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # any failure on any rank ends the whole job, never a hang
        comm.report_exception_and_abort(exc)
        return 1


# ---------------------------------------------------------------------------------------------
# experiments: plan, sweep, submit, status, collect (ringbench.sweeps.experiment, ringbench.sweeps.sweep, ringbench.sweeps.slurm)
# ---------------------------------------------------------------------------------------------
def _experiment_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} {name}", description=description)
    p.add_argument("experiment", metavar="FILE", help="experiment file (experiments/*.yaml), or its results directory (results/NAME)")
    p.add_argument("--results", metavar="DIR", default="results", help="results directory: NAME.h5 and NAME/ go here (default: results)")
    return p


def _open_experiment(ns: argparse.Namespace):
    """The experiment and its result layout; a results directory names its resolved experiment.yaml."""
    from ringbench.sweeps.experiment import ExperimentError, load
    from ringbench.sweeps.sweep import ResultDir

    path, results = Path(ns.experiment), Path(ns.results)
    if path.is_dir():
        if not (path / "experiment.yaml").is_file():
            raise ExperimentError(f"{path}: not an experiment results directory (no experiment.yaml)")
        path, results = path / "experiment.yaml", path.parent
    exp = load(path)
    return exp, ResultDir(results, exp.name)


def _experiment_command(name: str, argv: list[str], parser, body) -> int:
    """Parse, load the experiment, run ``body(ns, exp, layout)``; user errors are one line and status 2."""
    from ringbench.store import MergeError, SchemaError
    from ringbench.sweeps.experiment import ExperimentError
    from ringbench.sweeps.slurm import SlurmError

    try:
        ns = parser.parse_args(argv)
        exp, lay = _open_experiment(ns)
        return body(ns, exp, lay)
    except (UsageError, ExperimentError, SlurmError, MergeError, SchemaError) as exc:
        return fail(f"{PROG} {name}", str(exc))
    except KeyboardInterrupt:
        print(f"{PROG} {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        return fail(f"{PROG} {name}", f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def cmd_plan(argv: list[str]) -> int:
    """Show an experiment's points (id, ranks, parameters, estimated work); run nothing."""
    from ringbench.sweeps import sweep

    p = _experiment_parser("plan", "Expand an experiment file into its points and show them; nothing runs.")

    def body(ns, exp, lay):
        print(sweep.plan_text(exp, lay))
        return 0

    return _experiment_command("plan", argv, p, body)


def cmd_sweep(argv: list[str]) -> int:
    """Run an experiment's points on this machine, each under mpiexec -n P (resumable)."""
    from ringbench.sweeps import sweep

    p = _experiment_parser(
        "sweep",
        "Run the points not yet stored, one subprocess each; failures are recorded "
        "and the sweep goes on. Rerunning retries failed and missing points.",
    )
    p.add_argument("--force", action="store_true", help="rerun points already stored")
    p.add_argument(
        "--launcher", choices=("mpiexec", "srun"), default="mpiexec", help="how ranks start (default mpiexec; srun inside a Slurm job)"
    )
    p.add_argument("--tasks", metavar="FILE", help="run only one array task's points (line --task of FILE)")
    p.add_argument("--task", type=int, metavar="K", help="the array task (with --tasks), counting from 0")

    def body(ns, exp, lay):
        if (ns.tasks is None) != (ns.task is None):
            raise UsageError("--tasks and --task go together")
        points = exp.points if ns.tasks is None else sweep.read_tasks(Path(ns.tasks), ns.task, exp)
        if ns.launcher == "mpiexec" and not shutil.which(sweep.launch_prefix("mpiexec", 1, exp.slurm)[0]):
            raise UsageError(f"mpiexec not found ({sweep.default_mpiexec()}): pip install -e '.[mpich]'")
        lay.make()
        if ns.tasks is None:  # a job array task runs the resolved copy itself
            sweep.write_snapshot(exp, lay)
        return sweep.run_sweep(exp, lay, points, launcher=ns.launcher, force=ns.force, collect_after=ns.tasks is None)

    return _experiment_command("sweep", argv, p, body)


def cmd_submit(argv: list[str]) -> int:
    """Submit an experiment's points to Slurm: one job array per rank count."""
    from ringbench.sweeps import sweep

    p = _experiment_parser(
        "submit",
        "Render sbatch scripts (one job array per rank count) beside the results, "
        "submit them with sbatch --parsable and record the job ids.",
    )
    p.add_argument("--dry-run", action="store_true", help="write the scripts, submit nothing")
    p.add_argument("--force", action="store_true", help="rerun points already stored")

    def body(ns, exp, lay):
        problem = _submit_path_problem(ns, lay)
        if problem:
            raise UsageError(problem)
        lay.make()
        sweep.write_snapshot(exp, lay)
        points, skipped = sweep.todo(exp, lay, exp.points, ns.force)
        queued = set() if ns.dry_run else sweep.queued_points(lay)
        waiting = [p for p in points if p.id in queued]
        points = [p for p in points if p.id not in queued]
        print(f"submit {exp.name}: {len(points)} points to run, {skipped} already stored, {len(waiting)} already queued or running")
        if not points:
            print(f"submit {exp.name}: nothing to submit (--force reruns stored points)")
            return 0
        return sweep.submit_arrays(exp, lay, points, dry_run=ns.dry_run, force=ns.force, workdir=Path.cwd())

    return _experiment_command("submit", argv, p, body)


def _submit_path_problem(ns: argparse.Namespace, lay) -> str | None:
    """What makes a path unfit for a job script (checked before anything is written), or None: no path that
    reaches the script may hold a control character, and the results directory (where sbatch --output puts the
    logs) no backslash."""
    from ringbench.sweeps.slurm import control_problem

    results = lay.results.resolve()
    option = "--results" if lay.results == Path(ns.results) else "FILE"  # FILE may name a results directory
    paths = [("FILE", ns.experiment), ("--results", ns.results), (option, str(results))]
    paths += [("the current directory", str(Path.cwd())), ("the python that submits", sys.executable)]
    for what, path in paths:
        problem = control_problem(str(path))
        if problem:
            return f"{what}: {str(path)!r} {problem}"
    if "\\" in str(results):
        return (
            f"{option}: {str(results)!r} has a backslash: sbatch --output cannot name a log file under it "
            f"(sbatch drops the backslash and expands no %x %A %a); choose a results directory without one"
        )
    return None


def cmd_status(argv: list[str]) -> int:
    """Show which points of an experiment are done, failed, running or pending."""
    from ringbench.sweeps import sweep

    p = _experiment_parser("status", "State of every point: from the result files and one squeue call.")

    def body(ns, exp, lay):
        print(sweep.status_text(exp, lay))
        return 0

    return _experiment_command("status", argv, p, body)


def cmd_collect(argv: list[str]) -> int:
    """Merge an experiment's per-point result files into one file (idempotent)."""
    from ringbench.sweeps import sweep

    p = _experiment_parser("collect", "Merge results/NAME/parts/*.h5 into results/NAME.h5; runs already there are not copied again.")

    def body(ns, exp, lay):
        files, added, present = sweep.collect(lay)
        if not files:
            raise UsageError(f"no result files in {lay.parts}: run or submit the experiment first")
        print(f"collect {exp.name}: {files} files, {added} runs added, {present} already in {lay.collected}")
        return 0

    return _experiment_command("collect", argv, p, body)


def cmd_doctor(argv: list[str]) -> int:
    """Check this allocation before a sweep: devices, MPI, kernel libraries, a checked ring pass each (under mpiexec -n P)."""
    from ringbench.config import BACKENDS, KERNELS

    p = _Parser(
        prog=f"{PROG} doctor",
        description="Per rank: host, local rank, device, CUDA-aware MPI, kernel libraries; then a tiny ring pass checked "
        "against float64 for every backend and kernel available. Exit 1 when something asked for (or needed by a sweep) is missing.",
    )
    p.add_argument("--backend", action="append", choices=BACKENDS, help="require this backend (repeatable; default: try every one)")
    p.add_argument("--kernel", action="append", choices=KERNELS, help="require this kernel (repeatable; default: try every one)")
    try:
        ns = p.parse_args(argv)
    except UsageError as exc:
        return fail(f"{PROG} doctor", str(exc))
    from ringbench.engine import comm  # initialises MPI

    try:
        from ringbench.harness import doctor

        return doctor.run(ns.backend, ns.kernel)
    except BaseException as exc:  # a failure on any rank ends the whole job, never a hang
        comm.report_exception_and_abort(exc)
        return 1


# ---------------------------------------------------------------------------------------------
# analysis: probe (under MPI), report and plot (result files only)
# ---------------------------------------------------------------------------------------------
def _positive_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _check_results(files: list[str], option: str = "FILE") -> str | None:
    """None if every file is a readable result file; otherwise one line naming the file."""
    from ringbench import store

    for f in files:
        if os.path.isdir(f):
            return f"{option}: {f}: is a directory, not a result file"
        if not os.path.isfile(f):
            return f"{option}: {f}: no such file"
        try:
            store.check_file(f)
        except store.SchemaError as exc:
            return str(exc)
    return None


def _check_out_dir(option: str, path: str) -> str | None:
    """None if ``path`` is a directory this user can write files in, or one that can be created; else one line."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):  # the nearest part of the path that exists
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{option}: {path}: {probe} exists and is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{option}: {path}: directory {probe} is not writable"
    return None


def _check_out_file(option: str, path: str) -> str | None:
    """None if a file can be written at ``path`` (its directory exists and is writable); else one line."""
    if os.path.isdir(path):
        return f"{option}: {path} is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(parent):
        return f"{option}: directory {os.path.dirname(path)} does not exist"
    return _check_out_dir(option, parent)


def _write_csv(runs, path: str) -> None:
    """The CSV through a temporary name and a rename: never half-written."""
    from ringbench.analysis import results

    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        results.to_csv(results.rows(runs), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def missing_modules(*modules: str) -> str | None:
    import importlib.util

    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{' and '.join(gone)} not installed: pip install 'ringbench[plot]'" if gone else None


def _probes(files: list[str], probe_file: str | None) -> list:
    """The probes of --probe, else of the result files (each file read once: its warnings print once)."""
    from ringbench import store

    return [p for f in ([probe_file] if probe_file else files) for p in store.read_probes(f)]


def _calibration(runs, files: list[str], probe_file: str | None, probes: list | None = None):
    """The model's calibration: probes from --probe, else from the result files (or ``probes``, already read), else
    the runs themselves."""
    from ringbench.analysis import model

    probes = _probes(files, probe_file) if probes is None else probes
    try:
        return model.calibrate(runs, probes)
    except ValueError:
        return None


def probe_parser() -> argparse.ArgumentParser:
    from ringbench.harness.probe import ProbeOptions

    d = ProbeOptions()
    p = _Parser(
        prog=f"{PROG} probe",
        description="Measure per-rank compute rate and ring link latency/bandwidth for the overlap model; launch with mpiexec -n P.",
    )
    p.add_argument("--out", metavar="FILE.h5", required=True, help="result file to add /probes/NAME to")
    p.add_argument("--name", help="probe group name (default probe-P<ranks>-<dtype>)")
    p.add_argument(
        "--machine-out",
        metavar="FILE.yaml",
        help="also write the machine description advise --machine reads (ranks per node, intra- and inter-node links "
        "as measured; needs ranks on 2+ nodes and 2+ ranks on a node)",
    )
    for opt in ("batch", "heads", "head_dim"):
        p.add_argument(option_name(opt), type=int, default=getattr(d, opt), metavar="N", help=_HELP[opt])
    p.add_argument("--kv-heads", type=int, default=0, metavar="N", help="key/value heads (0: same as --heads)")
    p.add_argument("--dtype", choices=CHOICES["dtype"], default=d.dtype, help=_HELP["dtype"])
    p.add_argument("--backend", choices=CHOICES["backend"], default=d.backend, help=_HELP["backend"])
    p.add_argument(
        "--kernel",
        choices=CHOICES["kernel"],
        default=d.kernel,
        help="the per-step attention kernel whose rates are measured (its backward where ringbench runs one, else "
        "the native backward; the probe's config says which: bwd_kernel)",
    )
    p.add_argument(
        "--block-sizes",
        type=_positive_ints,
        default=list(d.block_sizes),
        metavar="N,N,...",
        help="tokens per block for the compute-rate probe",
    )
    p.add_argument(
        "--piece-rows",
        type=_positive_ints,
        default=list(d.piece_rows),
        metavar="N,N,...",
        help="query rows of the skinny pieces also timed against every block size (decode's and few new tokens' pieces)",
    )
    p.add_argument(
        "--piece-keys",
        type=_positive_ints,
        default=[],
        metavar="N,N,...",
        help="keys of the skinny pieces (default: the block sizes; decode's shards are longer than any block worth timing)",
    )
    p.add_argument("--repeat", type=int, default=d.repeat, metavar="N", help="timed kernel calls per block size")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, metavar="BYTES", help="largest ping-pong message")
    p.add_argument("--iters", type=int, default=d.iters, metavar="N", help="ping-pong round trips per size")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


PROBE_MAX_BYTES = 2**32  # the largest --max-bytes (one ping-pong buffer of this size per rank)
PROBE_MAX_ITERS = 10**5


def _probe_option_problem(ns: argparse.Namespace) -> str | None:
    """The first bad probe option as one line, or None. The integers are bounded as ``run`` bounds its options
    (config.coerce); a block size as --seq-len; --name as an experiment name (a group name, never a path)."""
    from ringbench.config import coerce
    from ringbench.sweeps.experiment import NAME_RE

    if ns.name is not None and not NAME_RE.match(ns.name):
        return f"--name: expected a name of letters, digits, _ . - (at most 64, not starting with . - _), got {ns.name!r}"
    for opt in ("batch", "heads", "head_dim", "repeat"):
        try:
            coerce(opt, getattr(ns, opt))
        except ConfigError as exc:
            return f"{option_name(opt)}: {exc.message}"
    for opt in ("block_sizes", "piece_rows", "piece_keys"):
        for n in getattr(ns, opt):
            try:
                coerce("seq_len", n)
            except ConfigError as exc:
                return f"{option_name(opt)}: {exc.message}"
    for opt, hi in (("max_bytes", PROBE_MAX_BYTES), ("iters", PROBE_MAX_ITERS)):
        v = getattr(ns, opt)
        if not 1 <= v <= hi:
            return f"{option_name(opt)}: expected an integer from 1 to {hi}, got {v}"
    if ns.kv_heads < 0 or (ns.kv_heads and ns.heads % ns.kv_heads):
        return f"--kv-heads: must divide --heads={ns.heads} (or be 0); got {ns.kv_heads}"
    return None


def cmd_probe(argv: list[str]) -> int:
    """Measure compute rate and link latency/bandwidth for the model."""
    from ringbench.harness.probe import ProbeOptions

    try:
        ns = probe_parser().parse_args(argv)
        err = _probe_option_problem(ns)
        if err:
            raise UsageError(err)
    except UsageError as exc:
        return fail(f"{PROG} probe", str(exc))
    opts = ProbeOptions(
        batch=ns.batch,
        heads=ns.heads,
        kv_heads=ns.kv_heads,
        head_dim=ns.head_dim,
        dtype=ns.dtype,
        backend=ns.backend,
        kernel=ns.kernel,
        block_sizes=tuple(ns.block_sizes),
        piece_rows=tuple(ns.piece_rows),
        piece_keys=tuple(ns.piece_keys),
        repeat=ns.repeat,
        max_bytes=ns.max_bytes,
        iters=ns.iters,
    )
    from ringbench.engine import comm  # initialises MPI

    try:
        from ringbench.harness import probe

        return probe.run(opts, ns.out, ns.name, ns.quiet, ns.machine_out)
    except UserError as exc:
        if comm.WORLD.rank == 0:
            print(f"{PROG} probe: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        comm.report_exception_and_abort(exc)
        return 1


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} report",
        description="Tables of stored runs: config, time, TFLOP/s, bandwidth, overlap, error; modes side by side; the model's error.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="result files (HDF5)")
    p.add_argument("--csv", metavar="OUT.csv", help="also write one row per run to this CSV file")
    p.add_argument("--probe", metavar="FILE", help="take the model's calibration from the probes in this file")
    p.add_argument("--predict-ranks", type=_positive_ints, metavar="P,P,...", help="predict pass times at these rank counts")
    p.add_argument("--no-model", action="store_true", help="leave out the model")
    return p


def cmd_report(argv: list[str]) -> int:
    """Terminal report of stored runs (and CSV export)."""
    prog = f"{PROG} report"
    try:
        ns = report_parser().parse_args(argv)
    except UsageError as exc:
        return fail(prog, str(exc))
    err = _check_results(ns.files) or (ns.probe and _check_results([ns.probe], "--probe")) or (ns.csv and _check_out_file("--csv", ns.csv))
    if err:
        return fail(prog, err)
    from ringbench.analysis import report, results

    runs = results.load(ns.files)
    cal = None if ns.no_model else _calibration(runs, ns.files, ns.probe)
    if ns.csv:  # before the report: a CSV that cannot be written fails the command with nothing printed
        try:
            _write_csv(runs, ns.csv)
        except OSError as exc:
            return fail(prog, f"--csv: cannot write {ns.csv}: {exc.strerror or exc}")
    print(report.format_report(runs, cal, ns.predict_ranks))
    if ns.csv:
        print(f"wrote {len(runs)} rows to {ns.csv}")
    return 0


def plot_parser() -> argparse.ArgumentParser:
    from ringbench.analysis.plot import FIGURES

    p = _Parser(prog=f"{PROG} plot", description="Figures (PNG and PDF) from result files.")
    p.add_argument("files", nargs="+", metavar="FILE", help="result files (HDF5)")
    p.add_argument("-o", "--out-dir", required=True, metavar="DIR", help="directory for the figures (created)")
    p.add_argument("--only", type=lambda t: t.split(","), metavar="FIG,...", help=f"figures to draw (default all): {', '.join(FIGURES)}")
    p.add_argument("--probe", metavar="FILE", help="take the model's calibration from the probes in this file")
    p.add_argument(
        "--predict-ranks",
        type=_positive_ints,
        metavar="P,P,...",
        help="rank counts to extrapolate to in the model figure (default 2x and 4x the largest run)",
    )
    p.add_argument("--timeline-run", metavar="NAME", help="the run (group name) to draw the timeline of")
    return p


def cmd_plot(argv: list[str]) -> int:
    """Draw scaling, overlap, timeline, breakdown and model figures."""
    prog = f"{PROG} plot"
    err = missing_modules("matplotlib")
    if err:
        return fail(prog, err)
    try:
        ns = plot_parser().parse_args(argv)
    except UsageError as exc:
        return fail(prog, str(exc))
    from ringbench.analysis import plot, results

    bad = [f for f in ns.only or [] if f not in plot.FIGURES]
    err = (
        _check_results(ns.files)
        or (ns.probe and _check_results([ns.probe], "--probe"))
        or (bad and f"--only: unknown figure {bad[0]!r}; allowed: {', '.join(plot.FIGURES)}")
    )
    err = err or _check_out_dir("--out-dir", ns.out_dir)
    if err:
        return fail(prog, err)
    runs = results.load(ns.files)
    names = {r.name for r in runs}
    if ns.timeline_run and ns.timeline_run not in names:
        return fail(prog, f"--timeline-run: no run {ns.timeline_run!r} in {', '.join(ns.files)}")
    cal = _calibration(runs, ns.files, ns.probe)
    try:
        os.makedirs(ns.out_dir, exist_ok=True)
        written, skipped = plot.render(
            runs, ns.out_dir, only=ns.only, cal=cal, predict_ranks=ns.predict_ranks, timeline_run=ns.timeline_run
        )
    except OSError as exc:
        return fail(prog, f"--out-dir: cannot write {exc.filename or ns.out_dir}: {exc.strerror or exc}")
    print(f"model calibration: {cal.source}" if cal else "model calibration: none (no probes, no successful runs)")
    for path in written:
        print(path)
    for why in skipped:
        print(f"skipped {why}")
    return 0


# ---------------------------------------------------------------------------------------------
# advise
# ---------------------------------------------------------------------------------------------
def advise_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = _Parser(prog=f"{PROG} advise", description="Predicted time of every context-parallel strategy for a workload, the winner.")
    p.add_argument("files", nargs="*", metavar="FILE", help="result files: probes in them, else their ring runs, calibrate the model")
    p.add_argument("--probe", metavar="FILE", help="take the calibration from the probes in this file")
    p.add_argument(
        "--machine", metavar="NAME|YAML", help="a preset's name (--list-machines) or a machine file: links, ranks per node, the GPU"
    )
    p.add_argument("--list-machines", action="store_true", help="list the machine presets shipped with ringbench and exit")
    p.add_argument("--seq-len", type=_positive_ints, metavar="N,N,...", help=_HELP["seq_len"] + " (required)")
    p.add_argument("--ranks", type=_positive_ints, metavar="P,P,...", help="rank counts (required unless --nodes)")
    p.add_argument("--nodes", type=_positive_ints, metavar="K,K,...", help="node counts of --machine: ranks = K x its ranks_per_node")
    for opt in ("batch", "heads", "kv_heads", "head_dim"):
        p.add_argument(option_name(opt), type=int, default=getattr(d, opt), metavar="N", help=_HELP[opt])
    p.add_argument("--dtype", choices=CHOICES["dtype"], default=d.dtype, help=_HELP["dtype"])
    p.add_argument(
        "--layout",
        choices=CHOICES["layout"],
        default=None,
        help=_HELP["layout"] + f" (default {d.layout}; with --docs or --window: every layout that takes them, ranked)",
    )
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False, help=_HELP["causal"])
    p.add_argument("--docs", default="", metavar="SPEC", help=_HELP["docs"] + "; ranks the layouts too")
    p.add_argument("--window", type=int, default=None, metavar="W", help=_HELP["window"])
    p.add_argument(
        "--pass", dest="passes", choices=["fwd", "bwd", "fwd+bwd", "prefill", "decode"], default="fwd", help="the pass to predict"
    )
    p.add_argument("--cached-tokens", type=int, default=0, metavar="C", help=_HELP["cached_tokens"])
    p.add_argument("--new-tokens", type=int, default=1, metavar="t", help=_HELP["new_tokens"])
    return p


def cmd_advise(argv: list[str]) -> int:
    """Predict every context-parallel strategy's time for a workload; the winner and where it changes."""
    prog = f"{PROG} advise"
    try:
        ns = advise_parser().parse_args(argv)
    except UsageError as exc:
        return fail(prog, str(exc))
    from ringbench.analysis import advise, model, presets, results
    from ringbench.layout import OLD_LAYOUTS
    from ringbench.sweeps.experiment import ExperimentError

    if ns.list_machines:
        print(advise.machine_listing())
        return 0
    missing = [o for o, v in (("--seq-len", ns.seq_len), ("--ranks", ns.ranks or ns.nodes)) if not v]
    if missing:
        return fail(prog, f"the following arguments are required: {', '.join(missing)}")
    if ns.nodes and not ns.machine:
        return fail(prog, "--nodes: needs --machine (its ranks_per_node)")
    machine = None
    if ns.machine:
        try:
            machine = advise.load_machine(presets.path_of(ns.machine))
        except ExperimentError as exc:
            hint = f" (or a preset: {', '.join(presets.names())})" if "/" not in ns.machine and not os.path.exists(ns.machine) else ""
            return fail(prog, f"--machine: {exc}{hint}")
    if ns.nodes:
        ns.ranks = sorted(set((ns.ranks or []) + [k * machine.ranks_per_node for k in ns.nodes]))

    for opt in ("batch", "heads", "head_dim"):
        if getattr(ns, opt) < 1:
            return fail(prog, f"{option_name(opt)}: expected an integer >= 1, got {getattr(ns, opt)}")
    hk = ns.heads if ns.kv_heads is None else ns.kv_heads
    if hk < 1 or ns.heads % hk:
        return fail(prog, f"--kv-heads: must divide heads={ns.heads}; got {hk}")
    if err := advise.check_ranks(ns.ranks):
        return fail(prog, err)
    preset = machine is not None and machine.device is not None
    if not ns.files and not ns.probe and not preset:
        return fail(prog, "FILE or --probe: a probe or result file is needed to calibrate the model (or a --machine preset with a device)")
    err = _check_results(ns.files) or (ns.probe and _check_results([ns.probe], "--probe"))
    if err:
        return fail(prog, err)
    runs = results.load(ns.files) if ns.files else []
    probes = _probes(ns.files, ns.probe) if ns.files or ns.probe else []
    if machine is None:  # a probe across nodes measured both link classes: its machine
        machine = advise.machine_from_probes(probes)
    if err := advise.check_ranks(ns.ranks, machine):
        return fail(prog, err)
    cal = _calibration(runs, ns.files, ns.probe, probes) if ns.files or ns.probe else presets.calibration(machine)
    if cal is None:
        return fail(prog, "FILE: no probe and no successful ring run to calibrate the model from")
    if not cal.has_phase(ns.passes):
        return fail(
            prog, f"--pass {ns.passes}: the calibration ({cal.source}) has no backward compute rate; probe again or add backward runs"
        )
    packed = bool(ns.docs or ns.window is not None)
    explicit_layout = ns.layout is not None
    if packed and (err := _packed_advise_problem(ns)):
        return fail(prog, err)
    ns.layout = ns.layout or RunConfig().layout
    if not packed and ns.layout not in OLD_LAYOUTS and (err := advise.check_packed_ranks(ns.ranks)):  # every plan: P^2
        return fail(prog, err.replace("with --docs or --window", f"with --layout {ns.layout}"))
    if ns.passes in ("prefill", "decode"):  # the serving passes' own model (analysis.inference)
        return _advise_serving(ns, hk, cal, machine)
    base = model.Shape(
        nranks=1,
        seq_len=1,
        batch=ns.batch,
        heads=ns.heads,
        kv_heads=hk,
        head_dim=ns.head_dim,
        dtype=ns.dtype,
        causal=ns.causal,
        layout=ns.layout,
        pass_=ns.passes,
        docs=ns.docs,
        window=ns.window or 0,
    )
    layouts = [ns.layout] if packed and explicit_layout else None
    print(advise.format_advice(base, ns.seq_len, ns.ranks, cal, machine, layouts))
    return 0


def _packed_advise_problem(ns) -> str | None:
    """The one-line refusal of advise's --docs / --window (and a --layout given with them), else None: the spec over
    every --seq-len, the window's bound, the serving passes, the rank counts the model evaluates plan by plan."""
    from ringbench.analysis import advise
    from ringbench.config import document_problems

    if ns.window is not None and ns.window < 1:
        return f"--window: must be >= 1 (each query sees the W keys up to itself; leave it out for none), got {ns.window}"
    for nseq in ns.seq_len:
        for p in ns.ranks:
            layout = ns.layout or "contiguous"
            cfg = RunConfig(seq_len=nseq, causal=ns.causal, layout=layout, docs=ns.docs, window=ns.window or 0, pass_=ns.passes)
            for key, msg in document_problems(cfg, p):
                if key != "layout" or ns.layout:  # without --layout a layout that cannot take it is listed as refused
                    return f"{option_name(key)}: {msg}"
    return advise.check_packed_ranks(ns.ranks)


def _advise_serving(ns, hk: int, cal, machine=None) -> int:
    """`advise --pass prefill|decode`: each strategy's (merge's) predicted time, the winner (analysis.inference)."""
    from ringbench.analysis import inference
    from ringbench.analysis.report import table

    prog = f"{PROG} advise"
    if ns.cached_tokens < 0 or (ns.passes != "prefill" and ns.cached_tokens):
        return fail(prog, f"--cached-tokens: only for --pass prefill, an integer >= 0; got {ns.cached_tokens}")
    if ns.new_tokens < 1 or (ns.passes != "decode" and ns.new_tokens != 1):
        return fail(prog, f"--new-tokens: only for --pass decode, an integer >= 1; got {ns.new_tokens}")
    w = dict(batch=ns.batch, heads=ns.heads, kv_heads=hk, head_dim=ns.head_dim, dtype=ns.dtype, layout=ns.layout)
    w.update({"pass": ns.passes, "cached_tokens": ns.cached_tokens, "new_tokens": ns.new_tokens})
    print(inference.format_advice(w, ns.seq_len, ns.ranks, cal, table, machine))
    return 0


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "sweep": cmd_sweep,
    "submit": cmd_submit,
    "status": cmd_status,
    "collect": cmd_collect,
    "doctor": cmd_doctor,
    "probe": cmd_probe,
    "report": cmd_report,
    "plot": cmd_plot,
    "advise": cmd_advise,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} COMMAND [options]\n\ncommands:")
        for name, fn in COMMANDS.items():
            print(f"  {name:10s} {fn.__doc__.strip().splitlines()[0]}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ringbench import __version__

        print(f"{PROG} {__version__}")
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        from ringbench.config import did_you_mean

        return fail(PROG, f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; allowed: {', '.join(COMMANDS)}")
    return cmd(argv[1:])
