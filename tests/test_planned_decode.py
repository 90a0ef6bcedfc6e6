"""Decoding only the frames evaluation reads: the frame count from packets, the plan, and exactness."""

from __future__ import annotations

import itertools
import subprocess
import sys

import av
import numpy as np
import pytest

from tests.videos import gradient_frames, write_video
from vimpac.clip_windows import EvaluationFrames, evaluation_clip_starts, take_clip
from vimpac.tokenization import decode
from vimpac.tokenization.decode import count_targets, iter_frames, iter_view_frames, planned_view_frames
from vimpac.tokenization.views import views_for

VFR_PTS = [0.0, 0.1, 0.5, 0.55, 1.2, 2.0]


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi", ".mkv"])
@pytest.mark.parametrize("selection", ["vimpac", "ffmpeg"])
def test_count_from_packets_equals_the_decode(tmp_path, ext, selection):
    files = [
        write_video(tmp_path / f"cfr{ext}", num_frames=37, fps=8),
        write_video(tmp_path / f"vfr{ext}", frames=gradient_frames(len(VFR_PTS)), pts_seconds=VFR_PTS),
    ]
    for path, fps in itertools.product(files, (2, 4, 7.5, 30)):
        decoded = sum(1 for _ in iter_frames(path, fps, [32], selection=selection))
        assert count_targets(path, fps, selection) == decoded, (path.name, fps)


def raw_h264(path):
    """An elementary stream: its packets carry no timestamps."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 64, 80, "yuv420p"
        for rgb in gradient_frames(20):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("num_frames", [1, 2, 7, 30])
@pytest.mark.parametrize(("clip_len", "stride", "num_clips", "single_clip"), [(3, 2, 2, "centre"), (4, 1, 1, "start")])
def test_evaluation_frames_are_the_frames_the_clips_read(num_frames, clip_len, stride, num_clips, single_clip):
    plan = EvaluationFrames(clip_len, stride, num_clips, single_clip)
    codes = np.arange(num_frames)[:, None, None]
    starts = evaluation_clip_starts(num_frames, clip_len, stride, num_clips, single_clip)
    read = {int(x) for s in starts for x in take_clip(codes, s, clip_len, stride, pad_id=-1).ravel() if x >= 0}
    assert plan(num_frames) == sorted(read)


PLAN = EvaluationFrames(clip_len=3, stride=2, num_clips=2, single_clip="centre")


def check_planned(path, plan=PLAN):
    views = views_for("test", 24)
    full = np.concatenate(list(iter_view_frames(path, 4, views, 24)), axis=1)
    n, indices, frames = planned_view_frames(path, 4, views, 24, plan)
    assert n == full.shape[1] and indices == plan(n) and len(indices) < n
    np.testing.assert_array_equal(frames, full[:, indices])


def test_planned_frames_equal_the_full_decode_at_the_plan(tmp_path):
    check_planned(write_video(tmp_path / "a.mp4", num_frames=37, fps=8, size=(32, 48)))


def test_without_timestamps_a_counting_decode_gives_the_count(tmp_path):
    path = raw_h264(tmp_path / "clip.h264")
    assert count_targets(path, 4) is None
    check_planned(path)


@pytest.mark.parametrize("error", [-3, 5])
def test_a_wrong_count_from_the_packets_is_corrected_by_decoding_again(tmp_path, monkeypatch, error):
    path = write_video(tmp_path / "a.mp4", num_frames=37, fps=8, size=(32, 48))
    true_count = count_targets(path, 4)
    monkeypatch.setattr(decode, "count_targets", lambda *args: true_count + error)
    passes = []
    real = decode._decoded_targets
    monkeypatch.setattr(decode, "_decoded_targets", lambda *a, **k: passes.append(1) or real(*a, **k))
    check_planned(path)
    assert len(passes) == 1 + 2  # the full decode of check_planned, then the planned one twice


def test_decode_workers_import_no_torch():
    """A worker unpickles the plan: were its module to import torch, every worker start would cost about 1.5 s."""
    code = (
        "import pickle, sys\n"
        "import vimpac.tokenization.decode_pool\n"
        "from vimpac.clip_windows import EvaluationFrames\n"
        "pickle.loads(pickle.dumps(EvaluationFrames(5, 2, 3, 'start')))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
