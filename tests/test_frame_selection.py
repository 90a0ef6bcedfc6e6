"""`--frame-selection ffmpeg`: the original release's frame choice (libavfilter `fps`) and resize (`scale`).

The reference is libavfilter itself, through PyAV's filter graphs, run on real files written by PyAV: the pure
rule `ffmpeg_fps_indices` must pick exactly the frames the `fps` filter passes on, and `iter_view_frames(...,
selection="ffmpeg")` must give exactly the pixels of the original's whole chain (fps → scale → crop → hflip →
rgb24).
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.tokenizers import tiny_vqvae_dir
from vimpac.code_db import CodeDatabase, CodeDatabaseWriter, config_differences, extraction_method, merge
from vimpac.commands.tokenize import FRAME_SELECTIONS as CLI_SELECTIONS
from vimpac.errors import UsageError
from vimpac.tokenization.decode import (
    FRAME_RESIZE,
    FRAME_SELECTIONS,
    ScaleFilter,
    command_line_origin,
    count_targets,
    ffmpeg_fps_indices,
    ffmpeg_tick,
    fps_fraction,
    iter_frames,
    iter_view_frames,
    resample_indices,
    resize_frame,
)
from vimpac.tokenization.views import crop_offsets, resized_size, views_for

HEIGHT, WIDTH = 32, 48


def write_noise_video(path: Path, rate, num: int, pts: list[int] | None = None, time_base=None) -> Path:
    """libx264 (B-frames, an edit list in MP4) or ffv1 video of random frames, so every decoded frame differs.

    `pts` (in `time_base`) gives each frame's stamp for variable rates and late starts; otherwise frame i is at i/rate.
    """
    rng = np.random.default_rng(num)
    codec, pix_fmt = ("ffv1", "yuv420p") if path.suffix == ".mkv" else ("libx264", "yuv420p")
    time_base = time_base or 1 / Fraction(rate)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, pix_fmt
        stream.time_base = stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "ultrafast", "bf": "2"}
        for i in range(num):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded(path: Path) -> tuple[list[av.VideoFrame], av.video.stream.VideoStream, av.container.InputContainer]:
    container = av.open(str(path))
    stream = container.streams.video[0]
    return list(container.decode(stream)), stream, container


def run_graph(stream, frames, filters: list[tuple[str, str]]) -> list[av.VideoFrame]:
    """Push `frames` through buffer → filters → buffersink, then end of stream; every frame that comes out."""
    graph = av.filter.Graph()
    nodes = [graph.add_buffer(template=stream)]
    nodes += [graph.add(name, args) for name, args in filters]
    nodes.append(graph.add("buffersink"))
    for a, b in itertools.pairwise(nodes):
        a.link_to(b)
    graph.configure()
    out: list[av.VideoFrame] = []

    def drain():
        while True:
            try:
                out.append(nodes[-1].pull())
            except (av.BlockingIOError, av.EOFError):
                return

    for frame in frames:
        nodes[0].push(frame)
        drain()
    nodes[0].push(None)
    drain()
    return out


def key(frame: av.VideoFrame) -> bytes:
    return b"".join(bytes(plane) for plane in frame.planes)


def fps_filter_indices(path: Path, fps) -> tuple[list[int], list[int]]:
    """(what libavfilter's fps filter picks, what ffmpeg_fps_indices picks) on the decoded frames of `path`."""
    frames, stream, container = decoded(path)
    with container:
        position = {key(f): i for i, f in enumerate(frames)}
        assert len(position) == len(frames), "test frames must differ"
        picked = [position[key(f)] for f in run_graph(stream, frames, [("fps", str(fps))])]
        times = [Fraction(f.pts) * f.time_base for f in frames]
        end = times[-1] + Fraction(frames[-1].duration) * frames[-1].time_base
        return picked, ffmpeg_fps_indices(times, end, fps)


# --------------------------------------------------------------------------------------------------------------
# The pure rule


def test_tick_rounds_half_away_from_zero_exactly():
    assert [ffmpeg_tick(Fraction(k, 4), 2) for k in range(-3, 4)] == [-2, -1, -1, 0, 1, 1, 2]
    assert ffmpeg_tick(Fraction(7500 * 1001, 30000), 2) == 501  # 250.25 s at 2 fps: 500.5 → 501
    assert fps_fraction(2.0) == 2 and fps_fraction(29.97) == Fraction(2997, 100) and fps_fraction(0.5) == Fraction(1, 2)


def test_thirty_fps_at_two():
    times = [Fraction(i, 30) for i in range(90)]
    assert ffmpeg_fps_indices(times, 3, 2) == [7, 22, 37, 52, 67, 82]
    assert resample_indices([float(t) for t in times], 3.0, 2) == [0, 15, 30, 45, 60, 75]


def test_rule_edges():
    assert ffmpeg_fps_indices([], 1, 2) == []
    assert ffmpeg_fps_indices([0], Fraction(1, 5), 2) == []  # 0.2 s: round(0.4) = 0 ticks
    assert ffmpeg_fps_indices([0], 1, 4) == [0, 0, 0, 0]  # one frame repeated
    # a late start: ticks 3 and 4 (1.5 s, 2 s), from round(1.3·2) = 3 to round(2.5·2) = 5; 1.7 s rounds to tick 3
    assert ffmpeg_fps_indices([Fraction(13, 10), Fraction(17, 10), 2], Fraction(5, 2), 2) == [1, 2]
    # two frames on one tick: the later wins; a tick with no frame of its own repeats the previous one
    assert ffmpeg_fps_indices([0, Fraction(1, 10), 1], Fraction(3, 2), 2) == [1, 1, 2]


# --------------------------------------------------------------------------------------------------------------
# Against libavfilter's fps filter, on real files


@pytest.mark.parametrize("rate", [30, 25, Fraction(30000, 1001), 24])
@pytest.mark.parametrize("fps", [2, 4, 1])
def test_rule_matches_fps_filter_constant_rate(tmp_path, rate, fps):
    path = write_noise_video(tmp_path / "cfr.mp4", rate, num=int(3.7 * rate))
    picked, rule = fps_filter_indices(path, fps)
    assert len(picked) >= 3 * fps
    assert rule == picked


VFR_MS = [0, 40, 90, 500, 520, 610, 1180, 1250, 1300, 2100, 2140, 2900, 2950, 3010]


@pytest.mark.parametrize("fps", [2, 4, 1, 3, 10])
@pytest.mark.parametrize(("ext", "offset_ms"), [(".mp4", 0), (".mkv", 0), (".mkv", 1370), (".mp4", 730)])
def test_rule_matches_fps_filter_variable_rate_and_late_start(tmp_path, fps, ext, offset_ms):
    pts = [offset_ms + t for t in VFR_MS]
    path = write_noise_video(tmp_path / f"vfr{ext}", 25, num=len(pts), pts=pts, time_base=Fraction(1, 1000))
    picked, rule = fps_filter_indices(path, fps)
    assert rule == picked


# --------------------------------------------------------------------------------------------------------------
# Against the ffmpeg command line, on files that do not start at 0


def write_with_early_audio(path: Path, video_start_ms: int) -> Path:
    """An MKV whose audio starts at 0 and whose video (ffv1, 25 fps, random frames) starts at `video_start_ms`:
    the file starts before its video."""
    rng = np.random.default_rng(video_start_ms)
    with av.open(str(path), "w") as container:
        video = container.add_stream("ffv1", rate=25)
        video.height, video.width, video.pix_fmt = HEIGHT, WIDTH, "yuv420p"
        video.time_base = video.codec_context.time_base = Fraction(1, 1000)
        audio = container.add_stream("aac", rate=16000)
        for i in range(60):
            samples = np.zeros((1, 1024), dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in audio.encode(frame):
                container.mux(packet)
            if i < 50:
                pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
                picture = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                picture.pts, picture.time_base = video_start_ms + 40 * i, Fraction(1, 1000)
                for packet in video.encode(picture):
                    container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)
    return path


def command_line_frames(ffmpeg: str, path: Path, fps) -> np.ndarray:
    """What `ffmpeg -i path -vf fps=F -f rawvideo -pix_fmt rgb24 -` writes (the original extractor's command,
    without its scale and crop): uint8 [n, H, W, 3]."""
    command = [ffmpeg, "-v", "error", "-i", str(path), "-vf", f"fps={fps}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, HEIGHT, WIDTH, 3)


def test_the_command_lines_zero_is_the_files_start():
    # An MPEG-TS file starting at 1.433333 s (microseconds) on a 90 kHz clock: av_rescale_q rounds to 129000.
    assert command_line_origin(1_433_333, Fraction(1, 90000)) == Fraction(129000, 90000)
    assert command_line_origin(1_300_000, Fraction(1, 1000)) == Fraction(13, 10)
    assert command_line_origin(None, Fraction(1, 1000)) == 0 and command_line_origin(0, None) == 0


@pytest.mark.parametrize("fps", [2, 4, 16])
def test_late_starting_files_give_the_frames_of_the_ffmpeg_command_line(tmp_path, fps):
    """The command line shifts a file so that it starts at 0, and its constant-rate raw output repeats the first
    frame back to that 0 when the video starts after the file (here: after its audio). Checked on three kinds of
    late start, frame for frame and pixel for pixel."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="the ffmpeg binary comes with the dev extras")
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    vfr = [1370 + t for t in VFR_MS]
    files = [
        write_noise_video(tmp_path / "late.mkv", 25, num=len(vfr), pts=vfr, time_base=Fraction(1, 1000)),
        write_noise_video(
            tmp_path / "late.mp4", 30, num=80, pts=[730 + 33 * i for i in range(80)], time_base=Fraction(1, 1000)
        ),
        write_with_early_audio(tmp_path / "audio_first.mkv", 900),
    ]
    for path in files:
        expected = command_line_frames(ffmpeg, path, fps)
        ours = np.stack([frames[HEIGHT] for frames in iter_frames(path, fps, [HEIGHT], selection="ffmpeg")])
        assert ours.shape == expected.shape, path.name
        np.testing.assert_array_equal(ours, expected, err_msg=path.name)
        assert count_targets(path, fps, selection="ffmpeg") == len(expected)


@pytest.mark.parametrize("fps", [2, 5, 8, 12, 24])
def test_avi_with_b_frames_is_timed_as_the_command_line_times_it(tmp_path, fps):
    """AVI stores no presentation stamps; with B-frames, stamps made up from decode order come out of the decoder
    shuffled. Both rules must time frames by FFmpeg's best effort, the decode-order dts, as the command line does."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="the ffmpeg binary comes with the dev extras")
    path = write_noise_video(tmp_path / "b_frames.avi", 24, num=24)
    expected = command_line_frames(imageio_ffmpeg.get_ffmpeg_exe(), path, fps)
    ours = np.stack([frames[HEIGHT] for frames in iter_frames(path, fps, [HEIGHT], selection="ffmpeg")])
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    # the default rule: target k shows the last frame at or before k / fps (frame i is at i / 24 s from the first)
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(video=0)])
    shown = [
        int(np.abs(decoded - frame[HEIGHT]).mean(axis=(1, 2, 3)).argmin()) for frame in iter_frames(path, fps, [HEIGHT])
    ]
    assert shown == [math.floor(k * 24 / fps) for k in range(len(shown))] and len(shown) == math.ceil(24 * fps / 24)


@pytest.mark.parametrize("fps", [3, 4, 10])
def test_files_with_audio_give_the_frames_of_the_ffmpeg_command_line(tmp_path, fps):
    """With audio the command line's raw output repeats the first frame back to the file's zero ("cfr"; a file of
    one stream is not padded), and for MPEG-TS it first moves that zero to the video's start ("Correcting start
    time"): an AVI with B-frames and audio, and an MPEG-TS whose audio starts 1.03 s before its video."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="the ffmpeg binary comes with the dev extras")
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    video = ["-f", "lavfi", "-i", f"testsrc=s={WIDTH}x{HEIGHT}:r=25:d=2.5"]
    audio = ["-f", "lavfi", "-i", "sine=d=3.5"]
    made = {
        "b_frames_audio.avi": [*video, *audio, "-c:v", "libx264", "-bf", "3", "-c:a", "pcm_s16le"],
        "audio_first.ts": [*audio, "-itsoffset", "1.03", *video, "-map", "0", "-map", "1", "-c:v", "libx264"],
    }
    for name, args in made.items():
        path = tmp_path / name
        subprocess.run([ffmpeg, "-v", "error", *args, str(path)], check=True, timeout=60)
        expected = command_line_frames(ffmpeg, path, fps)
        ours = np.stack([frames[HEIGHT] for frames in iter_frames(path, fps, [HEIGHT], selection="ffmpeg")])
        assert ours.shape == expected.shape, name
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        # AVI packets carry no presentation stamps: the count from their dts is an estimate (decoding checks it)
        slack = 1 if name.endswith(".avi") else 0
        assert abs(count_targets(path, fps, selection="ffmpeg") - len(expected)) <= slack, name


# --------------------------------------------------------------------------------------------------------------
# The whole original chain: fps → scale → crop → hflip → rgb24


def original_chain(path: Path, fps, shorter: int, out: int, crop: str, flip: bool) -> np.ndarray:
    """What the original extractor's ffmpeg command produced for one view: uint8 [n, out, out, 3]."""
    frames, stream, container = decoded(path)
    with container:
        h, w = resized_size(stream.height, stream.width, shorter)
        y, x = crop_offsets(h, w, out, crop)
        filters = [("fps", str(fps)), ("scale", f"{w}:{h}"), ("crop", f"{out}:{out}:{x}:{y}")]
        filters += [("hflip", "")] if flip else []
        filters.append(("format", "rgb24"))
        return np.stack([f.to_ndarray() for f in run_graph(stream, frames, filters)])


@pytest.mark.parametrize(("rate", "fps", "size"), [(30, 2, (32, 48)), (Fraction(30000, 1001), 4, (48, 32))])
def test_views_equal_the_original_ffmpeg_chain(tmp_path, rate, fps, size):
    global HEIGHT, WIDTH
    HEIGHT, WIDTH = size  # landscape and portrait
    try:
        path = write_noise_video(tmp_path / "a.mp4", rate, num=int(2.6 * rate))
    finally:
        HEIGHT, WIDTH = 32, 48
    views = views_for("train", 24)  # shorter sides 24 and 30, three crops, flips
    got = np.concatenate(list(iter_view_frames(path, fps, views, 24, chunk=4, selection="ffmpeg")), axis=1)
    for v, view in enumerate(views):
        expected = original_chain(path, fps, view.shorter, 24, view.crop, view.flip)
        assert got[v].shape == expected.shape
        np.testing.assert_array_equal(got[v], expected)  # exact: the same filters, not an imitation


def test_scale_filter_resize_is_not_swscale_area_or_bicubic(tmp_path):
    """The scale filter's output differs from VideoFrame.reformat even with bicubic (chroma placement), so the
    ffmpeg selection resizes through the filter; and the default selection keeps the area resize."""
    path = write_noise_video(tmp_path / "a.mp4", 30, num=3)
    frames, stream, container = decoded(path)
    with container:
        frame = frames[0]
        h, w = resized_size(frame.height, frame.width, 24)
        via_filter = run_graph(stream, [frame], [("scale", f"{w}:{h}"), ("format", "rgb24")])[0].to_ndarray()
        np.testing.assert_array_equal(resize_frame(frame, 24, "ffmpeg"), via_filter)
        np.testing.assert_array_equal(ScaleFilter()(frame, w, h), via_filter)
        bicubic = frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()
        assert not np.array_equal(bicubic, via_filter)
        area = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
        np.testing.assert_array_equal(resize_frame(frame, 24), area)


def test_default_selection_unchanged(tmp_path):
    path = write_noise_video(tmp_path / "a.mkv", 30, num=60)
    frames, _, container = decoded(path)
    with container:
        position = {f.to_ndarray(format="rgb24").tobytes(): i for i, f in enumerate(frames)}
    picked = [position[item[32].tobytes()] for item in iter_frames(path, 2, [32])]
    assert picked == [0, 15, 30, 45]
    assert len(list(iter_frames(path, 2, [32], selection="ffmpeg"))) == 4
    with pytest.raises(ValueError, match="frame selection"):
        next(iter_frames(path, 2, [32], selection="nearest"))


# --------------------------------------------------------------------------------------------------------------
# The manifest records the choice; resume and merge refuse to mix; the CLI offers it


def manifest(**overrides) -> dict:
    base = {
        "dataset": "ucf101",
        "fps": 2,
        "frame_size": 32,
        "grid": [4, 4],
        "tokenizer": {"name": "t", "vocab_size": 16, "fingerprint": "0123456789abcdef"},
        "views": ["r32_center_f0"],
        "classes": ["a", "b"],
    }
    base.update(overrides)
    return base


def write_db(path: Path, **overrides) -> Path:
    with CodeDatabaseWriter(path, manifest(**overrides)) as writer:
        writer.add("v", {"r32_center_f0": np.zeros((2, 4, 4), dtype=np.int64)}, 0, 1.0, 30.0)
        writer.finalize({"train": ["v"]})
    return path


def test_manifest_defaults_for_older_databases():
    assert extraction_method(manifest()) == {"frame_selection": "vimpac", "resize": "area"}
    assert extraction_method(manifest(source={"format": "x"})) == {"frame_selection": "ffmpeg", "resize": "bicubic"}
    old = manifest()
    assert config_differences(old, manifest(frame_selection="vimpac", resize="area")) == []
    assert config_differences(old, manifest(frame_selection="ffmpeg", resize="bicubic")) == [
        "frame_selection: 'vimpac' vs 'ffmpeg'",
        "resize: 'area' vs 'bicubic'",
    ]
    assert set(FRAME_SELECTIONS) == set(CLI_SELECTIONS) and set(FRAME_RESIZE) == set(FRAME_SELECTIONS)


def test_resume_and_merge_refuse_other_frame_selection(tmp_path):
    a = write_db(tmp_path / "a", frame_selection="ffmpeg", resize="bicubic")
    assert CodeDatabase(a).manifest["frame_selection"] == "ffmpeg"
    with pytest.raises(UsageError, match="frame_selection: 'ffmpeg' vs 'vimpac'"):
        CodeDatabaseWriter(a, manifest())
    b = write_db(tmp_path / "b")  # written without the keys: vimpac's own rule
    assert CodeDatabase(b).manifest["frame_selection"] == "vimpac"
    with pytest.raises(UsageError, match="frame_selection"):
        merge(tmp_path / "m", [a, b], progress=False)
    # a database from before the keys existed still resumes and merges with one that records the default
    raw = json.loads((b / "manifest.json").read_text())
    del raw["frame_selection"], raw["resize"]
    (b / "manifest.json").write_text(json.dumps(raw))
    c = write_db(tmp_path / "c", frame_selection="vimpac")
    assert merge(tmp_path / "m2", [b, c], progress=False)["frame_selection"] == "vimpac"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return tiny_vqvae_dir(tmp_path_factory.mktemp("tok"))


def test_tokenize_with_ffmpeg_selection(tmp_path, tok, capsys):
    from tests.test_extract import cli_args, ssv2_dataset
    from vimpac.cli import main as cli_main
    from vimpac.tokenization.tokenizer import load_tokenizer

    files = ssv2_dataset(tmp_path, {"1": 0, "2": 1}, {"3": 2})
    out = tmp_path / "db"
    assert cli_main([*cli_args(tmp_path, files, tok, "--frame-selection", "ffmpeg"), "--out", str(out)]) == 0
    db = CodeDatabase(out)
    assert (db.manifest["frame_selection"], db.manifest["resize"]) == ("ffmpeg", "bicubic")
    assert db.manifest["args"]["frame_selection"] == "ffmpeg"
    views = views_for("center", 64)
    frames = np.concatenate(list(iter_view_frames(tmp_path / "videos" / "2.mp4", 4, views, 64, selection="ffmpeg")), 1)
    codes, _ = db.read("2", views[0].name)
    np.testing.assert_array_equal(codes, load_tokenizer(tok).encode(frames[0]).numpy())
    db.close()
    capsys.readouterr()
    assert cli_main([*cli_args(tmp_path, files, tok), "--out", str(out)]) != 0  # resuming with the default
    assert "frame_selection: 'ffmpeg' vs 'vimpac'" in capsys.readouterr().err
