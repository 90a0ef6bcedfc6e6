"""The decode pool: chunks through shared memory equal direct decoding; a killed worker costs one video."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from tests.videos import write_video
from vimpac.tokenization.decode import iter_view_frames
from vimpac.tokenization.decode_pool import SLOT_BYTES, DecodePool, chunk_frames
from vimpac.tokenization.views import views_for


def test_chunk_frames_fit_a_slot():
    assert chunk_frames(3, 128, 32) == 32
    n = chunk_frames(12, 256, 32)
    assert n * 12 * 256 * 256 * 3 <= SLOT_BYTES < (n + 1) * 12 * 256 * 256 * 3
    assert chunk_frames(12, 4096, 32) == 1


def collect(pool: DecodePool, expect: int, timeout: float = 60) -> dict[str, list]:
    """Drain messages until `expect` videos ended; returns {video_id: [chunks..., final message]}."""
    got: dict[str, list] = {}
    ended = 0
    deadline = time.monotonic() + timeout
    while ended < expect and time.monotonic() < deadline:
        kind, video_id, *rest = pool.get(timeout=timeout)
        if kind == "chunk":
            got.setdefault(video_id, []).append(pool.take(rest[0]))
        elif kind in ("done", "fail"):
            got.setdefault(video_id, []).append((kind, *rest))
            ended += 1
    return got


def test_pool_chunks_equal_direct_decoding(tmp_path):
    views = views_for("test", 64)
    paths = {f"v{i}": write_video(tmp_path / f"v{i}.mp4", num_frames=20 + 7 * i, fps=8) for i in range(3)}
    pool = DecodePool(2, 4.0, views, 64, chunk=3)
    try:
        for video_id, path in paths.items():
            pool.submit(video_id, path)
        got = collect(pool, 3)
    finally:
        pool.close()
    for video_id, path in paths.items():
        *chunks, final = got[video_id]
        assert final[0] == "done" and all(c.shape[1] <= 3 for c in chunks)
        expected = np.concatenate(list(iter_view_frames(path, 4.0, views, 64)), axis=1)
        np.testing.assert_array_equal(np.concatenate(chunks, axis=1), expected)


def test_killed_worker_is_reported_and_replaced(tmp_path):
    views = views_for("center", 64)
    long_video = write_video(tmp_path / "long.mkv", num_frames=400, fps=8)
    short_video = write_video(tmp_path / "short.mp4", num_frames=16, fps=8)
    pool = DecodePool(1, 8.0, views, 64, chunk=1)  # one frame per chunk: the worker soon waits for a free slot
    try:
        pool.submit("long", long_video)
        kind, video_id, worker = pool.get(timeout=30)
        assert (kind, video_id) == ("start", "long")
        pool.current[worker] = video_id
        stale = pool.get(timeout=30)  # a chunk of the doomed worker, not yet taken
        os.kill(pool._procs[worker].pid, signal.SIGKILL)
        pool._procs[worker].join(timeout=10)
        lost = pool.crashed()
        assert lost == [("long", lost[0][1])] and "died" in lost[0][1]
        assert pool.take(stale[2]) is None  # its slots were replaced: stale messages are ignored
        pool.submit("short", short_video)
        got = collect(pool, 1)
    finally:
        pool.close()
    *chunks, final = got["short"]
    assert final[0] == "done"
    expected = np.concatenate(list(iter_view_frames(short_video, 8.0, views, 64)), axis=1)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), expected)
