"""`vimpac predict`: video files → top-k action labels of a fine-tuned model, as its multi-view evaluation sees them."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EPILOG = """\
examples:
  # top-5 labels of two videos with the model of a fine-tuning run (tokenizer and settings from the run)
  vimpac predict clip1.mp4 clip2.webm --model runs/ft

  # every video of a folder (or a list file, one path per line), results as JSON; rerun to resume
  vimpac predict videos/ --model runs/ft/export --top-k 3 --json predictions.json

Each video is decoded at the fps of the code database the model was evaluated on, cut into its test views,
tokenized with that database's tokenizer, and scored on K clips per view (softmax per clip, mean), as
`finetune.py --eval-only` scores it. The settings come from export/inference.json, derived from the run's
run_config.json and its database manifest the first time (see README: Use a trained model).

Speed: --workers processes decode (as in `vimpac tokenize`); the tokenizer encodes frames of several videos per
batch and the model scores up to --clips-per-forward clips of several videos per forward pass, on CUDA in fp16 by
default (--precision) with the Triton kernels. Results keep the order of the inputs.

Resuming: with --json or --csv, videos already in that file (predicted or failed) are skipped and the new ones
added, so an interrupted run over a long list picks up where it stopped (the JSON is rewritten every few seconds
and on exit, the CSV gets a row per video as it is done). Output made with other settings (model weights, views, K,
top-k) is refused; delete the file to start over. The JSON holds its settings; a CSV's are kept beside it in
<name>.settings.json.

A video that cannot be used is reported with the stage and reason (as in `vimpac tokenize`'s failures.jsonl) and
the others go on; the exit code is 1 when some failed, 2 when the output holds no prediction at all (none could
be predicted, now or before) or the command line is wrong.
"""
CSV_HEADER = ["video", "rank", "label", "probability", "error"]
SAVE_EVERY_S = 10.0  # how often the JSON output is rewritten while a run goes on


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export/ folder of a fine-tuning run, or the run directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the database names)")
    p.add_argument("--data", default=None, help="code database the model was evaluated on (default: the run's)")
    p.add_argument(
        "--num-clips",
        type=int,
        default=None,
        help="K clips per view (default: the largest K of the run's final evaluation)",
    )
    p.add_argument("--views", default=None, help="comma list of test views, e.g. r128_center_f0 (default: the run's)")
    p.add_argument(
        "--frame-rate",
        type=float,
        default=None,
        help="clip fps, a divisor of the frames' fps (default: the rate the model was fine-tuned at, which data "
        "at another fps is strided to; a pre-training export: each database's own fps)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="the model's compute precision (default auto: fp16 on CUDA, fp32 on the CPU; the tokenizer keeps the "
        "database's)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="decoding processes (default: one per CPU core but one; 0: decode in this process)",
    )
    p.add_argument("--clips-per-forward", type=int, default=32, help="clips per forward pass of the model (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides(args: argparse.Namespace) -> dict:
    """The run's inference settings the flags replace (num_clips, views, frame_rate; None: the run's); UsageError for
    values no video could use, before any work."""
    from vimpac.errors import UsageError
    from vimpac.tokenization.views import View, view_list

    if args.num_clips is not None and args.num_clips < 1:
        raise UsageError(f"--num-clips must be >= 1 (clips per view); got {args.num_clips}")
    if args.frame_rate is not None and not args.frame_rate > 0:
        raise UsageError(f"--frame-rate must be positive; got {args.frame_rate}")
    views = view_list(args.views, "--views")
    for view in views or ():
        try:
            View.parse(view)
        except ValueError as err:
            raise UsageError(f"--views: {err}, e.g. r128_center_f0") from None
    return {"num_clips": args.num_clips, "views": views, "frame_rate": args.frame_rate}


def pipeline_from_args(args: argparse.Namespace, data: str | None, need_classifier: bool):
    """The VideoPipeline the flags of add_model_arguments describe."""
    from vimpac.errors import UsageError
    from vimpac.inference import load_pipeline

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0; got {args.workers}")
    return load_pipeline(
        args.model,
        args.tokenizer,
        args.device,
        data,
        overrides(args),
        need_classifier=need_classifier,
        precision=args.precision,
        clips_per_forward=args.clips_per_forward,
    )


def decode_workers(wanted: int, videos: int) -> int:
    """Decode processes for `videos` files: none for a single one (starting a worker costs more than it saves),
    else at most one per video."""
    return min(wanted, videos) if videos > 1 else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-k action labels of video files with a fine-tuned model",
        description="Decode, tokenize and classify video files with a fine-tuned export: every test view × K "
        "clips, softmax per clip, probabilities averaged, as the fine-tuning evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "videos",
        nargs="+",
        help="video files, folders (searched recursively for video files), or .txt/.lst lists of paths",
    )
    add_model_arguments(p)
    p.add_argument("--top-k", type=int, default=5, help="labels per video (default 5)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", type=Path, default=None, help="write {settings, predictions, failures} to this file")
    out.add_argument("--csv", type=Path, default=None, help="write one row per video and rank to this file")
    p.set_defaults(func=run)


# Settings recorded only since a later version: an output written before lacks them and counts as made with
# today's value.
LATER_SETTINGS = ("precision", "weights")


def changed_settings(before: dict, settings: dict) -> str:
    """The keys of `settings` whose values `before` (an output's recorded settings) does not share, comma-joined;
    empty when an output made with `before` can be resumed with `settings`. Where both record the model's
    `weights` (their fingerprint), those identify the model and its path ("model") is only where it lay."""
    by_weights = bool(before.get("weights")) and bool(settings.get("weights"))
    return ", ".join(
        sorted(
            k
            for k in settings
            if before.get(k) != settings[k]
            and not (k in LATER_SETTINGS and k not in before)
            and not (k == "model" and by_weights)
        )
    )


def _previous_json(path: Path, settings: dict) -> tuple[list[dict], list[dict]]:
    from vimpac.errors import UsageError

    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(
            f"{path} exists but is not a predictions JSON ({err}); delete it or use another --json"
        ) from None
    if not isinstance(before, dict) or not isinstance(before.get("settings"), dict):
        raise UsageError(f"{path} exists but is not a predictions JSON; delete it or use another --json")
    changed = changed_settings(before["settings"], settings)
    if changed:
        raise UsageError(
            f"{path} holds predictions made with other settings ({changed}); delete it or use another --json"
        )
    return list(before.get("predictions") or []), list(before.get("failures") or [])


def csv_settings_path(table: Path) -> Path:
    """Where the settings of a predictions CSV are kept: <name>.settings.json beside it."""
    return table.with_name(table.name + ".settings.json")


@dataclass
class PreviousCsv:
    """What an existing predictions CSV holds: its rows by video, the videos whose rows are whole (predicted:
    all their ranks; failed: one error row), and whether the file must be rewritten without the others."""

    rows: dict[str, list[list[str]]]
    predicted: set[str]
    failed: set[str]
    torn: bool

    def keep_only(self, path: Path, videos: set[str]) -> None:
        """Rewrite `path` (atomically) with the rows of `videos` only, when that drops anything."""
        from vimpac.atomic_write import atomic_path

        if not self.torn and set(self.rows) <= videos:
            return
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows(row for video, own in self.rows.items() if video in videos for row in own)


def _previous_csv(path: Path, settings: dict, ranks: int) -> PreviousCsv:
    """An existing predictions CSV made with `settings` (refused when made with others), read, not changed.

    A video counts as predicted only with all its `ranks` rows, ranks 1..`ranks`. Rows are appended video by
    video, so an interrupted write (a kill, a full disk) leaves a torn last line (no final newline) and the last
    video short of its ranks: the caller rewrites the file without them (PreviousCsv.keep_only) and predicts
    that video again. Rows of any other shape (another rank count anywhere else: a file from other settings,
    written before they were recorded) are refused."""
    from vimpac.errors import UsageError

    raw = path.read_bytes()
    whole_lines = raw[: raw.rfind(b"\n") + 1]
    lines = list(csv.reader(io.StringIO(whole_lines.decode("utf-8", errors="replace"), newline="")))
    if not lines or lines[0] != CSV_HEADER:
        raise UsageError(f"{path} exists but is not a predictions CSV (header {CSV_HEADER}); delete it")
    kept = csv_settings_path(path)
    if kept.is_file():  # a CSV written before the settings were kept has none to compare
        old = json.loads(kept.read_text())
        if changed_settings(old, settings):
            raise UsageError(
                f"{path} holds predictions made with other settings ({changed_settings(old, settings)}, as {kept} "
                "says); delete both or use another --csv"
            )
    rows: dict[str, list[list[str]]] = {}
    for row in lines[1:]:
        if row:
            rows.setdefault(row[0], []).append(row)
    expected = [str(r) for r in range(1, ranks + 1)]
    predicted, failed = set(), set()
    last = next(reversed(rows), None)
    for video, own in rows.items():
        listed = [row[1] if len(row) > 1 else "" for row in own]
        if listed == expected:
            predicted.add(video)
        elif len(own) == 1 and len(own[0]) == len(CSV_HEADER) and own[0][4]:
            failed.add(video)
        elif video != last or listed != expected[: len(listed)]:
            raise UsageError(
                f"{path}: {video} has rows of ranks {listed}, not 1..{ranks} (--top-k {settings['top_k']}): it was "
                "written with other settings; delete it or use another --csv"
            )
    return PreviousCsv(rows, predicted, failed, torn=whole_lines != raw)


def csv_rows(entry: dict) -> list[list[str]]:
    """The CSV rows of one result (a prediction: one per rank; a failure: one with the error)."""
    if "top" in entry:
        return [
            [entry["video"], str(r), t["label"], f"{t['probability']:.6f}", ""] for r, t in enumerate(entry["top"], 1)
        ]
    return [[entry["video"], "", "", "", f"{entry['stage']}: {entry['reason']}"]]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vimpac.atomic_write import write_json_atomic
    from vimpac.errors import UsageError, require_file_path
    from vimpac.inference import video_files
    from vimpac.inference_stream import file_codes, run_videos

    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1; got {args.top_k}")
    videos = video_files(args.videos)
    for flag, output in (("--json", args.json), ("--csv", args.csv)):
        require_file_path(output, flag)
        if output is not None:  # now, not when the first results are written
            output.parent.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_from_args(args, args.data, need_classifier=True)
    pipeline.class_names()  # checked, as the tokenizer, before the first video
    pipeline.tokenizer  # noqa: B018
    predictions, failures, predicted_before = [], [], 0
    settings = {**pipeline.settings(), "top_k": args.top_k}
    done: set[str] = set()
    if args.csv and args.csv.exists():
        earlier = _previous_csv(args.csv, settings, min(args.top_k, pipeline.model.num_classes))
        done, predicted_before = earlier.predicted | earlier.failed, len(earlier.predicted)
        earlier.keep_only(args.csv, done)
        if len(earlier.rows) > len(done):
            redo = len(earlier.rows) - len(done)
            print(f"{args.csv}: {redo} video(s) without all their rows (an interrupted write) are predicted again")
    elif args.csv:
        args.csv.write_text(",".join(CSV_HEADER) + "\n")
    if args.csv:
        write_json_atomic(csv_settings_path(args.csv), settings, 1)
    if args.json and args.json.exists():
        predictions, failures = _previous_json(args.json, settings)
        done = {entry["video"] for entry in predictions + failures}
        predicted_before = len(predictions)
    todo = [(str(v), v) for v in videos if str(v) not in done]
    if done:
        print(f"{len(videos) - len(todo)} of {len(videos)} videos are in the output already; {len(todo)} to do")

    def save() -> None:
        if args.json:
            write_json_atomic(args.json, {"settings": settings, "predictions": predictions, "failures": failures}, 1)

    new_ok = new_failed = 0
    saved_at = time.monotonic()
    bar = tqdm(total=len(todo), unit="video", desc="predict", disable=args.no_progress, dynamic_ncols=True)
    table = args.csv.open("a", newline="") if args.csv else None
    codes = file_codes(pipeline, todo, decode_workers(args.workers, len(todo)))
    try:
        for result in run_videos(pipeline, codes, "probabilities"):
            if result.failure is not None:
                entry = result.failure
                failures.append(entry)
                new_failed += 1
                bar.write(f"{entry['video']}: cannot predict ({entry['stage']}: {entry['reason']})", file=sys.stderr)
            else:
                top = pipeline.top_k(result.probabilities, args.top_k)
                entry = {"video": result.source, "top": [{"label": n, "probability": p} for n, p in top]}
                predictions.append(entry)
                new_ok += 1
                bar.write(f"{result.source}\t" + "\t".join(f"{n} {p:.3f}" for n, p in top))
            if table is not None:
                csv.writer(table).writerows(csv_rows(entry))
                table.flush()
            bar.update(1)
            if time.monotonic() - saved_at > SAVE_EVERY_S:
                save()
                saved_at = time.monotonic()
    finally:  # what is done stays done, even on Ctrl-C
        codes.close()  # stops the decode workers now, not when the generator is collected
        bar.close()
        if table is not None:
            table.close()
        save()
    print(f"{new_ok} predicted, {new_failed} failed", file=sys.stderr)
    if new_ok + predicted_before == 0:
        return 2
    return 1 if new_failed else 0
