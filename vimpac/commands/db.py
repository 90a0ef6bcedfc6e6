"""`vimpac db inspect|merge|import-original`: look inside a code database, merge shards of one extraction into one
database, or import the original release's token LMDBs (vimpac/commands/import_original.py)."""

from __future__ import annotations

import argparse
import json

from vimpac import code_db
from vimpac.commands import import_original

_DESCRIPTION = """\
Work with code databases (the output of `vimpac tokenize`: manifest.json, views/<view>/ LMDBs, failures.jsonl).

  vimpac db inspect DB            what the database holds (settings, videos, frames, failures per stage and
                                  reason, per view and per split) and a check of a random sample of records
  vimpac db merge OUT DB [DB...]  merge databases tokenized with the same settings (e.g. shards run on several
                                  machines) into a new database OUT
  vimpac db import-original LMDB_DIR... --out DB
                                  import token LMDBs of the original VIMPAC release (one view per directory)
"""

_INSPECT_EPILOG = """\
The check decodes each sampled video in every view and verifies: the grid matches the manifest, codes lie in
[0, vocab_size), the label is a class id or -1, and the frame count is the same in every view. Exit status: 0
when no problem was found (warnings such as "incomplete" allowed), 1 otherwise.

examples:
  vimpac db inspect data/codes/ucf101_fps2_s128
  vimpac db inspect data/codes/ucf101_fps2_s128 --sample 0 --json > counts.json
"""

_MERGE_EPILOG = """\
Every input must be complete and made with the same tokenizer (fingerprint), fps, frame size, grid, views,
classes and dataset; otherwise nothing is written and the difference is named. A video present in several
inputs is kept once if its records are identical, and refused otherwise. Splits and failures are united (a
failure is dropped when another input tokenized that video). OUT must not exist (or be an empty directory).

example:
  vimpac db merge data/codes/k400 shard0/ shard1/ shard2/
"""


_MAX_REASONS = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "db",
        help="inspect or merge code databases",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="db_command", metavar="<action>", required=True)

    inspect = sub.add_parser(
        "inspect",
        help="summary, counts and a sample check of one database",
        description="Summarize a code database and verify a random sample of its records.",
        epilog=_INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("db", help="database directory (contains manifest.json)")
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON instead of text")
    inspect.add_argument(
        "--sample",
        type=_non_negative,
        default=100,
        metavar="N",
        help="number of random videos to verify (default 100; 0 skips the check; a number >= the video count "
        "checks every video)",
    )
    inspect.add_argument("--seed", type=int, default=0, help="seed choosing the sample (default 0)")
    inspect.set_defaults(func=run)

    merge = sub.add_parser(
        "merge",
        help="merge databases made with identical settings into a new one",
        description="Merge code databases tokenized with identical settings into a new database.",
        epilog=_MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("out", metavar="OUT", help="new output database directory (must not exist)")
    merge.add_argument("inputs", nargs="+", metavar="DB", help="input databases, in priority order")
    merge.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    merge.set_defaults(func=run)

    import_original.register(sub)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.db_command == "inspect":
        report = code_db.inspect(args.db, sample=args.sample, seed=args.seed)
        print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
        return 0 if report["ok"] else 1
    manifest = code_db.merge(args.out, args.inputs, progress=not args.no_progress)
    counts = manifest["counts"]
    print(
        f"merged {len(args.inputs)} databases into {args.out}: {counts['videos']} videos, {counts['frames']} frames, "
        f"{counts['failures']['total']} failures"
    )
    return 0


def format_report(report: dict) -> str:
    """The inspect report as readable text."""
    m, c = report["manifest"], report["counts"]
    tok = m["tokenizer"]
    lines = [
        f"database   {report['path']}  ({'complete' if m['complete'] else 'INCOMPLETE'}, schema {m['schema_version']})",
        f"dataset    {m['dataset']}  ({m['classes']} classes)",
        f"sampling   {m['fps']} fps, frame size {m['frame_size']}, grid {m['grid'][0]}x{m['grid'][1]}, "
        f"codes {m['codes_dtype']}",
        f"frames     selection {m.get('frame_selection', 'vimpac')}, resize {m.get('resize', 'area')}",
        f"tokenizer  {tok['name']}  vocab {tok['vocab_size']}  fingerprint {tok['fingerprint']}",
        f"videos     {c['videos']}  ({c['frames']} frames; {c['partial']} in some views only)",
        "views      " + ", ".join(f"{view} ({n})" for view, n in c["views"].items()),
        f"failures   {c['failures']['total']}",
    ]
    reasons = sorted(c["failures"]["by_reason"].items(), key=lambda item: (-item[1], item[0]))
    lines += [f"  {reason:<40} {n}" for reason, n in reasons[:_MAX_REASONS]]
    if len(reasons) > _MAX_REASONS:
        lines.append(f"  ... {len(reasons) - _MAX_REASONS} more kinds of reason (all in --json and failures.jsonl)")
    if c["splits"]:
        lines.append(f"splits     {'name':<12} {'listed':>8} {'videos':>8} {'frames':>10} {'failed':>7} {'missing':>8}")
        for name, s in c["splits"].items():
            lines.append(
                f"           {name:<12} {s['listed']:>8} {s['videos']:>8} {s['frames']:>10} {s['failed']:>7} "
                f"{s['missing']:>8}"
            )
    source = m.get("source")
    if source:
        lines.append(
            f"source     {source.get('format', '?')}: "
            + ", ".join(f"{d.get('path')} ({d.get('view')})" for d in source.get("directories", []))
        )
    lines.append(f"checked    {report['verified']} random videos: {len(report['problems'])} problems")
    lines += [f"  {p['id']} [{p['view'] or 'all views'}]: {p['problem']}" for p in report["problems"]]
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
