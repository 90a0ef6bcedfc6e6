"""Official annotation files → one list of videos with labels and splits: the input of `vimpac tokenize`.

Every format is read from the files exactly as the dataset distributes them (no conversion step):

=========  ==========================================================================================================
ssv2       `something-something-v2-labels.json` ({template: "id"}) and `something-something-v2-{train,validation,
           test}.json` ([{id, label, template, placeholders}], test: [{id}]). Label = template without `[` `]`.
           Video `<id>.webm`. Splits train / val / test (test unlabeled).
ucf101     `classInd.txt` ("1 ApplyEyeMakeup", 1-based), `trainlist0N.txt` ("Class/v_..._c01.avi 1"),
           `testlist0N.txt` ("Class/v_..._c01.avi", label from the folder). Splits train_N / test_N.
hmdb51     `<class>_test_split{1,2,3}.txt` ("<name>.avi 1", 1 train / 2 test / 0 unused). Video `<class>/<name>.avi`.
           Classes sorted by name. Splits train_N / test_N.
kinetics   csv with a header naming `youtube_id,time_start,time_end` and usually `label`, `split` (, `is_cc`).
           Video `<youtube_id>_<start:06d>_<end:06d>.mp4`, flat or under `<split>/<label>/` (label as written or
           with `_` for spaces). Split values train / val|validate|validation / test → train / val / test.
           An empty or absent label is unlabeled (the test csvs). Classes sorted by name.
diving48   `Diving48_V2_{train,test}.json` ([{vid_name, label, start_frame, end_frame}]), optional
           `Diving48_vocab.json` (list of word lists; class name = the words joined by spaces). Video
           `<vid_name>.mp4`. Splits train / val (the test file). Without the vocab, classes are "0".."47"
           (or up to the largest label), so train and val databases built separately get the same class list.
howto100m  `HowTo100M_v1.csv` (`video_id,category_1,category_2,rank,task_id`). Video `<video_id>.<any ext>`.
           Unlabeled; split train.
list       lines "relative/path.ext [label]"; blank lines and lines starting with `#` are skipped. A label that is
           an integer is a class id (classes "0".."max"; -1 = unlabeled), otherwise a class name (classes = the
           sorted names). One file mixing both is refused. Paths cannot contain spaces. Split = the file's stem.
=========  ==========================================================================================================

Video files are found through one scan of the video root (all folders, symlinks followed, dot-files skipped):
first at the expected place(s) with the expected extension, then with any video extension there, then (all
formats but `list`) as the only video file with that name anywhere under the root — so flat, per-class and
`<split>/<label>/` layouts all work. A video id is the path of the file actually found, relative to the root,
without extension ('/'-separated); the expected path when it is missing.

Problems with single videos never stop the run; they are returned for failures.jsonl, one per id:
- stage "annotation": unknown label, or the same id annotated with different labels. Such ids get no entry.
- stage "locate": video file not found (or ambiguous). Such ids keep their entry with `path=None`, so every
  annotated video stays in its splits.
The same video listed several times with the same label (UCF101's three splits, a repeated line) is one entry
with the union of its splits. An unlabeled mention (-1) never conflicts with a labeled one.

Anything wrong with the annotation files themselves (missing, unreadable, not the format's files, a malformed
line) and a missing video root raise `UsageError` before the video root is scanned.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from vimpac.errors import UsageError

FORMATS = ("ssv2", "ucf101", "hmdb51", "kinetics", "diving48", "howto100m", "list")

# What counts as a video file, by extension: the files a folder of videos is searched for (`vimpac predict`, `embed`,
# `train-tokenizer`), and, when a format allows "any extension", the choice among several, in this order.
VIDEO_EXTENSIONS = (
    ".mp4",
    ".webm",
    ".mkv",
    ".avi",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
    ".3gp",
    ".ogv",
    ".ts",
    ".mts",
    ".m2ts",
    ".gif",
)


@dataclass(frozen=True)
class VideoEntry:
    """One annotated video. id: path relative to the video root without extension ('/'-separated); path: the file
    found (None when missing); label: class index into AnnotationSet.classes, -1 when unlabeled; splits: sorted."""

    id: str
    path: Path | None
    label: int
    splits: tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """A video that cannot be used as annotated: stage "annotation" or "locate", with a readable reason."""

    id: str
    path: str | None
    stage: str
    reason: str


@dataclass
class AnnotationSet:
    """A dataset's videos: classes (index = label id), entries (sorted by id, each id once), problems (by id)."""

    dataset: str
    classes: list[str]
    entries: list[VideoEntry]
    problems: list[Problem] = field(default_factory=list)

    def splits(self) -> dict[str, list[str]]:
        """{split name: sorted ids of every entry in it}, entries with a missing file included."""
        out: dict[str, list[str]] = {}
        for entry in self.entries:
            for split in entry.splits:
                out.setdefault(split, []).append(entry.id)
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class _Row:
    """One mention of a video in an annotation file.

    candidates: where the video may be (relative paths without extension, the expected one first); ext: the
    expected extension (None: any video extension); anywhere: also accept a unique file of that name anywhere
    under the root; error: why the mention is unusable (an annotation problem), else None.
    """

    candidates: tuple[str, ...]
    ext: str | None
    anywhere: bool
    label: int
    split: str
    where: str
    error: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except FileNotFoundError:
        raise UsageError(f"annotation file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"annotation file is a directory: {path}; pass the files inside it") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UsageError(f"cannot read annotation file {path}: {err.strerror}") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without surrounding whitespace or CR) for non-blank lines."""
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            yield number, line.strip()


def _read_json(path: Path, expected: str):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); expected {expected}") from None


def _read_csv(path: Path, required: Sequence[str], expected: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) per data row of a csv with a header naming at least `required`."""
    lines = _read_text(path).splitlines()
    reader = csv.reader(lines)
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [name for name in required if name not in header]
    if missing:
        raise UsageError(
            f"{path}:1: header {','.join(header) or '(empty file)'!r} lacks column(s) {', '.join(missing)}; "
            f"expected {expected}"
        )
    for row in reader:
        if not any(value.strip() for value in row):
            continue
        if len(row) != len(header):
            raise UsageError(
                f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}; expected {expected}"
            )
        yield reader.line_num, {name: value.strip() for name, value in zip(header, row)}


def _split_from_name(path: Path, names: dict[str, str], expected: str) -> str:
    """The split named by a word of the file stem (split at non-alphanumerics): '..._V2_test' -> names['test']."""
    words = re.split(r"[^a-z0-9]+", path.stem.lower())
    for word, split in names.items():
        if word in words:
            return split
    raise UsageError(f"cannot tell the split of {path} from its name; expected {expected}")


def _dense_classes(ids: dict[str, int], path: Path) -> list[str]:
    """{name: id} with ids 0..n-1, each once → names in id order."""
    classes = [""] * len(ids)
    for name, index in ids.items():
        if not 0 <= index < len(ids) or classes[index]:
            raise UsageError(f"{path}: class ids must be 0..{len(ids) - 1}, each once; {name!r} has id {index}")
        classes[index] = name
    return classes


# ----------------------------------------------------------------------------------------------------------------
# Formats: each parser reads its files (raising UsageError on bad files) and returns (classes, rows).

_SSV2_EXPECTED = (
    "something-something-v2-labels.json ({template: id}) and something-something-v2-{train,validation,test}.json "
    "([{id, label, template, placeholders}], test: [{id}])"
)


def _parse_ssv2(files: Sequence[Path]) -> tuple[list[str], list[_Row]]:
    label_ids: dict[str, int] = {}
    label_file: Path | None = None
    lists: list[tuple[Path, list]] = []
    for path in files:
        data = _read_json(path, _SSV2_EXPECTED)
        if isinstance(data, dict):
            label_file = path
            for name, value in data.items():
                if not (isinstance(value, (str, int)) and str(value).isdigit()):
                    raise UsageError(f"{path}: label {name!r} has id {value!r}; expected {_SSV2_EXPECTED}")
                label_ids[name] = int(value)
        elif isinstance(data, list):
            lists.append((path, data))
        else:
            raise UsageError(f"{path}: a JSON {type(data).__name__}; expected {_SSV2_EXPECTED}")
    classes = _dense_classes(label_ids, label_file) if label_file else []
    rows = []
    for path, items in lists:
        split = _split_from_name(
            path, {"train": "train", "validation": "val", "val": "val", "test": "test"}, _SSV2_EXPECTED
        )
        for number, item in enumerate(items, 1):
            where = f"{path.name} item {number}"
            labeled = split != "test" or (isinstance(item, dict) and "template" in item)
            if not (
                isinstance(item, dict)
                and isinstance(item.get("id"), (str, int))
                and (not labeled or isinstance(item.get("template"), str))
            ):
                shape = "{id, label, template, placeholders}" if labeled else "{id}"
                raise UsageError(f"{path}: item {number} is {str(item)[:80]!r}; expected {shape}")
            label, error = -1, None
            if labeled:
                if label_file is None:
                    raise UsageError(
                        f"{path} has labels but no something-something-v2-labels.json was given; "
                        "pass it among the annotation files"
                    )
                name = item["template"].replace("[", "").replace("]", "")
                label = label_ids.get(name, -1)
                if label < 0:
                    error = f"unknown label {name!r} ({where}): not in {label_file.name}"
            rows.append(_Row((str(item["id"]),), ".webm", True, label, split, where, error))
    return classes, rows


_UCF_EXPECTED = "classInd.txt, trainlist0{1,2,3}.txt and testlist0{1,2,3}.txt from ucfTrainTestlist"


def _parse_ucf101(files: Sequence[Path]) -> tuple[list[str], list[_Row]]:
    roles = []
    for path in files:
        match = re.fullmatch(r"(classind|trainlist|testlist)0*(\d*)", path.stem.lower())
        if not match or (match[1] == "classind") != (match[2] == ""):
            raise UsageError(f"unexpected file for ucf101: {path}; expected {_UCF_EXPECTED}")
        roles.append((match[1], match[2], path))
    class_files = [path for role, _, path in roles if role == "classind"]
    if not class_files:
        raise UsageError(f"ucf101 needs classInd.txt among the annotation files ({_UCF_EXPECTED})")
    ids: dict[str, int] = {}
    for number, line in _lines(class_files[0]):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise UsageError(
                f"{class_files[0]}:{number}: {line!r}; expected '<id> <ClassName>' like '1 ApplyEyeMakeup'"
            )
        if int(fields[0]) < 1:
            raise UsageError(f"{class_files[0]}:{number}: {line!r}; classInd.txt ids are 1-based (1 ApplyEyeMakeup)")
        ids[fields[1]] = int(fields[0]) - 1
    classes = _dense_classes(ids, class_files[0])

    rows = []
    for role, split_id, path in roles:
        if role == "classind":
            continue
        shape = "'Class/v_Class_g01_c01.avi 1'" if role == "trainlist" else "'Class/v_Class_g01_c01.avi'"
        for number, line in _lines(path):
            fields = line.split()
            if (
                len(fields) != (2 if role == "trainlist" else 1)
                or "/" not in fields[0]
                or (role == "trainlist" and not fields[1].isdigit())
            ):
                raise UsageError(f"{path}:{number}: {line!r}; expected {shape}")
            where = f"{path.name}:{number}"
            folder = fields[0].split("/")[0]
            label, error = ids.get(folder, -1), None
            if label < 0:
                error = f"unknown label {folder!r} ({where}): not in {class_files[0].name}"
            elif role == "trainlist" and int(fields[1]) - 1 != label:
                error = f"label {fields[1]} ({where}) disagrees with the folder {folder!r} (class {label + 1})"
            relative = PurePosixPath(fields[0])
            split = f"{'train' if role == 'trainlist' else 'test'}_{split_id}"
            rows.append(_Row((str(relative.with_suffix("")),), relative.suffix, True, label, split, where, error))
    return classes, rows


_HMDB_EXPECTED = "the 153 files <class>_test_split{1,2,3}.txt of testTrainMulti_7030_splits"


def _parse_hmdb51(files: Sequence[Path]) -> tuple[list[str], list[_Row]]:
    named = []
    for path in files:
        match = re.fullmatch(r"(.+)_test_split(\d+)", path.stem)
        if path.suffix != ".txt" or not match:
            raise UsageError(f"unexpected file for hmdb51: {path}; expected {_HMDB_EXPECTED}")
        named.append((match[1], match[2], path))
    classes = sorted({name for name, _, _ in named})
    index = {name: i for i, name in enumerate(classes)}
    rows = []
    for name, split_id, path in named:
        for number, line in _lines(path):
            fields = line.rsplit(None, 1)
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise UsageError(
                    f"{path}:{number}: {line!r}; expected '<video>.avi <1|2|0>' (1 train, 2 test, 0 unused)"
                )
            if fields[1] == "0":
                continue
            video = PurePosixPath(fields[0])
            split = f"{'train' if fields[1] == '1' else 'test'}_{split_id}"
            rows.append(
                _Row((f"{name}/{video.stem}",), video.suffix, True, index[name], split, f"{path.name}:{number}")
            )
    return classes, rows


_KINETICS_EXPECTED = "a Kinetics csv with header 'label,youtube_id,time_start,time_end,split[,is_cc]'"
_KINETICS_SPLITS = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
_KINETICS_FOLDERS = {"train": ("train",), "val": ("val", "validate", "validation"), "test": ("test",)}


def _kinetics_time(value: str, path: Path, number: int) -> int:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0 or seconds != int(seconds):
        raise UsageError(
            f"{path}:{number}: time {value!r} is not a whole number of seconds; expected {_KINETICS_EXPECTED}"
        )
    return int(seconds)


def _parse_kinetics(files: Sequence[Path]) -> tuple[list[str], list[_Row]]:
    raw = []
    for path in files:
        for number, row in _read_csv(path, ("youtube_id", "time_start", "time_end"), _KINETICS_EXPECTED):
            if "split" in row:
                split = _KINETICS_SPLITS.get(row["split"].lower())
                if split is None:
                    raise UsageError(f"{path}:{number}: split {row['split']!r}; expected train, val(idate) or test")
            else:
                split = _split_from_name(
                    path, _KINETICS_SPLITS, f"{_KINETICS_EXPECTED} or a file train/validate/test.csv"
                )
            start = _kinetics_time(row["time_start"], path, number)
            end = _kinetics_time(row["time_end"], path, number)
            if not row["youtube_id"]:
                raise UsageError(f"{path}:{number}: empty youtube_id; expected {_KINETICS_EXPECTED}")
            stem = f"{row['youtube_id']}_{start:06d}_{end:06d}"
            raw.append((stem, row.get("label", ""), split, f"{path.name}:{number}"))
    classes = sorted({label for _, label, _, _ in raw if label})
    index = {name: i for i, name in enumerate(classes)}
    rows = []
    for stem, label, split, where in raw:
        # Downloaders name label folders as written or with "_" for spaces; unlabeled test clips sit in test/.
        names = [f"{name}/" for name in dict.fromkeys([label, label.replace(" ", "_")])] if label else [""]
        nested = [f"{folder}/{name}{stem}" for folder in _KINETICS_FOLDERS[split] for name in names]
        rows.append(_Row((stem, *nested), ".mp4", True, index.get(label, -1), split, where))
    return classes, rows


_DIVING_EXPECTED = (
    "Diving48_V2_{train,test}.json ([{vid_name, label, start_frame, end_frame}]) and optionally Diving48_vocab.json"
)


def _parse_diving48(files: Sequence[Path]) -> tuple[list[str], list[_Row]]:
    vocab: list[str] | None = None
    rows = []
    for path in files:
        data = _read_json(path, _DIVING_EXPECTED)
        if not isinstance(data, list):
            raise UsageError(f"{path}: a JSON {type(data).__name__}; expected {_DIVING_EXPECTED}")
        if "vocab" in re.split(r"[^a-z0-9]+", path.stem.lower()):
            if not all(isinstance(words, list) and all(isinstance(w, str) for w in words) for words in data):
                raise UsageError(f'{path}: expected a list of word lists like ["Back", "15som", "05Twis", "FREE"]')
            vocab = [" ".join(words) for words in data]
            continue
        split = _split_from_name(path, {"train": "train", "test": "val", "val": "val"}, _DIVING_EXPECTED)
        for number, item in enumerate(data, 1):
            label = item.get("label") if isinstance(item, dict) else None
            if not (
                isinstance(item, dict)
                and isinstance(item.get("vid_name"), str)
                and isinstance(label, int)
                and not isinstance(label, bool)
                and label >= 0
            ):
                raise UsageError(
                    f"{path}: item {number} is {str(item)[:80]!r}; expected {{vid_name, label >= 0, "
                    "start_frame, end_frame}"
                )
            rows.append(_Row((item["vid_name"],), ".mp4", True, label, split, f"{path.name} item {number}"))
    if vocab is None:
        count = max([48, *[row.label + 1 for row in rows]])
        return [str(i) for i in range(count)], rows
    checked = [
        row
        if row.label < len(vocab)
        else replace(
            row, label=-1, error=f"unknown label {row.label} ({row.where}): the vocab has {len(vocab)} classes"
        )
        for row in rows
    ]
    return vocab, checked


_HOWTO_EXPECTED = "HowTo100M_v1.csv with header 'video_id,category_1,category_2,rank,task_id'"


def _parse_howto100m(files: Sequence[Path]) -> tuple[list[str], list[_Row]]:
    rows = []
    for path in files:
        for number, row in _read_csv(path, ("video_id",), _HOWTO_EXPECTED):
            if not row["video_id"]:
                raise UsageError(f"{path}:{number}: empty video_id; expected {_HOWTO_EXPECTED}")
            rows.append(_Row((row["video_id"],), None, True, -1, "train", f"{path.name}:{number}"))
    return [], rows


_LIST_EXPECTED = "'relative/path.ext [label]' (label: class name or integer class id; no spaces in paths)"


def _list_path(text: str, path: Path, number: int, root: Path) -> PurePosixPath:
    relative = text
    if os.path.isabs(text):
        try:
            relative = Path(text).relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            raise UsageError(
                f"{path}:{number}: {text!r} is not under the video root {root}; write paths relative to --videos"
            ) from None
    relative = posixpath.normpath(relative)
    if relative == ".." or relative.startswith("../"):
        raise UsageError(f"{path}:{number}: {text!r} leaves the video root; write paths relative to --videos")
    return PurePosixPath(relative)


def _parse_list(files: Sequence[Path], root: Path) -> tuple[list[str], list[_Row]]:
    raw = []
    kinds: dict[str, str] = {}  # "id"/"name" -> first place it was seen, to name both in the mixing error
    for path in files:
        for number, line in _lines(path):
            if line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) > 2:
                raise UsageError(f"{path}:{number}: {line!r} has {len(fields)} fields; expected {_LIST_EXPECTED}")
            where = f"{path.name}:{number}"
            label = fields[1] if len(fields) == 2 else None
            if label is not None and re.fullmatch(r"-?\d+", label):
                if int(label) < -1:
                    raise UsageError(f"{path}:{number}: label {label}; class ids are >= 0 (-1: unlabeled)")
                label = str(int(label))  # "07" and "7" are one class
                kinds.setdefault("id", where)
            elif label is not None:
                kinds.setdefault("name", where)
            raw.append((_list_path(fields[0], path, number, root), label, path.stem, where))
    if len(kinds) == 2:
        raise UsageError(
            f"the list mixes integer class ids ({kinds['id']}) and class names ({kinds['name']}); use one kind of label"
        )
    if "id" in kinds:
        classes = [str(i) for i in range(max(int(label) for _, label, _, _ in raw if label is not None) + 1)]
    else:
        classes = sorted({label for _, label, _, _ in raw if label is not None})
    index = {name: i for i, name in enumerate(classes)}
    rows = [
        _Row(
            (str(relative.with_suffix("")),),
            relative.suffix or None,
            False,
            -1 if label in (None, "-1") else index[label],
            split,
            where,
        )
        for relative, label, split, where in raw
    ]
    return classes, rows


_PARSERS: dict[str, Callable[[Sequence[Path]], tuple[list[str], list[_Row]]]] = {
    "ssv2": _parse_ssv2,
    "ucf101": _parse_ucf101,
    "hmdb51": _parse_hmdb51,
    "kinetics": _parse_kinetics,
    "diving48": _parse_diving48,
    "howto100m": _parse_howto100m,
}


# ----------------------------------------------------------------------------------------------------------------
# Finding the video files


class _VideoIndex:
    """Every file under the root, scanned once: {relative path without extension: [extensions]} and
    {file stem: [relative paths without extension]} so that lookups cost O(1) for 200k+ videos."""

    def __init__(self, root: Path):
        self.root = root
        self.by_id: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        seen: set[tuple[int, int]] = set()  # (device, inode) of visited folders: symlink loops end here
        stack = [("", str(root))]
        while stack:
            prefix, folder = stack.pop()
            try:
                info = os.stat(folder)
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
                entries = list(os.scandir(folder))
            except OSError:
                continue  # an unreadable subfolder: its videos are reported as not found
            for entry in entries:
                if entry.name.startswith("."):  # .DS_Store, ._clip.mp4 (macOS), partial downloads
                    continue
                if entry.is_dir():
                    stack.append((f"{prefix}{entry.name}/", entry.path))
                elif entry.is_file():
                    stem, ext = os.path.splitext(entry.name)
                    self.by_id.setdefault(prefix + stem, []).append(ext)
                    self.by_stem.setdefault(stem, []).append(prefix + stem)

    def _extension(self, relative: str, ext: str | None) -> str | None:
        """The extension of the file at `relative`: the expected one, else the most preferred video extension."""
        present = self.by_id.get(relative)
        if not present:
            return None
        if ext in present:
            return ext
        by_lower = {e.lower(): e for e in present}
        for preferred in ([ext.lower()] if ext else []) + list(VIDEO_EXTENSIONS):
            if preferred in by_lower:
                return by_lower[preferred]
        return None

    def locate(self, row: _Row) -> tuple[str, Path | None, str | None]:
        """(video id, file or None, reason it was not found or None)."""
        for relative in row.candidates:
            found = self._extension(relative, row.ext)
            if found is not None:
                return relative, self.root / (relative + found), None
        stem = posixpath.basename(row.candidates[0])
        if row.anywhere:
            elsewhere = [r for r in self.by_stem.get(stem, []) if self._extension(r, row.ext) is not None]
            if len(elsewhere) == 1:
                return elsewhere[0], self.root / (elsewhere[0] + self._extension(elsewhere[0], row.ext)), None
            if len(elsewhere) > 1:
                shown = ", ".join(f"{self.root}/{r}{self._extension(r, row.ext)}" for r in sorted(elsewhere)[:3])
                return (
                    row.candidates[0],
                    None,
                    (
                        f"video file is ambiguous: {len(elsewhere)} files named {stem!r} ({shown}); "
                        "keep one, or name files exactly with the 'list' format"
                    ),
                )
        tried = []
        for relative in row.candidates:
            tried += [f"{self.root}/{relative}{row.ext}"] if row.ext else []
            tried.append(f"{self.root}/{relative}.*")
        if row.anywhere:
            tried.append(f"{self.root}/**/{stem}.*")
        return row.candidates[0], None, "video file not found: tried " + ", ".join(tried)


# ----------------------------------------------------------------------------------------------------------------
# Putting it together


def _check_inputs(fmt: str, files: Sequence[Path], video_root: Path) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown annotation format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not files:
        raise UsageError(f"no annotation files given for format {fmt!r}")
    for path in files:
        if not path.exists():
            raise UsageError(f"annotation file not found: {path}")
    if not video_root.is_dir():
        what = "is not a directory" if video_root.exists() else "does not exist"
        raise UsageError(f"video root {video_root} {what}; pass the folder holding the videos with --videos")


def _merge(dataset: str, classes: list[str], rows: list[_Row], index: _VideoIndex) -> AnnotationSet:
    """Group mentions by the video id they resolve to; one entry or one problem per id."""
    from vimpac.code_db import MAX_ID_BYTES

    located: dict[tuple, tuple[str, Path | None, str | None]] = {}
    groups: dict[str, tuple[Path | None, str | None, list[_Row]]] = {}  # id -> (file, why missing, mentions)
    for row in rows:
        key = (row.candidates, row.ext, row.anywhere)
        if key not in located:
            located[key] = index.locate(row)
        video_id, path, missing = located[key]
        groups.setdefault(video_id, (path, missing, []))[2].append(row)

    entries, problems = [], []
    for video_id in sorted(groups):
        path, missing, mentions = groups[video_id]
        shown = str(path) if path else None
        errors = [row.error for row in mentions if row.error]
        labeled = {row.label: row.where for row in mentions if row.label >= 0}
        if errors:
            problems.append(Problem(video_id, shown, "annotation", errors[0]))
        elif len(video_id.encode("utf-8")) > MAX_ID_BYTES:
            problems.append(
                Problem(
                    video_id, shown, "annotation", f"video id longer than the {MAX_ID_BYTES} bytes a record key holds"
                )
            )
        elif len(labeled) > 1:
            claims = ", ".join(f"{classes[label]!r} ({where})" for label, where in sorted(labeled.items()))
            problems.append(
                Problem(video_id, shown, "annotation", f"duplicate id {video_id!r} with conflicting labels: {claims}")
            )
        else:
            label = next(iter(labeled), -1)
            entries.append(VideoEntry(video_id, path, label, tuple(sorted({row.split for row in mentions}))))
            if missing:
                problems.append(Problem(video_id, None, "locate", missing))
    return AnnotationSet(dataset, classes, entries, problems)


def read_class_list(path: Path) -> list[str]:
    """Class names from a text file, one per line in label order (blank lines and '#' comments skipped)."""
    if not Path(path).is_file():
        raise UsageError(f"--classes file {path} does not exist")
    names = [line for _, line in _lines(Path(path)) if not line.startswith("#")]
    if not names:
        raise UsageError(f"--classes file {path} names no class; write one class name per line")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--classes file {path} names {', '.join(map(repr, repeated[:5]))} more than once")
    return names


def _pin_classes(classes: list[str], rows: list[_Row], pinned: Sequence[str], source: str) -> list[_Row]:
    """The rows relabelled to the class list `pinned`, matched by name; a row whose class `pinned` lacks becomes an
    annotation problem. Shards of one dataset (each annotation file alone lists only its own classes for Kinetics,
    HMDB51 and `list`) then share one class list, as `vimpac db merge` and fine-tuning require."""
    position = {name: i for i, name in enumerate(pinned)}
    out = []
    for row in rows:
        if row.label < 0 or row.error:
            out.append(row)
        elif classes[row.label] in position:
            out.append(replace(row, label=position[classes[row.label]]))
        else:
            out.append(replace(row, label=-1, error=f"class {classes[row.label]!r} ({row.where}) is not in {source}"))
    return out


def load_annotations(
    fmt: str, files: Sequence[Path], video_root: Path, classes: Sequence[str] | None = None
) -> AnnotationSet:
    """Read a dataset's official annotation files and find its videos under `video_root`.

    fmt: one of FORMATS; files: the annotation files (any order); video_root: folder the video ids are relative
    to; classes: the class list to label with (names in label order, see `read_class_list`) instead of the one the
    files give. Raises UsageError for bad input (see the module docstring) before scanning the video root.
    """
    files = [Path(path) for path in files]
    video_root = Path(video_root)
    _check_inputs(fmt, files, video_root)
    if fmt == "list":
        found, rows = _parse_list(files, video_root)
    else:
        found, rows = _PARSERS[fmt](files)
    if classes is not None:
        rows, found = _pin_classes(found, rows, classes, "the --classes list"), list(classes)
    return _merge(fmt, found, rows, _VideoIndex(video_root))
