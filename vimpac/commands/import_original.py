"""`vimpac db import-original LMDB_DIR [LMDB_DIR ...] --out DB`: the original release's token LMDBs → a code
database (the action is registered under `vimpac db` by vimpac/commands/db.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Import token LMDBs written by the original VIMPAC release's extractor (video2token/extract_video_tokens.py) into a
vimpac code database, without re-tokenizing: every video's codes and label are copied exactly.

Each LMDB directory is one spatial view (resize, crop, flip) of one dataset at one fps and frame size, as its name
says: <tokenizer>_<dataset>_<split>_fps<N>_hflip<0|1>_<shorter side><top|center|bottom><frame size>, e.g.
dalle_ucf101_train_val_fps16_hflip0_128center128. Its args.json, when present, wins over the name (names were
often changed by hand); the flags below win over both. Several directories become several views of one database
(the 12 training views, or the 3 test views); directories of the same view with different videos (the train and
val LMDBs of SSV2 or Kinetics) are joined into that view.
"""

EPILOG = """\
splits:
  --annotations takes the annotation lists the original read (MMAction2 style, "relative/path.avi label" per line):
  ucf101_train_split_1_videos.txt → train_1, ucf101_val_split_1_videos.txt → test_1 (UCF101 and HMDB51 keep
  their three splits, as `vimpac tokenize` does), sthv2_train_list_videos.txt → train, *_val_* → val. A folder
  is searched for *_videos.txt, or in its <dataset>/ subfolder. Without lists, a directory's split name is used
  (train / val; a train_val directory gives one split named train_val, which fine-tuning cannot use).

failures:
  err_filepaths.txt (videos the original could not probe) becomes failures.jsonl lines (stage probe); a video
  missing from some view, or whose views disagree on frames or label, and an annotated video absent from every
  LMDB become failures too (stage import). `vimpac db inspect DB` lists them and shows where the database came
  from.

resuming and checking:
  Killed at any moment, the same command run again finishes the job; a rerun with other settings is refused.
  --verify re-reads every imported record and compares it with the original value, exactly.

examples:
  # UCF101's 3 test views (top, centre, bottom crops at 128 px) as one database, splits from the original lists
  vimpac db import-original tokens/dalle_ucf101_train_val_fps16_hflip0_128{top,center,bottom}128 \\
      --annotations data/video_anno/ucf101 --out codes/ucf101_f128_fps16_test --verify
  # SSV2's train and val LMDBs of one view become one view with splits train and val
  vimpac db import-original tokens/dalle_sthv2_{train,val}_fps16_hflip0_128center128 --out codes/ssv2_center
  # a renamed directory without args.json: say what its name no longer does
  vimpac db import-original my_tokens --out codes/x --dataset ucf101 --fps 16 --frame-size 128 --views r128_center_f0
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-original",
        help="import the original release's token LMDBs into a code database",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directories", nargs="+", metavar="LMDB_DIR", type=Path, help="original token LMDB directories")
    p.add_argument("--out", type=Path, required=True, help="database directory to create (or resume)")
    p.add_argument(
        "--annotations",
        nargs="+",
        type=Path,
        default=None,
        metavar="PATH",
        help="the original's annotation lists (files, or folders holding *_videos.txt) for the splits",
    )
    g = p.add_argument_group("overrides (when a directory was renamed or lacks args.json)")
    g.add_argument("--dataset", default=None, help="dataset name, e.g. ucf101, hmdb51, sthv2 (stored as ssv2), ...")
    g.add_argument("--fps", type=float, default=None, help="frames per second of the stored tokens")
    g.add_argument("--frame-size", type=int, default=None, help="side of the square frames the tokens encode (px)")
    g.add_argument(
        "--views",
        nargs="+",
        default=None,
        metavar="VIEW",
        help="one view name per LMDB_DIR, in order: r<shorter side>_<top|center|bottom>_f<0|1>, e.g. r160_top_f1",
    )
    g.add_argument("--vocab-size", type=int, default=8192, help="codes of the tokenizer (default 8192, DALL-E)")
    g.add_argument(
        "--class-names", type=Path, default=None, help="file with one class name per line, in class-id order"
    )
    p.add_argument("--commit-every", type=int, default=256, help="videos per database commit (default 256)")
    p.add_argument("--verify", action="store_true", help="afterwards compare every record with the original values")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    from vimpac.errors import UsageError
    from vimpac.original_db import import_original, verify

    if args.fps is not None and not 0 < args.fps < math.inf:
        raise UsageError(
            f"--fps must be positive and finite (the frame rate the original extracted at); got {args.fps}"
        )
    if args.frame_size is not None and (args.frame_size < 8 or args.frame_size % 8):
        raise UsageError(f"--frame-size must be a positive multiple of 8 (the tokenizer's grid); got {args.frame_size}")
    if args.class_names is not None and not Path(args.class_names).is_file():
        raise UsageError(f"--class-names {args.class_names} is not a file (one class name per line, in label order)")

    summary = import_original(
        args.directories,
        args.out,
        annotations=args.annotations,
        dataset=args.dataset,
        fps=args.fps,
        frame_size=args.frame_size,
        views=args.views,
        vocab_size=args.vocab_size,
        class_names_file=args.class_names,
        commit_every=args.commit_every,
        progress=not args.no_progress,
    )
    m = summary.manifest
    print(
        f"imported {summary.imported} videos ({summary.frames} frames); {summary.skipped} already done; "
        f"{summary.failed} failed"
    )
    print(
        f"database: {summary.out} ({m['dataset']}, {m['fps']} fps, frame size {m['frame_size']}, views "
        f"{', '.join(m['views'])}, {len(m['classes'])} classes; {summary.total_videos} videos, "
        f"{summary.total_failures} failures in all)"
    )
    for note in summary.notes:
        print(f"note: {note}")
    if summary.total_failures:
        print(f"failures with reasons: {summary.out / 'failures.jsonl'}")
    status = 0
    if args.verify:
        problems = verify(args.out, args.directories, args.views, args.dataset, args.fps, args.frame_size)
        for line in problems[:20]:
            print(f"verify: {line}", file=sys.stderr)
        print(f"verify: {summary.total_videos} videos compared with the originals, {len(problems)} differences")
        status = 1 if problems else 0
    print(f"next: vimpac db inspect {summary.out}")
    if summary.total_videos == 0:
        print("error: no video could be imported", file=sys.stderr)
        return 1
    return status
