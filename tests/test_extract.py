"""End-to-end extraction: real video files → `vimpac tokenize` → code database; bad input, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tests.tokenizers import tiny_vqvae_dir
from tests.videos import write_video
from vimpac.cli import main as cli_main
from vimpac.code_db import CodeDatabase
from vimpac.errors import UsageError
from vimpac.tokenization.decode import iter_view_frames
from vimpac.tokenization.extract import ExtractConfig, extract, extraction_views
from vimpac.tokenization.tokenizer import load_tokenizer

TEMPLATES = ["Moving [something] from left to right", "Moving [something] from right to left", "Turning [something]"]


def ssv2_dataset(root: Path, train: dict[str, int], val: dict[str, int], make_videos: bool = True) -> list[Path]:
    """Write SSV2-format annotations for `{id: class index}` and (optionally) a small video per id."""
    labels = {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(TEMPLATES)}
    files = [root / "something-something-v2-labels.json"]
    files[0].write_text(json.dumps(labels))
    for split, items in (("train", train), ("validation", val)):
        rows = [
            {
                "id": vid,
                "label": TEMPLATES[c].replace("[something]", "a cube"),
                "template": TEMPLATES[c],
                "placeholders": ["a cube"],
            }
            for vid, c in items.items()
        ]
        path = root / f"something-something-v2-{split}.json"
        path.write_text(json.dumps(rows))
        files.append(path)
    if make_videos:
        (root / "videos").mkdir(exist_ok=True)
        for i, vid in enumerate([*train, *val]):
            rng = np.random.default_rng(i)
            frames = rng.integers(0, 256, size=(10 + 2 * i, 64, 80, 3), dtype=np.uint8)
            write_video(root / "videos" / f"{vid}.mp4", frames=frames, fps=8)
    return files


def config(root: Path, files: list[Path], tok: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(
        videos=root / "videos",
        annotations=files,
        format="ssv2",
        tokenizer=str(tok),
        out=out,
        fps=4.0,
        frame_size=64,
        views="test",
        workers=2,
        encode_batch=16,
        progress=False,
    )
    base.update(kw)
    return ExtractConfig(**base)


def cli_args(root: Path, files: list[Path], tok: Path, *extra: str) -> list[str]:
    """`vimpac tokenize` arguments for an `ssv2_dataset` at 4 fps, 64 px, one worker (no --out)."""
    return [
        "tokenize",
        "--videos",
        str(root / "videos"),
        "--format",
        "ssv2",
        "--annotations",
        *map(str, files),
        "--tokenizer",
        str(tok),
        "--fps",
        "4",
        "--frame-size",
        "64",
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return tiny_vqvae_dir(tmp_path_factory.mktemp("tok"))


def test_extract_matches_direct_encoding(tmp_path, tok):
    files = ssv2_dataset(tmp_path, {"1": 0, "2": 1, "3": 2, "4": 0}, {"5": 1, "6": 2})
    cfg = config(tmp_path, files, tok, tmp_path / "db")
    summary = extract(cfg)
    assert summary.tokenized == 6 and summary.failed == 0 and summary.total_videos == 6
    db = CodeDatabase(tmp_path / "db")
    views = extraction_views(cfg)
    assert db.views == [v.name for v in views] and len(views) == 3
    assert db.ids("train") == ["1", "2", "3", "4"] and db.ids("val") == ["5", "6"]
    assert db.manifest["grid"] == [8, 8] and db.manifest["fps"] == 4.0
    tokenizer = load_tokenizer(tok)
    for vid, label in (("2", 1), ("6", 2)):
        frames = np.concatenate(list(iter_view_frames(tmp_path / "videos" / f"{vid}.mp4", 4.0, views, 64)), axis=1)
        for v, view in enumerate(views):
            codes, got_label = db.read(vid, view.name)
            expected = tokenizer.encode(frames[v]).numpy()
            assert got_label == label
            np.testing.assert_array_equal(codes, expected)


def test_bad_inputs_go_to_failures(tmp_path, tok):
    files = ssv2_dataset(tmp_path, {"1": 0, "2": 1, "3": 2, "4": 0, "5": 1, "6": 2, "7": 0}, {"8": 1})
    videos = tmp_path / "videos"
    (videos / "2.mp4").unlink()  # missing
    (videos / "3.mp4").write_bytes(b"")  # zero bytes
    data = (videos / "4.mp4").read_bytes()
    (videos / "4.mp4").write_bytes(data[: len(data) // 2])  # truncated
    (videos / "5.mp4").write_bytes(os.urandom(5000))  # not a video
    write_audio_only(videos / "6.mp4")  # no video stream
    write_video(videos / "7.mp4", num_frames=1, fps=8)  # 0.125 s: no frame at 4 fps
    # unknown label and a duplicate id with another label
    rows = json.loads(files[1].read_text())
    rows.append({"id": "9", "label": "Dancing", "template": "Dancing", "placeholders": []})
    rows.append({"id": "1", "label": "x", "template": TEMPLATES[2], "placeholders": []})
    files[1].write_text(json.dumps(rows))
    summary = extract(config(tmp_path, files, tok, tmp_path / "db"))
    db = CodeDatabase(tmp_path / "db")
    failures = {f["id"]: f for f in db.failures()}
    assert db.ids() == ["8"]
    assert set(failures) == {"1", "2", "3", "4", "5", "6", "7", "9"}
    assert failures["2"]["stage"] == "locate" and "not found" in failures["2"]["reason"]
    assert "empty" in failures["3"]["reason"]
    assert failures["4"]["stage"] in ("open", "decode")
    assert "not a video" in failures["5"]["reason"]
    assert "no video stream" in failures["6"]["reason"]
    assert "too short" in failures["7"]["reason"]
    assert failures["9"]["stage"] == "annotation" and "Dancing" in failures["9"]["reason"]
    assert "duplicate" in failures["1"]["reason"]
    assert summary.total_videos == 1 and summary.total_failures == 8
    assert (summary.tokenized, summary.skipped, summary.failed) == (1, 0, 8)  # a fresh database: nothing done before


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_exit_codes_and_strict(tmp_path, tok, capsys):
    files = ssv2_dataset(tmp_path, {"1": 0, "2": 1}, {"3": 2})
    (tmp_path / "videos" / "2.mp4").write_bytes(b"")
    args = cli_args(tmp_path, files, tok)
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "b"), "--strict"]) == 1
    for vid in ("1", "3"):
        (tmp_path / "videos" / f"{vid}.mp4").write_bytes(b"")
    assert cli_main([*args, "--out", str(tmp_path / "c")]) == 1
    assert "no video could be tokenized" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(frame_size=100), "multiple of 8"),
        (dict(annotations=[Path("/nonexistent/labels.json")]), "does not exist"),
        (dict(format="youtube8m"), "unknown --format"),
        (dict(fp16=True), "--fp16 encodes under CUDA autocast only; drop it for --device cpu"),
        (dict(videos=Path("/nonexistent")), "not a directory"),
    ],
)
def test_bad_command_line_fails_before_work(tmp_path, tok, change, message):
    files = ssv2_dataset(tmp_path, {"1": 0}, {"2": 1}, make_videos=False)
    (tmp_path / "videos").mkdir()
    with pytest.raises(UsageError, match=message):
        extract(config(tmp_path, files, tok, tmp_path / "db", **change))
    assert not (tmp_path / "db").exists()


def snapshot(db_path: Path) -> dict:
    """Everything a database holds, byte for byte: records per view, failures, manifest splits and counts."""
    db = CodeDatabase(db_path)
    out = {"splits": db.manifest["splits"], "counts": db.manifest["counts"], "views": {}}
    for view in db.views:
        env = lmdb.open(str(db_path / "views" / view), readonly=True, lock=False, subdir=True)
        with env.begin() as txn:
            out["views"][view] = dict(txn.cursor())
        env.close()
    out["failures"] = sorted((f["id"], f["stage"], f["reason"]) for f in db.failures())
    return out


def count_records(db_path: Path) -> int:
    views = db_path / "views"
    if not views.exists():
        return 0
    counts = []
    for view in views.iterdir():
        if not (view / "data.mdb").exists():
            return 0
        env = lmdb.open(str(view), readonly=True, lock=True)
        counts.append(env.stat()["entries"])
        env.close()
    return min(counts, default=0)


@pytest.mark.slow
def test_resume_after_kill_equals_clean_run(tmp_path, tok):
    # Enough videos that records keep coming for a while: encoding runs in rounds, and one round can complete
    # several videos at once, so with a handful the whole run could be written between two looks below.
    ids = {str(i): i % 3 for i in range(1, 41)}
    files = ssv2_dataset(tmp_path, ids, {"50": 0, "51": 1})
    total = len(ids) + 2 - 1  # records of a finished run: every video but the empty one
    (tmp_path / "videos" / "5.mp4").write_bytes(b"")  # one failure, to check failures resume too
    args = [
        sys.executable,
        "-m",
        "vimpac.cli",
        *cli_args(tmp_path, files, tok, "--commit-every", "1", "--encode-batch", "8"),
    ]
    clean = subprocess.run([*args, "--out", str(tmp_path / "clean")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while count_records(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "extraction finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = count_records(out)
    assert 2 <= partial < total
    assert count_records(tmp_path / "clean") == total
    resumed = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_rerun_with_other_annotations_adds_splits_retries_found_videos_and_refuses_relabels(tmp_path, tok):
    labels, train, val = ssv2_dataset(tmp_path, {"1": 0, "2": 1}, {"3": 2})
    videos, out = tmp_path / "videos", tmp_path / "db"

    def state() -> tuple[dict, list[str], list[str], dict[str, int]]:
        db = CodeDatabase(out)  # closed again: the next extract opens the same environments for writing
        try:
            found = {vid: db.read(vid, db.views[0])[1] for vid in db.ids()}
            return db.splits, db.ids("train"), [f["id"] for f in db.failures()], found
        finally:
            db.close()

    (videos / "2.mp4").rename(tmp_path / "2.mp4")
    extract(config(tmp_path, [labels, train], tok, out))
    assert state() == ({"train": ["1", "2"]}, ["1"], ["2"], {"1": 0})
    extract(config(tmp_path, [labels, val], tok, out))  # the validation list into the same database
    assert state() == ({"train": ["1", "2"], "val": ["3"]}, ["1"], ["2"], {"1": 0, "3": 2})
    (tmp_path / "2.mp4").rename(videos / "2.mp4")
    summary = extract(config(tmp_path, [labels, train], tok, out))  # found now: tried again
    assert summary.tokenized == 1
    assert state() == ({"train": ["1", "2"], "val": ["3"]}, ["1", "2"], [], {"1": 0, "2": 1, "3": 2})
    rows = json.loads(train.read_text())
    rows[0]["template"] = TEMPLATES[2]  # video 1 is now annotated with class 2
    train.write_text(json.dumps(rows))
    with pytest.raises(UsageError, match=r"1 of these videos with another label \(1: stored Moving something"):
        extract(config(tmp_path, [labels, train], tok, out))


def test_a_fixed_annotation_problem_is_tried_again(tmp_path, tok):
    labels, train, _ = ssv2_dataset(tmp_path, {"1": 0, "2": 1}, {})
    good = train.read_text()
    rows = json.loads(good)
    rows[1]["template"] = "Dancing"  # not a class of the label file
    train.write_text(json.dumps(rows))
    out = tmp_path / "db"
    assert extract(config(tmp_path, [labels, train], tok, out)).failures_by_reason
    train.write_text(good)  # fixed
    summary = extract(config(tmp_path, [labels, train], tok, out))
    assert (summary.tokenized, summary.failed, summary.total_failures) == (1, 0, 0)
    db = CodeDatabase(out)
    assert db.ids() == ["1", "2"] and db.failures() == []
    db.close()


def test_shards_tokenized_with_one_class_list_merge(tmp_path, tok, capsys):
    """Two `list` shards name different classes; with the same --classes file their databases merge."""
    ssv2_dataset(tmp_path, {"1": 0, "2": 1}, {"3": 2})  # only for its videos
    shards = [tmp_path / "train_a.txt", tmp_path / "train_b.txt"]
    shards[0].write_text("1.mp4 jump\n2.mp4 run\n")
    shards[1].write_text("3.mp4 swim\n")
    names = tmp_path / "classes.txt"
    names.write_text("jump\nrun\nswim\n")
    common = ["tokenize", "--videos", str(tmp_path / "videos"), "--format", "list", "--tokenizer", str(tok)]
    common += ["--fps", "4", "--frame-size", "64", "--workers", "1", "--no-progress"]
    for pinned in (False, True):
        outs = [tmp_path / f"{'pinned' if pinned else 'own'}_{i}" for i in range(2)]
        for shard, out in zip(shards, outs):
            extra = ["--classes", str(names)] if pinned else []
            assert cli_main([*common, "--annotations", str(shard), "--out", str(out), *extra]) == 0
        merged = tmp_path / f"merged_{pinned}"
        code = cli_main(["db", "merge", "--no-progress", str(merged), *map(str, outs)])
        if not pinned:
            assert code == 2 and "classes" in capsys.readouterr().err
            continue
        assert code == 0
        db = CodeDatabase(merged)
        assert db.manifest["classes"] == ["jump", "run", "swim"]
        assert {vid: db.read(vid, db.views[0])[1] for vid in db.ids()} == {"1": 0, "2": 1, "3": 2}
