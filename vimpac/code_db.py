"""The code database: the one module that owns its on-disk format, writing, reading, inspection and merging.

Layout (docs/design.md §3)::

    <db>/manifest.json      configuration, splits, counts, "complete" (written atomically: vimpac.atomic_write)
    <db>/views/<view>/      one LMDB environment per spatial view; key = video id (UTF-8), value = one record
    <db>/failures.jsonl     one JSON object per failed video: {"id", "path", "stage", "reason"}

Record byte layout (little-endian, version 1)::

    offset  size  field
         0     4  magic b"VPCR"
         4     2  record version (uint16)
         6     1  dtype code (1 = int16, 2 = int32)
         7     1  reserved (0)
         8     4  frames (uint32)
        12     2  grid height h (uint16)
        14     2  grid width w (uint16)
        16     4  label (int32, -1 = unlabeled)
        20     8  source duration in seconds (float64)
        28     8  source fps (float64)
        36     -  codes, frames*h*w values of the dtype, C order [frames, h, w]

The header is 36 bytes (a multiple of 4), so int32 codes stay aligned when the buffer is.

Crash safety: each view is its own LMDB environment and a commit writes one transaction per view, so a writer
killed between two view commits leaves a video in some views only. `CodeDatabaseWriter.done_ids` therefore
counts a video as done only when it is in every view (or in failures.jsonl); the rerun rewrites it (put
overwrites). Readers likewise only list ids present in every view.

Damaged records: a record that does not decode (garbage, truncated, another record version) or a listed id
without a record raises CorruptRecordError (MissingRecordError, also a KeyError, for the latter) naming the
database, the view and the video id; the trainers stop on it or, with --on-bad-record skip, let another video
stand in (vimpac.data.read_or_substitute).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from vimpac.atomic_write import write_json_atomic, write_text_atomic
from vimpac.errors import UsageError

SCHEMA_VERSION = 1
RECORD_VERSION = 1
MAGIC = b"VPCR"
# Sparse on Linux: the file only grows with the data actually written (docs/design.md §11.3).
DEFAULT_MAP_SIZE = 1 << 40
# How the frames were made (tokenization.decode.FRAME_SELECTIONS / FRAME_RESIZE); see `extraction_method`.
EXTRACTION_KEYS = ("frame_selection", "resize")
# Keys whose values must agree for two runs (resume) or two databases (merge) to share one database.
CONFIG_KEYS = (
    "schema_version",
    "dataset",
    "fps",
    "frame_size",
    "grid",
    "tokenizer",
    "views",
    "classes",
    *EXTRACTION_KEYS,
)
MANIFEST = "manifest.json"
# The original release's dataset names (its --dset_name, its LMDB folder names) that vimpac spells otherwise.
ORIGINAL_DATASET_NAMES = {"sthv2": "ssv2", "kinetics400": "kinetics"}
FAILURES = "failures.jsonl"
VIEWS_DIR = "views"
MAX_ID_BYTES = 511  # LMDB's key limit: a video id is its records' key

_HEADER = struct.Struct("<4sHBxIHHidd")
HEADER_SIZE = _HEADER.size
_DTYPE_CODES = {1: np.dtype("<i2"), 2: np.dtype("<i4")}
_CODE_OF_DTYPE = {dt: code for code, dt in _DTYPE_CODES.items()}


# --------------------------------------------------------------------------------------------------- errors


class CorruptRecordError(ValueError):
    """A record of a code database that cannot be read: it does not decode (bad magic or version, unknown dtype,
    a length that disagrees with its header: garbage or truncated bytes). The message names the database, the
    view and the video id; the same facts are attributes (`path`, `view`, `video_id`, `reason`: the decoder's
    words). Raised by `CodeDatabase.read` / `record` / `validate`. The constructor also takes a message alone,
    which is how a DataLoader worker's exception is re-raised in the main process (see `record_error_message`).
    """

    def __init__(
        self,
        message: str,
        path: str | Path | None = None,
        view: str | None = None,
        video_id: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.view, self.video_id, self.reason = view, video_id, reason

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def as_dict(self) -> dict[str, str | None]:
        """{"path", "view", "id", "reason"}: what a skipped record's warning names (json-serializable)."""
        return {"path": self.path, "view": self.view, "id": self.video_id, "reason": self.reason or str(self)}


class MissingRecordError(CorruptRecordError, KeyError):
    """A video id that has no record in a view (a KeyError too, as `CodeDatabase.raw` always raised)."""


def record_error_message(err: CorruptRecordError) -> str:
    """The one-line message of `err`, also when a DataLoader worker raised it: torch then re-raises the same type
    with "Caught ... in DataLoader worker process N. Original Traceback ..." as its message, whose last line
    holds the original message."""
    text = str(err)
    if "Original Traceback" in text:
        for line in reversed(text.strip().splitlines()):
            name = f"{type(err).__name__}: "
            if name in line:
                return line.split(name, 1)[1].strip()
    return text


# --------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One video in one view. `codes` is [frames, h, w] int16/int32; when it comes from `decode_record` it is a
    read-only view into the buffer it was decoded from (copy it, e.g. `np.array(codes)`, before writing to it or
    handing it to `torch.from_numpy`)."""

    codes: np.ndarray
    label: int
    duration: float
    fps: float

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def codes_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype for codes in [0, vocab_size): int16 unless the vocabulary does not fit (> 32767)."""
    return np.dtype("<i2") if vocab_size <= np.iinfo(np.int16).max else np.dtype("<i4")


def encode_record(
    codes: np.ndarray, label: int, duration: float, fps: float, dtype: np.dtype | str | None = None
) -> bytes:
    """Serialize codes [frames, h, w] plus metadata into one record (layout in the module docstring).

    `dtype` (int16 or int32) is the storage type; None keeps `codes.dtype`, which must then be one of them.
    Values outside the storage type's range raise ValueError rather than wrapping around silently.
    """
    codes = np.asarray(codes)
    if codes.ndim != 3:
        raise ValueError(f"codes must be [frames, h, w], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    target = np.dtype(dtype if dtype is not None else codes.dtype).newbyteorder("<")
    if target not in _CODE_OF_DTYPE:
        raise ValueError(f"codes are stored as int16 or int32, not {target}")
    if codes.size and codes.dtype != target:
        info = np.iinfo(target)
        low, high = int(codes.min()), int(codes.max())
        if low < info.min or high > info.max:
            raise ValueError(f"codes range [{low}, {high}] does not fit {target.name}")
    frames, h, w = codes.shape
    header = _HEADER.pack(MAGIC, RECORD_VERSION, _CODE_OF_DTYPE[target], frames, h, w, int(label), duration, fps)
    return header + np.ascontiguousarray(codes, dtype=target).tobytes()


def _unpack_header(buf: bytes | memoryview) -> tuple[np.dtype, int, int, int, int, float, float]:
    """(dtype, frames, h, w, label, duration, fps) from a record's header; ValueError when it is not a record."""
    if len(buf) < HEADER_SIZE:
        raise ValueError(f"record too short ({len(buf)} bytes < {HEADER_SIZE}-byte header)")
    magic, version, dtype_code, frames, h, w, label, duration, fps = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ValueError(f"not a vimpac record (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != RECORD_VERSION:
        raise ValueError(f"record version {version} is not supported (this vimpac reads version {RECORD_VERSION})")
    if dtype_code not in _DTYPE_CODES:
        raise ValueError(f"unknown codes dtype code {dtype_code}")
    dtype = _DTYPE_CODES[dtype_code]
    expected = HEADER_SIZE + frames * h * w * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(f"record is {len(buf)} bytes, header says {expected} ([{frames}, {h}, {w}] {dtype.name})")
    return dtype, frames, h, w, label, duration, fps


def decode_record(buf: bytes | memoryview) -> Record:
    """Inverse of `encode_record`, zero-copy: the codes are a read-only view into `buf` (keep `buf` alive and
    unchanged while using them; LMDB's default `txn.get` returns `bytes`, which is safe to keep)."""
    dtype, frames, h, w, label, duration, fps = _unpack_header(buf)
    codes = np.frombuffer(buf, dtype=dtype, count=frames * h * w, offset=HEADER_SIZE).reshape(frames, h, w)
    return Record(codes=codes, label=int(label), duration=float(duration), fps=float(fps))


# ------------------------------------------------------------------------------------------ manifest, failures


def read_manifest(path: str | Path) -> dict:
    """The manifest of database `path`; UsageError when `path` is not a code database."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"{path} is not a code database (no {MANIFEST}); a database is made by `vimpac tokenize`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{manifest_path} cannot be read ({err}); the database is damaged, rebuild it") from err
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{path} has database schema version {version}; this vimpac reads version {SCHEMA_VERSION} "
            "(re-run `vimpac tokenize` with this version)"
        )
    return manifest


def extraction_method(manifest: Mapping[str, Any]) -> dict[str, str]:
    """{"frame_selection", "resize"} of a manifest. Manifests written before these keys existed hold vimpac's own
    rule ("vimpac", "area"), or the original's ffmpeg extraction ("ffmpeg", "bicubic") when imported from the
    original release (they carry `source`)."""
    if "source" in manifest:
        default = {"frame_selection": "ffmpeg", "resize": "bicubic"}
    else:
        default = {"frame_selection": "vimpac", "resize": "area"}
    return {key: manifest.get(key) or default[key] for key in EXTRACTION_KEYS}


def check_dataset_name(name: str | None, manifest: Mapping[str, Any], path: str | Path) -> None:
    """UsageError when --dataset-name `name` (vimpac's spelling or the original release's, e.g. kinetics400) is
    not the dataset of the database at `path`; None checks nothing."""
    held = manifest.get("dataset")
    if name is not None and ORIGINAL_DATASET_NAMES.get(name, name) != held:
        raise UsageError(
            f"--dataset-name {name} but {path} holds dataset {held!r}; drop the flag or point at the right database"
        )


def check_same_tokenizer_databases(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> None:
    """UsageError when two databases one run reads together were made by different tokenizers (their manifests'
    fingerprints differ): the same code number is another visual word in each."""
    fa, fb = ((m.get("tokenizer") or {}).get("fingerprint") for m in (a, b))
    if fa and fb and fa != fb:
        raise UsageError(
            f"{b_name} was tokenized by tokenizer {fb} and {a_name} by tokenizer {fa}: a code means another thing "
            "in each; tokenize both with the same tokenizer"
        )


def extraction_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """One "key: a vs b" line per way two databases made their frames differently (frame selection, resize)."""
    ma, mb = extraction_method(a), extraction_method(b)
    return [f"{key}: {ma[key]!r} vs {mb[key]!r}" for key in EXTRACTION_KEYS if ma[key] != mb[key]]


def _config_value(manifest: Mapping[str, Any], key: str) -> Any:
    """manifest[key], with `extraction_method`'s defaults for manifests older than its keys."""
    return extraction_method(manifest)[key] if key in EXTRACTION_KEYS else manifest.get(key)


def _normalized(manifest: Mapping[str, Any]) -> dict:
    """JSON round trip, so tuples compare equal to the lists they become on disk."""
    return json.loads(json.dumps(manifest))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One readable line per configuration key (CONFIG_KEYS; tokenizer field by field) whose values differ."""
    lines = []
    for key in CONFIG_KEYS:
        a, b = _config_value(old, key), _config_value(new, key)
        if key == "tokenizer" and isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    lines.append(f"tokenizer.{sub}: {a.get(sub)!r} vs {b.get(sub)!r}")
        elif key in ("classes", "views") and isinstance(a, list) and isinstance(b, list) and a != b:
            lines.append(f"{key}: {_list_difference(a, b)}")
        elif a != b:
            lines.append(f"{key}: {a!r} vs {b!r}")
    return lines


def _list_difference(a: list, b: list) -> str:
    """Short description of how two lists differ (they can be hundreds of class names long)."""
    if len(a) != len(b):
        return f"{len(a)} entries vs {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"entry {i} is {a[i]!r} vs {b[i]!r}"


def _validate_base(manifest: Mapping[str, Any]) -> dict:
    """Check the writer's configuration; returns a normalized copy with schema_version and codes_dtype set."""
    missing = [
        k for k in ("dataset", "fps", "frame_size", "grid", "tokenizer", "views", "classes") if k not in manifest
    ]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    base = _normalized(manifest)
    tok = base["tokenizer"]
    if not isinstance(tok, dict) or not {"name", "vocab_size", "fingerprint"} <= set(tok):
        raise ValueError(f"manifest tokenizer must have name, vocab_size and fingerprint, got {tok!r}")
    if len(base["grid"]) != 2:
        raise ValueError(f"grid must be [h, w], got {base['grid']!r}")
    views = base["views"]
    if not views or len(set(views)) != len(views) or any(not v or "/" in v or v.startswith(".") for v in views):
        raise ValueError(f"views must be distinct non-empty directory names, got {views!r}")
    base.update(extraction_method(base))
    base["schema_version"] = SCHEMA_VERSION
    base["codes_dtype"] = codes_dtype(int(tok["vocab_size"])).name
    return base


def _reason_kind(reason: str) -> str:
    """Group key of a failure reason: its text up to the first ':' or '(' ("truncated: stopped after 1.2 s" ->
    "truncated"), since the details make most reasons unique."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


def _parse_failures(path: Path) -> tuple[list[dict], bool]:
    """(failures, clean) from failures.jsonl: one entry per id (first wins), skipping a torn or corrupt line."""
    if not path.exists():
        return [], True
    data = path.read_bytes()
    clean = not data or data.endswith(b"\n")
    entries: dict[str, dict] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            clean = False
            continue
        if not isinstance(entry, dict) or "id" not in entry:
            clean = False
            continue
        if entry["id"] in entries:
            clean = False
            continue
        entries[entry["id"]] = entry
    return list(entries.values()), clean


def _write_failures(path: Path, failures: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in failures))


# ------------------------------------------------------------------------------------------------ scanning


def check_not_truncated(env: lmdb.Environment, view_dir: Path) -> None:
    """UsageError when a view's data.mdb is shorter than the pages its meta page says it holds (a copy cut short,
    a disk that filled during one): LMDB maps the file, so reading past its end kills the process with SIGBUS,
    without a word."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    data = view_dir / "data.mdb"
    size = data.stat().st_size if data.is_file() else 0
    if size < needed:
        raise UsageError(
            f"{data} is truncated ({size:,} bytes; its pages need {needed:,}): this view of the database is "
            "damaged. Copy the database again, or tokenize into a new --out"
        )


class _ReadOnlyEnvs:
    """Per-process, reference-counted read-only environments, shared by every CodeDatabase in the process.

    py-lmdb refuses to open one environment twice in a process (LMDB forbids it), yet a process often holds two
    readers of one database (train and test splits), and a forked DataLoader worker inherits the parent's open
    environments, which it must not use and which block a fresh open. So after a fork the child closes the
    inherited lock-free environments (no shared lock table, so closing touches only the child's own mappings)
    and reopens on demand. Lock-taking environments (lock=True, `inspect` of an incomplete database) are not
    fork-safe: closing one in a child would clear the parent's reader slots, so they are left untouched.
    """

    def __init__(self) -> None:
        self._open: dict[str, list] = {}  # resolved path -> [env, users, lock]

    def acquire(self, view_dir: Path, lock: bool) -> lmdb.Environment:
        key = str(view_dir.resolve())
        entry = self._open.get(key)
        if entry is None:
            # lock=False: no reader-table writes, so read-only media and many worker processes are fine; only
            # safe while no writer is active, which is why `inspect` asks for lock=True on incomplete databases.
            env = lmdb.open(key, readonly=True, lock=lock, readahead=False, subdir=True)
            try:
                check_not_truncated(env, view_dir)
            except UsageError:
                env.close()
                raise
            entry = self._open[key] = [env, 0, lock]
        entry[1] += 1
        return entry[0]

    def release(self, view_dir: Path) -> None:
        key = str(view_dir.resolve())
        entry = self._open.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()
                del self._open[key]

    def after_fork_in_child(self) -> None:
        for env, _, lock in self._open.values():
            if not lock:
                env.close()
        self._open = {}


_READERS = _ReadOnlyEnvs()
os.register_at_fork(after_in_child=_READERS.after_fork_in_child)


def _keys(env: lmdb.Environment) -> set[str]:
    with env.begin() as txn:
        return {key.decode("utf-8") for key in txn.cursor().iternext(keys=True, values=False)}


def _frames_by_id(env: lmdb.Environment) -> dict[str, int]:
    """Frame count of every record in one view, reading only headers (buffers: no copy of the codes). A record that
    does not decode counts 0 frames (so `inspect` can go on and report it as a problem)."""
    out = {}
    with env.begin(buffers=True) as txn:
        for key, value in txn.cursor():
            try:
                frames = _unpack_header(value)[1]
            except ValueError:
                frames = 0
            out[bytes(key).decode("utf-8")] = frames
    return out


def _count(envs: Mapping[str, lmdb.Environment], splits: Mapping[str, Sequence[str]], failures: list[dict]) -> dict:
    """Counts for the manifest and `inspect`: videos (in every view), frames, partial ids (in some views only),
    records per view, failures by stage and reason kind, and per split listed/videos/frames/failed/missing."""
    keys = {view: _keys(env) for view, env in envs.items()}
    present = set.intersection(*keys.values())
    partial = set.union(*keys.values()) - present
    first = next(iter(envs))
    frames = {k: n for k, n in _frames_by_id(envs[first]).items() if k in present}
    failed = {f["id"] for f in failures} - present
    live_failures = [f for f in failures if f["id"] in failed]
    split_counts = {}
    for name, ids in splits.items():
        ids = set(ids)
        ok = ids & present
        split_counts[name] = {
            "listed": len(ids),
            "videos": len(ok),
            "frames": sum(frames[i] for i in ok),
            "failed": len(ids & failed),
            "missing": len(ids - present - failed),
        }
    return {
        "videos": len(present),
        "frames": sum(frames.values()),
        "partial": len(partial),
        "views": {view: len(k) for view, k in keys.items()},
        "failures": {
            "total": len(live_failures),
            "by_stage": dict(sorted(Counter(f.get("stage", "?") for f in live_failures).items())),
            "by_reason": dict(
                sorted(
                    Counter(
                        f"{f.get('stage', '?')}: {_reason_kind(str(f.get('reason', '')))}" for f in live_failures
                    ).items()
                )
            ),
        },
        "splits": split_counts,
    }


# -------------------------------------------------------------------------------------------------- writer


class CodeDatabaseWriter:
    """Writes (or resumes writing) one database.

    `manifest` holds the configuration: dataset, fps, frame_size, grid [h, w], tokenizer {name, vocab_size,
    fingerprint}, views [names], classes [names], and optionally args (creation arguments, not compared). A
    directory that already holds a database is resumed when `resume` is true and its configuration matches
    (else UsageError naming every differing key). Records are buffered and committed every `commit_every`
    videos or `commit_seconds` seconds, one LMDB transaction per view; use it as a context manager so the last
    batch is committed even when extraction fails. Only one writer per database at a time (an flock).
    """

    def __init__(
        self,
        path: str | Path,
        manifest: Mapping[str, Any],
        resume: bool = True,
        commit_every: int = 100,
        commit_seconds: float = 30.0,
        map_size: int = DEFAULT_MAP_SIZE,
    ):
        self.path = Path(path)
        base = _validate_base(manifest)
        self.views: list[str] = list(base["views"])
        self.grid = (int(base["grid"][0]), int(base["grid"][1]))
        self.vocab_size = int(base["tokenizer"]["vocab_size"])
        self.dtype = codes_dtype(self.vocab_size)
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self._pending: dict[str, dict[str, bytes]] = {}
        self._last_commit = time.monotonic()

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._acquire_lock()
        try:
            existed = (self.path / MANIFEST).is_file()
            self.manifest = self._start_manifest(base, resume)
            if not existed:  # a new database is one from its first file on: a rerun after any failure resumes it
                write_json_atomic(self.path / MANIFEST, self.manifest)
            self._failures_path = self.path / FAILURES
            failures, clean = _parse_failures(self._failures_path)
            if not clean:  # a kill during add_failure left a torn last line: keep only whole lines
                _write_failures(self._failures_path, failures)
            self._failed_ids = {f["id"] for f in failures}
            (self.path / VIEWS_DIR).mkdir(exist_ok=True)
            self._envs = {}
            for view in self.views:
                view_dir = self.path / VIEWS_DIR / view
                self._envs[view] = lmdb.open(str(view_dir), map_size=map_size, subdir=True, readahead=False)
                check_not_truncated(self._envs[view], view_dir)
            if existed:  # only now, with every view whole: a refused resume leaves the manifest as it was
                write_json_atomic(self.path / MANIFEST, self.manifest)
        except BaseException:
            for env in getattr(self, "_envs", {}).values():
                env.close()
            self._lock_file.close()
            raise

    def _acquire_lock(self):
        lock_file = open(self.path / "writer.lock", "a")  # noqa: SIM115 (held open for the writer's lifetime)
        # A reader checking for a writer (writer_active) holds a shared lock for an instant: retry for a second.
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock_file
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock_file.close()
                    raise UsageError(
                        f"another process is writing {self.path}; wait for it or choose another output"
                    ) from None
                time.sleep(0.02)

    def _start_manifest(self, base: dict, resume: bool) -> dict:
        manifest_path = self.path / MANIFEST
        # The splits of earlier runs stay until `finalize` (it keeps those this run's annotations do not name).
        self._earlier_splits: dict[str, list[str]] = {}
        if manifest_path.exists():
            old = read_manifest(self.path)
            self._earlier_splits = dict(old.get("splits") or {})
            if not resume:
                raise UsageError(f"{self.path} already holds a code database; resume it or choose a new output")
            diffs = config_differences(old, base)
            if diffs:
                raise UsageError(
                    f"{self.path} was made with different settings (existing vs requested):\n  "
                    + "\n  ".join(diffs)
                    + "\nrerun with the same settings to resume it, or choose a new output directory"
                )
        elif any(p.name not in ("writer.lock", MANIFEST + ".tmp") for p in self.path.iterdir()):
            raise UsageError(f"{self.path} exists, is not empty and is not a code database; choose a new output")
        manifest = {**base, "splits": dict(self._earlier_splits), "counts": {}, "complete": False}
        manifest.setdefault("args", {})
        return manifest

    # -- writing

    def add(self, video_id: str, codes_by_view: Mapping[str, Any], label: int, duration: float, fps: float) -> None:
        """Buffer one video: codes_by_view = {view: int array [frames, h, w]} for exactly the database's views
        (numpy or CPU torch), all with the same frame count; codes must lie in [0, vocab_size)."""
        self._check_id(video_id)
        if set(codes_by_view) != set(self.views):
            missing = sorted(set(self.views) - set(codes_by_view))
            extra = sorted(set(codes_by_view) - set(self.views))
            raise ValueError(f"{video_id}: views must be exactly the database's; missing {missing}, unknown {extra}")
        records, frames = {}, set()
        for view in self.views:
            codes = np.asarray(codes_by_view[view])
            if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid or codes.shape[0] < 1:
                raise ValueError(
                    f"{video_id} view {view}: codes shape {codes.shape}, expected [frames>=1, {self.grid}]"
                )
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"{video_id} view {view}: codes range [{low}, {high}] outside vocabulary [0, {self.vocab_size})"
                )
            frames.add(codes.shape[0])
            records[view] = encode_record(codes.astype(self.dtype, copy=False), label, duration, fps)
        if len(frames) != 1:
            raise ValueError(f"{video_id}: views have different frame counts {sorted(frames)}")
        self._buffer(video_id, records)

    def add_encoded(self, video_id: str, records: Mapping[str, bytes]) -> None:
        """Buffer already-encoded records {view: bytes} (used by merge: copies without re-encoding)."""
        self._check_id(video_id)
        if set(records) != set(self.views):
            raise ValueError(f"{video_id}: records must cover exactly the views {self.views}")
        for view, buf in records.items():
            dtype, _, h, w, *_ = _unpack_header(buf)
            if (h, w) != self.grid or dtype != self.dtype:
                raise ValueError(
                    f"{video_id} view {view}: record is [{h}, {w}] {dtype.name}, database expects "
                    f"{list(self.grid)} {self.dtype.name}"
                )
        self._buffer(video_id, dict(records))

    def _check_id(self, video_id: str) -> None:
        if not isinstance(video_id, str) or not video_id:
            raise ValueError(f"video id must be a non-empty string, got {video_id!r}")
        if len(video_id.encode("utf-8")) > MAX_ID_BYTES:
            raise ValueError(f"video id longer than LMDB's {MAX_ID_BYTES}-byte key limit: {video_id[:80]}...")

    def _buffer(self, video_id: str, records: dict[str, bytes]) -> None:
        self._pending[video_id] = records
        if len(self._pending) >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def add_failure(self, video_id: str, path: str | Path | None, stage: str, reason: str) -> None:
        """Record a video that could not be tokenized: one durable (fsync'd) JSON line; ignored if the id already
        has one, so a rerun never duplicates lines."""
        if video_id in self._failed_ids:
            return
        line = json.dumps(
            {"id": video_id, "path": None if path is None else str(path), "stage": stage, "reason": reason},
            ensure_ascii=False,
        )
        with open(self._failures_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._failed_ids.add(video_id)

    def commit(self) -> None:
        """Make buffered records durable: one write transaction per view."""
        if self._pending:
            for view, env in self._envs.items():
                with env.begin(write=True) as txn:
                    for video_id, records in self._pending.items():
                        txn.put(video_id.encode("utf-8"), records[view])
            self._pending.clear()
        self._last_commit = time.monotonic()

    # -- state

    def done_ids(self) -> set[str]:
        """Ids a (re)run can skip: a record in every view (committed or buffered), or a line in failures.jsonl."""
        present = set.intersection(*(_keys(env) for env in self._envs.values()))
        return present | set(self._pending) | self._failed_ids

    def labels(self) -> dict[str, int]:
        """{id: label} of the committed records, read from the first view's record headers (no codes copied)."""
        out = {}
        with self._envs[self.views[0]].begin(buffers=True) as txn:
            for key, value in txn.cursor():
                out[bytes(key).decode("utf-8")] = _unpack_header(value)[4]
        return out

    def forget_failures(self, ids: Iterable[str]) -> None:
        """Drop the failure lines of `ids` (atomically), so that a rerun tries those videos again."""
        forget = set(ids) & self._failed_ids
        if forget:
            _write_failures(self._failures_path, [f for f in self.failures() if f["id"] not in forget])
            self._failed_ids -= forget

    def failures(self) -> list[dict]:
        """The failure entries written so far ({"id", "path", "stage", "reason"}), one per id."""
        return _parse_failures(self._failures_path)[0]

    def finalize(self, splits: Mapping[str, Sequence[str]]) -> dict:
        """Commit, drop failure lines of ids that now have records, write the final manifest (splits sorted,
        counts, complete=true) atomically and return it. The splits list every annotated id; readers list only
        the ids with records. A split of an earlier run into this database that `splits` does not name is kept
        (e.g. train_1 from trainlist01, then test_1 from testlist01); one it names is replaced."""
        splits = {**self._earlier_splits, **splits}
        self.commit()
        failures = self.failures()
        present = set.intersection(*(_keys(env) for env in self._envs.values()))
        kept = [f for f in failures if f["id"] not in present]
        if len(kept) != len(failures):
            _write_failures(self._failures_path, kept)
            self._failed_ids = {f["id"] for f in kept}
        sorted_splits = {name: sorted(set(ids)) for name, ids in sorted(splits.items())}
        self.manifest = {
            **self.manifest,
            "splits": sorted_splits,
            "counts": _count(self._envs, sorted_splits, kept),
            "complete": True,
        }
        write_json_atomic(self.path / MANIFEST, self.manifest)
        return self.manifest

    def close(self) -> None:
        """Commit what is buffered and release the environments and the writer lock."""
        if self._lock_file.closed:
            return
        try:
            self.commit()
        finally:
            for env in self._envs.values():
                env.close()
            self._lock_file.close()

    def __enter__(self) -> CodeDatabaseWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------- reader


def writer_active(path: str | Path) -> bool:
    """Whether a CodeDatabaseWriter (`vimpac tokenize`, `db merge`, `db import-original`) holds the database now."""
    lock_path = Path(path) / "writer.lock"
    try:
        with open(lock_path) as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when the file closes
    except BlockingIOError:
        return True
    except OSError:  # no lock file (never written, or copied without it), or one this user cannot read
        return False
    return False


class CodeDatabase:
    """Read-only access to a database; safe to pickle into DataLoader workers (each process opens its own
    LMDB environments lazily on first use: environments cannot be pickled or shared across fork).

    `read` returns read-only codes (zero-copy views into the bytes LMDB returned); copy before modifying.
    Reading an incomplete database (complete=false: extraction still running or killed) is allowed; `ids()`
    lists only videos present in every view. `lock` False (LMDB without its reader table, for read-only media and
    many processes) is only safe while no writer is active: a database a writer holds opens with lock=True anyway.
    """

    def __init__(self, path: str | Path, lock: bool = False):
        self._envs: dict[str, lmdb.Environment] = {}  # set first: close() runs from __del__ even if init fails
        self._pid = os.getpid()
        self._ids: list[str] | None = None
        self._id_set: set[str] | None = None
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.views: list[str] = list(self.manifest["views"])
        self.lock = lock or writer_active(self.path)
        missing = [v for v in self.views if not (self.path / VIEWS_DIR / v / "data.mdb").is_file()]
        if missing:
            raise UsageError(f"{self.path} is damaged: view directories {missing} are missing; rebuild the database")

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def splits(self) -> dict[str, list[str]]:
        return self.manifest.get("splits", {})

    def _env(self, view: str) -> lmdb.Environment:
        if view not in self.views:
            raise UsageError(f"unknown view {view!r} in {self.path}; valid views: {', '.join(self.views)}")
        if self._pid != os.getpid():  # forked: the parent's environments must not be used here
            self._envs, self._pid = {}, os.getpid()
        env = self._envs.get(view)
        if env is None:
            env = self._envs[view] = _READERS.acquire(self.path / VIEWS_DIR / view, self.lock)
        return env

    def _missing(self, video_id: str, view: str) -> MissingRecordError:
        return MissingRecordError(
            f"code database {self.path}: video {video_id!r} is not in view {view!r} (a missing record); check the "
            f"database with `vimpac db inspect {self.path}`, re-tokenize the video, or train with --on-bad-record "
            "skip",
            self.path,
            view,
            video_id,
            "missing record",
        )

    def _corrupt(self, video_id: str, view: str, err: ValueError) -> CorruptRecordError:
        return CorruptRecordError(
            f"code database {self.path}: the record of video {video_id!r} in view {view!r} is corrupt ({err}); check "
            f"the database with `vimpac db inspect {self.path}`, re-tokenize the video, or train with "
            "--on-bad-record skip",
            self.path,
            view,
            video_id,
            str(err),
        )

    def raw(self, video_id: str, view: str) -> bytes:
        """The encoded record (bytes, a copy out of the memory map); MissingRecordError (a KeyError) naming the
        database, id and view if absent."""
        with self._env(view).begin() as txn:
            buf = txn.get(video_id.encode("utf-8"))
        if buf is None:
            raise self._missing(video_id, view)
        return buf

    def record(self, video_id: str, view: str) -> Record:
        """The decoded record; CorruptRecordError naming the database, view and id when it does not decode."""
        buf = self.raw(video_id, view)
        try:
            return decode_record(buf)
        except ValueError as err:
            raise self._corrupt(video_id, view, err) from err

    def read(self, video_id: str, view: str) -> tuple[np.ndarray, int]:
        """(codes [frames, h, w] int16/int32 read-only, label int). A missing or undecodable record raises
        CorruptRecordError (MissingRecordError when absent) naming the database, the view and the video id."""
        rec = self.record(video_id, view)
        return rec.codes, rec.label

    def validate(self, video_id: str, view: str) -> None:
        """Raise as `read` would for a missing or undecodable record, reading only its header (no copy of the
        codes: cheap enough to check a whole split before an evaluation)."""
        with self._env(view).begin(buffers=True) as txn:
            buf = txn.get(video_id.encode("utf-8"))
            if buf is None:
                raise self._missing(video_id, view)
            try:
                _unpack_header(buf)
            except ValueError as err:
                raise self._corrupt(video_id, view, err) from err

    def ids(self, split: str | None = None) -> list[str]:
        """Sorted ids with a record in every view; with `split`, only those listed in that manifest split."""
        if self._ids is None:
            self._ids = sorted(set.intersection(*(_keys(self._env(v)) for v in self.views)))
        if split is None:
            return list(self._ids)
        if split not in self.splits:
            if not self.complete:
                raise UsageError(f"{self.path} is incomplete (no splits yet); rerun `vimpac tokenize` to finish it")
            raise UsageError(f"unknown split {split!r} in {self.path}; valid splits: {', '.join(self.splits)}")
        present = set(self._ids)
        return [i for i in self.splits[split] if i in present]

    def failures(self) -> list[dict]:
        return _parse_failures(self.path / FAILURES)[0]

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, video_id: object) -> bool:
        if self._id_set is None:
            self._id_set = set(self.ids())
        return video_id in self._id_set

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def close(self) -> None:
        """Release this reader's environments (closed once no other reader in the process uses them)."""
        if self._pid == os.getpid():
            for view in self._envs:
                _READERS.release(self.path / VIEWS_DIR / view)
        self._envs = {}

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_envs"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


# ----------------------------------------------------------------------------------------- inspect, merge


def inspect(path: str | Path, sample: int = 100, seed: int = 0) -> dict:
    """Summary, live counts and a verification of `sample` random videos (all when sample >= their number).

    Verification per sampled id (among those in every view): decodes, grid matches the manifest, dtype matches
    the vocabulary, codes in [0, vocab_size), label in [-1, classes), same frame count in every view. Videos found
    in some views only are a warning in an incomplete database (a kill between view commits) and a problem in a
    finalized one. Returns {"path", "manifest": summary, "counts", "verified", "problems": [{"id", "view",
    "problem"}], "warnings", "ok"} where ok means no problems (warnings, e.g. "incomplete", do not clear it).
    """
    manifest = read_manifest(path)
    db = CodeDatabase(path, lock=not manifest.get("complete"))
    envs = {view: db._env(view) for view in db.views}
    failures = db.failures()
    counts = _count(envs, db.splits, failures)
    grid = tuple(manifest["grid"])
    vocab = int(manifest["tokenizer"]["vocab_size"])
    num_classes = len(manifest["classes"])
    expected_dtype = codes_dtype(vocab)

    ids = db.ids()
    chosen = random.Random(seed).sample(ids, min(sample, len(ids)))
    problems = []
    for video_id in sorted(chosen):
        frames = {}
        for view in db.views:
            try:
                rec = db.record(video_id, view)
            except CorruptRecordError as err:
                problems.append({"id": video_id, "view": view, "problem": f"does not decode: {err.reason or err}"})
                continue
            frames[view] = rec.frames
            for problem in _record_problems(rec, grid, vocab, expected_dtype, num_classes):
                problems.append({"id": video_id, "view": view, "problem": problem})
        if len(set(frames.values())) > 1:
            problems.append({"id": video_id, "view": None, "problem": f"frame counts differ across views: {frames}"})

    warnings = []
    if not db.complete:
        warnings.append("database is incomplete (extraction running or interrupted); rerun `vimpac tokenize`")
    if counts["partial"]:
        # Expected after a kill between view commits (the resume rewrites them); a finalized database has none.
        partial = sorted(set.union(*(_keys(env) for env in envs.values())) - set(ids))
        message = f"{len(partial)} videos are in some views only, e.g. {partial[:3]}"
        if db.complete:
            problems.append({"id": None, "view": None, "problem": message})
        else:
            warnings.append(f"{message} (an interrupted commit; a rerun fixes it)")
    if db.complete:
        stored = {k: manifest["counts"].get(k) for k in ("videos", "frames")}
        live = {k: counts[k] for k in ("videos", "frames")}
        if stored != live:
            warnings.append(f"manifest counts {stored} differ from the records found {live}")
    summary = {
        key: manifest.get(key)
        for key in (
            "schema_version",
            "dataset",
            "fps",
            "frame_size",
            "grid",
            "tokenizer",
            "views",
            "codes_dtype",
            "complete",
            "args",
            "source",
        )
    }
    summary.update(extraction_method(manifest))
    summary["classes"] = len(manifest["classes"])
    summary["splits"] = {name: len(ids) for name, ids in db.splits.items()}
    db.close()
    return {
        "path": str(path),
        "manifest": summary,
        "counts": counts,
        "verified": len(chosen),
        "problems": problems,
        "warnings": warnings,
        "ok": not problems,
    }


def _record_problems(rec: Record, grid: tuple, vocab: int, dtype: np.dtype, num_classes: int) -> list[str]:
    problems = []
    if tuple(rec.codes.shape[1:]) != grid:
        problems.append(f"grid {list(rec.codes.shape[1:])} != manifest grid {list(grid)}")
    if rec.codes.dtype != dtype:
        problems.append(f"dtype {rec.codes.dtype.name} != {dtype.name} expected for vocab_size {vocab}")
    if rec.codes.size and (int(rec.codes.min()) < 0 or int(rec.codes.max()) >= vocab):
        problems.append(f"codes range [{int(rec.codes.min())}, {int(rec.codes.max())}] outside [0, {vocab})")
    if rec.frames < 1:
        problems.append("no frames")
    if not -1 <= rec.label < num_classes:
        problems.append(f"label {rec.label} outside [-1, {num_classes})")
    return problems


def merge(out: str | Path, paths: Sequence[str | Path], progress: bool = True) -> dict:
    """Merge complete databases (e.g. shards of one extraction) into a new database `out`; returns its manifest.

    Refuses (UsageError, before writing anything) when `out` exists and is not empty, an input is incomplete,
    the inputs' configurations differ (tokenizer, fps, frame size, grid, views, classes, dataset, frame selection,
    resize), or one id has different records in two inputs. Identical duplicates are kept once. Splits are united;
    failures are united, dropping ids that succeeded in another input.
    """
    from tqdm import tqdm

    out = Path(out)
    if not paths:
        raise UsageError("merge needs at least one input database")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output {out} already exists; choose a new output directory")
    dbs = [CodeDatabase(p) for p in paths]
    for db in dbs:
        if not db.complete:
            raise UsageError(f"{db.path} is incomplete; finish it by rerunning `vimpac tokenize` before merging")
    first = dbs[0]
    for db in dbs[1:]:
        diffs = config_differences(first.manifest, db.manifest)
        if diffs:
            raise UsageError(
                f"cannot merge {db.path} into {first.path}: settings differ ({first.path} vs {db.path}):\n  "
                + "\n  ".join(diffs)
            )

    owner: dict[str, int] = {}  # id -> index of the first input holding it
    duplicates: list[tuple[str, int, int]] = []
    for index, db in enumerate(dbs):
        for video_id in db.ids():
            if video_id in owner:
                duplicates.append((video_id, owner[video_id], index))
            else:
                owner[video_id] = index
    for video_id, a, b in duplicates:
        for view in first.views:
            if dbs[a].raw(video_id, view) != dbs[b].raw(video_id, view):
                raise UsageError(
                    f"video {video_id!r} has different records in {dbs[a].path} and {dbs[b].path} (view {view}); "
                    "merge only databases tokenized identically, or remove one of them"
                )

    splits: dict[str, set[str]] = {}
    failures: dict[str, dict] = {}
    for db in dbs:
        for name, ids in db.splits.items():
            splits.setdefault(name, set()).update(ids)
        for entry in db.failures():
            if entry["id"] not in owner:
                failures.setdefault(entry["id"], entry)

    base = {key: _config_value(first.manifest, key) for key in CONFIG_KEYS}
    base["args"] = {"merged_from": [str(db.path) for db in dbs]}
    with CodeDatabaseWriter(out, base, resume=False, commit_every=1000) as writer:
        for video_id in tqdm(sorted(owner), desc="merge", unit="video", disable=None if progress else True):
            db = dbs[owner[video_id]]
            writer.add_encoded(video_id, {view: db.raw(video_id, view) for view in first.views})
        for entry in failures.values():
            writer.add_failure(entry["id"], entry.get("path"), entry.get("stage", "?"), entry.get("reason", ""))
        manifest = writer.finalize(splits)
    for db in dbs:
        db.close()
    return manifest
