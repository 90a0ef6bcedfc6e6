"""`vimpac visualize`: pictures of one masked clip (reconstruction, what the model sees, what it predicts) and the
training curves of a run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Decode one clip of a code database with its tokenizer, mask it as pre-training does, let the pre-trained model
fill the masked tokens in, and draw three rows with one column per frame: the reconstruction (what the tokenizer
keeps), the masked input (grey cells) and the prediction (masked region outlined in magenta). Also plots the
training curves of the run's pre-training and fine-tuning runs.

Paths default to the layout of a demo run directory RUN:
  RUN/tokenizer               tokenizer directory (--tokenizer)
  RUN/codes/labeled_test      code database (--db); others: RUN/codes/labeled_train, RUN/codes/unlabeled
  RUN/pretrain                pre-training run: export/ weights, run_config.json, metrics.jsonl (--model)
  RUN/finetune_pretrained     fine-tuning runs whose metrics.jsonl go into the curves
  RUN/finetune_scratch
  RUN/pictures                output (--out)
"""

EPILOG = """\
examples:
  # after `vimpac demo`: the first test video, its pictures in runs/demo/pictures
  vimpac visualize --run runs/demo

  # list the videos of a database split, then draw one of them from another clip start, 8 blocks masked
  vimpac visualize --run runs/demo --db runs/demo/codes/labeled_train --split train --list
  vimpac visualize --run runs/demo --db runs/demo/codes/labeled_train --video VIDEO_ID --start 0 --mask-blocks 8

  # any run: every path given explicitly
  vimpac visualize --tokenizer tok --db codes/ucf101 --model out/pretrain/export \\
      --video ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01 --out pictures --no-curves

Writes <out>/<video>.png (grid: one row per picture, one column per frame), <out>/<video>.gif (the three pictures
side by side, one GIF frame per clip frame) and <out>/curves.png, and prints the masked-token accuracy of the
clip. Masking is drawn with --seed, so a rerun gives the same picture.
"""

CURVE_RUNS = ("pretrain", "finetune_pretrained", "finetune_scratch")
DEFAULT_MASK_BLOCKS = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="pictures of a masked clip and the model's predictions, and training curves",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    p.add_argument("--video", default=None, help="video id (default: the first of the split; --list shows them)")
    p.add_argument("--list", action="store_true", help="print the video ids of the split and exit")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default RUN/tokenizer)")
    p.add_argument("--db", type=Path, default=None, help="code database (default RUN/codes/labeled_test)")
    p.add_argument(
        "--model", type=Path, default=None, help="pre-training export/ folder or run directory (default RUN/pretrain)"
    )
    p.add_argument("--split", default=None, help="database split to pick videos from (default: every video)")
    p.add_argument("--view", default=None, help="database view (default: its centre view, else its first)")
    p.add_argument(
        "--start", type=int, default=None, help="first database frame of the clip (default: the centred clip)"
    )
    p.add_argument(
        "--frame-rate",
        type=float,
        default=None,
        help="clip fps (default: the pre-training run's --frame-rate, else the database's fps)",
    )
    p.add_argument(
        "--mask-blocks",
        type=int,
        default=None,
        help=f"blocks to mask (default: the pre-training run's, else {DEFAULT_MASK_BLOCKS}; negative = i.i.d.)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the masking (default 0)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/pictures)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second of the GIF (default 2)")
    p.add_argument("--no-curves", action="store_true", help="skip curves.png")
    p.add_argument("--device", default="cpu", help="where the model and the decoder run: cpu or cuda (default cpu)")
    p.set_defaults(func=run)


def load_masked_token_model(path: Path, device: str):
    """(the pre-trained model, its config, its export folder) from an export folder or run directory; it must
    have the masked-token head (a fine-tuned model cannot predict tokens)."""
    from vimpac.checkpoint import export_folder
    from vimpac.errors import UsageError
    from vimpac.pretrain_eval import load_pretrained

    folder = export_folder(path, "--model", "pre-train first, or point --model at a pre-training run's export/ folder")
    model = load_pretrained(folder, device)
    if model.mlm_head is None:
        raise UsageError(f"--model {folder} has no masked-token head; point --model at a pre-training run")
    return model, model.config, folder


def check_vocabularies(db, tokenizer, config, args: argparse.Namespace) -> None:
    """Refuse a database, tokenizer and model that do not share one vocabulary (and the model's grid)."""
    from vimpac.errors import UsageError

    sizes = {
        f"code database {args.db}": int(db.manifest["tokenizer"]["vocab_size"]),
        f"tokenizer {args.tokenizer}": int(tokenizer.vocab_size),
        f"model {args.model}": int(config.vocab_size),
    }
    if len(set(sizes.values())) > 1:
        raise UsageError(
            "vocabulary sizes differ: "
            + ", ".join(f"{name} has {size} codes" for name, size in sizes.items())
            + "; use the tokenizer that made the database and a model pre-trained on its codes"
        )
    grid = tuple(int(g) for g in db.manifest["grid"])
    if grid != tuple(config.grid):
        raise UsageError(
            f"{args.db} holds {grid[0]}x{grid[1]} codes per frame but the model {args.model} expects "
            f"{config.grid[0]}x{config.grid[1]}; use a database tokenized at the model's frame size"
        )
    made_by = db.manifest["tokenizer"].get("fingerprint")
    if made_by and made_by != tokenizer.fingerprint:
        print(
            f"warning: {args.db} was made by tokenizer {made_by}, not {tokenizer.fingerprint} ({args.tokenizer}); "
            "the pictures decode its codes with another decoder",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from vimpac.checkpoint import check_same_tokenizer
    from vimpac.clip_windows import clip_slack, evaluation_starts, frame_stride, take_clip
    from vimpac.code_db import CodeDatabase
    from vimpac.devices import resolve_device
    from vimpac.errors import UsageError
    from vimpac.masking import IGNORE_INDEX, check_mask_config, mask_blocks
    from vimpac.pretrain_eval import recorded_arguments
    from vimpac.tokenization.tokenizer import load_tokenizer
    from vimpac.tokenization.views import centre_view
    from vimpac.visualize import clip_rows, plot_curves, predict_masked, write_gif, write_grid_png

    if not args.fps > 0:
        raise UsageError(f"--fps must be positive (frames per second of the GIF), got {args.fps}")
    args.db = args.db or args.run / "codes" / "labeled_test"
    args.tokenizer = args.tokenizer or args.run / "tokenizer"
    args.model = args.model or args.run / "pretrain"
    out = args.out or args.run / "pictures"
    if not args.db.is_dir():
        raise UsageError(f"code database {args.db} does not exist; make it with `vimpac tokenize` or `vimpac demo`")
    db = CodeDatabase(args.db)
    ids = db.ids(args.split)
    if args.list:
        print("\n".join(ids))
        return 0
    where = f"split {args.split!r} of {args.db}" if args.split else str(args.db)
    if not ids:
        raise UsageError(f"{where} holds no videos")
    video = args.video if args.video is not None else ids[0]
    if video not in set(ids):
        raise UsageError(
            f"video {video!r} is not in {where}; valid ids include {', '.join(ids[:5])} ({len(ids)} videos, --list "
            "prints them all)"
        )
    view = args.view if args.view is not None else centre_view(db.views) or db.views[0]
    if view not in db.views:
        raise UsageError(f"view {view!r} is not in {args.db}; its views: {', '.join(db.views)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    resolve_device(args.device)

    tokenizer = load_tokenizer(args.tokenizer, args.device)
    model, config, export = load_masked_token_model(args.model, args.device)
    check_vocabularies(db, tokenizer, config, args)
    check_same_tokenizer(export, db.manifest, args.db)
    recorded, _ = recorded_arguments(export)
    frame_rate = args.frame_rate if args.frame_rate is not None else recorded.get("frame_rate")
    num_blocks = args.mask_blocks if args.mask_blocks is not None else recorded.get("mask_blocks", DEFAULT_MASK_BLOCKS)
    check_mask_config(int(num_blocks))
    stride = frame_stride(float(db.manifest["fps"]), frame_rate)

    codes, label = db.read(video, view)
    frames = codes.shape[0]
    delta = clip_slack(frames, config.clip_len, stride)
    start = args.start if args.start is not None else evaluation_starts(delta, 1)[0]
    if not 0 <= start < frames:
        raise UsageError(f"--start {start} is outside video {video!r} (frames 0..{frames - 1}; full clips: 0..{delta})")
    tokens = take_clip(codes, start, config.clip_len, stride, config.pad_id)
    inputs, labels = mask_blocks(
        tokens, int(num_blocks), np.random.default_rng(args.seed), config.pad_id, config.mask_id, config.vocab_size
    )
    masked = labels != IGNORE_INDEX
    predicted = predict_masked(model, inputs, labels, config.vocab_size)
    rows = clip_rows(tokenizer, tokens, masked, predicted)

    name = video.replace("/", "_")
    for path in (write_grid_png(rows, out / f"{name}.png"), write_gif(rows, out / f"{name}.gif", args.fps)):
        print(path)
    if not args.no_curves:
        runs = {run_name: args.run / run_name for run_name in CURVE_RUNS if (args.run / run_name).is_dir()}
        if runs:
            plot_curves(runs, out / "curves.png")
            print(out / "curves.png")
        else:
            print(f"no training runs ({', '.join(CURVE_RUNS)}) under {args.run}: curves skipped", file=sys.stderr)

    total = int(masked.sum())
    correct = int((predicted[masked] == tokens[masked]).sum())
    classes = db.manifest.get("classes") or []
    label_text = "unlabeled" if label < 0 else classes[label] if label < len(classes) else f"class {label}"
    print(
        f"video {video} ({label_text}), view {view}, frames {start}..{start + (config.clip_len - 1) * stride} every "
        f"{stride}: {total} of {masked.size} tokens masked ({num_blocks} blocks, seed {args.seed})"
    )
    if total:
        print(f"masked-token accuracy on this clip: {correct}/{total} = {correct / total:.1%}")
    return 0
