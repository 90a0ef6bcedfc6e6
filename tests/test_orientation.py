"""Rotated and mirrored videos (a display matrix in the container) decode upright, as players show them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tests.videos import write_video
from vimpac.tokenization.decode import Orientation, iter_frames, iter_view_frames
from vimpac.tokenization.views import views_for

# (degrees counter-clockwise, hflip, vflip): every rotation by a multiple of 90° with and without mirrors.
DISPLAYS = list(itertools.product((0, 90, 180, -90), (False, True), (False, True)))


def libavutil_matrix(degrees: float, hflip: bool, vflip: bool) -> list[int]:
    """av_display_rotation_set(-degrees) followed by av_display_matrix_flip, as PyAV's set_display_rotation does."""
    radians = math.radians(degrees)
    c, s = math.cos(radians), math.sin(radians)
    m = [round(c * 65536), round(-s * 65536), 0, round(s * 65536), round(c * 65536), 0, 0, 0, 1 << 30]
    signs = (-1 if hflip else 1, -1 if vflip else 1, 1)
    return [v * signs[i % 3] for i, v in enumerate(m)]


def ffmpeg_autorotate(matrix: list[int], image: np.ndarray) -> np.ndarray:
    """What the ffmpeg command line's autorotate does to `image` [h, w, C]: its rule (fftools, get_rotation and the
    filters it inserts), written with numpy (transpose=clock is a clockwise quarter turn, cclock_flip a plain
    transpose, and so on)."""
    a, b = matrix[0] / 65536, matrix[1] / 65536
    theta = round(math.degrees(math.atan2(b / math.hypot(b, matrix[4] / 65536), a / math.hypot(a, matrix[3]))))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    transpose = {
        "clock": lambda x: np.rot90(x, -1),
        "cclock": lambda x: np.rot90(x, 1),
        "cclock_flip": lambda x: x.swapaxes(0, 1),
        "clock_flip": lambda x: np.rot90(x, 2).swapaxes(0, 1),
    }
    if abs(theta - 90) < 1:
        return transpose["cclock_flip" if matrix[3] > 0 else "clock"](image)
    if abs(theta - 270) < 1:
        return transpose["clock_flip" if matrix[3] < 0 else "cclock"](image)
    if abs(theta - 180) < 1:
        image = image[:, ::-1] if matrix[0] < 0 else image
        return image[::-1] if matrix[4] < 0 else image
    return image[::-1] if matrix[4] < 0 else image


def shown(stored: np.ndarray, degrees: int, hflip: bool, vflip: bool) -> np.ndarray:
    """What PyAV documents for set_display_rotation: turned `degrees` counter-clockwise, then mirrored."""
    image = np.rot90(stored, degrees // 90)
    image = image[:, ::-1] if hflip else image
    return image[::-1] if vflip else image


@pytest.mark.parametrize("display", DISPLAYS)
def test_orientation_follows_ffmpegs_autorotate(display):
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3))
    matrix = libavutil_matrix(*display)
    expected = ffmpeg_autorotate(matrix, image)
    np.testing.assert_array_equal(Orientation.from_matrix(matrix).apply(image), expected)
    np.testing.assert_array_equal(expected, shown(image, *display))
    # a few degrees off (a sloppy writer) snaps to the same quarter turn
    np.testing.assert_array_equal(
        Orientation.from_matrix(libavutil_matrix(display[0] + 3, *display[1:])).apply(image), expected
    )


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
