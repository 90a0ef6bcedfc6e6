"""Frozen-feature probes (vimpac.probe, `vimpac probe`): hand-checkable separable and random-label cases for the
linear probe and kNN, more than two classes, the subsets, features against a clip-by-clip loop, the command on a
tiny labeled database (pre-trained and random models), its errors, and a 2-rank run under torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, environment
from tests.synthetic_codes import VOCAB, write_code_database, write_labeled
from vimpac import probe
from vimpac.checkpoint import export_weights
from vimpac.cli import main
from vimpac.code_db import CodeDatabaseWriter
from vimpac.commands import probe as probe_command
from vimpac.config import VimpacConfig
from vimpac.dist_setup import free_port
from vimpac.finetune import build_parser as finetune_parser
from vimpac.finetune_data import FinetuneTestClips, label_subset
from vimpac.modeling import VimpacBackbone, VimpacForPretraining
from vimpac.probe import (
    extract_features,
    fit_logistic_regression,
    knn_accuracy,
    linear_probe,
    nearest_neighbours,
    retrieval_queries,
    retrieval_recall,
    stratified_folds,
)

CONFIG = VimpacConfig(vocab_size=VOCAB, hidden_size=32, heads=2, layers=1, clip_len=3, grid=(4, 4), nce_proj_hid_dim=32)


def clusters(centres, per_class, spread, seed):
    """Gaussian clusters: features [C·per_class, D] around `centres` [C, D] (std `spread`), labels [C·per_class]."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.as_tensor(centres, dtype=torch.float32)
    x = centres.repeat_interleave(per_class, 0) + spread * torch.randn(
        len(centres) * per_class, centres.shape[1], generator=gen
    )
    return x, torch.arange(len(centres)).repeat_interleave(per_class)


# -------------------------------------------------------------------------------------------- the probes


def test_well_separated_clusters_are_classified_perfectly():
    centres = [[5.0] * 8, [-5.0] * 8]
    train_x, train_y = clusters(centres, 20, 1.0, seed=0)
    test_x, test_y = clusters(centres, 20, 1.0, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["accuracy"] == 1.0
    assert set(result["cv_accuracy"]) == {str(wd) for wd in probe.DEFAULT_WEIGHT_DECAYS}
    # Every penalty separates every fold: the tie goes to the strongest one.
    assert result["weight_decay"] == max(probe.DEFAULT_WEIGHT_DECAYS)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=5) == 1.0


def test_random_labels_give_chance_accuracy():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=gen), torch.randn(300, 16, generator=gen)
    train_y, test_y = torch.randint(0, 2, (300,), generator=gen), torch.randint(0, 2, (300,), generator=gen)
    # 300 test videos: the standard deviation of a chance accuracy is sqrt(0.25 / 300) ≈ 0.03.
    assert abs(linear_probe(train_x, train_y, test_x, test_y)["accuracy"] - 0.5) < 0.1
    assert abs(knn_accuracy(train_x, train_y, test_x, test_y, k=20) - 0.5) < 0.1


def test_linear_probe_separates_three_classes_on_a_line():
    """Classes at x = -3, 0 and 3 on the line y = 3: no single threshold separates the middle one, a softmax over
    three linear scores does (and the cosine kNN tells the directions apart)."""
    centres = [[-3.0, 3.0], [0.0, 3.0], [3.0, 3.0]]
    train_x, train_y = clusters(centres, 30, 0.3, seed=0)
    test_x, test_y = clusters(centres, 30, 0.3, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=[1e-4])
    assert result == {"accuracy": 1.0, "weight_decay": 1e-4, "cv_accuracy": None}
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=10, num_classes=3) == 1.0


def test_logistic_regression_reaches_the_optimum():
    """At the minimum the gradient of mean cross-entropy + λ/2·||W||² vanishes (checked independently)."""
    x, y = clusters([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], 10, 0.7, seed=2)
    x = x.double()
    weight, bias = fit_logistic_regression(x, y, 4, weight_decay=1e-2)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5e-2 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-6 and b.grad.abs().max() < 1e-6


def test_folds_are_stratified_disjoint_and_cover_every_scorable_video():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 6 + [3])
    folds = stratified_folds(labels, 5, seed=0)
    scored = sorted(i for fold in folds for i in fold)
    assert scored == list(range(19))  # every video once, except class 3's only one (it could not be fitted)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for fold in folds:  # no fold takes more than its share of a class, so every class stays in each fitting set
        counts = np.bincount(labels[fold].numpy(), minlength=4)
        assert counts[0] == 2 and counts[1] <= 1 and counts[2] <= 2 and counts[3] == 0
    assert stratified_folds(labels, 5, seed=0) == folds and stratified_folds(labels, 5, seed=1) != folds
    assert stratified_folds(torch.tensor([0, 1, 2]), 5) == []  # one video per class: nothing to score
    # ... so the linear probe falls back to a fixed penalty.
    x = torch.eye(3)
    assert linear_probe(x, torch.arange(3), x, torch.arange(3))["weight_decay"] == probe.FALLBACK_WEIGHT_DECAY


def test_cross_validated_accuracy_matches_fits_written_out_fold_by_fold():
    """A noisy two-class problem (accuracies differ by penalty): each penalty's score is the accuracy over all
    training videos, each predicted by a model fitted without its fold, and the best score picks the penalty."""
    gen = torch.Generator().manual_seed(0)
    n, noise = 40, 20

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(2).repeat(count // 2)
        return torch.cat(
            [y[:, None] + 0.5 * torch.randn(count, 1, generator=gen), torch.randn(count, noise, generator=gen)], 1
        ), y

    (train_x, train_y), (test_x, test_y) = sample(n), sample(400)
    decays = [1e-5, 1e-2, 1.0]
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=decays, seed=4)
    folds = stratified_folds(train_y, probe.DEFAULT_FOLDS, seed=4)
    expected = {}
    for wd in decays:
        correct = 0
        for fold in folds:
            rest = [i for i in range(n) if i not in fold]
            x_fit, x_held = probe.standardize(train_x[rest].double(), train_x[fold].double())
            weight, bias = fit_logistic_regression(x_fit, train_y[rest], 2, wd)
            correct += int(((x_held @ weight + bias).argmax(1) == train_y[fold]).sum())
        expected[str(wd)] = correct / n
    assert result["cv_accuracy"] == pytest.approx(expected)
    assert len(set(expected.values())) > 1
    assert result["weight_decay"] == max((acc, float(wd)) for wd, acc in expected.items())[1]


# ------------------------------------------------------------------------------------------------ features


def test_features_are_clip_means_of_cls_and_non_pad_token_means(tmp_path):
    """Two views × 2 clips per video, videos of 1-4 frames in clips of 3 (PAD-padded), against a loop over clips."""
    db = write_labeled(tmp_path / "db", 3, 0, 2, frames=4, views=("r32_top_f0", "r32_center_f0"))
    dataset = FinetuneTestClips(
        db, "train", 3, pad_id=CONFIG.pad_id, views=["r32_top_f0", "r32_center_f0"], num_clips=2
    )
    torch.manual_seed(0)
    backbone = VimpacBackbone(CONFIG).train()
    cls, mean = extract_features(backbone, dataset, pad_id=CONFIG.pad_id, clips_per_forward=5)
    assert backbone.training and cls.shape == mean.shape == (len(dataset), 32)
    backbone.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            clips = dataset[i]["tokens"]
            assert clips.shape[0] == 4
            expected_cls, expected_mean = [], []
            for clip in clips:
                c, hidden = backbone(clip[None])
                expected_cls.append(c[0])
                real = clip != CONFIG.pad_id
                expected_mean.append(hidden[0][real].mean(0))
            assert torch.allclose(cls[i], torch.stack(expected_cls).mean(0), atol=1e-5)
            assert torch.allclose(mean[i], torch.stack(expected_mean).mean(0), atol=1e-5)


# ------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A labeled database (4 classes, 6 train + 3 val videos each) and a 'pre-trained' export."""
    root = tmp_path_factory.mktemp("probe")
    db = write_labeled(root / "db", videos_per_class=6, val_per_class=3, frames=5)
    torch.manual_seed(1)
    export_weights(VimpacForPretraining(CONFIG).state_dict(), CONFIG, root / "run")
    return root, db


def test_cli_probes_the_pretrained_and_the_random_model(setup, tmp_path, capsys):
    root, db = setup
    out = tmp_path / "probe.json"
    argv = ["probe", "--model", str(root / "run"), "--data", str(db), "--device", "cpu", "--k", "5"]
    assert main([*argv, "--num-test-clips", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "kNN (k=5)" in printed and "random" in printed

    report = json.loads(out.read_text())
    assert set(report["results"]) == {"pretrained", "random"}
    for model in report["results"].values():
        assert set(model) == {"cls", "mean"}
        for feature in model.values():
            assert 0.0 <= feature["linear"]["accuracy"] <= 1.0 and 0.0 <= feature["knn"] <= 1.0
            assert feature["linear"]["weight_decay"] in probe.DEFAULT_WEIGHT_DECAYS
    # A class's videos share 13 of their 16 codes: even random features tell the classes apart.
    assert report["results"]["random"]["mean"]["knn"] >= 0.75
    assert (report["train_videos"], report["eval_videos"], report["num_classes"]) == (24, 12, 4)
    assert report["chance"] == 0.25 and report["majority_class_accuracy"] == 0.25
    settings = report["settings"]
    assert (settings["train_split"], settings["eval_split"], settings["num_test_clips"]) == ("train", "val", 2)
    assert settings["eval_views"] == ["r32_center_f0"] and settings["world_size"] == 1

    # The kNN number of the pre-trained model, recomputed from the exported backbone.
    backbone = probe_command.pretrained_backbone(root / "run" / "export", CONFIG)
    sets = [
        FinetuneTestClips(db, split, 3, pad_id=CONFIG.pad_id, views=["r32_center_f0"], num_clips=2)
        for split in ("train", "val")
    ]
    (train_cls, _), (val_cls, _) = (extract_features(backbone, s, pad_id=CONFIG.pad_id) for s in sets)
    knn = knn_accuracy(train_cls, sets[0].labels, val_cls, sets[1].labels, k=5, num_classes=4)
    assert report["results"]["pretrained"]["cls"]["knn"] == knn


def test_cli_subset_and_no_baseline(setup, tmp_path, capsys):
    root, db = setup
    out = tmp_path / "probe.json"
    argv = ["probe", "--model", str(root / "run" / "export"), "--data", str(db), "--device", "cpu"]
    argv += ["--labels-per-class", "2", "--no-random-baseline", "--weight-decays", "1e-3", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["pretrained"] and "random" not in capsys.readouterr().out
    assert report["train_videos"] == 8 and report["train_videos_per_class"] == {"min": 2, "max": 2}
    # The videos fine-tuning's --labels-per-class 2 trains on at its default --seed.
    train = FinetuneTestClips(db, "train", 3, pad_id=CONFIG.pad_id, views=["r32_center_f0"])
    expected = label_subset(train.ids, train.labels.tolist(), 2, finetune_parser().get_default("seed"))
    assert report["settings"]["label_subset"] == {"labels_per_class": 2, "seed": 9595, "ids": expected}
    assert report["results"]["pretrained"]["cls"]["linear"]["cv_accuracy"] is None


def test_cli_errors(setup, tmp_path, capsys):
    root, db = setup
    model = ["probe", "--model", str(root / "run")]
    assert main([*model, "--data", str(tmp_path / "nodb")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["probe", "--model", str(tmp_path / "nowhere"), "--data", str(db)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*model, "--data", str(db), "--eval-split", "nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err
    unlabeled = write_code_database(tmp_path / "unlabeled", videos=2, frames=2, grid=(4, 4))
    assert main([*model, "--data", str(unlabeled)]) == 2
    assert "lists no classes" in capsys.readouterr().err
    assert main([*model, "--data", str(db), "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
    # Scores that would say nothing: kNN finding each video itself, no second video to retrieve, one class.
    assert main([*model, "--data", str(db), "--eval-split", "train"]) == 2
    assert "24 of the 24 evaluation videos (split 'train') are also training videos" in capsys.readouterr().err
    lone = write_labeled(tmp_path / "lone", videos_per_class=2, val_per_class=1, classes=1, frames=5)
    assert main([*model, "--data", str(lone)]) == 2
    assert "has 1 video: retrieval needs two or more" in capsys.readouterr().err
    single = write_labeled(tmp_path / "single", videos_per_class=3, val_per_class=2, classes=1, frames=5)
    assert main([*model, "--data", str(single)]) == 2
    assert "hold one class: every probe would score 1.0" in capsys.readouterr().err

    config = VimpacConfig.from_dict({**CONFIG.to_dict(), "vocab_size": 32})
    export_weights(VimpacForPretraining(config).state_dict(), config, tmp_path / "run32")
    assert main(["probe", "--model", str(tmp_path / "run32"), "--data", str(db)]) == 2
    err = capsys.readouterr().err
    assert f"{VOCAB} codes" in err and "vocab_size 32" in err


def test_cli_help_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", "--help"])
    assert exit_info.value.code == 0
    assert "example:" in capsys.readouterr().out
    assert probe_command.DEFAULT_K == probe.DEFAULT_K
    assert probe_command.DEFAULT_TEMPERATURE == probe.DEFAULT_TEMPERATURE
    assert probe_command.DEFAULT_WEIGHT_DECAYS == probe.DEFAULT_WEIGHT_DECAYS
    assert finetune_parser().get_default("seed") == probe_command.FINETUNE_SEED


def write_noisy(path, noise, classes=3, train=5, val=3, frames=4):
    """A labeled database that is hard to classify: a video is its class pattern with `noise` of its 16 codes
    replaced at random (the same in every frame)."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, VOCAB, size=(classes, 4, 4))
    manifest = {
        "dataset": "synthetic",
        "fps": 2,
        "frame_size": 32,
        "grid": [4, 4],
        "tokenizer": {"name": "synthetic", "vocab_size": VOCAB, "fingerprint": "0" * 16},
        "views": ["r32_center_f0"],
        "classes": [f"class{c}" for c in range(classes)],
    }
    splits = {"train": [], "val": []}
    with CodeDatabaseWriter(path, manifest) as writer:
        for c in range(classes):
            for i in range(train + val):
                base = patterns[c].copy()
                base.flat[rng.choice(16, noise, replace=False)] = rng.integers(0, VOCAB, noise)
                codes = np.repeat(base[None], frames, 0).astype(np.int16)
                writer.add(f"c{c}_v{i:02d}", {"r32_center_f0": codes}, label=c, duration=frames / 2, fps=2.0)
                splits["train" if i < train else "val"].append(f"c{c}_v{i:02d}")
        writer.finalize(splits)
    return path


def test_two_ranks_under_torchrun_give_the_single_process_numbers(setup, tmp_path):
    """15 training and 9 validation videos (odd: rank 1 repeats one) over 2 ranks: each rank embeds its share,
    rank 0 fits the probes on the gathered features and gets the numbers of the plain run."""
    root, _ = setup
    db = write_noisy(tmp_path / "db", noise=13)
    flags = ["--model", str(root / "run"), "--data", str(db), "--device", "cpu", "--k", "5", "--seed", "3"]
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["probe", *flags, "--out", str(single)]) == 0
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port"]
    command = [*torchrun, str(free_port()), "-m", "vimpac.cli", "probe", *flags, "--out", str(double)]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["settings"].pop("world_size") == 2 and one["settings"].pop("world_size") == 1
    assert two["settings"] == one["settings"] and two["results"] == one["results"]


def test_retrieval_recall_on_separable_clusters_and_against_brute_force():
    x, y = clusters(torch.eye(3) * 10, per_class=4, spread=0.1, seed=0)
    assert retrieval_recall(x, y) == {1: 1.0, 5: 1.0}  # every nearest neighbour shares the class
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    got = retrieval_recall(x, y, ks=(1, 3))
    for k in (1, 3):
        hits = 0
        for i in range(len(x)):
            others = [j for j in range(len(x)) if j != i]
            sims = [float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)) for j in others]
            top = [others[n] for n in sorted(range(len(others)), key=lambda n: -sims[n])[:k]]
            hits += any(int(y[j]) == int(y[i]) for j in top)
        assert got[k] == pytest.approx(hits / len(x))
    with pytest.raises(ValueError, match="at least two"):
        retrieval_recall(x[:1], y[:1])


def test_nearest_neighbours_match_brute_force_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(25, 6)).astype(np.float32)
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sim = unit @ unit.T
    for k in (1, 3, 24, 40):  # 40: capped at the 24 other videos
        index, similarity = nearest_neighbours(torch.from_numpy(x), k)
        assert index.shape == similarity.shape == (25, min(k, 24)) and index.dtype == torch.int64
        for i in range(25):
            others = [j for j in range(25) if j != i]
            expected = sorted(others, key=lambda j: -sim[i, j])[: min(k, 24)]
            assert index[i].tolist() == expected  # never itself, most similar first
            np.testing.assert_allclose(similarity[i].numpy(), sim[i, expected], rtol=0, atol=1e-12)
    for bad, k in ((torch.zeros(1, 4), 1), (torch.zeros(3), 1), (torch.zeros(3, 4), 0)):
        with pytest.raises(ValueError):
            nearest_neighbours(bad, k)


def test_retrieval_queries_cover_the_classes_in_turn():
    y = torch.tensor([2, 0, 2, 1, 0, 2])
    assert retrieval_queries(y, 3) == [1, 3, 0]  # the first video of classes 0, 1, 2
    assert retrieval_queries(y, 5) == [1, 3, 0, 4, 2]  # then the second of each class that has one
    assert retrieval_queries(y, 10) == [1, 3, 0, 4, 2, 5] and retrieval_queries(y, 0) == []
