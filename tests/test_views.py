"""Spatial views: names, the paper's view sets, resize arithmetic, crop offsets and flips against numpy slicing."""

import numpy as np
import pytest

from vimpac.tokenization.views import (
    View,
    apply_view,
    centre_view,
    crop_offsets,
    large_resize,
    resized_size,
    shorter_sides,
    views_for,
)


def test_view_name_round_trip():
    for view in views_for("train", 256):
        assert View.parse(view.name) == view
    assert View(160, "top", True).name == "r160_top_f1"
    assert View.parse("r128_center_f0") == View(128, "center", False)


@pytest.mark.parametrize("bad", ["r128_middle_f0", "128_center_f0", "r128_center_f2", "r128_center_f0x", ""])
def test_view_parse_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="not a view name"):
        View.parse(bad)


def test_view_rejects_unknown_crop_and_bad_size():
    with pytest.raises(ValueError, match="crop"):
        View(128, "left", False)
    with pytest.raises(ValueError, match="positive"):
        View(0, "top", False)


def test_train_views_are_the_twelve_paper_views():
    names = [v.name for v in views_for("train", 128)]
    expected = [f"r{r}_{c}_f{f}" for r in (128, 160) for c in ("top", "center", "bottom") for f in (0, 1)]
    assert names == expected
    assert len(set(names)) == 12
    assert views_for("train", 128) == views_for("train", 128)  # deterministic order


def test_train_views_without_flip_for_ssv2():
    views = views_for("train", 256, hflip=False)
    assert [v.name for v in views] == [f"r{r}_{c}_f0" for r in (256, 320) for c in ("top", "center", "bottom")]


def test_test_and_center_views():
    assert [v.name for v in views_for("test", 128)] == ["r128_top_f0", "r128_center_f0", "r128_bottom_f0"]
    assert views_for("center", 256) == [View(256, "center", False)]
    # hflip only matters for training views
    assert views_for("test", 128, hflip=False) == views_for("test", 128)


def test_unknown_view_kind():
    with pytest.raises(ValueError, match="unknown view kind"):
        views_for("val", 128)


def test_large_resize_matches_code_not_paper_text():
    assert large_resize(128) == 160
    assert large_resize(256) == 320


@pytest.mark.parametrize(
    ("height", "width", "shorter", "expected"),
    [
        (240, 320, 128, (128, 170)),  # 320·128/240 = 170.67, truncated
        (320, 240, 128, (170, 128)),  # portrait
        (360, 640, 160, (160, 284)),  # 284.44
        (1080, 1920, 256, (256, 455)),  # 455.1
        (100, 100, 128, (128, 128)),  # square, upscaled
        (64, 80, 32, (32, 40)),
    ],
)
def test_resized_size_examples(height, width, shorter, expected):
    assert resized_size(height, width, shorter) == expected


def test_resized_size_random_against_integer_floor():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(16, 4000, size=2))
        s = int(rng.integers(16, 400))
        short, long = min(h, w), max(h, w)
        expected_long = long * s // short  # exact floor in integers
        got = resized_size(h, w, s)
        assert got == ((s, expected_long) if h <= w else (expected_long, s))


@pytest.mark.parametrize(
    ("h", "w", "out", "crop", "expected"),
    [
        (128, 170, 128, "top", (0, 0)),
        (128, 170, 128, "center", (0, 21)),  # int(42/2)
        (128, 170, 128, "bottom", (0, 42)),
        (170, 128, 128, "center", (21, 0)),
        (160, 213, 128, "center", (16, 42)),  # int(32/2), int(85/2)
        (160, 213, 128, "bottom", (32, 85)),
        (128, 128, 128, "bottom", (0, 0)),
    ],
)
def test_crop_offsets_examples(h, w, out, crop, expected):
    assert crop_offsets(h, w, out, crop) == expected


def test_crop_larger_than_frame_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        crop_offsets(100, 200, 128, "center")


def coordinate_frame(h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3] whose pixel (y, x) stores (y, x, y+x) mod 256: crops and flips can be read back."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y % 256, x % 256, (y + x) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(160, 213), (213, 160), (128, 128), (170, 128)])
def test_apply_view_matches_numpy_slicing_for_every_view(shape):
    h, w = shape
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    out = 128
    for crop, f in (("top", 0), ("center", 1), ("bottom", 2)):
        y, x = (f * (h - out)) // 2, (f * (w - out)) // 2  # floor == int() for non-negative values
        for flip in (False, True):
            got = apply_view(frame, View(min(h, w), crop, flip), out)
            expected = frame[y : y + out, x : x + out]
            if flip:
                expected = expected[:, ::-1]
            assert got.shape == (out, out, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, expected)


def test_apply_view_corners_read_back_from_coordinates():
    frame = coordinate_frame(160, 213)
    bottom = apply_view(frame, View(160, "bottom", False), 128)
    assert tuple(bottom[0, 0, :2]) == (32, 85)  # top-left pixel of the bottom-right square
    assert tuple(bottom[-1, -1, :2]) == (159, 212)  # frame's bottom-right corner
    flipped = apply_view(frame, View(160, "bottom", True), 128)
    assert tuple(flipped[0, -1, :2]) == (32, 85)  # flip after crop: same pixels, mirrored
    assert tuple(flipped[0, 0, :2]) == (32, 212)
    top = apply_view(frame, View(160, "top", False), 128)
    assert tuple(top[0, 0, :2]) == (0, 0)


def test_apply_view_returns_a_view_without_copying():
    frame = coordinate_frame(160, 213)
    for view in views_for("train", 160):
        assert np.shares_memory(apply_view(frame, view, 128), frame)


def test_shorter_sides_deduplicates_in_order():
    assert shorter_sides(views_for("train", 128)) == [128, 160]
    assert shorter_sides(views_for("test", 256)) == [256]


def test_centre_view_prefers_the_unflipped_centre_at_the_frame_size():
    names = ["r160_top_f0", "r128_center_f1", "r160_center_f0", "r128_center_f0", "r128_bottom_f0"]
    assert centre_view(names) == "r160_center_f0"  # the first unflipped centre, in the database's order
    assert centre_view(names, frame_size=128) == "r128_center_f0"
    assert centre_view(names, frame_size=64) is None
    assert centre_view(["r128_top_f1"]) == "r128_top_f1"  # a database's only view
    assert centre_view(["r128_top_f0", "r128_center_f1", "not_a_view"]) is None
