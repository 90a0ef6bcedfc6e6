"""Pre-training pieces in one process: activation checkpointing, batch layout, metrics, and clear refusals."""

import errno

import pytest
import torch

from tests.helpers import one_rank_process_group
from tests.synthetic_codes import VOCAB, write_code_database
from vimpac import run_setup
from vimpac.activation_checkpointing import activation_checkpointing_enabled, enable_activation_checkpointing
from vimpac.config import VimpacConfig
from vimpac.errors import UsageError
from vimpac.losses import info_nce, masked_token_loss
from vimpac.metrics import MetricsWriter, StepAccumulator, read_metrics
from vimpac.modeling import VimpacForPretraining
from vimpac.pretrain import main
from vimpac.pretrain_setup import micro_batch_tokens
from vimpac.run_setup import lock_run, release_run_locks
from vimpac.trainer import check_database_matches, epoch_steps, resume_position

TINY = ["--layers", "2", "--hid-dim", "64", "--heads", "2", "--clip-len", "4", "--nce-proj-hid-dim", "64"]


def pretraining_loss(model, tokens, labels):
    out = model(tokens, labels)
    half = tokens.shape[0] // 2
    return (
        masked_token_loss(out["mlm_logits"], out["mlm_labels"]).loss
        + info_nce(out["nce"][:half], out["nce"][half:]).loss
    )


def test_activation_checkpointing_trains_every_parameter_exactly_as_without():
    config = VimpacConfig(vocab_size=40, hidden_size=64, heads=2, layers=3, clip_len=3, grid=(4, 4), dropout=0.1)
    torch.manual_seed(0)
    plain = VimpacForPretraining(config)
    checkpointed = VimpacForPretraining(config)
    checkpointed.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(checkpointed.backbone.layers)
    enable_activation_checkpointing(checkpointed.backbone.layers)  # idempotent
    assert activation_checkpointing_enabled(checkpointed.backbone.layers)
    assert list(checkpointed.state_dict()) == list(plain.state_dict()), "names unchanged"
    # Data straight from the loader: no input requires grad (the case where reentrant checkpointing loses grads).
    tokens = torch.randint(0, 40, (4, *config.shape))
    labels = torch.where(torch.rand(tokens.shape) < 0.3, tokens, -100)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same dropout masks; the recomputation must replay them
        model.train()
        pretraining_loss(model, tokens, labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    missing = [n for n, g in grads[1].items() if g is None or not torch.any(g != 0)]
    assert not missing, f"parameters without gradient under checkpointing: {missing}"
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batch_layout_puts_all_first_clips_first():
    inputs = torch.arange(3 * 2 * 1 * 1 * 1).view(3, 2, 1, 1, 1)
    tokens, labels, videos = micro_batch_tokens({"inputs": inputs, "labels": -inputs})
    assert videos == 3
    assert tokens.flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert torch.equal(labels, -tokens)


def test_epoch_steps():
    assert epoch_steps(100, 2, 4, 3) == 4  # 50 per rank → 12 micro-batches → 4 steps
    assert epoch_steps(100, 2, 4, 3, limit=2) == 2
    with pytest.raises(UsageError, match="fewer than one global batch of 24"):
        epoch_steps(20, 2, 4, 3)


def test_database_must_match_the_model():
    manifest = {"tokenizer": {"vocab_size": 64}, "grid": [4, 4], "frame_size": 32}
    check_database_matches(manifest, VimpacConfig(vocab_size=64, grid=(4, 4), hidden_size=64, heads=2))
    with pytest.raises(UsageError, match="tokenized with 64 codes but the model has --vocab-size 8192"):
        check_database_matches(manifest, VimpacConfig(grid=(4, 4), hidden_size=64, heads=2))
    with pytest.raises(UsageError, match=r"4x4 codes per frame \(frame size 32\).*--frame-size 32"):
        check_database_matches(manifest, VimpacConfig(vocab_size=64, grid=(16, 16), hidden_size=64, heads=2))


def test_step_accumulator_weights():
    meter = StepAccumulator()
    meter.add("loss", 2.0)
    meter.add("loss", torch.tensor(4.0))
    meter.add("acc", 0.5, weight=10)
    meter.add("acc", 1.0, weight=30)
    assert meter.reduce() == {"acc": pytest.approx(0.875), "loss": pytest.approx(3.0)}
    assert meter.reduce() == {}


def test_step_accumulator_all_reduces_on_its_device(tmp_path, monkeypatch):
    """In a process group the sums go through one all_reduce of a tensor on the accumulator's device (the engine's:
    NCCL refuses CPU tensors; tests/test_gpu.py checks that on CUDA), a one-rank group included."""
    seen = []
    real_all_reduce = torch.distributed.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", recording_all_reduce)
    with one_rank_process_group("gloo", tmp_path):
        meter = StepAccumulator(torch.device("cpu"))
        meter.add("acc", torch.tensor(0.25), weight=torch.tensor(4))
        meter.add("acc", 1.0, weight=0)
        assert meter.reduce() == {"acc": 0.25}
    assert seen == [torch.device("cpu")]


def test_metrics_survive_a_torn_line(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(1, 0, {"loss/total": 3.0})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss/to')  # killed mid-write
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(2, 0, {"loss/total": 2.5})
    writer.write(1, 0, {"loss/total": 2.9})  # a resumed run repeats step 1: the last record wins
    writer.close()
    records = read_metrics(tmp_path)
    assert {s: r["loss/total"] for s, r in records.items()} == {1: 2.9, 2: 2.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------- command-line refusals (before any work)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return write_code_database(tmp_path_factory.mktemp("db") / "db", videos=8)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--frame-size", "36", "--vocab-size", str(VOCAB)], "frame size 36 is not a positive multiple of 8"),
        (["--vocab-size", "8192"], f"tokenized with {VOCAB} codes but the model has --vocab-size 8192"),
        (["--frame-size", "64", "--vocab-size", str(VOCAB)], "4x4 codes per frame"),
        (
            ["--frame-size", "32", "--vocab-size", str(VOCAB), "--batch-size", "6", "--bs-per-gpu", "4"],
            "--batch-size 6 is not divisible by --bs-per-gpu 4",
        ),
        (["--frame-size", "32", "--vocab-size", str(VOCAB), "--mask-blocks", "0"], "--mask-blocks 0 masks nothing"),
        (
            ["--frame-size", "32", "--vocab-size", str(VOCAB), "--batch-size", "2", "--bs-per-gpu", "1"],
            "1 rank(s) × --bs-per-gpu 1 gives 1; raise --bs-per-gpu, add ranks, or pass --nce-weight 0",
        ),
        (["--frame-size", "32", "--vocab-size", str(VOCAB), "--dataset-name", "ssv2"], "holds dataset 'synthetic'"),
        (["--frame-size", "32", "--vocab-size", str(VOCAB), "--precision", "fp16"], "fp16 is not supported"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--interval", "0"], "--interval must be >= 1 epoch per launch"),
        (["--epochs", "4", "--stop-epoch", "5"], "--stop-epoch must lie in 1..--epochs (4)"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--mlm-weight", "0", "--nce-weight", "0"], "must be >= 0 and not both 0"),
        (["--nce-weight", "-1"], "must be >= 0 and not both 0"),
        (["--mlm-weight", "nan"], "must be >= 0 and not both 0"),
        (["--num-workers", "-1"], "--num-workers must be >= 0"),
        (["--frame-size", "32", "--vocab-size", str(VOCAB), "--lr", "nan"], "--lr must be positive and finite"),
        (["--frame-size", "32", "--vocab-size", str(VOCAB), "--epsilon", "0"], "--epsilon must be positive"),
        (["--frame-size", "32", "--vocab-size", str(VOCAB), "--nce-dim", "0"], "nce_dim must be at least 1"),
    ],
)
def test_bad_configuration_is_refused_clearly(database, tmp_path, capsys, single_process_env, flags, message):
    code = main(["--data", str(database), "--output", str(tmp_path / "run"), *TINY, *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_run_needs_resume(database, tmp_path, capsys, single_process_env):
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step00000004").mkdir(parents=True)
    (checkpoints / "latest").write_text("step00000004")
    assert main(["--data", str(database), "--output", str(tmp_path / "run"), *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_a_second_launch_on_a_running_output_is_refused(database, tmp_path, capsys, single_process_env):
    output = tmp_path / "run"
    lock_run(output)  # the first launch, still running
    with pytest.raises(UsageError, match="another launch is running in"):
        lock_run(output)
    assert main(["--data", str(database), "--output", str(output), *TINY, "--resume"]) == 2
    assert f"another launch is running in {output}" in capsys.readouterr().err
    release_run_locks()
    lock_run(output)  # free again once the first launch ends
    release_run_locks()


def test_a_file_system_without_flock_only_warns(tmp_path, monkeypatch):
    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_setup.fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="Function not implemented.*nothing stops a second launch"):
        lock_run(tmp_path / "run")
    release_run_locks()


def test_help_lists_the_seed_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    seed_flags = (
        "--mlm-weight --nce-weight --nce-proj-layers --nce-proj-hid-dim --model --dataset-name --layers --hid-dim "
        "--frame-size --clip-len --lr --beta1 --beta2 --lr-scheduler --warm-up --mask-blocks --tqdm --debug "
        "--bs-per-gpu --batch-size --epochs --resume --output --deepspeed_config"
    )
    missing = [flag for flag in seed_flags.split() if flag not in text]
    assert not missing


def test_load_starts_pretraining_from_an_export(tmp_path):
    """--load EXPORT: backbone and heads from the export (positional tables interpolated to another clip length),
    a fine-tuning export's classifier dropped and the heads it lacks left fresh; another architecture refused."""
    from vimpac.checkpoint import export_weights
    from vimpac.modeling import VimpacForClassification
    from vimpac.pretrain import build_parser
    from vimpac.pretrain_setup import load_export_weights

    assert build_parser().parse_args(["--data", "x"]).load is None
    config = VimpacConfig(vocab_size=VOCAB, hidden_size=64, heads=2, layers=1, clip_len=2, grid=(4, 4))
    torch.manual_seed(0)
    source = VimpacForPretraining(config)
    export_weights(source.state_dict(), config, tmp_path / "pt")
    torch.manual_seed(1)
    model = VimpacForPretraining(config)
    assert load_export_weights(model, str(tmp_path / "pt"), config) == []
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    longer = VimpacConfig.from_dict({**config.to_dict(), "clip_len": 4})
    resized = VimpacForPretraining(longer)
    assert load_export_weights(resized, str(tmp_path / "pt" / "export"), longer) == []
    assert resized.backbone.positional_embedding.temporal.shape[0] == 4
    assert torch.equal(resized.mlm_head.dense.weight, source.mlm_head.dense.weight)
    export_weights(VimpacForClassification(config, 3).state_dict(), config, tmp_path / "ft", "vimpac.finetune")
    fresh = load_export_weights(VimpacForPretraining(config), str(tmp_path / "ft"), config)
    assert fresh and all(k.startswith(("mlm_head.", "nce_head.")) for k in fresh)
    deeper = VimpacConfig.from_dict({**config.to_dict(), "layers": 2})
    with pytest.raises(UsageError, match="layers"):
        load_export_weights(VimpacForPretraining(deeper), str(tmp_path / "pt"), deeper)


def test_load_runs_and_a_mismatched_export_is_refused(database, tmp_path, capsys, single_process_env):
    import json
    import subprocess

    from tests.helpers import REPO, environment, launcher
    from vimpac.checkpoint import export_weights

    flags = ["--data", str(database), *TINY, "--frame-size", "32", "--vocab-size", str(VOCAB), "--batch-size", "4"]
    one = VimpacConfig(vocab_size=VOCAB, hidden_size=64, heads=2, layers=1, clip_len=4, grid=(4, 4))
    export_weights(VimpacForPretraining(one).state_dict(), one, tmp_path / "one")
    assert main([*flags, "--output", str(tmp_path / "bad"), "--load", str(tmp_path / "one")]) == 2
    assert "differs in layers" in capsys.readouterr().err and not (tmp_path / "bad" / "checkpoints").exists()
    two = VimpacConfig.from_dict({**one.to_dict(), "layers": 2, "nce_proj_hid_dim": 64})
    export_weights(VimpacForPretraining(two).state_dict(), two, tmp_path / "two")
    out = tmp_path / "run"
    cmd = [*launcher("vimpac.pretrain", 1), *flags, "--load", str(tmp_path / "two"), "--output", str(out)]
    cmd += ["--epochs", "1", "--max-steps-per-epoch", "1", "--num-workers", "0"]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["loaded"] == str(tmp_path / "two")
    assert "weights from --load" in result.stdout


def test_save_steps_that_end_an_epoch_are_saved_whatever_save_epochs(tmp_path, monkeypatch):
    """--save-steps 4 with 8 steps per epoch and --save-epochs 4: a checkpoint every 4 steps, those at epoch ends
    included (they were skipped, waiting for an epoch-end save that --save-epochs put off)."""
    import vimpac.trainer as trainer_module

    saved = []
    monkeypatch.setattr(
        trainer_module, "save_checkpoint", lambda engine, output, step, *args, **kwargs: saved.append(step) or "t"
    )

    class Engine:
        device, global_steps, skipped_steps = torch.device("cpu"), 0, 0
        module = torch.nn.Linear(1, 1)

        def get_lr(self):
            return [1e-3]

        def is_gradient_accumulation_boundary(self):
            return True

        def backward(self, loss):
            pass

        def step(self):
            self.global_steps += 1

        def get_global_grad_norm(self):
            return 0.0

        def fp16_enabled(self):
            return False

        def bfloat16_enabled(self):
            return False

    class Videos(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"x": torch.zeros(1)}

        def set_epoch(self, epoch):
            pass

    class Task(trainer_module.Task):
        def compute_loss(self, engine, batch):
            return torch.zeros(()), {"loss/total": 0.0}

    engine_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 1,
        "zero_optimization": {"stage": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }
    settings = trainer_module.TrainSettings(epochs=4, save_steps=4, save_epochs=4, num_workers=0, export=False)
    config = VimpacConfig(hidden_size=64, heads=2, layers=1)
    trainer_module.Trainer(Engine(), config, Videos(), settings, tmp_path, engine_config, Task()).fit()
    assert saved == [4, 8, 12, 16, 20, 24, 28, 32]


def _client_state(epoch: int, step: int, consumed: int, **recorded) -> dict:
    return {"epoch": epoch, "step_in_epoch": step, "sampler": {"consumed": consumed}, **recorded}


def test_resume_position_goes_on_where_the_checkpoint_stopped_whatever_the_batch():
    # 32 videos; the checkpoint trained 3 steps of 4 (12 videos) of epoch 0
    saved = _client_state(0, 3, 12, global_batch=4, epoch_complete=False)
    assert resume_position(saved, 4, 8, 32) == (0, 3, None)
    epoch, step, note = resume_position(saved, 8, 4, 32)  # a larger batch: 8 trained again, none skipped
    assert (epoch, step) == (0, 1) and "12 videos into epoch 0" in note and "the last 4 of those videos again" in note
    epoch, step, note = resume_position(saved, 2, 16, 32)  # a smaller one: exactly where it stopped
    assert (epoch, step) == (0, 6) and "again" not in note
    assert resume_position(_client_state(0, 8, 32, global_batch=4, epoch_complete=True), 8, 4, 32) == (1, 0, None)
    assert resume_position(_client_state(0, 2, 24, global_batch=12, epoch_complete=True), 8, 4, 32) == (1, 0, None)
    # written before the batch and the epoch's end were recorded: inferred from the sampler's count
    assert resume_position(_client_state(0, 3, 12), 8, 4, 32)[:2] == (0, 1)
    assert resume_position(_client_state(0, 2, 24), 8, 4, 32) == (1, 0, None)  # no whole batch of 12 was left
    assert resume_position(_client_state(0, 8, 32), 4, 8, 32) == (1, 0, None)
    assert resume_position(_client_state(0, 3, 12), 4, 2, 32) == (1, 0, None)  # a lower --max-steps-per-epoch
    # 96 of 100 videos at a batch of 3 (one step left); at 16 the epoch's last step runs again, and with it the
    # epoch's end (evaluation, save, export)
    epoch, step, note = resume_position(_client_state(2, 32, 96, global_batch=3, epoch_complete=False), 16, 6, 100)
    assert (epoch, step) == (2, 5) and "from epoch 2, step 5, training the last 16 of those videos again" in note


def test_a_checkpoint_of_other_heads_or_groups_is_refused_before_the_engine(tmp_path):
    import argparse
    import json

    from vimpac.pretrain_setup import check_resumable_objective

    def launch(**flags):
        return argparse.Namespace(**{"mlm_weight": 1.0, "nce_weight": 1.0, "decay_groups": "structural", **flags})

    run = tmp_path / "run"
    run.mkdir()
    check_resumable_objective(run, launch())  # no run_config.json: nothing to compare
    (run / "run_config.json").write_text(json.dumps({"args": {"mlm_weight": 1.0, "nce_weight": 0.0}}))
    check_resumable_objective(run, launch(nce_weight=0.0, mlm_weight=2.0))
    with pytest.raises(UsageError, match=r"trained without the contrastive head .*resume with --nce-weight 0"):
        check_resumable_objective(run, launch())
    with pytest.raises(UsageError, match=r"with the masked-token head .*--mlm-weight > 0"):
        check_resumable_objective(run, launch(mlm_weight=0.0, nce_weight=0.0))
    with pytest.raises(UsageError, match="--decay-groups structural"):
        check_resumable_objective(run, launch(nce_weight=0.0, decay_groups="original"))
    (run / "run_config.json").write_text(json.dumps({"args": {}, "test_views": ["r32_center_f0"]}))
    with pytest.raises(UsageError, match=rf"is a fine-tuning run.*--load {run}/export"):
        check_resumable_objective(run, launch())


def test_a_resumed_run_warns_that_a_new_lr_does_not_take_effect(tmp_path, capsys):
    import argparse

    from vimpac.run_setup import record_run

    record_run(tmp_path, argparse.Namespace(lr=1e-3, resume=False))
    record_run(tmp_path, argparse.Namespace(lr=1e-3, resume=True))
    assert "warning" not in capsys.readouterr().err
    record_run(tmp_path, argparse.Namespace(lr=5e-3, resume=True))
    assert "--lr 0.005 differs from the 0.001 this run was trained with" in capsys.readouterr().err
    engine = {"optimizer": {"params": {"lr": 2e-3}}}  # --lr not given: the engine config's
    record_run(tmp_path / "b", argparse.Namespace(lr=None, resume=False), deepspeed=engine)
    record_run(tmp_path / "b", argparse.Namespace(lr=None, resume=True), deepspeed=engine)
    assert "warning" not in capsys.readouterr().err
    record_run(
        tmp_path / "b", argparse.Namespace(lr=1e-4, resume=True), deepspeed={"optimizer": {"params": {"lr": 1e-4}}}
    )
    assert "--lr 0.0001 differs from the 0.002" in capsys.readouterr().err
