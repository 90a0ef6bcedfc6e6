"""The trainers start both ways the docs name: as modules (`python -m vimpac.pretrain`, `deepspeed --module
vimpac.pretrain`; what the demo, the recipe scripts and the other tests use, needing only the installed package,
so they run here from a directory outside the checkout) and as scripts from a checkout (`python vimpac/pretrain.py`,
the README's form)."""

import errno
import os
import subprocess

import pytest
import torch

from tests.helpers import DEEPSPEED, REPO, environment, launcher
from vimpac.dist_setup import free_port
from vimpac.entry import run_reporting_errors
from vimpac.errors import UsageError, storage_problem

ENTRIES = [("vimpac.pretrain", "vimpac/pretrain.py"), ("vimpac.finetune", "vimpac/finetune.py")]


def run_help(command: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--help"], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, script", ENTRIES)
def test_module_and_script_forms_print_the_same_usage(module, script, tmp_path):
    as_module = run_help(launcher(module, 1), tmp_path)
    as_script = run_help(launcher(script, 1), REPO)
    for result in (as_module, as_script):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert as_module.stdout.startswith(f"usage: {script} ")
    assert as_module.stdout == as_script.stdout


def test_the_deepspeed_launcher_starts_the_module(tmp_path):
    ports = ["--num_gpus", "1", "--master_port", str(free_port())]
    result = run_help([str(DEEPSPEED), *ports, "--module", "vimpac.pretrain"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "usage: vimpac/pretrain.py " in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "--out", "{file}"],
        ["train-tokenizer", "--videos", "{dir}", "--out", "{file}"],
        [
            "tokenize",
            "--videos",
            "{dir}",
            "--format",
            "list",
            "--annotations",
            "{file}",
            "--tokenizer",
            "t",
            "--out",
            "{file}",
        ],
        ["embed", "{dir}", "--model", "m", "--out", "{file}"],
        ["demo", "--out", "{file}"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_file_given_as_output_directory_is_refused(tmp_path, capsys, argv):
    from vimpac.cli import main as cli_main

    taken = tmp_path / "notes.txt"
    taken.write_text("a file\n")
    argv = [a.format(file=taken, dir=tmp_path) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {taken} is a file, not a directory" in err and "Traceback" not in err
    assert taken.read_text() == "a file\n"


def test_the_cpu_accelerator_is_told_by_ds_accelerator_not_by_a_visible_gpu(monkeypatch):
    """`vimpac demo --device cpu` on a GPU machine sets DS_ACCELERATOR=cpu: its ranks are CPU processes, which
    share the cores, although CUDA is visible."""
    import os

    from vimpac.dist_setup import cpu_accelerator, cpu_threads_per_rank

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not cpu_accelerator({}) and cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2"}) is None
    env = {"DS_ACCELERATOR": "cpu", "LOCAL_WORLD_SIZE": "2"}
    assert cpu_accelerator(env) and cpu_threads_per_rank(env) == max(1, (os.cpu_count() or 1) // 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_accelerator({})


def test_a_full_disk_is_one_line_that_says_what_to_do(capsys):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/pt/metrics.jsonl")
    wrapped = RuntimeError("writing failed")
    wrapped.__cause__ = full
    assert storage_problem(wrapped) == (
        "runs/pt/metrics.jsonl: No space left on device; free space or fix the permissions, then rerun the same "
        "command (with --resume for a training run; finished work is kept)"
    )
    assert storage_problem(OSError(errno.ECONNRESET, "reset")) is None
    assert storage_problem(ValueError("x")) is None

    def work() -> int:
        raise full

    assert run_reporting_errors("vimpac/pretrain.py", work) == 1
    assert capsys.readouterr().err == f"vimpac/pretrain.py: error: {storage_problem(full)}\n"

    def bug() -> int:
        raise OSError(errno.EBADF, "a bug, not the disk")

    with pytest.raises(OSError, match="a bug"):
        run_reporting_errors("vimpac/pretrain.py", bug)


def test_ranks_started_by_mpirun_or_srun_without_torch_variables_are_refused():
    from vimpac.dist_setup import foreign_launcher, prepare_environment

    mpi_rank = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16"}
    with pytest.raises(UsageError, match=r"started by OpenMPI \(mpirun\) without RANK"):
        prepare_environment(dict(mpi_rank))
    assert foreign_launcher({"SLURM_PROCID": "9", "SLURM_NTASKS": "16"}) == "SLURM (srun)"
    assert foreign_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # an sbatch script's one task
    launched = {**mpi_rank, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert prepare_environment(launched) and launched["RANK"] == "5"  # deepspeed's own variables: fine
