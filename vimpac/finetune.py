"""VIMPAC fine-tuning: a classifier on the backbone's CLS output over a labeled code database, on DeepSpeed.

    deepspeed --num_gpus 8 vimpac/finetune.py --deepspeed_config ds_configs/finetune_small.json --data DB \\
        --dataset-name ucf101 --split-id 1 --load runs/pretrain/small/export ...
    python vimpac/finetune.py --deepspeed_config ds_configs/cpu.json --data DB ...      (one process)
    deepspeed --num_gpus 8 --module vimpac.finetune ...       (the installed package; python -m: one process)

Without --load the model is trained from scratch (the paper's baseline). The json holds the engine settings, the
command line the experiment (the command line wins; the merged result is <output>/run_config.json). This file
only parses; the work is vimpac.finetune_setup, the data vimpac.finetune_data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, Python puts vimpac/ itself first on sys.path (see vimpac/pretrain.py).
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from vimpac.config import VimpacConfig, add_model_arguments
from vimpac.ds_config import OPTIMIZERS
from vimpac.entry import HelpFormatter, add_launch_arguments, check_launch_arguments, run_reporting_errors
from vimpac.errors import UsageError
from vimpac.optim import SCHEDULES

DEBUG_STEPS = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vimpac/finetune.py",
        description="Fine-tune VIMPAC (CLS → dropout → zero-initialised linear classifier, cross-entropy) on a "
        "labeled code database, from exported pre-training weights (--load) or from scratch; evaluate with K "
        "temporal clips × the test views, probabilities averaged.",
        formatter_class=HelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="engine json (default: fp32)")
    run.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's conventions; no effect")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--output", default="runs/finetune", help="run directory: eval/, tensorboard/, checkpoints/")
    run.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/latest")
    run.add_argument("--epochs", type=int, default=50, help="training epochs")
    run.add_argument("--keep-checkpoints", type=int, default=1, help="newest checkpoints kept")
    run.add_argument("--seed", type=int, default=9595, help="data order, views, clips, init; dropout seed + rank")
    run.add_argument("--debug", action="store_true", help=f"run only {DEBUG_STEPS} steps per epoch")
    run.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on optimizer steps per epoch")
    run.add_argument("--tqdm", action="store_true", help="progress bars")
    run.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: the accelerator's)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="labeled code database with the training views")
    data.add_argument("--eval-data", default=None, help="code database with the test views (default: --data)")
    data.add_argument(
        "--dataset-name",
        default=None,
        help="ssv2, diving48, ucf101, hmdb51, kinetics or any labeled database's name (the original release's "
        "kinetics400 and sthv2 are taken too); checked against the manifests (default: --data's)",
    )
    data.add_argument("--split-id", type=int, default=None, help="UCF101/HMDB51 split 1-3 (train_k/test_k)")
    data.add_argument("--train-split", default=None, help="override the training split name")
    data.add_argument("--eval-split", default=None, help="override the evaluation split name")
    data.add_argument("--train-views", default=None, help="comma list of training views (default: all; SSV2 no flip)")
    data.add_argument(
        "--test-views", default=None, help="test views (default: r<S>_{top,center,bottom}_f0, SSV2 centre)"
    )
    data.add_argument(
        "--labels-per-class",
        type=int,
        default=None,
        metavar="N",
        help="low-label regime: train on only N labeled videos of each class of the training split (a class with "
        "fewer gives all it has, with a warning); the same videos on every rank, whatever the worker count or the "
        "database order; the evaluation split is untouched and never drawn from. A subset smaller than one global "
        "batch is passed over several times per epoch so that every epoch takes an optimizer step. Recorded in "
        "<output>/run_config.json (label_subset). Unset: every video of the split",
    )
    data.add_argument(
        "--labels-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="seed of the --labels-per-class choice; unset: --seed. Fix --seed and vary this to average over "
        "label subsets, or the reverse to vary only the training",
    )
    data.add_argument("--frame-rate", type=float, default=None, help="clip fps, must divide the database's")
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    data.add_argument(
        "--on-bad-record",
        default="stop",
        choices=("stop", "skip"),
        help="a missing or undecodable record: stop with an error naming database, view and video, or skip it "
        "(another video stands in; one warning per record, counted as data/bad_records; bad test videos are left "
        "out of the evaluation)",
    )

    model = parser.add_argument_group("weights")
    model.add_argument("--load", default=None, help="exported weights (config.json + model.safetensors, or a run dir)")
    model.add_argument(
        "--different-shape",
        action="store_true",
        help="allow --clip-len / --frame-size to differ from the checkpoint's: positional tables are interpolated",
    )
    add_model_arguments(
        parser,
        data_default="the export's with --load, else from the --data database",
        clip_len_default=f"the export's with --load, else {VimpacConfig().clip_len}",
        architecture_default="the export's with --load",
    )
    # The input shape comes from the checkpoint unless named (None); without --load: 5 frames at --data's frame size.
    model.add_argument("--last-dropout", type=float, default=0.0, help="dropout before the classifier")
    model.add_argument("--label-smoothing", type=float, default=0.0, help="ε: (1 − ε)·NLL + ε·mean(−log p)")

    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--num-test-clips", type=int, default=1, help="K clips per video in evaluations during training")
    ev.add_argument(
        "--last-test-clips",
        default=None,
        help="comma list of K evaluated after the last epoch besides --num-test-clips, e.g. 2,5,10",
    )
    ev.add_argument(
        "--single-clip",
        default="start",
        choices=("start", "centre"),
        help="where the one clip of K = 1 lies: at the video's start (the original release's evaluation) or its "
        "centre (what vimpac used before this option); K > 1 always spreads the clips from start to end. Recorded "
        "in every <output>/eval/*.json and in run_config.json",
    )
    ev.add_argument("--eval-per-epochs", type=int, default=5, help="evaluate every N epochs (and after the last)")
    ev.add_argument("--eval-only", action="store_true", help="evaluate --load (a fine-tuned export) and exit")
    ev.add_argument("--eval-batch-size", type=int, default=None, help="clips per forward pass (default 4 × micro)")

    opt = parser.add_argument_group("optimisation (None: from the json, else the paper's fine-tuning values)")
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    opt.add_argument("--beta1", type=float, default=None, help="AdamW β1 (default 0.9)")
    opt.add_argument("--beta2", type=float, default=None, help="AdamW β2 (default 0.999)")
    opt.add_argument("--epsilon", type=float, default=None, help="AdamW eps (default 1e-8)")
    opt.add_argument("--weight-decay", type=float, default=None, help="decoupled weight decay (default 0.01)")
    opt.add_argument("--clip-grad-norm", type=float, default=None, help="gradient-norm clip, 0 off (default 1.0)")
    opt.add_argument(
        "--optim",
        default="adamw",
        choices=OPTIMIZERS,
        help="adamw (decoupled decay), or the original release's alternatives: adam (torch.optim.Adam, decay as an "
        "L2 term) or sgd (momentum --beta1, L2 decay; --beta2 and --epsilon unused)",
    )
    opt.add_argument("--lr-scheduler", default="linear", choices=SCHEDULES, help="decay after warm-up")
    opt.add_argument("--warm-up", type=float, default=0.1, help="ratio of all steps if < 1, else a step count")
    opt.add_argument("--bs-per-gpu", type=int, default=None, help="videos per rank per micro-step")
    opt.add_argument("--batch-size", type=int, default=None, help="videos per optimizer step (default 128)")
    opt.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="override the json's")
    opt.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3), help="override the json's")
    opt.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None, help="per layer")
    add_launch_arguments(run, opt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors("vimpac/finetune.py", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    check_launch_arguments(args)
    if min(args.eval_per_epochs, args.num_test_clips, args.epochs) < 1:
        raise UsageError("--epochs, --eval-per-epochs and --num-test-clips must be >= 1")
    if not 0 <= args.last_dropout < 1:
        raise UsageError(f"--last-dropout must be in [0, 1); got {args.last_dropout}")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1); got {args.label_smoothing}")
    if args.labels_per_class is not None and args.labels_per_class < 1:
        raise UsageError(f"--labels-per-class must be >= 1 (videos per class); got {args.labels_per_class}")
    if args.labels_seed is not None and args.labels_per_class is None:
        raise UsageError("--labels-seed chooses the --labels-per-class subset; pass --labels-per-class N too")
    if args.labels_seed is not None and args.labels_seed < 0:
        raise UsageError(f"--labels-seed must be >= 0; got {args.labels_seed}")
    from vimpac.dist_setup import prepare_environment

    prepare_environment()  # before deepspeed is imported
    from vimpac.finetune_setup import build_and_finetune

    return build_and_finetune(args, debug_steps=DEBUG_STEPS)


if __name__ == "__main__":
    sys.exit(main())
