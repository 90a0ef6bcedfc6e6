"""Extraction: video files + annotations → code database (docs/design.md §3), in parallel, resumable, soft on bad input.

Decoding is the slow part, so it runs in `workers` processes (`decode_pool.DecodePool`) that each take one
video at a time and stream chunks of view frames `[V, n, S, S, 3]` back through shared memory (back-pressure
keeps memory flat however long a video is). The main process encodes frames in fixed-size batches on the chosen device,
collects each video's codes per view and hands finished videos to the database writer, which commits in
batches. Killed at any point, a rerun skips every video already complete in the database (or already recorded
as a failure) and produces the same database as an uninterrupted run: the tokenizers' codes do not depend on how
frames are batched. A rerun may bring other annotation files (testlist01 after trainlist01): their splits join
the earlier ones, a video whose file was missing and is found now is tried again, and a video already stored
with another label than the annotations now give is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from vimpac.code_db import CodeDatabaseWriter
from vimpac.devices import resolve_device
from vimpac.errors import UsageError, require_directory
from vimpac.tokenization.annotations import FORMATS, AnnotationSet, VideoEntry, load_annotations, read_class_list
from vimpac.tokenization.code_stream import Assembler, Failed, stream_codes
from vimpac.tokenization.decode import DEFAULT_FRAME_SELECTION, FRAME_RESIZE, FRAME_SELECTIONS
from vimpac.tokenization.decode_pool import DecodePool
from vimpac.tokenization.tokenizer import Tokenizer, load_tokenizer
from vimpac.tokenization.views import View, views_for

VIEW_KINDS = ("center", "test", "train")
# Datasets where left/right carries the label: no flipped training views (docs/reference.md §6.3).
NO_FLIP_DATASETS = ("ssv2",)


@dataclass
class ExtractConfig:
    """Everything `vimpac tokenize` needs; recorded in the manifest as the creation arguments."""

    videos: Path
    annotations: list[Path]
    format: str
    tokenizer: str
    out: Path
    fps: float
    frame_size: int
    views: str = "center"
    frame_selection: str = DEFAULT_FRAME_SELECTION
    workers: int = 2
    device: str = "cpu"
    encode_batch: int = 64
    fp16: bool = False
    chunk_frames: int = 32
    commit_every: int = 32
    strict: bool = False
    progress: bool = True
    classes: Path | None = None  # a class list file (annotations.read_class_list); None: the annotations' own
    extra: dict = field(default_factory=dict)


@dataclass
class ExtractSummary:
    out: Path
    tokenized: int  # videos written in this run
    skipped: int  # already complete (resume)
    failed: int  # new failures in this run
    frames: int  # frames encoded in this run (all views)
    seconds: float
    failures_by_reason: dict[str, int]  # every failure in the database, grouped by "stage: reason"
    total_videos: int  # videos in the database after this run
    total_failures: int

    @property
    def videos_per_s(self) -> float:
        return self.tokenized / max(self.seconds, 1e-9)

    @property
    def frames_per_s(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def validate(cfg: ExtractConfig) -> None:
    """Reject bad command-line input before any work starts (UsageError says what and how to fix)."""
    require_directory(cfg.out, "--out")
    resolve_device(cfg.device)
    if cfg.format not in FORMATS:
        raise UsageError(f"unknown --format {cfg.format!r}; choose one of: {', '.join(FORMATS)}")
    if cfg.frame_size <= 0 or cfg.frame_size % 8:
        raise UsageError(
            f"--frame-size {cfg.frame_size} is not a positive multiple of 8: the tokenizers downsample by 8 "
            "(use 128 or 256 as the paper)"
        )
    if not 0 < cfg.fps < math.inf:
        raise UsageError(f"--fps must be positive and finite, got {cfg.fps}")
    if cfg.frame_selection not in FRAME_SELECTIONS:
        raise UsageError(
            f"unknown --frame-selection {cfg.frame_selection!r}; choose one of: {', '.join(FRAME_SELECTIONS)}"
        )
    if cfg.views not in VIEW_KINDS:
        raise UsageError(f"unknown --views {cfg.views!r}; choose one of: {', '.join(VIEW_KINDS)}")
    if not cfg.videos.is_dir():
        raise UsageError(f"--videos {cfg.videos} is not a directory")
    if not cfg.annotations:
        raise UsageError("give at least one annotation file with --annotations")
    for path in cfg.annotations:
        if not path.is_file():
            raise UsageError(f"annotation file {path} does not exist")
    if cfg.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.fp16 and not str(cfg.device).startswith("cuda"):
        # The precision is part of the database's identity; off CUDA the tokenizers encode in fp32 whatever is asked.
        raise UsageError(f"--fp16 encodes under CUDA autocast only; drop it for --device {cfg.device}")
    for flag, value in (("--encode-batch", cfg.encode_batch), ("--commit-every", cfg.commit_every)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if cfg.chunk_frames < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {cfg.chunk_frames}")


def extraction_views(cfg: ExtractConfig) -> list[View]:
    return views_for(cfg.views, cfg.frame_size, hflip=cfg.format not in NO_FLIP_DATASETS)


# ---------------------------------------------------------------------------------------------------------------
# The run


def _manifest_base(cfg: ExtractConfig, annotations: AnnotationSet, tokenizer: Tokenizer, views: Sequence[View]):
    grid = cfg.frame_size // tokenizer.downsample
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "progress"}
    args["annotations"] = [str(p) for p in cfg.annotations]
    return {
        "dataset": annotations.dataset,
        "fps": cfg.fps,
        "frame_size": cfg.frame_size,
        "grid": [grid, grid],
        # precision is part of the tokenizer's identity: fp16 and fp32 codes differ at near-ties
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint,
            "fp16": cfg.fp16,
        },
        "views": [v.name for v in views],
        # how frames were picked and resized: databases made differently hold different frames (docs/design.md §3.2)
        "frame_selection": cfg.frame_selection,
        "resize": FRAME_RESIZE[cfg.frame_selection],
        "classes": list(annotations.classes),
        "args": args,
    }


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Tokenize every video of the annotation set into `cfg.out`; resumes a killed run. See module docstring."""
    validate(cfg)
    views = extraction_views(cfg)
    pinned = read_class_list(cfg.classes) if cfg.classes is not None else None
    annotations = load_annotations(cfg.format, cfg.annotations, cfg.videos, classes=pinned)
    entries: dict[str, VideoEntry] = {e.id: e for e in annotations.entries}
    start = time.monotonic()
    tokenized = failed = frames = 0
    # Started first, so the workers' start-up overlaps with loading the tokenizer.
    pool = DecodePool(cfg.workers, cfg.fps, views, cfg.frame_size, cfg.chunk_frames, cfg.frame_selection)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer, device=cfg.device, fp16=cfg.fp16)
        tokenizer.batch_size = cfg.encode_batch  # its fixed network batch: codes never depend on batch composition
        if cfg.frame_size % tokenizer.downsample:
            raise UsageError(
                f"--frame-size {cfg.frame_size} is not a multiple of the tokenizer's {tokenizer.downsample}"
            )
        manifest_base = _manifest_base(cfg, annotations, tokenizer, views)
        with CodeDatabaseWriter(cfg.out, manifest_base, commit_every=cfg.commit_every) as writer:
            _check_stored_labels(writer.labels(), annotations, cfg.out)
            # A video missing from disk in an earlier run and found now is tried again, and so is one whose
            # annotations were wrong and that these annotations list (problems still there are recorded afresh
            # below, with their reason of today).
            found = {vid for vid, entry in entries.items() if entry.path is not None}
            annotated = set(entries) | {problem.id for problem in annotations.problems}
            writer.forget_failures(
                f["id"]
                for f in writer.failures()
                if (f["stage"] == "locate" and f["id"] in found)
                or (f["stage"] == "annotation" and f["id"] in annotated)
            )
            done = writer.done_ids()
            skipped = sum(1 for e in annotations.entries if e.id in done)  # by earlier runs, before this one's problems
            for problem in annotations.problems:
                if problem.id not in done:
                    writer.add_failure(problem.id, problem.path, problem.stage, problem.reason)
                    done.add(problem.id)
                    failed += 1
            todo = [e for e in annotations.entries if e.id not in done and e.path is not None]
            if todo:
                t, f, frames = _run_pool(cfg, pool, views, tokenizer, todo, entries, writer)
                tokenized += t
                failed += f
            manifest = writer.finalize(annotations.splits())
    finally:
        pool.close()

    counts = manifest["counts"]
    return ExtractSummary(
        out=cfg.out,
        tokenized=tokenized,
        skipped=skipped,
        failed=failed,
        frames=frames,
        seconds=time.monotonic() - start,
        failures_by_reason=dict(counts["failures"]["by_reason"]),
        total_videos=int(counts["videos"]),
        total_failures=int(counts["failures"]["total"]),
    )


def _check_stored_labels(stored: dict[str, int], annotations: AnnotationSet, out: Path) -> None:
    """Refuse a rerun whose annotations give a video already in the database another label: its record keeps the
    label it was written with, and a silent mismatch would train on the old class."""
    changed = [(e.id, stored[e.id], e.label) for e in annotations.entries if stored.get(e.id, e.label) != e.label]
    if changed:
        names = list(annotations.classes)

        def name(label: int) -> str:
            return "unlabeled" if label < 0 else names[label]

        shown = "; ".join(f"{vid}: stored {name(old)}, annotated {name(new)}" for vid, old, new in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UsageError(
            f"{out} already holds {len(changed)} of these videos with another label ({shown}{more}); a record keeps "
            "the label it was tokenized with: tokenize into a new --out, or fix the annotations"
        )


def _run_pool(cfg, pool, views, tokenizer, todo, entries, writer) -> tuple[int, int, int]:
    """Decode `todo` in the pool's workers, encode and write; returns (tokenized, failed, frames encoded)."""
    assembler = Assembler(tokenizer, len(views), cfg.encode_batch)
    tokenized = failed = 0
    bar = tqdm(total=len(todo), unit="video", disable=not cfg.progress, desc="tokenize", dynamic_ncols=True)
    t0 = time.monotonic()
    try:
        for event in stream_codes(pool, assembler, [(entry.id, entry.path) for entry in todo]):
            entry = entries[event.id]
            if isinstance(event, Failed):
                writer.add_failure(event.id, str(entry.path), event.stage, event.reason)
                failed += 1
            else:
                codes = {view.name: codes for view, codes in zip(views, event.codes)}
                writer.add(event.id, codes, entry.label, event.duration, event.fps)
                tokenized += 1
            bar.update(1)
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(  # refresh=False: tqdm redraws at its own pace, not per video
                videos_s=f"{tokenized / elapsed:.2f}",
                frames_s=f"{assembler.encoded_frames / elapsed:.0f}",
                failed=failed,
                refresh=False,
            )
    finally:
        bar.close()
    return tokenized, failed, assembler.encoded_frames
