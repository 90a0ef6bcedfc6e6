"""--labels-per-class (the low-label regime): the stratified, seeded, order-independent choice of training videos,
its guard against evaluation videos, the few-labels warning, the repeats that fill a batch, the dataset on the
subset, the flag checks, and one short fine-tuning run on 2 videos per class."""

import json
import random
import subprocess
from collections import Counter

import pytest

from tests.helpers import REPO, environment, launcher
from tests.synthetic_codes import VOCAB, write_labeled
from vimpac import finetune
from vimpac.errors import UsageError
from vimpac.finetune_data import (
    FinetuneTrainClips,
    few_labels_warning,
    label_subset,
    shared_videos_warning,
    subset_repeats,
)


def _split(sizes: dict[int, int]) -> tuple[list[str], list[int]]:
    """(ids, labels) with sizes[c] videos of class c, ids "c{c}_v{i}"."""
    pairs = [(f"c{c}_v{i:03d}", c) for c, n in sizes.items() for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _classes(chosen: list[str]) -> Counter:
    return Counter(int(video.split("_")[0][1:]) for video in chosen)


# ------------------------------------------------------------------------------------------- the choice


def test_stratified_counts_are_min_of_n_and_available():
    ids, labels = _split({0: 10, 1: 7, 2: 3, 3: 1})
    for n in (1, 3, 5, 10, 50):
        chosen = label_subset(ids, labels, n, seed=0)
        assert _classes(chosen) == {c: min(n, size) for c, size in {0: 10, 1: 7, 2: 3, 3: 1}.items()}
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(ids)  # only training ids, each once
        assert chosen == sorted(chosen)


def test_deterministic_and_independent_of_input_order():
    ids, labels = _split({0: 20, 1: 20, 2: 20})
    reference = label_subset(ids, labels, 4, seed=7)
    assert label_subset(ids, labels, 4, seed=7) == reference
    pairs = list(zip(ids, labels))
    for shuffle_seed in range(5):
        random.Random(shuffle_seed).shuffle(pairs)
        assert label_subset([p[0] for p in pairs], [p[1] for p in pairs], 4, seed=7) == reference
    # per-class draws: dropping one class changes nothing in the others
    kept = [(i, lab) for i, lab in zip(ids, labels) if lab != 1]
    fewer = label_subset([p[0] for p in kept], [p[1] for p in kept], 4, seed=7)
    assert fewer == [v for v in reference if not v.startswith("c1_")]


def test_different_seeds_choose_different_subsets():
    ids, labels = _split({0: 30, 1: 30})
    subsets = {tuple(label_subset(ids, labels, 3, seed=s)) for s in range(6)}
    assert len(subsets) == 6  # C(30,3)² possible subsets: a collision would mean the seed is ignored
    assert all(_classes(list(s)) == {0: 3, 1: 3} for s in subsets)


def test_never_returns_evaluation_videos():
    ids, labels = _split({0: 8, 1: 8})
    eval_ids = [f"c{c}_v{i:03d}" for c in (0, 1) for i in range(100, 104)]  # disjoint, as in a sound database
    chosen = label_subset(ids, labels, 8, seed=1, eval_ids=eval_ids)
    assert not set(chosen) & set(eval_ids) and len(chosen) == 16
    with pytest.raises(UsageError, match="overlap"):  # a database whose splits share videos is refused
        label_subset(ids, labels, 8, seed=1, eval_ids=["c1_v003", *eval_ids])


def test_bad_arguments():
    ids, labels = _split({0: 4})
    for n in (0, -1):
        with pytest.raises(UsageError, match="--labels-per-class must be >= 1"):
            label_subset(ids, labels, n, seed=0)
    with pytest.raises(ValueError, match="more than once"):
        label_subset([*ids, ids[0]], [*labels, 0], 1, seed=0)
    with pytest.raises(ValueError):
        label_subset(ids, labels[:-1], 1, seed=0)


def test_short_classes_give_all_they_have_with_a_warning():
    ids, labels = _split({0: 5, 1: 2, 2: 5})
    chosen = label_subset(ids, labels, 3, seed=0)
    assert _classes(chosen) == {0: 3, 1: 2, 2: 3} and {"c1_v000", "c1_v001"} <= set(chosen)
    names = ["a", "b", "c", "d"]  # "d" has no training video at all
    warning = few_labels_warning(labels, 3, names, "train")
    assert warning.startswith("warning: --labels-per-class 3: 2 of 4 classes")
    assert "b (2)" in warning and "d (0)" in warning and "a (" not in warning
    assert few_labels_warning(labels, 2, names[:3], "train") is None


def test_videos_in_both_splits_are_named():
    assert shared_videos_warning(["a", "b"], ["c", "d"], "train", "val") is None
    warning = shared_videos_warning(["e", "a", "b", "c", "d"], ["d", "c", "b", "a", "x"], "train", "val")
    assert warning.startswith("warning: 4 of 5 evaluation videos (split 'val') are also training videos")
    assert "e.g. a, b, c, ...:" in warning


def test_repeats_fill_one_global_batch():
    assert subset_repeats(100, 64) == 1
    assert subset_repeats(64, 64) == 1
    assert subset_repeats(10, 64) == 7  # 70 >= 64: one step per epoch
    assert subset_repeats(1, 8) == 8
    for videos in range(1, 40):
        for world, micro, accumulation in ((1, 8, 1), (2, 4, 2), (3, 5, 1)):
            repeats = subset_repeats(videos, world * micro * accumulation)
            assert (videos * repeats) // world // micro // accumulation >= 1  # trainer.epoch_steps' arithmetic


# ---------------------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return write_labeled(tmp_path_factory.mktemp("subset") / "db", videos_per_class=5, val_per_class=2, classes=3)


def test_train_clips_on_a_subset(db, capsys, monkeypatch):
    views = ["r32_center_f0"]
    full = FinetuneTrainClips(db, "train", 2, pad_id=VOCAB, views=views, seed=5)
    eval_ids = [f"c{c}_v{i:02d}" for c in range(3) for i in (5, 6)]
    ds = FinetuneTrainClips(db, "train", 2, pad_id=VOCAB, views=views, seed=5, labels_per_class=2, eval_ids=eval_ids)
    assert full.split_videos == ds.split_videos == 15 and len(full) == 15 and len(ds) == 6
    assert ds.ids == label_subset(full.ids, full.labels, 2, 5)  # --labels-seed defaults to --seed
    assert ds.labels == [int(v[1]) for v in ds.ids] and Counter(ds.labels) == {0: 2, 1: 2, 2: 2}
    other = FinetuneTrainClips(db, "train", 2, pad_id=VOCAB, views=views, seed=5, labels_per_class=2, labels_seed=6)
    assert other.ids != ds.ids and other.seed == 5  # the choice moves, the clip draws keep --seed
    # repeats: index i is video i mod K, its copies drawing their own clip
    ds.repeats = 3
    assert len(ds) == 18
    for i in range(18):
        assert ds[(0, i)]["label"] == ds.labels[i % 6]
    assert capsys.readouterr().err == ""  # every class had 2
    FinetuneTrainClips(db, "train", 2, pad_id=VOCAB, views=views, labels_per_class=9)
    assert "3 of 3 classes have fewer training videos" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # the other ranks build the same set silently
    FinetuneTrainClips(db, "train", 2, pad_id=VOCAB, views=views, labels_per_class=9)
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="overlap"):
        FinetuneTrainClips(db, "train", 2, pad_id=VOCAB, views=views, labels_per_class=5, eval_ids=["c2_v04"])


def test_flag_checks_fail_before_any_work(capsys):
    base = ["--data", "unused", "--output", "unused"]
    assert finetune.main([*base, "--labels-per-class", "0"]) == 2
    assert "--labels-per-class must be >= 1" in capsys.readouterr().err
    assert finetune.main([*base, "--labels-seed", "3"]) == 2
    assert "pass --labels-per-class" in capsys.readouterr().err
    assert "--labels-per-class N" in finetune.build_parser().format_help()


# ------------------------------------------------------------------------------------------- end to end


def test_finetune_on_two_labels_per_class(tmp_path, db):
    """6 of 15 videos, batch 8: the subset is under one batch, so it is passed over twice per epoch (1 step)."""
    out = tmp_path / "run"
    cmd = [*launcher("vimpac.finetune", 1), "--deepspeed_config", "ds_configs/cpu.json", "--precision", "fp32"]
    cmd += ["--zero-stage", "0", "--num-workers", "0", "--batch-size", "8", "--bs-per-gpu", "8", "--data", str(db)]
    cmd += ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "2", "--frame-size", "32"]
    cmd += ["--vocab-size", str(VOCAB), "--nce-proj-hid-dim", "32", "--epochs", "2", "--output", str(out)]
    cmd += ["--labels-per-class", "2", "--labels-seed", "11"]
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training on 6 of 15 labeled videos (2 per class); each epoch passes over them 2 times" in result.stdout
    record = json.loads((out / "run_config.json").read_text())
    subset = record["label_subset"]
    assert subset["labels_per_class"] == 2 and subset["seed"] == 11 and subset["num_videos"] == 6
    assert subset["split_videos"] == 15 and subset["repeats_per_epoch"] == 2 and len(subset["ids"]) == 6
    assert record["steps_per_epoch"] == 1 and record["total_steps"] == 2
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in steps if "loss/train" in r) == [1, 2]  # an optimizer step in every epoch
    final = json.loads((out / "eval" / "final_clips1.json").read_text())
    assert final["num_videos"] == 6 and not set(final["predictions"]) & set(subset["ids"])  # evaluation unchanged
