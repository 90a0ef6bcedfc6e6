"""VIMPAC pre-training: masked token prediction + contrastive learning over a code database, on DeepSpeed.

    deepspeed --num_gpus 8 vimpac/pretrain.py --deepspeed_config ds_configs/large.json --data DB ...
    python vimpac/pretrain.py --deepspeed_config ds_configs/cpu.json --data DB ...      (one process)
    deepspeed --num_gpus 8 --module vimpac.pretrain ...       (the installed package; python -m: one process)

The json holds the engine settings, the command line the experiment; the command line wins where both name a
value (vimpac.ds_config) and the merged result is written to <output>/run_config.json. This file only parses,
builds and runs; the loop is vimpac.trainer, checkpoints vimpac.checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts vimpac/ itself first on sys.path, where e.g. `config.py` could shadow another top-level
# module of that name for every library imported after it (docs/design.md §2). The package is imported by name.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from vimpac.config import add_model_arguments
from vimpac.entry import HelpFormatter, add_launch_arguments, run_reporting_errors
from vimpac.knn import add_knn_arguments
from vimpac.optim import SCHEDULES

DEBUG_STEPS = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vimpac/pretrain.py",
        description="Pre-train VIMPAC (block-masked token prediction + InfoNCE between two clips of a video) on a "
        "code database made by `vimpac tokenize`. Run it under the DeepSpeed launcher (deepspeed --num_gpus N ...) "
        "or as one plain process.",
        formatter_class=HelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=None,
        help="engine json, e.g. ds_configs/cpu.json (default: fp32, ZeRO 0)",
    )
    run.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's conventions; no effect")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument(
        "--output", default="runs/pretrain", help="run directory: tensorboard/, metrics.jsonl, checkpoints/, export/"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from <output>/checkpoints/latest (start fresh if there is none); with another --clip-len or "
        "--frame-size than the checkpoint, its positional tables and their Adam moments are interpolated and the "
        "run goes on at the next epoch boundary with the same LR schedule (stage-2 pre-training)",
    )
    run.add_argument(
        "--resume-from",
        default=None,
        metavar="RUN_DIR",
        help="when --output holds no checkpoint yet, continue from the newest checkpoint of another run directory "
        "instead, as --resume would (weights, optimizer, LR-schedule position, loss scale; another --clip-len or "
        "--frame-size interpolated): stage 2 of a two-stage pre-training, in its own --output. RUN_DIR is only "
        "read; once --output has checkpoints, --resume continues those and RUN_DIR is not needed",
    )
    run.add_argument(
        "--load",
        default=None,
        metavar="EXPORT",
        help="start from exported weights (config.json + model.safetensors, or a run directory with export/) with "
        "a fresh optimizer and schedule, as the original's --load; the model flags must match the export's but "
        "for --clip-len / --frame-size (positional tables interpolated); a checkpoint continued by --resume or "
        "--resume-from replaces these weights",
    )
    run.add_argument("--epochs", type=int, default=40, help="total epochs of the schedule")
    run.add_argument(
        "--save-steps", type=int, default=0, help="also checkpoint every N optimizer steps (0: only at epoch ends)"
    )
    run.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    run.add_argument("--seed", type=int, default=9595, help="data order, masks, init; dropout uses seed + rank")
    run.add_argument("--debug", action="store_true", help=f"run only {DEBUG_STEPS} steps per epoch")
    run.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on optimizer steps per epoch")
    run.add_argument("--tqdm", action="store_true", help="progress bars")
    run.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s per device for the MFU (default: known GPUs; none on CPU)",
    )
    run.add_argument(
        "--dist-backend", default=None, help="torch.distributed backend (default: the accelerator's; gloo on CPU)"
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="code database directory (vimpac tokenize)")
    data.add_argument("--split", default="train", help="split of the database to train on")
    data.add_argument(
        "--dataset-name", default=None, help="expected dataset of the database (checked against its manifest)"
    )
    data.add_argument(
        "--frame-rate", type=float, default=None, help="clip fps; must divide the database's fps (default: its fps)"
    )
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    data.add_argument(
        "--on-bad-record",
        default="stop",
        choices=("stop", "skip"),
        help="a missing or undecodable record: stop with an error naming database, view and video, or skip it "
        "(another video stands in; one warning per record, counted as data/bad_records)",
    )
    data.add_argument(
        "--nce-relevance-range",
        type=int,
        default=None,
        help="max start distance of the two clips, database frames (default: whole video)",
    )

    add_model_arguments(parser, data_default="from the --data database")

    obj = parser.add_argument_group("objectives")
    obj.add_argument("--mlm-weight", type=float, default=1.0, help="weight of the masked-token loss (0: no MLM head)")
    obj.add_argument(
        "--nce-weight", type=float, default=1.0, help="weight α of the contrastive loss (0: no projection head)"
    )
    obj.add_argument(
        "--temperature", type=float, default=0.2, help="InfoNCE temperature γ (the loss is also scaled by it)"
    )
    obj.add_argument(
        "--mask-blocks",
        type=int,
        default=5,
        help="k > 0: k random 3-D blocks (5 at 16x16 codes, 6 at 32x32); -k: i.i.d. k/1000",
    )
    obj.add_argument("--mask-rand-replace", action="store_true", help="BERT-style 80/10/10 per block")

    opt = parser.add_argument_group(
        "optimisation (None: from the json, else lr 1e-4, betas 0.9/0.98, weight decay 0.05, batch 64)"
    )
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    opt.add_argument("--beta1", type=float, default=None, help="AdamW β1 (default 0.9)")
    opt.add_argument("--beta2", type=float, default=None, help="AdamW β2 (default 0.98)")
    opt.add_argument("--epsilon", type=float, default=None, help="AdamW eps (default 1e-8)")
    opt.add_argument("--weight-decay", type=float, default=None, help="decoupled weight decay (default 0.05)")
    opt.add_argument(
        "--clip-grad-norm", type=float, default=None, help="global gradient-norm clip, 0 off (default 1.0)"
    )
    opt.add_argument("--lr-scheduler", default="linear", choices=SCHEDULES, help="decay after warm-up")
    opt.add_argument(
        "--warm-up", type=float, default=0.05, help="warm-up: a ratio of all steps if < 1, else a step count"
    )
    opt.add_argument("--bs-per-gpu", type=int, default=None, help="videos per rank per micro-step (2 clips each)")
    opt.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="videos per optimizer step over all ranks (default 64); accumulation is derived",
    )
    opt.add_argument(
        "--precision", default=None, choices=("fp32", "bf16", "fp16"), help="override the json's precision"
    )
    opt.add_argument(
        "--zero-stage", type=int, default=None, choices=(0, 1, 2, 3), help="override the json's ZeRO stage"
    )
    opt.add_argument(
        "--grad-checkpoint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing per layer (default: the json's)",
    )
    add_launch_arguments(run, opt)
    add_knn_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors("vimpac/pretrain.py", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from vimpac.dist_setup import prepare_environment

    prepare_environment()  # before deepspeed is imported: it picks the accelerator at import time
    from vimpac.pretrain_setup import build_and_train

    return build_and_train(args, debug_steps=DEBUG_STEPS)


if __name__ == "__main__":
    sys.exit(main())
