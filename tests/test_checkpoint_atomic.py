"""Checkpoints are published atomically: written into `.partial-<tag>/`, renamed to `<tag>/` when every rank is done.

Checked with real one-process pre-training runs (DeepSpeed on its CPU accelerator, ZeRO 2): keep-K pruning leaves
exactly K complete checkpoints and no staging directory, and a finished run resumes; a run killed with SIGKILL
in the middle of a save (held there by a wrapper around `torch.save`) leaves `latest` on the previous, complete
checkpoint and the interrupted one under `.partial-*`, uncounted; resumed, it reproduces the loss curve of a run
that was never stopped and cleans the debris. The bookkeeping around it (leftovers of killed runs, names that are
not tags) is checked in-process with a stand-in engine that writes files where DeepSpeed would.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import MODEL, REPO, RUN, assert_same_curve, command, environment, train
from tests.synthetic_codes import write_code_database
from vimpac.checkpoint import (
    CHECKPOINT_KEY,
    LATEST,
    PARTIAL_PREFIX,
    check_checkpoint_precision,
    checkpoint_root,
    checkpoint_world_size,
    complete_tags,
    export_metadata,
    export_weights,
    latest_tag,
    load_checkpoint,
    read_export,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vimpac.config import VimpacConfig
from vimpac.errors import StorageError, UsageError
from vimpac.metrics import read_metrics

FLAGS = ["--epochs", "2", "--zero-stage", "2"]  # 4 optimizer steps per epoch, 8 in all
KILL_FLAGS = [*FLAGS, "--save-steps", "1"]

# Run in a fresh interpreter: every torch.save goes through (DeepSpeed's files too); the third RNG file, the last
# file of the third checkpoint, is written and then the process announces itself and waits to be killed inside
# save_checkpoint, before the staging directory is published.
SLOW_SAVE = """
import sys, time
from pathlib import Path

sys.path.insert(0, {repo!r})
import torch

marker = Path(sys.argv[1])
real_save = torch.save
rng_files = 0


def slow_save(obj, f, *args, **kwargs):
    global rng_files
    result = real_save(obj, f, *args, **kwargs)
    if Path(str(f)).name.startswith("rng_rank"):
        rng_files += 1
        if rng_files == 3:
            marker.write_text(str(f))
            time.sleep(120)
    return result


torch.save = slow_save
from vimpac.pretrain import main

sys.exit(main(sys.argv[2:]))
"""


def staging_dirs(output: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_root(output).iterdir() if p.name.startswith(PARTIAL_PREFIX))


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return write_code_database(tmp_path_factory.mktemp("db") / "db", videos=64)


@pytest.fixture(scope="module")
def reference(database, tmp_path_factory):
    """The kill test's run, never interrupted: its loss curve."""
    return train(database, tmp_path_factory.mktemp("reference") / "run", 1, *KILL_FLAGS)


@pytest.mark.slow
def test_keep_k_leaves_k_complete_checkpoints_and_a_finished_run_resumes(database, reference, tmp_path):
    output = tmp_path / "run"
    flags = [*FLAGS, "--save-steps", "2", "--keep-checkpoints", "2"]
    curve = train(database, output, 1, *flags)
    # Saves at steps 2, 4 (epoch end), 6, 8 (epoch end); the cadence does not touch the training itself.
    assert_same_curve(curve, reference)
    assert complete_tags(output) == ["step00000006", "step00000008"]
    assert latest_tag(output) == "step00000008" == (checkpoint_root(output) / LATEST).read_text()
    assert staging_dirs(output) == []
    assert (output / "export" / "model.safetensors").is_file()  # exported from the renamed ZeRO checkpoint
    assert export_metadata(output / "export")[CHECKPOINT_KEY] == "step00000008"
    config, exported, _ = read_export(output / "export")
    # A launch killed between its last save and its export leaves the previous export; `latest` is lost as well
    # (deleted by hand, say): the resume must neither start afresh (pruning every checkpoint at its first save)
    # nor leave the older weights in export/.
    export_weights({k: torch.zeros_like(v) for k, v in exported.items()}, config, output, checkpoint="step00000006")
    (checkpoint_root(output) / LATEST).unlink()

    result = subprocess.run(
        command(database, output, 1, *flags, "--resume"),
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step00000008: epoch 2, step 0 of 4" in result.stdout
    assert "latest is missing; taking the newest complete checkpoint, step00000008" in result.stderr
    assert "export/ does not hold step00000008, the newest checkpoint: exporting it" in result.stdout
    _, again, _ = read_export(output / "export")
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    assert export_metadata(output / "export")[CHECKPOINT_KEY] == "step00000008"
    assert read_metrics(output) == curve
    assert complete_tags(output) == ["step00000006", "step00000008"] and staging_dirs(output) == []


def test_a_missing_or_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = checkpoint_root(tmp_path)
    assert latest_tag(tmp_path) is None  # no run yet: nothing to warn about
    for step in (3, 9):
        (root / f"step{step:08d}").mkdir(parents=True)
    (root / f"{PARTIAL_PREFIX}step00000012").mkdir()
    with pytest.warns(UserWarning, match="latest is missing; taking the newest complete checkpoint, step00000009"):
        assert latest_tag(tmp_path) == "step00000009"
    (root / LATEST).write_text("step00000012")  # its checkpoint was deleted
    with pytest.warns(UserWarning, match="names 'step00000012', which is not a complete checkpoint"):
        assert latest_tag(tmp_path) == "step00000009"
    (root / LATEST).write_text("step00000003")
    assert latest_tag(tmp_path) == "step00000003"  # a valid pointer wins over newer tags (a replaced run's)


@pytest.mark.slow
def test_kill_inside_a_save_keeps_the_previous_checkpoint_and_resume_continues(database, reference, tmp_path):
    output = tmp_path / "killed"
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_SAVE.format(repo=str(REPO)))
    marker = tmp_path / "inside-third-save"
    argv = ["--data", str(database), "--output", str(output), *MODEL, *RUN, *KILL_FLAGS]
    process = subprocess.Popen(
        [sys.executable, str(wrapper), str(marker), *argv],
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, "the run ended before its third save"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    root = checkpoint_root(output)
    interrupted = root / f"{PARTIAL_PREFIX}step00000003"
    assert Path(marker.read_text()) == interrupted / "rng_rank0.pt"
    # Every file of step 3 was written, yet it was not published: not counted, not the latest.
    assert (interrupted / "rng_rank0.pt").is_file() and list(interrupted.glob("*model_states.pt"))
    assert staging_dirs(output) == [interrupted.name]
    assert complete_tags(output) == ["step00000001", "step00000002"]
    assert latest_tag(output) == "step00000002"
    assert max(read_metrics(output)) == 3

    result = subprocess.run(
        command(database, output, 1, *KILL_FLAGS, "--resume"),
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step00000002: epoch 0, step 2 of 4" in result.stdout
    assert_same_curve(read_metrics(output), reference)
    assert staging_dirs(output) == []
    assert complete_tags(output) == ["step00000007", "step00000008"] and latest_tag(output) == "step00000008"


# ------------------------------------------------------------------------------------ in-process bookkeeping
class FileEngine:
    """Writes a model-states file where DeepSpeed's engine.save_checkpoint would (save_dir/tag/)."""

    def __init__(self):
        self.tags = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        self.tags.append(tag)
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag):
        raise AssertionError("must not be reached")

    def fp16_enabled(self):
        return False

    def bfloat16_enabled(self):
        return False


def test_save_publishes_by_rename_and_clears_what_killed_runs_left(tmp_path):
    output = tmp_path / "run"
    root = checkpoint_root(output)
    # A run that published step 1, then was killed: after publishing step 5 (before `latest` named it), inside a
    # later save (step 4's staging) and inside the save of step 3 (with a file this save will not write again).
    for name, junk in [
        ("step00000001", None),
        ("step00000005", "from-the-killed-run"),
        (".partial-step00000004", "x"),
        (".partial-step00000003", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ]:
        (root / name).mkdir(parents=True)
        if junk:
            (root / name / junk).write_text("stale")
    (root / LATEST).write_text("step00000001")
    engine = FileEngine()
    config = VimpacConfig.from_dict({**VimpacConfig().to_dict(), "layers": 1})

    assert save_checkpoint(engine, output, 3, {"epoch": 0}, keep=2, model_config=config) == "step00000003"
    assert engine.tags == [".partial-step00000003"]
    assert latest_tag(output) == "step00000003"
    assert sorted(p.name for p in (root / "step00000003").iterdir()) == [
        "mp_rank_00_model_states.pt",
        "rng_rank0.pt",
        "vimpac_config.json",
        "world.json",
    ]
    assert VimpacConfig.load(root / "step00000003" / "vimpac_config.json") == config
    assert checkpoint_world_size(output, "step00000003") == 1
    # This run's newest two kept; the killed run's step 5 is superseded and goes; every staging directory is gone.
    assert complete_tags(output) == ["step00000001", "step00000003"] and staging_dirs(output) == []

    save_checkpoint(engine, output, 4, {}, keep=2)
    save_checkpoint(engine, output, 5, {}, keep=2)
    assert complete_tags(output) == ["step00000004", "step00000005"] and latest_tag(output) == "step00000005"
    assert not (root / "step00000005" / "from-the-killed-run").exists()
    assert staging_dirs(output) == []
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step00000004", "step00000005"]


class FullDiskEngine(FileEngine):
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 646848 vs 646736")


class DamagedEngine(FileEngine):
    def load_checkpoint(self, load_dir, tag):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")


class OutOfMemoryEngine(FileEngine):
    def load_checkpoint(self, load_dir, tag):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class SilentFailureEngine(FileEngine):
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        raise OSError()


class LoadingEngine(FileEngine):
    def load_checkpoint(self, load_dir, tag):
        return str(Path(load_dir) / tag), {"epoch": 1}


def test_a_failed_save_and_an_unreadable_checkpoint_say_what_to_do(tmp_path):
    output = tmp_path / "run"
    for step in (3, 6):
        save_checkpoint(FileEngine(), output, step, {})
    with pytest.raises(
        StorageError,
        match=r"writing checkpoint .*\.partial-step00000009 failed \(\[enforce fail.*\); \d+ MiB free on its disk\. "
        r"The newest complete checkpoint is still step00000006: free space",
    ):
        save_checkpoint(FullDiskEngine(), output, 9, {})
    with pytest.raises(StorageError, match=r"partial-step00000009 failed \(OSError\)"):
        save_checkpoint(SilentFailureEngine(), output, 9, {})
    assert latest_tag(output) == "step00000006" and complete_tags(output) == ["step00000003", "step00000006"]
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):  # not the file's fault: as it is
        load_checkpoint(OutOfMemoryEngine(), output, "step00000006")
    with pytest.raises(
        UsageError,
        match=r"step00000006 cannot be read \(PytorchStreamReader failed reading zip archive: .*\); it is damaged or "
        r"incomplete: move it aside \(mv .*damaged-step00000006\) and rerun: the resume then takes step00000003",
    ):
        load_checkpoint(DamagedEngine(), output, "step00000006")
    (checkpoint_root(output) / "step00000006" / "rng_rank0.pt").unlink()
    with pytest.warns(UserWarning, match="rng_rank0.pt is missing: this rank's random streams start from the seed"):
        assert load_checkpoint(LoadingEngine(), output, "step00000006") == {"epoch": 1}


def test_staging_directories_are_never_taken_for_checkpoints(tmp_path):
    output = tmp_path / "run"
    root = checkpoint_root(output)
    (root / ".partial-step00000003").mkdir(parents=True)
    (root / LATEST).write_text(".partial-step00000003")
    assert latest_tag(output) is None and complete_tags(output) == []
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        load_checkpoint(FileEngine(), output, ".partial-step00000003")
    (root / "step00000002").mkdir()
    (root / "step2").mkdir()
    (root / LATEST).write_text("step00000002\n")
    assert latest_tag(output) == "step00000002" and complete_tags(output) == ["step00000002"]


def test_cuda_rng_state_is_this_devices_and_restores_with_fewer_gpus(monkeypatch):
    """Only the current device's CUDA generator is saved and restored: a resume on fewer visible GPUs (8 → 4, or
    one GPU per process) must not index devices it does not have. Simulated: no GPU here."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([11], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(int(state[0])))
    state = rng_state()
    assert int(state["cuda_device"][0]) == 11 and "cuda" not in state
    set_rng_state(state)
    legacy = {key: state[key] for key in ("python", "numpy", "torch")}
    set_rng_state({**legacy, "cuda": [torch.tensor([20], dtype=torch.uint8), torch.tensor([21], dtype=torch.uint8)]})
    set_rng_state({**legacy, "cuda": [torch.tensor([30], dtype=torch.uint8)]})  # device 1 was not saved: skipped
    assert restored == [11, 21]


def test_pruning_keeps_this_runs_newest_and_drops_later_leftovers(tmp_path):
    """Checkpoints of later steps than the one just published come from a run this one replaced (or a launch killed
    before it moved `latest`): they go, and `keep` counts this run's own checkpoints."""
    from vimpac.checkpoint import _prune
    from vimpac.run_setup import refuse_existing_run

    root = checkpoint_root(tmp_path)
    for step in (1000, 2000, 100, 200, 300):  # an old run's two, then this run's three
        (root / f"step{step:08d}").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"delete .*checkpoints to start over"):
        refuse_existing_run(tmp_path, resume=False)  # no `latest`, yet checkpoints
    _prune(root, "step00000300", keep=2)
    assert complete_tags(tmp_path) == ["step00000200", "step00000300"]


def test_an_original_release_output_folder_is_named_for_load_and_resume(tmp_path):
    from vimpac.checkpoint import export_folder
    from vimpac.run_setup import refuse_existing_run

    output = tmp_path / "snap"
    (output / "last").mkdir(parents=True)
    for name in ("classifier.pt", "args.pickle"):
        (output / "last" / name).write_bytes(b"")
    advice = f"{output / 'last'} is a checkpoint of the original release: convert it with `vimpac convert-original"
    for given in (output, output / "last", output / "last" / "classifier.pt"):
        with pytest.raises(UsageError, match=re.escape(advice)):
            export_folder(given, "--load")
    with pytest.raises(UsageError, match=re.escape(f"--resume --output {output}: no vimpac checkpoint to continue")):
        refuse_existing_run(output, resume=True)
    refuse_existing_run(output, resume=False)  # a new vimpac run may share the folder
    (output / "last" / "args.pickle").unlink()
    with pytest.raises(UsageError, match="point it at a run directory"):
        export_folder(output, "--load")


def test_the_export_is_refreshed_only_from_the_state_of_the_newest_checkpoint(tmp_path):
    """refresh_export writes what the engine holds (ZeRO stage 0): only when that is the newest checkpoint."""
    from types import MethodType, SimpleNamespace

    from vimpac.trainer import Trainer

    output = tmp_path / "run"
    for step in (4, 6):
        (checkpoint_root(output) / f"step{step:08d}").mkdir(parents=True)
    (checkpoint_root(output) / LATEST).write_text("step00000006")
    config = VimpacConfig()
    export_weights({"w": torch.zeros(3)}, config, output, checkpoint="step00000004")
    module = torch.nn.Module()
    module.register_buffer("w", torch.ones(3))
    trainer = SimpleNamespace(
        output=output,
        rank=0,
        zero_stage=0,
        config=config,
        dataset=None,
        task=SimpleNamespace(producer="vimpac.pretrain"),
        engine=SimpleNamespace(module=module),
        state_tag=None,  # trained past its last save, whose state a refused final save did not keep
    )
    trainer.export = MethodType(Trainer.export, trainer)
    Trainer.refresh_export(trainer)
    assert export_metadata(output / "export")[CHECKPOINT_KEY] == "step00000004"
    trainer.state_tag = "step00000006"  # resumed from the newest checkpoint, nothing trained since
    Trainer.refresh_export(trainer)
    assert export_metadata(output / "export")[CHECKPOINT_KEY] == "step00000006"
    assert torch.equal(read_export(output / "export")[1]["w"], torch.ones(3))


def test_a_resume_that_spells_the_head_count_out_is_the_same_model(tmp_path):
    from vimpac.checkpoint import resize_source

    implicit = VimpacConfig(hidden_size=512, heads=None)  # hid-dim // 64 = 8
    save_checkpoint(FileEngine(), tmp_path, 5, {}, model_config=implicit)
    assert resize_source(tmp_path, VimpacConfig(hidden_size=512, heads=8)) is None  # not a "new shape"
    assert resize_source(tmp_path, VimpacConfig(hidden_size=512, clip_len=10))[0] == "step00000005"
    with pytest.raises(UsageError, match="differs in heads"):
        resize_source(tmp_path, VimpacConfig(hidden_size=512, heads=4, clip_len=10))


def test_a_checkpoint_of_another_precision_is_refused_with_the_flag_that_resumes_it(tmp_path):
    root = checkpoint_root(tmp_path)
    recorded, bf16, legacy, bare = (root / f"step0000000{i}" for i in range(1, 5))
    for folder in (recorded, bf16, legacy, bare):
        folder.mkdir(parents=True)
    (recorded / "world.json").write_text('{"world_size": 2, "precision": "fp32"}')
    (bf16 / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()  # written before the precision was recorded
    (legacy / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    check_checkpoint_precision(tmp_path, recorded.name, "fp32")
    with pytest.raises(UsageError, match=r"written by a fp32 run and this launch trains in bf16.*--precision fp32"):
        check_checkpoint_precision(tmp_path, recorded.name, "bf16")
    with pytest.raises(UsageError, match=r"written by a bf16 run .* in fp16"):
        check_checkpoint_precision(tmp_path, bf16.name, "fp16")
    check_checkpoint_precision(tmp_path, legacy.name, "fp16")  # fp16 and fp32 are not told apart
    with pytest.raises(UsageError, match="written by a fp16 or fp32 run"):
        check_checkpoint_precision(tmp_path, legacy.name, "bf16")
    check_checkpoint_precision(tmp_path, bare.name, "bf16")  # nothing to tell by: DeepSpeed's own load decides
