"""ringbench's ring against the ring attention a user could run instead on a CPU, on the same workloads, in one run.

    python benchmarks/peers.py --setup                      # create the peers' environments from PyPI (once)
    python benchmarks/peers.py [--seq-len 8192 16384 32768] [--attn mha gqa] [--causal both] [--pass fwd fwd+bwd]
                               [--rounds 3] [--peers torch jax] [--env-dir DIR] [--quick] [--out FILE.json]

Candidates (P = 2 ranks each, fp32, one BLAS / intra-op thread per rank, contiguous shards: rank r holds tokens
[r N/2, (r+1) N/2)):

    ringbench  this checkout's ring (ringbench.engine.api.build, --mode overlap, --kernel native), two MPI ranks
               started by ``mpiexec -n 2`` (the mpiexec next to this interpreter, or on PATH); BLAS limited to one
               thread per rank (ringbench.engine.backend.limit_threads(1)).
    torch      ring-attention-pytorch (PyPI ``ring-attention-pytorch``, lucidrains): ``ring_flash_attn(q, k, v, None,
               causal, bucket_size=1024, ring_reduce_col=True)`` (its CPU path: the einsum flash-attention ring),
               two processes of torch.distributed with the gloo backend (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1),
               ``torch.set_num_threads(1)`` and ``set_num_interop_threads(1)``, OMP_NUM_THREADS=1.
    jax        ringattention (PyPI ``ringattention``, haoliuhl / LargeWorldModel): its ``ringattention_jax`` (what it
               picks on a CPU) under ``jax.shard_map`` over a mesh of 2 host devices, one process with
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false
               intra_op_parallelism_threads=1" (one thread per device), query/key chunks of --jax-chunk (512, its
               README's), causal_block_size=1 for causal; the forward (or forward and its VJP) compiled ahead of time.

Each peer runs in its own virtual environment under --env-dir (default /work/peer-envs, or RINGBENCH_PEER_ENVS):
``DIR/torch`` and ``DIR/jax``, created by ``--setup`` (``python -m venv`` and ``pip install`` from PyPI: see
SETUP below), never in ringbench's own install. A peer whose environment is missing is reported in one line
(with the command that creates it) and the others still run.

Rounds interleave the candidates (ringbench, torch, jax, then the order rotates): one launch per candidate, workload
and round, each timing ``--repeat`` passes after ``--warmup`` untimed ones (JAX: compiled before, not timed). A
pass's time is the wall time of the slowest rank between a barrier before and one after (fwd+bwd: the forward
plus the backward; JAX: one compiled call that does both). ``x rb`` is the median over rounds of the candidate's
time over ringbench's in the same round (> 1: ringbench is faster). Errors: max |got - ref| / max |ref| of the
output and of dQ, dK, dV against ringbench.kernels.reference in float64 on the same fp32 inputs (round 1 only;
skipped above --check-max-seq), held to reference.TOLERANCE / TOLERANCE_BWD. Memory: ru_maxrss of every rank
(JAX: one process holds both devices), and its rise above the RSS after the imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
JAX_XLA_FLAGS = "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
P = 2

# peer -> what it is, what --setup installs, the import that proves the environment works
PEERS = {
    "torch": {
        "name": "ring-attention-pytorch",
        "packages": ["{torch_spec}", "ring-attention-pytorch", "numpy"],
        "probe": "import torch, ring_attention_pytorch",
    },
    "jax": {
        "name": "ringattention (JAX)",
        "packages": ["jax[cpu]", "ringattention", "numpy"],
        "probe": "import importlib.util, jax, flax; assert importlib.util.find_spec('ringattention')",
    },
}
# what a peer cannot run, and why (the rows then read "-")
CANNOT = {
    ("jax", "gqa"): "ringattention has no GQA: its einsums take K/V with the query heads (a caller would repeat K/V)",
}


# ---------------------------------------------------------------------------------------------
# Workers: one launch runs one workload; each rank writes rank<r>.json (times, memory) and, when asked, rank<r>.npz
# ---------------------------------------------------------------------------------------------
def rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - no /proc
        return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def shard(x, rank: int):
    n = x.shape[1] // P
    return np.ascontiguousarray(x[:, rank * n : (rank + 1) * n])


def write_rank(spec: dict, rank: int, res: dict, tensors: dict | None) -> None:
    out = Path(spec["dir"])
    if tensors is not None and spec["save"]:
        np.savez(out / f"{spec['cand']}-rank{rank}.npz", **tensors)
    (out / f"{spec['cand']}-rank{rank}.json").write_text(json.dumps(res))


def timed_passes(spec: dict, barrier, fwd, bwd=None) -> tuple[list, list, float]:
    """Wall seconds of each timed pass's forward and backward (barriers around each), after the warm-ups, and the
    process's CPU seconds over the timed passes."""
    fw, bw, cpu = [], [], 0.0
    for i in range(spec["warmup"] + spec["repeat"]):
        barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        fwd()
        barrier()
        t1 = time.perf_counter()
        if bwd is not None:
            bwd()
            barrier()
        t2 = time.perf_counter()
        if i >= spec["warmup"]:
            fw.append(t1 - t0)
            bw.append(t2 - t1)
            cpu += time.process_time() - c0
    return fw, bw, cpu


def worker_ringbench(spec: dict) -> None:
    sys.path.insert(0, spec["root"])
    from ringbench.config import RunConfig
    from ringbench.engine import comm
    from ringbench.engine.api import RankContext, build
    from ringbench.engine.backend import get_backend, limit_threads
    from ringbench.kernels import kernel
    from ringbench.layout import positions

    rank = comm.WORLD.rank
    cfg = RunConfig(
        seq_len=spec["n"], heads=spec["h"], kv_heads=spec["hk"], head_dim=spec["d"], causal=spec["causal"], pass_=spec["pass"],
        memory_limit="none",
    )  # fmt: skip
    backend = get_backend("numpy")
    backend.matmul(cfg.blas)
    limit_threads(1)
    exp = kernel.exp_base(np).name if rank == 0 else None  # one exponential for both ranks, as the runner does
    os.environ[kernel.EXP_ENV] = comm.bcast(exp)
    if kernel.exp_base(np).fused:
        kernel.fused_module().compile(np.dtype(np.float32))
    base = rss_now()
    pos = positions(cfg.layout, rank, P, cfg.seq_len)
    data = np.load(spec["inputs"])
    x = {name: np.ascontiguousarray(data[name][:, pos]) for name in ("q", "k", "v", "do")}
    bwd = "bwd" in cfg.phases
    ring = build(RankContext(cfg, backend, comm.WORLD), x["q"], x["k"], x["v"], do=x["do"] if bwd else None)
    if bwd:
        ring.prepare_backward()
    fw, bw, cpu = timed_passes(spec, comm.barrier, ring.forward, ring.backward if bwd else None)
    tensors = {"pos": pos, "out": np.asarray(ring.output())}
    if bwd:
        tensors.update(zip(("dq", "dk", "dv"), (np.asarray(g) for g in ring.grads())))
    from ringbench import __version__

    res = {
        "fwd_s": fw,
        "bwd_s": bw,
        "cpu_s": cpu,
        "peak_rss": peak_rss(),
        "base_rss": base,
        "versions": {"ringbench": __version__, "numpy": np.__version__},
    }
    write_rank(spec, rank, res, tensors)


def gqa_perm(h: int, hk: int) -> np.ndarray:
    """ring-attention-pytorch repeats K/V as '(g h)': its query head i reads K/V head i % hk, where the reference
    (and torch SDPA's enable_gqa) has head i read i // (h / hk). Its head i gets the reference's head perm[i]."""
    g = h // hk
    return np.array([(i % hk) * g + i // hk for i in range(h)])


def worker_torch(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from importlib.metadata import version

    from ring_attention_pytorch.ring_flash_attention import ring_flash_attn

    base = rss_now()
    data = np.load(spec["inputs"])
    perm = gqa_perm(spec["h"], spec["hk"])
    x = {name: shard(data[name], rank) for name in ("q", "k", "v", "do")}
    x["q"], x["do"] = np.ascontiguousarray(x["q"][:, :, perm]), np.ascontiguousarray(x["do"][:, :, perm])
    bwd = "bwd" in spec["pass"]
    q, k, v = (torch.from_numpy(x[n]).requires_grad_(bwd) for n in ("q", "k", "v"))
    do = torch.from_numpy(x["do"])
    state = {}

    def fwd():
        for t in (q, k, v):
            t.grad = None
        state["o"] = ring_flash_attn(q, k, v, None, spec["causal"], spec["torch_bucket"], True, False, None, P)

    fw, bw, cpu = timed_passes(spec, dist.barrier, fwd, (lambda: state["o"].backward(do)) if bwd else None)
    inv = np.argsort(perm)  # back to the reference's head order
    tensors = {"pos": np.arange(rank * (spec["n"] // P), (rank + 1) * (spec["n"] // P)), "out": state["o"].detach().numpy()[:, :, inv]}
    if bwd:
        tensors.update(dq=q.grad.numpy()[:, :, inv], dk=k.grad.numpy(), dv=v.grad.numpy())
    vers = {"torch": torch.__version__, "ring-attention-pytorch": version("ring-attention-pytorch"), "numpy": np.__version__}
    res = {"fwd_s": fw, "bwd_s": bw, "cpu_s": cpu, "peak_rss": peak_rss(), "base_rss": base, "versions": vers}
    write_rank(spec, rank, res, tensors)
    dist.destroy_process_group()


def worker_jax(spec: dict) -> None:
    import types
    from importlib.metadata import version

    import jax

    if not hasattr(jax.lib, "xla_bridge"):  # ringattention 0.1.2's __init__ asks jax.lib.xla_bridge (gone from jax) its platform
        jax.lib.xla_bridge = types.SimpleNamespace(get_backend=lambda: types.SimpleNamespace(platform=jax.default_backend()))
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as PS
    from ringattention import ringattention_jax

    assert len(jax.devices()) == P, jax.devices()
    base = rss_now()
    mesh = Mesh(np.array(jax.devices()), ("sp",))
    spec_sp = PS(None, "sp", None, None)
    kw = dict(
        causal_block_size=1 if spec["causal"] else None, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
        query_chunk_size=spec["jax_chunk"], key_chunk_size=spec["jax_chunk"], policy=jax.checkpoint_policies.nothing_saveable,
        dtype=jnp.float32, precision=None, prevent_cse=True,
    )  # fmt: skip

    def attn(q, k, v):
        return ringattention_jax(q, k, v, None, None, None, "sp", True, kw)

    f = jax.shard_map(attn, mesh=mesh, in_specs=(spec_sp,) * 3, out_specs=spec_sp, check_vma=False)
    data = np.load(spec["inputs"])
    sharding = NamedSharding(mesh, spec_sp)
    q, k, v, do = (jax.device_put(data[n], sharding) for n in ("q", "k", "v", "do"))
    bwd = "bwd" in spec["pass"]
    if bwd:

        def fb(q, k, v, do):
            o, vjp = jax.vjp(f, q, k, v)
            return (o, *vjp(do))

        call = jax.jit(fb).lower(q, k, v, do).compile()
        args = (q, k, v, do)
    else:
        call = jax.jit(f).lower(q, k, v).compile()
        args = (q, k, v)
    state = {}

    def run():
        state["r"] = jax.block_until_ready(call(*args))

    fw, _, cpu = timed_passes(spec, lambda: None, run)
    r = state["r"] if bwd else (state["r"],)
    full = dict(zip(("out", "dq", "dk", "dv"), (np.asarray(t) for t in r)))
    vers = {n: version(n) for n in ("jax", "jaxlib", "flax", "ringattention")} | {"numpy": np.__version__}
    res = {"fwd_s": fw if not bwd else [], "bwd_s": [], "total_s": fw, "cpu_s": cpu, "peak_rss": peak_rss(), "base_rss": base,
           "versions": vers, "one_process": True}  # fmt: skip
    tensors = {"pos": np.arange(spec["n"]), **full}
    write_rank(spec, 0, res, tensors)


WORKERS = {"ringbench": worker_ringbench, "torch": worker_torch, "jax": worker_jax}


# ---------------------------------------------------------------------------------------------
# The parent: environments, launches, rounds, errors, table
# ---------------------------------------------------------------------------------------------
def env_python(env_dir: Path, peer: str) -> Path:
    return env_dir / peer / "bin" / "python"


def setup_command(env_dir: Path, peer: str, torch_spec: str) -> list[list[str]]:
    pkgs = [p.format(torch_spec=torch_spec) for p in PEERS[peer]["packages"]]
    return [[sys.executable, "-m", "venv", str(env_dir / peer)], [str(env_dir / peer / "bin" / "pip"), "install", *pkgs]]


def check_env(env_dir: Path, peer: str, torch_spec: str) -> str | None:
    """None when the peer's environment imports its package, else the one line that says what is missing and how to fix it."""
    py = env_python(env_dir, peer)
    how = (
        f"create it with `python benchmarks/peers.py --setup --peers {peer} --env-dir {env_dir}` ("
        + " && ".join(" ".join(c) for c in setup_command(env_dir, peer, torch_spec)).replace(sys.executable, "python")
        + ")"
    )
    if not py.exists():
        return f"peers: {peer} ({PEERS[peer]['name']}): environment {env_dir / peer} missing; {how}"
    env = dict(os.environ, XLA_FLAGS=JAX_XLA_FLAGS, JAX_PLATFORMS="cpu")
    res = subprocess.run([str(py), "-c", PEERS[peer]["probe"]], capture_output=True, text=True, env=env, timeout=300)
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"peers: {peer} ({PEERS[peer]['name']}): environment {env_dir / peer} does not import it ({last}); {how}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch(cand: str, spec: dict, env_dir: Path, timeout: float) -> dict:
    """Run one worker launch; returns the ranks' results (and reads nothing else)."""
    me = str(Path(__file__).resolve())
    specfile = Path(spec["dir"]) / f"{cand}-spec.json"
    specfile.write_text(json.dumps(spec))
    env = dict(os.environ, **{v: "1" for v in THREAD_VARS}, PYTHONPATH=str(ROOT))
    if cand == "ringbench":
        procs = [subprocess.Popen([mpiexec(), "-n", str(P), sys.executable, me, "--worker", cand, str(specfile)], env=env)]
    elif cand == "torch":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(P))
        env.pop("PYTHONPATH")
        py = str(env_python(env_dir, cand))
        procs = [subprocess.Popen([py, me, "--worker", cand, str(specfile)], env=dict(env, RANK=str(r))) for r in range(P)]
    else:
        env.update(XLA_FLAGS=JAX_XLA_FLAGS, JAX_PLATFORMS="cpu")
        env.pop("PYTHONPATH")
        procs = [subprocess.Popen([str(env_python(env_dir, cand)), me, "--worker", cand, str(specfile)], env=env)]
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"error": f"timed out after {timeout:.0f} s"}
    if any(codes):
        for p in procs:
            if p.poll() is None:
                p.kill()
        return {"error": f"exit status {codes}"}
    ranks = sorted(Path(spec["dir"]).glob(f"{cand}-rank*.json"))
    return {"ranks": [json.loads(f.read_text()) for f in ranks]}


def pass_times(res: dict) -> list[float]:
    """Seconds of each timed pass: the slowest rank's forward + backward (JAX: its one call)."""
    ranks = res["ranks"]
    if "total_s" in ranks[0]:
        return ranks[0]["total_s"]
    per = [[f + b for f, b in zip(r["fwd_s"], r["bwd_s"])] for r in ranks]
    return [max(ts) for ts in zip(*per)]


def assemble(d: Path, cand: str, n: int) -> dict:
    """The saved tensors of every rank as full-sequence arrays, ordered by position."""
    parts = [np.load(f) for f in sorted(d.glob(f"{cand}-rank*.npz"))]
    out = {}
    for name in ("out", "dq", "dk", "dv"):
        if name in parts[0]:
            full = np.zeros((parts[0][name].shape[0], n, *parts[0][name].shape[2:]), np.float32)
            for p in parts:
                full[:, p["pos"]] = p[name]
            out[name] = full
    return out


def workloads(a) -> list[dict]:
    out = []
    for n in a.seq_len:
        for attn in a.attn:
            for causal in {"no": [False], "yes": [True], "both": [False, True]}[a.causal]:
                for ps in a.pass_:
                    hk = a.heads if attn == "mha" else a.kv_heads
                    out.append({"n": n, "h": a.heads, "hk": hk, "d": a.head_dim, "causal": causal, "pass": ps, "attn": attn})
    return out


def label(w: dict) -> str:
    heads = "" if w["attn"] == "mha" else f" {w['h']}/{w['hk']}"
    return f"N={w['n']} {w['attn']}{heads} {'causal' if w['causal'] else 'full'} {w['pass']}"


def errors(got: dict, ref: dict) -> dict:
    from ringbench.kernels import reference

    errs = {name: reference.rel_err(got[name], ref[name]) for name in ref if name in got}
    tol = {name: (reference.TOLERANCE if name == "out" else reference.TOLERANCE_BWD)["float32"] for name in errs}
    ok = all(np.isfinite(got[n]).all() and errs[n] <= tol[n] for n in errs)
    return {"rel_err": errs, "tol": tol, "ok": ok}


def run_workload(w: dict, cands: list[str], a, env_dir: Path) -> dict:
    from ringbench.kernels import reference

    rng = np.random.default_rng(a.seed)
    shapes = {
        "q": (1, w["n"], w["h"], w["d"]),
        "k": (1, w["n"], w["hk"], w["d"]),
        "v": (1, w["n"], w["hk"], w["d"]),
        "do": (1, w["n"], w["h"], w["d"]),
    }
    data = {name: rng.standard_normal(s).astype(np.float32) for name, s in shapes.items()}
    row = {**w, "label": label(w), "cands": {}, "cannot": {}}
    runnable = []
    for c in cands:
        why = CANNOT.get((c, w["attn"]))
        if why:
            row["cannot"][c] = why
        else:
            runnable.append(c)
    times = {c: [] for c in runnable}
    results = {c: None for c in runnable}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        np.savez(Path(tmp) / "inputs.npz", **data)
        for r in range(a.rounds):
            order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
            for c in order:
                d = Path(tmp) / f"r{r}"
                d.mkdir(exist_ok=True)
                spec = {**w, "cand": c, "dir": str(d), "inputs": str(Path(tmp) / "inputs.npz"), "save": r == 0}
                spec.update(
                    warmup=a.warmup, repeat=a.repeat, root=str(ROOT), torch_bucket=a.torch_bucket, jax_chunk=min(a.jax_chunk, w["n"] // P)
                )
                res = launch(c, spec, env_dir, a.timeout)
                if "error" in res:
                    if results[c] is None:  # a later round's failure keeps the first round's result (and says so below)
                        results[c] = res
                    times[c].append(None)
                    continue
                times[c].append(statistics.median(pass_times(res)))
                if r == 0:
                    results[c] = res
                    results[c]["tensors"] = assemble(d, c, w["n"])
        ref = None
        if w["n"] <= a.check_max_seq:
            ref = {"out": reference.reference_attention(data["q"], data["k"], data["v"], causal=w["causal"])}
            if "bwd" in w["pass"]:
                ref.update(
                    zip(
                        ("dq", "dk", "dv"),
                        reference.reference_attention_grad(data["q"], data["k"], data["v"], data["do"], causal=w["causal"]),
                    )
                )
    for c in runnable:
        res = results[c]
        if res is None or "error" in res:
            row["cands"][c] = {"error": (res or {}).get("error", "no result")}
            continue
        rb = times.get("ringbench", [])
        ratios = [t / b for t, b in zip(times[c], rb) if t is not None and b is not None] if rb else []
        ranks = res["ranks"]
        row["cands"][c] = {
            "round_s": times[c],
            "median_s": statistics.median([t for t in times[c] if t is not None]),
            "x_ringbench": statistics.median(ratios) if ratios else None,
            "ratios": ratios,
            "fwd_s": [r["fwd_s"] for r in ranks],
            "bwd_s": [r["bwd_s"] for r in ranks],
            "cpu_over_wall": sum(r["cpu_s"] for r in ranks) / max(1e-9, sum(pass_times(res))),
            "peak_rss": [r["peak_rss"] for r in ranks],
            "base_rss": [r["base_rss"] for r in ranks],
            "one_process": bool(ranks[0].get("one_process")),
            "versions": ranks[0]["versions"],
            "check": errors(res["tensors"], ref) if ref is not None else None,
        }
    return row


def fmt_err(chk) -> str:
    if chk is None:
        return "not checked"
    e = chk["rel_err"]
    s = " ".join(f"{k if k != 'out' else 'O'}:{v:.0e}" for k, v in e.items())
    return s + ("" if chk["ok"] else "  WRONG")


def table(rows: list[dict], cands: list[str]) -> str:
    head = ["workload", "cand", "s/pass", "x rb", "rounds x rb", "peak MiB", "+MiB", "cpu/wall", "errors (max rel vs float64)"]
    lines = [head]
    for row in rows:
        for c in cands:
            if c in row["cannot"]:
                lines.append([row["label"], c, "-", "-", "-", "-", "-", "-", "cannot: " + row["cannot"][c]])
                continue
            r = row["cands"].get(c)
            if r is None:
                continue
            if "error" in r:
                lines.append([row["label"], c, "-", "-", "-", "-", "-", "-", "failed: " + r["error"]])
                continue
            peak = max(r["peak_rss"]) / 2**20
            rise = max(p - b for p, b in zip(r["peak_rss"], r["base_rss"])) / 2**20
            note = " (1 proc, 2 dev)" if r["one_process"] else ""
            xr = "-" if c == "ringbench" or r["x_ringbench"] is None else f"{r['x_ringbench']:.2f}"
            rr = "-" if c == "ringbench" else " ".join(f"{x:.2f}" for x in r["ratios"])
            lines.append(
                [
                    row["label"],
                    c,
                    f"{r['median_s']:.3f}",
                    xr,
                    rr,
                    f"{peak:.0f}{note}",
                    f"{rise:.0f}",
                    f"{r['cpu_over_wall']:.2f}",
                    fmt_err(r["check"]),
                ]
            )
    widths = [max(len(str(ln[i])) for ln in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(x).ljust(wd) for x, wd in zip(ln, widths)).rstrip() for ln in lines)


def provenance(a, versions: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from ringbench import provenance as prov

    return {
        "utc": prov.utc_now(),
        "cpu": prov.cpu(),
        "cores": os.cpu_count(),
        "git_commit": prov.git_commit(),
        "argv": prov.argv(),
        "load_avg_start": a.load_start,
        "load_avg_end": os.getloadavg(),
        "python": sys.version.split()[0],
        "versions": versions,
        "launch": {
            "ringbench": f"{mpiexec()} -n 2 {sys.executable} (BLAS limited to 1 thread per rank)",
            "torch": "2 processes, torch.distributed gloo, set_num_threads(1), set_num_interop_threads(1), OMP_NUM_THREADS=1",
            "jax": f"1 process, XLA_FLAGS={JAX_XLA_FLAGS!r}, JAX_PLATFORMS=cpu",
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="peers.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peers", nargs="*", choices=tuple(PEERS), default=list(PEERS), help="peers to run beside ringbench (none: ringbench only)"
    )
    p.add_argument("--env-dir", default=os.environ.get("RINGBENCH_PEER_ENVS", "/work/peer-envs"), help="where the peers' venvs are")
    p.add_argument("--setup", action="store_true", help="create the peers' environments with pip from PyPI, then exit")
    p.add_argument("--torch-spec", default="torch", help="what --setup installs as torch (a version or a local CPU wheel)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[8192, 16384, 32768], metavar="N")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="K/V heads of the GQA workloads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--attn", nargs="+", choices=("mha", "gqa"), default=["mha", "gqa"])
    p.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    p.add_argument("--pass", dest="pass_", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one launch per candidate each)")
    p.add_argument("--repeat", type=int, default=1, help="timed passes per launch (their median is the round's time)")
    p.add_argument("--warmup", type=int, default=0, help="untimed passes per launch before the timed ones")
    p.add_argument("--check-max-seq", type=int, default=16384, metavar="N", help="float64 check only up to this N (its cost grows as N^2)")
    p.add_argument("--torch-bucket", type=int, default=1024, help="ring-attention-pytorch's bucket_size (ring_flash_attn's default)")
    p.add_argument("--jax-chunk", type=int, default=512, help="ringattention's query and key chunk (its README's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds one launch may take")
    p.add_argument("--quick", action="store_true", help="a small smoke run: N 512 1024, H 4/2, D 32, 1 round")
    p.add_argument("--out", metavar="FILE.json")
    a = p.parse_args(argv)
    if a.quick:
        a.seq_len, a.heads, a.kv_heads, a.head_dim, a.rounds = [512, 1024], 4, 2, 32, 1
    for opt, v in (
        ("--heads", a.heads),
        ("--kv-heads", a.kv_heads),
        ("--head-dim", a.head_dim),
        ("--rounds", a.rounds),
        ("--repeat", a.repeat),
    ):
        if v < 1:
            p.error(f"{opt}: expected a positive int, got {v}")
    if a.warmup < 0:
        p.error(f"--warmup: expected an int >= 0, got {a.warmup}")
    if a.heads % a.kv_heads:
        p.error(f"--kv-heads: {a.kv_heads} does not divide --heads {a.heads}")
    for n in a.seq_len:
        shard = n // P
        if n < P or n % P or any(shard % min(b, shard) for b in (a.torch_bucket, a.jax_chunk)):
            p.error(f"--seq-len: {n} must split into {P} equal shards of whole --torch-bucket and --jax-chunk blocks")
    return a


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        WORKERS[sys.argv[2]](json.loads(Path(sys.argv[3]).read_text()))
        return 0
    a = parse_args(argv)
    a.load_start = os.getloadavg()
    env_dir = Path(a.env_dir)
    if a.setup:
        for peer in a.peers:
            for cmd in setup_command(env_dir, peer, a.torch_spec):
                print("+", " ".join(cmd), flush=True)
                if subprocess.run(cmd).returncode:
                    print(f"peers: --setup {peer}: `{' '.join(cmd)}` failed", file=sys.stderr)
                    return 1
        return 0
    cands = ["ringbench"]
    for peer in a.peers:
        msg = check_env(env_dir, peer, a.torch_spec)
        if msg:
            print(msg, flush=True)
        else:
            cands.append(peer)
    sys.path.insert(0, str(ROOT))
    rows = []
    for w in workloads(a):
        print(f"... {label(w)}: {', '.join(cands)} x {a.rounds} rounds", flush=True)
        rows.append(run_workload(w, cands, a, env_dir))
    versions = {}
    for row in rows:
        for c, r in row["cands"].items():
            versions.setdefault(c, r.get("versions"))
    info = provenance(a, versions)
    load = f"load {a.load_start[0]:.1f} -> {info['load_avg_end'][0]:.1f}"
    print(f"peers: {info['cpu']}, {info['cores']} cores; P = {P}, fp32, 1 thread per rank; {load}")
    for c, v in versions.items():
        print(f"  {c}: " + ", ".join(f"{k} {x}" for k, x in (v or {}).items()))
    print(table(rows, cands))
    behind = [
        (row["label"], c, r["x_ringbench"])
        for row in rows
        for c, r in row["cands"].items()
        if c != "ringbench" and r.get("x_ringbench") and r["x_ringbench"] < 1
    ]
    for lab, c, x in behind:
        print(f"ringbench is behind {c} on {lab}: {c} takes {x:.2f}x ringbench's time")
    if a.out:
        for row in rows:
            for r in row["cands"].values():
                r.pop("tensors", None)
        Path(a.out).write_text(json.dumps({"bench": "peers", "schema_version": 1, "provenance": info, "rows": rows}, indent=1))
        print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
