"""User-facing errors: raised for bad input, printed by the CLI as one clear message (no traceback)."""


class UsageError(Exception):
    """Bad command-line input or configuration: what is wrong and how to fix it, detected before any work."""


class NonFiniteLossError(Exception):
    """Training stopped because the loss was NaN/Inf for --max-nonfinite-steps consecutive optimizer steps.

    Raised on every rank at the same step (the decision uses the all-reduced loss); the entry scripts print the
    message (which names the step, the streak, the last good checkpoint and the remedies) and exit with
    `exit_code`."""

    exit_code = 3
