"""`vimpac synth`: write a synthetic video corpus (SSV2-format labeled part + HowTo100M-format long videos)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vimpac.errors import UsageError, require_directory

EPILOG = """\
what it writes (OUT = --out):
  OUT/something-something-v2-labels.json        {"Moving something from left to right": "0", ...}
  OUT/something-something-v2-train.json         [{"id": "17", "label": "moving a red triangle from left to
  OUT/something-something-v2-validation.json       right", "template": "Moving [something] from left to right",
                                                  "placeholders": ["a red triangle"]}, ...]
  OUT/videos/<id>.mp4                           the labeled clips (2–4 s)
  OUT/unlabeled/HowTo100M_v1.csv                video_id,category_1,category_2,rank,task_id
  OUT/unlabeled/videos/<video_id>.mp4           the long videos (≥ 30 s), one scene each
  OUT/synth.json, OUT/README.txt                what was generated and the commands to tokenize it

The 16 classes come in groups (translate, rotate, scale, visibility, contact, order, onset) whose members show
the same distribution of single frames: "from right to left" is "from left to right" played backwards, "passing
through" a wall is "bouncing off" it with the part after contact mirrored, and so on. Only motion tells them
apart, as in Something-Something. `--classes` picks a subset (keys: right left down up clockwise
counterclockwise grow shrink appear disappear bounce through left_first right_first start stop).

The same --seed gives the same frames for any --workers; a subset of classes gives the same clips for those
classes as the full set. (Encoded bytes may differ between runs: encoders are not bit-reproducible.)

examples:
  vimpac synth --out data/synth                       # defaults: about half a minute on 2 cores
  vimpac synth --out data/tiny --size 64x80 --train-per-class 2 --val-per-class 1 --unlabeled 1 \\
      --unlabeled-seconds 5
  vimpac synth --out data/synth_webm --ext webm       # VP9 in .webm, like the official SSV2 files
"""


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH, e.g. 160x192") from None
    return height, width


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic video corpus (SSV2 format + long HowTo100M-format videos), no download needed",
        description="Render synthetic videos in groups of classes that no single frame tells apart (direction of "
        "motion, rotation sense, growing/shrinking, appearing/disappearing, bouncing/passing through, order of "
        "two events, starting/stopping) and long unlabeled videos that keep one scene, and write them as real "
        "video files with official-format annotations, ready for `vimpac tokenize`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an earlier synth output)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same frames (0)")
    p.add_argument("--classes", help="comma-separated class keys to generate (default: all 16)")
    p.add_argument("--train-per-class", type=int, default=8, help="training clips per class (8)")
    p.add_argument("--val-per-class", type=int, default=2, help="validation clips per class (2)")
    p.add_argument(
        "--clip-seconds",
        type=float,
        nargs=2,
        default=(2.0, 4.0),
        metavar=("MIN", "MAX"),
        help="labeled clip length range in seconds (2 4)",
    )
    p.add_argument(
        "--calm",
        action="store_true",
        help="labeled clips with a still background and no distractors: motion is the only change (easier)",
    )
    p.add_argument(
        "--object-scale",
        type=float,
        default=1.0,
        help="multiply every object's size (1.0; at most 2, or 1.25 with the bounce/through classes). Bigger "
        "objects survive a small tokenizer: the demo uses 1.5",
    )
    p.add_argument(
        "--smooth-background",
        action="store_true",
        help="soft, low-contrast backgrounds instead of busy textures, so a small tokenizer spends its codes on "
        "the objects (the demo's choice)",
    )
    p.add_argument(
        "--looks",
        type=int,
        help="labeled clips share this many looks (background + the moving object's shape and colour), drawn "
        "independently of the class; by default every clip has its own. With few looks a video is told apart from "
        "others by its motion rather than its appearance (the demo uses 4)",
    )
    p.add_argument("--unlabeled", type=int, default=3, help="number of long unlabeled videos (3)")
    p.add_argument("--unlabeled-seconds", type=float, default=30.0, help="length of each long video (30 s)")
    p.add_argument("--fps", type=int, default=12, help="frame rate of the written videos (12)")
    p.add_argument(
        "--size",
        type=_size,
        default=(160, 192),
        metavar="HxW",
        help="frame size, even numbers (160x192: the shorter side covers the 128 and 160 views)",
    )
    p.add_argument(
        "--ext",
        "--container",
        dest="ext",
        default="mp4",
        help="container by extension: mp4 (libx264), webm (libvpx-vp9), mkv, mov, avi (mpeg4) (mp4)",
    )
    p.add_argument("--codec", help="FFmpeg encoder name, overriding the container's default (e.g. libx264)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: one per CPU core)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.tokenization.synth import SynthConfig, generate

    require_directory(args.out, "--out")
    classes = None
    if args.classes is not None:
        classes = tuple(key.strip() for key in args.classes.split(",") if key.strip())
        if not classes:
            raise UsageError("--classes is empty; give comma-separated keys (see --help)")
    cfg = SynthConfig(
        out=args.out,
        seed=args.seed,
        classes=classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        calm=args.calm,
        object_scale=args.object_scale,
        smooth_background=args.smooth_background,
        looks=args.looks,
        unlabeled=args.unlabeled,
        unlabeled_seconds=args.unlabeled_seconds,
        clip_seconds=tuple(args.clip_seconds),
        fps=args.fps,
        size=args.size,
        ext=args.ext.lstrip(".").lower(),
        codec=args.codec,
        workers=args.workers,
    )
    manifest = generate(cfg, progress=not args.no_progress)
    lab, unl = manifest["labeled"], manifest["unlabeled"]
    print(
        f"wrote {lab['counts']['train']} train + {lab['counts']['validation']} validation clips of "
        f"{len(lab['classes'])} classes and {unl['count']} unlabeled videos of {unl['seconds']:g} s "
        f"({manifest['frames_written']} frames, {manifest['codec']} .{manifest['ext']}) to {args.out} "
        f"in {manifest['elapsed_s']:.1f} s"
    )
    print(f"description: {args.out / 'README.txt'}")
    print("next (TOKENIZER: a directory from `vimpac train-tokenizer` or `vimpac convert-dalle`):")
    if lab["counts"]["train"] + lab["counts"]["validation"]:
        print(f"  {manifest['commands']['labeled']}")
    if unl["count"]:
        print(f"  {manifest['commands']['unlabeled']}")
    return 0
