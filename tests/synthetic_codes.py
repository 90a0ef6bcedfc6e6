"""A tiny code database whose codes a small model can learn from, for pre-training tests.

Video v is one random pattern B_v [h, w] over the vocabulary, repeated in every frame. A masked block is therefore
predictable from the same positions in the frames it does not cover (a copy along T that a 2-layer model learns
in a few dozen steps), and every clip of a video carries the video's own pattern (InfoNCE can tell videos apart).
`write_labeled` makes a labeled database with train/val splits for fine-tuning and probe tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vimpac.code_db import CodeDatabaseWriter

VOCAB = 64
FRAME_SIZE = 32  # 4 × 4 codes per frame
GRID = (FRAME_SIZE // 8, FRAME_SIZE // 8)
VIEW = "r32_center_f0"


def video_codes(rng: np.random.Generator, frames: int, grid: tuple[int, int] = GRID, vocab: int = VOCAB) -> np.ndarray:
    """int16 [frames, h, w] codes of one synthetic video."""
    base = rng.integers(0, vocab, size=grid)
    return np.repeat(base[None], frames, axis=0).astype(np.int16)


def write_code_database(
    path: str | Path,
    videos: int = 32,
    frames: int = 8,
    grid: tuple[int, int] = GRID,
    vocab: int = VOCAB,
    seed: int = 0,
) -> Path:
    """Write a complete one-view database with a "train" split holding every video; returns its path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    manifest = {
        "dataset": "synthetic",
        "fps": 2,
        "frame_size": grid[0] * 8,
        "grid": list(grid),
        "tokenizer": {"name": "synthetic", "vocab_size": vocab, "fingerprint": "0" * 16},
        "views": [VIEW],
        "classes": [],
    }
    ids = [f"video{i:04d}" for i in range(videos)]
    with CodeDatabaseWriter(path, manifest) as writer:
        for video_id in ids:
            writer.add(video_id, {VIEW: video_codes(rng, frames, grid, vocab)}, label=-1, duration=frames / 2, fps=2.0)
        writer.finalize({"train": ids})
    return path


def write_labeled(path, videos_per_class=8, val_per_class=4, classes=4, frames=9, views=(VIEW,), kind="class", fps=2):
    """A labeled database. kind "class": video of class c = the class pattern with 3 of 16 codes random, the same
    in every frame and view (learnable). kind "index": frame f of view v holds code 10·v + f everywhere (tells
    which view and start a clip came from)."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, VOCAB, size=(classes, *GRID))
    manifest = {
        "dataset": "synthetic",
        "fps": fps,
        "frame_size": FRAME_SIZE,
        "grid": list(GRID),
        "tokenizer": {"name": "synthetic", "vocab_size": VOCAB, "fingerprint": "0" * 16},
        "views": list(views),
        "classes": [f"class{c}" for c in range(classes)],
    }
    splits = {"train": [], "val": []}
    with CodeDatabaseWriter(path, manifest) as writer:
        for c in range(classes):
            for i in range(videos_per_class + val_per_class):
                vid = f"c{c}_v{i:02d}"
                if kind == "class":
                    base = patterns[c].copy()
                    base.flat[rng.choice(16, 3, replace=False)] = rng.integers(0, VOCAB, 3)
                    codes = {v: np.repeat(base[None], frames, 0).astype(np.int16) for v in views}
                else:
                    codes = {
                        v: np.broadcast_to((10 * j + np.arange(frames))[:, None, None], (frames, *GRID)).astype(
                            np.int16
                        )
                        for j, v in enumerate(views)
                    }
                writer.add(vid, codes, label=c, duration=frames / fps, fps=float(fps))
                splits["train" if i < videos_per_class else "val"].append(vid)
        writer.finalize(splits)
    return Path(path)
