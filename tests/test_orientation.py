"""Rotated and mirrored videos (a display matrix in the container) decode upright, as players show them."""

from __future__ import annotations

import itertools
import math

import av
import numpy as np
import pytest

from tests.videos import write_video
from vimpac.tokenization.decode import Orientation, iter_frames, iter_view_frames, resize_frame
from vimpac.tokenization.views import resized_size, views_for

# (degrees counter-clockwise, hflip, vflip): every rotation by a multiple of 90° with and without mirrors.
DISPLAYS = list(itertools.product((0, 90, 180, -90), (False, True), (False, True)))


def libavutil_matrix(degrees: float, hflip: bool, vflip: bool) -> list[int]:
    """av_display_rotation_set(-degrees) followed by av_display_matrix_flip, as PyAV's set_display_rotation does."""
    radians = math.radians(degrees)
    c, s = math.cos(radians), math.sin(radians)
    m = [round(c * 65536), round(-s * 65536), 0, round(s * 65536), round(c * 65536), 0, 0, 0, 1 << 30]
    signs = (-1 if hflip else 1, -1 if vflip else 1, 1)
    return [v * signs[i % 3] for i, v in enumerate(m)]


def ffmpeg_autorotate(matrix: list[int]) -> list[tuple[str, str]]:
    """The filters the ffmpeg command line's autorotate puts before the user's (fftools: get_rotation, then one
    transpose or up to two flips by the angle and the matrix's signs)."""
    a, b = matrix[0] / 65536, matrix[1] / 65536
    theta = round(math.degrees(math.atan2(b / math.hypot(b, matrix[4] / 65536), a / math.hypot(a, matrix[3]))))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return [("transpose", "cclock_flip" if matrix[3] > 0 else "clock")]
    if abs(theta - 270) < 1:
        return [("transpose", "clock_flip" if matrix[3] < 0 else "cclock")]
    flips = [("hflip", "")] if abs(theta - 180) < 1 and matrix[0] < 0 else []
    return [*flips, ("vflip", "")] if matrix[4] < 0 else flips


# The filters as numpy, for images [h, w, C]: clock is a clockwise quarter turn, cclock_flip a plain transpose.
NUMPY_FILTERS = {
    ("transpose", "clock"): lambda x: np.rot90(x, -1),
    ("transpose", "cclock"): lambda x: np.rot90(x, 1),
    ("transpose", "cclock_flip"): lambda x: x.swapaxes(0, 1),
    ("transpose", "clock_flip"): lambda x: np.rot90(x, 2).swapaxes(0, 1),
    ("hflip", ""): lambda x: x[:, ::-1],
    ("vflip", ""): lambda x: x[::-1],
}


def run_filters(filters: list[tuple[str, str]], image: np.ndarray) -> np.ndarray:
    for f in filters:
        image = NUMPY_FILTERS[f](image)
    return image


def shown(stored: np.ndarray, degrees: int, hflip: bool, vflip: bool) -> np.ndarray:
    """What PyAV documents for set_display_rotation: turned `degrees` counter-clockwise, then mirrored."""
    image = np.rot90(stored, degrees // 90)
    image = image[:, ::-1] if hflip else image
    return image[::-1] if vflip else image


@pytest.mark.parametrize("display", DISPLAYS)
def test_orientation_follows_ffmpegs_autorotate(display):
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3))
    matrix = libavutil_matrix(*display)
    expected = run_filters(ffmpeg_autorotate(matrix), image)
    orientation = Orientation.from_matrix(matrix)
    np.testing.assert_array_equal(orientation.apply(image), expected)
    np.testing.assert_array_equal(run_filters(orientation.filters(), image), expected)
    np.testing.assert_array_equal(expected, shown(image, *display))
    # a few degrees off (a sloppy writer) snaps to the same quarter turn
    nearly = Orientation.from_matrix(libavutil_matrix(display[0] + 3, *display[1:]))
    np.testing.assert_array_equal(nearly.apply(image), expected)


def test_no_display_matrix_is_the_identity():
    assert Orientation.from_matrix([65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30]).identity
    assert Orientation.from_matrix([0] * 9).identity  # a degenerate matrix is ignored, not guessed at


def stored_frames() -> np.ndarray:
    """uint8 [4, 32, 48, 3]: flat blocks that tell every corner and both mirrors apart."""
    frames = np.zeros((4, 32, 48, 3), dtype=np.uint8)
    frames[:, :8, :12] = (250, 30, 30)
    frames[:, 20:, 30:] = (30, 250, 30)
    frames[:, :, 40:] += 60
    return frames


@pytest.mark.parametrize("selection", ["vimpac", "ffmpeg"])
def test_rotated_videos_decode_upright(tmp_path, selection):
    """ffv1 4:4:4 is lossless, so the only error is the colour round trip."""
    stored = stored_frames()
    for display in DISPLAYS:
        path = write_video(tmp_path / "a.mkv", frames=stored, display=display)
        expected = shown(stored[0], *display)
        side = min(expected.shape[:2])
        got = next(iter_frames(path, 8, [side], selection=selection))[side]
        assert got.shape == expected.shape, display
        assert np.abs(got.astype(int) - expected).max() <= 2, display


@pytest.mark.parametrize("selection", ["vimpac", "ffmpeg"])
def test_views_of_a_portrait_phone_video_equal_those_of_the_upright_file(tmp_path, selection):
    """A phone's portrait video: stored landscape, shown turned a quarter clockwise (rotation -90). Its views
    (resize, three crops, flips) must be those of the same video stored upright."""
    upright = np.ascontiguousarray(np.rot90(stored_frames(), -1, axes=(1, 2)))  # [4, 48, 32, 3], portrait
    phone = write_video(tmp_path / "phone.mkv", frames=np.rot90(upright, 1, axes=(1, 2)), display=(-90, False, False))
    plain = write_video(tmp_path / "plain.mkv", frames=upright)
    views = views_for("train", 24)
    a, b = (
        np.concatenate(list(iter_view_frames(p, 8, views, 24, selection=selection)), axis=1) for p in (phone, plain)
    )
    assert a.shape == b.shape == (len(views), 4, 24, 24, 3)
    # the area and bicubic filters round rows and columns a little differently
    assert np.abs(a.astype(int) - b).mean() < 1.0


def test_ffmpeg_selection_equals_libavfilter_with_the_command_lines_autorotate(tmp_path):
    """Exact: the filters ffmpeg's autorotate picks, then the original's scale, run by libavfilter itself."""
    stored = np.random.default_rng(1).integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)
    for display in DISPLAYS:
        path = write_video(tmp_path / "a.mp4", frames=stored, display=display)
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)  # none is written for (0, no, no)
            matrix = np.frombuffer(bytes(data), np.int32).tolist() if data else libavutil_matrix(0, False, False)
            filters = ffmpeg_autorotate(matrix)
            h, w = resized_size(*shown(stored[0], *display).shape[:2], 20)
            graph = av.filter.Graph()
            nodes = [graph.add_buffer(template=container.streams.video[0])]
            nodes += [graph.add(name, args) for name, args in [*filters, ("scale", f"{w}:{h}"), ("format", "rgb24")]]
            nodes.append(graph.add("buffersink"))
            for upstream, downstream in itertools.pairwise(nodes):
                upstream.link_to(downstream)
            graph.configure()
            nodes[0].push(frame)
            expected = nodes[-1].pull().to_ndarray()
            np.testing.assert_array_equal(resize_frame(frame, 20, "ffmpeg"), expected, err_msg=str(display))
