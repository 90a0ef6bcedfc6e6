"""Clips of codes from a code database (docs/reference.md §3), pre-training samples, and a resumable sampler.

Clip windows (which frames a clip reads, test clip starts) are vimpac.clip_windows.

Randomness is a pure function of (seed, epoch, index): every sample draws from its own numpy Generator, so the
result does not depend on the worker that computes it, on prefetching, or on where a run was resumed.

Bad records (--on-bad-record): a record that is missing or does not decode raises vimpac.code_db's
CorruptRecordError naming the database, view and video ("stop", the default). With "skip" the next index
(wrapping around) whose record reads fine in the same view stands in, with the sample's own random draws, so the
substitution is deterministic too; the item then also carries `bad_records` (1 when its own video was bad, else
0) and `bad_record_log` (json list of the records that failed on the way), which the trainer counts
(data/bad_records) and reports (one warning line per bad record, rank 0) before the batch reaches the model.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from vimpac.clip_windows import clip_slack, frame_stride, take_clip
from vimpac.code_db import CodeDatabase, CorruptRecordError
from vimpac.errors import UsageError
from vimpac.masking import check_mask_config, mask_blocks

# Stream tags of the generators, so the clip/view draw, the two masks and the epoch order are independent.
SAMPLING_STREAM = 0
MASKING_STREAM = 1
ORDER_STREAM = 2

BAD_RECORD_MODES = ("stop", "skip")
# Extra item keys in "skip" mode (the trainer removes them from the batch).
BAD_RECORDS_KEY = "bad_records"
BAD_RECORD_LOG_KEY = "bad_record_log"


# ------------------------------------------------------------------------------------------------ bad records


def check_bad_record_mode(mode: str) -> str:
    if mode not in BAD_RECORD_MODES:
        raise UsageError(f"--on-bad-record must be one of {', '.join(BAD_RECORD_MODES)}; got {mode!r}")
    return mode


def read_or_substitute(
    db: CodeDatabase, ids: Sequence[str], index: int, view: str, mode: str
) -> tuple[np.ndarray, int, list[dict[str, str | None]]]:
    """(codes, label, bad) of ids[index] in `view`. "stop": a missing or undecodable record raises
    CorruptRecordError (naming database, view, id). "skip": the next index, wrapping around, whose record reads
    fine stands in; `bad` lists every record that failed on the way (CorruptRecordError.as_dict), [] when
    ids[index] itself was read. CorruptRecordError when no record of `ids` can be read in `view`."""
    if mode != "skip":
        codes, label = db.read(ids[index], view)
        return codes, label, []
    bad = []
    for offset in range(len(ids)):
        try:
            codes, label = db.read(ids[(index + offset) % len(ids)], view)
        except CorruptRecordError as err:
            bad.append(err.as_dict())
            continue
        return codes, label, bad
    raise CorruptRecordError(
        f"code database {db.path}: none of the {len(ids)} videos can be read in view {view!r} (e.g. {bad[0]['id']!r}: "
        f"{bad[0]['reason']}); the database is damaged, rebuild it",
        db.path,
        view,
        bad[0]["id"],
        bad[0]["reason"],
    )


def bad_record_line(entry: Mapping[str, Any], action: str) -> str:
    """One warning line for a skipped record (an entry of CorruptRecordError.as_dict)."""
    return (
        f"warning: code database {entry['path']}: video {entry['id']!r} in view {entry['view']!r} cannot be read "
        f"({entry['reason']}); {action} (--on-bad-record skip)"
    )


_WARNED: set[tuple[Any, ...]] = set()


def warn_bad_record(entry: Mapping[str, Any], action: str) -> None:
    """Print `bad_record_line` once per record and action in this process, on rank 0 only (RANK from the
    launcher: datasets are built before the process group exists)."""
    key = (entry["path"], entry["view"], entry["id"], action)
    if key not in _WARNED and os.environ.get("RANK", "0") == "0":
        _WARNED.add(key)
        print(bad_record_line(entry, action), file=sys.stderr, flush=True)


def bad_record_fields(bad: list[dict[str, str | None]]) -> dict[str, Any]:
    """The extra item keys of "skip" mode: whether the item's own video was replaced, and the failures (json)."""
    return {BAD_RECORDS_KEY: int(bool(bad)), BAD_RECORD_LOG_KEY: json.dumps(bad)}


# ------------------------------------------------------------------------------------------ sampling


def random_start(delta: int, rng: np.random.Generator) -> int:
    """Uniform start in [0, delta]."""
    return int(rng.integers(0, delta + 1))


def pair_starts(delta: int, rng: np.random.Generator, relevance_range: int | None = None) -> tuple[int, int]:
    """Starts of the two positive clips: s1 uniform on [0, delta]; s2 uniform on the whole video (None, the
    paper's d_max = ∞) or on [clamp(s1 - R), clamp(s1 + R)] with clamp to [0, delta] (R in database frames)."""
    s1 = random_start(delta, rng)
    if relevance_range is None:
        return s1, random_start(delta, rng)
    lo, hi = max(s1 - relevance_range, 0), min(s1 + relevance_range, delta)
    return s1, int(rng.integers(lo, hi + 1))


def sample_rng(seed: int, epoch: int, index: int, stream: int, clip: int = 0) -> np.random.Generator:
    """The generator of one sample: a function of (seed, epoch, index, stream, clip) only. The entropy list has
    a fixed length on purpose: SeedSequence ignores trailing zeros, so [s, e, i] and [s, e, i, 0] would collide."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, stream, clip])))


# --------------------------------------------------------------------------------------------- pre-training


class CodeClips(Dataset):
    """What every clip dataset opens and checks: the code database, the `views` it reads (default all), the clip
    length T, the PAD id for short videos, and the frame stride for `frame_rate` (None: the database's fps).
    Bad values raise UsageError naming what is valid."""

    def __init__(
        self,
        db: str | Path | CodeDatabase,
        views: Sequence[str] | None,
        clip_len: int,
        pad_id: int,
        frame_rate: float | None,
    ) -> None:
        self.db = db if isinstance(db, CodeDatabase) else CodeDatabase(db)
        self.views = list(views) if views is not None else list(self.db.views)
        unknown = [v for v in self.views if v not in self.db.views]
        if unknown or not self.views:
            raise UsageError(
                f"views {unknown or '[]'} are not in {self.db.path}; valid views: {', '.join(self.db.views)}"
            )
        if clip_len < 1:
            raise UsageError(f"--clip-len must be >= 1, got {clip_len}")
        self.clip_len, self.pad_id = clip_len, pad_id
        self.stride = frame_stride(float(self.db.manifest["fps"]), frame_rate)

    def describe_clips(self) -> str:
        """One log line: what a clip covers ("clips of 5 frames at 2 fps (1 in 8 frames of 16 fps) = 2.5 s")."""
        fps = float(self.db.manifest["fps"])
        rate = fps / self.stride
        source = f" (1 in {self.stride} frames of {fps:g} fps)" if self.stride > 1 else ""
        return f"clips of {self.clip_len} frames at {rate:g} fps{source} = {self.clip_len / rate:g} s"

    def split_ids(self, split: str | None) -> list[str]:
        """The ids of `split` (None: every video); UsageError when it has none."""
        ids = self.db.ids(split)
        if not ids:
            raise UsageError(f"split {split!r} of {self.db.path} has no videos")
        return ids


class PretrainClips(CodeClips):
    """Two masked clips of the same video and view per sample (docs/reference.md §3, §5.1–5.2).

    Item key: an index, or an (epoch, index) pair as yielded by `ResumableDistributedSampler` (so the masks follow
    the epoch even in persistent workers, which never see `set_epoch` on the parent's copy). An item is
      inputs  int64 [2, T, h, w]  codes with MASK (or noise) at masked positions and PAD after short videos,
      labels  int64 [2, T, h, w]  original codes at masked non-PAD positions, IGNORE_INDEX (-100) elsewhere,
      label   int                 the video's class (-1 unlabeled),
      index   int                 the dataset index.
    `views` are the database views to draw from (one per sample, uniformly; default all). `frame_rate` None
    keeps the database's fps. `relevance_range` bounds the start distance of the two clips in database frames.
    pad_id / mask_id come from the model config and must lie outside the codes [0, vocab_size).
    `on_bad_record` ("stop" or "skip"): what a missing or undecodable record does (module docstring).
    """

    def __init__(
        self,
        db: str | Path | CodeDatabase,
        split: str | None,
        clip_len: int,
        *,
        pad_id: int,
        mask_id: int,
        mask_blocks: int,
        frame_rate: float | None = None,
        views: Sequence[str] | None = None,
        rand_replace: bool = False,
        relevance_range: int | None = None,
        seed: int = 0,
        mlm_weight: float = 1.0,
        on_bad_record: str = "stop",
    ):
        self.on_bad_record = check_bad_record_mode(on_bad_record)
        super().__init__(db, views, clip_len, pad_id, frame_rate)
        self.vocab_size = int(self.db.manifest["tokenizer"]["vocab_size"])
        for name, value in (("pad_id", pad_id), ("mask_id", mask_id)):
            if 0 <= value < self.vocab_size:
                raise UsageError(
                    f"{name} {value} collides with the database's codes [0, {self.vocab_size}); the model config's "
                    f"vocab_size must equal the tokenizer's ({self.vocab_size})"
                )
        if relevance_range is not None and relevance_range < 0:
            raise UsageError(f"--nce-relevance-range must be >= 0 frames, got {relevance_range}")
        if seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}")
        check_mask_config(mask_blocks, mlm_weight)
        self.ids = self.split_ids(split)
        self.mask_id = mask_id
        self.mask_blocks, self.rand_replace = mask_blocks, rand_replace
        self.relevance_range = relevance_range
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer keys (the sampler's (epoch, index) keys override it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        rng = sample_rng(self.seed, epoch, index, SAMPLING_STREAM)
        view = self.views[int(rng.integers(len(self.views)))]
        codes, label, bad = read_or_substitute(self.db, self.ids, index, view, self.on_bad_record)
        delta = clip_slack(codes.shape[0], self.clip_len, self.stride)
        starts = pair_starts(delta, rng, self.relevance_range)
        inputs, labels = [], []
        for clip, start in enumerate(starts):
            tokens = take_clip(codes, start, self.clip_len, self.stride, self.pad_id)
            masked, target = mask_blocks(
                tokens,
                self.mask_blocks,
                sample_rng(self.seed, epoch, index, MASKING_STREAM, clip),
                pad_id=self.pad_id,
                mask_id=self.mask_id,
                vocab_size=self.vocab_size,
                rand_replace=self.rand_replace,
            )
            inputs.append(masked)
            labels.append(target)
        item = {
            "inputs": torch.from_numpy(np.stack(inputs)),
            "labels": torch.from_numpy(np.stack(labels)),
            "label": int(label),
            "index": index,
        }
        if self.on_bad_record == "skip":
            item.update(bad_record_fields(bad))
        return item


# ------------------------------------------------------------------------------------------------- sampler


class ResumableDistributedSampler(Sampler):
    """Shards a dataset over ranks with a seeded per-epoch shuffle, and resumes mid-epoch with the same order.

    Epoch e's global order is a permutation seeded by (seed, e) (identity without shuffle). After `consumed`
    samples of the epoch (counted over all ranks) the remaining order is dealt round-robin: rank r takes
    positions consumed + r, consumed + r + world, ... With drop_last (default) every rank gets the same count
    and the tail that does not fill a round is dropped; without it the tail wraps around to the epoch's start.
    Resuming with the same world size reproduces exactly the samples the interrupted run would have seen.

    Yields (epoch, index) keys for `PretrainClips`. rank / world_size default to torch.distributed's when it is
    initialised, else 0 / 1. The trainer tracks `consumed` (micro-steps × micro-batch × world): the DataLoader
    prefetches, so what this sampler has yielded is not what was trained on.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if rank is None or world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if initialised else 0) if rank is None else rank
            world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if num_samples < world_size and drop_last:
            raise UsageError(f"{num_samples} samples cannot feed {world_size} ranks with drop_last; use fewer ranks")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Start epoch `epoch`, skipping the first `consumed` samples of its global order (all ranks)."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples}], got {consumed}")
        self.epoch, self.consumed = epoch, consumed

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of epoch `epoch`: int64 [num_samples]."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return sample_rng(self.seed, epoch, 0, ORDER_STREAM).permutation(self.num_samples)

    def _indices(self) -> np.ndarray:
        remaining = self.epoch_order(self.epoch)[self.consumed :]
        if self.drop_last:
            remaining = remaining[: len(remaining) // self.world_size * self.world_size]
        else:
            short = -len(remaining) % self.world_size
            remaining = np.concatenate([remaining, np.resize(self.epoch_order(self.epoch), short)])
        return remaining[self.rank :: self.world_size]

    def __len__(self) -> int:
        remaining = self.num_samples - self.consumed
        return remaining // self.world_size if self.drop_last else -(-remaining // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in self._indices()])

    def state_dict(self, consumed: int) -> dict[str, int]:
        """What to checkpoint: the epoch, the samples of it already trained on (all ranks), and the data identity."""
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at state's epoch and position; refuses a different dataset size or seed (the order would differ)."""
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise UsageError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, this run "
                    f"{getattr(self, key)}; resume with the same data and seed"
                )
        self.set_epoch(int(state["epoch"]), int(state["consumed"]))
