"""End-to-end pre-training runs as subprocesses: one process, and two ranks under the deepspeed launcher.

Checked: both losses fall on learnable synthetic codes; ZeRO stages 0-3 (stage 3 with activation checkpointing)
give the same losses over 2 ranks and leave no process-group thread alive once `main` returns; a run killed with
SIGKILL mid-epoch and resumed reproduces the loss curve of the run that was never stopped; a run chunked with
--interval does too; the exported weights load into the model and equal the final weights whatever the ZeRO stage.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, assert_same_curve, command, environment, shm_segments, train
from tests.synthetic_codes import VOCAB, write_code_database
from vimpac.checkpoint import latest_tag
from vimpac.config import VimpacConfig
from vimpac.metrics import read_metrics
from vimpac.modeling import VimpacForPretraining

PROBE = REPO / "tests" / "teardown_probe.py"
DIST_THREADS = ("gloo", "pt_gloo", "pt_tcpstore")  # gloo's loop and work threads, the store server's loop


def exported_state(output: Path) -> dict[str, torch.Tensor]:
    config = VimpacConfig.load(output / "export" / "config.json")
    state = load_file(output / "export" / "model.safetensors")
    VimpacForPretraining(config).load_state_dict(state, strict=True)  # every key present, every shape right
    return state


def exported_outputs(output: Path) -> dict[str, torch.Tensor]:
    """Outputs of the exported model on a fixed batch, without dropout, BatchNorm on batch statistics."""
    config = VimpacConfig.load(output / "export" / "config.json")
    model = VimpacForPretraining(VimpacConfig.from_dict({**config.to_dict(), "dropout": 0.0})).train()
    model.load_state_dict(exported_state(output))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, *config.shape), generator=generator)
    labels = torch.where(torch.rand(tokens.shape, generator=generator) < 0.2, tokens, -100)
    with torch.no_grad():
        out = model(tokens, labels)
    return {"mlm_logits": out["mlm_logits"], "nce": out["nce"], "cls": out["cls"]}


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return write_code_database(tmp_path_factory.mktemp("db") / "db", videos=64)


@pytest.fixture(scope="module")
def zero_runs(database, tmp_path_factory):
    """Three epochs (12 steps) over 2 ranks at every ZeRO stage; stage 3 also checkpoints activations. Each run
    goes through tests/teardown_probe.py, which writes each rank's threads left after `main` to <run>/threads/."""
    root = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (0, 1, 2, 3):
        flags = ["--epochs", "3", "--zero-stage", str(stage), "--save-steps", "2"]
        if stage == 3:
            flags.append("--grad-checkpoint")
        output = root / f"z{stage}"
        env = {"TEARDOWN_PROBE_OUTPUT": str(output / "threads")}
        runs[stage] = (output, train(database, output, 2, *flags, entry=str(PROBE), env=env))
    return runs


@pytest.mark.slow
def test_single_process_learns_and_chunked_run_matches(database, tmp_path):
    flags = ["--epochs", "8", "--zero-stage", "0"]
    full = train(database, tmp_path / "full", 1, *flags)
    assert len(full) == 32

    def mean(name, steps):
        return sum(full[s][name] for s in steps) / len(steps)

    first, last = range(1, 5), range(29, 33)
    assert mean("loss/mlm", last) < mean("loss/mlm", first) - 0.1
    assert mean("loss/nce", last) < 0.8 * mean("loss/nce", first)
    assert mean("accuracy/mlm", last) > mean("accuracy/mlm", first)
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    record = json.loads((tmp_path / "full" / "run_config.json").read_text())
    assert record["deepspeed"]["gradient_accumulation_steps"] == 4 and record["total_steps"] == 32
    assert record["warmup_steps"] == 3 and record["deepspeed"]["optimizer"]["params"]["lr"] == 1e-2

    # The same schedule in launches of 3 (--stop-epoch 3, launched twice: the second trains nothing), 2
    # (--interval) and 3 epochs, resumed at epoch boundaries.
    chunked = tmp_path / "chunked"
    train(database, chunked, 1, *flags, "--stop-epoch", "3")
    assert max(read_metrics(chunked)) == 12 and latest_tag(chunked) == "step00000012"
    train(database, chunked, 1, *flags, "--stop-epoch", "3", "--resume")
    assert max(read_metrics(chunked)) == 12 and latest_tag(chunked) == "step00000012"
    train(database, chunked, 1, *flags, "--interval", "2", "--resume")
    assert latest_tag(chunked) == "step00000020"
    assert_same_curve(train(database, chunked, 1, *flags, "--resume"), full)
    for name, value in exported_state(chunked).items():
        torch.testing.assert_close(value, exported_state(tmp_path / "full")[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_zero_stages_give_the_same_losses_over_two_ranks(zero_runs):
    reference_dir, reference = zero_runs[0]
    assert len(reference) == 12
    for stage in (1, 2, 3):
        assert_same_curve(zero_runs[stage][1], reference, rtol=1e-4)
    # Compare what the exported models compute, not raw weights: the key part of the QKV bias and the bias before
    # the projection head's BatchNorm have an exactly-zero gradient, so Adam turns rounding noise there into full
    # steps that differ between stages, yet cancel in the output (softmax shift,
    # batch mean).
    expected = exported_outputs(reference_dir)
    for stage in (1, 2, 3):
        for name, value in exported_outputs(zero_runs[stage][0]).items():
            torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-4, msg=f"stage {stage}: {name}")
    assert reference[12]["loss/nce"] < reference[1]["loss/nce"]


@pytest.mark.skipif(sys.platform != "linux", reason="the probe reads the thread names from /proc/self/task")
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_no_process_group_threads_survive_a_finished_run(zero_runs, stage):
    """Gloo's groups stop their threads only when the last reference to them goes, and a trained engine holds them
    through hooks autograd keeps (ZeRO-3 also through DeepSpeed's module-level state); left to interpreter
    finalization, those threads raced the exit and a finished rank now and then aborted ("terminate called
    without an active exception"). vimpac/dist_setup.py's `shutdown_distributed` frees them before `main` returns."""
    for rank in (0, 1):
        report = json.loads((zero_runs[stage][0] / "threads" / f"rank{rank}.json").read_text())
        assert report["exit_code"] == 0
        left = [name for name in report["threads"] if name.startswith(DIST_THREADS)]
        assert not left, f"rank {rank}: process-group threads still alive after main returned: {left}"


@pytest.mark.slow
def test_resume_after_a_real_kill_continues_the_same_curve(database, zero_runs, tmp_path):
    output = tmp_path / "killed"
    flags = ["--epochs", "3", "--zero-stage", "2", "--save-steps", "2"]
    segments = shm_segments()
    process = subprocess.Popen(
        command(database, output, 2, *flags),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the launcher and both ranks die together
    )
    try:
        deadline = time.monotonic() + 240
        while latest_tag(output) != "step00000006":  # mid-way through the second epoch
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert shm_segments() <= segments, "a killed run must not leave DeepSpeed's segments in /dev/shm"
    before = read_metrics(output)
    assert 6 <= max(before) < 12, "killed before the end"
    resumed = train(database, output, 2, *flags, "--resume")
    assert_same_curve(resumed, zero_runs[2][1])


@pytest.mark.slow
def test_engine_compiled_model_trains_like_the_eager_one(database, tmp_path):
    """--compile hands the module to the engine's torch.compile (aot_eager: Dynamo + AOT autograd, no C++ build
    here); the losses follow the eager run's."""
    flags = ["--epochs", "2", "--zero-stage", "0"]
    eager = train(database, tmp_path / "eager", 1, *flags)
    compiled = train(database, tmp_path / "compiled", 1, *flags, "--compile", "aot_eager")
    assert_same_curve(compiled, eager, rtol=1e-4)
    record = json.loads((tmp_path / "compiled" / "run_config.json").read_text())
    assert record["args"]["compile"] == "aot_eager"


@pytest.mark.slow
def test_zero2_run_resumes_on_another_number_of_ranks(database, tmp_path):
    """A 2-rank ZeRO-2 run stopped after an epoch (--interval) finishes on 1 rank: the ZeRO shards go through a
    universal checkpoint and the data position is kept. No dropout (the ranks' RNG streams do not matter) and
    1 rank × 8 videos per micro-step sees the contrastive negatives of 2 ranks × 4, so the first resumed step has
    the 2-rank run's losses; the masked-token loss only differs by data-parallel weighting (the mean of two
    ranks' means against one mean over the same tokens), and later steps drift by that much per step."""
    flags = ["--epochs", "3", "--zero-stage", "2", "--dropout", "0.0"]
    full = train(database, tmp_path / "full", 2, *flags)
    moved = tmp_path / "moved"
    train(database, moved, 2, *flags, "--interval", "1")
    assert max(read_metrics(moved)) == 4 and latest_tag(moved) == "step00000004"
    resumed = train(database, moved, 1, *flags, "--bs-per-gpu", "8", "--resume")
    assert sorted(resumed) == sorted(full)
    assert resumed[5]["loss/nce"] == pytest.approx(full[5]["loss/nce"], rel=1e-4)
    assert resumed[5]["loss/mlm"] == pytest.approx(full[5]["loss/mlm"], rel=3e-3)
    for step in range(6, 13):
        assert resumed[step]["loss/total"] == pytest.approx(full[step]["loss/total"], rel=3e-2), step
    assert not list((moved / "checkpoints").glob("resized-*"))  # the universal scratch copy is cleaned up
