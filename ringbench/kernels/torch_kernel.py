"""Production attention kernels inside the ring: PyTorch's fused attention and flash-attn (``--kernel``).

The ring, the transfers, the checks and the measurements stay ringbench's; only the per-step attention of a
K/V block changes. :class:`FusedAttention` has the interface of :class:`ringbench.kernels.kernel.OnlineSoftmax`
(``reset``, ``update(k, v, pieces)``, ``finalize(out_dtype)``, and ``tile_q``/``tile_k``/``head_chunk``):
for every piece of a step plan it calls one fused kernel that returns the partial output and its
log-sum-exp, and merges them into the running (output, lse) of the rank's queries exactly, by log-sum-exp.

Kernels (q is (Z, G, n, D) head-major, Z = B * H_kv, G = H / H_kv; k/v (Z, m, D)):

* ``torch`` on the CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` with q as (Z, G, n, D) and
  k/v as (Z, 1, m, D): the op maps query head h to kv head h // G itself (GQA without copies). float32,
  float64, float16 and bfloat16.
* ``torch`` on CUDA: ``aten._scaled_dot_product_flash_attention`` (float16/bfloat16) or
  ``aten._scaled_dot_product_efficient_attention`` (float32). These need as many kv heads as query heads:
  with G > 1 an unmasked piece folds the G query heads into the query rows ((Z, 1, G * nq, D), a copy of
  the piece's queries), a masked one repeats K/V G times (a copy of G x the piece's keys and values).
* ``flash-attn`` (CUDA only): ``flash_attn.flash_attn_func(..., return_attn_probs=True)`` in its
  (batch, seq, heads, D) layout, GQA natively (views, no copies). float16/bfloat16.

The backward (``--pass bwd``/``fwd+bwd``): with ``torch`` on the CPU, :class:`FusedBackward` (the interface of
:class:`ringbench.kernels.backward.BlockBackward`) calls ``aten._scaled_dot_product_flash_attention_for_cpu_backward`` per
piece with the forward's final O and LSE, in calls per chunk of heads and (unmasked pieces) of query rows
(:func:`row_chunks`), with the ring's MPI progress between them. On CUDA (torch's flash/efficient backward ops want the forward's RNG state
and sequence bookkeeping) and with flash-attn the backward is refused (:func:`unavailable`).

Masks (``ringbench.layout``): FULL -> ``is_causal=False``; CAUSAL (square, j <= i) -> ``is_causal=True``
(top-left aligned, which for a square piece is also flash-attn's bottom-right); STRICT (square, j < i:
striped's shifted triangle) -> queries 1..n-1 against keys 0..n-2 with ``is_causal=True``, and query 0 sees
no key of the block (it keeps lse -inf from this block). Zigzag pieces are FULL or CAUSAL on sub-ranges. BAND
(packed documents, sliding windows; :func:`sdpa_parts`): without a window a band is split into what ``is_causal``
covers exactly (a FULL rectangle left of the diagonal, the CAUSAL square on it, FULL rows below it that see every
key: at most three calls); with a window, in blocks of BAND_ROWS query rows, each against only the keys its rows see,
unmasked where the block sees them all and with an additive float mask (-inf where hidden) otherwise, on the CPU:
the fused CPU op takes ``attn_mask`` (in the query's dtype) forward and backward. Measured against one masked call
over the whole piece (torch 2.13 CPU, 1 thread, Z = 4, G = 2, D = 64, float32, a 2-core VM at load ~5): a 2048 x 2048
band at offset 1024 took 290 ms split (3 calls) vs 391 ms masked, 1024 x 3072 at offset 2048 119 vs 416 ms, a
2048-row window of 512 in row blocks 170 vs 316 ms: the split (and the blocks) win 1.35-3.5x, as the mask costs a
pass over every score and the op cannot skip its hidden tiles. The CUDA ops take no mask here: ``--window`` with a
fused kernel on CUDA is refused (:func:`unavailable`).

Arrays cross between NumPy/CuPy and torch without copies: ``torch.from_numpy`` on the host (NumPy's
bfloat16, from ml_dtypes, through a uint16 view), DLPack (``torch.from_dlpack``/``cupy.from_dlpack``) on a GPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ringbench.kernels.kernel import compute_dtype, softmax_scale, tile_masked
from ringbench.layout import BAND, CAUSAL, FULL, STRICT, Piece, band_hidden, key_bounds

# nominal tile of torch's CPU flash attention (q split 256 rows at blocks >= 768, kv split 512): for the memory model
CPU_TILE_Q, CPU_TILE_K = 256, 512
# on the CPU a piece is computed in up to this many calls, each on a chunk of the batch-heads, with the ring's MPI
# progress (on_tile) between them: one fused call per step leaves the transfer unprogressed until the wait (issue 21;
# benchmarks/README.md "Overlap"). Heads are independent in the op, so the chunks give the one call's bits.
CPU_CALLS_PER_PIECE = 8
# a windowed band goes to the fused op in blocks of this many query rows, each against the keys its rows see
BAND_ROWS = 256


def sdpa_parts(p: Piece, rows: int = BAND_ROWS) -> list[tuple[int, int, int, int, bool, tuple | None]]:
    """The fused calls that compute piece ``p`` exactly: (q0, q1, k0, k1, is_causal, band or None) each, in block
    rows; ``band`` (offset, window): the call needs the additive mask of ``layout.band_hidden`` on its rows x keys.
    Empty calls are left out (STRICT's query 0, a band's rows that see nothing)."""
    q0, q1, k0, k1 = p.q0, p.q1, p.k0, p.k1
    if p.mask == FULL:
        return [(q0, q1, k0, k1, False, None)]
    if p.mask == CAUSAL:
        return [(q0, q1, k0, k1, True, None)]
    if p.mask == STRICT:  # j < i: query i against keys .. i-1, i.e. causal on (q0+1.., ..k1-1)
        return [(q0 + 1, q1, k0, k1 - 1, True, None)] if q1 - q0 > 1 else []
    if p.mask != BAND:
        raise ValueError(f"unknown mask {p.mask!r}")
    nq, nk, d, w = q1 - q0, k1 - k0, p.offset, p.window
    out = []
    if not w:  # row i sees keys [0, i + d + 1): rows [r0, r1) cut at the diagonal, rows [r1, nq) see every key
        r0 = max(0, -d)
        r1 = max(r0, min(nq, nk - d))
        if r1 > r0 and r0 + d > 0:
            out.append((q0 + r0, q0 + r1, k0, k0 + r0 + d, False, None))
        if r1 > r0:
            out.append((q0 + r0, q0 + r1, k0 + r0 + d, k0 + r1 + d, True, None))
        if nq > r1 and nk > 0:
            out.append((q0 + max(r0, r1), q1, k0, k1, False, None))
        return out
    for a0 in range(0, nq, rows):
        a1 = min(a0 + rows, nq)
        b0, b1 = key_bounds(p, a0)[0], key_bounds(p, a1 - 1)[1]
        if b1 <= b0:
            continue
        masked = tile_masked(p, a0, a1, b0, b1)
        out.append((q0 + a0, q0 + a1, k0 + b0, k0 + b1, False, (d + a0 - b0, w) if masked else None))
    return out


def band_mask(torch, nq: int, nk: int, bnd: tuple, dtype, device=None):
    """(nq, nk) additive mask of band ``bnd`` (offset, window): 0 where visible, -inf where ``layout.band_hidden``."""
    hide = band_hidden(bnd[0], bnd[1], np.arange(nq)[:, None], np.arange(nk)[None, :])
    return torch.zeros((nq, nk), dtype=dtype, device=device).masked_fill_(torch.from_numpy(hide).to(device), float("-inf"))


# the backward also splits each call of an unmasked piece by query rows, into up to CPU_BWD_ROW_CALLS calls of at least
# CPU_BWD_ROWS rows each: more progress points for the dK/dV slices the backward's last step sends home while it computes
# (a head's call is 1/8 of a step, too coarse for a slice to finish between two of them). Rows are independent for dQ;
# dK/dV add the calls' parts in row order, the same in every mode.
CPU_BWD_ROW_CALLS, CPU_BWD_ROWS = 4, 256


def head_chunks(z: int, gpu: bool) -> list[tuple[int, int]]:
    """The (z0, z1) chunks of the Z batch-heads a fused kernel is called on, one call each: one chunk on a GPU, up
    to CPU_CALLS_PER_PIECE on the CPU."""
    hc = z if gpu else -(-z // CPU_CALLS_PER_PIECE)
    return [(z0, min(z0 + hc, z)) for z0 in range(0, z, hc)]


def row_chunks(q0: int, q1: int, min_rows: int, calls: int = CPU_BWD_ROW_CALLS) -> list[tuple[int, int]]:
    """Rows q0..q1 in up to ``calls`` near-equal (a, b) chunks of at least ``min_rows`` rows (one chunk if fewer)."""
    n = q1 - q0
    k = max(1, min(calls, n // max(1, min_rows)))
    cuts = [q0 + (n * i) // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def unavailable(kernel: str, backend, dtype: str, *, backward: bool = False, window: bool = False) -> str | None:
    """Why ``--kernel kernel`` cannot run on ``backend`` with ``--dtype dtype`` (one line), or None if it can;
    ``backward``: the run has a backward pass (``--pass bwd`` or ``fwd+bwd``), which only torch on the CPU has;
    ``window``: a sliding window (its bands need an attention mask, which only the CPU op takes here)."""
    if kernel == "native":
        return None
    gpu = backend.is_gpu
    if gpu and window:
        why = "a window needs a mask the CUDA ops here do not take"
        return f"--kernel {kernel} with --window runs on the CPU only ({why}); use --kernel native"
    if kernel == "flash-attn":
        if not gpu:
            return "--kernel flash-attn runs on CUDA GPUs only (--backend cupy); on the CPU use --kernel torch or native"
        if backward:
            return "--kernel flash-attn has a forward pass only here (its backward is not wired in yet); use --pass fwd"
        if importlib.util.find_spec("flash_attn") is None:
            return "--kernel flash-attn needs the flash_attn package: pip install flash-attn (CUDA builds only)"
    elif gpu and backward:
        return "--kernel torch with --pass bwd or fwd+bwd runs on the CPU only (--backend numpy); on CUDA use --pass fwd"
    try:
        import torch
    except ImportError as exc:
        return f"--kernel {kernel} needs PyTorch: pip install 'ringbench[torch]' ({exc})"
    if gpu and not torch.cuda.is_available():
        return f"--kernel {kernel} with --backend cupy needs a CUDA build of PyTorch; this torch {torch.__version__} sees no CUDA device"
    allowed = kernel_dtypes(kernel, gpu)
    if dtype not in allowed:
        where = "CUDA" if gpu else "the CPU"
        return f"--kernel {kernel} on {where} does not take --dtype {dtype}; allowed: {', '.join(allowed)}"
    return None


def kernel_dtypes(kernel: str, gpu: bool) -> tuple[str, ...]:
    """Storage dtypes a fused kernel computes in (half precision runs in half precision, accumulating in float32)."""
    if kernel == "flash-attn":
        return ("float16", "bfloat16")
    if gpu:  # flash (half) and memory-efficient (float32) attention; neither has float64
        return ("float32", "float16", "bfloat16")
    return ("float32", "float64", "float16", "bfloat16")


def to_torch(a):
    """A torch tensor sharing ``a``'s memory: ``torch.from_numpy`` for NumPy (bfloat16 through a uint16 view:
    NumPy's ml_dtypes bfloat16 has no DLPack code), DLPack for CuPy."""
    import torch

    if isinstance(a, np.ndarray):
        with warnings.catch_warnings():  # read-only views (the ring's head layouts) are only read here: no warning
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            if str(a.dtype) == "bfloat16":
                return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
            return torch.from_numpy(a)
    return torch.from_dlpack(a)


def from_torch(xp, t):
    """``xp``'s array sharing the memory of tensor ``t`` (float16/32/64)."""
    if xp is np:
        return t.numpy()
    return xp.from_dlpack(t)


class FusedAttention:
    """Running (output, log-sum-exp) of one rank's queries, updated by a fused kernel per piece.

    ``q`` (Z, G, n, D) is in the compute dtype and only read (never written to); the kernels apply ``scale`` (the
    softmax scale, 1/sqrt(D); None: q is already scaled, the kernels run with scale 1); ``dtype`` is the dtype the
    kernel runs in (the storage dtype: half precision stays half). The state keeps (Z, G, n, D) output and (Z, G, n)
    lse in float32 (float64 for float64 runs) and merges each piece's partial into them: out += (o - out) *
    sigmoid(l - lse), lse = logaddexp(lse, l), in place (the same exact merge as :func:`ringbench.kernels.kernel.merge`; a
    piece's rows always saw a key, so l is finite). Rows no piece touched since :meth:`reset` are copied, not
    merged. ``on_tile`` (the ring's MPI progress) is called after every piece: a fused kernel is one call, so
    progress happens between pieces only.
    """

    def __init__(self, backend, q, *, kernel: str, dtype, on_tile: Callable[[], None] | None = None, scale: float | None = None):
        import torch

        self.torch = torch
        self.xp = backend.xp
        self.kernel = kernel
        self.gpu = backend.is_gpu
        self.on_tile = on_tile
        z, g, n, d = q.shape
        self.shape = (z, g, n, d)
        self.dtype = np.dtype(q.dtype)  # accumulation: float32, or float64
        self.kdtype = np.dtype(dtype)  # the kernel's inputs
        if self.gpu and backend.device_id is not None:
            torch.cuda.set_device(backend.device_id)
        qt = to_torch(q)
        self._tdtype = _torch_dtype(torch, self.kdtype)
        self.q = qt if qt.dtype == self._tdtype else qt.to(self._tdtype)  # (Z, G, n, D): kept (shares q when dtypes agree)
        self.out = torch.zeros((z, g, n, d), dtype=qt.dtype, device=qt.device)
        self.lse = torch.full((z, g, n), -np.inf, dtype=qt.dtype, device=qt.device)
        self._seen = np.zeros(n, bool)  # rows that some piece reached since reset()
        self._masks = {}  # (nq, nk, offset, window) -> a windowed band's additive mask
        self.head_chunk = 1 if not self.gpu else z
        self.tile_q = min(n, CPU_TILE_Q) if not self.gpu else 0  # on a GPU the score tiles stay on chip
        self.tile_k = CPU_TILE_K if not self.gpu else 0
        sc = 1.0 if scale is None else float(scale)
        if not self.gpu:
            self.call = _cpu_call(torch, sc)
        else:
            self.call = flash_attn_call(scale=sc) if kernel == "flash-attn" else cuda_call(torch, self._tdtype, scale=sc)
        self.library = _describe(torch, kernel, self.gpu, self._tdtype)

    def reset(self) -> None:
        self.out.zero_()
        self.lse.fill_(-np.inf)
        self._seen[:] = False

    def load(self, q) -> None:
        """Compute for other queries ``q`` from now on, unscaled as the constructor's: (Z, G, n, D) is read in place,
        never written to (pass-Q's visiting blocks); any other shape holding Z x G x n x D elements in that order is
        reshaped (a copy where its strides need one: hybrid's queries, gathered by an all-to-all each pass). Converted
        to the kernel's dtype where it differs."""
        qt = to_torch(q)
        if tuple(qt.shape) != self.shape:
            if qt.numel() != int(np.prod(self.shape)):
                raise ValueError(f"FusedAttention.load: q {tuple(qt.shape)} must be {self.shape} (or hold as many elements)")
            qt = qt.reshape(self.shape)
        self.q = qt if qt.dtype == self._tdtype else qt.to(self._tdtype)

    def update(self, k, v, pieces: Sequence[Piece]) -> None:
        """Fold the key/value block ``k, v`` (Z, m, D) into the state, for the given pieces."""
        kt, vt = to_torch(k), to_torch(v)
        if kt.dtype != self._tdtype:
            kt, vt = kt.to(self._tdtype), vt.to(self._tdtype)
        with self.torch.inference_mode():
            for p in pieces:
                self._piece(kt, vt, p)

    def _piece(self, k, v, p: Piece) -> None:
        parts = sdpa_parts(p)
        if not parts and self.on_tile is not None:  # nothing visible (the CPU op must never see an empty block)
            self.on_tile()
        for q0, q1, k0, k1, causal, bnd in parts:
            self._part(k, v, q0, q1, k0, k1, causal, None if bnd is None else self._mask(q1 - q0, k1 - k0, bnd))

    def _mask(self, nq: int, nk: int, bnd: tuple):
        if self.gpu:
            raise ValueError("FusedAttention: a windowed band needs an attention mask, which the CUDA ops here do not take")
        key = (nq, nk) + tuple(bnd)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) > 64:
                self._masks.clear()
            mask = self._masks[key] = band_mask(self.torch, nq, nk, bnd, self._tdtype)
        return mask

    def _part(self, k, v, q0, q1, k0, k1, causal: bool, mask) -> None:
        seen = self._seen[q0:q1]
        first = not seen.any()
        for z0, z1 in head_chunks(self.shape[0], self.gpu):  # one call per chunk of heads, MPI progress between
            h = slice(z0, z1)
            q, kb, vb = self.q[h, :, q0:q1], k[h, None, k0:k1], v[h, None, k0:k1]
            o, lse = self.call(q, kb, vb, causal) if mask is None else self.call(q, kb, vb, causal, mask)  # (Zc, G, nq, D), (Zc, G, nq)
            out, acc = self.out[h, :, q0:q1], self.lse[h, :, q0:q1]
            if first:
                out.copy_(o)
                acc.copy_(lse)
            else:
                w = self.torch.sigmoid(lse - acc)  # weight of the new part: e^l / (e^acc + e^l); 1 where acc = -inf
                out.lerp_(o.to(out.dtype), w[..., None])
                self.torch.logaddexp(acc, lse.to(acc.dtype), out=acc)
            if self.on_tile is not None:
                self.on_tile()
        seen[:] = True

    def finalize(self, out_dtype=None):
        """Normalised output (Z, G, n, D) and log-sum-exp (Z, G, n); rows that saw no key give 0 and -inf."""
        if self.gpu:
            self.torch.cuda.current_stream().synchronize()
        out = from_torch(self.xp, self.out.clone())
        lse = from_torch(self.xp, self.lse.clone())
        return (out if out_dtype is None else out.astype(out_dtype, copy=False)), lse


class FusedBackward:
    """One rank's share of the attention backward through PyTorch's fused CPU backward, with the interface of
    :class:`ringbench.kernels.backward.BlockBackward` (``reset``, ``update(k, v, dk_acc, dv_acc, pieces)``, ``dq(out_dtype)``,
    ``dqa``/``scale``, ``tile_q``/``tile_k``/``head_chunk``).

    Per piece it calls ``aten._scaled_dot_product_flash_attention_for_cpu_backward`` with the forward's final O and
    LSE (the global ones, not the block's): FlashAttention-2's backward with them gives exactly the block's share of
    dQ, dK and dV (P = exp(S - LSE) is the block's part of the global softmax, D = rowsum(dO * O) the global one).
    ``q`` (Z, G, n, D) as BlockBackward takes it (already multiplied by ``scale``: the op runs with scale 1, and
    :meth:`dq` multiplies by ``scale``); ``do``, ``out`` (Z, G, n, D); ``lse`` (Z, G, n), natural log. The op runs in
    ``dtype`` (the storage dtype: half precision stays half) and takes k/v as (Z, 1, m, D): GQA without copies, and it
    returns dK/dV already summed over the G query heads of a kv head. dQ, dK and dV are added in the compute dtype
    (float32 for half precision). CPU only (the runner refuses the torch backward on CUDA: :func:`unavailable`).
    ``on_tile`` (the ring's MPI progress) runs after every call: one per chunk of heads (:func:`head_chunks`) and, for
    an unmasked piece, per chunk of its query rows (:func:`row_chunks`, at least ``min_rows`` rows, default
    CPU_BWD_ROWS): dQ's rows are independent, dK/dV add the row chunks' parts in order (the same in every mode).
    """

    def __init__(
        self,
        backend,
        q,
        do,
        out,
        lse,
        *,
        dtype,
        scale: float | None = None,
        on_tile: Callable[[], None] | None = None,
        min_rows: int | None = None,
    ):
        import torch

        if backend.is_gpu:
            raise ValueError("FusedBackward: PyTorch's fused backward runs on the CPU only (--backend numpy)")
        z, g, n, d = q.shape
        if do.shape != q.shape or out.shape != q.shape or lse.shape != (z, g, n):
            raise ValueError(f"FusedBackward: q {q.shape}, do {do.shape}, out {out.shape} must match and lse {lse.shape} be (Z, G, n)")
        self.torch = torch
        self.xp = backend.xp
        self.shape = (z, g, n, d)
        self.dtype = compute_dtype(q.dtype)  # the accumulators: float32, or float64
        self.scale = softmax_scale(d) if scale is None else float(scale)
        self.on_tile = on_tile
        self.min_rows = CPU_BWD_ROWS if min_rows is None else min_rows  # an unmasked piece's calls: rows each, at least
        self._tdtype = _torch_dtype(torch, np.dtype(dtype))
        ldt = torch.float64 if self._tdtype == torch.float64 else torch.float32  # the op's lse dtype
        self.q, self.do, self.out = (to_torch(a).to(self._tdtype).contiguous() for a in (q, do, out))  # (Z, G, n, D), read only
        self.lse = to_torch(lse).to(ldt).contiguous()  # (Z, G, n)
        self.dqa = np.zeros((z, n, g, d), self.dtype)  # dQ / scale, query-major as BlockBackward's
        self._dq = to_torch(self.dqa).transpose(1, 2)  # (Z, G, n, D) view
        self.head_chunk, self.tile_q, self.tile_k = 1, min(n, CPU_TILE_Q), CPU_TILE_K  # the op's nominal tiles
        self.op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        self.library = f"torch {torch.__version__} aten._scaled_dot_product_flash_attention_for_cpu_backward"
        self._masks = {}  # (nq, nk, offset, window) -> a windowed band's additive mask

    def reset(self) -> None:
        """Zero dQ for another pass over the same q, dO, O and LSE."""
        self.dqa.fill(0)

    def set_do(self, do) -> None:
        """Replace dO (same queries, O and LSE): ``do`` holds Z x G x n x D elements in that order (any shape that
        reshapes to (Z, G, n, D), any dtype and strides). Hybrid's dO arrives by an all-to-all each pass."""
        self.do = to_torch(do).to(self._tdtype).reshape(self.shape).contiguous()

    @property
    def head_bounds(self) -> tuple[int, ...]:
        """The bounds of the op's head chunks (:func:`head_chunks`): where :meth:`update`'s ``heads`` may start and end."""
        return tuple(z0 for z0, _ in head_chunks(self.shape[0], False)) + (self.shape[0],)

    def update(self, k, v, dk_acc, dv_acc, pieces: Sequence[Piece], heads: tuple[int, int] | None = None) -> None:
        """Fold the K/V block ``k, v`` (Z, m, D) in, for the given pieces: dQ here, dK and dV added into ``dk_acc``,
        ``dv_acc`` (Z, m, D) in the compute dtype. ``heads`` (z0, z1): only those batch-heads, on :attr:`head_bounds`."""
        for name, a in (("dk_acc", dk_acc), ("dv_acc", dv_acc)):
            if a.dtype != self.dtype or a.shape != k.shape:
                raise ValueError(f"FusedBackward.update: {name} must be {self.dtype} of shape {k.shape}, got {a.dtype} {a.shape}")
        kt, vt = to_torch(k), to_torch(v)
        if kt.dtype != self._tdtype:
            kt, vt = kt.to(self._tdtype), vt.to(self._tdtype)
        dk, dv = to_torch(dk_acc), to_torch(dv_acc)
        if heads is not None and (heads[0] not in self.head_bounds or heads[1] not in self.head_bounds):
            raise ValueError(f"FusedBackward.update: heads {heads} must start and end on the head-chunk bounds {self.head_bounds}")
        with self.torch.inference_mode():
            for p in pieces:
                self._piece(kt, vt, dk, dv, p, heads or (0, self.shape[0]))

    def _piece(self, k, v, dk_acc, dv_acc, p: Piece, heads: tuple[int, int]) -> None:
        parts = sdpa_parts(p)
        if not parts and self.on_tile is not None:  # nothing visible (the CPU op must never see an empty block)
            self.on_tile()
        for q0, q1, k0, k1, causal, bnd in parts:
            mask = None
            if bnd is not None:
                key = (q1 - q0, k1 - k0) + tuple(bnd)
                mask = self._masks.get(key)
                if mask is None:
                    if len(self._masks) > 64:
                        self._masks.clear()
                    mask = self._masks[key] = band_mask(self.torch, q1 - q0, k1 - k0, bnd, self._tdtype)
            self._part(k, v, dk_acc, dv_acc, q0, q1, k0, k1, causal, mask, heads)

    def _part(self, k, v, dk_acc, dv_acc, q0, q1, k0, k1, causal: bool, mask, heads: tuple[int, int]) -> None:
        # one call per chunk of heads and (unmasked parts) of query rows, MPI progress between; a masked part's rows
        # see different keys, so it stays one call per head chunk
        spans = [(q0, q1)] if (causal or mask is not None) else row_chunks(q0, q1, self.min_rows)
        for z0, z1 in head_chunks(self.shape[0], False):
            if z0 < heads[0] or z1 > heads[1]:
                continue
            for a, b in spans:
                rows = (slice(z0, z1), slice(None), slice(a, b))
                dq, dk, dv = self.op(
                    self.do[rows],
                    self.q[rows],
                    k[z0:z1, None, k0:k1],
                    v[z0:z1, None, k0:k1],
                    self.out[rows],
                    self.lse[rows],
                    0.0,
                    causal,
                    attn_mask=mask,
                    scale=1.0,
                )  # (Zc, G, nq, D); (Zc, 1, nk, D) each: summed over the G query heads
                self._dq[rows] += dq
                dk_acc[z0:z1, k0:k1] += dk[:, 0]
                dv_acc[z0:z1, k0:k1] += dv[:, 0]
                if self.on_tile is not None:
                    self.on_tile()

    def dq(self, out_dtype=None):
        """The finished dQ (Z, G, n, D), in the compute dtype or ``out_dtype``: a new array."""
        dq = np.multiply(self.dqa.transpose(0, 2, 1, 3), self.dtype.type(self.scale))
        return np.ascontiguousarray(dq, dtype=out_dtype or self.dtype)


def _torch_dtype(torch, dt: np.dtype):
    if str(dt) == "bfloat16":
        return torch.bfloat16
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[dt]


def _cpu_call(torch, scale: float = 1.0):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def call(q, k, v, causal: bool, mask=None):
        o, lse = op(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)  # kv heads broadcast: head h reads h // G
        return o, lse

    return call


def cuda_call(torch, dtype, aten=None, scale: float = 1.0):
    """CUDA: flash attention for half precision, memory-efficient attention for float32 (both return the lse).

    ``aten``: where the two ops are looked up (``torch.ops.aten``; tests pass CPU stand-ins)."""
    aten = aten or torch.ops.aten
    if dtype == torch.float32:

        def op(q, k, v, causal):
            o, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
            return o, lse[..., : q.shape[2]]  # the lse may be padded along the queries
    else:

        def op(q, k, v, causal):
            o, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
            return o, lse

    def call(q, k, v, causal: bool):
        z, g, nq, d = q.shape
        if g == 1:
            return op(q, k, v, causal)
        if not causal:  # fold the G heads into the rows: one kv head, G * nq queries
            o, lse = op(q.reshape(z, 1, g * nq, d), k, v, False)
            return o.reshape(z, g, nq, d), lse.reshape(z, g, nq)
        m = k.shape[2]
        return op(q, k.expand(z, g, m, d).contiguous(), v.expand(z, g, m, d).contiguous(), True)

    return call


def flash_attn_call(flash_attn_func=None, scale: float = 1.0):
    if flash_attn_func is None:
        from flash_attn import flash_attn_func

    def call(q, k, v, causal: bool):
        # flash-attn's layout is (batch, seq, heads, D) with the last dim contiguous: transposed views
        o, lse, _ = flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            return_attn_probs=True,
        )
        return o.transpose(1, 2), lse[..., : q.shape[2]]

    return call


def _describe(torch, kernel: str, gpu: bool, dtype) -> str:
    if kernel == "flash-attn":
        import flash_attn

        return f"flash_attn {flash_attn.__version__} flash_attn_func (torch {torch.__version__})"
    if not gpu:
        name = "_scaled_dot_product_flash_attention_for_cpu"
    else:
        name = "_scaled_dot_product_efficient_attention" if dtype == torch.float32 else "_scaled_dot_product_flash_attention"
    return f"torch {torch.__version__} aten.{name}"
