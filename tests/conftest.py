"""Shared fixtures: tiny real video files written with PyAV, temp dirs, CPU settings for Triton and DeepSpeed."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter and DeepSpeed on its CPU accelerator. The interpreter
# flag is read when @triton.jit runs, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.videos import write_video


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


@pytest.fixture
def single_process_env(monkeypatch):
    """What prepare_environment would set, registered with monkeypatch so the test leaves os.environ as it was: a
    trainer's main() then runs in the test process (for refusals before any process group exists)."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
