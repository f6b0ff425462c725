"""Across nodes for real: the emulated cluster of slurm/multinode.sh (network namespaces, a shaped link each).

The cluster CI brings up (``.ci/run``: ``slurm/multinode.sh up``, state in $RINGBENCH_MULTINODE_DIR, default
/tmp/ringbench-multinode) is used when it is up; else, as root where ``ip netns`` works, this module brings up its
own (a private state directory, prefix, subnet and ports) and takes it down at the end. Elsewhere the tests skip
with the reason, unless CI=true or RINGBENCH_MULTINODE=1 says the cluster is expected: then they fail. All are
marked slow (the full set, --all).

What they show: a checked run of every strategy, forward and backward, across two nodes in one launch (ranks placed
one per node in turn, so ringbench's node-major order is not the launcher's); the inter-node bytes a run records
cross the node link (its veth counters) and intra-node ones do not; a Slurm job array whose tasks span two nodes;
doctor across nodes; the probe of both link classes, its machine description and advise from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ringbench import store
from ringbench.analysis import advise

from conftest import MPIEXEC, ROOT, child_env, ringbench

pytestmark = [pytest.mark.slow, pytest.mark.mpi]
SCRIPT = ROOT / "slurm" / "multinode.sh"
WORKER = Path(__file__).parent / "mpi_multinode.py"
STATE = Path(os.environ.get("RINGBENCH_MULTINODE_DIR", "/tmp/ringbench-multinode"))
# this module's own cluster, when none is up: names, addresses and ports of its own
OWN = {"RINGBENCH_MULTINODE_PREFIX": "rbt", "RINGBENCH_MULTINODE_SUBNET": "10.219.0",
       "RINGBENCH_MULTINODE_SLURMCTLD_PORT": "6837", "RINGBENCH_MULTINODE_SLURMD_PORT": "6838"}  # fmt: skip


def _env_file(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value
    return out


def _why_not_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs ip and tc (iproute2)"
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return None if res.returncode == 0 else f"ip netns does not work here: {res.stderr.strip()}"


@pytest.fixture(scope="module")
def cluster():
    """The environment of the emulated cluster (its env file, plus RINGBENCH_MPIEXEC): CI's, or one of its own."""
    if (STATE / "net.up").exists():
        yield {**_env_file(STATE / "env"), "RINGBENCH_MPIEXEC": str(MPIEXEC), "_dir": str(STATE)}
        return
    why = _why_not_root()
    expected = os.environ.get("CI", "").lower() == "true" or os.environ.get("RINGBENCH_MULTINODE") == "1"
    if why:
        msg = f"the emulated cluster is not up ({STATE}/net.up missing) and cannot be brought up: {why}"
        if expected:
            pytest.fail(f"emulated cluster expected (CI / RINGBENCH_MULTINODE) but absent: {msg}")
        pytest.skip(msg)
    d = Path(tempfile.mkdtemp(prefix="ringbench-multinode-test-", dir="/tmp"))  # munged: every parent a+x
    d.chmod(0o755)
    env = dict(os.environ, RINGBENCH_MULTINODE_DIR=str(d), **OWN)
    cmd = "up" if shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists() else "net-up"
    res = subprocess.run([str(SCRIPT), cmd], capture_output=True, text=True, env=env, timeout=120, check=False)
    if res.returncode != 0:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, env=env, timeout=120, check=False)
        pytest.fail(f"slurm/multinode.sh {cmd} failed: {res.stdout}{res.stderr}")
    try:
        yield {**_env_file(d / "env"), "RINGBENCH_MPIEXEC": str(MPIEXEC), "_dir": str(d)}
    finally:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, env=env, timeout=120, check=False)
        shutil.rmtree(d, ignore_errors=True)


def launch(cluster, n: int, argv: list, ppn: int | None = 2, hosts: str | None = None, timeout: float = 300):
    """``argv`` (a python -m / script command line) at ``n`` ranks across the nodes (the cluster's mpiexec)."""
    env = child_env({k: v for k, v in cluster.items() if not k.startswith("_")})
    if hosts:
        env["RINGBENCH_MPIEXEC_HOSTS"] = hosts
    cmd = [str(Path(cluster["_dir"]) / "mpiexec"), *(["-ppn", str(ppn)] if ppn else []), "-n", str(n)]
    cmd += ["env", f"PYTHONPATH={ROOT}", sys.executable, *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def counters(cluster) -> dict:
    """{link: (rx, tx) bytes} of each node's veth as the root namespace sees it (rx: what the node sent)."""
    out = {}
    for link in cluster["RINGBENCH_NODE_LINKS"].split(","):
        stats = Path("/sys/class/net") / link / "statistics"
        out[link] = (int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text()))
    return out


RUNS = [  # every strategy, forward and backward, odd layouts and GQA: one launch checks them all
    {"mode": "overlap", "layout": "zigzag", "causal": True},
    {"mode": "blocking", "layout": "contiguous"},
    {"mode": "allgather", "layout": "contiguous", "causal": True},
    {"mode": "ulysses", "layout": "contiguous", "causal": True},
    {"mode": "hybrid", "ulysses_degree": 2, "layout": "zigzag", "causal": True},
    {"mode": "pass-q", "layout": "zigzag", "causal": True},
]


def test_every_strategy_across_two_nodes_and_the_bytes_cross(tmp_path, cluster):
    out = tmp_path / "runs.h5"
    base = dict(seq_len=192, heads=4, kv_heads=2, head_dim=16, repeat=1, warmup=0, check=True, memory_limit="none")
    base["pass"] = "fwd+bwd"
    spec = {"out": str(out), "runs": [{**base, **r} for r in RUNS]}
    before = counters(cluster)
    res = launch(cluster, 4, [WORKER, json.dumps(spec)], ppn=None)  # hydra's default: one rank per node in turn
    after = counters(cluster)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = store.read(out)
    assert [r.config["mode"] for r in runs] == [r["mode"] for r in RUNS]
    node_names = cluster["RINGBENCH_NODE_NAMES"].split(",")
    sent_by_node0 = 0
    for r in runs:
        assert r.status == "ok" and r.check["passed"] and r.bwd.check["passed"], r.point_id
        nodes, mode = r.provenance["nodes"], r.config["mode"]
        assert nodes["count"] == 2 and nodes["ranks_per_node"] == [2, 2] and nodes["hosts"] == node_names[:2]
        assert nodes["world_rank"] == [0, 2, 1, 3]  # renumbered node-major from the launcher's round robin
        assert r.provenance["rank_hosts"] == [node_names[0]] * 2 + [node_names[1]] * 2
        for ph in ("fwd", "bwd"):
            b = nodes["bytes_per_rank"][ph]
            total = (r.summary if ph == "fwd" else r.bwd.summary)["bytes_per_rank"]
            counted = max(i + e for i, e in zip(b["intra"], b["inter"]))
            assert counted == total, (r.point_id, ph, b, total)
            assert min(b["inter"]) > 0 or r.config["mode"] == "blocking" or r.config["mode"] == "overlap"
            sent_by_node0 += sum(b["inter"][:2])
        if mode == "hybrid":  # node-local groups: the all-to-all stays inside the nodes, every ring hop crosses
            assert nodes["a2a_pairs"] == 2 and nodes["a2a_pairs_inter"] == [] and len(nodes["ring_hops_inter"]) == 4
            assert min(nodes["bytes_per_rank"]["fwd"]["intra"]) > 0
        elif mode == "ulysses":
            assert nodes["ring_hops"] == 0 and len(nodes["a2a_pairs_inter"]) == 4  # of 6 pairs, 4 cross
        else:
            assert nodes["ring_hops_inter"] == [[1, 2], [3, 0]]  # node-major: 2 of the 4 hops cross
    rep = ringbench("report", out, "--no-model")
    assert rep.returncode == 0 and "across nodes:" in rep.stdout and "hybrid U=2" in rep.stdout, rep.stdout + rep.stderr
    link0 = cluster["RINGBENCH_NODE_LINKS"].split(",")[0]
    crossed = after[link0][0] - before[link0][0]  # bytes node 0 sent over its link
    assert crossed >= sent_by_node0, (crossed, sent_by_node0)  # at least one pass of each phase's inter-node bytes


def test_intra_node_bytes_stay_off_the_link(tmp_path, cluster):
    out = tmp_path / "one.h5"
    ip0 = cluster["RINGBENCH_NODE_HOSTS"].split(",")[0]
    before = counters(cluster)
    argv = ["-m", "ringbench", "run", "--seq-len", "4096", "--heads", "8", "--head-dim", "64", "--repeat", "1"]
    res = launch(cluster, 2, [*argv, "--warmup", "0", "--out", out, "--quiet"], ppn=None, hosts=f"{ip0}:2")
    after = counters(cluster)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (run,) = store.read(out)
    nodes = run.provenance["nodes"]
    assert nodes["count"] == 1 and nodes["bytes_per_rank"]["fwd"]["inter"] == [0, 0]
    intra = sum(nodes["bytes_per_rank"]["fwd"]["intra"])
    assert intra >= 8 << 20  # 8 MiB K/V blocks moved inside the node ...
    moved = sum(after[k][0] - before[k][0] + after[k][1] - before[k][1] for k in after)
    assert moved < intra // 8, (moved, intra)  # ... and not over the links (what moved: the launcher's own traffic)


def test_slurm_array_spans_two_nodes(tmp_path, cluster):
    if "SLURM_CONF" not in cluster or not Path(cluster["SLURM_CONF"]).exists():
        pytest.skip("the emulated cluster runs without Slurm (slurm-wlm and munge not installed)")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        textwrap.dedent("""
        name: nodes2
        base: {seq_len: 128, heads: 4, head_dim: 16, repeat: 1, warmup: 0, check: true}
        zip:
          - {mode: [overlap, hybrid], ulysses_degree: [1, 2]}
        ranks: [4]
        timeout: 120
        slurm: {profile: multinode, time: "5"}
    """)
    )
    env = {"SLURM_CONF": cluster["SLURM_CONF"], "RINGBENCH_PROFILES": str(ROOT / "slurm" / "profiles")}
    results = tmp_path / "results"
    dry = ringbench("submit", exp, "--dry-run", "--results", results, env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    res = ringbench("submit", exp, "--results", results, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    script = next((results / "nodes2" / "scripts").glob("*.sbatch")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=2" in script
    from sweeps.test_slurm import wait_for_jobs

    wait_for_jobs(results / "nodes2" / "jobs.json", env)
    col = ringbench("collect", exp, "--results", results, env=env, cwd=tmp_path)
    assert col.returncode == 0, col.stderr
    runs = store.read(results / "nodes2.h5")
    assert sorted(r.config["mode"] for r in runs) == ["hybrid", "overlap"], [r.error for r in runs]
    names = cluster["RINGBENCH_NODE_NAMES"].split(",")[:2]
    for r in runs:
        assert r.status == "ok" and r.check["passed"]
        assert r.provenance["rank_hosts"] == [names[0]] * 2 + [names[1]] * 2  # srun: block distribution
        assert r.provenance["nodes"]["world_rank"] == [0, 1, 2, 3]
        assert r.provenance["nodes"]["ranks_per_node"] == [2, 2]


def test_doctor_across_nodes(cluster):
    res = launch(cluster, 4, ["-m", "ringbench", "doctor", "--backend", "numpy", "--kernel", "native"])
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    names = cluster["RINGBENCH_NODE_NAMES"].split(",")
    assert "nodes: 2 (MPI's shared-memory split)" in out and names[0] in out and names[1] in out
    assert "0->1  intra-node" in out and "1->2  inter-node" in out and "3->0  inter-node" in out
    assert "no problems found" in out


SLOW = {"RINGBENCH_MULTINODE_PREFIX": "rbs", "RINGBENCH_MULTINODE_SUBNET": "10.220.0", "RINGBENCH_NODES": "3",
        "RINGBENCH_INTERNODE_RATE": "none"}  # fmt: skip


def test_doctor_flags_the_one_slow_node_of_three(cluster):
    """Three nodes of their own (namespaces only: mpiexec across them), the third one's link shaped to 40 Mbit while
    the others are unshaped: doctor's neighbour pairs through it are slow, so it names that node, and only it, and
    exits 1."""
    if _why_not_root():
        pytest.skip(_why_not_root())
    d = Path(tempfile.mkdtemp(prefix="ringbench-slow-node-", dir="/tmp"))
    env = dict(os.environ, RINGBENCH_MULTINODE_DIR=str(d), **SLOW)
    try:
        for cmd in (["net-up"], ["rate", "40mbit", "3"]):
            res = subprocess.run([str(SCRIPT), *cmd], capture_output=True, text=True, env=env, timeout=120, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
        own = {**_env_file(d / "env"), "RINGBENCH_MPIEXEC": str(MPIEXEC), "_dir": str(d)}
        res = launch(own, 3, ["-m", "ringbench", "doctor", "--backend", "numpy", "--kernel", "native"], ppn=1)
        out = res.stdout
        assert res.returncode == 1, out + res.stderr
        assert "nodes: 3 (MPI's shared-memory split)" in out
        flagged = [line for line in out.splitlines() if "its inter-node link delivers" in line]
        assert len(flagged) == 1 and "node rbs3:" in flagged[0], out
    finally:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, env=env, timeout=120, check=False)
        shutil.rmtree(d, ignore_errors=True)


def test_probe_measures_each_link_class_and_describes_the_machine(tmp_path, cluster):
    out, machine = tmp_path / "probe.h5", tmp_path / "machine.yaml"
    argv = ["-m", "ringbench", "probe", "--out", out, "--block-sizes", "64", "--repeat", "1", "--iters", "3"]
    res = launch(cluster, 4, [*argv, "--max-bytes", str(4 << 20), "--machine-out", machine])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "intra-node pair:" in res.stdout and "inter-node pair:" in res.stdout and "all-to-all across nodes" in res.stdout
    (probe,) = store.read_probes(out)
    s = probe.summary
    assert s["nodes"] == 2 and s["ranks_per_node"] == 2
    assert list(probe.samples["link_class"]) == [0, 1, 0, 1]  # ring links 0->1, 1->2, 2->3, 3->0
    assert probe.samples["class_pingpong_s"].shape[0] == 2 and s["a2a_intra_group"] == 2 and s["a2a_inter_group"] == 2
    # the shaped node link is slower than shared memory (a tbf of RINGBENCH_INTERNODE_RATE, by construction)
    assert s["inter_bandwidth_Bps"] < s["intra_bandwidth_Bps"]
    m = advise.load_machine(machine)
    assert m.ranks_per_node == 2 and m.inter[1] == pytest.approx(s["inter_bandwidth_Bps"], rel=1e-5)
    adv = ringbench("advise", "--probe", out, "--seq-len", "65536", "--ranks", "64")
    assert adv.returncode == 0, adv.stderr
    assert "machine: link classes measured by" in adv.stdout and "winner:" in adv.stdout
    # a probe on one node cannot describe the two classes: one line, exit 2, before it measures anything
    ip0 = cluster["RINGBENCH_NODE_HOSTS"].split(",")[0]
    bad = launch(cluster, 2, [*argv, "--machine-out", tmp_path / "m2.yaml"], ppn=None, hosts=f"{ip0}:2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith("ringbench probe: --machine-out: the machine description needs both link classes")
    assert not (tmp_path / "m2.yaml").exists()


def test_node_local_groups_refused_when_a_group_spans_nodes(cluster):
    argv = ["-m", "ringbench", "run", "--mode", "hybrid", "--ulysses-degree", "4", "--seq-len", "64", "--heads", "4"]
    res = launch(cluster, 4, [*argv, "--head-dim", "8", "--repeat", "1"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("ringbench run: --ulysses-degree: 4 is larger than a node (2/2 ranks per node)")
    ok = launch(cluster, 4, [*argv, "--head-dim", "8", "--repeat", "1", "--ulysses-groups", "any", "--check"])
    assert ok.returncode == 0, ok.stderr
    assert "all-to-all pairs across nodes 4 of 6" in ok.stdout


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def test_a_node_that_dies_ends_the_job_and_nothing_is_stored_as_done(tmp_path, cluster):
    """Node 2's MPI processes (its ranks and hydra's proxy) killed mid-run: the launcher returns (no hang), non-zero,
    and the file holds no successful run."""
    import time

    out = tmp_path / "dead.h5"
    argv = ["-m", "ringbench", "run", "--seq-len", "2048", "--heads", "4", "--head-dim", "32", "--repeat", "100000"]
    env = child_env({k: v for k, v in cluster.items() if not k.startswith("_")})
    cmd = [str(Path(cluster["_dir"]) / "mpiexec"), "-ppn", "2", "-n", "4", "env", f"PYTHONPATH={ROOT}", sys.executable]
    proc = subprocess.Popen([*cmd, *argv, "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ns = cluster["RINGBENCH_NODE_NAMES"].split(",")[1]
    try:
        killed = []
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:  # until node 2's ranks run ringbench
            time.sleep(1)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split()
            ranks = [p for p in pids if "\0ringbench\0run\0" in _cmdline(p)]  # python -m ringbench run
            if len(ranks) >= 2:
                time.sleep(2)  # into the timed passes
                # the node's MPI processes (its ranks and hydra's proxy) die; its slurmd, which the Slurm test needs, stays
                killed = [p for p in pids if "\0ringbench\0run\0" in _cmdline(p) or "hydra_pmi_proxy" in _cmdline(p)]
                for p in killed:
                    subprocess.run(["kill", "-9", p], check=False)
        assert killed, "node 2's ranks never started"
        proc.wait(timeout=120)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    slurmd = [
        p for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split() if "slurmd" in _cmdline(p)
    ]
    assert slurmd or "SLURM_CONF" not in cluster, "the node's slurmd was killed too"
    assert not out.exists() or all(r.status != "ok" for r in store.read(out))
