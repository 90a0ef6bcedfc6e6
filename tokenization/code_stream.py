"""Video files → codes per view, streamed: decoding in a DecodePool's worker processes, encoding in this process.

The encoder's batches are filled with frames of several videos at once, so the device stays busy while each
worker decodes one video. The tokenizer runs at its fixed network batch (a partial batch is padded to it), so a
frame's codes never depend on which other frames share its batch: streamed codes equal those of encoding each
video alone. Used by `vimpac tokenize` (vimpac.tokenization.extract: into a code database) and by `vimpac
predict` / `vimpac embed` (vimpac.inference_stream: into the model).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vimpac.tokenization.decode_pool import DecodePool
from vimpac.tokenization.tokenizer import Tokenizer

DRAIN_MAX = 256  # messages taken in one round at most
BACKLOG_BATCHES = 4  # encoder batches of frames waiting, beyond which a round encodes all of them


@dataclass(frozen=True)
class Encoded:
    """A video, encoded: codes int64 [m, h, w] per view (in the pool's view order) of the frames `frame_indices`
    (sorted) of its `num_frames`, or of every frame (m = num_frames) when `frame_indices` is None (a pool
    without a plan)."""

    id: str
    codes: list[np.ndarray]
    duration: float  # seconds, as the container declares it
    fps: float  # the source's frame rate
    num_frames: int
    frame_indices: list[int] | None = None


def full_codes(codes: Sequence[np.ndarray], num_frames: int, indices: Sequence[int] | None) -> list[np.ndarray]:
    """[num_frames, h, w] per view from the codes [m, h, w] of the frames `indices` (None: of every frame), -1 at
    the frames that were not encoded, so that reading one fails loudly (an embedding lookup of -1) instead of
    passing for a code."""
    if indices is None:
        return list(codes)
    full = []
    for view_codes in codes:
        view = np.full((num_frames, *view_codes.shape[1:]), -1, dtype=view_codes.dtype)
        view[list(indices)] = view_codes
        full.append(view)
    return full


@dataclass(frozen=True)
class Failed:
    """A video that could not be used, with the failure kinds of `vimpac tokenize`'s failures.jsonl."""

    id: str
    stage: str
    reason: str


class Assembler:
    """Collects frames per video and view, encodes them in batches, and hands out finished videos.

    Frames wait in a queue of (video_id, view index, frames [n, S, S, 3]); `encode_ready` encodes whole batches
    of `batch` frames (and the rest when `flush`), appending codes per (video, view).
    """

    def __init__(self, tokenizer: Tokenizer, num_views: int, batch: int):
        self.tokenizer = tokenizer
        self.num_views = num_views
        self.batch = batch
        self.pending: list[tuple[str, int, np.ndarray]] = []
        self.pending_frames = 0
        self.codes: dict[str, list[list[np.ndarray]]] = {}
        self.waiting: dict[str, int] = {}  # frames not yet encoded, per video
        self.finished: dict[str, tuple] = {}  # decode done: duration, fps, frame count, frame indices or None
        self.encoded_frames = 0

    def add_chunk(self, video_id: str, frames: np.ndarray) -> None:
        """frames: uint8 [V, n, S, S, 3]."""
        self.codes.setdefault(video_id, [[] for _ in range(self.num_views)])
        for v in range(self.num_views):
            self.pending.append((video_id, v, frames[v]))
        self.pending_frames += frames.shape[0] * frames.shape[1]
        self.waiting[video_id] = self.waiting.get(video_id, 0) + frames.shape[0] * frames.shape[1]

    def finish(
        self, video_id: str, duration: float, fps: float, num_frames: int, indices: list[int] | None = None
    ) -> None:
        self.codes.setdefault(video_id, [[] for _ in range(self.num_views)])
        self.waiting.setdefault(video_id, 0)
        self.finished[video_id] = (duration, fps, num_frames, indices)

    def drop(self, video_id: str) -> None:
        self.pending = [p for p in self.pending if p[0] != video_id]
        self.pending_frames = sum(p[2].shape[0] for p in self.pending)
        for table in (self.codes, self.waiting, self.finished):
            table.pop(video_id, None)

    def encode_ready(self, flush: bool = False, batches: int | None = None) -> None:
        """Encode the full batches waiting (at most `batches` of them), and with `flush` the rest too."""
        done = 0
        while (self.pending_frames >= self.batch or (flush and self.pending_frames)) and done != batches:
            done += 1
            take, taken = [], 0
            while self.pending and taken < self.batch:
                video_id, v, frames = self.pending[0]
                room = self.batch - taken
                if frames.shape[0] <= room:
                    self.pending.pop(0)
                else:
                    self.pending[0] = (video_id, v, frames[room:])
                    frames = frames[:room]
                take.append((video_id, v, frames))
                taken += frames.shape[0]
            codes = self.tokenizer.encode(np.concatenate([f for _, _, f in take])).cpu().numpy()
            start = 0
            for video_id, v, frames in take:
                n = frames.shape[0]
                self.codes[video_id][v].append(codes[start : start + n])
                self.waiting[video_id] -= n
                start += n
            self.pending_frames -= taken
            self.encoded_frames += taken

    def complete(self) -> list[Encoded]:
        """Videos whose decoding finished and whose frames are all encoded."""
        done = [vid for vid in self.finished if self.waiting.get(vid, 0) == 0]
        out = []
        for video_id in done:
            duration, fps, num_frames, indices = self.finished.pop(video_id)
            per_view = [np.concatenate(parts) for parts in self.codes.pop(video_id)]
            self.waiting.pop(video_id, None)
            out.append(Encoded(video_id, per_view, duration, fps, num_frames, indices))
        return out


def stream_codes(
    pool: DecodePool, assembler: Assembler, todo: Sequence[tuple[str, str | Path]]
) -> Iterator[Encoded | Failed]:
    """Decode every (video_id, path) of `todo` in `pool`'s workers and encode it with `assembler`; yield one
    Encoded or Failed per video, in the order they finish, until every video is accounted for. A worker that
    dies costs the video it held (Failed, stage "decode") and is restarted."""
    outstanding = decoding = len(todo)  # videos not yet yielded / not yet fully decoded
    for video_id, path in todo:
        pool.submit(video_id, Path(path))
    while outstanding:
        failed: list[Failed] = []
        try:
            messages = [pool.get(timeout=0.5)]
        except queue.Empty:  # decoders are slow or stuck: encode what waits, look for crashed workers
            assembler.encode_ready(flush=True)
            messages = []
            for video_id, reason in pool.crashed():
                decoding -= 1
                failed.append(Failed(video_id, "decode", reason))
        # Take every chunk that is ready before encoding or handing videos on: a worker whose slots are all taken
        # waits, and what comes next (an encoder batch, the caller's model) keeps this loop away for a while.
        while messages and len(messages) < DRAIN_MAX:
            try:
                messages.append(pool.get(timeout=0))
            except queue.Empty:
                break
        for msg in messages:
            kind, video_id = msg[0], msg[1]
            if kind == "start":
                pool.current[msg[2]] = video_id
            elif kind == "chunk":
                frames = pool.take(msg[2])
                if frames is not None:
                    assembler.add_chunk(video_id, frames)
            else:  # "done" or "fail": the worker is free again
                pool.current = {w: v for w, v in pool.current.items() if v != video_id}
                decoding -= 1
                if kind == "done":
                    assembler.finish(video_id, *msg[2:])
                else:
                    failed.append(Failed(video_id, msg[2], msg[3]))
        if messages:
            # Full batches only while decoders still produce: a padded partial batch costs a full one. One batch a
            # round while the backlog is short, so slots go back to the workers between batches; all of it when
            # it is long, which holds the workers (memory stays bounded).
            backlog = assembler.pending_frames >= BACKLOG_BATCHES * assembler.batch
            assembler.encode_ready(flush=decoding == 0, batches=None if decoding == 0 or backlog else 1)
        for bad in failed:
            assembler.drop(bad.id)
        for event in [*failed, *assembler.complete()]:
            outstanding -= 1
            yield event
