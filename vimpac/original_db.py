"""Token LMDBs of the original VIMPAC release → a vimpac code database (`vimpac db import-original`).

The original extractor (`video2token/extract_video_tokens.py`, run by `extract_tokens.sh`) writes one LMDB
environment per dataset, split and spatial view, in a directory named

    <tokenizer>_<dataset>_<split>_fps<fps>_hflip<0|1>_<shorter side><top|center|bottom><frame size>

(e.g. `dalle_ucf101_train_val_fps16_hflip0_128center128`), with `args.json` (the extractor's arguments) and
`err_filepaths.txt` (newline-separated paths of the videos it could not probe). Key: the video's path relative to
the video root, without extension, UTF-8. Value: an uncompressed `np.savez` archive with exactly `tokens` (int16 or
int32 [frames, h, w], every frame at the LMDB's fps) and `label` (a 0-d integer array).

Mapping onto a vimpac database (docs/design.md §3):

- Each directory becomes (part of) one view named `r<shorter>_<crop>_f<flip>`; directories with the same view
  settings but different splits (the original's per-split LMDBs of SSV2 or Kinetics) are one view together.
  Several views go into one database; a video is kept when every view has it with the same frame count and label.
- Settings come from the directory name, then from its args.json where present (it wins: names were often
  changed by hand, e.g. `train_val` → `train_test`), then from the command-line overrides, which win over both.
- Splits come from MMAction2-style annotation lists (`*_{train,val}_split_<k>_videos.txt` → `train_<k>`,
  `test_<k>`; `*_{train,val}_list_videos.txt` → `train`, `val`) when given, else from the directories' split names.
- Classes are named after the videos' folders when every class id has exactly one folder (UCF101, HMDB51,
  Kinetics layouts), else "0".."N-1", unless a names file is given.
- `err_filepaths.txt` lines become failures (stage `probe`); a video missing from a view, or whose views disagree,
  becomes a failure (stage `import`) naming why; annotated videos absent from every LMDB become failures too.
- The record's source duration and fps are unknown for imported videos and stored as 0.
- The manifest's `source` names every directory, the settings read and where each came from.

Writing goes through CodeDatabaseWriter, so an interrupted import resumes where it stopped (the same command again)
and a rerun with other settings is refused; `verify` compares every record with the original values.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import lmdb
import numpy as np

from vimpac.code_db import ORIGINAL_DATASET_NAMES, CodeDatabase, CodeDatabaseWriter, codes_dtype
from vimpac.errors import UsageError
from vimpac.tokenization.views import CROPS, View

SOURCE_FORMAT = "original-release token LMDB"
ERRORS_FILE = "err_filepaths.txt"
ARGS_JSON = "args.json"
DOWNSAMPLE = 8  # the DALL-E encoder: one code per 8×8 pixels
DEFAULT_VOCAB = 8192
# The original's dataset names → vimpac's dataset names (the annotation formats of `vimpac tokenize`).
DATASETS = {
    **{name: name for name in ("ucf101", "hmdb51", "ssv2", "kinetics", "diving48", "howto100m")},
    **ORIGINAL_DATASET_NAMES,
}
_NAME = re.compile(
    r"(?P<tokenizer>[A-Za-z0-9]+)_(?P<dataset>[A-Za-z0-9]+)_(?P<split>[A-Za-z0-9_]+?)_fps(?P<fps>\d+(?:\.\d+)?)"
    r"_hflip(?P<hflip>[01])_(?P<shorter>\d+)(?P<crop>[a-z]+?)(?P<frame_size>\d+)(?:_debug)?"
)
_SPLIT_FILE = re.compile(r"(?:^|_)(?P<role>train|val|test)(?:_split_?(?P<k>\d+))?(?:_list)?(?:_videos)?$")


# ---------------------------------------------------------------------------------------------- settings


def parse_directory_name(name: str) -> dict[str, Any] | None:
    """Fields of an extractor directory name, or None when it does not follow the pattern."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    fields = match.groupdict()
    fps = float(fields["fps"])
    return {
        "tokenizer": fields["tokenizer"],
        "dataset": fields["dataset"],
        "split": fields["split"],
        "fps": int(fps) if fps.is_integer() else fps,
        "hflip": fields["hflip"] == "1",
        "shorter": int(fields["shorter"]),
        "crop": fields["crop"],
        "frame_size": int(fields["frame_size"]),
    }


def _from_args_json(args: Mapping[str, Any]) -> dict[str, Any]:
    """The settings recorded in an extractor args.json (only those present)."""
    out: dict[str, Any] = {}
    pairs = {
        "dset_name": "dataset",
        "fps": "fps",
        "frame_shorter_size": "shorter",
        "frame_out_size": "frame_size",
        "crop_type": "crop",
        "hflip": "hflip",
        "model_type": "tokenizer",
        "fp16": "fp16",
        "np_dtype": "np_dtype",
    }
    for theirs, ours in pairs.items():
        if args.get(theirs) is not None:
            out[ours] = args[theirs]
    return out


@dataclass
class SourceDirectory:
    """One original LMDB directory and the settings it was extracted with (`origin`: where each came from)."""

    path: Path
    dataset: str  # the original's name (ucf101, sthv2, ...)
    split: str | None
    fps: float
    shorter: int
    crop: str
    hflip: bool
    frame_size: int
    fp16: bool
    tokenizer: str
    origin: dict[str, str] = field(default_factory=dict)
    args_json: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def view(self) -> str:
        return View(self.shorter, self.crop, self.hflip).name

    def describe(self) -> dict[str, Any]:
        """What the manifest's `source` records about this directory."""
        return {
            "path": str(self.path),
            "view": self.view,
            "dataset": self.dataset,
            "split": self.split,
            "fps": self.fps,
            "shorter": self.shorter,
            "crop": self.crop,
            "hflip": self.hflip,
            "frame_size": self.frame_size,
            "fp16": self.fp16,
            "tokenizer": self.tokenizer,
            "settings_from": dict(self.origin),
            "args_json": self.args_json,
        }


def read_settings(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SourceDirectory:
    """Settings of one original LMDB directory: its name, then its args.json (wins), then `overrides` (win).
    `overrides` keys: dataset, fps, frame_size, view (a view name such as r160_top_f1), split."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise UsageError(f"{path} is not an LMDB directory (no data.mdb); give the original extractor's output folder")
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    notes: list[str] = []
    named = parse_directory_name(path.name)
    if named is not None:
        values.update(named)
        origin.update(dict.fromkeys(named, "directory name"))
    args_json = None
    if (path / ARGS_JSON).is_file():
        try:
            args_json = json.loads((path / ARGS_JSON).read_text(encoding="utf-8"))
        except ValueError as err:
            raise UsageError(f"{path / ARGS_JSON} is not valid JSON ({err})") from None
        if not isinstance(args_json, dict):
            raise UsageError(f"{path / ARGS_JSON} does not hold the extractor's arguments (a JSON object)")
        for key, value in _from_args_json(args_json).items():
            if key in values and values[key] != value:
                notes.append(f"{key}: the directory name says {values[key]!r}, {ARGS_JSON} says {value!r} (used)")
            values[key] = value
            origin[key] = ARGS_JSON
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "view":
            try:
                view = View.parse(value)
            except ValueError as err:
                raise UsageError(f"--views: {err}") from None
            for sub, v in (("shorter", view.shorter), ("crop", view.crop), ("hflip", view.flip)):
                values[sub], origin[sub] = v, "--views"
            continue
        values[key], origin[key] = value, f"--{key.replace('_', '-')}"
    if values.get("crop") == "none":
        raise UsageError(
            f"{path} was extracted with --crop_type none (whole frames of each video's own size); a vimpac view is a "
            "square crop, so it cannot be imported"
        )
    missing = [k for k in ("dataset", "fps", "shorter", "crop", "hflip", "frame_size") if k not in values]
    if missing:
        flags = {"dataset": "--dataset", "fps": "--fps", "frame_size": "--frame-size"}
        hint = ", ".join(sorted({flags.get(k, "--views") for k in missing}))
        raise UsageError(
            f"cannot tell the {', '.join(missing)} of {path}: its name does not follow "
            f"<tokenizer>_<dataset>_<split>_fps<N>_hflip<0|1>_<shorter><crop><size> and it has no {ARGS_JSON} "
            f"with them; pass {hint}"
        )
    if values["crop"] not in CROPS:
        raise UsageError(f"{path}: crop {values['crop']!r} is not one of {', '.join(CROPS)}")
    if str(values.get("tokenizer", "dalle")) != "dalle":
        notes.append(f"tokenizer {values['tokenizer']!r} (the original only shipped dalle)")
    fps = float(values["fps"])
    return SourceDirectory(
        path=path.resolve(),
        dataset=str(values["dataset"]),
        split=values.get("split"),
        fps=int(fps) if fps.is_integer() else fps,
        shorter=int(values["shorter"]),
        crop=str(values["crop"]),
        hflip=bool(values["hflip"]),
        frame_size=int(values["frame_size"]),
        # The extraction script always passed --fp16; a directory without args.json most likely used it too.
        fp16=bool(values.get("fp16", True)),
        tokenizer=str(values.get("tokenizer", "dalle")),
        origin=origin,
        args_json=args_json,
        notes=notes,
    )


# -------------------------------------------------------------------------------------------- the values


def decode_value(buf: bytes | memoryview) -> tuple[np.ndarray, int]:
    """(tokens [frames, h, w], label) of one original value; ValueError saying why it is not one."""
    data = bytes(buf)
    if not data.startswith(b"PK"):
        head = data[:8]
        raise ValueError(f"not an np.savez archive (starts with {head!r})")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            names = sorted(archive.files)
            if names != ["label", "tokens"]:
                raise ValueError(f"an np.savez archive with members {names}, not exactly tokens and label")
            tokens, label = archive["tokens"], archive["label"]
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"a damaged np.savez archive ({err})") from None
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim != 3 or tokens.shape[0] < 1:
        raise ValueError(f"tokens are {tokens.dtype} {list(tokens.shape)}, not integer codes [frames >= 1, h, w]")
    if not np.issubdtype(label.dtype, np.integer) or label.size != 1:
        raise ValueError(f"label is {label.dtype} {list(label.shape)}, not one integer")
    return tokens, int(label.reshape(()))


class OriginalLmdb:
    """Read-only access to one original LMDB environment (no lock: the original trainer opens it the same way)."""

    def __init__(self, source: SourceDirectory) -> None:
        self.source = source
        try:
            self.env = lmdb.open(str(source.path), readonly=True, lock=False, readahead=False, subdir=True)
        except lmdb.Error as err:
            raise UsageError(f"{source.path} cannot be opened as an LMDB environment ({err})") from None
        with self.env.begin() as txn:
            self.raw_keys = list(txn.cursor().iternext(keys=True, values=False))
        self.keys: dict[str, bytes] = {}
        self.bad_keys: list[bytes] = []
        for raw in self.raw_keys:
            try:
                self.keys[raw.decode("utf-8")] = raw
            except UnicodeDecodeError:
                self.bad_keys.append(raw)

    def check_format(self) -> None:
        """Refuse a directory whose first value is not an original record (a vimpac view, another program's LMDB)."""
        if not self.raw_keys:
            raise UsageError(f"{self.source.path} is an empty LMDB: nothing to import")
        first = self.raw_keys[0]
        try:
            decode_value(self.get_raw(first))
        except ValueError as err:
            raise UsageError(
                f"{self.source.path} does not hold the original release's format: the value of key {first!r} is "
                f"{err}; expected an np.savez archive with tokens [frames, h, w] and label (vimpac's own databases "
                "need no import: use them directly)"
            ) from None

    def get_raw(self, raw_key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(raw_key)

    def read(self, key: str) -> tuple[np.ndarray, int]:
        """(tokens, label) of video `key`; KeyError if absent, ValueError if its value is not an original record."""
        value = self.get_raw(self.keys[key])
        if value is None:
            raise KeyError(key)
        return decode_value(value)

    def label(self, key: str) -> int | None:
        """The label of `key` alone (reads only that member), None when the value does not decode."""
        value = self.get_raw(self.keys[key])
        try:
            with np.load(io.BytesIO(value), allow_pickle=False) as archive:
                return int(archive["label"].reshape(()))
        except (ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError, TypeError):
            return None

    def error_paths(self) -> list[str]:
        """The lines of err_filepaths.txt (videos the original extractor could not probe)."""
        path = self.source.path / ERRORS_FILE
        if not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [line.strip() for line in lines if line.strip()]

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------------------------------------- annotations


def annotation_files(paths: Iterable[str | Path], dataset: str) -> list[Path]:
    """The list files named by `paths`: files as given; a directory → its *_videos.txt (or *.txt), else those of
    its `<dataset>/` subfolder (the original's annotation root holds one folder per dataset)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            raise UsageError(f"--annotations {path}: no such file or directory")
        for folder in (path, path / dataset):
            found = sorted(folder.glob("*_videos.txt")) or sorted(folder.glob("*.txt"))
            if found:
                files.extend(found)
                break
        else:
            raise UsageError(f"--annotations {path}: no *_videos.txt list there or in {path / dataset}")
    return files


def split_of_list(path: Path, dataset: str) -> str:
    """The vimpac split a list file stands for: `ucf101_val_split_1_videos.txt` → test_1 (UCF101 and HMDB51 keep
    their three splits; their "val" is the test split), `sthv2_train_list_videos.txt` → train, else the file stem."""
    match = _SPLIT_FILE.search(path.stem.lower())
    if match is None:
        return path.stem
    role, k = match["role"], match["k"]
    if k is not None:
        return f"{'train' if role == 'train' else 'test'}_{k}"
    return "train" if role == "train" else "val"


def read_annotations(files: Sequence[Path], dataset: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """({split: [video ids]}, {video id: label}) from MMAction2-style lists ("relative/path.ext label" per line; the
    id is the path without extension, as the original extractor keys its LMDB). UsageError for a video that two
    lists give different labels."""
    splits: dict[str, list[str]] = {}
    labels: dict[str, int] = {}
    for path in files:
        split = splits.setdefault(split_of_list(path, dataset), [])
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.rsplit(None, 1)
            try:
                label = int(fields[1]) if len(fields) == 2 else -1
            except ValueError:
                raise UsageError(f"{path}:{number}: expected 'relative/path.ext label', got {line!r}") from None
            relative = fields[0].strip() if len(fields) == 2 else line.strip()
            video_id = str(PurePosixPath(relative).with_suffix("")) if PurePosixPath(relative).suffix else relative
            split.append(video_id)
            known = labels.get(video_id, -1)
            if known >= 0 and label >= 0 and known != label:
                raise UsageError(f"{path}:{number}: {video_id} has label {label} here and {known} in an earlier list")
            labels[video_id] = max(known, label)  # a list without labels (-1) keeps another list's label
    return splits, labels


def class_names(labels: Mapping[str, int], names_file: str | Path | None = None) -> list[str]:
    """Class names for ids 0..max: from `names_file` (one per line), the videos' folders when each id has exactly
    one folder and no two ids share one, else "0".."max"."""
    ids = {label for label in labels.values() if label >= 0}
    count = max(ids) + 1 if ids else 0
    if names_file is not None:
        names = [line.strip() for line in Path(names_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) < count:
            raise UsageError(f"--class-names {names_file} lists {len(names)} names, but labels go up to {count - 1}")
        return names
    folders: dict[int, set[str]] = {}
    for video_id, label in labels.items():
        if label >= 0:
            parts = video_id.split("/")
            folders.setdefault(label, set()).add(parts[-2] if len(parts) > 1 else "")
    named = [next(iter(folders.get(i, {""}))) if len(folders.get(i, ())) == 1 else "" for i in range(count)]
    if count and all(named) and len(set(named)) == count:
        return named
    return [str(i) for i in range(count)]


# ------------------------------------------------------------------------------------------------ the import


@dataclass
class ImportSummary:
    out: Path
    imported: int
    skipped: int
    failed: int
    frames: int
    total_videos: int
    total_failures: int
    notes: list[str]
    manifest: dict[str, Any]


def _failure_id(line: str, root: str | None, known: Iterable[str]) -> str:
    """The video id of an err_filepaths.txt line (a full video path): relative to the extractor's video root when
    it lies under it, else the known id it ends with, else the path without its extension."""
    path = PurePosixPath(line)
    stem = str(path.with_suffix("")) if path.suffix else line
    if root:
        prefix = root.rstrip("/") + "/"
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    best = None
    for video_id in known:
        if (stem == video_id or stem.endswith("/" + video_id)) and (best is None or len(video_id) > len(best)):
            best = video_id
    return best if best is not None else stem.lstrip("/")


def _group_views(sources: Sequence[SourceDirectory]) -> dict[str, list[SourceDirectory]]:
    views: dict[str, list[SourceDirectory]] = {}
    for source in sources:
        views.setdefault(source.view, []).append(source)
    return views


def _common(sources: Sequence[SourceDirectory], name: str) -> Any:
    values = {getattr(s, name) for s in sources}
    if len(values) > 1:
        listed = "; ".join(f"{s.path.name}: {getattr(s, name)!r}" for s in sources)
        raise UsageError(f"the directories were extracted with different {name} ({listed}); import them separately")
    return values.pop()


def import_original(
    directories: Sequence[str | Path],
    out: str | Path,
    annotations: Sequence[str | Path] | None = None,
    dataset: str | None = None,
    fps: float | None = None,
    frame_size: int | None = None,
    views: Sequence[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB,
    class_names_file: str | Path | None = None,
    commit_every: int = 256,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ImportSummary:
    """Import original LMDB `directories` into the code database `out` (created, or resumed when it already holds
    an import of the same settings). See the module docstring for the mapping."""
    from tqdm import tqdm

    if not directories:
        raise UsageError("give at least one original LMDB directory")
    resolved = [Path(d).resolve() for d in directories]
    if len(set(resolved)) != len(resolved):
        raise UsageError("a directory is given twice")
    if views is not None and len(views) != len(directories):
        raise UsageError(f"--views needs one view name per directory ({len(directories)}); got {len(views)}")
    sources = [
        read_settings(d, {"dataset": dataset, "fps": fps, "frame_size": frame_size, "view": v})
        for d, v in zip(directories, views or [None] * len(directories))
    ]
    notes = [f"{s.path.name}: {note}" for s in sources for note in s.notes]
    original_dataset = _common(sources, "dataset")
    db_fps = _common(sources, "fps")
    size = _common(sources, "frame_size")
    if size % DOWNSAMPLE:
        raise UsageError(f"frame size {size} is not a multiple of {DOWNSAMPLE} (the DALL-E grid)")
    grid = size // DOWNSAMPLE
    by_view = _group_views(sources)
    view_names = list(by_view)
    vimpac_dataset = DATASETS.get(original_dataset, original_dataset)

    readers = {id(s): OriginalLmdb(s) for s in sources}
    try:
        for reader in readers.values():
            reader.check_format()
        # Which directory of each view holds each video (directories of one view must not share a video).
        where: dict[str, dict[str, OriginalLmdb]] = {view: {} for view in view_names}
        for view, group in by_view.items():
            for source in group:
                reader = readers[id(source)]
                for key in reader.keys:
                    if key in where[view]:
                        raise UsageError(
                            f"video {key!r} is in both {where[view][key].source.path} and {source.path}, which are "
                            f"the same view {view}; import directories of one view only when they hold different "
                            "videos (e.g. the train and val LMDBs of one dataset)"
                        )
                    where[view][key] = reader
        all_ids = sorted(set().union(*(set(w) for w in where.values())))
        present_ids = set(all_ids)

        if annotations:
            files = annotation_files(annotations, original_dataset)
            splits, annotated_labels = read_annotations(files, original_dataset)
            log(f"annotations: {len(files)} lists, splits {', '.join(f'{k} ({len(v)})' for k, v in splits.items())}")
        else:
            splits, annotated_labels = {}, {}
            for source in sources:
                split = {"train": "train", "val": "val", "test": "test"}.get(source.split or "", source.split or "all")
                splits.setdefault(split, []).extend(readers[id(source)].keys)
            if set(splits) - {"train", "val", "test"}:
                notes.append(
                    f"splits {sorted(splits)} come from the directory names; fine-tuning expects train/val (or "
                    "train_k/test_k for ucf101/hmdb51): pass --annotations with the original's annotation lists"
                )

        labels: dict[str, int] = dict(annotated_labels)
        first_view = view_names[0]
        for key in tqdm(all_ids, desc="labels", unit="video", disable=None if progress else True):
            reader = where[first_view].get(key) or next(w[key] for w in where.values() if key in w)
            label = reader.label(key)
            if label is not None:
                labels[key] = label
        classes = class_names(labels, class_names_file)
        manifest = {
            "dataset": vimpac_dataset,
            "fps": db_fps,
            "frame_size": size,
            "grid": [grid, grid],
            "tokenizer": {
                "name": "dalle",
                "vocab_size": int(vocab_size),
                "fingerprint": "original-release",
                "fp16": all(s.fp16 for s in sources),
            },
            "views": view_names,
            "classes": classes,
            # the original extracted through ffmpeg's fps and scale filters (`vimpac tokenize --frame-selection ffmpeg`)
            "frame_selection": "ffmpeg",
            "resize": "bicubic",
            "args": {
                "command": "vimpac db import-original",
                "directories": [str(s.path) for s in sources],
                "annotations": [str(a) for a in annotations or []],
            },
            "source": {
                "format": SOURCE_FORMAT,
                "dataset": original_dataset,
                "directories": [s.describe() for s in sources],
            },
        }
        dtype = codes_dtype(int(vocab_size))
        imported = failed = frames = 0
        with CodeDatabaseWriter(out, manifest, resume=True, commit_every=commit_every) as writer:
            done = writer.done_ids()
            known = present_ids | set(annotated_labels)
            probe_failures: dict[str, tuple[str, str]] = {}  # id -> (path, reason)
            for source in sources:
                reader = readers[id(source)]
                root = (source.args_json or {}).get("video_root_dir")
                for line in reader.error_paths():
                    reason = f"the original extractor could not probe it (listed in {source.path / ERRORS_FILE})"
                    probe_failures.setdefault(_failure_id(line, root, known), (line, reason))
            for video_id, (line, reason) in probe_failures.items():
                # A video with records in some view is judged with them below (and keeps this reason if it fails).
                if video_id not in done and video_id not in present_ids:
                    writer.add_failure(video_id, line, "probe", reason)
                    done.add(video_id)
                    failed += 1
            for source in sources:
                reader = readers[id(source)]
                for raw in reader.bad_keys:
                    video_id = raw.decode("utf-8", errors="backslashreplace")
                    if video_id not in done:
                        writer.add_failure(video_id, None, "import", f"key {raw!r} in {source.path} is not UTF-8")
                        done.add(video_id)
                        failed += 1
            for video_id in sorted(set(annotated_labels) - set(all_ids) - done):
                reason = (
                    "annotated but in none of the original LMDBs (the original extractor dropped videos whose "
                    "encoding raised without recording them)"
                )
                writer.add_failure(video_id, None, "import", reason)
                done.add(video_id)
                failed += 1
            todo = [video_id for video_id in all_ids if video_id not in done]
            skipped = len(all_ids) - len(todo)
            for video_id in tqdm(todo, desc="import", unit="video", disable=None if progress else True):
                problem, codes, label = _read_views(video_id, where, grid, int(vocab_size))
                if problem is not None:
                    if video_id in probe_failures:  # missing from a view whose extraction could not probe it
                        line, reason = probe_failures[video_id]
                        writer.add_failure(video_id, line, "probe", f"{reason}; {problem}")
                    else:
                        writer.add_failure(video_id, None, "import", problem)
                    failed += 1
                    continue
                writer.add(video_id, {v: c.astype(dtype, copy=False) for v, c in codes.items()}, label, 0.0, 0.0)
                imported += 1
                frames += next(iter(codes.values())).shape[0]
            manifest = writer.finalize(splits)
    finally:
        for reader in readers.values():
            reader.close()
    counts = manifest["counts"]
    return ImportSummary(
        out=Path(out),
        imported=imported,
        skipped=skipped,
        failed=failed,
        frames=frames,
        total_videos=int(counts["videos"]),
        total_failures=int(counts["failures"]["total"]),
        notes=notes,
        manifest=manifest,
    )


def _read_views(
    video_id: str, where: Mapping[str, Mapping[str, OriginalLmdb]], grid: int, vocab: int
) -> tuple[str | None, dict[str, np.ndarray], int]:
    """(problem or None, codes per view, label) of one video across the views."""
    codes: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    for view, readers in where.items():
        reader = readers.get(video_id)
        if reader is None:
            holders = sorted({r.source.path.name for r in readers.values()})
            return f"not in view {view} (no record in {', '.join(holders)})", {}, -1
        try:
            tokens, label = reader.read(video_id)
        except ValueError as err:
            return f"the record in {reader.source.path} is not an original record: {err}", {}, -1
        if tuple(tokens.shape[1:]) != (grid, grid):
            return f"view {view}: tokens are {list(tokens.shape)}, expected [frames, {grid}, {grid}]", {}, -1
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            return f"view {view}: codes range [{low}, {high}] outside the vocabulary [0, {vocab})", {}, -1
        codes[view], labels[view] = tokens, label
    if len({c.shape[0] for c in codes.values()}) > 1:
        return f"frame counts differ across views: { {v: c.shape[0] for v, c in codes.items()} }", {}, -1
    if len(set(labels.values())) > 1:
        return f"labels differ across views: {labels}", {}, -1
    return None, codes, next(iter(labels.values()))


def verify(
    out: str | Path,
    directories: Sequence[str | Path],
    views: Sequence[str] | None = None,
    dataset: str | None = None,
    fps: float | None = None,
    frame_size: int | None = None,
) -> list[str]:
    """Compare every record of the database `out` with the original values (tokens and label, exactly); returns one
    line per difference (empty: identical). Videos listed as failures are skipped. The directories' settings are
    read as `import_original` read them, with the same flags."""
    db = CodeDatabase(out)
    sources = [
        read_settings(d, {"dataset": dataset, "fps": fps, "frame_size": frame_size, "view": v})
        for d, v in zip(directories, views or [None] * len(directories))
    ]
    problems = []
    readers = [OriginalLmdb(s) for s in sources]
    try:
        present = set(db.ids())
        for reader in readers:
            view = reader.source.view
            if view not in db.views:
                problems.append(f"{reader.source.path}: view {view} is not in {out}")
                continue
            for key in reader.keys:
                if key not in present:
                    continue
                tokens, label = reader.read(key)
                codes, stored = db.read(key, view)
                if stored != label or codes.shape != tokens.shape or not np.array_equal(codes, tokens):
                    problems.append(f"{key} [{view}]: differs from {reader.source.path}")
    finally:
        for reader in readers:
            reader.close()
        db.close()
    return problems
