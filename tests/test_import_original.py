"""`vimpac db import-original`: the original release's token LMDBs become a code database with every video's
tokens and label exactly, splits from the annotation lists, failures from err_filepaths.txt, any key (spaces, #, &,
parentheses, non-ASCII) intact, several directories as views, resumable and verifiable; other LMDBs are refused.

The fixture LMDB was written by the original extractor's own code (its README says how); the tests that need it
skip without the shared fixtures folder, the others write small LMDBs in the original format themselves.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest

from vimpac import original_db
from vimpac.cli import main
from vimpac.code_db import CodeDatabase, CodeDatabaseWriter, encode_record
from vimpac.errors import UsageError
from vimpac.original_db import import_original, parse_directory_name, read_annotations, verify

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "original-release"
LMDB_NAME = "dalle_ucf101_train_val_fps16_hflip0_32center32"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"the original-release fixtures are not at {FIXTURES} (shared fixtures folder absent)"
)
# The fixture README's table: key → (label, frames).
FIXTURE_VIDEOS = {
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01": (0, 3),
    "ApplyLipstick/v_ApplyLipstick_g09_c02": (1, 10),
    "Archery/v_Archery_g16_c03": (2, 17),
    "BabyCrawling/v_BabyCrawling_g23_c01": (3, 24),
    "BalanceBeam/v_BalanceBeam_g05_c04": (4, 40),
}


def original_values(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Every (tokens, label) of an original LMDB, read the way the original trainer reads it."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {}
        for key, value in txn.cursor():
            archive = np.load(io.BytesIO(value))
            out[key.decode("utf-8")] = (archive["tokens"], int(archive["label"]))
    env.close()
    return out


def write_original(
    folder: Path, videos: dict[str, tuple[np.ndarray, int]], errors: list[str] = (), args: dict | None = None
) -> Path:
    """An LMDB in the original extractor's format (np.savez values, int16), with err_filepaths.txt and args.json."""
    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, (tokens, label) in videos.items():
            buffer = io.BytesIO()
            np.savez(buffer, tokens=tokens.astype(np.int16), label=np.array(label).astype(np.int16))
            txn.put(str(key).encode("utf-8"), buffer.getvalue())
    env.close()
    (folder / "err_filepaths.txt").write_text("\n".join(errors))
    if args is not None:
        (folder / "args.json").write_text(json.dumps(args, indent=4))
    return folder


def random_videos(keys: list[str], grid: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return {k: (rng.integers(0, 8192, size=(3 + 2 * i, grid, grid)), i % 3) for i, k in enumerate(keys)}


def read_back(db_path: Path) -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    db = CodeDatabase(db_path)
    out = {view: {i: tuple(db.read(i, view)) for i in db.ids()} for view in db.views}
    db.close()
    return out


# ------------------------------------------------------------------------------------------------ the fixture


@needs_fixtures
def test_fixture_lmdb_imports_every_video_exactly(tmp_path, capsys):
    source = FIXTURES / "lmdb" / LMDB_NAME
    out = tmp_path / "db"
    cmd = ["db", "import-original", str(source), "--out", str(out), "--annotations", str(FIXTURES / "anno")]
    assert main([*cmd, "--verify", "--no-progress"]) == 0
    assert "0 differences" in capsys.readouterr().out
    db = CodeDatabase(out)
    assert db.views == ["r32_center_f0"] and db.complete
    m = db.manifest
    assert (m["dataset"], m["fps"], m["frame_size"], m["grid"]) == ("ucf101", 16, 32, [4, 4])
    assert m["tokenizer"]["vocab_size"] == 8192 and m["tokenizer"]["fp16"] is True
    assert m["classes"] == [k.split("/")[0] for k in FIXTURE_VIDEOS]
    originals = original_values(source)
    assert sorted(db.ids()) == sorted(originals) == sorted(FIXTURE_VIDEOS)
    for video, (tokens, label) in originals.items():
        codes, stored = db.read(video, "r32_center_f0")
        assert codes.dtype == np.int16 and np.array_equal(codes, tokens) and stored == label
        assert (stored, codes.shape[0]) == FIXTURE_VIDEOS[video]
    # splits: the six annotation lists (val of split k is UCF101's test_k)
    lists = FIXTURES / "anno" / "ucf101"
    for role, split in (("train", "train"), ("val", "test")):
        for k in (1, 2, 3):
            lines = (lists / f"ucf101_{role}_split_{k}_videos.txt").read_text().split("\n")
            expected = sorted(line.split()[0].rsplit(".", 1)[0] for line in lines if line.strip())
            assert db.splits[f"{split}_{k}"] == expected
    # failures: what err_filepaths.txt lists (nothing here)
    assert (source / "err_filepaths.txt").read_text() == "" and db.failures() == []
    db.close()
    # where it came from: the manifest and `vimpac db inspect`
    assert m["source"]["directories"][0]["path"] == str(source)
    assert m["source"]["directories"][0]["settings_from"]["fps"] == "args.json"
    assert main(["db", "inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "original-release token LMDB" in report and LMDB_NAME in report and "0 problems" in report


@needs_fixtures
def test_err_filepaths_become_the_failures_log(tmp_path):
    source = tmp_path / LMDB_NAME
    shutil.copytree(FIXTURES / "lmdb" / LMDB_NAME, source)
    source.chmod(0o755)
    (source / "err_filepaths.txt").chmod(0o644)
    # The original writes full paths under its --video_root_dir (args.json), joined by newlines.
    failed = [
        "data/video_anno/ucf101/videos/Basketball/v_Basketball_g01_c01.avi",
        "/elsewhere/Bowling/v_Bowling (1).avi",
    ]
    (source / "err_filepaths.txt").write_text("\n".join(failed))
    out = tmp_path / "db"
    summary = import_original([source], out, progress=False, log=lambda _: None)
    assert summary.imported == 5 and summary.total_failures == 2
    failures = {f["id"]: f for f in CodeDatabase(out).failures()}
    assert set(failures) == {"Basketball/v_Basketball_g01_c01", "elsewhere/Bowling/v_Bowling (1)"}
    assert {f["path"] for f in failures.values()} == set(failed)
    assert {f["stage"] for f in failures.values()} == {"probe"}
    assert all("err_filepaths.txt" in f["reason"] for f in failures.values())
    # without annotation lists the split is the directory's (train_val) and a note says to pass the lists
    assert set(summary.manifest["splits"]) == {"train_val"} and any("--annotations" in n for n in summary.notes)


# --------------------------------------------------------------------------------------- keys, views, resume

ODD_KEYS = [
    "Apply Eye Makeup/v_ApplyEyeMakeup_g01_c01",
    "Jumping #1 & more/clip (copy) 2",
    "Mañana/vídeo_ü_ß",
    "日本語/動画 (1) #&",
    "plain/v_plain",
]


def test_odd_keys_survive_in_several_views(tmp_path):
    videos = random_videos(ODD_KEYS)
    a = write_original(tmp_path / "dalle_ucf101_train_val_fps16_hflip0_32center32", videos)
    b = write_original(tmp_path / "dalle_ucf101_train_val_fps16_hflip1_40top32", videos)
    anno = tmp_path / "anno"
    anno.mkdir()
    # annotation paths carry the extension and may hold spaces (the id is the path without its extension)
    lines = [f"{k}.avi {label}" for k, (_, label) in videos.items()]
    (anno / "ucf101_train_split_1_videos.txt").write_text("\n".join(lines[:3]) + "\n")
    (anno / "ucf101_val_split_1_videos.txt").write_text("\n".join(lines[3:]) + "\n")
    out = tmp_path / "db"
    summary = import_original([a, b], out, annotations=[anno], progress=False, log=lambda _: None)
    assert summary.imported == len(ODD_KEYS) and summary.total_failures == 0
    back = read_back(out)
    assert sorted(back) == ["r32_center_f0", "r40_top_f1"]
    for view in back:
        assert sorted(back[view]) == sorted(ODD_KEYS)
        for key, (tokens, label) in videos.items():
            assert np.array_equal(back[view][key][0], tokens) and back[view][key][1] == label
    assert summary.manifest["splits"] == {"train_1": sorted(ODD_KEYS[:3]), "test_1": sorted(ODD_KEYS[3:])}
    assert verify(out, [a, b]) == []


def test_views_that_disagree_become_failures(tmp_path):
    videos = random_videos(["c/one", "c/two", "c/three", "c/four"])
    other = dict(videos)
    other["c/two"] = (videos["c/two"][0][:-1], videos["c/two"][1])  # one frame fewer
    other["c/three"] = (videos["c/three"][0], videos["c/three"][1] + 1)  # another label
    del other["c/four"]
    a = write_original(tmp_path / "dalle_hmdb51_train_val_fps16_hflip0_32center32", videos)
    b = write_original(tmp_path / "dalle_hmdb51_train_val_fps16_hflip0_32top32", other, errors=["/v/c/four.avi"])
    summary = import_original([a, b], tmp_path / "db", progress=False, log=lambda _: None)
    assert summary.imported == 1
    failures = {f["id"]: f for f in CodeDatabase(tmp_path / "db").failures()}
    assert "frame counts differ" in failures["c/two"]["reason"]
    assert "labels differ" in failures["c/three"]["reason"]
    assert failures["c/four"]["stage"] == "probe" and "not in view r32_top_f0" in failures["c/four"]["reason"]


def test_per_split_directories_join_into_one_view(tmp_path):
    train = write_original(tmp_path / "dalle_sthv2_train_fps16_hflip0_32center32", random_videos(["1", "2", "3"]))
    val = write_original(tmp_path / "dalle_sthv2_val_fps16_hflip0_32center32", random_videos(["7", "8"], seed=1))
    summary = import_original([train, val], tmp_path / "db", progress=False, log=lambda _: None)
    m = summary.manifest
    assert m["dataset"] == "ssv2" and m["views"] == ["r32_center_f0"]
    assert m["splits"] == {"train": ["1", "2", "3"], "val": ["7", "8"]} and m["classes"] == ["0", "1", "2"]
    dup = write_original(tmp_path / "copy" / "dalle_sthv2_val_fps16_hflip0_32center32", random_videos(["3"]))
    with pytest.raises(UsageError, match="same view"):
        import_original([train, dup], tmp_path / "db2", progress=False, log=lambda _: None)


def test_an_interrupted_import_resumes_to_the_same_database(tmp_path, monkeypatch):
    keys = [f"k/{i:02d} #{i}" for i in range(12)]
    source = write_original(tmp_path / "dalle_ucf101_train_val_fps8_hflip0_32center32", random_videos(keys))
    whole = tmp_path / "whole"
    import_original([source], whole, commit_every=2, progress=False, log=lambda _: None)

    calls = {"n": 0}
    real_add = CodeDatabaseWriter.add

    def add_then_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed mid-import
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(CodeDatabaseWriter, "add", add_then_die)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        import_original([source], resumed, commit_every=2, progress=False, log=lambda _: None)
    assert not json.loads((resumed / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(CodeDatabaseWriter, "add", real_add)
    summary = import_original([source], resumed, commit_every=2, progress=False, log=lambda _: None)
    assert summary.skipped == 6 and summary.imported == 6
    a, b = CodeDatabase(whole), CodeDatabase(resumed)
    assert a.ids() == b.ids() == sorted(keys)
    assert all(a.raw(i, "r32_center_f0") == b.raw(i, "r32_center_f0") for i in keys)
    for key in ("splits", "counts", "classes", "views"):
        assert a.manifest[key] == b.manifest[key]
    # a rerun with other settings is refused, naming the difference
    with pytest.raises(UsageError, match="different settings"):
        import_original([source], resumed, fps=4, progress=False, log=lambda _: None)


# ------------------------------------------------------------------------------------ names, overrides, refusals


def test_directory_names_and_overrides(tmp_path):
    assert parse_directory_name(LMDB_NAME) == {
        "tokenizer": "dalle",
        "dataset": "ucf101",
        "split": "train_val",
        "fps": 16,
        "hflip": False,
        "shorter": 32,
        "crop": "center",
        "frame_size": 32,
    }
    assert parse_directory_name("dalle_kinetics400_train_fps2_hflip1_160bottom128")["crop"] == "bottom"
    assert parse_directory_name("my tokens") is None
    renamed = write_original(tmp_path / "my tokens", random_videos(["x/a", "x/b"]))
    with pytest.raises(UsageError, match="pass --dataset, --fps, --frame-size, --views"):
        import_original([renamed], tmp_path / "db", progress=False, log=lambda _: None)
    cmd = ["db", "import-original", str(renamed), "--out", str(tmp_path / "db"), "--no-progress", "--dataset"]
    cmd += ["hmdb51", "--fps", "8", "--frame-size", "32", "--views", "r40_bottom_f1", "--verify"]
    assert main(cmd) == 0  # --verify reads the directory with the same flags
    m = CodeDatabase(tmp_path / "db").manifest
    assert (m["dataset"], m["fps"], m["views"]) == ("hmdb51", 8, ["r40_bottom_f1"])
    assert m["source"]["directories"][0]["settings_from"]["shorter"] == "--views"
    # args.json wins over a hand-edited name (renamed train_val -> train_test, and a wrong fps)
    args = {"dset_name": "ucf101", "fps": 16, "frame_out_size": 32, "frame_shorter_size": 32, "crop_type": "center"}
    args |= {"hflip": False, "fp16": False}
    named = write_original(
        tmp_path / "dalle_ucf101_train_test_fps2_hflip0_32center32", random_videos(["a/b"]), args=args
    )
    summary = import_original([named], tmp_path / "db3", progress=False, log=lambda _: None)
    assert summary.manifest["fps"] == 16 and summary.manifest["tokenizer"]["fp16"] is False
    assert any("fps" in note for note in summary.notes)


def test_lmdbs_not_in_the_original_format_are_refused(tmp_path, capsys):
    vimpac_view = tmp_path / "dalle_ucf101_train_val_fps16_hflip0_32center32"
    env = lmdb.open(str(vimpac_view), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"a/b", encode_record(np.zeros((2, 4, 4), np.int16), 0, 1.0, 16.0))
    env.close()
    with pytest.raises(UsageError, match="does not hold the original release's format"):
        import_original([vimpac_view], tmp_path / "db", progress=False, log=lambda _: None)
    assert not (tmp_path / "db").exists()
    assert main(["db", "import-original", str(vimpac_view), "--out", str(tmp_path / "db2"), "--no-progress"]) == 2
    assert "np.savez" in capsys.readouterr().err
    # an npz with other members, and a plain .npy value
    for name, members in (("npz", {"codes": np.zeros((2, 4, 4))}), ("npy", None)):
        folder = tmp_path / name / "dalle_ucf101_train_val_fps16_hflip0_32center32"
        folder.mkdir(parents=True)
        env = lmdb.open(str(folder), map_size=1 << 24)
        buffer = io.BytesIO()
        if members:
            np.savez(buffer, **members)
        else:
            np.save(buffer, np.zeros((2, 4, 4), np.int16))
        with env.begin(write=True) as txn:
            txn.put(b"a/b", buffer.getvalue())
        env.close()
        with pytest.raises(UsageError, match="original release's format"):
            import_original([folder], tmp_path / name / "db", progress=False, log=lambda _: None)
    with pytest.raises(UsageError, match=r"no data\.mdb"):
        import_original([tmp_path], tmp_path / "db4", progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="tokens and label"):
        original_db.decode_value(_npz(extra=np.zeros(1)))
    tokens, label = original_db.decode_value(_npz())
    assert tokens.shape == (1, 2, 2) and label == 1


def _npz(**members) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, tokens=np.zeros((1, 2, 2), np.int16), label=np.array(1, np.int16), **members)
    return buffer.getvalue()


def test_annotation_lists_with_a_bom_and_labels_that_disagree(tmp_path):
    train = tmp_path / "ucf101_train_split_1_videos.txt"
    train.write_bytes("\ufeffJump/v_Jump_g01_c01.avi 3\nRun/v_Run_g01_c01.avi 5\n".encode())
    test = tmp_path / "ucf101_val_split_1_videos.txt"
    test.write_text("Jump/v_Jump_g01_c01.avi\n")  # unlabeled here: keeps the other list's label
    splits, labels = read_annotations([train, test], "ucf101")
    assert splits == {"train_1": ["Jump/v_Jump_g01_c01", "Run/v_Run_g01_c01"], "test_1": ["Jump/v_Jump_g01_c01"]}
    assert labels == {"Jump/v_Jump_g01_c01": 3, "Run/v_Run_g01_c01": 5}
    test.write_text("Jump/v_Jump_g01_c01.avi 4\n")
    with pytest.raises(UsageError, match="v_Jump_g01_c01 has label 4 here and 3 in an earlier list"):
        read_annotations([train, test], "ucf101")
