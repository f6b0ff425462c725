"""ringbench: a benchmark and experiment harness for Ring Attention over MPI.

The package's folders are its layers (docs/architecture.md; tests/test_layers.py states the rules):
``kernels`` (per-rank attention math), ``engine`` (MPI, the ring and the strategies), ``store`` (the HDF5 result
file), ``harness`` (one run over the ranks), ``sweeps`` (experiment files, local and Slurm sweeps), ``analysis``
(metrics, the model, advice, report, plots); ``cli``, ``config``, ``layout``, ``provenance`` and ``yamlfile`` at the
top. Modules of the former flat layout (``ringbench.results``, ``ringbench.model``, ...) still resolve as attributes
of the package (``from ringbench import results``), with a DeprecationWarning naming the new place.

Kept import-light: ``import ringbench`` loads no array library and no MPI (BLAS thread counts are set at
run time, by backend.limit_threads, not through the environment before NumPy loads).
"""

import os

__version__ = "0.1.0"
SCHEMA_VERSION = 5


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


# where each module of the flat layout (before 0.2) lives now: `from ringbench import results` keeps working
MOVED = {
    **dict.fromkeys(("kernel", "backward", "fused", "torch_kernel", "mkl"), "kernels"),
    **dict.fromkeys(("comm", "ring", "strategies", "backend"), "engine"),
    **dict.fromkeys(("runner", "doctor", "probe", "inputs", "progress"), "harness"),
    **dict.fromkeys(("experiment", "sweep", "slurm"), "sweeps"),
    **dict.fromkeys(("measure", "results", "model", "advise", "report", "plot"), "analysis"),
}


def __getattr__(name: str):
    """``ringbench.results`` (and the other modules of the flat layout): the module at its new place, with a warning."""
    if name not in MOVED:
        raise AttributeError(f"module 'ringbench' has no attribute {name!r}")
    import importlib
    import warnings

    new = f"ringbench.{MOVED[name]}.{name}"
    warnings.warn(f"ringbench.{name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
    return importlib.import_module(new)
