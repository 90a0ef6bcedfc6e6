"""What the two training entry points (vimpac/pretrain.py, vimpac/finetune.py) share: the launch flags they both
take (checked before any process group exists), and the errors a user can act on turned into one message and an
exit code instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from vimpac.code_db import CorruptRecordError, record_error_message
from vimpac.errors import NonFiniteLossError, StorageError, UsageError, report_storage_problem
from vimpac.optim import DECAY_GROUPS


def add_launch_arguments(run: argparse._ArgumentGroup, opt: argparse._ArgumentGroup) -> None:
    """Launch chunking, checkpoint cadence and the non-finite stop (group `run`); compilation and weight-decay
    groups (group `opt`)."""
    run.add_argument(
        "--interval",
        type=int,
        default=None,
        help="run at most this many epochs in this launch, then save and exit (resume with --resume); for job "
        "time limits",
    )
    run.add_argument(
        "--stop-epoch",
        type=int,
        default=None,
        help="end every launch at the end of this epoch (counted from 1) of the --epochs schedule, however often it "
        "is relaunched: a stage that takes the first N epochs and leaves the rest of the schedule to another "
        "(scripts/pretrain/large.sh)",
    )
    run.add_argument(
        "--save-epochs", type=int, default=1, help="checkpoint and export every N-th epoch end (and the last)"
    )
    run.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=20,
        help="stop (exit code 3, nothing saved) after this many consecutive optimizer steps with a NaN/Inf loss; "
        "checkpoints are not written while such a streak runs (0: off)",
    )
    opt.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model through the engine with this backend: inductor on a GPU, aot_eager to check "
        "tracing (default: eager)",
    )
    opt.add_argument(
        "--decay-groups",
        default="structural",
        choices=DECAY_GROUPS,
        help="parameters spared from weight decay: structural (biases, norm weights, positional tables, CLS) or "
        "original (the original release's name rule: biases and backbone LayerNorm weights only)",
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's default-showing help, but only where the help does not state its default already and the
    default says something (a None default means what the help text says it means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def check_launch_arguments(args: argparse.Namespace) -> None:
    """UsageError for values of add_launch_arguments' flags (and --epochs) that cannot work."""
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1 (the length of the schedule), got {args.epochs}")
    if args.save_epochs < 1:
        raise UsageError(f"--save-epochs must be >= 1, got {args.save_epochs}")
    if args.interval is not None and args.interval < 1:
        raise UsageError(f"--interval must be >= 1 epoch per launch, got {args.interval}")
    if args.stop_epoch is not None and not 1 <= args.stop_epoch <= args.epochs:
        raise UsageError(f"--stop-epoch must lie in 1..--epochs ({args.epochs}), got {args.stop_epoch}")
    if args.max_nonfinite_steps < 0:
        raise UsageError(f"--max-nonfinite-steps must be >= 0 (0: off), got {args.max_nonfinite_steps}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0 (0: load in the training process), got {args.num_workers}")


def run_reporting_errors(prog: str, work: Callable[[], int]) -> int:
    """work()'s exit code; 2 for bad input or a bad database record (--on-bad-record stop), 3 when training
    stopped on non-finite losses (raised on every rank at the same step; rank 0 prints), 1 for a full or
    read-only disk (errors.storage_problem)."""
    from vimpac.dist_setup import shutdown_distributed
    from vimpac.run_setup import release_run_locks

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
    except (OSError, StorageError) as err:
        return report_storage_problem(prog, err)
    finally:
        shutdown_distributed()
        release_run_locks()
