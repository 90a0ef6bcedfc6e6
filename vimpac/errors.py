"""User-facing errors: raised for bad input, printed by the CLI as one clear message (no traceback)."""


class UsageError(Exception):
    """Bad command-line input or configuration: what is wrong and how to fix it, detected before any work."""
