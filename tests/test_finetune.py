"""Fine-tuning: split names, view and clip selection, view averaging, metrics, exact-once evaluation over 2 ranks,
the input-shape check and positional interpolation, the zero-initialised head, pickle-free loading, and a run
that fits a small labeled set."""

import argparse
import json
import os
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from tests.helpers import REPO, environment, launcher
from tests.synthetic_codes import GRID, VOCAB, write_labeled
from vimpac.checkpoint import export_weights
from vimpac.clip_windows import check_same_clip_rate, clip_slack, evaluation_starts
from vimpac.config import VimpacConfig
from vimpac.dist_setup import free_port
from vimpac.errors import UsageError
from vimpac.finetune_data import (
    FinetuneTestClips,
    FinetuneTrainClips,
    average_view_probabilities,
    classification_metrics,
    evaluation_views,
    split_names,
    training_views,
)
from vimpac.finetune_setup import evaluate_clips, finetune_config, forward_in_chunks, initial_state, load_exported
from vimpac.metrics import read_metrics
from vimpac.modeling import VimpacForClassification, VimpacForPretraining

TWELVE = [f"r{r}_{c}_f{f}" for f in (0, 1) for r in (32, 40) for c in ("top", "center", "bottom")]


@pytest.fixture(scope="module")
def index_db(tmp_path_factory):
    views = ("r32_top_f0", "r32_center_f0", "r32_bottom_f0")
    return write_labeled(tmp_path_factory.mktemp("idx") / "db", 2, 1, 2, frames=9, views=views, kind="index")


# ------------------------------------------------------------------------------------------- pure logic


def test_split_names():
    assert split_names("ucf101", 2) == ("train_2", "test_2")
    assert split_names("hmdb51", None) == ("train_1", "test_1")
    assert split_names("ssv2") == ("train", "val")
    assert split_names("synthetic") == ("train", "val")
    with pytest.raises(UsageError):
        split_names("ucf101", 4)
    with pytest.raises(UsageError):
        split_names("ssv2", 1)


def test_train_and_test_views():
    assert training_views(TWELVE, "ucf101") == TWELVE
    assert (
        training_views(TWELVE, "ssv2") == [v for v in TWELVE if v.endswith("_f0")]
        and len(training_views(TWELVE, "ssv2")) == 6
    )
    assert evaluation_views(TWELVE, "ucf101", 32) == ["r32_top_f0", "r32_center_f0", "r32_bottom_f0"]
    assert evaluation_views(TWELVE, "ssv2", 32) == ["r32_center_f0"]
    assert evaluation_views(["r32_center_f0"], "diving48", 64) == ["r32_center_f0"]  # the only view
    with pytest.raises(UsageError, match="--test-views"):
        evaluation_views(["a", "b"], "ucf101", 32)


def test_probability_averaging_is_softmax_per_view_then_mean():
    logits = torch.tensor([[[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])  # one video, 3 views, 2 classes
    expected = np.mean([np.exp(r) / np.exp(r).sum() for r in logits[0].numpy()], axis=0)
    got = average_view_probabilities(logits)[0].numpy()
    assert got == pytest.approx(expected, rel=1e-6)
    logits = torch.tensor([[[10.0, 0.0], [0.0, 4.0], [0.0, 4.0]]])
    assert average_view_probabilities(logits)[0].argmax() == 1  # ...here probs pick 1, mean logits pick 0
    assert logits.mean(dim=1)[0].argmax() == 0


def test_classification_metrics():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    labels = torch.tensor([0, 2, 1, 1])
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class"] == {"a": 1.0, "b": 0.0, "c": 1.0}
    assert m["mean_class_accuracy"] == pytest.approx(2 / 3)


def test_label_smoothing_matches_the_original_formula():
    """torch's label_smoothing is the original's (1 - ε)·NLL + ε·mean(−log p) (docs/reference.md §6.2)."""
    logits, labels, eps = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.1
    logp = torch.log_softmax(logits, 1)
    expected = (1 - eps) * -logp[torch.arange(6), labels].mean() + eps * (-logp).mean()
    assert torch.nn.functional.cross_entropy(logits, labels, label_smoothing=eps) == pytest.approx(float(expected))


# ---------------------------------------------------------------------------------------- view and clips


def test_train_clips_draw_views_and_starts_uniformly(index_db):
    views = ["r32_top_f0", "r32_center_f0", "r32_bottom_f0"]
    ds = FinetuneTrainClips(index_db, "train", 3, pad_id=VOCAB, views=views, frame_rate=1, seed=3)
    delta = clip_slack(9, 3, 2)  # stride 2 (2 fps → 1 fps): 9 + 1 - 6 = 4
    seen_views, seen_starts = [], []
    for epoch in range(60):
        item = ds[(epoch, 1)]
        tokens = item["tokens"].numpy()
        view, start = divmod(int(tokens[0, 0, 0]), 10)
        assert view == item["view"] and start == item["start"]  # the codes came from that view and start
        assert list(tokens[:, 0, 0] % 10) == [start, start + 2, start + 4]
        seen_views.append(view)
        seen_starts.append(start)
        assert ds[(epoch, 1)]["tokens"].equal(item["tokens"])  # a function of (seed, epoch, index)
    assert set(seen_views) == {0, 1, 2} and set(seen_starts) == set(range(delta + 1))
    only_center = FinetuneTrainClips(index_db, "train", 3, pad_id=VOCAB, views=["r32_center_f0"], frame_rate=1)
    assert {int(only_center[(e, 0)]["tokens"][0, 0, 0]) // 10 for e in range(10)} == {1}


def test_test_clips_are_views_times_uniform_clips(index_db):
    views = ["r32_top_f0", "r32_bottom_f0"]
    for k in (1, 2, 3):
        ds = FinetuneTestClips(index_db, "val", 3, pad_id=VOCAB, views=views, num_clips=k, frame_rate=1)
        tokens = ds[0]["tokens"].numpy()
        assert tokens.shape == (2 * k, 3, *GRID)
        starts = evaluation_starts(4, k)
        assert starts == ([2] if k == 1 else [0, 4] if k == 2 else [0, 2, 4])  # K = 1: the centre clip
        for v, view_id in enumerate((0, 2)):
            for c, start in enumerate(starts):
                assert int(tokens[v * k + c, 0, 0, 0]) == 10 * view_id + start


def test_single_test_clip_starts_the_video_by_default_when_fine_tuning(index_db):
    """K = 1: --single-clip start (the original's evaluation, fine-tuning's default) takes frame 0, centre takes
    the middle (evaluation_starts); K > 1 ignores the option."""
    from vimpac.finetune import build_parser

    assert build_parser().parse_args(["--data", "x"]).single_clip == "start"
    views = ["r32_top_f0", "r32_bottom_f0"]
    common = {"pad_id": VOCAB, "views": views, "frame_rate": 1}
    for where, start in (("start", 0), ("centre", 2)):
        ds = FinetuneTestClips(index_db, "val", 3, num_clips=1, single_clip=where, **common)
        assert ds.single_clip == where and ds.starts(9) == [start]
        assert [int(t) for t in ds[0]["tokens"][:, 0, 0, 0]] == [start, 20 + start]
    spread = FinetuneTestClips(index_db, "val", 3, num_clips=3, single_clip="start", **common)
    assert spread.starts(9) == evaluation_starts(4, 3) == [0, 2, 4]
    with pytest.raises(UsageError, match="single-clip"):
        FinetuneTestClips(index_db, "val", 3, num_clips=1, single_clip="middle", **common)


# --------------------------------------------------------------------------------- exact-once over 2 ranks


class _ViewModel(torch.nn.Module):
    """logits from the first code of a clip: deterministic, so every rank and world size agrees."""

    def forward(self, tokens):
        x = tokens[:, 0, 0, 0].float()
        return torch.stack([x, -x, torch.sin(x)], dim=1) / 10


def _rank_main(rank, world, port, db, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ds = FinetuneTestClips(db, "val", 3, pad_id=VOCAB, views=["r32_top_f0", "r32_center_f0"], num_clips=2)
    probs, loss = evaluate_clips(_ViewModel(), ds, "cpu", rank, world, clips_per_forward=4)
    if rank == 0:
        torch.save({"probs": probs, "loss": loss}, out)
    dist.destroy_process_group()


def test_evaluation_counts_every_video_once_over_two_ranks(tmp_path):
    db = write_labeled(tmp_path / "db", 2, 5, 1, frames=9, views=("r32_top_f0", "r32_center_f0"), kind="index")
    ds = FinetuneTestClips(db, "val", 3, pad_id=VOCAB, views=["r32_top_f0", "r32_center_f0"], num_clips=2)
    assert len(ds) == 5  # odd: rank 1 pads with a repeat
    single_probs, single_loss = evaluate_clips(_ViewModel(), ds, "cpu", 0, 1, clips_per_forward=4)
    # independent reference: every video, its 4 clips, softmax, mean
    for i in range(5):
        logits = _ViewModel()(ds[i]["tokens"])
        assert single_probs[i] == pytest.approx(torch.softmax(logits, 1).mean(0), abs=1e-6)
    mp.spawn(_rank_main, args=(2, free_port(), str(db), str(tmp_path / "out.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "out.pt")
    assert two["probs"].shape == (5, 3)
    assert torch.allclose(two["probs"], single_probs) and torch.allclose(two["loss"], single_loss)


# ----------------------------------------------------------------------------- weights, shapes and the head


def _tiny(**kw):
    fields = dict(vocab_size=VOCAB, hidden_size=32, layers=1, heads=2, clip_len=4, grid=(4, 4), nce_proj_hid_dim=32)
    return VimpacConfig(**{**fields, **kw})


def _args(*argv, **kw):
    """The fine-tuning command line `argv` (the model flags) with --load ckpt, then the fields of `kw`."""
    from vimpac.finetune import build_parser

    args = build_parser().parse_args(["--data", "db", "--load", "ckpt", "--dropout", "0.1", *argv])
    return argparse.Namespace(**{**vars(args), **kw})


def test_shape_mismatch_is_an_error_naming_both_shapes():
    saved = _tiny()
    assert finetune_config(_args(), saved).shape == (4, 4, 4)
    with pytest.raises(UsageError) as err:
        finetune_config(_args(clip_len=8), saved)
    assert "(4, 4, 4)" in str(err.value) and "(8, 4, 4)" in str(err.value) and "--different-shape" in str(err.value)
    with pytest.raises(UsageError, match="--frame-size 64"):
        finetune_config(_args(frame_size=64), saved)
    assert finetune_config(_args(clip_len=8, frame_size=64, different_shape=True), saved).shape == (8, 8, 8)


def test_model_flags_that_contradict_the_checkpoint_are_refused():
    saved = _tiny()  # hidden 32, 1 layer, 2 heads, post-LN
    assert finetune_config(_args(), saved).to_dict() == {**saved.to_dict(), "dropout": 0.1}
    assert finetune_config(_args("--layers", "1", "--heads", "2", "--hid-dim", "32"), saved).layers == 1  # agree
    for argv, named in (
        (["--layers", "6", "--hid-dim", "512"], "hidden_size 32, layers 1 there"),  # the defaults, yet given
        (["--model", "T,H,W"], "layout 'T,H|W' there"),
        (["--pre-activation"], "pre_ln False there"),
        (["--special-ids", "compact"], "special_ids 'original' there"),
        (["--vocab-size", "2048"], f"vocab_size {VOCAB} there"),
        (["--heads", "4"], "heads 2 there"),
    ):
        with pytest.raises(UsageError, match=re.escape(named)):
            finetune_config(_args(*argv), saved)


def test_different_shape_interpolates_each_axis(tmp_path):
    saved = _tiny()
    torch.manual_seed(0)
    export_weights(VimpacForPretraining(saved).state_dict(), saved, tmp_path)
    old_config, state = load_exported(tmp_path)
    config = finetune_config(_args(clip_len=8, frame_size=64, different_shape=True), old_config)
    model = VimpacForClassification(config, 3)
    missing = initial_state(model, state, old_config, config)
    assert sorted(missing) == ["classifier.fc.bias", "classifier.fc.weight"]
    pos = model.backbone.positional_embedding
    for name, new_n in (("temporal", 8), ("height", 8), ("width", 8)):
        old = state[f"backbone.positional_embedding.{name}"].numpy()
        n = old.shape[0]
        x = np.clip((np.arange(new_n) + 0.5) * n / new_n - 0.5, 0, n - 1)  # half-pixel linear (independent)
        expected = np.stack([np.interp(x, np.arange(n), old[:, d]) for d in range(old.shape[1])], 1)
        assert getattr(pos, name).detach().numpy() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(model.backbone.token_embedding.weight, state["backbone.token_embedding.weight"])


def test_head_is_zero_initialised_and_loading_uses_no_pickle(tmp_path, monkeypatch):
    saved = _tiny()
    export_weights(VimpacForPretraining(saved).state_dict(), saved, tmp_path)

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    config, state = load_exported(tmp_path)
    model = VimpacForClassification(finetune_config(_args(), config), 5, dropout=0.0)
    initial_state(model, state, config, model.config)
    assert not model.classifier.fc.weight.any() and not model.classifier.fc.bias.any()
    assert torch.count_nonzero(model.eval()(torch.randint(0, VOCAB, (2, 4, 4, 4)))) == 0
    assert not any(k.startswith(("mlm_head", "nce_head")) for k in model.state_dict())


# ------------------------------------------------------------------------------------------- end to end


def test_finetune_fits_a_small_labeled_set_and_eval_only_reproduces(tmp_path):
    db = write_labeled(tmp_path / "db", videos_per_class=8, val_per_class=4, classes=4)
    out = tmp_path / "run"
    model = ["--layers", "1", "--hid-dim", "64", "--heads", "2", "--clip-len", "2", "--frame-size", "32"]
    model += ["--vocab-size", str(VOCAB), "--nce-proj-hid-dim", "32", "--dropout", "0.0"]
    run = [
        "--deepspeed_config",
        "ds_configs/cpu.json",
        "--precision",
        "fp32",
        "--zero-stage",
        "0",
        "--num-workers",
        "0",
    ]
    run += ["--batch-size", "8", "--bs-per-gpu", "8", "--lr", "3e-3", "--warm-up", "0.1", "--data", str(db)]
    cmd = [*launcher("vimpac.finetune", 1), *run, *model, "--epochs", "12", "--eval-per-epochs", "6"]
    cmd += ["--last-test-clips", "1,2", "--output", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = {k: json.loads((out / "eval" / f"final_clips{k}.json").read_text()) for k in (1, 2)}
    assert json.loads((out / "eval" / "epoch005_clips1.json").read_text())["num_test_clips"] == 1
    assert json.loads((out / "run_config.json").read_text())["single_clip"] == "start"
    assert {record["single_clip"] for record in final.values()} == {"start"}  # K = 1 took each video's first clip
    for k, record in final.items():
        assert record["num_videos"] == 16 and record["num_test_clips"] == k and record["views"] == ["r32_center_f0"]
        assert len(record["predictions"]) == 16
        assert record["top1"] >= 0.75  # chance is 0.25
        assert set(record["per_class"]) == {f"class{c}" for c in range(4)}
    with safe_open(str(out / "export" / "model.safetensors"), "pt") as exported:
        assert exported.metadata()["producer"] == "vimpac.finetune"
        assert exported.metadata()["tokenizer_fingerprint"] == "0" * 16  # the training database's
    # the same schedule in two launches (--interval 5, then --resume) ends with the same curve and predictions
    chunked = tmp_path / "chunked"
    for extra in (["--interval", "5"], ["--resume"]):
        cmd = [*launcher("vimpac.finetune", 1), *run, *model, "--epochs", "12", "--eval-per-epochs", "6"]
        cmd += ["--last-test-clips", "1,2", "--output", str(chunked), *extra]
        result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_metrics(chunked) == read_metrics(out)
    resumed = json.loads((chunked / "eval" / "final_clips2.json").read_text())
    assert resumed["predictions"] == final[2]["predictions"] and resumed["loss"] == final[2]["loss"]
    # eval-only on the export reproduces the final evaluation
    cmd = [*launcher("vimpac.finetune", 1), *run, "--eval-only", "--load", str(out / "export")]
    cmd += ["--last-test-clips", "2", "--output", str(tmp_path / "eval")]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "eval" / "eval_only_clips2.json").read_text())
    # --last-test-clips adds to --num-test-clips (1 by default), as the original's extra evaluations
    assert json.loads((tmp_path / "eval" / "eval" / "eval_only_clips1.json").read_text())["top1"] == final[1]["top1"]
    assert again["predictions"] == final[2]["predictions"] and again["top1"] == final[2]["top1"]
    assert "training videos" not in result.stderr
    # scoring the training videos is allowed, but said to be no held-out score; a training batch larger than the
    # training split does not matter when nothing trains
    cmd += ["--eval-split", "train", "--output", str(tmp_path / "eval_train"), "--batch-size", "64"]
    cmd += ["--bs-per-gpu", "64"]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "32 of 32 evaluation videos (split 'train') are also training videos" in result.stderr
    # another clip length without --different-shape is refused with both shapes named
    cmd = [*launcher("vimpac.finetune", 1), *run, "--load", str(out / "export"), "--clip-len", "3"]
    cmd += ["--output", str(tmp_path / "bad")]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "(2, 4, 4)" in result.stderr and "(3, 4, 4)" in result.stderr


def test_finetune_runs_with_the_originals_optimizers_and_decay_groups(tmp_path):
    """--optim adam / sgd (ZeRO-2, as ds_configs/cpu.json) and --decay-groups original train and are recorded."""
    db = write_labeled(tmp_path / "db", videos_per_class=4, val_per_class=1, classes=2)
    model = ["--layers", "1", "--hid-dim", "64", "--heads", "2", "--clip-len", "2", "--frame-size", "32"]
    model += ["--vocab-size", str(VOCAB), "--nce-proj-hid-dim", "32"]
    run = ["--deepspeed_config", "ds_configs/cpu.json", "--precision", "fp32", "--num-workers", "0", "--data", str(db)]
    run += ["--batch-size", "4", "--bs-per-gpu", "4", "--epochs", "2", "--eval-per-epochs", "2"]
    for optim, kind in (("adam", "Adam"), ("sgd", "SGD")):
        out = tmp_path / optim
        cmd = [*launcher("vimpac.finetune", 1), *run, *model, "--optim", optim, "--decay-groups", "original"]
        result = subprocess.run(
            [*cmd, "--output", str(out)], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        recorded = json.loads((out / "run_config.json").read_text())
        assert recorded["deepspeed"]["optimizer"]["type"] == kind and recorded["args"]["decay_groups"] == "original"
        assert json.loads((out / "eval" / "final_clips1.json").read_text())["num_videos"] == 2


@pytest.mark.slow
def test_two_ranks_under_the_launcher_evaluate_every_video_once(tmp_path):
    """ZeRO-2 over 2 ranks (deepspeed launcher) and 1 plain process train the same global batches: the final
    evaluation of 9 videos (odd: the sampler pads rank 1) counts each once and predicts the same classes."""
    db = write_labeled(tmp_path / "db", videos_per_class=4, val_per_class=3, classes=3, views=("r32_center_f0",))
    model = ["--layers", "1", "--hid-dim", "64", "--heads", "2", "--clip-len", "2", "--frame-size", "32"]
    model += ["--vocab-size", str(VOCAB), "--nce-proj-hid-dim", "32", "--dropout", "0.0"]
    run = ["--deepspeed_config", "ds_configs/cpu.json", "--precision", "fp32", "--zero-stage", "2"]
    run += ["--num-workers", "0", "--batch-size", "4", "--bs-per-gpu", "2", "--lr", "3e-3", "--epochs", "3"]
    run += ["--data", str(db), "--last-test-clips", "2", *model]
    records = {}
    for ranks in (1, 2):
        out = tmp_path / f"run{ranks}"
        cmd = [*launcher("vimpac.finetune", ranks), *run, "--output", str(out)]
        result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        records[ranks] = json.loads((out / "eval" / "final_clips2.json").read_text())
    assert records[2]["world_size"] == 2 and records[2]["num_videos"] == 9 == len(records[2]["predictions"])
    assert records[2]["predictions"] == records[1]["predictions"]
    assert records[2]["loss"] == pytest.approx(records[1]["loss"], rel=1e-4)


def test_evaluation_chunks_halve_after_out_of_memory():
    torch.manual_seed(0)
    linear = torch.nn.Linear(3 * 2 * 2, 5)

    class SmallMemory(torch.nn.Module):
        """Raises CUDA's out-of-memory error for more than 3 clips at once."""

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, tokens):
            self.calls.append(len(tokens))
            if len(tokens) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return linear(tokens.flatten(1).float())

    tokens = torch.randint(0, 9, (10, 3, 2, 2))
    model = SmallMemory()
    logits, chunk = forward_in_chunks(model, tokens, 16)
    torch.testing.assert_close(logits, linear(tokens.flatten(1).float()))
    assert chunk == 2 and model.calls[:3] == [10, 8, 4]  # 16 → 8 → 4 fail, 2 works

    def never_fits(part):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):  # not even one clip fits: the error reaches the caller
        forward_in_chunks(never_fits, tokens, 4)
    # ZeRO-3 over several ranks: no rank may retry alone; the error names the size to pass instead.
    model = SmallMemory()
    with pytest.raises(torch.OutOfMemoryError, match="rerun with --eval-batch-size 8"):
        forward_in_chunks(model, tokens, 16, retry_smaller=False)
    assert model.calls == [10]


def test_clip_rates_of_training_and_evaluation_must_agree():
    assert check_same_clip_rate(8.0, 8.0, None) == 8.0
    assert check_same_clip_rate(16.0, 4.0, 2.0) == 2.0  # --frame-rate sets both (strides 8 and 2)
    with pytest.raises(UsageError, match=r"pass --frame-rate 4 \(it divides both\)"):
        check_same_clip_rate(8.0, 12.0, None)
    with pytest.raises(UsageError, match="pass a --frame-rate that divides both"):
        check_same_clip_rate(7.5, 2.0, None)


def test_finetuning_refuses_databases_whose_clips_run_at_other_rates(tmp_path, capsys, single_process_env):
    from vimpac import finetune

    slow = write_labeled(tmp_path / "db2", videos_per_class=2, val_per_class=1, classes=2)
    fast = write_labeled(tmp_path / "db8", videos_per_class=2, val_per_class=1, classes=2, fps=8)
    flags = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "2", "--deepspeed_config"]
    flags += ["ds_configs/cpu.json", "--num-workers", "0", "--output", str(tmp_path / "run")]
    assert finetune.main(["--data", str(fast), "--eval-data", str(slow), *flags]) == 2
    err = capsys.readouterr().err
    assert "the training database holds 8 fps and the evaluation database 2 fps" in err
    assert "pass --frame-rate 2 (it divides both)" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--last-dropout", "1.5"], "--last-dropout must be in [0, 1)"),
        (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
        (["--seed", "-1"], "--seed must be >= 0"),
    ],
)
def test_values_that_cannot_train_are_refused_before_anything_starts(tmp_path, capsys, flags, message):
    from vimpac.finetune import main

    assert main(["--data", str(tmp_path / "db"), "--output", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "run").exists()
