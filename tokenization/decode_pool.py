"""A pool of decode processes that hand frames to the main process through shared memory.

Each worker takes one video at a time from a task queue and decodes it into chunks of view frames
`[V, n, S, S, 3]`. A chunk is written into one of the worker's few shared-memory slots and only its slot number
travels through the worker's result pipe: no pickling and no pipe copy of pixel data, which at tens of thousands of
frames per second would make the main process, not decoding, the limit. The main process copies a chunk out
and hands the slot back; a worker with no free slot waits, which bounds memory however long a video is.

Messages, read with `DecodePool.get`: ("start", video_id, worker), ("chunk", video_id, (worker, generation, slot,
n)), ("done", video_id, duration_s, source_fps, frames, indices), ("fail", video_id, stage, reason). `frames` is the
video's frame count at the pool's fps; `indices` is None when every frame was sent, else the frames sent (a pool
with a `plan` decodes only the frames plan(frames) names: `planned_view_frames`). A restarted worker gets fresh
slots and a new generation, so a message left over from its dead predecessor can never read a reused slot.

Each worker sends its messages through a pipe of its own, not a queue shared by all: a worker killed while
writing to a shared queue dies holding that queue's lock, and every other writer then waits on it forever.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from vimpac.tokenization.decode import (
    DEFAULT_FRAME_SELECTION,
    DecodeError,
    iter_view_frames,
    planned_view_frames,
    probe,
)
from vimpac.tokenization.views import View

SLOT_BYTES = 16 * 2**20  # chunks are cut so that one fits in this
WORKER_BYTES = 48 * 2**20  # shared memory per worker: as many slots as fit, within MIN_SLOTS..MAX_SLOTS
MIN_SLOTS, MAX_SLOTS = 3, 16


def slots_per_worker(slot_bytes: int) -> int:
    """Slots of one worker. A short video fills one slot whatever its size, and a worker with no free slot waits
    until the main process takes a chunk, which it does only between its encoder and model batches: with small
    frames a few slots would let a worker run only a few videos ahead of that (measured: a CPU `vimpac predict`
    spent half its time waiting on a worker stalled so), so small slots come many to a worker."""
    return max(MIN_SLOTS, min(MAX_SLOTS, WORKER_BYTES // max(1, slot_bytes)))


def chunk_frames(num_views: int, size: int, wanted: int) -> int:
    """Frames per chunk: `wanted`, fewer when a chunk of `num_views` views at `size` px would exceed a slot."""
    per_frame = num_views * size * size * 3
    return max(1, min(wanted, SLOT_BYTES // per_frame))


def _decode_worker(
    tasks,
    results,
    free,
    shm_name: str,
    slot_shape: tuple,
    fps: float,
    views,
    out: int,
    selection: str,
    plan: Callable[[int], Sequence[int]] | None,
    worker: int,
    generation: int,
):
    """Decode the videos of `tasks` into this worker's slots; `results` is the write end of its own pipe."""
    shm = SharedMemory(name=shm_name)
    slots = np.ndarray((slots_per_worker(int(np.prod(slot_shape))), *slot_shape), dtype=np.uint8, buffer=shm.buf)
    chunk = slot_shape[1]
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            video_id, path = task
            results.send(("start", video_id, worker))
            try:
                info = probe(path)
                if plan is None:
                    chunks, indices = iter_view_frames(path, fps, views, out, chunk=chunk, selection=selection), None
                else:
                    count, indices, planned = planned_view_frames(path, fps, views, out, plan, selection=selection)
                    chunks = (planned[:, i : i + chunk] for i in range(0, len(indices), chunk))
                sent = 0
                for frames_chunk in chunks:
                    slot = free.get()
                    n = frames_chunk.shape[1]
                    slots[slot, :, :n] = frames_chunk
                    results.send(("chunk", video_id, (worker, generation, slot, n)))
                    sent += n
                if sent == 0:
                    raise DecodeError("resample", f"too short: {info.duration:.2f} s gives no frame at {fps:g} fps")
                frames = sent if indices is None else count
                results.send(("done", video_id, float(info.duration), float(info.fps), frames, indices))
            except DecodeError as err:
                results.send(("fail", video_id, err.stage, err.reason))
            except Exception as err:  # a decoder bug must cost one video, not the run
                results.send(("fail", video_id, "decode", f"unexpected {type(err).__name__}: {err}"))
    finally:
        del slots
        shm.close()


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """Start processes as if the main module were empty. multiprocessing runs the main module again in every new
    process (and in the fork server) so that pickled references into it resolve; the workers need nothing from it,
    and a main module that imports torch (the `vimpac` command does) cost each worker about 1.5 s to start, while a
    script without an `if __name__ == "__main__":` guard would start itself again in every worker."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class DecodePool:
    """`workers` decode processes forked from a fork server: the server imports the main module once and holds no
    CUDA context, LMDB handle or threads, so workers start fast and inherit nothing unsafe. (Plain fork from a
    CUDA-initialised parent hung on an H100 box; spawn re-imports the main module, torch and all, per worker.)

    `take(ref)` copies a chunk out of shared memory and frees its slot; `crashed()` restarts dead workers and
    reports the videos they held.
    """

    def __init__(
        self,
        workers: int,
        fps: float,
        views: Sequence[View],
        out: int,
        chunk: int,
        selection: str = DEFAULT_FRAME_SELECTION,
        plan: Callable[[int], Sequence[int]] | None = None,
    ):
        self._ctx = mp.get_context("forkserver")
        # The fork server imports the decoding modules once, and each worker forks from it with them loaded.
        self._ctx.set_forkserver_preload([__name__])
        self.tasks = self._ctx.Queue()
        self._slot_shape = (len(views), chunk_frames(len(views), out, chunk), out, out, 3)
        self._args = (fps, list(views), out, selection, plan)
        self.current: dict[int, str] = {}  # worker → the video it is decoding
        self._procs: list = [None] * workers
        self._shm: list = [None] * workers
        self._slots: list = [None] * workers
        self._free: list = [None] * workers
        self._results: list = [None] * workers  # the read end of each worker's pipe
        self._generation = [0] * workers
        for i in range(workers):
            self._start(i)

    def _start(self, i: int) -> None:
        """Start worker i with fresh slots (a dead worker may have held one)."""
        if self._shm[i] is not None:
            self._release(i)
        self._generation[i] += 1
        slot_bytes = int(np.prod(self._slot_shape))
        count = slots_per_worker(slot_bytes)
        shm = SharedMemory(create=True, size=count * slot_bytes)
        self._shm[i] = shm
        self._slots[i] = np.ndarray((count, *self._slot_shape), dtype=np.uint8, buffer=shm.buf)
        self._free[i] = self._ctx.Queue()
        for slot in range(count):
            self._free[i].put(slot)
        if self._results[i] is not None:
            self._results[i].close()  # what a dead worker left in its pipe is stale anyway
        self._results[i], writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_decode_worker,
            args=(
                self.tasks,
                writer,
                self._free[i],
                shm.name,
                self._slot_shape,
                *self._args,
                i,
                self._generation[i],
            ),
            daemon=True,
            name=f"decode-{i}",
        )
        with _bare_main():
            proc.start()
        writer.close()  # the worker holds the only write end, so its death reads as end-of-file here
        self._procs[i] = proc

    def _release(self, i: int) -> None:
        self._slots[i] = None
        self._shm[i].close()
        self._shm[i].unlink()
        self._shm[i] = None

    def get(self, timeout: float) -> tuple:
        """The next message from any worker; queue.Empty when none arrives within `timeout` seconds (or a dead
        worker's pipe is all there is to read: `crashed()` restarts it)."""
        for reader in wait(self._results, timeout):
            try:
                return reader.recv()
            except (EOFError, OSError):
                continue
        raise queue.Empty

    def submit(self, video_id: str, path: Path) -> None:
        self.tasks.put((video_id, str(path)))

    def take(self, ref: tuple[int, int, int, int]) -> np.ndarray | None:
        """The chunk of a ("chunk", id, ref) message: uint8 [V, n, S, S, 3] (a copy), its slot handed back to the
        worker; None when the message came from a worker that has since died."""
        worker, generation, slot, n = ref
        if generation != self._generation[worker]:
            return None
        frames = self._slots[worker][slot, :, :n].copy()
        self._free[worker].put(slot)
        return frames

    def crashed(self) -> list[tuple[str, str]]:
        """Restart dead workers; return (video_id, reason) for the videos they were decoding."""
        lost = []
        for i, proc in enumerate(self._procs):
            if proc.is_alive():
                continue
            video_id = self.current.pop(i, None)
            if video_id is not None:
                lost.append((video_id, f"decoder process died (exit code {proc.exitcode}) on this file"))
            self._start(i)
        return lost

    def close(self) -> None:
        for _ in self._procs:
            self.tasks.put(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for i in range(len(self._procs)):
            self._release(i)
            self._results[i].close()
