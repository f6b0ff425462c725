"""Harness: one run over the ranks: set up, warm up, repeat, check against float64, gather, record.

``runner`` (``ringbench run``), ``doctor`` (is this allocation ready?), ``probe`` (the machine's parameters for the
model), ``inputs`` (deterministic global inputs any rank can make for its own tokens), ``progress`` (the progress
line).

May import: ``engine``, ``kernels``, ``store``, ``analysis`` (its pure metrics and model) and the top-level modules.
"""
