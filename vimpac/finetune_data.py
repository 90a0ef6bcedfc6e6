"""Fine-tuning data (docs/reference.md §6.3–6.6): split names, spatial views, train/test clips, view averaging.

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
  label_subset          the low-label regime (--labels-per-class N): min(N, available) training videos per class,
                        drawn per class from a generator of (seed, class) over the ids sorted, so the choice does
                        not depend on the database order, the worker count or the rank; never an evaluation video
  subset_repeats        passes over a small subset per epoch, so that an epoch fills at least one global batch

Datasets:
  FinetuneTrainClips    one random view and one random-start clip (at --frame-rate) per video and epoch, drawn
                        from a generator seeded by (seed, epoch, index): keys are (epoch, index) pairs from
                        vimpac.data.ResumableDistributedSampler; optionally on a label_subset of the split, seen
                        `repeats` times per epoch
  FinetuneTestClips     every test view × K uniformly spaced clips (vimpac.clip_windows.evaluation_starts; K = 1 is the
                        centre clip, or the first with single_clip="start", the original's and fine-tuning's
                        default): item i → tokens [V·K, T, h, w], view-major (view v, clip k at row v·K + k)
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

import os
import re
import sys
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vimpac.clip_windows import clip_slack, evaluation_clip_starts, take_clip
from vimpac.code_db import CodeDatabase, CorruptRecordError
from vimpac.data import (
    SAMPLING_STREAM,
    CodeClips,
    bad_record_fields,
    check_bad_record_mode,
    random_start,
    read_or_substitute,
    sample_rng,
    warn_bad_record,
)
from vimpac.errors import UsageError

SPLIT_ID_DATASETS = ("ucf101", "hmdb51")
NO_FLIP_DATASETS = ("ssv2",)
TEST_CROPS = ("top", "center", "bottom")
VIEW_NAME = re.compile(r"^r(?P<resize>\d+)_(?P<crop>[a-z]+)_f(?P<flip>[01])$")
# Stream tag of the label-subset draw: after vimpac.data's 0-2 and vimpac.knn's 3, so choosing the subset never
# shares a generator with the clip/view draws of the same seed.
LABEL_SUBSET_STREAM = 4
SHORT_CLASSES_LISTED = 10  # classes named in the few-labels warning; the rest are counted


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
    """Evaluation views (docs/reference.md §6.3): r<frame_size>_{top,center,bottom}_f0, or r<frame_size>_center_f0 alone
    for SSV2, in that order, those the database holds. A database with one view uses it; otherwise none of the wanted
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
    then the mean over views (docs/reference.md §6.6). Computed in float32."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, views, classes]; got shape {tuple(logits.shape)}")
    return F.softmax(logits.float(), dim=-1).mean(dim=1)


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


def label_subset(
    video_ids: Sequence[str],
    labels: Sequence[int],
    per_class: int,
    seed: int,
    *,
    eval_ids: Collection[str] = (),
) -> list[str]:
    """The training videos of the low-label regime: min(`per_class`, available) ids of every class, sorted.

    video_ids / labels: the training split, one label per id (any order; ids unique). Class c's videos are taken
    in id order and permuted by the generator of (seed, class c) (vimpac.data.sample_rng, LABEL_SUBSET_STREAM), the
    first min(N, n_c) kept: the result depends on the seed and the (id, label) pairs only, not on their order, the
    other classes, the worker or the rank, so every rank builds the same subset. `eval_ids`: the evaluation split;
    a chosen id among them (a database whose splits overlap) is a UsageError, so the evaluation never scores a
    video that was trained on. UsageError for per_class < 1; a class with fewer than N videos gives all it has
    (see few_labels_warning)."""
    if per_class < 1:
        raise UsageError(f"--labels-per-class must be >= 1 (videos per class); got {per_class}")
    if len(video_ids) != len(labels):
        raise ValueError(f"{len(video_ids)} video ids for {len(labels)} labels")
    if len(set(video_ids)) != len(video_ids):
        repeated = sorted(i for i, n in Counter(video_ids).items() if n > 1)
        raise ValueError(f"the training split lists videos more than once (e.g. {repeated[0]!r})")
    by_class: dict[int, list[str]] = {}
    for video, label in sorted(zip(video_ids, labels)):  # id order first: the database's order must not matter
        by_class.setdefault(int(label), []).append(video)
    chosen = []
    for label, members in sorted(by_class.items()):
        rng = sample_rng(seed, 0, label, LABEL_SUBSET_STREAM)  # per class: one class's size cannot shift another's
        chosen += [members[i] for i in rng.permutation(len(members))[:per_class]]
    chosen.sort()
    overlap = sorted(set(chosen).intersection(eval_ids))
    if overlap:
        raise UsageError(
            f"{len(overlap)} of the {len(chosen)} videos chosen by --labels-per-class are also in the evaluation "
            f"split (e.g. {overlap[0]!r}): this database's training and evaluation splits overlap, so its "
            "evaluation would score videos that were trained on; fix the splits (or choose others with "
            "--train-split / --eval-split)"
        )
    return chosen


def few_labels_warning(labels: Sequence[int], per_class: int, class_names: Sequence[str], split: str) -> str | None:
    """The warning line for the classes of `class_names` with fewer than `per_class` videos among `labels` (the
    training split's labels, one per video), which then train on all they have; None when every class has N."""
    counts = Counter(int(label) for label in labels)
    short = [(name, counts.get(c, 0)) for c, name in enumerate(class_names) if counts.get(c, 0) < per_class]
    if not short:
        return None
    listed = ", ".join(f"{name} ({n})" for name, n in short[:SHORT_CLASSES_LISTED])
    more = f" and {len(short) - SHORT_CLASSES_LISTED} more" if len(short) > SHORT_CLASSES_LISTED else ""
    return (
        f"warning: --labels-per-class {per_class}: {len(short)} of {len(class_names)} classes have fewer training "
        f"videos in split {split!r} and train on all they have: {listed}{more}"
    )


def shared_videos_warning(
    train_ids: Sequence[str], eval_ids: Sequence[str], train_split: str, eval_split: str
) -> str | None:
    """The warning line when videos are in both the training and the evaluation split (their scores are then not
    held-out scores); None when the splits are disjoint. Ids name videos across databases of one dataset."""
    shared = sorted(set(train_ids) & set(eval_ids))
    if not shared:
        return None
    named = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
    return (
        f"warning: {len(shared)} of {len(set(eval_ids))} evaluation videos (split {eval_split!r}) are also training "
        f"videos (split {train_split!r}), e.g. {named}: their accuracy is not held-out accuracy; evaluate on a "
        "split disjoint from the training one"
    )


def subset_repeats(videos: int, global_batch: int) -> int:
    """Passes over `videos` training videos per epoch: 1, or the fewest that fill one global batch (ranks × micro
    × accumulation videos) when the subset is smaller, so that an epoch takes at least one optimizer step (the
    sampler drops the tail that does not fill a batch). Each pass draws fresh views and clips."""
    if videos < 1 or global_batch < 1:
        raise ValueError(f"need videos >= 1 and global_batch >= 1; got {videos}, {global_batch}")
    return max(1, -(-global_batch // videos))


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
            f"(e.g. {bad[0][0]!r}, label {bad[0][1]}); fine-tuning and probing need a labeled split"
        )
    return ids, labels


def num_classes_of(db: CodeDatabase) -> int:
    classes = db.manifest.get("classes") or []
    if not classes:
        raise UsageError(f"{db.path} lists no classes; fine-tuning needs a labeled code database")
    return len(classes)


class FinetuneTrainClips(CodeClips):
    """One training clip per video: item (epoch, index) → {"tokens": int64 [T, h, w], "label", "index", "view" (its
    position in `views`), "start" (database frame)}.

    The view is drawn uniformly from `views`, then the start uniformly from the video's valid starts, both from
    the generator of (seed, epoch, index), so the sample does not depend on the worker or on a resume.

    `labels_per_class` N (the low-label regime): only label_subset(split, N, labels_seed (default `seed`),
    eval_ids) is trained on; `split_videos` keeps the split's size. `repeats` (default 1; the caller sets it,
    subset_repeats) makes the dataset that many passes over its videos: index i is video i mod len(ids), and the
    copies draw different views and clips because the generator follows i."""

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
        labels_per_class: int | None = None,
        labels_seed: int | None = None,
        eval_ids: Collection[str] = (),
    ):
        self.on_bad_record = check_bad_record_mode(on_bad_record)
        super().__init__(db, views, clip_len, pad_id, frame_rate)
        self.num_classes = num_classes_of(self.db)
        self.ids, self.labels = _labeled_ids(self.db, split, self.views, self.num_classes, self.on_bad_record)
        self.split_videos = len(self.ids)
        self.labels_per_class = labels_per_class
        self.labels_seed = seed if labels_seed is None else labels_seed
        if labels_per_class is not None:
            chosen = label_subset(self.ids, self.labels, labels_per_class, self.labels_seed, eval_ids=eval_ids)
            warning = few_labels_warning(self.labels, labels_per_class, self.db.manifest["classes"], split)
            if warning and os.environ.get("RANK", "0") == "0":  # every rank builds the set; one says so
                print(warning, file=sys.stderr, flush=True)
            label_of = dict(zip(self.ids, self.labels))
            self.ids, self.labels = chosen, [label_of[i] for i in chosen]
        self.repeats = 1
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        rng = sample_rng(self.seed, epoch, index, SAMPLING_STREAM)
        view = int(rng.integers(len(self.views)))
        video = index % len(self.ids)  # the repeats of a small subset (index < len(ids) without them)
        codes, label, bad = read_or_substitute(self.db, self.ids, video, self.views[view], self.on_bad_record)
        start = random_start(clip_slack(codes.shape[0], self.clip_len, self.stride), rng)
        tokens = take_clip(codes, start, self.clip_len, self.stride, self.pad_id)
        item = {"tokens": torch.from_numpy(tokens), "label": int(label), "index": index, "view": view, "start": start}
        if self.on_bad_record == "skip":
            item.update(bad_record_fields(bad))
        return item


SINGLE_CLIP_CHOICES = ("start", "centre")


class FinetuneTestClips(CodeClips):
    """Every test view × K clips of a video: item i → {"tokens": int64 [V·K, T, h, w] (row v·K + k: view v, clip
    k at evaluation_starts(delta, K)[k]), "label", "index"}. `labels` holds every label (known on every rank).
    `single_clip` places the one clip of K = 1: "centre" (evaluation_starts; the default here, which vimpac probe
    uses) or "start" (frame 0, as the original evaluated; vimpac/finetune.py's --single-clip default)."""

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
        single_clip: str = "centre",
    ):
        self.on_bad_record = check_bad_record_mode(on_bad_record)
        super().__init__(db, views, clip_len, pad_id, frame_rate)
        if num_clips < 1:
            raise UsageError(f"the number of test clips must be >= 1; got {num_clips}")
        if single_clip not in SINGLE_CLIP_CHOICES:
            raise UsageError(f"--single-clip must be one of {', '.join(SINGLE_CLIP_CHOICES)}; got {single_clip!r}")
        self.single_clip = single_clip
        self.num_classes = num_classes_of(self.db)
        self.class_names = list(self.db.manifest["classes"])
        skip = self.on_bad_record == "skip"
        ids, labels = _labeled_ids(self.db, split, self.views, self.num_classes, self.on_bad_record, check_all=skip)
        self.ids, self.labels = ids, torch.tensor(labels, dtype=torch.long)
        self.split, self.num_clips = split, num_clips

    def __len__(self) -> int:
        return len(self.ids)

    def starts(self, num_frames: int) -> list[int]:
        return evaluation_clip_starts(num_frames, self.clip_len, self.stride, self.num_clips, self.single_clip)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        clips, label = [], None
        for view in self.views:
            codes, label = self.db.read(self.ids[index], view)
            for start in self.starts(codes.shape[0]):
                clips.append(take_clip(codes, start, self.clip_len, self.stride, self.pad_id))
        return {"tokens": torch.from_numpy(np.stack(clips)), "label": int(label), "index": index}
