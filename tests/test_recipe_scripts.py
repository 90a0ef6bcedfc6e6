"""The large-half model's two-stage recipe, run through its own scripts at a tiny size on CPU (one rank under the
deepspeed launcher, model and schedule shrunk by extra flags, which the scripts pass on last so they win):
scripts/pretrain/large.sh (stage 1, 32 px codes here) → scripts/pretrain/large_frame256cont.sh (stage 2 at twice
the frame size, in its own run directory, started from stage 1's checkpoint with --resume-from) →
scripts/finetune/large_frame256_ucf101.sh on stage 2's export. Stage 1's run directory must come out of stage 2
byte for byte as it went in, and the scripts' default paths must chain: stage 2 reads stage 1's default output
and the fine-tuning scripts load the exports of the stage they are named after.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, environment
from tests.synthetic_codes import VOCAB, video_codes, write_code_database
from vimpac.checkpoint import latest_tag
from vimpac.code_db import CodeDatabaseWriter
from vimpac.config import VimpacConfig
from vimpac.dist_setup import free_port
from vimpac.errors import UsageError
from vimpac.metrics import read_metrics
from vimpac.pretrain import build_parser
from vimpac.pretrain_setup import checkpoint_source

SCRIPTS = REPO / "scripts"
# After the scripts' own flags: a 1-layer model, 1 optimizer step per epoch, fp32 ZeRO-2 on the CPU engine (the
# recipe's engines are fp16 ZeRO-2; stage 2 then resizes through DeepSpeed's universal checkpoint, as on GPUs).
TINY = ["--deepspeed_config", "ds_configs/cpu.json", "--layers", "1", "--hid-dim", "32", "--heads", "2"]
TINY += ["--clip-len", "2", "--num-workers", "0", "--batch-size", "4", "--bs-per-gpu", "4"]
PRETRAIN = [*TINY, "--nce-proj-hid-dim", "32", "--mask-blocks", "1", "--max-steps-per-epoch", "1", "--epochs", "3"]


def run_script(
    script: str, env: dict[str, str], *flags: str, cwd: Path = REPO, expect: int = 0
) -> subprocess.CompletedProcess:
    """bash scripts/<script> cpu:1 <flags>, run in `cwd`, with `env` added to the trainers' test environment;
    its exit status must be `expect`."""
    full = environment()
    full.update(env, MASTER_PORT=str(free_port()))
    full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full['PATH']}"  # the venv's deepspeed launcher
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), "cpu:1", *flags],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_ucf101_like(path: Path, frame_size: int) -> Path:
    """A labeled database in UCF101's layout (split 1), one centre view at `frame_size`, 2 classes × 3 videos."""
    grid = (frame_size // 8, frame_size // 8)
    view = f"r{frame_size}_center_f0"
    manifest = {
        "dataset": "ucf101",
        "fps": 2,
        "frame_size": frame_size,
        "grid": list(grid),
        "tokenizer": {"name": "synthetic", "vocab_size": VOCAB, "fingerprint": "0" * 16},
        "views": [view],
        "classes": ["class0", "class1"],
    }
    rng = np.random.default_rng(0)
    splits = {"train_1": [], "test_1": []}
    with CodeDatabaseWriter(path, manifest) as writer:
        for label in range(2):
            for i in range(3):
                video_id = f"c{label}_v{i}"
                writer.add(video_id, {view: video_codes(rng, 4, grid)}, label=label, duration=2.0, fps=2.0)
                splits["train_1" if i < 2 else "test_1"].append(video_id)
        writer.finalize(splits)
    return path


def default_of(script: str, variable: str) -> str:
    """The default of `${VARIABLE:-default}` in scripts/<script>."""
    match = re.search(rf"\$\{{{variable}:-([^}}]+)\}}", (SCRIPTS / script).read_text())
    assert match, f"{script} has no ${{{variable}:-...}}"
    return match.group(1)


def test_the_scripts_default_paths_chain_the_stages():
    stage1 = default_of("pretrain/large.sh", "OUTPUT")
    stage2 = default_of("pretrain/large_frame256cont.sh", "OUTPUT")
    assert stage2 != stage1, "stage 2 must not write into stage 1's run directory"
    assert default_of("pretrain/large_frame256cont.sh", "STAGE1") == stage1
    assert default_of("finetune/large_frame128_ucf101.sh", "LOAD") == f"{stage1}/export"
    assert default_of("finetune/large_frame256_ucf101.sh", "LOAD") == f"{stage2}/export"


def test_resume_from_applies_only_while_the_output_has_no_checkpoint(tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    args = build_parser().parse_args(["--data", "DB", "--resume", "--resume-from", str(stage1)])
    with pytest.raises(UsageError, match=r"--resume-from .*stage1: no complete checkpoint"):
        checkpoint_source(args, stage2)
    for run, tag in ((stage1, "step00000002"), (stage2, "step00000003")):
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text(tag)
        if run == stage1:
            assert checkpoint_source(args, stage2) == stage1  # first launch: stage 1's checkpoint
    assert checkpoint_source(args, stage2) == stage2  # a relaunch continues its own
    assert checkpoint_source(build_parser().parse_args(["--data", "DB", "--resume"]), tmp_path / "new") is None


def test_two_stage_recipe_end_to_end(tmp_path):
    """Stage 1 (2 of 3 epochs, 32 px) → stage 2 (the last epoch, 64 px, own directory) → fine-tuning stage 2."""
    db32 = write_code_database(tmp_path / "codes_f32", videos=8, frames=4, grid=(4, 4))
    write_code_database(tmp_path / "codes_f64", videos=8, frames=4, grid=(8, 8))  # stage 2 names it relatively
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"

    env = {"DATA": str(db32), "OUTPUT": str(stage1)}
    run_script("pretrain/large.sh", env, *PRETRAIN, "--frame-size", "32", "--stop-epoch", "2")  # the recipe's 90 of 100
    assert latest_tag(stage1) == "step00000002"
    before = tree_digest(stage1)

    env = {"DATA": "codes_f64", "OUTPUT": "stage2", "STAGE1": "stage1"}  # relative to where the user stands
    result = run_script("pretrain/large_frame256cont.sh", env, *PRETRAIN, "--frame-size", "64", cwd=tmp_path)
    assert f"resumed {stage1 / 'checkpoints' / 'step00000002'} at a new shape" in result.stdout
    assert tree_digest(stage1) == before, "stage 2 changed stage 1's run directory"
    assert latest_tag(stage2) == "step00000003"  # the schedule's last step, in stage 2's own directory
    assert VimpacConfig.load(stage1 / "export" / "config.json").grid == (4, 4)
    assert VimpacConfig.load(stage2 / "export" / "config.json").grid == (8, 8)
    assert sorted(read_metrics(stage2)) == [3] and sorted(read_metrics(stage1)) == [1, 2]
    record = json.loads((stage2 / "run_config.json").read_text())
    assert record["resumed_from"] == str(stage1 / "checkpoints" / "step00000002")
    # A "stage 1" that already holds the whole schedule leaves a stage 2 nothing: refused, not a silent no-op.
    env = {"DATA": "codes_f64", "OUTPUT": "stage2b", "STAGE1": "stage2"}
    result = run_script("pretrain/large_frame256cont.sh", env, *PRETRAIN, "--frame-size", "64", cwd=tmp_path, expect=2)
    assert "its newest checkpoint is at epoch 3 of the 3-epoch schedule, so nothing is left" in result.stderr

    ucf = write_ucf101_like(tmp_path / "ucf101_f64", 64)
    env = {"DATA": str(ucf), "OUTPUT": str(tmp_path / "finetune"), "LOAD": str(stage2 / "export")}
    result = run_script("finetune/large_frame256_ucf101.sh", env, *TINY, "--epochs", "1", "--last-test-clips", "1")
    assert f"fine-tuning from weights of {stage2 / 'export'}" in result.stdout
    final = json.loads((tmp_path / "finetune" / "eval" / "final_clips1.json").read_text())
    assert final["num_videos"] == 2 and final["split"] == "test_1"
