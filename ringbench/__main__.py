import os

# One BLAS thread per rank unless the user asked otherwise: ranks are the
# parallelism, and oversubscribed BLAS threads would only fight over cores.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from ringbench.cli import main  # noqa: E402

raise SystemExit(main())
