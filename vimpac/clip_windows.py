"""Clip windows, all in database frames: the arithmetic shared by training, evaluation and inference.

A video has n frames at the database's fps; a clip takes T frames, one every r = db_fps / frame_rate frames. The
clip starting at `start` reads frames start, start + r, ..., start + (T - 1)·r. Valid starts are 0..delta with
delta = max(n + r - 1 - T·r, 0) (the "+ r - 1" lets the last frame be reached); a video shorter than the window
gets delta = 0 and its clip is right-padded with PAD. Test clips start at `evaluation_clip_starts`.

numpy only (no torch), so that decode workers can import it cheaply: they apply EvaluationFrames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vimpac.errors import UsageError


def frame_stride(db_fps: float, frame_rate: float | None) -> int:
    """Frames of the database between two clip frames: db_fps / frame_rate, which must be a whole number >= 1.
    frame_rate None means the database's own rate (stride 1)."""
    if frame_rate is None:
        return 1
    if not 0 < frame_rate < math.inf:
        raise UsageError(f"--frame-rate must be positive and finite, got {frame_rate}")
    ratio = db_fps / frame_rate
    stride = round(ratio)
    if stride < 1 or not math.isclose(ratio, stride, rel_tol=0, abs_tol=1e-6):
        divisors = [db_fps / k for k in range(1, int(db_fps) + 1) if float(db_fps / k).is_integer()]
        raise UsageError(
            f"--frame-rate {frame_rate} does not divide the database's {db_fps} fps (ratio {ratio:.4g}); clips take "
            f"every r-th stored frame, so use a rate with a whole ratio, e.g. one of {divisors}, or tokenize the "
            "videos at a multiple of the wanted rate"
        )
    return stride


def clip_rate(db_fps: float, frame_rate: float | None) -> float:
    """Frames per second of a clip: --frame-rate, else the database's own fps (stride 1)."""
    return float(db_fps if frame_rate is None else frame_rate)


def check_same_clip_rate(train_fps: float, eval_fps: float, frame_rate: float | None) -> float:
    """The clip rate shared by training and evaluation; UsageError when the two databases' fps give clips of
    different rates (no --frame-rate: each database's clips run at its own fps, so one clip spans other seconds)."""
    train, held_out = clip_rate(train_fps, frame_rate), clip_rate(eval_fps, frame_rate)
    if math.isclose(train, held_out, rel_tol=1e-9):
        return train
    common = (
        math.gcd(int(train_fps), int(eval_fps)) if float(train_fps).is_integer() and float(eval_fps).is_integer() else 0
    )
    hint = (
        f"pass --frame-rate {common} (it divides both) or " if common else "pass a --frame-rate that divides both, or "
    )
    raise UsageError(
        f"the training database holds {train_fps:g} fps and the evaluation database {eval_fps:g} fps: without "
        f"--frame-rate each one's clips run at its own rate, so a clip of the same length spans other seconds; "
        f"{hint}tokenize both at one --fps"
    )


def window_span(clip_len: int, stride: int) -> int:
    """Database frames spanned by a clip window: T·r."""
    return clip_len * stride


def clip_slack(num_frames: int, clip_len: int, stride: int) -> int:
    """delta = max(n + r - 1 - T·r, 0): the largest valid start (0 for a video shorter than the window)."""
    return max(num_frames + stride - 1 - window_span(clip_len, stride), 0)


def clip_frame_indices(start: int, clip_len: int, stride: int, num_frames: int) -> np.ndarray:
    """Database frames read by the clip at `start`: start + r·k for k < T, keeping those < n (the rest is PAD)."""
    idx = start + stride * np.arange(clip_len)
    return idx[idx < num_frames]


def take_clip(codes: np.ndarray, start: int, clip_len: int, stride: int, pad_id: int) -> np.ndarray:
    """Clip of codes [n, h, w] -> int64 [T, h, w], right-padded along time with pad_id."""
    idx = clip_frame_indices(start, clip_len, stride, codes.shape[0])
    clip = np.full((clip_len, *codes.shape[1:]), pad_id, dtype=np.int64)
    clip[: len(idx)] = codes[idx]
    return clip


def evaluation_starts(delta: int, num_clips: int) -> list[int]:
    """K uniformly spread test starts: int(delta·k / (K - 1)), k = 0..K-1, so the first and last clips touch the video's
    ends. For K = 1 the clip is centred (delta // 2); the original put it at the start (docs/reference.md §8.6)."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if num_clips == 1:
        return [delta // 2]
    return [int(delta * k / (num_clips - 1)) for k in range(num_clips)]


def evaluation_clip_starts(num_frames: int, clip_len: int, stride: int, num_clips: int, single_clip: str) -> list[int]:
    """Starts of the K test clips of a video of `num_frames` frames: evaluation_starts, except that the one clip of
    K = 1 starts at frame 0 when `single_clip` is "start" (the original's choice; "centre" keeps delta // 2)."""
    if num_clips == 1 and single_clip == "start":
        return [0]
    return evaluation_starts(clip_slack(num_frames, clip_len, stride), num_clips)


@dataclass(frozen=True)
class EvaluationFrames:
    """Which frames of a video the K test clips read, as a function of its frame count: calling it with n gives
    the sorted frame indices. Decoding for inference encodes only these (vimpac.tokenization.decode's
    planned_view_frames); picklable, so decode workers can apply it."""

    clip_len: int
    stride: int
    num_clips: int
    single_clip: str

    def __call__(self, num_frames: int) -> list[int]:
        starts = evaluation_clip_starts(num_frames, self.clip_len, self.stride, self.num_clips, self.single_clip)
        read = (clip_frame_indices(s, self.clip_len, self.stride, num_frames) for s in starts)
        return sorted(set(np.concatenate(list(read)).tolist()))
