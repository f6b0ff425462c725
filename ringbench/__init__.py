"""ringbench: a benchmark and experiment harness for Ring Attention over MPI.

Kept import-light on purpose: the command-line entry points set the BLAS thread count before NumPy is
loaded, so nothing here may import numpy.
"""

import os

__version__ = "0.1.0"
SCHEMA_VERSION = 2


def env_int(names, default: int = 0) -> int:
    """The first of the environment variables ``names`` that holds an integer (launchers' rank variables)."""
    for var in names:
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return default


def console_main() -> int:
    """Entry point of ``ringbench`` and ``python -m ringbench``: one BLAS thread per rank, then the CLI.

    Ranks are the parallelism; BLAS threads on top of them would only fight over cores. A value the user
    set (OPENBLAS_NUM_THREADS=4 ringbench run ...) is kept.
    """
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from ringbench.cli import main

    return main()
