"""ringbench: a benchmark and experiment harness for Ring Attention over MPI.

Kept import-light on purpose: ``python -m ringbench`` sets the BLAS thread
count before NumPy is loaded, so nothing here may import numpy.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
