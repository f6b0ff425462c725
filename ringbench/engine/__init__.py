"""Engine: one rank's part of a context-parallel pass: the ring, the other strategies, MPI and the array backend.

``comm`` (the only module that touches MPI), ``backend`` (the only module that imports cupy: array module, device,
timers), ``ring`` (the ring step loop: post the next K/V transfer, compute on the current block, wait, swap),
``strategies`` (all-gather, Ulysses, hybrid, pass-Q).

May import: ``ringbench.kernels`` and the top-level modules. Never HDF5, plotting, the harness, sweeps or analysis.
"""
