"""The code database: record bytes, writer/reader round trips, crash safety and resume, inspect, merge, CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tests.helpers import REPO
from vimpac import code_db
from vimpac.code_db import (
    CodeDatabase,
    CodeDatabaseWriter,
    check_dataset_name,
    codes_dtype,
    decode_record,
    encode_record,
    inspect,
    merge,
)
from vimpac.errors import UsageError


def _load_db_command():
    """vimpac/commands/db.py loaded on its own: the package __init__ imports every command module, and this
    test must not depend on the others."""
    spec = importlib.util.spec_from_file_location("vimpac_commands_db", REPO / "vimpac" / "commands" / "db.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


db_command = _load_db_command()
VIEWS = ["r128_center_f0", "r128_top_f0", "r160_bottom_f1"]


def make_manifest(**overrides) -> dict:
    manifest = {
        "dataset": "ucf101",
        "fps": 2,
        "frame_size": 32,
        "grid": [4, 4],
        "tokenizer": {"name": "vqvae-test", "vocab_size": 8192, "fingerprint": "0123456789abcdef"},
        "views": list(VIEWS),
        "classes": ["ApplyEyeMakeup", "Archery", "Basketball"],
        "args": {"annotations": ["train.txt"]},
    }
    manifest.update(overrides)
    return manifest


def random_video(rng: np.random.Generator, manifest: dict, frames: int | None = None) -> dict:
    """Random record content for every view of `manifest`: {"codes": {view: int64 [frames, h, w]}, ...}."""
    frames = frames if frames is not None else int(rng.integers(1, 9))
    vocab = manifest["tokenizer"]["vocab_size"]
    h, w = manifest["grid"]
    return {
        "codes": {v: rng.integers(0, vocab, size=(frames, h, w)) for v in manifest["views"]},
        "label": int(rng.integers(-1, len(manifest["classes"]))),
        "duration": float(rng.uniform(0.5, 20)),
        "fps": float(rng.choice([24.0, 25.0, 29.97, 30.0])),
    }


def write_db(path: Path, videos: dict, manifest: dict, failures=(), splits=None, commit_every=7) -> dict:
    with CodeDatabaseWriter(path, manifest, commit_every=commit_every) as writer:
        for video_id, v in videos.items():
            writer.add(video_id, v["codes"], v["label"], v["duration"], v["fps"])
        for video_id, stage, reason in failures:
            writer.add_failure(video_id, f"/videos/{video_id}.mp4", stage, reason)
        return writer.finalize(splits if splits is not None else {"train": sorted(videos)})


def assert_matches(db: CodeDatabase, videos: dict) -> None:
    for video_id, v in videos.items():
        for view in db.views:
            rec = db.record(video_id, view)
            np.testing.assert_array_equal(rec.codes, v["codes"][view])
            assert (rec.label, rec.duration, rec.fps) == (v["label"], v["duration"], v["fps"])


# ------------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 16, 16), (3, 1, 9), (0, 4, 4), (2, 5, 3)])
def test_record_round_trip(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    info = np.iinfo(dtype)
    codes = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    buf = encode_record(codes, label=-1 if shape[0] % 2 else 42, duration=3.25, fps=29.97)

    # The layout is the documented one, checked with an independent struct read.
    assert len(buf) == 36 + codes.size * np.dtype(dtype).itemsize
    magic, version, code, frames, h, w, label = struct.unpack_from("<4sHBxIHHi", buf)
    assert (magic, version, code, (frames, h, w)) == (b"VPCR", 1, {np.int16: 1, np.int32: 2}[dtype], shape)
    assert struct.unpack_from("<dd", buf, 20) == (3.25, 29.97)

    rec = decode_record(buf)
    assert rec.codes.dtype == dtype and rec.codes.shape == shape and rec.frames == shape[0]
    np.testing.assert_array_equal(rec.codes, codes)
    assert (rec.label, rec.duration, rec.fps) == (label, 3.25, 29.97)
    assert not rec.codes.flags.writeable  # zero-copy view into the bytes


def test_record_casts_with_range_check():
    codes = np.array([[[0, 32767], [5, 9]]], dtype=np.int64)
    rec = decode_record(encode_record(codes, 1, 1.0, 25.0, dtype=np.int16))
    assert rec.codes.dtype == np.int16
    np.testing.assert_array_equal(rec.codes, codes)
    with pytest.raises(ValueError, match="does not fit int16"):
        encode_record(codes + 1, 1, 1.0, 25.0, dtype=np.int16)
    with pytest.raises(ValueError, match="int16 or int32"):
        encode_record(codes, 1, 1.0, 25.0)  # int64 without a storage dtype
    with pytest.raises(ValueError, match="frames, h, w"):
        encode_record(codes[0], 1, 1.0, 25.0, dtype=np.int16)


def test_record_rejects_damaged_bytes():
    buf = encode_record(np.ones((2, 3, 3), np.int16), 0, 1.0, 2.0)
    with pytest.raises(ValueError, match="too short"):
        decode_record(buf[:20])
    with pytest.raises(ValueError, match="header says"):
        decode_record(buf[:-2])
    with pytest.raises(ValueError, match="not a vimpac record"):
        decode_record(b"XXXX" + buf[4:])
    with pytest.raises(ValueError, match="version 9"):
        decode_record(buf[:4] + struct.pack("<H", 9) + buf[6:])


def test_codes_dtype_threshold():
    assert codes_dtype(8192) == np.int16
    assert codes_dtype(32767) == np.int16
    assert codes_dtype(32768) == np.int32


# ------------------------------------------------------------------------------------------ writer / reader


@pytest.mark.parametrize("vocab", [8192, 65536])
def test_writer_reader_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    manifest = make_manifest(tokenizer={"name": "t", "vocab_size": vocab, "fingerprint": "f" * 16})
    videos = {f"class{i % 3}/v_{i:03d}": random_video(rng, manifest) for i in range(23)}
    ids = sorted(videos)
    splits = {"train_1": ids[:15], "test_1": [*ids[15:], "class0/failed"]}
    written = write_db(
        tmp_path / "db", videos, manifest, [("class0/failed", "decode", "truncated: 1 s of 4 s")], splits
    )

    db = CodeDatabase(tmp_path / "db")
    assert db.complete and db.views == VIEWS and db.manifest == written
    assert db.manifest["codes_dtype"] == ("int16" if vocab <= 32767 else "int32")
    assert db.ids() == ids and len(db) == 23 and ids[4] in db and "class0/failed" not in db
    assert db.ids("train_1") == ids[:15] and db.ids("test_1") == ids[15:]
    assert_matches(db, videos)
    codes, label = db.read(ids[0], VIEWS[1])
    assert codes.dtype == codes_dtype(vocab) and label == videos[ids[0]]["label"]
    if vocab > 32767:  # values beyond int16 survive
        assert max(int(db.read(i, VIEWS[0])[0].max()) for i in ids) > 32767

    counts = db.manifest["counts"]
    frames = {i: videos[i]["codes"][VIEWS[0]].shape[0] for i in ids}
    assert counts["videos"] == 23 and counts["frames"] == sum(frames.values()) and counts["partial"] == 0
    assert counts["views"] == dict.fromkeys(VIEWS, 23)
    assert counts["failures"] == {"total": 1, "by_stage": {"decode": 1}, "by_reason": {"decode: truncated": 1}}
    assert counts["splits"]["test_1"] == {
        "listed": 9,
        "videos": 8,
        "frames": sum(frames[i] for i in ids[15:]),
        "failed": 1,
        "missing": 0,
    }
    assert db.failures() == [
        {
            "id": "class0/failed",
            "path": "/videos/class0/failed.mp4",
            "stage": "decode",
            "reason": "truncated: 1 s of 4 s",
        }
    ]

    clone = pickle.loads(pickle.dumps(db))
    assert clone._envs == {}
    assert_matches(clone, videos)
    db.close()
    clone.close()


def test_two_readers_share_environments_and_fork(tmp_path):
    rng = np.random.default_rng(1)
    manifest = make_manifest()
    videos = {f"v{i}": random_video(rng, manifest) for i in range(6)}
    write_db(tmp_path / "db", videos, manifest)
    train, test = CodeDatabase(tmp_path / "db"), CodeDatabase(tmp_path / "db")
    assert_matches(train, videos)
    assert_matches(test, videos)  # a second reader in one process must not reopen the environment
    train.close()
    assert_matches(test, videos)

    # A forked worker (DataLoader style) opens its own environments and reads the same values.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        sums = pool.map(_sum_codes, [(test, i) for i in sorted(videos)])
    assert sums == [int(videos[i]["codes"][VIEWS[2]].sum()) for i in sorted(videos)]
    test.close()


def _sum_codes(args) -> int:
    db, video_id = args
    return int(db.read(video_id, VIEWS[2])[0].astype(np.int64).sum())


def test_writer_validates_input(tmp_path):
    manifest = make_manifest()
    rng = np.random.default_rng(2)
    with CodeDatabaseWriter(tmp_path / "db", manifest) as writer:
        good = random_video(rng, manifest, frames=3)["codes"]
        with pytest.raises(ValueError, match="missing"):
            writer.add("a", {v: good[v] for v in VIEWS[:2]}, 0, 1.0, 25.0)
        with pytest.raises(ValueError, match="shape"):
            writer.add("a", {v: c[:, :3] for v, c in good.items()}, 0, 1.0, 25.0)
        with pytest.raises(ValueError, match="outside vocabulary"):
            writer.add("a", {v: c + 8192 * (v == VIEWS[1]) for v, c in good.items()}, 0, 1.0, 25.0)
        with pytest.raises(ValueError, match="different frame counts"):
            writer.add("a", {**good, VIEWS[0]: good[VIEWS[0]][:2]}, 0, 1.0, 25.0)
        with pytest.raises(ValueError, match="non-empty"):
            writer.add("", good, 0, 1.0, 25.0)
        with pytest.raises(UsageError, match="another process is writing"):
            CodeDatabaseWriter(tmp_path / "db", manifest)


# ------------------------------------------------------------------------------------------- resume, crashes


def test_resume_after_partial_write_and_torn_failure_line(tmp_path):
    rng = np.random.default_rng(3)
    manifest = make_manifest()
    path = tmp_path / "db"
    videos = {f"v{i}": random_video(rng, manifest) for i in range(10)}
    with CodeDatabaseWriter(path, manifest, commit_every=4) as writer:
        for video_id, v in videos.items():
            writer.add(video_id, v["codes"], v["label"], v["duration"], v["fps"])
        writer.add_failure("bad1", "/x/bad1.mp4", "open", "file is empty (0 bytes)")

    # What a kill between view commits and in the middle of a failure line leaves behind:
    late = random_video(rng, manifest)
    for view in VIEWS[:2]:
        with lmdb.open(str(path / "views" / view), map_size=1 << 30) as env, env.begin(write=True) as txn:
            txn.put(b"late", encode_record(late["codes"][view], late["label"], late["duration"], late["fps"], "int16"))
    with open(path / "failures.jsonl", "a") as f:
        f.write('{"id": "bad2", "path": "/x/bad2.mp4", "sta')

    partial_db = CodeDatabase(path)
    assert not partial_db.complete and "late" not in partial_db.ids()
    partial_db.close()

    with CodeDatabaseWriter(path, manifest) as writer:
        assert writer.done_ids() == {*videos, "bad1"}  # neither the partial video nor the torn failure
        lines = (path / "failures.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == ["bad1"]
        writer.add_failure("bad1", "/x/bad1.mp4", "open", "file is empty (0 bytes)")  # a rerun: no duplicate
        writer.add_failure("bad2", "/x/bad2.mp4", "probe", "no video stream (streams: audio)")
        writer.add("late", late["codes"], late["label"], late["duration"], late["fps"])
        assert [f["id"] for f in writer.failures()] == ["bad1", "bad2"]
        assert writer.done_ids() == {*videos, "bad1", "bad2", "late"}
        manifest_out = writer.finalize({"train": [*videos, "late", "bad1", "bad2"]})
    assert len((path / "failures.jsonl").read_text().splitlines()) == 2
    assert manifest_out["counts"]["failures"]["by_reason"] == {"open: file is empty": 1, "probe: no video stream": 1}

    db = CodeDatabase(path)
    assert db.ids() == sorted([*videos, "late"])
    assert_matches(db, {**videos, "late": late})
    db.close()


def test_a_truncated_view_is_refused_instead_of_killing_the_process(tmp_path):
    rng = np.random.default_rng(5)
    manifest = make_manifest()
    path = tmp_path / "db"
    write_db(path, {f"v{i}": random_video(rng, manifest, frames=40) for i in range(12)}, manifest)
    data = path / "views" / VIEWS[1] / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)  # a copy cut short: reading past its end is SIGBUS
    before = (path / "manifest.json").read_text()
    db = CodeDatabase(path)  # views open when first read
    db.read("v0", VIEWS[0])
    with pytest.raises(UsageError, match=rf"{re.escape(str(data))} is truncated \([\d,]+ bytes; its pages need"):
        db.read("v0", VIEWS[1])
    db.close()
    with pytest.raises(UsageError, match="is truncated"):
        inspect(path)  # `vimpac db inspect`
    with pytest.raises(UsageError, match="is truncated"):
        CodeDatabaseWriter(path, manifest)  # a tokenize rerun
    assert (path / "manifest.json").read_text() == before  # still complete: nothing was rewritten


def test_a_new_database_that_fails_while_opening_its_views_resumes(tmp_path, monkeypatch):
    manifest = make_manifest()
    path = tmp_path / "db"
    real_open, calls = lmdb.open, []

    def full_disk_on_the_second_view(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise lmdb.DiskError("No space left on device")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(code_db.lmdb, "open", full_disk_on_the_second_view)
    with pytest.raises(lmdb.DiskError):
        CodeDatabaseWriter(path, manifest)
    monkeypatch.setattr(code_db.lmdb, "open", real_open)
    with CodeDatabaseWriter(path, manifest) as writer:  # the rerun resumes what is a database from the start
        video = random_video(np.random.default_rng(0), manifest)
        writer.add("v0", video["codes"], video["label"], video["duration"], video["fps"])
        writer.finalize({"train": ["v0"]})
    assert CodeDatabase(path).ids() == ["v0"]


def test_failure_dropped_when_video_later_succeeds(tmp_path):
    rng = np.random.default_rng(4)
    manifest = make_manifest()
    v = random_video(rng, manifest)
    with CodeDatabaseWriter(tmp_path / "db", manifest) as writer:
        writer.add_failure("v", None, "decode", "truncated")
        writer.add("v", v["codes"], v["label"], v["duration"], v["fps"])
        out = writer.finalize({"train": ["v"]})
    assert out["counts"]["failures"]["total"] == 0 and out["counts"]["splits"]["train"]["videos"] == 1
    assert (tmp_path / "db" / "failures.jsonl").read_text() == ""


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from vimpac.code_db import CodeDatabaseWriter

    path, manifest, n = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3])
    with CodeDatabaseWriter(path, manifest, commit_every=1000) as writer:
        done = writer.done_ids()
        for i in range(n):
            vid = f"vid{i:04d}"
            if vid in done:
                continue
            if i % 7 == 3:
                writer.add_failure(vid, "/x/" + vid, "decode", "synthetic failure " + "x" * (i % 50))
                continue
            rng = np.random.default_rng(i)
            codes = rng.integers(0, 8000, size=(1 + i % 6, 4, 4))
            writer.add(vid, {v: codes + k for k, v in enumerate(manifest["views"])}, i % 3, i / 10, 25.0)
            if i % 3 == 2:
                writer.commit()
                print("committed", i, flush=True)
    """
)


def expected_kill_record(i: int, k: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 8000, size=(1 + i % 6, 4, 4)) + k


def check_killed_db(path: Path, committed: set[str], n: int) -> set[str]:
    """Every record readable and equal to what the writer computed; returns the done ids a resume would skip."""
    db = CodeDatabase(path)
    for video_id in db.ids():
        i = int(video_id[3:])
        for k, view in enumerate(db.views):
            rec = db.record(video_id, view)
            np.testing.assert_array_equal(rec.codes, expected_kill_record(i, k))
            assert (rec.label, rec.duration) == (i % 3, i / 10)
    for entry in db.failures():
        assert int(entry["id"][3:]) % 7 == 3
    db.close()
    with CodeDatabaseWriter(path, make_manifest(grid=[4, 4])) as writer:
        done = writer.done_ids()
    assert committed <= done and all(int(d[3:]) < n for d in done)
    return done


@pytest.mark.parametrize("kill_after", [5, 20])
def test_kill_9_leaves_consistent_resumable_database(tmp_path, kill_after):
    path, n = tmp_path / "db", 400
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    committed: set[str] = set()
    for attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), repr(make_manifest(grid=[4, 4])), str(n)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(kill_after * (attempt + 1)):
            line = proc.stdout.readline()
            if not line:
                break
            i = int(line.split()[1])
            committed |= {f"vid{j:04d}" for j in range(i + 1) if j % 7 != 3}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
        done = check_killed_db(path, committed, n)
        assert len(done) < n

    # A final clean run completes the database without duplicates.
    subprocess.run(
        [sys.executable, str(script), str(path), repr(make_manifest(grid=[4, 4])), str(n)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    done = check_killed_db(path, committed, n)
    assert done == {f"vid{i:04d}" for i in range(n)}
    failure_ids = [json.loads(line)["id"] for line in (path / "failures.jsonl").read_text().splitlines()]
    assert sorted(failure_ids) == sorted(f"vid{i:04d}" for i in range(n) if i % 7 == 3)


# ---------------------------------------------------------------------------------------------------- errors


def test_reopen_with_different_settings_names_every_difference(tmp_path):
    path = tmp_path / "db"
    CodeDatabaseWriter(path, make_manifest()).close()
    changed = make_manifest(fps=16, tokenizer={"name": "vqvae-test", "vocab_size": 8192, "fingerprint": "ffff"})
    with pytest.raises(UsageError) as err:
        CodeDatabaseWriter(path, changed)
    message = str(err.value)
    assert "fps: 2 vs 16" in message and "tokenizer.fingerprint: '0123456789abcdef' vs 'ffff'" in message
    assert "frame_size" not in message and "same settings" in message and "new output" in message
    with pytest.raises(UsageError, match=r"classes: entry 1 is 'Archery' vs 'Bowling'"):
        CodeDatabaseWriter(path, make_manifest(classes=["ApplyEyeMakeup", "Bowling", "Basketball"]))
    with pytest.raises(UsageError, match="already holds a code database"):
        CodeDatabaseWriter(path, make_manifest(), resume=False)
    CodeDatabaseWriter(path, make_manifest(args={"other": "args are not compared"})).close()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(UsageError, match="not a code database"):
        CodeDatabaseWriter(other, make_manifest())


def test_reader_errors(tmp_path):
    with pytest.raises(UsageError, match=r"not a code database.*vimpac tokenize") as err:
        CodeDatabase(tmp_path)
    assert str(tmp_path) in str(err.value)

    rng = np.random.default_rng(5)
    manifest = make_manifest()
    write_db(tmp_path / "db", {"a": random_video(rng, manifest)}, manifest, splits={"train": ["a"]})
    db = CodeDatabase(tmp_path / "db")
    with pytest.raises(UsageError, match=r"unknown view 'r999_center_f0'.*r128_center_f0, r128_top_f0"):
        db.read("a", "r999_center_f0")
    with pytest.raises(KeyError, match=r"'nope'.*r128_top_f0"):
        db.read("nope", "r128_top_f0")
    with pytest.raises(UsageError, match=r"unknown split 'val'.*train"):
        db.ids("val")
    db.close()


# -------------------------------------------------------------------------------------------------- inspect


def test_inspect_counts_and_finds_damage(tmp_path):
    rng = np.random.default_rng(6)
    manifest = make_manifest()
    videos = {f"v{i:02d}": random_video(rng, manifest) for i in range(12)}
    failures = [
        ("f1", "decode", "truncated: 1.2 s of 4.0 s"),
        ("f2", "decode", "truncated: 0.5 s of 3.0 s"),
        ("f3", "locate", "video file not found: tried /r/f3.webm"),
    ]
    splits = {"train": [*sorted(videos)[:8], "f1", "f3", "gone"], "val": [*sorted(videos)[8:], "f2"]}
    write_db(tmp_path / "db", videos, manifest, failures, splits)

    report = inspect(tmp_path / "db", sample=1000)
    frames = {i: v["codes"][VIEWS[0]].shape[0] for i, v in videos.items()}
    assert report["ok"] and report["problems"] == [] and report["warnings"] == [] and report["verified"] == 12
    assert report["manifest"]["classes"] == 3 and report["manifest"]["splits"] == {"train": 11, "val": 5}
    counts = report["counts"]
    assert (counts["videos"], counts["frames"]) == (12, sum(frames.values()))
    assert counts["failures"]["by_stage"] == {"decode": 2, "locate": 1}
    assert counts["failures"]["by_reason"] == {"decode: truncated": 2, "locate: video file not found": 1}
    assert counts["splits"]["train"] == {
        "listed": 11,
        "videos": 8,
        "frames": sum(frames[i] for i in sorted(videos)[:8]),
        "failed": 2,
        "missing": 1,
    }

    # Damage one view of one video: out-of-vocabulary codes and a frame count different from the other views.
    bad = np.full((9, 4, 4), 9000, dtype=np.int16)
    with lmdb.open(str(tmp_path / "db" / "views" / VIEWS[1]), map_size=1 << 30) as env, env.begin(write=True) as txn:
        txn.put(b"v03", encode_record(bad, 0, 1.0, 25.0))
        txn.put(b"v05", b"garbage")
        txn.put(b"extra", encode_record(bad[:1], 0, 1.0, 25.0))
    report = inspect(tmp_path / "db", sample=1000)
    problems = {(p["id"], p["view"]): p["problem"] for p in report["problems"]}
    assert not report["ok"]
    assert "outside [0, 8192)" in problems["v03", VIEWS[1]]
    assert "frame counts differ" in problems["v03", None]
    assert "does not decode" in problems["v05", VIEWS[1]]
    assert "1 videos are in some views only, e.g. ['extra']" in problems[None, None]
    assert len(problems) == 4


def test_inspect_warns_on_incomplete_database(tmp_path):
    rng = np.random.default_rng(7)
    manifest = make_manifest()
    v = random_video(rng, manifest)
    with CodeDatabaseWriter(tmp_path / "db", manifest) as writer:
        writer.add("a", v["codes"], v["label"], v["duration"], v["fps"])
    report = inspect(tmp_path / "db")
    assert report["ok"] and report["counts"]["videos"] == 1
    assert any("incomplete" in w for w in report["warnings"])
    db = CodeDatabase(tmp_path / "db")
    assert_matches(db, {"a": v})  # readable although incomplete
    with pytest.raises(UsageError, match="incomplete"):
        db.ids("train")
    db.close()


# ---------------------------------------------------------------------------------------------------- merge


def test_merge_unites_videos_splits_and_failures(tmp_path):
    rng = np.random.default_rng(8)
    manifest = make_manifest()
    videos = {f"v{i:02d}": random_video(rng, manifest) for i in range(10)}
    ids = sorted(videos)
    first = {i: videos[i] for i in ids[:6]}
    second = {i: videos[i] for i in ids[5:]}  # v05 in both, identical
    write_db(
        tmp_path / "a",
        first,
        manifest,
        [("v07", "decode", "truncated"), ("x1", "open", "empty")],
        {"train": [*ids[:6], "x1"]},
    )
    write_db(
        tmp_path / "b",
        second,
        manifest,
        [("x2", "probe", "no video stream")],
        {"train": ids[5:8], "val": [*ids[8:], "x2"]},
    )

    out = merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"], progress=False)
    db = CodeDatabase(tmp_path / "m")
    assert db.complete and out == db.manifest and db.ids() == ids
    assert_matches(db, videos)
    assert db.splits == {"train": sorted([*ids[:8], "x1"]), "val": sorted([*ids[8:], "x2"])}
    assert sorted(f["id"] for f in db.failures()) == ["x1", "x2"]  # v07 succeeded in b
    assert out["counts"]["videos"] == 10 and out["counts"]["failures"]["total"] == 2
    assert out["args"]["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert {k: out[k] for k in code_db.CONFIG_KEYS} == {k: db.manifest[k] for k in code_db.CONFIG_KEYS}
    db.close()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"tokenizer": {"name": "vqvae-test", "vocab_size": 8192, "fingerprint": "deadbeef00000000"}},
            "tokenizer.fingerprint",
        ),
        ({"fps": 16}, "fps: 2 vs 16"),
        ({"frame_size": 64, "grid": [8, 8]}, "frame_size: 32 vs 64"),
        ({"grid": [2, 8]}, "grid: [4, 4] vs [2, 8]"),
        ({"views": VIEWS[:2]}, "views: 3 entries vs 2"),
        ({"classes": ["a", "b", "c"]}, "classes: entry 0 is 'ApplyEyeMakeup' vs 'a'"),
    ],
)
def test_merge_refuses_different_settings(tmp_path, change, expected):
    rng = np.random.default_rng(9)
    base = make_manifest()
    other = make_manifest(**change)
    write_db(tmp_path / "a", {"v1": random_video(rng, base)}, base)
    write_db(tmp_path / "b", {"v2": random_video(rng, other)}, other)
    with pytest.raises(UsageError, match="settings differ") as err:
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"], progress=False)
    assert expected in str(err.value)
    assert not (tmp_path / "m").exists()


def test_merge_refuses_conflicts_existing_output_and_incomplete_inputs(tmp_path):
    rng = np.random.default_rng(10)
    manifest = make_manifest()
    write_db(tmp_path / "a", {"same": random_video(rng, manifest), "v1": random_video(rng, manifest)}, manifest)
    write_db(tmp_path / "b", {"same": random_video(rng, manifest)}, manifest)
    with pytest.raises(UsageError, match=r"'same' has different records.*a.*b"):
        merge(tmp_path / "m", [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "m").exists()

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("")
    with pytest.raises(UsageError, match="already exists"):
        merge(tmp_path / "m", [tmp_path / "a"], progress=False)

    CodeDatabaseWriter(tmp_path / "c", manifest).close()
    with pytest.raises(UsageError, match="incomplete"):
        merge(tmp_path / "m2", [tmp_path / "a", tmp_path / "c"], progress=False)


# ------------------------------------------------------------------------------------------------------ CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vimpac")
    db_command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_inspect_and_merge(tmp_path, capsys):
    rng = np.random.default_rng(11)
    manifest = make_manifest()
    videos = {f"v{i}": random_video(rng, manifest) for i in range(5)}
    write_db(tmp_path / "a", dict(list(videos.items())[:3]), manifest, [("bad", "decode", "truncated: x")])
    write_db(tmp_path / "b", dict(list(videos.items())[3:]), manifest)

    args = parse(["db", "inspect", str(tmp_path / "a"), "--json", "--sample", "2"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["videos"] == 3 and report["verified"] == 2 and report["ok"]

    args = parse(["db", "inspect", str(tmp_path / "a")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "videos     3" in text and "decode: truncated" in text and "checked    3 random videos: 0 problems" in text

    args = parse(["db", "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"), "--no-progress"])
    assert args.func(args) == 0
    assert "5 videos" in capsys.readouterr().out
    merged = CodeDatabase(tmp_path / "m")
    assert_matches(merged, videos)
    merged.close()

    with pytest.raises(SystemExit):
        parse(["db", "inspect", str(tmp_path / "a"), "--sample", "-1"])


def test_dataset_names_are_checked_in_either_spelling():
    kinetics = {"dataset": "kinetics"}
    for name in ("kinetics", "kinetics400", None):  # vimpac's name, the original release's, no flag
        check_dataset_name(name, kinetics, "db")
    check_dataset_name("sthv2", {"dataset": "ssv2"}, "db")
    with pytest.raises(UsageError, match="--dataset-name ucf101 but db holds dataset 'kinetics'"):
        check_dataset_name("ucf101", kinetics, "db")


def hold_writer(path: Path, manifest: dict, opened, release) -> None:
    """In another process (LMDB opens an environment once per process): a writer on `path` until `release`."""
    with CodeDatabaseWriter(path, manifest, resume=True):
        opened.set()
        release.wait(60)


def test_a_reader_beside_a_running_writer_takes_lmdb_locks(tmp_path):
    # Without LMDB's reader table a reader can see pages a running writer is reusing: readers opened while a writer
    # holds the database use it, whatever they asked for.
    import multiprocessing

    manifest = make_manifest()
    write_db(tmp_path / "db", {"a": random_video(np.random.default_rng(0), manifest)}, manifest)
    assert CodeDatabase(tmp_path / "db").lock is False
    context = multiprocessing.get_context("spawn")
    opened, release = context.Event(), context.Event()
    writer = context.Process(target=hold_writer, args=(tmp_path / "db", manifest, opened, release))
    writer.start()
    try:
        assert opened.wait(60)
        db = CodeDatabase(tmp_path / "db")
        assert db.lock is True and db.ids() == ["a"]
        db.close()
    finally:
        release.set()
        writer.join(60)
    assert CodeDatabase(tmp_path / "db").lock is False


def test_databases_of_two_tokenizers_are_not_read_together():
    from vimpac.code_db import check_same_tokenizer_databases

    a, b = ({"tokenizer": {"fingerprint": f}} for f in ("a" * 16, "b" * 16))
    check_same_tokenizer_databases(a, a, "--data x", "--eval-data y")
    check_same_tokenizer_databases(a, {}, "--data x", "--eval-data y")  # older manifests without one: not known
    with pytest.raises(UsageError, match=r"--eval-data y was tokenized by tokenizer b+ and --data x by tokenizer a+"):
        check_same_tokenizer_databases(a, b, "--data x", "--eval-data y")
