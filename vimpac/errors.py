"""User-facing errors: raised for bad input, printed by the CLI as one clear message (no traceback)."""

from __future__ import annotations

from pathlib import Path


class UsageError(Exception):
    """Bad command-line input or configuration: what is wrong and how to fix it, detected before any work."""


class NonFiniteLossError(Exception):
    """Training stopped because the loss was NaN/Inf for --max-nonfinite-steps consecutive optimizer steps.

    Raised on every rank at the same step (the decision uses the all-reduced loss); the entry scripts print the
    message (which names the step, the streak, the last good checkpoint and the remedies) and exit with
    `exit_code`."""

    exit_code = 3


def require_directory(path: str | Path, flag: str) -> None:
    """UsageError when the output directory `path` (given as `flag`) exists as something else, e.g. a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)")
