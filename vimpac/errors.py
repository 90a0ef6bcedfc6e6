"""User-facing errors: raised for bad input, printed by the CLI as one clear message (no traceback)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input or configuration: what is wrong and how to fix it, detected before any work."""


class StorageError(Exception):
    """Writing failed for a reason of the storage (a full disk, say) that the error itself could not name as an
    OSError: the message says what is intact and what to do. Printed as one line, exit code 1."""


class NonFiniteLossError(Exception):
    """Training stopped because the loss was NaN/Inf for --max-nonfinite-steps consecutive optimizer steps.

    Raised on every rank at the same step (the decision uses the all-reduced loss); the entry scripts print the
    message (which names the step, the streak, the last good checkpoint and the remedies) and exit with
    `exit_code`."""

    exit_code = 3


# A full disk or quota, a read-only file system, a permission refused: the environment, not a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def storage_problem(err: BaseException) -> str | None:
    """One line for an error that comes from the storage (an OSError of STORAGE_ERRNOS, itself or in its chain
    of causes), saying what to do; None for any other error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, StorageError):
            return str(seen)
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            where = f"{seen.filename}: " if seen.filename else ""
            return (
                f"{where}{seen.strerror}; free space or fix the permissions, then rerun the same command (with "
                "--resume for a training run; finished work is kept)"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def report_storage_problem(prog: str, err: BaseException) -> int:
    """Print storage_problem's line for `err` as `prog`'s error and return exit code 1; re-raise any other error."""
    problem = storage_problem(err)
    if problem is None:
        raise err
    print(f"{prog}: error: {problem}", file=sys.stderr)
    return 1


def require_file_path(path: str | Path | None, flag: str) -> None:
    """UsageError when the output file `path` (given as `flag`) cannot be written as a file: it is a directory, or a
    folder above it is a file. Checked before the work, not after it."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; name the file to write, e.g. {path / 'results.json'}")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{flag} {path}: {above} is a file, not a folder")


def require_directory(path: str | Path, flag: str) -> None:
    """UsageError when the output directory `path` (given as `flag`) exists as something else, e.g. a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)")
