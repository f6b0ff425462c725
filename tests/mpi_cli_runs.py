"""Many ``ringbench run`` invocations in one MPI job: ``RESULT {"codes": [...]}`` (each run's exit status).

Launching mpiexec costs seconds on a small machine (the interpreter, NumPy, mpi4py and h5py start on every rank),
so the run tests that differ only in their options run in one launch per rank count, as mpi4py runs its own
suite: each run goes through the same ``cli.main`` the console script calls, with its own options and result file.
A run that raises on any rank ends the whole job (``cmd_run`` aborts), so a failure never hangs the batch."""

import json
import sys

from ringbench import cli
from ringbench.engine import comm


def main() -> int:
    spec = json.loads(sys.argv[1])
    codes = [cli.main(["run", *map(str, argv)]) for argv in spec["runs"]]
    if comm.WORLD.rank == 0:
        print("RESULT " + json.dumps({"codes": codes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
