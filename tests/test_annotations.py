"""Annotation formats end to end: official-layout fixture files + a video root of empty placeholder files.

Expected ids, labels and splits are written out by hand from the fixture files (not derived with the parser's
own rules), so a parser bug cannot agree with itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vimpac.errors import UsageError
from vimpac.tokenization import annotations
from vimpac.tokenization.annotations import FORMATS, Problem, VideoEntry, load_annotations, read_class_list

FIXTURES = Path(__file__).parent / "fixtures" / "annotations"


def touch(root: Path, *relative: str) -> None:
    for name in relative:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def fixture_files(fmt: str) -> list[Path]:
    return sorted((FIXTURES / fmt).iterdir())


def summary(result) -> list[tuple[str, str | None, int, tuple[str, ...]]]:
    """(id, path relative to the root or None, label, splits) per entry, in the returned order."""
    return [(e.id, e.path.name if e.path else None, e.label, e.splits) for e in result.entries]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def usage_error(fmt: str, files, root: Path) -> str:
    with pytest.raises(UsageError) as info:
        load_annotations(fmt, files, root)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Each format on its fixtures


def test_ssv2(tmp_path):
    touch(tmp_path, *[f"{i}.webm" for i in ("78687", "42326", "100904", "80715", "74225", "116154", "1420")])
    result = load_annotations("ssv2", fixture_files("ssv2"), tmp_path)
    assert result.dataset == "ssv2"
    assert result.classes == [
        "Approaching something with your camera",
        "Holding something next to something",
        "Pretending to pick something up",
        "Putting something on a surface",
        "Pushing something from left to right",
    ]
    assert summary(result) == [
        ("100904", "100904.webm", 4, ("train",)),
        ("116154", "116154.webm", 3, ("val",)),
        ("1420", "1420.webm", -1, ("test",)),
        ("146700", None, -1, ("test",)),
        ("34899", None, 0, ("train",)),
        ("42326", "42326.webm", 3, ("train",)),
        ("74225", "74225.webm", 2, ("val",)),
        ("78687", "78687.webm", 1, ("train",)),
    ]
    assert result.entries[0].path == tmp_path / "100904.webm"
    by_id = {p.id: p for p in result.problems}
    assert sorted(by_id) == ["146700", "34899", "80715"]
    assert by_id["80715"].stage == "annotation"
    assert by_id["80715"].path == str(tmp_path / "80715.webm")
    assert "'Spinning something so it continues spinning'" in by_id["80715"].reason
    assert "something-something-v2-train.json item 4" in by_id["80715"].reason
    assert by_id["34899"] == Problem(
        "34899",
        None,
        "locate",
        f"video file not found: tried {tmp_path}/34899.webm, {tmp_path}/34899.*, {tmp_path}/**/34899.*",
    )
    assert result.splits() == {
        "test": ["1420", "146700"],
        "train": ["100904", "34899", "42326", "78687"],
        "val": ["116154", "74225"],
    }


UCF_VIDEOS = [
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g15_c02.avi",
    "ApplyLipstick/v_ApplyLipstick_g01_c01.avi",
    "ApplyLipstick/v_ApplyLipstick_g09_c03.avi",
    "Archery/v_Archery_g16_c01.avi",
    "HandstandPushups/v_HandStandPushups_g01_c01.avi",
    "HandstandPushups/v_HandStandPushups_g10_c02.avi",
]


def test_ucf101_three_splits_merge_per_video(tmp_path):
    assert b"\r\n" in (FIXTURES / "ucf101" / "trainlist01.txt").read_bytes()  # the official CRLF files
    touch(tmp_path, *[v for v in UCF_VIDEOS if "Archery" not in v])
    result = load_annotations("ucf101", fixture_files("ucf101"), tmp_path)
    assert result.classes == ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "HandstandPushups"]
    # Groups 1-7 are tested in split 1, 8-14 in split 2, 15-21 in split 3.
    split_of_group = {
        "g01": ("test_1", "train_2", "train_3"),
        "g08": ("test_2", "train_1", "train_3"),
        "g09": ("test_2", "train_1", "train_3"),
        "g10": ("test_2", "train_1", "train_3"),
        "g15": ("test_3", "train_1", "train_2"),
        "g16": ("test_3", "train_1", "train_2"),
    }
    assert summary(result) == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "v_ApplyEyeMakeup_g01_c01.avi", 0, split_of_group["g01"]),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "v_ApplyEyeMakeup_g08_c01.avi", 0, split_of_group["g08"]),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g15_c02", "v_ApplyEyeMakeup_g15_c02.avi", 0, split_of_group["g15"]),
        ("ApplyLipstick/v_ApplyLipstick_g01_c01", "v_ApplyLipstick_g01_c01.avi", 1, split_of_group["g01"]),
        ("ApplyLipstick/v_ApplyLipstick_g09_c03", "v_ApplyLipstick_g09_c03.avi", 1, split_of_group["g09"]),
        ("Archery/v_Archery_g16_c01", None, 2, split_of_group["g16"]),
        ("HandstandPushups/v_HandStandPushups_g01_c01", "v_HandStandPushups_g01_c01.avi", 3, split_of_group["g01"]),
        ("HandstandPushups/v_HandStandPushups_g10_c02", "v_HandStandPushups_g10_c02.avi", 3, split_of_group["g10"]),
    ]
    # Six files mention each video: repeats with the same label are one entry, not duplicates.
    assert [(p.id, p.stage) for p in result.problems] == [("Archery/v_Archery_g16_c01", "locate")]
    assert result.problems[0].reason.startswith(f"video file not found: tried {tmp_path}/Archery/v_Archery_g16_c01.avi")
    splits = result.splits()
    assert sorted(splits) == ["test_1", "test_2", "test_3", "train_1", "train_2", "train_3"]
    assert splits["test_1"] == [
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01",
        "ApplyLipstick/v_ApplyLipstick_g01_c01",
        "HandstandPushups/v_HandStandPushups_g01_c01",
    ]
    assert len(splits["train_1"]) == 5


def test_ucf101_flat_video_folder_is_found_by_name(tmp_path):
    touch(tmp_path, *[f"UCF-101-flat/{Path(v).name}" for v in UCF_VIDEOS])
    result = load_annotations("ucf101", fixture_files("ucf101"), tmp_path)
    assert result.problems == []
    assert [e.id for e in result.entries] == sorted(f"UCF-101-flat/{Path(v).stem}" for v in UCF_VIDEOS)


HMDB_VIDEOS = [
    "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
    "brush_hair/Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi",
    "brush_hair/Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0.avi",
    "cartwheel/(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0.avi",
    "cartwheel/Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8.avi",
    "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi",
    "fall_floor/Aussie_Rules_The_Tackle_Vid_fall_floor_f_cm_np1_ba_bad_0.avi",
]


def test_hmdb51(tmp_path):
    assert (FIXTURES / "hmdb51" / "clap_test_split1.txt").read_bytes().endswith(b" 1 \n")  # official trailing space
    touch(tmp_path, *HMDB_VIDEOS)
    result = load_annotations("hmdb51", fixture_files("hmdb51"), tmp_path)
    assert result.classes == ["brush_hair", "cartwheel", "clap", "fall_floor"]
    assert [(e.id, e.label, e.splits) for e in result.entries] == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0", 0, ("test_2", "test_3", "train_1")),
        ("brush_hair/Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0", 0, ("test_1", "train_2")),
        ("cartwheel/(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0", 1, ("test_3", "train_1", "train_2")),
        ("cartwheel/Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8", 1, ("test_1", "train_3")),
        ("clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0", 2, ("test_2", "train_1", "train_3")),
        ("fall_floor/Aussie_Rules_The_Tackle_Vid_fall_floor_f_cm_np1_ba_bad_0", 3, ("test_1", "train_2", "train_3")),
    ]
    assert all(e.path == tmp_path / f"{e.id}.avi" for e in result.entries)
    assert result.problems == []  # the video marked 0 in every split is simply not part of the dataset


def test_kinetics_flat_nested_and_renamed_folders(tmp_path):
    touch(
        tmp_path,
        "train/abseiling/---QUuC4vJs_000084_000094.mp4",
        "--Ev3XfRnFI_000021_000031.mp4",
        "train/massaging_person's_head/-0Ke4NNVdRE_000000_000010.mp4",
        "train/passing American football (in game)/-5bvb5Gpzv0_000117_000127.mp4",
        "kinetics400_val_256/abseiling/0wR5jVB-WPk_000417_000427.mp4",
        "val/zumba/-FY2_0X5xsc_000045_000055.mp4",
        "test/--6bJUbfpnQ_000017_000027.mp4",
        "-0Ii5cd1GnU_000005_000015.mp4",
    )
    result = load_annotations("kinetics", fixture_files("kinetics"), tmp_path)
    assert result.classes == ["abseiling", "massaging person's head", "passing American football (in game)", "zumba"]
    assert sorted((e.id, e.label, e.splits, e.path is not None) for e in result.entries) == [
        ("--Ev3XfRnFI_000021_000031", 0, ("train",), True),
        ("-0Ii5cd1GnU_000005_000015", -1, ("test",), True),
        ("-0WnNA6VNBM_000001_000011", 3, ("train",), False),
        ("kinetics400_val_256/abseiling/0wR5jVB-WPk_000417_000427", 0, ("val",), True),
        ("test/--6bJUbfpnQ_000017_000027", -1, ("test",), True),
        ("train/abseiling/---QUuC4vJs_000084_000094", 0, ("train",), True),
        ("train/massaging_person's_head/-0Ke4NNVdRE_000000_000010", 1, ("train",), True),
        ("train/passing American football (in game)/-5bvb5Gpzv0_000117_000127", 2, ("train",), True),
        ("val/zumba/-FY2_0X5xsc_000045_000055", 3, ("val",), True),
    ]
    assert [e.id for e in result.entries] == sorted(e.id for e in result.entries)
    (problem,) = result.problems
    assert (problem.id, problem.stage) == ("-0WnNA6VNBM_000001_000011", "locate")
    assert f"{tmp_path}/train/zumba/-0WnNA6VNBM_000001_000011.mp4" in problem.reason


def test_a_class_list_file_pins_the_labels_of_a_shard(tmp_path):
    """Kinetics' validate.csv alone names two classes; with the full list, its labels are the full dataset's."""
    touch(
        tmp_path,
        "kinetics400_val_256/abseiling/0wR5jVB-WPk_000417_000427.mp4",
        "val/zumba/-FY2_0X5xsc_000045_000055.mp4",
    )
    shard = [FIXTURES / "kinetics" / "validate.csv"]
    assert load_annotations("kinetics", shard, tmp_path).classes == ["abseiling", "zumba"]
    names = tmp_path / "classes.txt"
    names.write_text("# Kinetics, in label order\nabseiling\nmassaging person's head\n\nzumba\n")
    pinned = read_class_list(names)
    result = load_annotations("kinetics", shard, tmp_path, classes=pinned)
    assert result.classes == ["abseiling", "massaging person's head", "zumba"]
    assert [(e.id.rsplit("/", 1)[1], e.label) for e in result.entries] == [
        ("0wR5jVB-WPk_000417_000427", 0),
        ("-FY2_0X5xsc_000045_000055", 2),
    ]
    # a class the list lacks makes that video an annotation problem, not a new label
    result = load_annotations("kinetics", shard, tmp_path, classes=["zumba"])
    assert [(e.id.rsplit("/", 1)[1], e.label) for e in result.entries] == [("-FY2_0X5xsc_000045_000055", 0)]
    (problem,) = result.problems
    assert (
        problem.stage == "annotation"
        and "class 'abseiling' (validate.csv:2) is not in the --classes list" in problem.reason
    )
    names.write_text("a\nb\na\n")
    with pytest.raises(UsageError, match="names 'a' more than once"):
        read_class_list(names)
    with pytest.raises(UsageError, match="does not exist"):
        read_class_list(tmp_path / "missing.txt")


def test_diving48_with_vocab(tmp_path):
    names = ["-mmq0PT-u8k_00155", "-mmq0PT-u8k_00160", "_8Vy3dlHg2w_00000", "0bJAXt-Sq5Y_00013", "3N1kUtqJ25A_00005"]
    touch(tmp_path, *[f"rgb/{n}.mp4" for n in names])
    result = load_annotations("diving48", fixture_files("diving48"), tmp_path)
    assert result.classes == ["Back 15som 05Twis FREE", "Back 15som 15Twis FREE", "Back 15som NoTwis PIKE"]
    assert summary(result) == [
        ("rgb/-mmq0PT-u8k_00155", "-mmq0PT-u8k_00155.mp4", 0, ("train",)),
        ("rgb/-mmq0PT-u8k_00160", "-mmq0PT-u8k_00160.mp4", 2, ("train",)),
        ("rgb/3N1kUtqJ25A_00005", "3N1kUtqJ25A_00005.mp4", 1, ("val",)),
        ("rgb/_8Vy3dlHg2w_00000", "_8Vy3dlHg2w_00000.mp4", 1, ("train",)),
    ]
    (problem,) = result.problems
    assert (problem.id, problem.stage) == ("rgb/0bJAXt-Sq5Y_00013", "annotation")
    assert "unknown label 7" in problem.reason and "3 classes" in problem.reason


def test_diving48_without_vocab_numbers_the_48_classes(tmp_path):
    files = [FIXTURES / "diving48" / "Diving48_V2_test.json"]
    result = load_annotations("diving48", files, tmp_path)
    assert result.classes == [str(i) for i in range(48)]
    assert [(e.id, e.label, e.splits, e.path) for e in result.entries] == [("3N1kUtqJ25A_00005", 1, ("val",), None)]


def test_howto100m_any_extension_and_shards(tmp_path):
    touch(
        tmp_path,
        "a/nVbIUDjzWY4.mp4",
        "a/._nVbIUDjzWY4.mp4",  # macOS resource fork: not a video
        "CTPAZ2euJ2Q.webm",
        "b/-dh_uGahzYo.mkv",
        "b/-dh_uGahzYo.info.json",
        "a47nTSDfXCE.mp4.part",  # unfinished download: not a video
    )
    result = load_annotations("howto100m", fixture_files("howto100m"), tmp_path)
    assert result.classes == []
    assert summary(result) == [
        ("CTPAZ2euJ2Q", "CTPAZ2euJ2Q.webm", -1, ("train",)),
        ("a/nVbIUDjzWY4", "nVbIUDjzWY4.mp4", -1, ("train",)),
        ("a47nTSDfXCE", None, -1, ("train",)),
        ("b/-dh_uGahzYo", "-dh_uGahzYo.mkv", -1, ("train",)),
    ]
    assert [(p.id, p.stage) for p in result.problems] == [("a47nTSDfXCE", "locate")]
    assert result.problems[0].reason == (
        f"video file not found: tried {tmp_path}/a47nTSDfXCE.*, {tmp_path}/**/a47nTSDfXCE.*"
    )


def test_list_integer_ids(tmp_path):
    touch(
        tmp_path,
        "-mmq0PT-u8k_00155.mp4",
        "clips/_8Vy3dlHg2w_00000.mp4",
        "clips/0bJAXt-Sq5Y_00013.mkv",  # listed as .mp4: any video extension at the listed place is accepted
        "3N1kUtqJ25A_00005.mp4",
        "elsewhere/-mmq0PT-u8k_00160.mp4",  # 'list' paths are exact: not searched for elsewhere
    )
    result = load_annotations("list", fixture_files("list"), tmp_path)
    assert result.classes == ["0", "1", "2"]
    assert summary(result) == [
        ("-mmq0PT-u8k_00155", "-mmq0PT-u8k_00155.mp4", 0, ("train",)),
        ("-mmq0PT-u8k_00160", None, -1, ("val",)),
        ("3N1kUtqJ25A_00005", "3N1kUtqJ25A_00005.mp4", 1, ("val",)),
        ("clips/0bJAXt-Sq5Y_00013", "0bJAXt-Sq5Y_00013.mkv", 2, ("train",)),
        ("clips/_8Vy3dlHg2w_00000", "_8Vy3dlHg2w_00000.mp4", 1, ("train",)),
    ]
    assert result.problems == [
        Problem(
            "-mmq0PT-u8k_00160",
            None,
            "locate",
            f"video file not found: tried {tmp_path}/-mmq0PT-u8k_00160.mp4, {tmp_path}/-mmq0PT-u8k_00160.*",
        )
    ]


def test_list_class_names_absolute_paths_and_repeats(tmp_path):
    root = tmp_path / "videos"
    touch(root, "x/a.mp4", "x/b.mp4", "c.avi")
    train = write(tmp_path / "lists" / "train.txt", f"x/a.mp4 walk\n{root}/x/b.mp4 run\n  \n# c.avi walk\n")
    val = write(tmp_path / "lists" / "val.txt", "./x/a.mp4 walk\nc.avi jump\n")
    result = load_annotations("list", [train, val], root)
    assert result.classes == ["jump", "run", "walk"]
    assert result.entries == [
        VideoEntry("c", root / "c.avi", 0, ("val",)),
        VideoEntry("x/a", root / "x/a.mp4", 2, ("train", "val")),
        VideoEntry("x/b", root / "x/b.mp4", 1, ("train",)),
    ]
    assert result.problems == []


def test_every_format_has_fixtures():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(FORMATS)


# ----------------------------------------------------------------------------------------------------------------
# Per-video problems


def test_an_id_too_long_for_a_record_key_is_a_problem_not_a_crash(tmp_path):
    deep = "/".join(["d" * 200, "e" * 200, "f" * 150])  # 552 bytes: over LMDB's 511-byte keys
    touch(tmp_path, f"{deep}.mp4", "short.mp4")
    result = load_annotations("list", [write(tmp_path / "train.txt", f"{deep}.mp4 cat\nshort.mp4 dog\n")], tmp_path)
    assert [e.id for e in result.entries] == ["short"]
    (problem,) = result.problems
    assert problem.id == deep and problem.stage == "annotation" and "511 bytes" in problem.reason


def test_duplicate_id_with_conflicting_labels(tmp_path):
    touch(tmp_path, "a.mp4", "b.mp4")
    train = write(tmp_path / "train.txt", "a.mp4 cat\nb.mp4 cat\n")
    val = write(tmp_path / "val.txt", "a.mp4 dog\nb.mp4 cat\n")
    result = load_annotations("list", [train, val], tmp_path)
    assert result.entries == [VideoEntry("b", tmp_path / "b.mp4", 0, ("train", "val"))]
    assert result.problems == [
        Problem(
            "a",
            str(tmp_path / "a.mp4"),
            "annotation",
            "duplicate id 'a' with conflicting labels: 'cat' (train.txt:1), 'dog' (val.txt:1)",
        )
    ]


def test_unlabeled_mention_does_not_conflict(tmp_path):
    touch(tmp_path, "a.mp4")
    listing = write(tmp_path / "all.txt", "a.mp4 3\na.mp4 -1\na.mp4\n")
    result = load_annotations("list", [listing], tmp_path)
    assert result.entries == [VideoEntry("a", tmp_path / "a.mp4", 3, ("all",))]
    assert result.classes == ["0", "1", "2", "3"]


def test_ssv2_same_id_in_train_and_validation_with_other_template(tmp_path):
    labels = FIXTURES / "ssv2" / "something-something-v2-labels.json"
    item = '{{"id":"7","label":"x","template":"{}","placeholders":["x"]}}'
    train = write(
        tmp_path / "something-something-v2-train.json", f"[{item.format('Putting [something] on a surface')}]"
    )
    val = write(
        tmp_path / "something-something-v2-validation.json", f"[{item.format('Pretending to pick [something] up')}]"
    )
    result = load_annotations("ssv2", [labels, train, val], tmp_path)
    assert result.entries == []
    (problem,) = result.problems
    assert problem.stage == "annotation" and problem.path is None
    assert problem.reason.startswith("duplicate id '7' with conflicting labels: 'Pretending to pick something up'")


def test_ucf101_unknown_folder_and_disagreeing_label(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    write(lists / "classInd.txt", "1 ApplyEyeMakeup\r\n2 Archery\r\n")
    write(
        lists / "trainlist01.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\r\nArchery/v_Archery_g08_c01.avi 2\r\n",
    )
    write(lists / "testlist01.txt", "YoYo/v_YoYo_g01_c01.avi\r\nArchery/v_Archery_g01_c01.avi\r\n")
    touch(tmp_path / "videos", "Archery/v_Archery_g08_c01.avi", "Archery/v_Archery_g01_c01.avi")
    result = load_annotations("ucf101", sorted(lists.iterdir()), tmp_path / "videos")
    assert [(e.id, e.label, e.splits) for e in result.entries] == [
        ("Archery/v_Archery_g01_c01", 1, ("test_1",)),
        ("Archery/v_Archery_g08_c01", 1, ("train_1",)),
    ]
    reasons = {p.id: (p.stage, p.reason) for p in result.problems}
    # One problem per id: the annotation problem, even though the file is also missing.
    assert reasons == {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01": (
            "annotation",
            "label 2 (trainlist01.txt:1) disagrees with the folder 'ApplyEyeMakeup' (class 1)",
        ),
        "YoYo/v_YoYo_g01_c01": ("annotation", "unknown label 'YoYo' (testlist01.txt:1): not in classInd.txt"),
    }


def test_ambiguous_file_name_is_a_locate_problem(tmp_path):
    touch(tmp_path, "part1/abc.mp4", "part2/abc.webm", "part2/def.mp4")
    csv_file = write(
        tmp_path / "HowTo100M_v1.csv", "video_id,category_1,category_2,rank,task_id\nabc,A,B,1,2\ndef,A,B,1,2\n"
    )
    result = load_annotations("howto100m", [csv_file], tmp_path)
    assert [(e.id, e.path) for e in result.entries] == [("abc", None), ("part2/def", tmp_path / "part2/def.mp4")]
    (problem,) = result.problems
    assert (problem.id, problem.stage) == ("abc", "locate")
    assert problem.reason.startswith("video file is ambiguous: 2 files named 'abc'")
    assert f"{tmp_path}/part1/abc.mp4" in problem.reason and f"{tmp_path}/part2/abc.webm" in problem.reason


def test_expected_extension_wins_over_other_videos(tmp_path):
    touch(tmp_path, "1.mp4", "1.webm", "2.mkv", "2.avi")
    csv_file = write(
        tmp_path / "HowTo100M_v1.csv", "video_id,category_1,category_2,rank,task_id\n1,A,B,1,2\n2,A,B,1,2\n"
    )
    result = load_annotations("howto100m", [csv_file], tmp_path)
    assert [e.path.name for e in result.entries] == ["1.mp4", "2.mkv"]  # VIDEO_EXTENSIONS order
    labels = FIXTURES / "ssv2" / "something-something-v2-test.json"
    touch(tmp_path, "1420.mp4", "1420.webm")
    assert load_annotations("ssv2", [labels], tmp_path).entries[0].path == tmp_path / "1420.webm"


def test_symlink_loop_in_video_root_terminates(tmp_path):
    touch(tmp_path, "data/abc.mp4")
    os.symlink(tmp_path, tmp_path / "data" / "loop")
    csv_file = write(tmp_path / "HowTo100M_v1.csv", "video_id,category_1,category_2,rank,task_id\nabc,A,B,1,2\n")
    result = load_annotations("howto100m", [csv_file], tmp_path)
    assert [e.id for e in result.entries] == ["data/abc"] and result.problems == []


# ----------------------------------------------------------------------------------------------------------------
# Bad input: UsageError before any work


@pytest.fixture
def no_scan(monkeypatch):
    """Fail the test if the video root would be scanned: errors must come first."""

    def refuse(root):
        raise AssertionError("the video root was scanned before the annotation files were checked")

    monkeypatch.setattr(annotations, "_VideoIndex", refuse)


def test_unknown_format_lists_valid_ones(tmp_path, no_scan):
    message = usage_error("kinetics400", fixture_files("kinetics"), tmp_path)
    assert "'kinetics400'" in message and "ssv2, ucf101, hmdb51, kinetics, diving48, howto100m, list" in message


def test_missing_annotation_file_and_no_files(tmp_path, no_scan):
    assert usage_error("ssv2", [tmp_path / "nope.json"], tmp_path) == f"annotation file not found: {tmp_path}/nope.json"
    assert "no annotation files" in usage_error("ssv2", [], tmp_path)


def test_video_root_missing_or_a_file(tmp_path, no_scan):
    message = usage_error("ssv2", fixture_files("ssv2"), tmp_path / "videos")
    assert f"video root {tmp_path}/videos does not exist" in message
    message = usage_error("ssv2", fixture_files("ssv2"), FIXTURES / "ssv2" / "something-something-v2-test.json")
    assert "is not a directory" in message


def test_wrong_file_for_the_format(tmp_path, no_scan):
    message = usage_error("ssv2", [FIXTURES / "kinetics" / "train.csv"], tmp_path)
    assert message.startswith(f"{FIXTURES}/kinetics/train.csv:1: not valid JSON")
    assert "something-something-v2-labels.json" in message
    message = usage_error("ucf101", fixture_files("hmdb51")[:1], tmp_path)
    assert "brush_hair_test_split1.txt" in message and "classInd.txt" in message
    message = usage_error("hmdb51", [FIXTURES / "ucf101" / "classInd.txt"], tmp_path)
    assert "classInd.txt" in message and "<class>_test_split{1,2,3}.txt" in message
    message = usage_error("howto100m", [FIXTURES / "kinetics" / "train.csv"], tmp_path)
    assert "train.csv:1" in message and "video_id" in message
    message = usage_error("kinetics", [FIXTURES / "howto100m" / "HowTo100M_v1.csv"], tmp_path)
    assert "youtube_id, time_start, time_end" in message
    message = usage_error("diving48", [FIXTURES / "ssv2" / "something-something-v2-labels.json"], tmp_path)
    assert "a JSON dict" in message and "Diving48_V2_{train,test}.json" in message


def test_ssv2_bad_inputs(tmp_path, no_scan):
    train = FIXTURES / "ssv2" / "something-something-v2-train.json"
    assert "no something-something-v2-labels.json was given" in usage_error("ssv2", [train], tmp_path)
    labels = FIXTURES / "ssv2" / "something-something-v2-labels.json"
    bad = write(tmp_path / "something-something-v2-train.json", '[{"id": "1", "label": "x"}]')
    message = usage_error("ssv2", [labels, bad], tmp_path)
    assert "item 1" in message and "{id, label, template, placeholders}" in message
    odd = write(tmp_path / "mine.json", '[{"id": "1"}]')
    assert "cannot tell the split of" in usage_error("ssv2", [labels, odd], tmp_path)
    gaps = write(tmp_path / "labels.json", '{"a": "0", "b": "2"}')
    assert "class ids must be 0..1" in usage_error("ssv2", [gaps], tmp_path)


def test_ucf101_bad_inputs(tmp_path, no_scan):
    classes = FIXTURES / "ucf101" / "classInd.txt"
    assert "needs classInd.txt" in usage_error("ucf101", [FIXTURES / "ucf101" / "testlist01.txt"], tmp_path)
    bad = write(
        tmp_path / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nApplyLipstick/x.avi one\n"
    )
    message = usage_error("ucf101", [classes, bad], tmp_path)
    assert message.startswith(f"{bad}:2: 'ApplyLipstick/x.avi one'; expected 'Class/v_Class_g01_c01.avi 1'")
    no_folder = write(tmp_path / "testlist01.txt", "v_ApplyEyeMakeup_g01_c01.avi\n")
    assert f"{no_folder}:1:" in usage_error("ucf101", [classes, no_folder], tmp_path)
    bad_classes = write(tmp_path / "x" / "classInd.txt", "1 ApplyEyeMakeup\nArchery\n")
    assert f"{bad_classes}:2:" in usage_error("ucf101", [bad_classes], tmp_path)
    zero_based = write(tmp_path / "y" / "classInd.txt", "0 ApplyEyeMakeup\n1 Archery\n")
    assert "classInd.txt ids are 1-based" in usage_error("ucf101", [zero_based], tmp_path)


def test_hmdb51_bad_line(tmp_path, no_scan):
    bad = write(tmp_path / "clap_test_split1.txt", "a.avi 1 \nb.avi 3 \n")
    message = usage_error("hmdb51", [bad], tmp_path)
    assert message.startswith(f"{bad}:2: 'b.avi 3'; expected '<video>.avi <1|2|0>'")


def test_kinetics_bad_inputs(tmp_path, no_scan):
    header = "label,youtube_id,time_start,time_end,split\n"
    no_header = write(tmp_path / "a.csv", "abseiling,---QUuC4vJs,84,94,train\n")
    assert "lacks column(s) youtube_id" in usage_error("kinetics", [no_header], tmp_path)
    bad_time = write(tmp_path / "b.csv", header + "abseiling,x,84,94,train\nabseiling,y,1.5,11,train\n")
    assert f"{bad_time}:3: time '1.5'" in usage_error("kinetics", [bad_time], tmp_path)
    bad_split = write(tmp_path / "c.csv", header + "abseiling,x,84,94,holdout\n")
    assert f"{bad_split}:2: split 'holdout'" in usage_error("kinetics", [bad_split], tmp_path)
    short = write(tmp_path / "d.csv", header + "abseiling,x,84,94\n")
    assert f"{short}:2: 4 fields where the header has 5" in usage_error("kinetics", [short], tmp_path)


def test_kinetics_split_from_file_name_without_split_column(tmp_path):
    listing = write(tmp_path / "validate.csv", "label,youtube_id,time_start,time_end\nzumba,x,3,13\n")
    result = load_annotations("kinetics", [listing], tmp_path)
    assert [(e.id, e.label, e.splits) for e in result.entries] == [("x_000003_000013", 0, ("val",))]


def test_diving48_bad_inputs(tmp_path, no_scan):
    vocab = write(tmp_path / "Diving48_vocab.json", '["Back 15som", 3]')
    assert "list of word lists" in usage_error("diving48", [vocab], tmp_path)
    bad = write(tmp_path / "Diving48_V2_train.json", '[{"vid_name": "a", "label": "0"}]')
    assert "item 1" in usage_error("diving48", [bad], tmp_path)


def test_list_bad_inputs(tmp_path, no_scan):
    rawframes = write(tmp_path / "train.txt", "# header\nrawframes/a 150 3\n")
    assert f"{rawframes}:2: 'rawframes/a 150 3' has 3 fields" in usage_error("list", [rawframes], tmp_path)
    mixed = write(tmp_path / "val.txt", "a.mp4 3\nb.mp4 walk\n")
    message = usage_error("list", [mixed], tmp_path)
    assert "mixes integer class ids (val.txt:1) and class names (val.txt:2)" in message
    outside = write(tmp_path / "test.txt", "../a.mp4 3\n")
    assert "leaves the video root" in usage_error("list", [outside], tmp_path)
    negative = write(tmp_path / "neg.txt", "a.mp4 -2\n")
    assert "class ids are >= 0" in usage_error("list", [negative], tmp_path)
    elsewhere = write(tmp_path / "abs.txt", "/somewhere/else/a.mp4\n")
    assert "is not under the video root" in usage_error("list", [elsewhere], tmp_path)


def test_binary_file_is_not_an_annotation(tmp_path, no_scan):
    binary = tmp_path / "train.txt"
    binary.write_bytes(b"\x00\xff\xfe video bytes")
    assert "is not a UTF-8 text file" in usage_error("list", [binary], tmp_path)
    assert "is a directory" in usage_error("list", [tmp_path], tmp_path)


def test_list_zero_padded_ids_are_the_same_class(tmp_path):
    touch(tmp_path, "a.mp4", "b.mp4", "c.mp4")
    listing = tmp_path / "train.txt"
    listing.write_text("a.mp4 01\nb.mp4 1\nc.mp4 -0\n")
    result = load_annotations("list", [listing], tmp_path)
    assert result.classes == ["0", "1"]
    assert [(vid, label) for vid, _, label, _ in summary(result)] == [("a", 1), ("b", 1), ("c", 0)]
