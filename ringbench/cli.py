"""Command line: a dispatch table of small command functions.

    ringbench run ...            one ring-attention run (under mpiexec -n P)

Every user error is one line on stderr (from rank 0 only under MPI) and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from ringbench.config import (
    BACKENDS,
    CUDA_AWARE,
    DTYPES,
    MODES,
    PROGRESS,
    ConfigError,
    RunConfig,
    UserError,
    option_name,
)
from ringbench.layout import LAYOUTS

PROG = "ringbench"


class UsageError(Exception):
    """Raised by the parsers instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def launcher_rank() -> int:
    """This process's rank as the launcher set it (before MPI is initialised); 0 outside MPI."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def fail(prog: str, message: str) -> int:
    if launcher_rank() == 0:
        print(f"{prog}: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
_HELP = {
    "batch": "batch size B", "seq_len": "global sequence length N (over all ranks)", "heads": "query heads H",
    "kv_heads": "key/value heads H_kv dividing H (GQA; 1 = MQA; default H)", "head_dim": "head dimension D",
    "dtype": "storage dtype (half precision accumulates in float32)", "causal": "causal mask",
    "layout": "how the sequence is split over ranks", "mode": "communication scheme being measured",
    "backend": "numpy (CPU) or cupy (one GPU per rank)",
    "progress": "'test': MPI_Testall between compute tiles to drive transfers; 'none': no MPI call during compute",
    "cuda_aware": "pass device buffers to MPI directly (auto: ask the MPI library)",
    "tile_q": "query rows per score tile (0: automatic)", "warmup": "untimed-in-summary warm-up passes",
    "repeat": "timed passes", "seed": "input seed", "check": "compare with a float64 reference",
    "save_tensors": "store global q, k, v, out in the result (small problems)",
}
_CHOICES = {"dtype": DTYPES, "layout": LAYOUTS, "mode": MODES, "backend": BACKENDS, "progress": PROGRESS,
            "cuda_aware": CUDA_AWARE}


def run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} run", description="One ring-attention run; launch with mpiexec -n P.")
    defaults = RunConfig()
    for f in fields(RunConfig):
        opt, default = option_name(f.name), getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(opt, action=argparse.BooleanOptionalAction, default=default, help=_HELP[f.name])
        elif f.name in _CHOICES:
            p.add_argument(opt, choices=_CHOICES[f.name], default=default, help=_HELP[f.name])
        else:
            p.add_argument(opt, type=int, default=default, metavar="N", help=_HELP[f.name])
    p.add_argument("--out", metavar="FILE.h5", help="append the run to this HDF5 result file")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    cfg = RunConfig(**{f.name: getattr(ns, f.name) for f in fields(RunConfig)})
    return cfg


def to_argv(cfg: RunConfig) -> list[str]:
    """The ``ringbench run`` options that reproduce ``cfg`` (used by sweeps and job scripts)."""
    argv = []
    defaults = RunConfig()
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        opt = option_name(f.name)
        if isinstance(value, bool):
            argv.append(opt if value else "--no-" + opt[2:])
        else:
            argv += [opt, str(value)]
    return argv


def cmd_run(argv: list[str]) -> int:
    """Run ring attention on the ranks of this MPI job."""
    try:
        ns = run_parser().parse_args(argv)
        cfg = config_from_args(ns)
    except (UsageError, ConfigError) as exc:
        return fail(f"{PROG} run", str(exc))
    from ringbench import comm as mpi  # initialises MPI
    try:
        from ringbench import runner
        return runner.run(cfg, ns.out, ns.quiet)
    except UserError as exc:
        if mpi.WORLD.rank == 0:
            print(f"{PROG} run: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # any failure on any rank ends the whole job, never a hang
        mpi.report_exception_and_abort(exc)
        return 1


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
COMMANDS = {
    "run": cmd_run,
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
        return fail(PROG, f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; "
                          f"allowed: {', '.join(COMMANDS)}")
    return cmd(argv[1:])
