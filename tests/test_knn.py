"""The kNN monitor (vimpac.knn): scoring against a brute-force loop, exactly-once sharding, clip selection, the
real all-gather over two gloo ranks, the trainer hook, and the command-line refusals."""

import argparse
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.synthetic_codes import FRAME_SIZE, GRID, VIEW, VOCAB, write_code_database
from vimpac.code_db import CodeDatabaseWriter
from vimpac.config import VimpacConfig
from vimpac.data import PretrainClips
from vimpac.errors import UsageError
from vimpac.knn import (
    KnnClips,
    KnnMonitor,
    add_knn_arguments,
    extract_features,
    knn_monitor_from_args,
    knn_predict,
    topk_accuracy,
)
from vimpac.modeling import VimpacBackbone
from vimpac.pretrain_setup import PretrainTask
from vimpac.sharded_eval import assemble_shards, shard_positions
from vimpac.trainer import Trainer, TrainSettings

CLASSES = ["a", "b", "c"]
# A wide initialisation: at the default 0.02 a random 1-layer CLS barely depends on its input (cosine ~1.0000
# between any two videos), so neighbours would be near-ties decided by rounding.
CONFIG = VimpacConfig(
    vocab_size=VOCAB, hidden_size=32, heads=2, layers=1, clip_len=3, grid=GRID, dropout=0.1, initializer_range=0.5
)


def write_labeled_database(path: Path, per_class: int = 6, seed: int = 0) -> Path:
    """Class c: one base pattern per class with a few positions changed per video; frame f adds f to every code
    (so a clip's first frame tells its start). Videos have 2..9 frames (2 < clip_len: PAD). Splits "train" (2/3)
    and "val" (1/3)."""
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, VOCAB, size=(len(CLASSES), *GRID))
    manifest = {
        "dataset": "synthetic-labeled",
        "fps": 2,
        "frame_size": FRAME_SIZE,
        "grid": list(GRID),
        "tokenizer": {"name": "synthetic", "vocab_size": VOCAB, "fingerprint": "0" * 16},
        "views": [VIEW],
        "classes": CLASSES,
    }
    ids = {"train": [], "val": []}
    with CodeDatabaseWriter(path, manifest) as writer:
        for label in range(len(CLASSES)):
            for j in range(per_class):
                video_id = f"c{label}_v{j:02d}"
                pattern = bases[label].copy()
                pattern[rng.random(GRID) < 0.2] = rng.integers(0, VOCAB)
                frames = int(rng.integers(2, 10))
                codes = (pattern[None] + np.arange(frames)[:, None, None]) % VOCAB
                writer.add(video_id, {VIEW: codes.astype(np.int16)}, label=label, duration=frames / 2, fps=2.0)
                ids["val" if j % 3 == 2 else "train"].append(video_id)
        writer.finalize(ids)
    return path


@pytest.fixture(scope="module")
def labeled_db(tmp_path_factory):
    return write_labeled_database(tmp_path_factory.mktemp("knn") / "db")


def clips(db, split, seed=5):
    return KnnClips(db, split, CONFIG.clip_len, pad_id=CONFIG.pad_id, seed=seed)


def backbone(seed=0):
    torch.manual_seed(seed)
    return VimpacBackbone(CONFIG)


# ----------------------------------------------------------------------------------------------- scoring


def brute_force(queries, bank, labels, num_classes, k, t):
    """Per-query loop in float64: normalise, sort all similarities, vote exp(sim / t) for the k first."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        sims = [float(np.dot(query, row)) for row in bank]
        for j in sorted(range(len(bank)), key=lambda j: -sims[j])[: min(k, len(bank))]:
            out[q, labels[j]] += np.exp(sims[j] / t)
        out[q] /= out[q].sum()
    return out


@pytest.mark.parametrize(
    ("n", "k", "t", "weights"),
    [
        (50, 10, 0.07, None),
        (50, 50, 5.0, None),  # k = N: every bank entry votes (a high t, so the farthest ones count)
        (12, 200, 5.0, None),  # k > N: clamped to N
        (30, 29, 5.0, None),  # k = N - 1: all but the farthest
        (12, 200, 0.07, None),
        (80, 20, 0.5, [0.85, 0.05, 0.05, 0.05]),  # imbalanced bank
        (40, 15, 0.005, [0.1, 0.9, 0, 0]),  # exp(1/t) overflows fp32 without the max subtraction; empty classes
    ],
)
def test_knn_predict_matches_a_brute_force_loop(n, k, t, weights):
    rng = np.random.default_rng(n + k)
    queries, bank = rng.normal(size=(7, 6)), rng.normal(size=(n, 6)) * rng.uniform(0.1, 5, size=(n, 1))
    labels = rng.choice(4, size=n, p=weights)
    expected = brute_force(queries, bank, labels, 4, k, t)
    got = knn_predict(torch.tensor(queries), torch.tensor(bank, dtype=torch.float32), torch.tensor(labels), 4, k, t)
    assert got.shape == (7, 4) and torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-4, atol=1e-6)
    # Chunking the queries changes nothing.
    chunked = knn_predict(torch.tensor(queries), torch.tensor(bank), torch.tensor(labels), 4, k, t, chunk=3)
    np.testing.assert_allclose(chunked.numpy(), got.numpy(), rtol=1e-5, atol=1e-7)


def test_duplicated_bank_rows_all_vote_when_k_covers_the_bank():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    probs = knn_predict(torch.tensor([[2.0, 0.0]]), bank, labels, 3, k=4, temperature=1.0)
    w_same, w_other = np.exp(1.0), np.exp(0.0)
    total = 3 * w_same + w_other
    np.testing.assert_allclose(probs[0].numpy(), [w_same / total, 2 * w_same / total, w_other / total], rtol=1e-6)


def test_topk_accuracy_against_a_loop():
    rng = np.random.default_rng(3)
    scores, labels = rng.random((40, 7)), rng.integers(0, 7, size=40)
    got = topk_accuracy(torch.tensor(scores), torch.tensor(labels), (1, 3, 5))
    for k in (1, 3, 5):
        expected = np.mean([labels[i] in np.argsort(-scores[i])[:k] for i in range(40)])
        assert got[k] == pytest.approx(expected)
    assert topk_accuracy(torch.tensor([[0.2, 0.8]]), torch.tensor([0]), (1, 5)) == {1: 0.0, 5: 1.0}  # k clamped


def test_class_separable_features_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    bank_labels = np.concatenate([np.full(count, c) for c, count in enumerate([150, 3, 40, 8, 60, 5, 20, 9, 30, 2])])
    bank = centres[bank_labels] + 0.05 * rng.normal(size=(len(bank_labels), 64))
    query_labels = rng.integers(0, 10, size=100)
    queries = centres[query_labels] + 0.05 * rng.normal(size=(100, 64))
    probs = knn_predict(torch.tensor(queries), torch.tensor(bank), torch.tensor(bank_labels), 10)  # k=200, t=0.07
    assert topk_accuracy(probs, torch.tensor(query_labels)) == {1: 1.0, 5: 1.0}
    # Random labels on the same features: about chance.
    shuffled = rng.permutation(bank_labels)
    probs = knn_predict(torch.tensor(queries), torch.tensor(bank), torch.tensor(shuffled), 10)
    assert topk_accuracy(probs, torch.tensor(query_labels))[1] < 0.6


# -------------------------------------------------------------------------------------- exactly once


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 13])
def test_shards_cover_every_item_exactly_once(n, world):
    shards = [shard_positions(n, rank, world) for rank in range(world)]
    assert len({len(p) for p, _ in shards}) == 1, "every rank does the same number of forward passes"
    owned = sorted(int(p) for positions, valid in shards for p in positions[valid])
    assert owned == list(range(n))
    assert all(0 <= p < n for positions, _ in shards for p in positions), "padding repeats a real item"
    # What all_gather returns: [world, L] and [world, L, D]; features encode the item they belong to.
    positions = torch.tensor(np.stack([p for p, _ in shards]))
    valid = torch.tensor(np.stack([v for _, v in shards]))
    feats = torch.stack([positions.float(), -positions.float()], dim=-1)
    result = assemble_shards(positions, valid, feats, n)
    assert result[:, 0].tolist() == list(range(n)) and result[:, 1].tolist() == [-i for i in range(n)]


def test_assembly_refuses_missing_or_duplicated_items():
    positions, valid = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[True, True], [True, False]])
    feats = torch.zeros(2, 2, 1)
    assert assemble_shards(positions, valid, feats, 3).shape == (3, 1)
    with pytest.raises(RuntimeError, match="1 missing"):
        assemble_shards(positions, valid, feats, 4)
    with pytest.raises(RuntimeError):
        assemble_shards(positions, torch.ones(2, 2, dtype=torch.bool), feats, 3)  # item 0 twice


# ----------------------------------------------------------------------------------- clips and features


def test_clips_are_seeded_random_starts_of_the_centre_view(labeled_db):
    data = clips(labeled_db, "train")
    assert data.view == VIEW and data.num_classes == 3 and len(data) == 12
    assert data.labels.tolist() == [int(i[1]) for i in data.ids]  # ids are c<label>_v..
    starts = []
    for index in range(len(data)):
        codes, _ = data.db.read(data.ids[index], VIEW)
        item = data[index]
        start = int((item["tokens"][0, 0, 0] - codes[0, 0, 0]) % VOCAB)  # frame f adds f to every code
        frames = codes.shape[0]
        assert 0 <= start <= max(frames - CONFIG.clip_len, 0)
        pad = np.full(GRID, CONFIG.pad_id)
        expected = [(codes[0] + f) % VOCAB if f < frames else pad for f in range(start, start + 3)]
        np.testing.assert_array_equal(item["tokens"].numpy(), np.stack(expected))
        assert torch.equal(item["tokens"], data[index]["tokens"]), "the same clip every time"
        starts.append(start)
    assert len(set(starts)) > 1, "starts are drawn, not fixed"
    other = [clips(labeled_db, "train", seed=6)[i]["tokens"] for i in range(len(data))]
    assert any(not torch.equal(a, data[i]["tokens"]) for i, a in enumerate(other)), "the seed matters"


def test_extract_features_is_the_eval_mode_cls_of_each_item_in_order(labeled_db):
    data, model = clips(labeled_db, "val"), backbone().train()
    feats = extract_features(model, data, "cpu", batch_size=3)
    assert model.training, "mode restored"
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(data[i]["tokens"][None])[0] for i in range(len(data))])
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)


def _gather_worker(rank, world, init_file, db, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    feats = extract_features(backbone(), clips(db, "train"), "cpu", rank, world, batch_size=2)
    if rank == 0:
        torch.save(feats, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 5])  # 12 videos: even shards, and shards padded with repeats
def test_all_gather_over_real_ranks_equals_one_process(labeled_db, tmp_path, world):
    out = tmp_path / "feats.pt"
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(labeled_db), str(out)), nprocs=world)
    expected = extract_features(backbone(), clips(labeled_db, "train"), "cpu", batch_size=2)
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ trainer hook


def test_trainer_evaluates_every_n_epochs_and_at_the_end(labeled_db, tmp_path):
    monitor = KnnMonitor(clips(labeled_db, "train"), clips(labeled_db, "val"), k=4, batch_size=5)
    model = backbone()
    engine = SimpleNamespace(module=SimpleNamespace(backbone=model), device=torch.device("cpu"))
    dataset = PretrainClips(labeled_db, "train", 3, pad_id=CONFIG.pad_id, mask_id=CONFIG.mask_id, mask_blocks=1)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2}
    ds.update(zero_optimization={"stage": 0}, fp16={"enabled": False}, bf16={"enabled": False})
    settings = TrainSettings(epochs=5, eval_every=2)
    trainer = Trainer(engine, CONFIG, dataset, settings, tmp_path, ds, PretrainTask(knn=monitor))
    assert [e for e in range(5) if trainer.evaluation_epoch(e)] == [1, 3, 4]
    assert trainer.evaluate(0) == {} and trainer.evaluate(2) == {}
    values = trainer.evaluate(3)
    # Independently: eval-mode CLS of every clip, scored by the brute-force loop.
    model.eval()
    with torch.no_grad():
        bank = torch.cat([model(monitor.train[i]["tokens"][None])[0] for i in range(len(monitor.train))])
        queries = torch.cat([model(monitor.val[i]["tokens"][None])[0] for i in range(len(monitor.val))])
    probs = brute_force(queries.numpy(), bank.numpy(), monitor.train.labels.numpy(), 3, 4, 0.07)
    truth = monitor.val.labels.numpy()
    assert values["knn/top1"] == pytest.approx(np.mean(probs.argmax(1) == truth))
    assert values["knn/top5"] == 1.0  # 3 classes
    trainer.writer.close()
    assert PretrainTask().knn is None  # off by default


# ------------------------------------------------------------------------------------------ command line


def parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=9595)
    add_knn_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_build_the_monitor_or_refuse_clearly(labeled_db, tmp_path):
    assert knn_monitor_from_args(parse(), CONFIG) is None
    monitor = knn_monitor_from_args(parse("--knn-monitor", str(labeled_db), "--knn-k", "7"), CONFIG)
    assert (len(monitor.train), len(monitor.val), monitor.k, monitor.temperature) == (12, 6, 7, 0.07)
    assert monitor.train.seed == 9595 and monitor.train.view == VIEW
    with pytest.raises(UsageError, match="--eval-per-epochs must be >= 1"):
        knn_monitor_from_args(parse("--eval-per-epochs", "0"), CONFIG)
    with pytest.raises(UsageError, match=r"unknown split 'test_1'.*valid splits: train, val"):
        knn_monitor_from_args(parse("--knn-monitor", str(labeled_db), "--knn-val-split", "test_1"), CONFIG)
    with pytest.raises(UsageError, match=r"12 videos are in both --knn-train-split 'train' .*find itself"):
        knn_monitor_from_args(parse("--knn-monitor", str(labeled_db), "--knn-val-split", "train"), CONFIG)
    unlabeled = write_code_database(tmp_path / "unlabeled", videos=4)
    with pytest.raises(UsageError, match="needs a labeled database"):
        knn_monitor_from_args(parse("--knn-monitor", str(unlabeled), "--knn-val-split", "train"), CONFIG)
    wrong_grid = VimpacConfig(vocab_size=VOCAB, hidden_size=32, heads=2, layers=1, clip_len=3, grid=(8, 8))
    with pytest.raises(UsageError, match=r"--knn-monitor .*--frame-size 32"):
        knn_monitor_from_args(parse("--knn-monitor", str(labeled_db)), wrong_grid)


# ------------------------------------------------------------------------------------------ end to end


def _pretrain_has_knn_flags() -> bool:
    from vimpac.pretrain import build_parser

    return "--knn-monitor" in build_parser().format_help()


@pytest.mark.skipif(not _pretrain_has_knn_flags(), reason="vimpac/pretrain.py does not add add_knn_arguments yet")
def test_pretraining_logs_knn_accuracy_without_changing_the_losses(labeled_db, tmp_path):
    from tests.helpers import LOSSES, REPO, environment, launcher
    from vimpac.metrics import read_metrics

    model = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "3", "--nce-proj-hid-dim", "32"]
    model += ["--vocab-size", str(VOCAB), "--frame-size", str(FRAME_SIZE), "--mask-blocks", "1"]
    run = ["--deepspeed_config", "ds_configs/cpu.json", "--batch-size", "4", "--bs-per-gpu", "2", "--epochs", "3"]
    run += ["--num-workers", "0", "--zero-stage", "0", "--data", str(labeled_db)]
    curves = {}
    for name, extra in (("plain", []), ("knn", ["--knn-monitor", str(labeled_db), "--eval-per-epochs", "2"])):
        argv = [*launcher("vimpac.pretrain", 1), *model, *run, "--output", str(tmp_path / name), *extra]
        result = subprocess.run(argv, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        curves[name] = read_metrics(tmp_path / name)
    assert sorted(curves["knn"]) == list(range(1, 10))  # 12 videos / 4 per step = 3 steps per epoch
    for step, record in curves["knn"].items():
        for loss in LOSSES:
            assert record[loss] == curves["plain"][step][loss], (step, loss)  # the monitor disturbs nothing
    evaluated = [s for s, r in curves["knn"].items() if "knn/top1" in r]
    assert evaluated == [6, 9]  # end of epoch 1 (every 2nd) and of the last epoch
    for step in evaluated:
        top1, top5 = curves["knn"][step]["knn/top1"], curves["knn"][step]["knn/top5"]
        assert 0 <= top1 <= 1 and top5 == 1.0  # 3 classes
        assert top1 * 6 == pytest.approx(round(top1 * 6))  # a count out of the 6 queries


@pytest.mark.skipif(not _pretrain_has_knn_flags(), reason="vimpac/pretrain.py does not add add_knn_arguments yet")
def test_two_ranks_under_zero3_report_what_the_exported_model_scores(labeled_db, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import REPO, environment, launcher
    from vimpac.metrics import read_metrics
    from vimpac.modeling import VimpacForPretraining

    model = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "3", "--nce-proj-hid-dim", "32"]
    model += ["--vocab-size", str(VOCAB), "--frame-size", str(FRAME_SIZE), "--mask-blocks", "1"]
    run = ["--deepspeed_config", "ds_configs/cpu.json", "--batch-size", "4", "--bs-per-gpu", "2", "--epochs", "2"]
    run += ["--num-workers", "0", "--zero-stage", "3", "--data", str(labeled_db), "--output", str(tmp_path / "run")]
    run += ["--knn-monitor", str(labeled_db), "--knn-k", "5", "--knn-batch-size", "4", "--lr", "1e-2"]
    argv = [*launcher("vimpac.pretrain", 2), *model, *run]
    result = subprocess.run(argv, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = read_metrics(tmp_path / "run")[6]  # 12 videos / 4 = 3 steps per epoch
    export = tmp_path / "run" / "export"
    net = VimpacForPretraining(VimpacConfig.load(export / "config.json"))
    net.load_state_dict(load_file(export / "model.safetensors"))
    monitor = knn_monitor_from_args(parse("--knn-monitor", str(labeled_db), "--knn-k", "5"), CONFIG)
    assert monitor.train.seed == 9595  # the run's default seed: the same clips
    bank = extract_features(net.backbone, monitor.train, "cpu")
    queries = extract_features(net.backbone, monitor.val, "cpu")
    probs = brute_force(queries.numpy(), bank.numpy(), monitor.train.labels.numpy(), 3, 5, 0.07)
    assert last["knn/top1"] == pytest.approx(np.mean(probs.argmax(1) == monitor.val.labels.numpy()))
