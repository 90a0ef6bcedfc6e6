"""Files that appear whole or not at all.

Every file other programs or a resumed run read back (manifests, checkpoints' pointers, exported weights, encoded
videos, run records) is written beside its final name under a temporary one, flushed to disk, renamed over the
final name, and the directory entry flushed too. A reader, or a process killed mid-write, then sees the old file
or the new one, never a mix, and a machine that crashes after the rename keeps the new data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (its entries), where the platform and file system allow it."""
    path = Path(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask, read once: from /proc on Linux, else by
    setting and restoring it (the only portable way, which another thread could race with)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write (hidden, with the same suffix, so writers that
    pick a format from the extension still work). When the block ends normally the file is flushed, renamed over
    `path` and the directory flushed; when it raises, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    try:
        yield tmp
        if tmp.is_file():  # some writers (safetensors) create 0600 files: give the umask's usual mode
            with contextlib.suppress(OSError):  # a file system without modes keeps its own
                os.chmod(tmp, _file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2, **options: Any) -> None:
    """`obj` as JSON (UTF-8, non-ASCII kept, a final newline); `options` go to json.dumps (sort_keys, default)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, **options) + "\n")


def drop_torn_line(path: str | Path) -> bool:
    """Cut an append-only text file after its last newline: an interrupted append (a kill, a full disk) leaves a
    line without one, and the next append would glue a new line onto it. True when something was cut."""
    with open(path, "rb+") as f:
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole == len(data):
            return False
        f.truncate(whole)
        os.fsync(f.fileno())
    return True
