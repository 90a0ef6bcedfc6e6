"""`vimpac embed`: one embedding per video (from video files or a code database), resumable."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from contextlib import closing
from pathlib import Path

import numpy as np

EPILOG = """\
examples:
  # CLS embeddings of a folder of videos with a pre-trained (or fine-tuned) model
  vimpac embed videos/ --model runs/pt --out emb/

  # from an existing code database, without decoding again: the val split, centre view, both features
  vimpac embed --db data/codes/synth_f128_fps4_test --split val --view r128_center_f0 --model runs/pt \\
      --out emb_val/ --feature both

Output (OUT): embeddings.npy, float32 [N, D] (D = hidden size; 2·D for --feature both: cls then mean; with
--per-clip [N, V·K, D], one row per view × clip, view-major); index.csv, columns row,id,video (row i of the
array); failures.jsonl (videos that could not be used: stage and reason, as `vimpac tokenize`); settings.json.
A video's embedding is the mean over its test views × K clips (the clips fine-tuning evaluates) of the last
layer's CLS vector (cls) or of its token vectors over the non-PAD positions (mean), as `vimpac probe` computes.
Run the same command again to resume: videos already in index.csv (or failures.jsonl) are skipped. Other
settings into an existing OUT are refused.

Speed: as `vimpac predict` (--workers decoding processes, the tokenizer and the model batched across videos, fp16
on CUDA by default); rows keep the order of the inputs.
"""

PARTIAL = "embeddings.partial"


def register(sub: argparse._SubParsersAction) -> None:
    from vimpac.commands.predict import add_model_arguments

    p = sub.add_parser(
        "embed",
        help="one embedding per video (files or a code database) → embeddings.npy + index.csv",
        description="Embed video files (decoded and tokenized as the model's database was) or the videos of a code "
        "database with a VIMPAC model: mean CLS / token features over the test views × K clips.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "videos",
        nargs="*",
        help="video files, folders (searched recursively for video files), or .txt/.lst lists of paths",
    )
    add_model_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (created; resumed when it exists)")
    p.add_argument("--feature", choices=("cls", "mean", "both"), default="cls", help="which feature (default cls)")
    p.add_argument("--per-clip", action="store_true", help="keep every view × clip row instead of their mean")
    p.add_argument("--db", default=None, help="embed the videos of this code database instead of video files")
    p.add_argument("--split", default=None, help="with --db: only this split (default: every video)")
    p.add_argument("--view", default=None, help="with --db: comma list of views (default: the model's test views)")
    p.set_defaults(func=run)


def _resume(out: Path, settings: dict) -> tuple[set[str], int]:
    """(ids already embedded or failed, rows kept); refuses other settings; cuts a torn last line of index.csv and
    failures.jsonl (the caller trims embeddings.partial to the rows index.csv lists)."""
    from vimpac.atomic_write import drop_torn_line
    from vimpac.commands.predict import changed_settings
    from vimpac.errors import UsageError

    out.mkdir(parents=True, exist_ok=True)
    saved = out / "settings.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        if changed_settings(before, settings):
            raise UsageError(
                f"{out} holds embeddings made with other settings ({changed_settings(before, settings)}); use "
                "another --out"
            )
    else:
        saved.write_text(json.dumps(settings, indent=1) + "\n")
    done: set[str] = set()
    rows = 0
    index = out / "index.csv"
    if index.is_file() and drop_torn_line(index) and index.stat().st_size == 0:
        index.unlink()  # even the header was cut short
    if index.is_file():
        with index.open() as f:
            for row in csv.DictReader(f):
                done.add(row["id"])
                rows += 1
    else:
        index.write_text("row,id,video\n")
    failures = out / "failures.jsonl"
    if failures.is_file():
        drop_torn_line(failures)
        done |= {json.loads(line)["id"] for line in failures.read_text().splitlines() if line.strip()}
    return done, rows


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vimpac.commands.predict import decode_workers, pipeline_from_args
    from vimpac.errors import UsageError, require_directory
    from vimpac.inference import video_files
    from vimpac.inference_stream import database_codes, file_codes, run_videos

    require_directory(args.out, "--out")
    if bool(args.db) == bool(args.videos):
        raise UsageError("give video files / folders, or --db CODE_DB (one of the two)")
    if not args.db and (args.split or args.view):
        raise UsageError("--split and --view select videos of --db; with video files use --views")
    if args.view:
        args.views = args.view
    pipeline = pipeline_from_args(args, args.db or args.data, need_classifier=False)
    if args.db:
        from vimpac.checkpoint import check_same_tokenizer
        from vimpac.code_db import CodeDatabase

        db = CodeDatabase(args.db)
        check_same_tokenizer(pipeline.model.source, db.manifest, args.db)
        unknown = [v for v in pipeline.info["views"] if v not in db.views]
        if unknown:
            raise UsageError(f"views {unknown} are not in {db.path}; valid views: {', '.join(db.views)} (--view)")
        items = [(vid, vid) for vid in db.ids(args.split)]
        if not items:
            raise UsageError(f"no videos{'' if args.split is None else f' in split {args.split!r}'} of {db.path}")
    else:
        pipeline.tokenizer  # noqa: B018 - load and check it before the first video
        items = [(str(p), p) for p in video_files(args.videos)]
    settings = {
        **pipeline.settings(),
        "feature": args.feature,
        "per_clip": args.per_clip,
        "source": str(args.db) if args.db else "files",
        **({"split": args.split} if args.db else {}),  # another split of the same database is other videos
    }
    done, rows = _resume(args.out, settings)
    partial = args.out / PARTIAL
    todo = [(vid, src) for vid, src in items if vid not in done]
    if args.db:
        codes = database_codes(db, pipeline.info["views"], [vid for vid, _ in todo])
    else:
        codes = file_codes(pipeline, todo, decode_workers(args.workers, len(todo)))
    failed = 0
    bar = tqdm(total=len(todo), unit="video", desc="embed", disable=args.no_progress, dynamic_ncols=True)
    # closing(codes): an interrupted run stops its decode workers at once
    with bar, closing(codes), partial.open("ab") as data, (args.out / "index.csv").open("a", newline="") as index:
        data.truncate(_row_bytes(partial, rows, pipeline, args))
        writer = csv.writer(index)
        for result in run_videos(pipeline, codes, "features", args.feature, args.per_clip):
            bar.update(1)
            if result.failure is not None:
                bad = {"id": result.id, **result.failure}
                with (args.out / "failures.jsonl").open("a") as f:
                    f.write(json.dumps(bad) + "\n")
                bar.write(f"{result.source}: cannot embed ({bad['stage']}: {bad['reason']})", file=sys.stderr)
                failed += 1
                continue
            data.write(result.features.astype(np.float32).tobytes())
            data.flush()
            writer.writerow([rows, result.id, result.source])
            index.flush()
            rows += 1
    _finalize(args.out, rows, pipeline, args)
    print(f"{rows} embeddings in {args.out / 'embeddings.npy'} ({len(todo) - failed} new, {failed} failed)")
    if rows == 0:
        return 2
    return 1 if failed else 0


def _row_shape(pipeline, args) -> tuple[int, ...]:
    d = pipeline.model.config.hidden_size * (2 if args.feature == "both" else 1)
    per = len(pipeline.info["views"]) * int(pipeline.info["num_clips"])
    return (per, d) if args.per_clip else (d,)


def _row_bytes(partial: Path, rows: int, pipeline, args) -> int:
    """Bytes of the `rows` complete rows (what index.csv lists): a row written after the index's last is cut."""
    return rows * int(np.prod(_row_shape(pipeline, args))) * 4


def _finalize(out: Path, rows: int, pipeline, args) -> None:
    from vimpac.atomic_write import atomic_path

    flat = np.fromfile(out / PARTIAL, dtype=np.float32, count=rows * int(np.prod(_row_shape(pipeline, args))))
    with atomic_path(out / "embeddings.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, flat.reshape(rows, *_row_shape(pipeline, args)))
