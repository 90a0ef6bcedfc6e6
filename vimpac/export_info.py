"""What a fine-tuned export needs to run on video files: `export/inference.json` (tokenizer, rates, views, classes).

An export (config.json + model.safetensors) holds the model only. Predicting on a video file also needs what the
evaluation database was made with and how fine-tuning evaluated it:

  tokenizer   {path, fingerprint, name, vocab_size, fp16}: the tokenizer of the code database (its manifest)
  fps         the database's frame rate: videos are decoded and resampled to it (vimpac.tokenization.decode)
  frame_rate  the clip rate the model was fine-tuned at (--frame-rate, else its training database's fps; null for a
              pre-training export: each database's own fps): clips take every (fps / frame_rate)-th decoded frame,
              so a database or videos at another fps still give clips at the model's rate
  frame_size  S: the side of the square views
  frame_selection  how the database picked and resized frames ("vimpac" or "ffmpeg", `vimpac tokenize
              --frame-selection`); absent from settings written before it was recorded, which means "vimpac"
  views       the test views fine-tuning evaluated (run_config.json's test_views, e.g. r128_{top,center,bottom}_f0)
  num_clips   K: clips per view at vimpac.clip_windows.evaluation_starts (default: the largest K of the final
              evaluation, --num-test-clips and --last-test-clips)
  single_clip where the one clip of K = 1 starts: "start" (frame 0) or "centre" (fine-tuning's --single-clip;
              "centre" for runs that predate the flag and for pre-training exports, as vimpac probe)
  clip_len    T of the model
  classes     the class names, in label order (the database manifest's)
  dataset, database, run: where it came from

How it is obtained (`inference_info`): export/inference.json when present; otherwise it is derived from the run
directory the export lies in (export/../run_config.json: the evaluation database, --frame-rate, the test views and
clip counts) and the manifest of that database (fps, frame size, tokenizer path and fingerprint, classes), then
written to export/inference.json (when the folder is writable) so the export keeps working after the database is
moved or deleted. The trainer writes the export without it; deriving it from the run directory the first time the
export is used (or with `write_inference_info`) keeps the training code untouched. `--data DB` (the `data`
argument) names the database when the run directory is not available; explicit overrides win over everything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vimpac.atomic_write import write_json_atomic
from vimpac.errors import UsageError
from vimpac.tokenization.decode import DEFAULT_FRAME_SELECTION

INFO_FILE = "inference.json"
FORMAT = 1
# The fields that belong to the model (how it was trained and evaluated), whatever database feeds it.
MODEL_FIELDS = ("frame_rate", "num_clips", "single_clip", "clip_len")
FIELDS = ("tokenizer", "fps", "frame_rate", "frame_size", "views", "num_clips", "single_clip", "clip_len", "classes")


def _manifest(db: str | Path) -> dict[str, Any]:
    path = Path(db) / "manifest.json"
    if not path.is_file():
        raise UsageError(
            f"code database {db} not found (no {path}); pass --data with the code database the model was "
            "evaluated on (its manifest names the tokenizer, fps, frame size and classes)"
        )
    return json.loads(path.read_text())


def _largest_count(text: Any, default: int) -> int:
    if text in (None, ""):
        return default
    return max(int(x) for x in str(text).split(",") if x.strip())


def _clip_rate(run: dict[str, Any]) -> float | None:
    """The clip rate (fps) a fine-tuned model was trained at, so that a database or videos at another fps are
    strided to it: --frame-rate, else run_config.json's clip_rate, else (runs from before it was recorded) the
    training database's fps. None for a pre-training run: its features are taken at each database's own rate."""
    args = run.get("args", {})
    if args.get("frame_rate") is not None:
        return float(args["frame_rate"])
    if run.get("clip_rate") is not None:
        return float(run["clip_rate"])
    if "test_views" in run and args.get("data"):
        with contextlib.suppress(UsageError, OSError, KeyError, ValueError):
            return float(_manifest(args["data"])["fps"])
    return None


def derive_info(export: Path, data: str | Path | None = None) -> dict[str, Any]:
    """inference.json's fields from the run directory of `export` (run_config.json) and the database manifest.
    `data` replaces the run's evaluation database (and is enough without a run_config.json)."""
    config = json.loads((export / "config.json").read_text())
    run_config_path = export.parent / "run_config.json"
    run: dict[str, Any] = json.loads(run_config_path.read_text()) if run_config_path.is_file() else {}
    args = run.get("args", {})
    if data is None:
        data = args.get("eval_data") or args.get("data")
    if data is None:
        raise UsageError(
            f"{export} has no {INFO_FILE} and no run_config.json beside it ({run_config_path}); pass --data with the "
            "code database the model was evaluated on, or --model the run directory of the fine-tuning"
        )
    manifest = _manifest(data)
    views = run.get("test_views")
    if not views:
        from vimpac.finetune_data import evaluation_views

        views = evaluation_views(manifest["views"], manifest.get("dataset"), manifest.get("frame_size"))
    tokenizer = dict(manifest.get("tokenizer") or {})
    tokenizer["path"] = (manifest.get("args") or {}).get("tokenizer")
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "fps": float(manifest["fps"]),
        "frame_rate": _clip_rate(run),
        "frame_size": int(manifest["frame_size"]),
        "frame_selection": manifest.get("frame_selection") or DEFAULT_FRAME_SELECTION,
        "views": list(views),
        "num_clips": max(
            int(args.get("num_test_clips") or 1),
            _largest_count(args.get("last_test_clips"), int(args.get("num_test_clips") or 1)),
        ),
        "single_clip": args.get("single_clip") or "centre",
        "clip_len": int(config["clip_len"]),
        "classes": list(manifest.get("classes") or []),
        "dataset": manifest.get("dataset"),
        "database": str(data),
        "run": str(export.parent) if run else None,
    }


def write_inference_info(path: str | Path, data: str | Path | None = None) -> Path:
    """Derive and write <export>/inference.json for the export in `path` (an export or its run directory)."""
    from vimpac.checkpoint import export_folder

    export = export_folder(path, "--model")
    write_json_atomic(export / INFO_FILE, derive_info(export, data))
    return export / INFO_FILE


def inference_info(
    path: str | Path, data: str | Path | None = None, overrides: Mapping[str, Any] | None = None, save: bool = True
) -> dict[str, Any]:
    """The inference settings of the export in `path`: inference.json, else derived (derive_info) and, with
    `save`, written beside the export (best effort: a read-only export is left as it is). `data` forces the
    derivation from that database; `overrides` ({field: value}, None values ignored) win over both."""
    from vimpac.checkpoint import export_folder

    export = export_folder(path, "--model")
    file = export / INFO_FILE
    if file.is_file() and data is None:
        info = json.loads(file.read_text())
    else:
        info = derive_info(export, data)
        if save and data is None:
            with contextlib.suppress(OSError):  # a read-only export is left as it is
                write_json_atomic(file, info)
        elif file.is_file() and not (export.parent / "run_config.json").is_file():
            # Another database for an export whose run directory is gone: what the model was trained and
            # evaluated with still comes from the settings recorded beside it, not from defaults.
            recorded = json.loads(file.read_text())
            info.update({k: recorded[k] for k in MODEL_FIELDS if k in recorded})
    for key, value in (overrides or {}).items():
        if value is not None:
            info[key] = value
    missing = [k for k in FIELDS if k not in info]
    if missing:
        raise UsageError(f"{file}: missing {', '.join(missing)}; delete it to derive it again from the run directory")
    return info
