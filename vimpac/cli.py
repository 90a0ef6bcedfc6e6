"""The `vimpac` command: one program, one subcommand per stage of the pipeline.

Each subcommand lives in `vimpac/commands/<name>.py` with `register(subparsers)` (build its parser, set
`func`) so this file only collects them.
"""

from __future__ import annotations

import argparse
import sys

from vimpac.commands import COMMANDS
from vimpac.errors import StorageError, UsageError, report_storage_problem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vimpac",
        description=(
            "VIMPAC video pre-training. Pipeline: synth (or your videos) → train-tokenizer / convert-dalle → "
            "tokenize (code database) → db inspect → pre-training → fine-tuning → predict / embed / probe. Run "
            "`vimpac <command> --help` for each stage."
        ),
        epilog=(
            "Pre-training and fine-tuning run under the DeepSpeed launcher, not as subcommands: "
            "`deepspeed --num_gpus N vimpac/pretrain.py --deepspeed_config ds_configs/small.json --data DB ...`, "
            "then `deepspeed --num_gpus N vimpac/finetune.py --deepspeed_config ds_configs/finetune_small.json "
            "--data DB --load RUN/export ...` (`--module vimpac.pretrain` / `vimpac.finetune` from an installed "
            "package; `python vimpac/pretrain.py ...` for one process). scripts/pretrain/ and scripts/finetune/ "
            "hold the paper's recipes. Start with `vimpac demo`: it runs every stage on a synthetic corpus."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"vimpac {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where supported", file=sys.stderr)
        return 130
    except (OSError, StorageError) as err:
        return report_storage_problem(f"vimpac {args.command}", err)


if __name__ == "__main__":
    sys.exit(main())
