"""Under MPI across the emulated nodes (tests/harness/test_multinode.py): every strategy, forward and backward, checked
against the float64 reference, one ``ringbench run`` each, in one launch; each run appended to the spec's ``out``.

spec: {"out": FILE.h5, "runs": [{RunConfig fields}, ...]}. Exit status: 0 when every run passed its checks."""

from __future__ import annotations

import json
import sys

from ringbench.config import RunConfig
from ringbench.engine import comm
from ringbench.harness import runner


def main() -> int:
    spec = json.loads(sys.argv[1])
    status = 0
    for fields in spec["runs"]:
        cfg = RunConfig.from_dict(fields)
        rc = runner.run(cfg, out=spec["out"], quiet=True)
        status = max(status, comm.bcast(rc))  # rank 0 knows whether the checks passed
    if comm.WORLD.rank == 0:
        print("RESULT " + json.dumps({"status": status}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(comm.run_or_abort(main))
