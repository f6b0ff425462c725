"""ringbench: a benchmark and experiment harness for Ring Attention over MPI.

Kept import-light: ``import ringbench`` loads no array library and no MPI (BLAS thread counts are set at
run time, by backend.limit_threads, not through the environment before NumPy loads).
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
    """Entry point of ``ringbench`` and ``python -m ringbench``."""
    from ringbench.cli import main

    return main()
