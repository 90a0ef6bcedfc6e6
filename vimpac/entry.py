"""What the two training entry points (vimpac/pretrain.py, vimpac/finetune.py) share around their work: the errors a
user can act on become one message and an exit code instead of a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from vimpac.code_db import CorruptRecordError, record_error_message
from vimpac.errors import NonFiniteLossError, UsageError


def run_reporting_errors(prog: str, work: Callable[[], int]) -> int:
    """work()'s exit code; 2 for bad input or a bad database record (--on-bad-record stop), 3 when training
    stopped on non-finite losses (raised on every rank at the same step; rank 0 prints)."""
    try:
        return work()
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except CorruptRecordError as err:
        print(f"{prog}: error: {record_error_message(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: stopped: {err}", file=sys.stderr)
        return err.exit_code
