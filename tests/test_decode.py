"""Streaming decode: timestamp resampling (pure and on real files), containers, resizing, views, bad inputs."""

import io
import math
import pickle
import re
from fractions import Fraction

import av
import numpy as np
import pytest

from tests.videos import frame_index, gradient_frames
from vimpac.tokenization import decode
from vimpac.tokenization.decode import (
    DecodeError,
    frame_seconds,
    is_truncated,
    iter_frames,
    iter_view_frames,
    parse_clock,
    probe,
    resample_indices,
    shown_until,
    stream_end,
    target_count,
)
from vimpac.tokenization.views import View, apply_view, resized_size, views_for

CONTAINERS = [".mp4", ".webm", ".avi", ".mkv"]
# Variable frame rate: gaps of 0.1 .. 0.8 s, so low target rates drop frames and high ones repeat them.
VFR_PTS = [0.0, 0.1, 0.5, 0.55, 1.2, 2.0]
VFR_END = 2.0 + 1 / 8  # the writer's nominal rate (8) gives the last frame 1/8 s


def shown_frame_reference(times, end, fps):
    """Brute force of the contract: for t_k = t_0 + k/fps, k < floor((end - t_0)·fps + 1e-6), the last i with
    times[i] <= t_k + 1e-6. Exact rationals, so it shares no float arithmetic with the implementation."""
    times = [Fraction(t).limit_denominator(10**6) for t in times]
    fps = Fraction(fps).limit_denominator(10**6)
    end = Fraction(end).limit_denominator(10**6)
    eps = Fraction(1, 10**6)
    count = max(0, math.floor((end - times[0]) * fps + eps))
    out = []
    for k in range(count):
        t = times[0] + k / fps
        out.append(max(i for i, s in enumerate(times) if s <= t + eps))
    return out


def indices(path, fps, side=64, **kwargs):
    """Source-frame index of every item; `side` 64 keeps the writer's 64x80 frames at full size, because its
    MPEG-4 (AVI) output is too lossy to read indices back after downscaling."""
    return [frame_index(item[side]) for item in iter_frames(path, fps, [side], **kwargs)]


# --------------------------------------------------------------------------------------------------------------
# Pure timestamp arithmetic


def test_target_count():
    assert target_count(0.0, 2.0, 8) == 16
    assert target_count(0.0, 2.125, 2) == 4
    assert target_count(0.25, 3.25, 8) == 24  # non-zero start
    assert target_count(0.0, 0.3, 2) == 0
    assert target_count(0.0, 0.1 * 3, 10) == 3  # 0.30000000000000004·10 stays 3, 0.1·3·10 floors right with eps
    assert target_count(1.0, 0.5, 4) == 0


def test_resample_indices_drop_and_repeat():
    assert resample_indices(VFR_PTS, VFR_END, 2) == [0, 2, 3, 4]  # t = 0, .5, 1, 1.5: frames 1 and 5 dropped
    assert resample_indices(VFR_PTS, VFR_END, 4) == [0, 1, 2, 3, 3, 4, 4, 4]
    cfr = [i / 8 for i in range(16)]
    assert resample_indices(cfr, 2.0, 4) == list(range(0, 16, 2))
    assert resample_indices(cfr, 2.0, 16) == [i // 2 for i in range(32)]
    assert resample_indices(cfr, 2.0, 3) == [math.floor(k * 8 / 3) for k in range(6)]
    assert resample_indices([], 1.0, 2) == []


def test_resample_indices_random_against_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        # Millisecond timestamps, some exactly on target times, some duplicated.
        times = sorted(float(t) for t in rng.integers(0, 5000, size=n) / 1000)
        fps = float(rng.choice([1, 2, 3, 4, 7.5, 8, 16, 29.97, 30]))
        end = times[-1] + float(rng.choice([0.0, 0.001, 1 / 30, 0.5]))
        assert resample_indices(times, end, fps) == shown_frame_reference(times, end, fps), (times, end, fps)


def test_shown_until():
    assert shown_until(0.5, 0.0, 4, 0) == 2  # targets 0 and .25 precede the next frame at .5
    assert shown_until(0.5 + 1e-7, 0.0, 4, 0) == 2  # within eps of t_2: the next frame takes t_2
    assert shown_until(0.5, 0.0, 4, 3) == 3  # never moves backwards
    assert shown_until(10.0, 0.0, 4, 0, limit=5) == 5


def test_frame_seconds_fallbacks():
    tb = Fraction(1, 90000)
    assert frame_seconds(22500, tb, None, 0.0, 25.0) == 0.25
    assert frame_seconds(None, tb, None, 0.0, 25.0) == 0.0  # first frame without a stamp
    assert frame_seconds(None, tb, 1.0, 0.125, 25.0) == 1.125  # previous frame's duration
    assert frame_seconds(None, tb, 1.0, 0.0, 25.0) == pytest.approx(1.04)  # nominal rate
    assert frame_seconds(7, None, 1.0, 0.0, 25.0) == pytest.approx(1.04)  # a stamp without a time base is useless


def test_stream_end():
    assert stream_end(2.0, 0.125, 5.0, 0.8) == 2.125  # frame duration wins
    assert stream_end(2.0, 0.0, 2.125, 0.8) == 2.125  # AVI: no durations, declared end just after
    assert stream_end(2.0, 0.0, 9.0, 0.8) == 2.8  # declared end implausible: repeat the last gap
    assert stream_end(2.0, 0.0, None, None) == 2.0


def test_is_truncated():
    assert is_truncated(2.4, 5.0, 0.125)
    assert is_truncated(58.0, 60.0, 0.04)  # > 1 s short
    assert not is_truncated(59.5, 60.0, 0.04)
    assert is_truncated(1.5, 2.0, 0.125)  # 25% short
    assert not is_truncated(1.9, 2.0, 0.125)
    assert not is_truncated(1.5, 2.0, 0.6)  # within one frame gap: estimate, not truncation
    assert not is_truncated(2.0, None, 0.1)
    assert not is_truncated(5.0, 2.0, 0.1)  # longer than declared is fine


def test_parse_clock():
    assert parse_clock("00:00:02.125000000") == 2.125
    assert parse_clock("01:02:03.5") == 3723.5
    assert parse_clock("garbage") is None


def test_decode_error_fields_and_pickling():
    err = DecodeError("decode", "truncated: decoding stopped after 1.2 s of 4.0 s")
    assert (err.stage, err.reason) == ("decode", "truncated: decoding stopped after 1.2 s of 4.0 s")
    again = pickle.loads(pickle.dumps(err))  # extraction workers send errors across processes
    assert (again.stage, again.reason, str(again)) == (err.stage, err.reason, str(err))


# --------------------------------------------------------------------------------------------------------------
# Real files: resampling by timestamps


@pytest.mark.parametrize("ext", CONTAINERS)
@pytest.mark.parametrize("fps", [1, 2, 3, 4, 8, 10])
def test_vfr_file_resampled_by_timestamps(video_factory, ext, fps):
    path = video_factory(f"vfr{ext}", num_frames=len(VFR_PTS), pts_seconds=VFR_PTS)
    assert indices(path, fps) == shown_frame_reference(VFR_PTS, VFR_END, fps)


@pytest.mark.parametrize("ext", CONTAINERS)
def test_constant_rate_file_every_frame_at_native_rate(video_factory, ext):
    path = video_factory(f"cfr{ext}", num_frames=16, fps=8)
    assert indices(path, 8) == list(range(16))
    assert indices(path, 4) == list(range(0, 16, 2))  # drop every other
    assert indices(path, 16) == [i // 2 for i in range(32)]  # repeat each


def test_repeated_frames_share_arrays(video_factory):
    path = video_factory("cfr.mkv", num_frames=4, fps=2)
    items = list(iter_frames(path, 6, [32, 48]))
    assert len(items) == 12
    for a, b in zip(items[0::3], items[1::3]):
        assert a[32] is b[32] and a[48] is b[48]
    assert items[2][32] is not items[3][32]


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mkv"])  # AVI cannot store a start offset
def test_nonzero_start_time(video_factory, ext):
    path = video_factory(f"late{ext}", num_frames=8, pts_seconds=[1.5 + i / 8 for i in range(8)])
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.start_time * stream.time_base == 1.5
    assert indices(path, 8) == list(range(8))
    assert indices(path, 4) == [0, 2, 4, 6]
    assert indices(path, 3) == [0, 2, 5]  # t = 1.5, 1.83, 2.17


def test_raw_h264_without_timestamps(tmp_path):
    path = tmp_path / "clip.h264"  # an elementary stream: frames have neither pts nor dts
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 64, 80, "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for rgb in gradient_frames(12):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).pts is None
    assert indices(path, 8) == list(range(12))
    assert indices(path, 4) == list(range(0, 12, 2))


def test_threaded_decoding_gives_same_frames(video_factory):
    path = video_factory("cfr.mp4", num_frames=16, fps=8, size=(96, 128))
    single = list(iter_frames(path, 8, [64]))
    threaded = list(iter_frames(path, 8, [64], threads=0))
    assert len(single) == len(threaded) == 16
    for a, b in zip(single, threaded):
        np.testing.assert_array_equal(a[64], b[64])


def test_fps_must_be_positive(video_factory):
    with pytest.raises(ValueError, match="fps"):
        next(iter_frames(video_factory("a.mp4"), 0, [32]))


# --------------------------------------------------------------------------------------------------------------
# Containers, probe, sizes


@pytest.mark.parametrize(
    ("ext", "codec", "num_frames", "fps"),
    [
        (".mp4", "h264", 16, 8.0),
        (".webm", "vp9", None, 8.0),  # Matroska stores no frame count
        (".avi", "mpeg4", 2000, 1000.0),  # the writer's 1 ms time base: AVI counts one slot per millisecond
        (".mkv", "ffv1", None, 8.0),
    ],
)
def test_probe(video_factory, ext, codec, num_frames, fps):
    info = probe(video_factory(f"a{ext}", num_frames=16, fps=8, size=(48, 96)))
    assert (info.width, info.height, info.codec, info.num_frames) == (96, 48, codec, num_frames)
    assert info.duration == pytest.approx(2.0)
    assert info.fps == pytest.approx(fps)


@pytest.mark.parametrize(("size", "sides"), [((64, 80), {32: (32, 40), 48: (48, 60)}), ((80, 64), {32: (40, 32)})])
def test_resized_shapes_landscape_and_portrait(video_factory, size, sides):
    path = video_factory("a.mp4", num_frames=4, size=size)
    for item in iter_frames(path, 8, list(sides)):
        assert {k: v.shape for k, v in item.items()} == {k: (*hw, 3) for k, hw in sides.items()}
        assert all(v.dtype == np.uint8 for v in item.values())


def test_lossless_pixels_match_source(video_factory):
    frames = gradient_frames(6, 64, 80, seed=3)
    path = video_factory("a.mkv", frames=frames)  # ffv1 yuv444p: only colour conversion error
    got = np.stack([item[64] for item in iter_frames(path, 8, [64])])
    assert got.shape == frames.shape
    assert np.abs(got.astype(int) - frames).mean() < 3


def test_downscaled_pixels_match_area_average(video_factory):
    frames = gradient_frames(4, 64, 80, seed=4)
    path = video_factory("a.mkv", frames=frames)
    got = np.stack([item[32] for item in iter_frames(path, 8, [32])])  # exactly 2× smaller: 2x2 box average
    box = frames.reshape(4, 32, 2, 40, 2, 3).astype(float).mean(axis=(2, 4))
    assert got.shape == (4, 32, 40, 3)
    assert np.abs(got - box).mean() < 4


# --------------------------------------------------------------------------------------------------------------
# Views


def test_iter_view_frames_chunks_and_content(video_factory):
    path = video_factory("a.mkv", num_frames=11, size=(64, 96))
    views = views_for("train", 32)
    chunks = list(iter_view_frames(path, 8, views, 32, chunk=4))
    assert [c.shape for c in chunks] == [(12, 4, 32, 32, 3)] * 2 + [(12, 3, 32, 32, 3)]
    assert len({id(c) for c in chunks}) == 3
    stacked = np.concatenate(chunks, axis=1)
    for t, item in enumerate(iter_frames(path, 8, [32, 40])):
        assert item[40].shape == (40, 60, 3)
        for v, view in enumerate(views):
            np.testing.assert_array_equal(stacked[v, t], apply_view(item[view.shorter], view, 32))
    # Flipped views are mirror images of their unflipped partner.
    for v, view in enumerate(views):
        if view.flip:
            partner = views.index(View(view.shorter, view.crop, False))
            np.testing.assert_array_equal(stacked[v], stacked[partner][:, :, ::-1])


def test_iter_view_frames_rejects_crop_larger_than_resize(video_factory):
    with pytest.raises(ValueError, match="below the crop size"):
        next(iter_view_frames(video_factory("a.mp4"), 8, [View(32, "center", False)], 48))


# --------------------------------------------------------------------------------------------------------------
# Bad inputs


def expect_error(path, stage, match, fps=8):
    with pytest.raises(DecodeError, match=match) as info:
        list(iter_frames(path, fps, [32]))
    assert info.value.stage == stage
    return info.value


def write_audio(path, codec, sample_format):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8000, layout="mono")
        dtype = np.int16 if sample_format == "s16" else np.float32
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), dtype), format=sample_format, layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1152
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.mp4", "open", "file not found")
    expect_error(tmp_path, "open", "not a regular file")
    with pytest.raises(DecodeError, match="file not found"):
        probe(tmp_path / "nope.mp4")


def test_empty_file(tmp_path):
    (tmp_path / "a.mp4").touch()
    err = expect_error(tmp_path / "a.mp4", "open", "empty")
    assert err.reason == "file is empty (0 bytes)"


@pytest.mark.parametrize("name", ["noise.mp4", "noise.webm", "noise"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(20000))
    expect_error(path, "open", "not a video file")


@pytest.mark.parametrize("name", ["notes.txt", "notes.mp4"])
def test_text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not a video\n" * 200)
    expect_error(path, "open", "not a video file")  # .txt: ffmpeg's tty demuxer would render it as ANSI art


@pytest.mark.parametrize(("name", "codec", "fmt"), [("a.m4a", "aac", "fltp"), ("a.mka", "flac", "s16")])
def test_audio_only(tmp_path, name, codec, fmt):
    path = write_audio(tmp_path / name, codec, fmt)
    err = expect_error(path, "probe", "no video stream")
    assert err.reason == "no video stream (streams: audio)"
    with pytest.raises(DecodeError, match="no video stream"):
        probe(path)


def test_a_cover_picture_stream_before_the_video_is_passed_over(tmp_path):
    """Matroska keeps stream order, so a one-frame still picture can be the first video stream."""
    path = tmp_path / "a.mkv"
    frames = gradient_frames(16, 32, 48)
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        for stream, pictures in ((cover, [np.full((64, 64, 3), 200, np.uint8)]), (video, frames)):
            for picture in pictures:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
            container.mux(stream.encode())
    assert (probe(path).codec, probe(path).width) == ("h264", 48)
    decoded = [f[32] for f in iter_frames(path, 8, [32])]
    assert [frame_index(f) for f in decoded] == list(range(16))


def truncate(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def test_truncated_mp4_without_index(video_factory):
    # The writer puts the moov index at the end: cutting the file loses it, so nothing can be opened.
    path = truncate(video_factory("a.mp4", num_frames=40), 0.5)
    expect_error(path, "open", "not a video file")


def test_truncated_mp4_fails_mid_stream(tmp_path):
    path = tmp_path / "faststart.mp4"  # index first, so decoding starts and then hits the cut
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 64, 80, "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for rgb in gradient_frames(30):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    truncate(path, 0.6)
    got = []
    with pytest.raises(DecodeError, match=r"truncated: decoding stopped after \d") as info:
        for item in iter_frames(path, 8, [32]):
            got.append(frame_index(item[32]))
    assert info.value.stage == "decode"
    assert len(got) > 3 and got == list(range(len(got)))  # it really decoded part of the file first


def garble_packets(path, which) -> int:
    """Overwrite the video packets whose index is in `which` with random bytes (the container stays readable);
    the number of packets the decoder then rejects."""
    with av.open(str(path)) as container:
        spots = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in which:
        pos, size = spots[i]
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    rejected = 0
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            try:
                packet.decode()
            except av.FFmpegError:
                rejected += 1
    return rejected


def test_a_damaged_packet_is_skipped_as_the_ffmpeg_command_line_skips_it(video_factory):
    path = video_factory("a.mp4", num_frames=48, fps=8)
    clean = len(list(iter_frames(path, 8, [32])))
    assert garble_packets(path, [20]) == 1
    assert len(list(iter_frames(path, 8, [32]))) == clean  # the frame before it is held in its place
    assert garble_packets(path, range(1, 48)) > 32  # a file that is mostly damage fails, as ffmpeg's -max_error_rate
    err = expect_error(path, "decode", "packets failed to decode")
    assert "of 48 packets" in err.reason


def test_truncated_mkv_ends_early(video_factory):
    # Matroska demuxes until the cut and stops quietly; only the declared duration shows the loss.
    path = truncate(video_factory("a.mkv", num_frames=40), 0.5)
    err = expect_error(path, "decode", "truncated")
    assert "of 5.0 s" in err.reason


def test_truncated_webm(video_factory):
    path = truncate(video_factory("a.webm", num_frames=40), 0.5)
    expect_error(path, "decode", "truncated")


def test_too_short(video_factory):
    path = video_factory("a.mp4", num_frames=2, fps=8)  # 0.25 s
    err = expect_error(path, "resample", "too short", fps=2)
    assert err.reason == "too short: 0.25 s gives no frame at 2 fps"
    assert indices(path, 4) == [0]  # 0.25·4 = 1 frame


# --------------------------------------------------------------------------------------------------------------
# Streaming


class CountingFile(io.FileIO):
    """A file that counts the bytes the demuxer has read from it."""

    bytes_read = 0

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n


def test_frames_are_streamed_not_decoded_up_front(video_factory, monkeypatch):
    # ffv1 is intra-only and large, and Matroska is read front to back: bytes read track frames decoded.
    path = video_factory("long.mkv", num_frames=120, fps=8, size=(96, 128))
    size = path.stat().st_size
    files = []
    real_open = av.open

    def counting_open(name, *args, **kwargs):
        files.append(CountingFile(name))
        return real_open(files[-1], *args, **kwargs)

    monkeypatch.setattr(decode.av, "open", counting_open)
    frames = iter_frames(path, 8, [32])
    first = next(frames)
    assert frame_index(first[32]) == 0
    assert files[0].bytes_read < 0.2 * size  # a few frames' worth, not the file
    rest = list(frames)
    assert len(rest) == 119
    assert files[0].bytes_read >= 0.95 * size


def test_stopping_early_closes_the_container(video_factory, monkeypatch):
    path = video_factory("a.mkv", num_frames=40)
    containers = []
    real_open = av.open

    def recording_open(*args, **kwargs):
        containers.append(real_open(*args, **kwargs))
        return containers[-1]

    monkeypatch.setattr(decode.av, "open", recording_open)
    frames = iter_frames(path, 8, [32])
    next(frames)
    frames.close()
    with pytest.raises(AssertionError, match="not open"):  # PyAV's guard on a closed container
        next(containers[0].demux())


def test_resized_size_rule_used(video_factory):
    path = video_factory("a.mp4", num_frames=2, size=(72, 130))
    item = next(iter_frames(path, 8, [50]))
    assert item[50].shape[:2] == resized_size(72, 130, 50) == (50, 90)


def test_audio_that_outlasts_the_video_is_not_a_truncated_video(tmp_path):
    # FLV declares no video length of its own; the file's length (6 s) is the audio's, the video's 2 s are whole.
    path = tmp_path / "long_audio.flv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=8)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for i, rgb in enumerate(gradient_frames(16, 64, 64)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for start in range(0, 6 * 16000, 1024):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, start
            for packet in audio.encode(samples):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    assert decode.probe(path).duration > 5.9  # the file's length, as the header says
    # 2 s at 2 fps, the last frame not stretched over the audio (ffmpeg -vf fps=2 gives frames 1, 5, 9 and 13)
    for selection, expected in (("vimpac", [0, 4, 8, 12]), ("ffmpeg", [1, 5, 9, 13])):
        shown = [frame_index(frames[32]) for frames in iter_frames(path, 2, [32], selection=selection)]
        assert shown == expected, selection
    # cut short, every stream stops early: still truncated, though the video declares no length of its own
    err = expect_error(truncate(path, 0.5), "decode", "truncated: every stream stops after")
    assert re.search(r"of 6\.\d s", err.reason)  # the file's length, audio included
