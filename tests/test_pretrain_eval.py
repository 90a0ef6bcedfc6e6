"""Held-out pre-training evaluation (vimpac.pretrain_eval, `vimpac pretrain-eval`): the nearest-visible copy against
a brute-force loop, the most frequent code against collections.Counter, every number of the evaluation against an
independent recomputation, an oracle model, and the command line."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from tests.synthetic_codes import GRID, VIEW, VOCAB, write_code_database
from vimpac.checkpoint import export_weights
from vimpac.cli import main
from vimpac.code_db import CodeDatabase, CodeDatabaseWriter
from vimpac.config import VimpacConfig
from vimpac.data import PretrainClips
from vimpac.errors import UsageError
from vimpac.modeling import VimpacForClassification, VimpacForPretraining
from vimpac.pretrain_eval import (
    evaluate_pretraining,
    format_report,
    load_pretrained,
    most_frequent_code,
    nearest_visible_copy,
)

CONFIG = VimpacConfig(
    vocab_size=VOCAB, hidden_size=32, heads=2, layers=1, clip_len=3, grid=GRID, nce_proj_hid_dim=32, nce_dim=16
)
VIEWS = ["a", "b"]


def write_database(path, videos, splits, grid=GRID, views=VIEWS):
    """A database of the given {id: {view: codes [F, h, w]}} and splits."""
    manifest = {
        "dataset": "test",
        "fps": 2,
        "frame_size": grid[0] * 8,
        "grid": list(grid),
        "tokenizer": {"name": "test", "vocab_size": VOCAB, "fingerprint": "0" * 16},
        "views": views,
        "classes": [],
    }
    with CodeDatabaseWriter(path, manifest) as writer:
        for video_id, codes in videos.items():
            frames = next(iter(codes.values())).shape[0]
            writer.add(video_id, codes, label=-1, duration=frames / 2, fps=2.0)
        writer.finalize(splits)
    return path


@pytest.fixture(scope="module")
def random_db(tmp_path_factory):
    """Independent random codes per frame and view; 1..6 frames, so clips of 3 are often PAD-padded."""
    rng = np.random.default_rng(1)
    videos = {}
    for i in range(10):
        frames = int(rng.integers(1, 7))
        videos[f"v{i:02d}"] = {view: rng.integers(0, VOCAB, size=(frames, *GRID)).astype(np.int16) for view in VIEWS}
    ids = sorted(videos)
    return write_database(tmp_path_factory.mktemp("eval") / "db", videos, {"train": ids, "test": ids[:4]})


# ------------------------------------------------------------------------------------- nearest visible copy


def brute_force_copy(tokens, predict, visible):
    """Per predicted position, scan the visible ones in flat order keeping the first strictly nearer one.
    Returns (prediction [T, h, w], number of predicted positions with several nearest candidates)."""
    tokens, predict, visible = tokens.tolist(), predict.tolist(), visible.tolist()
    shape = (len(tokens), len(tokens[0]), len(tokens[0][0]))
    cells = [(t, y, x) for t in range(shape[0]) for y in range(shape[1]) for x in range(shape[2])]
    out = [[list(row) for row in frame] for frame in tokens]
    ties = 0
    for t, y, x in cells:
        if not predict[t][y][x]:
            continue
        best, best_distance, candidates = -1, math.inf, 0
        for q in cells:
            if not visible[q[0]][q[1]][q[2]]:
                continue
            distance = math.dist((t, y, x), q)
            if distance < best_distance:
                best, best_distance, candidates = tokens[q[0]][q[1]][q[2]], distance, 1
            elif distance == best_distance:
                candidates += 1
        out[t][y][x] = best
        ties += candidates > 1
    return torch.tensor(out, dtype=torch.int64), ties


def test_nearest_visible_copy_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    ties = 0
    for trial in range(24):
        shape = tuple(int(n) for n in torch.randint(1, 6, (3,), generator=gen))
        tokens = torch.randint(0, 50, shape, generator=gen)
        predict = torch.rand(shape, generator=gen) < 0.5
        # Sparse visible sets make equidistant candidates common; trial 0 has none at all.
        visible = torch.rand(shape, generator=gen) < (0.0 if trial == 0 else 0.3)
        if trial % 2:
            visible &= ~predict
        expected, trial_ties = brute_force_copy(tokens, predict, visible)
        ties += trial_ties
        assert torch.equal(nearest_visible_copy(tokens, predict, visible), expected), trial
    assert ties > 10


def test_nearest_visible_copy_without_visible_positions_predicts_minus_one():
    tokens = torch.arange(12).view(1, 3, 4)
    predict = torch.zeros(1, 3, 4, dtype=torch.bool)
    predict[0, 1, 2] = True
    got = nearest_visible_copy(tokens, predict, torch.zeros_like(predict))
    assert got[0, 1, 2] == -1
    assert torch.equal(got[~predict], tokens[~predict])


# ---------------------------------------------------------------------------------------- most frequent code


def counter_answer(db, ids, views):
    counts = Counter()
    for video_id in ids:
        for view in views:
            counts.update(db.read(video_id, view)[0].ravel().tolist())
    top = max(counts.values())
    return min(code for code, n in counts.items() if n == top)


def test_most_frequent_code_matches_counter(tmp_path, random_db):
    path = write_code_database(tmp_path / "synthetic", videos=6, frames=3)
    db = CodeDatabase(path)
    expected = counter_answer(db, db.ids(), [VIEW])
    assert most_frequent_code(db) == most_frequent_code(path, "train", [VIEW]) == expected

    db = CodeDatabase(random_db)
    for split, views in ((None, None), ("test", ["b"]), ("test", ["a"])):
        assert most_frequent_code(db, split, views) == counter_answer(db, db.ids(split), views or VIEWS)


def test_most_frequent_code_breaks_ties_towards_the_smallest_code(tmp_path):
    codes = np.array([[[7, 3], [5, 7]], [[3, 9], [9, 1]]], dtype=np.int16)  # 3, 7 and 9 twice each
    path = write_database(tmp_path / "tie", {"v": {VIEW: codes}}, {"train": ["v"]}, grid=(2, 2), views=[VIEW])
    assert most_frequent_code(path) == 3


# ---------------------------------------------------------------------------------------------- evaluation


def clips(db, mask_blocks=2, seed=3, split="train", relevance_range=None):
    return PretrainClips(
        db,
        split,
        CONFIG.clip_len,
        pad_id=CONFIG.pad_id,
        mask_id=CONFIG.mask_id,
        mask_blocks=mask_blocks,
        seed=seed,
        relevance_range=relevance_range,
    )


def random_model(seed=0):
    torch.manual_seed(seed)
    return VimpacForPretraining(CONFIG)


def brute_force_contrastive_accuracy(z1, z2):
    """Fraction of the 2B clips whose other clip beats every remaining clip of the batch (cosine similarity)."""
    rows = [row / row.norm() for row in torch.cat([z1, z2])]
    videos = len(z1)
    correct = 0
    for a, anchor in enumerate(rows):
        positive = (a + videos) % len(rows)
        others = [float(anchor @ row) for b, row in enumerate(rows) if b not in (a, positive)]
        correct += float(anchor @ rows[positive]) > max(others)
    return correct / len(rows)


def test_evaluation_matches_an_independent_recomputation(random_db):
    dataset = clips(random_db)
    model = random_model()
    model.train()
    frequent = most_frequent_code(random_db, "train")
    result = evaluate_pretraining(model, dataset, batch_size=4, frequent_code=frequent)
    assert model.training

    model.eval()
    masked = frequent_hits = copy_hits = model_hits = 0
    z1, z2 = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            inputs, labels = item["inputs"], item["labels"]
            for clip in range(2):
                predict = labels[clip] != -100
                visible = ~predict & (inputs[clip] != CONFIG.pad_id)
                copy, _ = brute_force_copy(inputs[clip], predict, visible)
                masked += int(predict.sum())
                frequent_hits += int((labels[clip][predict] == frequent).sum())
                copy_hits += int((copy[predict] == labels[clip][predict]).sum())
            out = model(inputs, labels)
            model_hits += int((out["mlm_logits"][:, :VOCAB].argmax(1) == out["mlm_labels"]).sum())
            z1.append(out["nce"][0])
            z2.append(out["nce"][1])
    full_batches = [
        brute_force_contrastive_accuracy(torch.stack(z1[s : s + 4]), torch.stack(z2[s : s + 4])) for s in (0, 4)
    ]

    assert masked > 0 and copy_hits > 0
    assert result["masked_positions"] == masked
    assert result["most_frequent_code"] == frequent
    assert result["most_frequent_accuracy"] == frequent_hits / masked
    assert result["nearest_copy_accuracy"] == copy_hits / masked
    assert result["mlm_accuracy"] == model_hits / masked
    assert result["contrastive_accuracy"] == pytest.approx(sum(full_batches) / 2)
    assert result["contrastive_chance"] == pytest.approx(1 / 7)
    assert (result["videos"], result["batch_size"]) == (10, 4)

    larger = evaluate_pretraining(model, dataset, batch_size=16, frequent_code=frequent)
    assert larger["masked_positions"] == masked and larger["mlm_accuracy"] == result["mlm_accuracy"]
    assert larger["contrastive_accuracy"] is None and larger["contrastive_chance"] is None
    assert "n/a" in format_report(larger)


def test_the_copy_baseline_never_copies_padding(tmp_path):
    """Constant videos of 1-2 frames in clips of 3: copying is right exactly when the clip has a visible real
    code, and PAD (often nearer than every visible code) must never be the answer."""
    videos = {f"c{i}": {v: np.full((1 + i % 2, *GRID), 5 * i, dtype=np.int16) for v in VIEWS} for i in range(6)}
    dataset = clips(write_database(tmp_path / "db", videos, {"train": sorted(videos)}), mask_blocks=8)
    masked = answerable = 0
    for index in range(len(dataset)):
        item = dataset[index]
        for inputs, labels in zip(item["inputs"], item["labels"]):
            assert (inputs == CONFIG.pad_id).any()
            predicted = int((labels != -100).sum())
            masked += predicted
            answerable += predicted if ((labels == -100) & (inputs != CONFIG.pad_id)).any() else 0
    result = evaluate_pretraining(random_model(), dataset, batch_size=4, frequent_code=0)
    assert result["masked_positions"] == masked
    assert result["nearest_copy_accuracy"] == answerable / masked


class Oracle(nn.Module):
    """The real model's outputs, with a huge logit on every true code and a bigger one on PAD and MASK."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, tokens, mlm_labels):
        out = self.inner(tokens, mlm_labels)
        truth = mlm_labels.flatten()[out["mlm_positions"]]
        logits = torch.randn_like(out["mlm_logits"])
        logits[torch.arange(len(truth)), truth] = 1e6
        logits[:, [CONFIG.pad_id, CONFIG.mask_id]] = 2e6  # never an answer: only the codes are scored
        return {**out, "mlm_logits": logits}


def test_an_oracle_gets_every_masked_token(random_db):
    result = evaluate_pretraining(Oracle(random_model()), clips(random_db), batch_size=3, frequent_code=0)
    assert result["mlm_accuracy"] == 1.0
    assert result["contrastive_chance"] == pytest.approx(1 / 5)


# ------------------------------------------------------------------------------------------- command line


def test_cli_reports_and_writes_json(tmp_path, capsys):
    db = write_code_database(tmp_path / "db", videos=9, frames=12)  # room for the relevance range to matter
    model = random_model(1)
    export = export_weights(model.state_dict(), CONFIG, tmp_path / "run")
    recorded = {"mask_blocks": 3, "frame_rate": None, "nce_relevance_range": 1}
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"args": recorded}))
    out = tmp_path / "eval.json"
    argv = ["pretrain-eval", "--model", str(tmp_path / "run"), "--data", str(db), "--split", "train"]
    assert main([*argv, "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "masked-token accuracy  model" in printed and "contrastive accuracy" in printed
    assert "3 mask blocks (from" in printed

    written = json.loads(out.read_text())
    dataset = clips(db, mask_blocks=3, seed=0, relevance_range=1)  # the run's own pairs
    expected = evaluate_pretraining(model, dataset, batch_size=4, frequent_code=most_frequent_code(db, "train"))
    assert {k: written[k] for k in expected} == expected
    assert written["settings"]["mask_blocks"] == 3 and written["settings"]["nce_relevance_range"] == 1
    assert isinstance(load_pretrained(export), VimpacForPretraining)


def test_cli_refuses_a_vocabulary_mismatch_and_missing_paths(tmp_path, capsys):
    db = write_code_database(tmp_path / "db", videos=2, frames=2)
    config = VimpacConfig.from_dict({**CONFIG.to_dict(), "vocab_size": 32})
    torch.manual_seed(0)
    export_weights(VimpacForPretraining(config).state_dict(), config, tmp_path / "run")

    assert main(["pretrain-eval", "--model", str(tmp_path / "run"), "--data", str(db)]) == 2
    err = capsys.readouterr().err
    assert f"{VOCAB} codes" in err and "vocab_size 32" in err

    assert main(["pretrain-eval", "--model", str(tmp_path / "nowhere"), "--data", str(db)]) == 2
    assert "--model" in capsys.readouterr().err
    # the same vocabulary and grid, but codes of another tokenizer than the model was trained on
    export_weights(random_model(1).state_dict(), CONFIG, tmp_path / "other", tokenizer="f" * 16)
    assert main(["pretrain-eval", "--model", str(tmp_path / "other"), "--data", str(db)]) == 2
    assert f"tokenized by tokenizer {'0' * 16}, but the model" in capsys.readouterr().err
    assert main(["pretrain-eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "nodb")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["pretrain-eval", "--model", str(tmp_path / "run"), "--data", str(db), "--batch-size", "1"]) == 2
    assert "--batch-size 1: the contrastive accuracy" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain-eval", "--help"])
    assert exit_info.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_a_finetuning_export_is_named_as_such(tmp_path):
    torch.manual_seed(0)
    export = export_weights(VimpacForClassification(CONFIG, num_classes=3).state_dict(), CONFIG, tmp_path / "ft")
    with pytest.raises(UsageError, match="is a fine-tuning export"):
        load_pretrained(export)
