"""Damaged code databases: a record that does not decode, or a missing key, raises CorruptRecordError naming the
database, the view and the video; --on-bad-record skip lets another video stand in (deterministically), warns
once per bad record and counts it (data/bad_records); stop (the default) ends the run with that message.

The damage is done directly with lmdb on a database written by tests.synthetic_codes: garbage bytes, a truncated
record and a record of another version are put under three ids, and one key is deleted.
"""

import json
import struct
import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import REPO, environment, launcher
from tests.synthetic_codes import FRAME_SIZE, VIEW, VOCAB, write_code_database, write_labeled
from vimpac.code_db import (
    DEFAULT_MAP_SIZE,
    VIEWS_DIR,
    CodeDatabase,
    CorruptRecordError,
    MissingRecordError,
    inspect,
    record_error_message,
)
from vimpac.data import PretrainClips, ResumableDistributedSampler
from vimpac.finetune_data import FinetuneTestClips, FinetuneTrainClips
from vimpac.metrics import read_metrics

GARBAGE, TRUNCATED, OTHER_VERSION, DELETED = "video0005", "video0012", "video0020", "video0009"
CORRUPT = (GARBAGE, TRUNCATED, OTHER_VERSION)
MODEL = ["--layers", "1", "--hid-dim", "32", "--heads", "2", "--clip-len", "4", "--nce-proj-hid-dim", "32"]
MODEL += ["--vocab-size", str(VOCAB), "--frame-size", str(FRAME_SIZE), "--mask-blocks", "2"]
# 8 videos per step (4 per micro-step, 2 accumulation steps); 31 readable-or-not videos: 3 steps (24 videos)/epoch.
RUN = ["--deepspeed_config", "ds_configs/cpu.json", "--batch-size", "8", "--bs-per-gpu", "4", "--num-workers", "0"]
RUN += ["--zero-stage", "0", "--epochs", "2"]
SEED, PER_EPOCH = 9595, 24
SPEC = dict(pad_id=VOCAB, mask_id=VOCAB + 1, mask_blocks=2)


def damage(db: Path, view: str, corrupt: dict[str, str], delete: list[str]) -> None:
    """Rewrite records of one view: "garbage", "truncated" (7 bytes short) or "version" (header says version 9)."""
    env = lmdb.open(str(db / VIEWS_DIR / view), subdir=True, map_size=DEFAULT_MAP_SIZE)
    with env.begin(write=True) as txn:
        for video_id, kind in corrupt.items():
            key = video_id.encode()
            good = txn.get(key)
            if kind == "garbage":
                value = b"\x00garbage, not a record\xff" * 3
            elif kind == "truncated":
                value = good[:-7]
            else:
                value = good[:4] + struct.pack("<H", 9) + good[6:]
            txn.put(key, value)
        for video_id in delete:
            assert txn.delete(video_id.encode())
    env.close()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    db = write_code_database(tmp_path_factory.mktemp("damaged") / "db", videos=32)
    damage(db, VIEW, {GARBAGE: "garbage", TRUNCATED: "truncated", OTHER_VERSION: "version"}, [DELETED])
    return db


def pretrain_clips(db, mode: str) -> PretrainClips:
    return PretrainClips(db, "train", 4, seed=SEED, on_bad_record=mode, **SPEC)


def test_bad_records_raise_an_error_naming_database_view_and_video(damaged):
    db = CodeDatabase(damaged)
    for video_id, reason in ((GARBAGE, "not a vimpac record"), (TRUNCATED, "header says"), (OTHER_VERSION, "9")):
        with pytest.raises(CorruptRecordError) as err:
            db.read(video_id, VIEW)
        message = str(err.value)
        assert str(damaged) in message and repr(VIEW) in message and repr(video_id) in message, message
        assert reason in message and "--on-bad-record skip" in message
        assert (err.value.path, err.value.view, err.value.video_id) == (str(damaged), VIEW, video_id)
        with pytest.raises(CorruptRecordError, match=video_id):
            db.validate(video_id, VIEW)  # the header-only check finds it too
    with pytest.raises(MissingRecordError) as err:
        db.read(DELETED, VIEW)
    assert isinstance(err.value, KeyError) and isinstance(err.value, CorruptRecordError)
    message = str(err.value)
    assert str(damaged) in message and repr(VIEW) in message and repr(DELETED) in message, message
    assert DELETED not in db.ids("train")  # readers list only ids with a record in every view
    report = inspect(damaged, sample=100)
    assert sorted(p["id"] for p in report["problems"] if p["id"]) == sorted(CORRUPT)
    db.close()


def test_skip_substitutes_the_next_readable_video_deterministically(damaged, tmp_path):
    skip, stop = pretrain_clips(damaged, "skip"), pretrain_clips(damaged, "stop")
    bad = skip.ids.index(GARBAGE)
    with pytest.raises(CorruptRecordError, match=GARBAGE):
        stop[(0, bad)]
    item = skip[(0, bad)]
    assert item["index"] == bad and item["bad_records"] == 1
    assert [e["id"] for e in json.loads(item["bad_record_log"])] == [GARBAGE]
    again = skip[(0, bad)]
    assert all(torch.equal(item[k], again[k]) for k in ("inputs", "labels"))
    # The stand-in is the next video: its codes fill every position left unmasked (no random replacement here).
    codes, _ = CodeDatabase(damaged).read(skip.ids[bad + 1], VIEW)
    visible = item["inputs"] < VOCAB
    expected = torch.from_numpy(np.array(codes[:4], dtype=np.int64))[None].expand_as(item["inputs"])
    assert visible.any() and torch.equal(item["inputs"][visible], expected[visible])
    # A readable video gives the same sample in both modes (the extra keys aside).
    good = skip[(1, 0)]
    assert good["bad_records"] == 0 and json.loads(good["bad_record_log"]) == []
    assert all(torch.equal(good[k], stop[(1, 0)][k]) for k in ("inputs", "labels"))
    # A clean database: skip mode reproduces stop mode exactly.
    clean = write_code_database(tmp_path / "clean", videos=8)
    a, b = pretrain_clips(clean, "skip"), pretrain_clips(clean, "stop")
    for key in ((0, 3), (2, 7)):
        assert all(torch.equal(a[key][k], b[key][k]) for k in ("inputs", "labels"))


def test_the_message_survives_a_dataloader_worker(damaged):
    dataset = pretrain_clips(damaged, "stop")
    loader = DataLoader(dataset, batch_size=1, sampler=[(0, dataset.ids.index(TRUNCATED))], num_workers=1)
    with pytest.raises(CorruptRecordError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # torch's re-raise in the main process
    clean = record_error_message(err.value)
    assert clean.startswith(f"code database {damaged}: the record of video {TRUNCATED!r} in view {VIEW!r}"), clean
    assert "\n" not in clean


def test_finetune_datasets_leave_out_or_substitute_bad_videos(tmp_path, capsys):
    views = ("r32_center_f0", "r40_center_f0")
    db = write_labeled(tmp_path / "labeled", videos_per_class=4, val_per_class=2, classes=2, views=views)
    # c0_v01: bad in the first view (labels are read there); c1_v02: bad in the second view only; c0_v04: a test
    # video bad in the second view.
    damage(db, views[0], {"c0_v01": "garbage"}, [])
    damage(db, views[1], {"c1_v02": "truncated", "c0_v04": "version"}, [])
    common = dict(pad_id=VOCAB, views=list(views))
    with pytest.raises(CorruptRecordError, match=r"c0_v01.*r32_center_f0|r32_center_f0.*c0_v01"):
        FinetuneTrainClips(db, "train", 4, **common)
    train = FinetuneTrainClips(db, "train", 4, on_bad_record="skip", **common)
    assert "c0_v01" not in train.ids and len(train) == 7
    assert "c0_v01" in capsys.readouterr().err
    # The test set checks every test view up front, so no clip is ever scored against another video's label.
    assert len(FinetuneTestClips(db, "val", 4, **common)) == 4  # stop: read lazily, as before
    test = FinetuneTestClips(db, "val", 4, on_bad_record="skip", **common)
    assert "c0_v04" not in test.ids and len(test) == 3 and test.labels.tolist() == [0, 1, 1]
    assert "c0_v04" in capsys.readouterr().err
    # A bad record in another training view: the next video stands in when that view is drawn.
    index = train.ids.index("c1_v02")
    for epoch in range(50):
        item = train[(epoch, index)]
        if item["view"] == 1:
            break
    assert item["view"] == 1 and item["bad_records"] == 1
    assert item["label"] == train.labels[index + 1]
    assert [e["id"] for e in json.loads(item["bad_record_log"])] == ["c1_v02"]


def pretrain_run(db: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [*launcher("vimpac.pretrain", 1), "--data", str(db), "--output", str(output), *MODEL, *RUN, *flags]
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)


def drawn_bad(db: Path) -> list[set[str]]:
    """Per epoch, the corrupt videos among the samples the run trains on (one rank, PER_EPOCH per epoch)."""
    ids = CodeDatabase(db).ids("train")
    sampler = ResumableDistributedSampler(len(ids), 0, 1, seed=SEED)
    return [{ids[i] for i in sampler.epoch_order(e)[:PER_EPOCH]} & set(CORRUPT) for e in range(2)]


def test_skip_run_completes_and_counts_the_bad_records(damaged, tmp_path):
    expected = drawn_bad(damaged)
    assert expected[0] and expected[1], "the seed should draw corrupt videos in both epochs"
    output = tmp_path / "skip"
    result = pretrain_run(damaged, output, "--on-bad-record", "skip")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = read_metrics(output)
    assert sorted(metrics) == list(range(1, 7))
    assert [metrics[3]["data/bad_records"], metrics[6]["data/bad_records"]] == [len(e) for e in expected]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: code database")]
    assert sorted(w.split("video ")[1].split()[0].strip("'") for w in warnings) == sorted(expected[0] | expected[1])
    assert all(str(damaged) in w and VIEW in w and "another video stands in" in w for w in warnings), warnings
    logged = [json.loads(line) for line in (output / "bad_records.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in logged) == sorted(expected[0] | expected[1])


def test_stop_run_ends_with_the_message(damaged, tmp_path):
    result = pretrain_run(damaged, tmp_path / "stop")
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    message = next(line for line in result.stderr.splitlines() if line.startswith("vimpac/pretrain.py: error:"))
    assert f"code database {damaged}" in message and repr(VIEW) in message, message
    assert any(repr(v) in message for v in CORRUPT) and "--on-bad-record skip" in message
    assert "Traceback" not in result.stderr
