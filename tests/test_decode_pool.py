"""The decode pool: chunks through shared memory equal direct decoding; a killed worker costs one video."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from tests.videos import write_video
from vimpac.tokenization.decode import iter_view_frames
from vimpac.tokenization.decode_pool import MAX_SLOTS, MIN_SLOTS, SLOT_BYTES, DecodePool, chunk_frames, slots_per_worker
from vimpac.tokenization.views import views_for


def test_chunk_frames_fit_a_slot():
    assert chunk_frames(3, 128, 32) == 32
    n = chunk_frames(12, 256, 32)
    assert n * 12 * 256 * 256 * 3 <= SLOT_BYTES < (n + 1) * 12 * 256 * 256 * 3
    assert chunk_frames(12, 4096, 32) == 1


def test_small_chunks_get_more_slots():
    assert slots_per_worker(SLOT_BYTES) == MIN_SLOTS == 3
    assert slots_per_worker(64 * 64 * 64 * 3) == MAX_SLOTS == 16  # one 64-px view: a worker may run 16 videos ahead
    assert MIN_SLOTS < slots_per_worker(3 * 64 * 128 * 128 * 3) < MAX_SLOTS


def test_workers_do_not_run_the_main_module_again(tmp_path):
    """A script without a __main__ guard starts a pool: its body runs once, not once more per worker."""
    log = tmp_path / "runs.txt"
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from vimpac.tokenization.decode_pool import DecodePool
            from vimpac.tokenization.views import views_for

            with open({str(log)!r}, "a") as f:
                f.write("ran\\n")
            pool = DecodePool(2, 4.0, views_for("center", 32), 32, 8)
            pool.submit("gone", {str(tmp_path / "missing.mp4")!r})
            while (message := pool.get(timeout=60))[0] != "fail":
                pass
            pool.close()
            print(message[2])
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "open" and log.read_text() == "ran\n"


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
