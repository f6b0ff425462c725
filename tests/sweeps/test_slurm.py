"""Slurm: rendered job scripts (golden #SBATCH sets, quoting) and real submissions to a live cluster.

The tests marked ``slurm`` need a cluster: ``slurm/localcluster.sh up`` gives a one-node one (SLURM_CONF from
the environment, else the script's default path). Without one they skip, unless CI=true or
RINGBENCH_REQUIRE_SLURM=1 says the cluster is expected: then they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from ringbench import store
from ringbench.sweeps import experiment, slurm
from ringbench.sweeps.experiment import SlurmSpec

from conftest import ROOT, ringbench

PROFILES = {"RINGBENCH_PROFILES": str(ROOT / "slurm" / "profiles")}  # where `profile: localcluster` is found


def job(**kw) -> slurm.JobArray:
    base = {
        "experiment": "scale",
        "nranks": 8,
        "ntasks": 3,
        "job_name": "rb-scale-P8",
        "time": "00:30:00",
        "snapshot": Path("/r/scale/experiment.yaml"),
        "results": Path("/r"),
        "tasks": Path("/r/scale/scripts/s-P8.tasks"),
        "script": Path("/r/scale/scripts/s-P8.sbatch"),
        "logs": Path("/r/scale/logs"),
        "workdir": Path("/home/u"),
        "python": "/venv/bin/python",
        "launcher": "srun",
    }
    base.update(kw)
    return slurm.JobArray(**base)


def render(spec: SlurmSpec, **kw) -> str:
    return slurm.render(job(**kw), spec, slurm.TEMPLATE.read_text(), "0.1.0", "2026-01-01T00:00:00Z")


# ---------------------------------------------------------------------------------------------
# rendering (pure, no Slurm needed)
# ---------------------------------------------------------------------------------------------
def test_sbatch_lines_gpu_site():
    spec = SlurmSpec(
        partition="gpu",
        account="proj",
        qos="normal",
        constraint="a100&ib",
        gpus_per_node=4,
        cpus_per_task=8,
        sbatch=["--exclusive", "--mem=0"],
    )
    assert slurm.sbatch_lines(render(spec)) == {
        "#SBATCH --job-name=rb-scale-P8",
        "#SBATCH --array=0-2",
        "#SBATCH --ntasks=8",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=00:30:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint=a100&ib",
        "#SBATCH --output=/r/scale/logs/%x-%A_%a.out",
        "#SBATCH --chdir=/home/u",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
    }


def test_sbatch_lines_minimal():
    assert slurm.sbatch_lines(render(SlurmSpec(), nranks=2, ntasks=1, job_name="rb-x-P2", time="5")) == {
        "#SBATCH --job-name=rb-x-P2",
        "#SBATCH --array=0-0",
        "#SBATCH --ntasks=2",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --time=5",
        "#SBATCH --output=/r/scale/logs/%x-%A_%a.out",
        "#SBATCH --chdir=/home/u",
    }


def test_ntasks_per_node_sets_nodes():
    lines = slurm.sbatch_lines(render(SlurmSpec(ntasks_per_node=3), nranks=8))
    assert {"#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=3"} <= lines


def test_script_body_quotes_every_value(tmp_path):
    spec = SlurmSpec(setup=["module load cuda/12.4"], env={"UCX_TLS": "rc,cuda_copy", "NOTE": "a b $(id)"})
    text = render(
        spec, python="/opt/my venv/bin/python", snapshot=Path("/r/it's/experiment.yaml"), pythonpath="/src/ring bench", force=True
    )
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert body == [
        "set -eo pipefail     # not -u: site setup (module, venv activate) often reads unset variables",
        "module load cuda/12.4",
        "export UCX_TLS=rc,cuda_copy",
        "export NOTE='a b $(id)'",
        "export PYTHONPATH='/src/ring bench'${PYTHONPATH:+:$PYTHONPATH}",
        (
            "exec '/opt/my venv/bin/python' -m ringbench sweep '/r/it'\"'\"'s/experiment.yaml' --results /r "
            '--launcher srun --tasks /r/scale/scripts/s-P8.tasks --task "$SLURM_ARRAY_TASK_ID" --force'
        ),
    ]
    script = tmp_path / "s.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_submit_dry_run_writes_scripts_per_rank_count(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        textwrap.dedent("""
        name: dry
        base: {seq_len: 256, heads: 2, head_dim: 16}
        matrix: {mode: [overlap, blocking, allgather]}
        ranks: [1, 2]
        exclude: [{ranks: 1, mode: [blocking, allgather]}]
        slurm: {profile: localcluster, points_per_task: 2, job_name: ring}
    """)
    )
    res = ringbench("submit", exp, "--dry-run", "--results", tmp_path / "results", env=PROFILES, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    scripts = sorted((tmp_path / "results" / "dry" / "scripts").glob("*.sbatch"))
    assert [s.name.split("-")[-1] for s in scripts] == ["P1.sbatch", "P2.sbatch"]
    p2 = scripts[1].read_text()
    assert {
        "#SBATCH --job-name=ring-P2",
        "#SBATCH --array=0-1",
        "#SBATCH --ntasks=2",
        "#SBATCH --partition=debug",
        "#SBATCH --time=00:10:00",
    } <= slurm.sbatch_lines(p2)
    tasks = scripts[1].with_suffix(".tasks").read_text().splitlines()
    assert [len(t.split()) for t in tasks] == [2, 1]
    assert not (tmp_path / "results" / "dry" / "jobs.json").exists()
    assert experiment.load(tmp_path / "results" / "dry" / "experiment.yaml").slurm.partition == "debug"


# ---------------------------------------------------------------------------------------------
# job scripts under hostile paths and values: run under bash with stubs, read as sbatch reads them
# ---------------------------------------------------------------------------------------------
# what a user may legitimately have in a path: every shell and sbatch metacharacter, % patterns, hetjob
ODD = "we ird 'q\"$HOME `touch PWNED` $(touch PWNED); touch PWNED #%x%A hetjob &|<>*?~!{a,b}"
STUB = """#!/bin/bash
# records its argv (NUL-separated) and the variables the job exports, then succeeds
printf '%s\\0' "$0" "$@" > "$RECORD.argv"
printf '%s\\0' "${NOTE-unset}" "${PYTHONPATH-unset}" > "$RECORD.env"
"""


def sbatch_view(text: str) -> list[str]:
    """The option words sbatch reads from a job script: every ``#SBATCH`` line before the first command."""
    words = []
    for line in text.split("\n"):
        if line.startswith("#SBATCH"):
            words += slurm.sbatch_words(line[len("#SBATCH") :])
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return words


def stubs(tmp_path: Path) -> tuple[Path, dict]:
    """A directory of stubs (the python the job execs, srun, ringbench, touch) and the environment to run a job
    script with: each stub records its argv; ``touch`` records that it ran (an injected command)."""
    bindir = tmp_path / f"bin {ODD}"
    bindir.mkdir()
    for name in ("python", "srun", "ringbench"):
        (bindir / name).write_text(STUB)
        (bindir / name).chmod(0o755)
    (bindir / "touch").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "INJECTED"!s}\n')
    (bindir / "touch").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "0", "RECORD": str(tmp_path / "record"), "HOME": "/nonexistent"}
    return bindir, env


def run_script(script: Path, env: dict, cwd: Path) -> tuple[list[str], list[str]]:
    """Run a rendered job script with bash; the argv the stub python got and the variables it saw."""
    res = subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    record = Path(env["RECORD"])
    return record.with_suffix(".argv").read_text().split("\0")[:-1], record.with_suffix(".env").read_text().split("\0")[:-1]


def injected(tmp_path: Path) -> str:
    """What the ``touch`` stub was run with: an injected command (the paths' payload is ``touch PWNED``)."""
    log = tmp_path / "INJECTED"
    return log.read_text() if log.exists() else ""


def test_rendered_script_runs_exactly_its_command_under_bash_whatever_the_paths(tmp_path):
    bindir, env = stubs(tmp_path)
    root = tmp_path / f"r {ODD}"
    odd = {
        "snapshot": root / "scale" / "experiment.yaml",
        "results": root,
        "tasks": root / "scale" / "scripts" / "s-P8.tasks",
        "script": root / "scale" / "scripts" / "s-P8.sbatch",
        "logs": root / "scale" / "logs",
        "workdir": tmp_path / f"w {ODD}\\",
        "python": str(bindir / "python"),
        "pythonpath": f"/src/{ODD}\\",
    }
    spec = SlurmSpec(env={"NOTE": ODD}, setup=["true 'a b' c"], sbatch=['--comment="a b #c"'])
    text = render(spec, **odd, force=True)
    odd["workdir"].mkdir()
    script = tmp_path / "job.sh"
    script.write_text(text)
    argv, seen = run_script(script, env, cwd=odd["workdir"])
    assert injected(tmp_path) == ""
    assert argv == [
        str(bindir / "python"), "-m", "ringbench", "sweep", str(odd["snapshot"]), "--results", str(root),
        "--launcher", "srun", "--tasks", str(odd["tasks"]), "--task", "0", "--force",
    ]  # fmt: skip
    assert seen == [ODD, odd["pythonpath"]]  # PYTHONPATH was unset: nothing appended
    assert sbatch_view(text) == [
        "--job-name=rb-scale-P8", "--array=0-2", "--ntasks=8", "--cpus-per-task=1", "--time=00:30:00",
        f"--output={str(odd['logs']).replace('%', '%%')}/%x-%A_%a.out", f"--chdir={odd['workdir']}", "--comment=a b #c",
    ]  # fmt: skip


def test_submit_with_odd_paths_writes_a_script_bash_and_sbatch_read_as_intended(tmp_path):
    bindir, env = stubs(tmp_path)
    cwd = tmp_path / f"cwd {ODD}"
    cwd.mkdir()
    exp = cwd / f"exp {ODD}.yaml"
    exp.write_text(
        "name: odd\nbase: {seq_len: 256, heads: 2, head_dim: 16}\n"
        f"slurm: {{profile: localcluster, python: {json.dumps(str(bindir / 'python'))}, env: {{NOTE: {json.dumps(ODD)}}}}}\n"
    )
    results = cwd / f"res {ODD}"
    res = ringbench("submit", exp, "--dry-run", "--results", results, env=PROFILES, cwd=cwd)
    assert res.returncode == 0, res.stderr
    (script,) = (results / "odd" / "scripts").glob("*.sbatch")
    argv, seen = run_script(script, env, cwd=cwd)
    assert injected(tmp_path) == ""
    snapshot, tasks = results / "odd" / "experiment.yaml", script.with_suffix(".tasks")
    assert argv == [str(bindir / "python"), "-m", "ringbench", "sweep", str(snapshot), "--results", str(results),
                    "--launcher", "srun", "--tasks", str(tasks), "--task", "0"]  # fmt: skip
    assert seen[0] == ODD
    words = sbatch_view(script.read_text())
    assert f"--output={str(results).replace('%', '%%')}/odd/logs/%x-%A_%a.out" in words
    assert f"--chdir={cwd}" in words
    assert {"--array=0-0", "--ntasks=1", "--partition=debug", "--time=00:10:00"} <= set(words)
    assert experiment.load(snapshot).name == "odd"  # the snapshot's comment naming FILE is one line


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028"])
def test_control_character_in_results_is_one_line_and_nothing_written(tmp_path, char):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: cc\nbase: {seq_len: 256, heads: 2, head_dim: 16}\nranks: [1, 2]\nslurm: {partition: debug, time: '5'}\n")
    results = f"rx{char}touch {tmp_path}/PWNED #"
    res = ringbench("submit", exp, "--dry-run", "--results", results, cwd=tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"ringbench submit: --results: {results!r} contains ")
    assert line.endswith(f"(U+{ord(char):04X}), which no value in a job script may hold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]  # nothing written


def test_control_character_in_the_current_directory_or_file_is_refused(tmp_path):
    cwd = tmp_path / "a\nb"
    cwd.mkdir()
    exp = cwd / "exp.yaml"
    exp.write_text("name: cc\nbase: {seq_len: 256, heads: 2, head_dim: 16}\n")
    res = ringbench("submit", "exp.yaml", "--dry-run", "--results", tmp_path / "results", cwd=cwd)
    assert res.returncode == 2
    why = "contains a newline (U+000A), which no value in a job script may hold"
    assert res.stderr == f"ringbench submit: the current directory: {str(cwd)!r} {why}\n"
    res = ringbench("submit", exp, "--dry-run", "--results", tmp_path / "results", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith(f"ringbench submit: FILE: {str(exp)!r} contains a newline (U+000A)")
    assert not (tmp_path / "results").exists()


def test_results_directory_with_a_backslash_is_refused(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: bs\nbase: {seq_len: 256, heads: 2, head_dim: 16}\n")
    res = ringbench("submit", exp, "--dry-run", "--results", tmp_path / "a\\b", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith(f"ringbench submit: --results: {str(tmp_path / 'a') + chr(92) + 'b'!r} has a backslash: sbatch --output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_render_refuses_a_control_character_in_any_value():
    with pytest.raises(slurm.SlurmError, match=r"^workdir: '/home/u\\n#SBATCH --uid=0' contains a newline \(U\+000A\)"):
        render(SlurmSpec(), workdir=Path("/home/u\n#SBATCH --uid=0"))
    with pytest.raises(slurm.SlurmError, match=r"^slurm.env.A: 'A=x\\x00y' contains a NUL \(U\+0000\)"):
        render(SlurmSpec(env={"A": "x\0y"}))


def test_sbatch_quote_round_trips_through_sbatch_words():
    import random

    rng = random.Random(15)
    alphabet = " \"'\\#:%$`;&|<>()=-_/.aZ09é" + "\u00a0"
    for _ in range(3000):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert slurm.sbatch_words(slurm.sbatch_quote(word)) == [word], word
        assert slurm.sbatch_words(f"  --x={slurm.sbatch_quote(word)} --y=1 ") == [f"--x={word}", "--y=1"], word


@pytest.mark.parametrize(
    "line, words",
    [
        ('--comment="a b" --mem=1G', ["--comment=a b", "--mem=1G"]),
        ("--comment='a \"b' x", ['--comment=a "b', "x"]),
        ('--comment=a\\"b', ['--comment=a"b']),
        ("--comment=a\\ b", ["--comment=a", "b"]),  # an escaped blank still separates
        ("--mem=1G # --output=/x", ["--mem=1G"]),
        ("--mem=1G#--output=/x", ["--mem=1G"]),
        ('--mem=1G "" --output=/x', ["--mem=1G"]),  # a word of no characters ends the line
        ("--comment='a\\'b'", ["--comment=a'b"]),  # a backslash escapes inside single quotes too
        ('--comment="%x" -o /x', ["--comment=%x", "-o", "/x"]),
    ],
)
def test_sbatch_words(line, words):
    assert slurm.sbatch_words(line) == words


@pytest.mark.parametrize("line", ['--comment="open', "--comment='open", ": --mem=1G"])
def test_sbatch_words_refuses_what_sbatch_refuses(line):
    with pytest.raises(ValueError):
        slurm.sbatch_words(line)


# ---------------------------------------------------------------------------------------------
# a live cluster
# ---------------------------------------------------------------------------------------------
def _slurm_conf() -> str:
    default = Path(os.environ.get("RINGBENCH_SLURM_DIR", "/tmp/ringbench-slurm")) / "slurm.conf"
    return os.environ.get("SLURM_CONF") or str(default)


def _cluster_problem() -> str | None:
    env = dict(os.environ, SLURM_CONF=_slurm_conf())
    if not Path(env["SLURM_CONF"]).is_file():
        return f"no Slurm configuration at {env['SLURM_CONF']}"
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if res.returncode != 0 or "UP" not in res.stdout:
        return f"no Slurm cluster answers (SLURM_CONF={env['SLURM_CONF']}): {(res.stdout + res.stderr).strip()}"
    return None


@pytest.fixture(scope="module")
def cluster() -> dict:
    """Environment for talking to the cluster; skip (or fail where a cluster is expected) without one."""
    problem = _cluster_problem()
    if problem:
        expected = os.environ.get("CI", "").lower() == "true" or os.environ.get("RINGBENCH_REQUIRE_SLURM") == "1"
        msg = f"{problem}; start one with slurm/localcluster.sh up"
        if expected:
            pytest.fail(f"Slurm cluster expected (CI / RINGBENCH_REQUIRE_SLURM) but absent: {msg}")
        pytest.skip(msg)
    return {"SLURM_CONF": _slurm_conf(), **PROFILES}


def wait_for_jobs(jobs_json: Path, env: dict, limit_s: float = 180) -> None:
    """Until the experiment's jobs have left the queue (a hang guard, not a timing assertion)."""
    import json

    ids = ",".join(j["job_id"] for j in json.loads(jobs_json.read_text()))
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        res = subprocess.run(["squeue", "-h", "-j", ids], capture_output=True, text=True, env=dict(os.environ, **env), check=False)
        if res.returncode == 0 and not res.stdout.strip() or "Invalid job id" in res.stderr:
            return
        time.sleep(0.5)
    pytest.fail(f"jobs {ids} still queued after {limit_s} s")


@pytest.mark.slurm
def test_submit_wait_collect(tmp_path, cluster):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        textwrap.dedent("""
        name: e2e
        base: {seq_len: 256, heads: 2, head_dim: 16, repeat: 2, warmup: 1, check: true}
        matrix:
          mode: [overlap, blocking]
          layout: [contiguous, zigzag]
        ranks: [1, 2]
        exclude:
          - {ranks: 1, mode: blocking}
        timeout: 120
        slurm: {profile: localcluster, time: "5"}
    """)
    )
    results = tmp_path / "results"
    res = ringbench("submit", exp, "--results", results, env=cluster, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("submitted job") == 2  # one array per rank count
    queued = ringbench("submit", exp, "--results", results, env=cluster, cwd=tmp_path)
    assert queued.returncode == 0 and "nothing to submit" in queued.stdout  # not queued twice
    wait_for_jobs(results / "e2e" / "jobs.json", cluster)

    status = ringbench("status", exp, "--results", results, env=cluster, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "6 points: 6 done" in status.stdout, status.stdout

    res = ringbench("collect", exp, "--results", results, env=cluster, cwd=tmp_path)  # the profile is found through the env
    assert res.returncode == 0, res.stderr
    runs = store.read(results / "e2e.h5")
    assert len(runs) == 6
    assert {r.nranks for r in runs} == {1, 2}
    for r in runs:
        assert r.status == "ok"
        assert r.check["passed"] and r.check["rel_err"] <= r.check["tol"]
        assert r.samples["total_s"].shape == (2, r.nranks)
    assert all(" srun " in p.read_text() for p in (results / "e2e" / "logs").glob("*.log"))
    assert len(list((results / "e2e" / "logs").glob("rb-e2e-P2-*_*.out"))) == 4  # one per array task

    again = ringbench("submit", exp, "--results", results, env=cluster, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert ringbench("collect", exp, "--results", results, env=cluster, cwd=tmp_path).returncode == 0
    assert len(store.read(results / "e2e.h5")) == 6  # collect again: nothing added


@pytest.mark.slurm
def test_sbatch_failure_shows_sbatch_message(tmp_path, cluster):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        textwrap.dedent("""
        name: badpart
        base: {seq_len: 256, heads: 2, head_dim: 16}
        slurm: {partition: nosuchpartition}
    """)
    )
    res = ringbench("submit", exp, "--results", tmp_path / "results", env=cluster, cwd=tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("ringbench submit: sbatch failed for ")
    assert "invalid partition" in line.lower()
    assert not (tmp_path / "results" / "badpart" / "jobs.json").exists()


def sbatch_reads(script: Path, env: dict) -> list[str]:
    """The option words the real sbatch reads from a script (its debug2 lines); nothing is submitted."""
    res = subprocess.run(
        ["sbatch", "-vvv", "--test-only", str(script)], capture_output=True, text=True, env=dict(os.environ, **env), timeout=60, check=False
    )
    key = 'Found in script, argument "'
    return [ln[ln.index(key) + len(key) : ln.rindex('"')] for ln in res.stderr.splitlines() if key in ln]


# lines as a site might write them, and as an attacker would: sbatch and sbatch_words must read the same words
SBATCH_LINES = [
    '--comment="a b c" --mem=1G',
    "--comment='a \"b' --mem 1G",
    '--comment=x"y z"w\\"q',
    "--comment=a\\ b",
    "--comment='a\\'b' --mem=1G # --output=/x",
    "--mem=1G#--output=/x",
    '--mem=1G "" --output=/x',
    '--comment="%x #; $HOME `id`" --exclusive',
    "--mem=1G   --nice=5",
]


@pytest.mark.slurm
@pytest.mark.parametrize("line", SBATCH_LINES)
def test_sbatch_words_reads_lines_as_the_real_sbatch_does(tmp_path, cluster, line):
    script = tmp_path / "s.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH {line}\ntrue\n")
    assert sbatch_reads(script, cluster) == slurm.sbatch_words(line)


@pytest.mark.slurm
def test_odd_paths_run_for_real_and_sbatch_reads_every_option(tmp_path, cluster):
    cwd = tmp_path / f"cwd {ODD}\\"
    cwd.mkdir()
    exp = cwd / "exp.yaml"
    exp.write_text(
        "name: odd\nbase: {seq_len: 256, heads: 2, head_dim: 16, repeat: 1, warmup: 0}\ntimeout: 120\n"
        f"slurm: {{profile: localcluster, time: '5', env: {{NOTE: {json.dumps(ODD)}}}, sbatch: ['--comment=\"a b #c\"']}}\n"
    )
    results = tmp_path / f"res {ODD}"  # no backslash: sbatch --output cannot hold one
    res = ringbench("submit", exp, "--dry-run", "--results", results, env=cluster, cwd=cwd)
    assert res.returncode == 0, res.stderr
    (script,) = (results / "odd" / "scripts").glob("*.sbatch")
    words = sbatch_view(script.read_text())
    assert sbatch_reads(script, cluster) == words
    assert f"--chdir={cwd}" in words and "--comment=a b #c" in words

    res = ringbench("submit", exp, "--results", results, env=cluster, cwd=cwd)
    assert res.returncode == 0, res.stderr
    wait_for_jobs(results / "odd" / "jobs.json", cluster)
    status = ringbench("status", exp, "--results", results, env=cluster, cwd=cwd)
    assert "1 points: 1 done" in status.stdout, status.stdout + status.stderr
    (log,) = (results / "odd" / "logs").glob("rb-odd-P1-*_0.out")  # the %x %A %a of --output expanded, the path's % kept
    assert log.is_file()
    assert injected(tmp_path) == "" and not list(tmp_path.rglob("PWNED"))


def test_template_with_unknown_placeholder_is_one_line_error():
    with pytest.raises(slurm.SlurmError, match=r"bad placeholder 'HOME'; allowed: \$experiment"):
        slurm.render(job(), SlurmSpec(), "#!/bin/bash\necho $HOME\n", "0.1.0", "now")


@pytest.mark.parametrize("bits", [0o600, 0o640, 0o644])
def test_job_script_is_no_more_readable_than_its_template(tmp_path, bits):
    tpl = tmp_path / "site.sbatch.sh"
    tpl.write_text(slurm.TEMPLATE.read_text())
    tpl.chmod(bits)
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: perm\nbase: {seq_len: 256, heads: 2, head_dim: 16}\nslurm: {template: site.sbatch.sh}\n")
    res = ringbench("submit", exp, "--dry-run", "--results", tmp_path / "results", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (script,) = (tmp_path / "results" / "perm" / "scripts").glob("*.sbatch")
    assert script.stat().st_mode & 0o777 == bits & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
