"""Kernels: the per-rank attention math of one block pair, forward and backward, and nothing else.

Pure functions and small state classes over an array module ``xp`` (numpy or cupy, passed in, never imported here):
``kernel`` (blockwise attention with an online softmax, the forward), ``backward`` (FlashAttention-2's backward of
one block pair, the float64 reference gradients), ``fused`` (the score tile's elementwise pass, numba), ``mkl``
(Intel MKL's strided batched GEMM through ctypes), ``torch_kernel`` (PyTorch's fused attention and flash-attn with
the same interface as the native kernel).

May import: the top-level pure modules (``ringbench.layout``, ``ringbench.config``) and each other. Never MPI, HDF5,
plotting, or anything that runs or stores a benchmark (tests/test_layers.py).
"""
