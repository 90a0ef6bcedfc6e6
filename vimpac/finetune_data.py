"""Fine-tuning data (vimpac-facts §5.3–§5.6): split names, spatial views, train/test clips, view averaging.

Pure pieces (tested directly):
  split_names           train/eval split of a dataset: train/val, or train_{k}/test_{k} for UCF101 and HMDB51
  training_views        the database views a training sample is drawn from: all of them (12: flip × 2 resizes ×
                        3 crops), without the flipped ones for SSV2 (left/right matters there: 6)
  evaluation_views      the evaluation views: no flip, the base resize (r<frame size>), crops top/center/bottom,
                        or the centre view alone for SSV2
  average_view_probabilities
                        logits [N, V, C] → softmax per view, probabilities averaged over the V views → [N, C]
  classification_metrics
                        top-1 / top-5 fractions, per-class accuracy, mean cross-entropy over views

Datasets:
  FinetuneTrainClips    one random view and one random-start clip (at --frame-rate) per video and epoch, drawn
                        from a generator seeded by (seed, epoch, index): keys are (epoch, index) pairs from
                        vimpac.data.ResumableDistributedSampler
  FinetuneTestClips     every test view × K uniformly spaced clips (vimpac.data.evaluation_starts; K = 1 is the
                        centre clip): item i → tokens [V·K, T, h, w], view-major (view v, clip k at row v·K + k)
Training and test views may live in different databases of the same videos (the demo writes a 6-view train
database and a 3-view test database); the split's video ids are looked up in each database separately.

Bad records (`on_bad_record`, vimpac.data): "stop" raises CorruptRecordError naming database, view and video.
"skip": a video whose record in the first view (read for its label at construction) is bad is left out of the
split, with a warning; in the training set a bad record met later, in another view, is replaced by the next
readable video (vimpac.data.read_or_substitute) and counted by the trainer; the test set checks every test view
of every video at construction (headers only) and leaves the bad videos out, so an evaluation never scores one
video's clips against another's label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vimpac.code_db import CodeDatabase, CorruptRecordError
from vimpac.data import (
    SAMPLING_STREAM,
    bad_record_fields,
    check_bad_record_mode,
    clip_slack,
    evaluation_starts,
    frame_stride,
    random_start,
    read_or_substitute,
    sample_rng,
    take_clip,
    warn_bad_record,
)
from vimpac.errors import UsageError

SPLIT_ID_DATASETS = ("ucf101", "hmdb51")
NO_FLIP_DATASETS = ("ssv2",)
KNOWN_DATASETS = ("ssv2", "diving48", "ucf101", "hmdb51", "kinetics400")
TEST_CROPS = ("top", "center", "bottom")
VIEW_NAME = re.compile(r"^r(?P<resize>\d+)_(?P<crop>[a-z]+)_f(?P<flip>[01])$")


def split_names(dataset: str | None, split_id: int | None = None) -> tuple[str, str]:
    """(train split, evaluation split) of a dataset: train_{k}/test_{k} for UCF101 and HMDB51 (--split-id k,
    1-3), train/val for the others (SSV2, Diving48, Kinetics-400, any labeled database)."""
    if dataset in SPLIT_ID_DATASETS:
        if split_id is None:
            split_id = 1
        if split_id not in (1, 2, 3):
            raise UsageError(f"--split-id must be 1, 2 or 3 for {dataset}; got {split_id}")
        return f"train_{split_id}", f"test_{split_id}"
    if split_id is not None:
        raise UsageError(f"--split-id applies to {' and '.join(SPLIT_ID_DATASETS)} only; {dataset} has train/val")
    return "train", "val"


def _parsed(view: str) -> dict[str, Any] | None:
    match = VIEW_NAME.match(view)
    if match is None:
        return None
    return {"resize": int(match["resize"]), "crop": match["crop"], "flip": match["flip"] == "1"}


def training_views(views: Sequence[str], dataset: str | None) -> list[str]:
    """Views a training sample is drawn from: all of `views`, minus the flipped ones (f1) for SSV2."""
    chosen = list(views)
    if dataset in NO_FLIP_DATASETS:
        chosen = [v for v in chosen if not (_parsed(v) or {}).get("flip", False)]
    if not chosen:
        raise UsageError(f"no training views among {list(views)} for {dataset} (its flipped views are excluded)")
    return chosen


def evaluation_views(views: Sequence[str], dataset: str | None, frame_size: int | None) -> list[str]:
    """Evaluation views (facts §5.3): r<frame_size>_{top,center,bottom}_f0, or r<frame_size>_center_f0 alone for
    SSV2, in that order, those the database holds. A database with one view uses it; otherwise none of the wanted
    views present is an error naming them (pass --test-views)."""
    crops = ("center",) if dataset in NO_FLIP_DATASETS else TEST_CROPS
    wanted = [f"r{frame_size}_{crop}_f0" for crop in crops]
    chosen = [v for v in wanted if v in views]
    if chosen:
        return chosen
    if len(views) == 1:
        return list(views)
    raise UsageError(
        f"the evaluation database has none of the test views {wanted} (its views: {', '.join(views)}); "
        "choose them with --test-views"
    )


def average_view_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V, C] (V views: spatial × temporal) → probabilities [N, C]: softmax over classes per view,
    then the mean over views (facts §5.6). Computed in float32."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, views, classes]; got shape {tuple(logits.shape)}")
    return F.softmax(logits.float(), dim=-1).mean(dim=1)


def view_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every view of every video: logits [N, V, C], labels [N] → scalar (float32)."""
    n, v, c = logits.shape
    return F.cross_entropy(logits.float().reshape(n * v, c), labels.long().repeat_interleave(v))


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """top1 / top5 (fractions of videos whose label is among the 1 / 5 most probable classes; top-5 with fewer
    than 5 classes is 1), per_class {name: accuracy or None without videos} and mean_class_accuracy (over the
    classes that have videos)."""
    if probs.shape[0] != labels.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"{probs.shape[0]} probability rows for {labels.shape[0]} labels")
    labels = labels.long().to(probs.device)
    ranked = probs.topk(min(5, probs.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    correct = hits[:, 0]
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(class_names):
        members = labels == index
        per_class[name] = float(correct[members].float().mean()) if bool(members.any()) else None
    present = [v for v in per_class.values() if v is not None]
    return {
        "top1": float(correct.float().mean()),
        "top5": float(hits.any(dim=1).float().mean()),
        "per_class": per_class,
        "mean_class_accuracy": float(np.mean(present)) if present else None,
    }


def _labeled_ids(
    db: CodeDatabase, split: str, views: Sequence[str], num_classes: int, on_bad_record: str = "stop", check_all=False
) -> tuple[list[str], list[int]]:
    """(ids, labels) of a labeled split, labels read from the first view. "skip" leaves out (with a warning) the
    videos whose first-view record is bad, and with `check_all` those with a bad record in any of `views`."""
    ids = db.ids(split)
    if not ids:
        raise UsageError(f"split {split!r} of {db.path} has no videos")
    kept, labels = [], []
    for video in ids:
        try:
            label = db.record(video, views[0]).label
            if check_all:
                for view in views[1:]:
                    db.validate(video, view)
        except CorruptRecordError as err:
            if on_bad_record != "skip":
                raise
            warn_bad_record(err.as_dict(), f"left out of split {split!r}")
            continue
        kept.append(video)
        labels.append(label)
    if not kept:
        raise UsageError(f"no video of split {split!r} in {db.path} can be read; the database is damaged, rebuild it")
    ids = kept
    bad = [(i, lab) for i, lab in zip(ids, labels) if not 0 <= lab < num_classes]
    if bad:
        raise UsageError(
            f"{len(bad)} videos of split {split!r} in {db.path} have no label in [0, {num_classes}) "
            f"(e.g. {bad[0][0]!r}, label {bad[0][1]}); fine-tuning needs a labeled split"
        )
    return ids, labels


def num_classes_of(db: CodeDatabase) -> int:
    classes = db.manifest.get("classes") or []
    if not classes:
        raise UsageError(f"{db.path} lists no classes; fine-tuning needs a labeled code database")
    return len(classes)


class FinetuneTrainClips(Dataset):
    """One training clip per video: item (epoch, index) → {"tokens": int64 [T, h, w], "label", "index", "view" (its
    position in `views`), "start" (database frame)}.

    The view is drawn uniformly from `views`, then the start uniformly from the video's valid starts, both from
    the generator of (seed, epoch, index), so the sample does not depend on the worker or on a resume."""

    def __init__(
        self,
        db: str | Path | CodeDatabase,
        split: str,
        clip_len: int,
        *,
        pad_id: int,
        views: Sequence[str],
        frame_rate: float | None = None,
        seed: int = 0,
        on_bad_record: str = "stop",
    ):
        self.on_bad_record = check_bad_record_mode(on_bad_record)
        self.db = db if isinstance(db, CodeDatabase) else CodeDatabase(db)
        self.views = list(views)
        unknown = [v for v in self.views if v not in self.db.views]
        if unknown or not self.views:
            raise UsageError(f"views {unknown or '[]'} are not in {self.db.path}; valid: {', '.join(self.db.views)}")
        self.num_classes = num_classes_of(self.db)
        self.ids, self.labels = _labeled_ids(self.db, split, self.views, self.num_classes, self.on_bad_record)
        self.clip_len, self.pad_id, self.seed = clip_len, pad_id, seed
        self.stride = frame_stride(float(self.db.manifest["fps"]), frame_rate)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        rng = sample_rng(self.seed, epoch, index, SAMPLING_STREAM)
        view = int(rng.integers(len(self.views)))
        codes, label, bad = read_or_substitute(self.db, self.ids, index, self.views[view], self.on_bad_record)
        start = random_start(clip_slack(codes.shape[0], self.clip_len, self.stride), rng)
        tokens = take_clip(codes, start, self.clip_len, self.stride, self.pad_id)
        item = {"tokens": torch.from_numpy(tokens), "label": int(label), "index": index, "view": view, "start": start}
        if self.on_bad_record == "skip":
            item.update(bad_record_fields(bad))
        return item


class FinetuneTestClips(Dataset):
    """Every test view × K clips of a video: item i → {"tokens": int64 [V·K, T, h, w] (row v·K + k: view v, clip
    k at evaluation_starts(delta, K)[k]), "label", "index"}. `labels` holds every label (known on every rank)."""

    def __init__(
        self,
        db: str | Path | CodeDatabase,
        split: str,
        clip_len: int,
        *,
        pad_id: int,
        views: Sequence[str],
        num_clips: int = 1,
        frame_rate: float | None = None,
        on_bad_record: str = "stop",
    ):
        self.on_bad_record = check_bad_record_mode(on_bad_record)
        self.db = db if isinstance(db, CodeDatabase) else CodeDatabase(db)
        self.views = list(views)
        unknown = [v for v in self.views if v not in self.db.views]
        if unknown or not self.views:
            raise UsageError(f"views {unknown or '[]'} are not in {self.db.path}; valid: {', '.join(self.db.views)}")
        if num_clips < 1:
            raise UsageError(f"the number of test clips must be >= 1; got {num_clips}")
        self.num_classes = num_classes_of(self.db)
        self.class_names = list(self.db.manifest["classes"])
        skip = self.on_bad_record == "skip"
        ids, labels = _labeled_ids(self.db, split, self.views, self.num_classes, self.on_bad_record, check_all=skip)
        self.ids, self.labels = ids, torch.tensor(labels, dtype=torch.long)
        self.split, self.clip_len, self.pad_id, self.num_clips = split, clip_len, pad_id, num_clips
        self.stride = frame_stride(float(self.db.manifest["fps"]), frame_rate)

    def __len__(self) -> int:
        return len(self.ids)

    def starts(self, num_frames: int) -> list[int]:
        return evaluation_starts(clip_slack(num_frames, self.clip_len, self.stride), self.num_clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        clips, label = [], None
        for view in self.views:
            codes, label = self.db.read(self.ids[index], view)
            for start in self.starts(codes.shape[0]):
                clips.append(take_clip(codes, start, self.clip_len, self.stride, self.pad_id))
        return {"tokens": torch.from_numpy(np.stack(clips)), "label": int(label), "index": index}
