"""Analysis: what stored runs mean: metrics, table rows, the overlap model, advice, the report and the figures.

``measure`` (metrics from timing samples, pure), ``model`` (the calibrated overlap model, pure), ``results`` (runs
as table rows, CSV, pandas), ``advise`` (which strategy wins), ``report`` (the terminal report), ``plot``
(matplotlib figures).

May import: ``store``, ``kernels`` (FLOP counts) and the top-level modules. Never MPI or the engine: analysis runs
on a laptop from result files. ``measure`` and ``model`` are pure (no HDF5, no plotting).
"""
