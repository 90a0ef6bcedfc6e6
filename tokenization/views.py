"""Spatial views of a video: shorter-side resize, square crop (top-left / centre / bottom-right), optional hflip.

VIMPAC bakes spatial augmentation in at extraction time: every view is stored separately and fine-tuning picks one
per sample (docs/reference.md §2.2, §6.3). The arithmetic here reproduces the original exactly (integer truncation).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CROPS = ("top", "center", "bottom")
VIEW_KINDS = ("train", "test", "center")
_NAME = re.compile(r"r(\d+)_(top|center|bottom)_f([01])")


@dataclass(frozen=True)
class View:
    """One spatial view: resize the shorter side to `shorter` px, take the `crop` square, then flip if `flip`."""

    shorter: int
    crop: str
    flip: bool

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.shorter <= 0:
            raise ValueError(f"shorter side must be positive, got {self.shorter}")

    @property
    def name(self) -> str:
        """Stable identifier, e.g. "r160_top_f1"; used as a directory name in the code database."""
        return f"r{self.shorter}_{self.crop}_f{int(self.flip)}"

    @classmethod
    def parse(cls, name: str) -> View:
        """Inverse of `name`."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"not a view name: {name!r} (expected r<shorter>_<top|center|bottom>_f<0|1>)")
        return cls(int(match[1]), match[2], match[3] == "1")


def centre_view(names: Sequence[str], frame_size: int | None = None) -> str | None:
    """The unflipped centre crop among the view `names` (in their order), resized to `frame_size` when that is
    given (the paper's centre database); a database's only view; None when there is no such view."""
    for name in names:
        try:
            view = View.parse(name)
        except ValueError:
            continue
        if view.crop == "center" and not view.flip and frame_size in (None, view.shorter):
            return name
    return names[0] if len(names) == 1 else None


def large_resize(frame_size: int) -> int:
    """The "1.25×" training resize, derived as S·160//128 like the original (128 -> 160, 256 -> 320)."""
    return frame_size * 160 // 128


def views_for(kind: str, frame_size: int, hflip: bool = True) -> list[View]:
    """The paper's view sets for square frames of side `frame_size` (docs/reference.md §2.2).

    "center": 1 view; "test": 3 crops at S, no flip; "train": {S, 1.25S} × 3 crops × {no flip, flip} = 12 views,
    or 6 without flips when `hflip` is False (SSV2, where left/right carries the label). Order: resize, then crop,
    then flip (deterministic so view lists compare equal across runs).
    """
    if kind == "center":
        return [View(frame_size, "center", False)]
    if kind == "test":
        return [View(frame_size, crop, False) for crop in CROPS]
    if kind == "train":
        flips = (False, True) if hflip else (False,)
        return [
            View(shorter, crop, flip)
            for shorter in (frame_size, large_resize(frame_size))
            for crop in CROPS
            for flip in flips
        ]
    raise ValueError(f"unknown view kind {kind!r}; expected one of {VIEW_KINDS}")


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(h, w) after scaling so the shorter side is `shorter`; the long side is int(long·shorter/short), truncated."""
    if height <= width:
        return shorter, int(width * shorter / height)
    return int(height * shorter / width), shorter


def crop_offsets(height: int, width: int, out: int, crop: str) -> tuple[int, int]:
    """(y, x) of the `out`×`out` square in an [height, width] frame: f = 0/1/2 for top/center/bottom.

    x = int(f·(width−out)/2), y = int(f·(height−out)/2), so "top" is the top-left and "bottom" the bottom-right corner.
    """
    if out > height or out > width:
        raise ValueError(f"crop {out} does not fit in a {height}x{width} frame")
    f = CROPS.index(crop)
    return int(f * (height - out) / 2), int(f * (width - out) / 2)


def apply_view(frame_resized: np.ndarray, view: View, out: int) -> np.ndarray:
    """Crop (then flip) an already resized frame: uint8 [h, w, 3] -> uint8 [out, out, 3].

    Returns a view into `frame_resized` (no copy: callers write it straight into their batch buffer); copy it
    before modifying.
    """
    h, w = frame_resized.shape[:2]
    y, x = crop_offsets(h, w, out, view.crop)
    square = frame_resized[y : y + out, x : x + out]
    return square[:, ::-1] if view.flip else square


def shorter_sides(views: Sequence[View]) -> list[int]:
    """Distinct resize targets of `views`, in first-seen order (each is resized once per source frame)."""
    return list(dict.fromkeys(view.shorter for view in views))


def view_list(text: str | None, flag: str) -> list[str] | None:
    """The view names of a comma list flag (None: the flag was not given); UsageError when it names none."""
    from vimpac.errors import UsageError

    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"{flag} {text!r} names no view; give a comma list such as r128_center_f0,r128_top_f0")
    return names
