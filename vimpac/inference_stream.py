"""Many videos through a VideoPipeline at once: what `vimpac predict` and `vimpac embed` run.

    items = [(str(i), path) for i, path in enumerate(paths)]
    for result in run_videos(pipeline, file_codes(pipeline, items, workers=4), "probabilities"):
        result.id, result.source, result.probabilities  # or result.failure

Stages:
  codes   file_codes: `workers` decode processes (vimpac.tokenization.code_stream, the pool `vimpac tokenize`
          uses) feed the tokenizer batches of frames drawn from several videos; workers 0 decodes and encodes in
          this process, one video after another (VideoPipeline.codes). database_codes reads a code database.
  clips   VideoPipeline.clips: the evaluation clips of each video (test views × K)
  model   run_videos: one forward pass per `pipeline.clips_per_forward` clips, from as many videos as fit
Decode workers start from a fork server, which imports the main module: a script that calls file_codes with
workers > 0 must do so under `if __name__ == "__main__":` (the `vimpac` command does). Results come in the order
of `items`, one per video, with the failure of a video that could not be used (the
failure kinds of `vimpac tokenize`) in place of its outputs. The tokenizer encodes at its fixed network batch and
the model sees each clip alone, so a video's result does not depend on the other videos beside it: it equals
VideoPipeline.probabilities / features_of on that video within floating-point rounding of the batched matmuls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vimpac.inference import DEFAULT_ENCODE_BATCH, VideoPipeline, failure

# (id, source, codes per view [n, h, w] or the failure {video, stage, reason})
Codes = tuple[str, str, list[np.ndarray] | dict[str, str]]
OUTPUTS = ("probabilities", "features")


@dataclass
class VideoResult:
    """One video's outputs: probabilities [C] (float32) or features (float32 [D], or [V·K, D] per clip), or why it
    could not be used ({video, stage, reason})."""

    id: str
    source: str
    probabilities: torch.Tensor | None = None
    features: np.ndarray | None = None
    failure: dict[str, str] | None = None


def file_codes(
    pipeline: VideoPipeline, items: Sequence[tuple[str, str | Path]], workers: int, every_frame: bool = False
) -> Iterator[Codes]:
    """Codes per test view of each (id, path) of `items`, in the order of `items`: decoded in `workers`
    processes (at most one per video) and encoded in shared batches, or in this process when `workers` is 0.
    Only the frames the evaluation clips read are encoded (the others hold -1; VideoPipeline.codes) unless
    `every_frame`."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}")
    if workers == 0:
        for video_id, path in items:
            try:
                yield video_id, str(path), pipeline.codes(path, every_frame)
            except Exception as err:  # one bad video costs itself, not the run
                yield video_id, str(path), failure(path, err)
        return
    from vimpac.tokenization.code_stream import Assembler, Encoded, full_codes, stream_codes
    from vimpac.tokenization.decode_pool import DecodePool

    tokenizer = pipeline.tokenizer  # loaded (and checked) before any worker starts
    views, size = pipeline.views, pipeline.frame_size
    plan = None if every_frame else pipeline.evaluation_frames
    pool = DecodePool(
        min(workers, len(items)), pipeline.fps, views, size, DEFAULT_ENCODE_BATCH, pipeline.frame_selection, plan
    )
    try:
        # The pool knows videos by their position, so the same file listed twice is two videos.
        assembler = Assembler(tokenizer, len(views), tokenizer.batch_size)
        ready: dict[int, list[np.ndarray] | dict[str, str]] = {}
        position = 0
        for event in stream_codes(pool, assembler, [(str(i), path) for i, (_, path) in enumerate(items)]):
            index = int(event.id)
            if isinstance(event, Encoded):
                ready[index] = full_codes(event.codes, event.num_frames, event.frame_indices)
            else:
                ready[index] = {"video": str(items[index][1]), "stage": event.stage, "reason": event.reason}
            while position in ready:  # hand them on in input order
                video_id, path = items[position]
                yield video_id, str(path), ready.pop(position)
                position += 1
    finally:
        pool.close()


def database_codes(db, views: Sequence[str], ids: Iterable[str]) -> Iterator[Codes]:
    """Codes of `views` of each video `ids` of the code database `db` (vimpac.code_db.CodeDatabase)."""
    for video_id in ids:
        try:
            yield video_id, video_id, [db.read(video_id, view)[0] for view in views]
        except Exception as err:
            yield video_id, video_id, {"video": video_id, "stage": "read", "reason": f"{type(err).__name__}: {err}"}


def run_videos(
    pipeline: VideoPipeline, codes: Iterable[Codes], output: str, feature: str = "cls", per_clip: bool = False
) -> Iterator[VideoResult]:
    """One VideoResult per item of `codes`, in its order: class probabilities (`output` "probabilities") or
    features (`output` "features": `feature` cls/mean/both, per clip or averaged), the model batched across videos.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
    waiting: list[tuple[VideoResult, torch.Tensor | None]] = []
    clips = 0

    def flush() -> Iterator[VideoResult]:
        tokens = [t for _, t in waiting if t is not None]
        if tokens and output == "probabilities":
            outputs = iter(pipeline.probabilities_many(tokens))
        elif tokens:
            outputs = iter(pipeline.features_many(tokens, feature, per_clip))
        for result, t in waiting:
            if t is not None:
                setattr(result, output, next(outputs))
            yield result
        waiting.clear()

    for video_id, source, per_view in codes:
        if isinstance(per_view, dict):
            waiting.append((VideoResult(video_id, source, failure=per_view), None))
            continue
        tokens = pipeline.clips(per_view)
        waiting.append((VideoResult(video_id, source), tokens))
        clips += tokens.shape[0]
        if clips >= pipeline.clips_per_forward:
            yield from flush()
            clips = 0
    yield from flush()
