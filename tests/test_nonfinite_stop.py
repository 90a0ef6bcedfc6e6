"""--max-nonfinite-steps: a run whose loss stays NaN stops cleanly (exit code 3) without saving the NaN state.

The NaN is injected by a wrapper script in the test's tmp_path (never by a product flag): it patches the masked-token
loss the trainer calls to multiply the loss by NaN at chosen optimizer steps (so the gradients are NaN too, as in
a real divergence; ZeRO 2 then skips the update as an overflow), then runs `vimpac.pretrain.main` in one process
on the CPU accelerator (fp32, ds_configs/cpu.json).
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, environment
from tests.synthetic_codes import FRAME_SIZE, VOCAB, write_code_database, write_labeled
from vimpac.checkpoint import checkpoint_root, latest_tag
from vimpac.metrics import read_metrics
from vimpac.trainer import current_loss_scale

MODEL = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "4", "--nce-proj-hid-dim", "32"]
MODEL += ["--vocab-size", str(VOCAB), "--frame-size", str(FRAME_SIZE), "--mask-blocks", "2"]
# 32 videos, 8 per step (4 per micro-step, 2 accumulation steps): 4 optimizer steps per epoch.
RUN = ["--deepspeed_config", "ds_configs/cpu.json", "--batch-size", "8", "--bs-per-gpu", "4", "--num-workers", "0"]
RUN += ["--lr", "1e-3", "--warm-up", "0.1", "--zero-stage", "2", "--epochs", "3"]
FINETUNE_MODEL = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "2", "--frame-size", "32"]
FINETUNE_MODEL += ["--vocab-size", str(VOCAB)]
FINETUNE_RUN = [*RUN[:8], "--zero-stage", "0", "--epochs", "2"]

WRAPPER = '''
"""Run vimpac/<argv[1]>.py (pretrain or finetune) with its loss made NaN at the optimizer steps named in argv[2]."""
import sys

import torch.nn.functional as F

from vimpac.dist_setup import prepare_environment

prepare_environment()  # before deepspeed is imported (by pretrain_setup): it picks the accelerator at import time
from vimpac import pretrain_setup, trainer  # noqa: E402

entry, spec = sys.argv[1], sys.argv[2]  # spec "6+": step 6 and every later one; "3,4,7": those steps
if spec.endswith("+"):
    first = int(spec[:-1])
    poisoned = lambda step: step >= first  # noqa: E731
else:
    chosen = {int(s) for s in spec.split(",")}
    poisoned = lambda step: step in chosen  # noqa: E731
current = {"step": 0}
micro_step = trainer.Trainer.micro_step


def tracking_micro_step(self, batch, meter):
    current["step"] = int(self.engine.global_steps) + 1  # the optimizer step this micro-step belongs to
    return micro_step(self, batch, meter)


trainer.Trainer.micro_step = tracking_micro_step


if entry == "pretrain":
    from vimpac.pretrain import main

    masked_token_loss = pretrain_setup.masked_token_loss

    def nan_masked_token_loss(*args, **kwargs):
        out = masked_token_loss(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if poisoned(current["step"]) else out

    pretrain_setup.masked_token_loss = nan_masked_token_loss
else:
    from vimpac.finetune import main

    cross_entropy = F.cross_entropy

    def nan_cross_entropy(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if poisoned(current["step"]) else loss

    F.cross_entropy = nan_cross_entropy
sys.exit(main(sys.argv[3:]))
'''


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return write_code_database(tmp_path_factory.mktemp("db") / "db", videos=32)


def run_with_nan(
    tmp_path: Path, db: Path, output: Path, steps: str, *flags: str, entry: str = "pretrain"
) -> subprocess.CompletedProcess:
    script = tmp_path / "nan_run.py"
    script.write_text(WRAPPER)
    model, run = (MODEL, RUN) if entry == "pretrain" else (FINETUNE_MODEL, FINETUNE_RUN)
    command = [sys.executable, str(script), entry, steps, "--data", str(db), "--output", str(output), *model, *run]
    command += flags
    env = environment()
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_a_lasting_nan_loss_stops_the_run_without_saving_it(database, tmp_path):
    output = tmp_path / "run"
    result = run_with_nan(tmp_path, database, output, "6+", "--max-nonfinite-steps", "3", "--save-steps", "2")
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-3000:]
    message = next(line for line in result.stderr.splitlines() if line.startswith("vimpac/pretrain.py: stopped:"))
    good = checkpoint_root(output) / "step00000004"  # the epoch end; step 6's save fell in the streak
    assert "optimizer step 8" in message and "3 consecutive optimizer steps (steps 6-8" in message, message
    assert f"last good checkpoint: {good}" in message and "last finite loss: step 5" in message, message
    assert "--resume" in message and "--lr" in message and "--warm-up" in message and "--precision bf16" in message
    assert "initial_scale_power" in message and "loss_scale_window" in message
    assert "Traceback" not in log
    assert "not saving the checkpoint at step 6" in result.stderr

    metrics = read_metrics(output)
    assert sorted(metrics) == list(range(1, 9))  # the finite steps and the three NaN ones; nothing after
    assert all(math.isfinite(metrics[s]["loss/total"]) for s in range(1, 6))
    assert all(math.isnan(metrics[s]["loss/total"]) for s in range(6, 9))
    assert metrics[8]["optim/skipped_steps"] == 3  # ZeRO skipped the NaN updates as overflows
    assert latest_tag(output) == "step00000004"
    assert sorted(p.name for p in checkpoint_root(output).glob("step*")) == ["step00000002", "step00000004"]


def test_isolated_nan_steps_below_the_limit_do_not_stop_the_run(database, tmp_path):
    output = tmp_path / "run"
    result = run_with_nan(tmp_path, database, output, "3,4,7", "--max-nonfinite-steps", "3")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = read_metrics(output)
    assert sorted(metrics) == list(range(1, 13))
    nan_steps = [s for s in metrics if math.isnan(metrics[s]["loss/total"])]
    assert nan_steps == [3, 4, 7]
    assert "2 consecutive non-finite steps" in result.stderr
    # Epoch 0 ended on a NaN step: its checkpoint was skipped, the later ones were written.
    assert "not saving the checkpoint at the end of epoch 0" in result.stderr
    assert latest_tag(output) == "step00000012"
    assert not (checkpoint_root(output) / "step00000004").exists()
    assert math.isfinite(metrics[12]["loss/total"])


def test_finetuning_stops_too_and_says_there_is_no_checkpoint_yet(tmp_path):
    db = write_labeled(tmp_path / "labeled", videos_per_class=8, val_per_class=1, classes=4)
    output = tmp_path / "run"
    result = run_with_nan(tmp_path, db, output, "2+", "--max-nonfinite-steps", "2", entry="finetune")
    assert result.returncode == 3, (result.stdout + result.stderr)[-3000:]
    message = next(line for line in result.stderr.splitlines() if line.startswith("vimpac/finetune.py: stopped:"))
    assert "optimizer step 3" in message and "2 consecutive optimizer steps (steps 2-3" in message, message
    assert "last good checkpoint: none yet" in message and "last finite loss: step 1" in message, message
    assert sorted(read_metrics(output)) == [1, 2, 3] and latest_tag(output) is None


class _Config:
    cur_scale = 512.0


class _ZeroOptimizer:
    loss_scale = 1024.0


class _Fp16Optimizer:
    loss_scale_config = _Config()


class _Engine:
    def __init__(self, optimizer, fp16=True):
        self.optimizer, self.fp16 = optimizer, fp16

    def fp16_enabled(self):
        return self.fp16


def test_loss_scale_is_read_from_each_optimizer_kind():
    assert current_loss_scale(_Engine(_Fp16Optimizer())) == 512.0
    assert current_loss_scale(_Engine(_ZeroOptimizer())) == 1024.0
    assert current_loss_scale(_Engine(_ZeroOptimizer(), fp16=False)) is None
