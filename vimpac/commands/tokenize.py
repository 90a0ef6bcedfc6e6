"""`vimpac tokenize`: video files + official annotation files → a code database (LMDB per view)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vimpac.tokenization.annotations import FORMATS

# tokenization.decode.FRAME_SELECTIONS, spelled out so that building the parser does not import PyAV.
FRAME_SELECTIONS = ("vimpac", "ffmpeg")

EPILOG = """\
examples:
  # the synthetic corpus of `vimpac synth --out data/synth` (SSV2 layout), centre view at 2 fps, 128 px
  vimpac tokenize --videos data/synth/videos --format ssv2 \\
      --annotations data/synth/something-something-v2-{labels,train,validation}.json \\
      --tokenizer runs/tok --out data/codes/synth_f128_fps2 --fps 2 --frame-size 128

  # UCF101 at 16 fps with the 12 training views (flip × resize 128/160 × 3 crops)
  vimpac tokenize --videos UCF-101 --format ucf101 --annotations ucfTrainTestlist/*.txt \\
      --tokenizer dalle_tok --out codes/ucf101_f128_fps16 --fps 16 --frame-size 128 --views train --device cuda

views: center = 1 (resize S, centre crop); test = 3 (resize S; top-left, centre, bottom-right);
       train = 12 (resize S and 1.25·S × 3 crops × flip), 6 for ssv2 (no flip: left/right is in its labels).

frame selection: vimpac (default) = target k at t0 + k/fps shows the source frame on screen then (30 fps at 2 fps:
       frames 0, 15, 30, ...), area resize; ffmpeg = as the original release's ffmpeg fps and scale filters (the
       source frame nearest each tick: 7, 22, 37, ...; bicubic resize), for databases that sit next to ones made
       by `vimpac db import-original`. The database records the choice.

The run is resumable: if it is killed, run the same command again and it finishes the job. Videos that cannot
be read are listed with the reason in OUT/failures.jsonl; the exit code is non-zero only when nothing could be
tokenized, or with --strict when anything failed. Inspect the result with `vimpac db inspect OUT`.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="turn videos into a code database (LMDB per view) with a tokenizer",
        description="Decode videos with PyAV, resample to --fps, cut the spatial views, encode every frame to a "
        "grid of VQ codes and store them in a code database (one LMDB per view).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--videos", type=Path, required=True, help="root folder of the video files")
    p.add_argument(
        "--annotations", type=Path, nargs="+", required=True, help="the dataset's official annotation file(s)"
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="annotation format (see README: datasets)")
    p.add_argument(
        "--classes",
        type=Path,
        default=None,
        metavar="FILE",
        help="the class list, one name per line in label order, instead of the one the annotation files give: the "
        "same FILE for every shard of a dataset tokenized in parts makes their databases mergeable (Kinetics, "
        "HMDB51 and list files name only their own videos' classes); a video of a class not in FILE is a failure",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer directory (from `vimpac train-tokenizer` or `vimpac convert-dalle`)",
    )
    p.add_argument("--out", type=Path, required=True, help="database directory to create (or resume)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second to sample (default 2, as pre-training)")
    p.add_argument("--frame-size", type=int, default=128, help="square frame side S in pixels, multiple of 8 (128)")
    p.add_argument(
        "--views", choices=("center", "test", "train"), default="center", help="which spatial views (default center)"
    )
    p.add_argument(
        "--frame-selection",
        choices=FRAME_SELECTIONS,
        default="vimpac",
        help="how frames are picked at --fps and resized: vimpac (default) or ffmpeg, as the original release",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: one per CPU core)"
    )
    p.add_argument("--device", default="cpu", help="where the encoder runs: cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--fp16", action="store_true", help="encode under fp16 autocast on CUDA (the paper's setting; ~2x faster)"
    )
    p.add_argument("--encode-batch", type=int, default=64, help="frames per encoder batch (default 64)")
    p.add_argument("--commit-every", type=int, default=32, help="videos per database commit (default 32)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any video failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.tokenization.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        videos=args.videos,
        annotations=list(args.annotations),
        format=args.format,
        tokenizer=args.tokenizer,
        out=args.out,
        fps=args.fps,
        frame_size=args.frame_size,
        views=args.views,
        frame_selection=args.frame_selection,
        workers=args.workers,
        device=args.device,
        encode_batch=args.encode_batch,
        fp16=args.fp16,
        commit_every=args.commit_every,
        strict=args.strict,
        progress=not args.no_progress,
        classes=args.classes,
    )
    summary = extract(cfg)
    print(
        f"tokenized {summary.tokenized} videos ({summary.frames} frames, {summary.videos_per_s:.2f} videos/s, "
        f"{summary.frames_per_s:.0f} frames/s) in {summary.seconds:.1f} s; "
        f"{summary.skipped} already done; {summary.failed} failed"
    )
    for reason, count in sorted(summary.failures_by_reason.items(), key=lambda kv: -kv[1]):
        print(f"  failed {count:>5} × {reason}")
    print(f"database: {summary.out} ({summary.total_videos} videos, {summary.total_failures} failures in all)")
    if summary.total_failures:
        print(f"failures with reasons: {summary.out / 'failures.jsonl'}")
    print(f"next: vimpac db inspect {summary.out}")
    if summary.total_videos == 0:
        print("error: no video could be tokenized", file=sys.stderr)
        return 1
    if args.strict and summary.total_failures:
        print("error: some videos failed and --strict was given", file=sys.stderr)
        return 1
    return 0
