#!/bin/bash
# ringbench job array: experiment $experiment, $nranks rank(s) per point, $ntasks array task(s).
# Written by ringbench $version at $utc.
# Array task K runs the points on line K (from 0) of
#   $tasks
# each with `$launcher`; results go to $parts/<point-id>.h5.
# Resubmit by hand with `sbatch $script`: points already stored are skipped.
$sbatch
set -eo pipefail     # not -u: site setup (module, venv activate) often reads unset variables
$setup
exec $command
