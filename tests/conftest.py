"""Shared fixtures: tiny real video files written with PyAV, temp dirs, CPU settings for Triton and DeepSpeed."""

import os

# The Triton interpreter reads this when @triton.jit runs, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.videos import write_video  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def video_factory(tmp_path):
    """Write a small real video file and return its path: `video_factory("a.mp4", frames=..., fps=...)`."""

    def make(name: str = "clip.mp4", **kwargs):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, **kwargs)
        return path

    return make
