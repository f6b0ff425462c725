"""``ringbench doctor``: is this allocation ready for a sweep? Run under mpiexec/srun like ``run``.

Every rank reports its host, local rank, the device it selected, whether MPI is CUDA-aware, the MPI library and
the kernel libraries it finds (NumPy and its BLAS, Intel MKL, torch and its CUDA, flash_attn, CuPy and its GPUs);
then every rank runs two tiny ring passes, checked against the float64 reference, for each backend and kernel
available on every rank: causal zigzag, and a packed one (three documents of odd lengths and a sliding window, the
balanced layout; :func:`packed_changes`); the worse of the two is reported. Across nodes it also lists the nodes
(MPI's shared-memory split), their ranks, and each neighbour pair of the ring a run uses (node-major order) with its
link class and a 1 MiB ping-pong bandwidth.
Rank 0 gathers, prints a table and one line per problem.

Problems (exit status 1; 0 without any):

* a ring pass that ran and failed its check, or could not be built;
* a backend asked for with ``--backend`` that is not available on some rank (no CuPy, no GPU), or a kernel asked
  for with ``--kernel`` that runs on none of the backends checked (not installed, or no backend it runs on);
* a backend or kernel available on some ranks and not on others (a sweep would fail on those ranks).
* a node whose inter-node link delivers less than 1/SLOW_NODE of the other nodes' (``node_report``).

Without ``--backend``/``--kernel``, every backend and kernel is tried, and those missing everywhere (no GPU,
no torch, no flash_attn) are listed as "not available" without being problems: a CPU machine is healthy.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass

import numpy as np

from ringbench.config import BACKENDS, KERNELS, RunConfig
from ringbench.engine.backend import BackendError, get_backend, local_rank, numpy_blas
from ringbench.harness import inputs
from ringbench.kernels import reference
from ringbench.kernels.torch_kernel import unavailable
from ringbench.layout import positions

# the tiny checked pass: causal zigzag (diagonal, full and half pieces), GQA, 16 tokens per rank
CHECK = dict(batch=1, heads=4, kv_heads=2, head_dim=16, causal=True, layout="zigzag", mode="overlap", warmup=0, repeat=1)
TOKENS_PER_RANK = 16
# the packed pass: documents of 5, N - 8 and 3 tokens, a window of 7 (none for a fused kernel on CUDA, which takes no
# window), dealt by the balanced layout: banded, windowed and skipped pieces, cut at document boundaries
PACKED_WINDOW = 7


def packed_changes(nranks: int, gpu_fused: bool = False) -> dict:
    """What the packed pass changes in CHECK at ``nranks`` ranks."""
    n = TOKENS_PER_RANK * nranks
    return dict(docs=f"5,{n - 8},3", window=0 if gpu_fused else PACKED_WINDOW, layout="balanced")


@dataclass
class Combo:
    backend: str
    kernel: str
    dtype: str


def libraries(cupy: str) -> dict:
    """The kernel libraries this rank can import, as short strings ('-' for none); ``cupy`` is given."""
    libs = {"numpy": f"{np.__version__} {numpy_blas()}"}
    try:
        get_backend("numpy").matmul("mkl")
        libs["mkl"] = "yes"
    except BackendError:
        libs["mkl"] = "-"
    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no CUDA"
        libs["torch"] = f"{torch.__version__} ({cuda})"
    except ImportError:
        libs["torch"] = "-"
    if importlib.util.find_spec("flash_attn") is None:
        libs["flash_attn"] = "-"
    else:
        try:
            import flash_attn

            libs["flash_attn"] = flash_attn.__version__
        except Exception as exc:  # noqa: BLE001 - an installed but broken build is what doctor must report
            libs["flash_attn"] = f"broken ({exc.__class__.__name__}: {exc})"
    libs["cupy"] = cupy
    return libs


def _backends():
    """This rank's backends by name: (Backend or None, reason it is unavailable or None)."""
    out = {}
    for name in BACKENDS:
        try:
            out[name] = (get_backend(name, local_rank()), None)
        except BackendError as exc:
            out[name] = (None, str(exc))
    return out


def _combos(want_backends, want_kernels) -> list[Combo]:
    """Every (backend, kernel) to check, with the dtype it is checked in (flash-attn has no float32)."""
    return [Combo(b, k, "float16" if k == "flash-attn" else "float32") for b in want_backends for k in want_kernels]


def _cupy_text(backends: dict) -> str:
    gpu, why = backends["cupy"]
    if gpu is not None:
        return f"{gpu.versions().get('cupy', '?')} ({gpu.xp.cuda.runtime.getDeviceCount()} GPU(s))"
    return "-" if "needs CuPy" in why else "installed, no GPU"


def _why_not(combo: Combo, backends: dict) -> tuple[str, str] | None:
    """None if ``combo`` can run on this rank, else what is missing ('backend' or 'kernel') and why."""
    be, why = backends[combo.backend]
    if be is None:
        return "backend", why
    why = unavailable(combo.kernel, be, combo.dtype)
    return ("kernel", why) if why else None


def _build_ring(combo: Combo, backend, world, cuda_aware: bool, packed: bool = False):
    """The tiny ring of ``combo`` on this rank (``packed``: the packed pass), its config and its inputs for the check
    (no communication yet)."""
    from ringbench.engine import api

    rank, nranks = world.rank, world.size
    check = dict(CHECK, **packed_changes(nranks, backend.is_gpu and combo.kernel != "native")) if packed else CHECK
    cfg = RunConfig(seq_len=TOKENS_PER_RANK * nranks, dtype=combo.dtype, backend=combo.backend, kernel=combo.kernel, **check)
    dtype = backend.dtype(cfg.dtype)
    pos = positions(cfg.layout, rank, nranks, cfg.seq_len, cfg.doc_lengths, cfg.window, cfg.causal)
    allpos = np.arange(cfg.seq_len)
    dims = dict(batch=cfg.batch, seq_len=cfg.seq_len, head_dim=cfg.head_dim)
    q = inputs.tokens("q", 0, pos, heads=cfg.heads, **dims).astype(dtype)
    k = inputs.tokens("k", 0, allpos, heads=cfg.kv_heads, **dims).astype(dtype)
    v = inputs.tokens("v", 0, allpos, heads=cfg.kv_heads, **dims).astype(dtype)
    ctx = api.RankContext(cfg, backend, world, cuda_aware and backend.is_gpu)
    ring = api.build(ctx, backend.asarray(q), backend.asarray(k[:, pos]), backend.asarray(v[:, pos]))
    return ring, cfg, (q, k, v, pos, allpos)


def _ring_check(combo: Combo, backend, world, cuda_aware: bool) -> tuple[str, object]:
    """One checked ring pass on every rank (collective): ('ok' | 'FAILED', worst relative error) or ('error', why).

    A ring that cannot be built on some rank is agreed on before any transfer; a failure during the pass itself
    ends the job like any failure in ``run`` (a rank cannot leave a ring pass halfway without hanging its peers).
    """
    from ringbench.engine import comm
    from ringbench.kernels.reference import TOLERANCE

    worst = 0.0
    for packed in (False, True):
        try:
            ring, cfg, (q, k, v, pos, allpos) = _build_ring(combo, backend, world, cuda_aware, packed)
            why = None
        except Exception as exc:  # noqa: BLE001 - any failure to set a kernel up is what doctor reports
            why = f"rank {world.rank}: {exc.__class__.__name__}: {exc}"
        why = comm.first_error(why, world)
        if why:
            return "error", why
        ring.forward()
        out = backend.asnumpy(ring.output()).astype(np.float64)
        mask = dict(docs=cfg.doc_lengths, window=cfg.window)
        ref = reference.reference_attention(q, k, v, causal=True, q_pos=pos, k_pos=allpos, **mask)
        rel = float(np.abs(out - ref).max() / np.abs(ref).max()) if np.isfinite(out).all() else float("inf")
        worst = max(worst, max(world.allgather(rel)))
    return ("ok" if worst <= TOLERANCE[combo.dtype] else "FAILED"), worst


def run(want_backends: list[str] | None, want_kernels: list[str] | None) -> int:
    """The doctor on every rank; rank 0 prints. Returns the exit status (0 healthy, 1 problems found)."""
    from ringbench.engine import comm

    world = comm.WORLD
    backends = _backends()
    cuda_aware = comm.detect_cuda_aware()
    gpu = backends["cupy"][0]
    combos = _combos(want_backends or BACKENDS, want_kernels or KERNELS)
    local = {
        "host": socket.gethostname(),
        "local_rank": local_rank(),
        "device": f"{gpu.device_name} (GPU {gpu.device_id})" if gpu is not None else backends["numpy"][0].device_name,
        "cuda_aware": cuda_aware,
        "libs": libraries(_cupy_text(backends)),
        "missing": [_why_not(c, backends) for c in combos],
    }
    everyone = world.allgather(local)
    nodes = _node_links(world)
    results = []  # per combo: (status, detail)
    for i, c in enumerate(combos):
        missing = [(r, p["missing"][i]) for r, p in enumerate(everyone) if p["missing"][i]]
        if missing:
            results.append(("n/a", missing))
        else:
            results.append(_ring_check(c, backends[c.backend][0], world, cuda_aware))
    lines, problems = report(everyone, combos, results, want_backends, want_kernels, comm.mpi_info()["mpi_library"], nodes)
    if world.rank == 0:
        print("\n".join(lines), flush=True)
    return 1 if problems else 0  # the same on every rank: each has every record


PAIR_BYTES = 1 << 20  # the message of each neighbour pair's bandwidth check
PAIR_ITERS = 3
SLOW_NODE = 3.0  # a node whose inter-node pairs deliver less than 1/SLOW_NODE of the other nodes' median is flagged


def _node_links(world) -> dict:
    """Collective: the node map (MPI's shared-memory split) and each neighbour pair's bandwidth on the ring a run
    uses (the ranks in node-major order): {node_of, hosts, pairs [(WORLD a, WORLD b)], bandwidth [bytes/s]}."""
    from ringbench.engine import comm
    from ringbench.harness.probe import link_phases

    node_of, hosts = comm.node_map(world)
    major = comm.node_major(world)
    order = major.allgather(world.rank)  # the WORLD rank of each ring position
    p = world.size
    buf = np.zeros(PAIR_BYTES, np.uint8)
    mine = {}
    for phase in link_phases(p):
        comm.barrier(world)
        for a, b in phase:
            wa, wb = order[a], order[b]
            if world.rank in (wa, wb):
                t = comm.pingpong(buf, wb if world.rank == wa else wa, world.rank == wa, PAIR_ITERS, comm=world)
                if world.rank == wa:
                    mine[(wa, wb)] = PAIR_BYTES / float(np.median(t))
    measured = {}
    for d in world.allgather(mine):
        measured.update(d)
    pairs = [(order[a], order[b]) for phase in link_phases(p) for a, b in phase]
    pairs.sort(key=lambda ab: order.index(ab[0]))
    return {"node_of": node_of, "hosts": hosts, "pairs": pairs, "bandwidth": [measured[ab] for ab in pairs]}


def node_report(nodes: dict) -> tuple[list[str], list[str]]:
    """The node lines of the report (nodes, their ranks, each neighbour pair's link class and bandwidth) and the
    problems: a node whose inter-node pairs all deliver less than 1/SLOW_NODE of the other nodes' median (a node's
    link is its fastest inter-node pair: a slow node link slows every pair through it, a slow pair between two
    healthy nodes does not make either node slow). Pure."""
    node_of, hosts = nodes["node_of"], nodes["hosts"]
    lines = [f"nodes: {len(hosts)} (MPI's shared-memory split)"]
    rows = []
    for n, h in enumerate(hosts):
        ranks = [r for r, m in enumerate(node_of) if m == n]
        rows.append((str(n), h, str(len(ranks)), ", ".join(map(str, ranks))))
    lines += ["  " + x for x in _table(("node", "host", "ranks per node", "ranks"), rows)]
    if nodes["pairs"]:
        lines.append("neighbour pairs (the ring of a run: ranks in node-major order):")
        rows = [
            (f"{a}->{b}", "intra-node" if node_of[a] == node_of[b] else "inter-node", f"{bw / 1e9:.3f} GB/s")
            for (a, b), bw in zip(nodes["pairs"], nodes["bandwidth"])
        ]
        lines += ["  " + x for x in _table(("pair", "link class", "bandwidth (1 MiB ping-pong)"), rows)]
    problems = []
    per_node = {}
    for (a, b), bw in zip(nodes["pairs"], nodes["bandwidth"]):
        if node_of[a] != node_of[b]:
            for n in (node_of[a], node_of[b]):
                per_node[n] = max(per_node.get(n, bw), bw)  # a slow node slows every pair through it
    if len(per_node) >= 2:
        for n, bw in sorted(per_node.items()):
            others = sorted(v for m, v in per_node.items() if m != n)
            med = others[len(others) // 2]
            if bw * SLOW_NODE < med:
                problems.append(
                    f"node {hosts[n]}: its inter-node link delivers {bw / 1e9:.3f} GB/s, less than 1/{SLOW_NODE:g} of the "
                    f"other nodes' {med / 1e9:.3f} GB/s: a ring or all-to-all across it runs at its pace"
                )
    return lines, problems


def report(ranks: list[dict], combos: list[Combo], results: list, want_backends, want_kernels, mpi_library: str, nodes=None):
    """The printed report (lines) and the problems found (lines); a pure function of the gathered records (``nodes``:
    what :func:`_node_links` measured, or None)."""
    from ringbench.kernels.reference import TOLERANCE

    hosts = sorted({p["host"] for p in ranks})
    lines = [f"ringbench doctor: {len(ranks)} rank(s) on {len(hosts)} host(s); MPI: {mpi_library}", ""]
    cols = ("rank", "host", "local", "device", "CUDA-aware MPI", "numpy", "mkl", "torch", "flash_attn", "cupy")
    rows = [
        (str(r), p["host"], str(p["local_rank"]), p["device"], "yes" if p["cuda_aware"] else "no")
        + tuple(p["libs"][k] for k in ("numpy", "mkl", "torch", "flash_attn", "cupy"))
        for r, p in enumerate(ranks)
    ]
    lines += _table(cols, rows)
    lines.append("")
    problems = []
    if nodes is not None:
        node_lines, problems = node_report(nodes)
        lines += node_lines + [""]
    check_rows = []
    ran = {c.kernel for c, (status, _) in zip(combos, results) if status != "n/a"}  # kernels that ran on some backend
    for c, (status, detail) in zip(combos, results):
        if status == "n/a":
            what, why = detail[0][1]
            on = "every rank" if len(detail) == len(ranks) else "rank(s) " + ", ".join(str(r) for r, _ in detail)
            check_rows.append((c.backend, c.kernel, c.dtype, "not available", f"{on}: {why}"))
            # a problem: what is missing was asked for, or some ranks have it and others not
            if what == "backend":
                asked = c.backend in (want_backends or ())
            else:  # an asked-for kernel is missing only if it ran on no backend (flash-attn never runs on numpy)
                asked = c.kernel in (want_kernels or ()) and c.kernel not in ran
            name = f"--backend {c.backend}" if what == "backend" else f"--kernel {c.kernel} on --backend {c.backend}"
            line = f"{name}: not available on {on}: {why}"
            if (asked or len(detail) < len(ranks)) and line not in problems:
                problems.append(line)
        elif status == "ok":
            check_rows.append((c.backend, c.kernel, c.dtype, "ok", f"rel err {detail:.1e} (tol {TOLERANCE[c.dtype]:.0e})"))
        else:
            text = detail if status == "error" else f"rel err {detail:.1e} above tol {TOLERANCE[c.dtype]:.0e}"
            check_rows.append((c.backend, c.kernel, c.dtype, status, text))
            problems.append(f"--backend {c.backend} --kernel {c.kernel}: checked ring pass {status}: {text}")
    lines += _table(("backend", "kernel", "dtype", "ring check", "detail"), check_rows)
    lines.append("")
    lines += [f"problem: {p}" for p in problems] or ["no problems found"]
    return lines, problems


def _table(cols, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return [fmt.format(*cols).rstrip()] + [fmt.format(*r).rstrip() for r in rows]
