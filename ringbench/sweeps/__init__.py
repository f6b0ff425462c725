"""Sweeps: experiment files, their points, running them here (mpiexec) or as Slurm job arrays.

``experiment`` (the YAML experiment format, validated on load, expanded into points with stable ids), ``sweep``
(the result layout, launchers, one subprocess per point, point states), ``slurm`` (render and submit job-array
scripts; ``templates/``).

May import: ``store``, ``kernels`` (only to measure which exponential a sweep uses) and the top-level modules.
Never MPI: a sweep starts ``ringbench run`` in subprocesses.
"""
