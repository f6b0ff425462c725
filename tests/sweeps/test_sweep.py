"""ringbench sweep / status / collect on this machine: real mpiexec, real HDF5, real failures."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import h5py
import pytest

from ringbench import store
from ringbench.config import RunConfig

from conftest import ROOT, ringbench

pytestmark = pytest.mark.mpi

SMALL = "{seq_len: 256, heads: 2, head_dim: 16, repeat: 1, warmup: 0, check: true}"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def sweep(tmp_path: Path, *args, timeout: float = 300, env: dict | None = None):
    return ringbench("sweep", *args, "--results", tmp_path / "results", cwd=tmp_path, timeout=timeout, env=env)


def test_sweep_runs_resumes_and_collects(tmp_path):
    exp = write(
        tmp_path,
        f"""
        name: local
        base: {SMALL}
        matrix:
          mode: [overlap, blocking]
        ranks: [1, 2]
        exclude:
          - {{ranks: 1, mode: blocking}}
    """,
    )
    res = sweep(tmp_path, exp)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 to run" in res.stdout and "3 ok, 0 failed" in res.stdout
    root = tmp_path / "results" / "local"
    parts = sorted((root / "parts").glob("*.h5"))
    assert len(parts) == 3
    merged = store.read(tmp_path / "results" / "local.h5")
    assert sorted((r.point_id, r.nranks) for r in merged) == sorted((p.stem, int(p.stem.split("-P")[1].split("-")[0])) for p in parts)
    assert all(r.status == "ok" and r.check["passed"] for r in merged)
    assert {r.samples["total_s"].shape[1] for r in merged} == {1, 2}  # (R, P): every rank's samples

    again = sweep(tmp_path, exp)
    assert again.returncode == 0
    assert "3 already done (skipped), 0 to run" in again.stdout
    assert len(store.read(tmp_path / "results" / "local.h5")) == 3  # collect is idempotent

    forced = sweep(tmp_path, exp, "--force")
    assert forced.returncode == 0 and "3 to run" in forced.stdout
    assert len(store.read(tmp_path / "results" / "local.h5")) == 6  # never overwritten: added

    status = ringbench("status", root, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "3 points: 3 done" in status.stdout


def test_failed_points_are_recorded_and_retried(tmp_path):
    """The fault hook (RINGBENCH_FAULT=rank:step@P) makes rank 1 raise at 2 ranks: those points fail, the 1-rank ones do not."""
    exp = write(
        tmp_path,
        f"""
        name: partly
        base: {SMALL}
        matrix:
          mode: [overlap, blocking]
        ranks: [1, 2]
    """,
    )
    fault = {"RINGBENCH_FAULT": "1:0@2"}  # only the 2-rank points; at 1 rank "1:0" would be refused
    res = sweep(tmp_path, exp, env=fault)
    assert res.returncode == 1
    assert "2 ok, 2 failed" in res.stdout
    root = tmp_path / "results" / "partly"
    runs = store.read(tmp_path / "results" / "partly.h5")
    failed = [r for r in runs if r.status == "failed"]
    assert len(failed) == 2 and all(r.nranks == 2 for r in failed)
    assert all(r.error.startswith("exit status ") and "InjectedFault" in r.error for r in failed)
    assert all(not r.samples for r in failed)

    status = ringbench("status", tmp_path / "exp.yaml", "--results", tmp_path / "results", cwd=tmp_path)
    assert "4 points: 2 done, 2 failed" in status.stdout
    plan = ringbench("plan", root, cwd=tmp_path)
    assert plan.stdout.count(" failed") == 2 and plan.stdout.count(" done") == 2

    retry = sweep(tmp_path, exp, env=fault)
    assert retry.returncode == 1
    assert "2 already done (skipped), 2 to run" in retry.stdout
    for r in failed:
        assert [x.status for x in store.read(root / "parts" / f"{r.point_id}.h5")] == ["failed", "failed"]


def test_timeout_kills_the_point_and_its_ranks(tmp_path):
    exp = write(
        tmp_path,
        """
        name: slow
        base: {seq_len: 16384, heads: 8, head_dim: 64, repeat: 50, warmup: 0}
        ranks: [2]
        timeout: 1
    """,
    )
    res = sweep(tmp_path, exp)
    assert res.returncode == 1
    part = next((tmp_path / "results" / "slow" / "parts").glob("*.h5"))
    (run,) = store.read(part)
    assert run.status == "failed" and run.error.startswith("timed out after 1 s")
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid).count(str(part))]
    assert left == []
    status = ringbench("status", exp, "--results", tmp_path / "results", cwd=tmp_path)
    row = next(ln for ln in status.stdout.splitlines() if ln.startswith(part.stem))
    log = tmp_path / "results" / "slow" / "logs" / f"{part.stem}.log"
    assert row.split("failed", 1)[1].strip() == f"timed out after 1 s (killed); log {log}"


def test_failure_detail_gives_the_reason_and_the_log(tmp_path):
    from ringbench.sweeps.sweep import failure_detail

    log = tmp_path / "p.log"
    assert failure_detail("timed out after 2 s (killed): =====\n= BAD TERMINATION", log) == "timed out after 2 s (killed)"
    log.write_text("x")
    assert failure_detail("timed out after 2 s (killed): =====", log) == f"timed out after 2 s (killed); log {log}"
    assert failure_detail("killed by signal SIGKILL: ====", log) == f"killed by signal SIGKILL; log {log}"
    assert failure_detail("exit status 2: ringbench run: --seq-len: bad\nmore", log) == (
        f"exit status 2: ringbench run: --seq-len: bad; log {log}"
    )
    assert failure_detail("exit status 9: =====", log) == f"exit status 9; log {log}"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_sweep_of_a_job_array_task(tmp_path):
    exp = write(
        tmp_path,
        f"""
        name: tasks
        base: {SMALL}
        matrix:
          mode: [overlap, blocking, allgather]
        ranks: [2]
    """,
    )
    plan = ringbench("plan", exp, cwd=tmp_path)
    ids = [line.split()[1] for line in plan.stdout.splitlines() if line[:1].isdigit()]
    assert len(ids) == 3
    tasks = tmp_path / "x.tasks"
    tasks.write_text(f"{ids[0]}\n{ids[1]} {ids[2]}\n")
    res = sweep(tmp_path, exp, "--tasks", tasks, "--task", 1)
    assert res.returncode == 0, res.stderr
    assert sorted(p.stem for p in (tmp_path / "results" / "tasks" / "parts").glob("*.h5")) == sorted(ids[1:])
    assert not (tmp_path / "results" / "tasks.h5").exists()  # tasks never write the shared file
    bad = sweep(tmp_path, exp, "--tasks", tasks, "--task", 5)
    assert bad.returncode == 2 and "task 5 does not exist" in bad.stderr


def test_collect_refuses_incompatible_files(tmp_path):
    exp = write(
        tmp_path,
        f"""
        name: merge
        base: {SMALL}
        ranks: [1]
    """,
    )
    assert sweep(tmp_path, exp).returncode == 0
    parts = tmp_path / "results" / "merge" / "parts"
    with h5py.File(parts / "old.h5", "w") as f:
        f.attrs["format"] = store.FORMAT
        f.attrs["schema_version"] = 99
        f.create_group("runs")
    before = (tmp_path / "results" / "merge.h5").read_bytes()
    res = ringbench("collect", exp, "--results", tmp_path / "results", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"ringbench collect: cannot merge: {parts / 'old.h5'}: result schema version 99 is not supported;"
        " this ringbench reads versions 1, 2, 3, 4 and 5"
    )
    assert (tmp_path / "results" / "merge.h5").read_bytes() == before


def test_merge_is_idempotent_and_keeps_samples(tmp_path, small_results):
    dest = tmp_path / "all.h5"
    assert store.merge(dest, [small_results]) == (6, 0)
    assert store.merge(dest, [small_results]) == (0, 6)
    a, b = store.read(small_results), store.read(dest)
    assert [r.point_id for r in a] == [r.point_id for r in b]
    for x, y in zip(a, b):
        assert x.samples.keys() == y.samples.keys()
        assert all((x.samples[k] == y.samples[k]).all() for k in x.samples)


def test_cli_user_errors(tmp_path):
    res = ringbench("sweep", tmp_path / "missing.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"ringbench sweep: {tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    res = ringbench("status", tmp_path, cwd=tmp_path)
    assert res.returncode == 2 and "not an experiment results directory" in res.stderr
    res = ringbench("sweep", "--frobnicate", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["part", "collected"])
def test_a_run_stored_under_an_old_id_counts_as_done(where, tmp_path):
    """Files written before the 64-bit ids carry 8-hex ids (and part files are named by them): still done."""
    from ringbench.config import legacy_point_id
    from ringbench.sweeps.experiment import load
    from ringbench.sweeps.sweep import ResultDir, stored, todo

    exp = load(
        write(
            tmp_path,
            """
            name: old
            base: {seq_len: 4096}
            zip:
              - seed: [73, 127]
                batch: [217, 87]
            ranks: [4]
        """,
        )
    )
    lay = ResultDir(tmp_path / "results", exp.name)
    lay.make()
    done, other = exp.points
    old = legacy_point_id(done.config, done.nranks)
    assert old == legacy_point_id(other.config, other.nranks)  # the old ids collided
    path = lay.part(old) if where == "part" else lay.collected
    run = store.Run(point_id=old, nranks=4, config=done.config.to_dict(), provenance={}, created_utc="2024-01-01T00:00:00+00:00")
    store.append(path, run)
    assert set(stored(exp, lay)) == {done.id}
    assert todo(exp, lay, exp.points, force=False) == ([other], 1)


def test_every_point_of_a_sweep_computes_with_one_exponential(tmp_path):
    """The sweep measures the exponential once and hands it to every point (each run would measure its own, and
    two runs on a loaded machine can pick differently); RINGBENCH_EXP, if set, is what every point uses."""
    import re

    exp = write(
        tmp_path,
        f"""
        name: exp
        base: {SMALL}
        matrix:
          mode: [overlap, allgather, ulysses]
        ranks: [2]
    """,
    )
    res = sweep(tmp_path, exp, env={"RINGBENCH_EXP": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    (name,) = re.findall(r"exponential (\S+) \(measured once for the sweep; RINGBENCH_EXP overrides\)", res.stdout)
    runs = store.read(tmp_path / "results" / "exp.h5")
    assert len(runs) == 3 and {r.provenance["exp"] for r in runs} == {name}
    forced = sweep(tmp_path, exp, "--force", env={"RINGBENCH_EXP": "e"})
    assert forced.returncode == 0 and "exponential e (RINGBENCH_EXP)" in forced.stdout
    assert sorted(r.provenance["exp"] for r in store.read(tmp_path / "results" / "exp.h5")) == sorted([name] * 3 + ["e"] * 3)


def test_a_failed_check_is_the_reason_of_a_failed_point(tmp_path):
    """A point whose run stores its times but fails --check (exit status 1) gets "check failed: <tensor> rel err <x>"
    as its reason in the sweep's line and in status, not the first line of the run's banner. The check is made to
    fail here by a backward tolerance of 1e-12 (a sitecustomize on the children's path sets it)."""
    import re

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import ringbench.kernels.reference as b\n\nb.TOLERANCE_BWD['float32'] = 1e-12\n")
    exp = write(
        tmp_path,
        """
        name: wrong
        base: {seq_len: 64, heads: 2, head_dim: 8, repeat: 1, warmup: 0, check: true, pass: bwd}
        ranks: [1]
    """,
    )
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(hook)])}
    res = sweep(tmp_path, exp, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    reason = r"check failed: d[qkv] rel err [0-9.e+-]+ \(tol 1e-12\)"
    assert "0 ok, 1 failed" in res.stdout
    assert re.search(rf"FAILED .*  {reason}( \.\.\. |$)", res.stdout, re.M), res.stdout
    (part,) = (tmp_path / "results" / "wrong" / "parts").glob("*.h5")
    ran, failed = store.read(part)
    assert ran.status == "ok" and ran.bwd.check["passed"] is False  # the run and its wrong gradients are kept
    assert failed.status == "failed" and re.fullmatch(reason, failed.error.splitlines()[0])
    status = ringbench("status", exp, "--results", tmp_path / "results", cwd=tmp_path)
    row = next(ln for ln in status.stdout.splitlines() if ln.startswith(part.stem))
    log = tmp_path / "results" / "wrong" / "logs" / f"{part.stem}.log"
    assert re.fullmatch(rf"{reason}; log {re.escape(str(log))}", row.split("failed", 1)[1].strip()), row


def test_experiments_doc_lists_every_run_option():
    """docs/experiments.md's `base` row names every key a point may set (RunConfig's fields, `pass` included)."""
    doc = (ROOT / "docs" / "experiments.md").read_text()
    (line,) = [ln for ln in doc.splitlines() if ln.startswith("| `base` |")]
    missing = [k for k in RunConfig.field_names() if f"`{k}`" not in line]
    assert missing == []
