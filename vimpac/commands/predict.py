"""`vimpac predict`: video files → top-k action labels of a fine-tuned model, as its multi-view evaluation sees them."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  # top-5 labels of two videos with the model of a fine-tuning run (tokenizer and settings from the run)
  vimpac predict clip1.mp4 clip2.webm --model runs/ft

  # every video of a folder (or a list file, one path per line), results as JSON
  vimpac predict videos/ --model runs/ft/export --top-k 3 --json predictions.json

Each video is decoded at the fps of the code database the model was evaluated on, cut into its test views,
tokenized with that database's tokenizer, and scored on K clips per view (softmax per clip, mean), as
`finetune.py --eval-only` scores it. The settings come from export/inference.json, derived from the run's
run_config.json and its database manifest the first time (see README: Use a trained model). A video that cannot
be used is reported with the stage and reason (as in `vimpac tokenize`'s failures.jsonl) and the others go on;
the exit code is 1 when some failed, 2 when none could be predicted or the command line is wrong.
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export/ folder of a fine-tuning run, or the run directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the database names)")
    p.add_argument("--data", default=None, help="code database the model was evaluated on (default: the run's)")
    p.add_argument("--num-clips", type=int, default=None, help="K clips per view (default: largest last-test-clips)")
    p.add_argument("--views", default=None, help="comma list of test views, e.g. r128_center_f0 (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")


def overrides(args: argparse.Namespace) -> dict:
    views = None if args.views is None else [v for v in args.views.split(",") if v]
    return {"num_clips": args.num_clips, "views": views}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-k action labels of video files with a fine-tuned model",
        description="Decode, tokenize and classify video files with a fine-tuned export: every test view × K "
        "clips, softmax per clip, probabilities averaged, as the fine-tuning evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("videos", nargs="+", help="video files, folders of videos, or .txt list files of paths")
    add_model_arguments(p)
    p.add_argument("--top-k", type=int, default=5, help="labels per video (default 5)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", type=Path, default=None, help="write {predictions, failures} as JSON to this file")
    out.add_argument("--csv", type=Path, default=None, help="write one row per video and rank to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.errors import UsageError
    from vimpac.inference import failure, load_pipeline, video_files

    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1; got {args.top_k}")
    videos = video_files(args.videos)
    if not videos:
        raise UsageError(f"no video files in {' '.join(args.videos)}")
    pipeline = load_pipeline(args.model, args.tokenizer, args.device, args.data, overrides(args), need_classifier=True)
    pipeline.tokenizer  # noqa: B018 - load and check it before the first video
    predictions, failures = [], []
    for video in videos:
        try:
            probs = pipeline.probabilities(video)
        except Exception as err:  # one bad video costs itself, not the run
            failures.append(failure(video, err))
            print(f"{video}: cannot predict ({failures[-1]['stage']}: {failures[-1]['reason']})", file=sys.stderr)
            continue
        top = pipeline.top_k(probs, args.top_k)
        predictions.append({"video": str(video), "top": [{"label": n, "probability": p} for n, p in top]})
        print(f"{video}\t" + "\t".join(f"{n} {p:.3f}" for n, p in top), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"predictions": predictions, "failures": failures}, indent=1) + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "rank", "label", "probability", "error"])
            for p in predictions:
                for rank, top in enumerate(p["top"], 1):
                    writer.writerow([p["video"], rank, top["label"], f"{top['probability']:.6f}", ""])
            for bad in failures:
                writer.writerow([bad["video"], "", "", "", f"{bad['stage']}: {bad['reason']}"])
    print(f"{len(predictions)} predicted, {len(failures)} failed", file=sys.stderr)
    if not predictions:
        return 2
    return 1 if failures else 0
