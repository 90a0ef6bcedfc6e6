"""Synthetic video corpus: real video files whose classes no single frame tells apart from their group.

`vimpac synth` writes, for a seed, two parts that the rest of the pipeline reads exactly like the real datasets:

* a **labeled** part in the official Something-Something-v2 layout (`something-something-v2-labels.json`,
  `-train.json`, `-validation.json`, videos `videos/<id>.<ext>`), with the classes of `CLASSES`;
* an **unlabeled** part of long videos (≥ 30 s by default) listed in a `HowTo100M_v1.csv`-format file
  (`unlabeled/HowTo100M_v1.csv`, videos `unlabeled/videos/<video_id>.<ext>`), for the long-range contrastive
  objective: each video is one scene whose background and objects stay the same from start to end.

Why single frames cannot tell the classes apart. Classes come in groups; within a group every class shows the
same distribution of single frames (a frame drawn at a random time of a random clip), so a single-frame model is at
chance inside the group and only motion across frames separates the classes. Two constructions do this exactly:

* **time reversal** — the second class of a pair is the first one played backwards (`reverse_scene`). Both show
  the same set of frames in opposite order, and every nuisance (background drift, distractors) has a distribution
  that is unchanged by reversal (drift directions are uniform), so any order-free statistic of the frames matches.
* **per-frame matching** — the classes differ by something that leaves every frame's distribution unchanged at
  every time (bouncing vs passing through a wall: the side of the wall is a fair coin in both, the distance to the
  wall is the same function of time; colour order: colours are drawn independently from one palette).

The renderer is pure and vectorised: a `Scene` (background texture parameters + objects with key-framed tracks of
position, size, angle, opacity and colour) gives a uint8 [H, W, 3] frame at any time t. Shapes are signed-distance
functions, so edges are anti-aliased. All randomness comes from `numpy.random.Generator`s seeded by
(seed, part, split, class, index): the same seed gives identical frames whatever the number of workers, and a
class subset gives the same videos for its classes as the full set.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

from vimpac.atomic_write import atomic_path, write_json_atomic
from vimpac.errors import UsageError

# ----------------------------------------------------------------------------------------------------------------
# Colours and shapes

# Saturated colours for objects, named so placeholders can say "a red triangle". Backgrounds are desaturated
# (see `_sample_background`), so objects always stand out.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 30),
    "purple": (140, 60, 195),
    "cyan": (40, 205, 215),
    "magenta": (225, 50, 185),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
WALL_COLOURS = ("brown", "black", "white")
_EXTRA_COLOURS = {"brown": (125, 80, 40)}


def _box(u: np.ndarray, v: np.ndarray, cx: float, cy: float, hx: float, hy: float) -> np.ndarray:
    """Signed distance (positive inside; exact inside, a lower bound outside) to an axis-aligned box."""
    return np.minimum(hx - np.abs(u - cx), hy - np.abs(v - cy))


def _convex(u: np.ndarray, v: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Signed distance to a convex polygon = the smallest distance to its edge lines (positive inside)."""
    pts = np.asarray(vertices, dtype=np.float64)
    centre = pts.mean(axis=0)
    out = None
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        ex, ey = x1 - x0, y1 - y0
        norm = np.hypot(ex, ey)
        sign = np.sign(ex * (centre[1] - y0) - ey * (centre[0] - x0))  # orientation-free: the centre is inside
        d = sign * (ex * (v - y0) - ey * (u - x0)) / norm
        out = d if out is None else np.minimum(out, d)
    return out


def _radius(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


# Shapes in unit coordinates (u right, v down; the shape fits the unit disc's neighbourhood, |point| ≤ SHAPE_REACH).
SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: 1.0 - _radius(u, v),
    "square": lambda u, v: _box(u, v, 0.0, 0.0, 0.85, 0.85),
    "triangle": lambda u, v: _convex(u, v, [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]),
    "cross": lambda u, v: np.maximum(_box(u, v, 0, 0, 0.95, 0.32), _box(u, v, 0, 0, 0.32, 0.95)),
    "ring": lambda u, v: np.minimum(1.0 - _radius(u, v), _radius(u, v) - 0.55),
    "L-shape": lambda u, v: np.maximum(_box(u, v, -0.45, 0.0, 0.3, 0.95), _box(u, v, 0.0, 0.65, 0.75, 0.3)),
    "T-shape": lambda u, v: np.maximum(_box(u, v, 0.0, -0.65, 0.85, 0.3), _box(u, v, 0.0, 0.0, 0.3, 0.95)),
    "arrow": lambda u, v: np.maximum(
        _box(u, v, -0.4, 0.0, 0.55, 0.24), _convex(u, v, [(0.95, 0.0), (0.05, -0.7), (0.05, 0.7)])
    ),
    "half-disc": lambda u, v: np.minimum(1.0 - _radius(u, v), 0.25 - v),
    "bar": lambda u, v: _box(u, v, 0.0, 0.0, 1.0, 1.0),
}
SHAPE_REACH = 1.3  # no shape point lies farther than this from its centre (unit coordinates)
OBJECT_SHAPES = tuple(name for name in SHAPES if name != "bar")
# No rotational symmetry: the sense of rotation is unambiguous between any two frames.
ASYMMETRIC_SHAPES = ("L-shape", "T-shape", "arrow", "half-disc")


def describe(shape: str, colour: str) -> str:
    """Placeholder text like SSV2's: "a red triangle", "an orange L-shape"."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


# ----------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True, eq=False)
class Track:
    """Key-framed state of one object. times: [K] seconds, non-decreasing (a repeated time is a jump: from that
    time on the later key holds); x, y: [K] pixel centre (y down); size: [K] px (unit shape → px scale); angle: [K]
    radians (increasing = clockwise on screen); alpha: [K] opacity 0..1; colour: [K, 3] RGB 0..255. Values between
    keys are linear in time."""

    times: np.ndarray
    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    angle: np.ndarray
    alpha: np.ndarray
    colour: np.ndarray

    def at(self, t: float) -> dict[str, np.ndarray]:
        """State at time t (seconds): dict of floats (x, y, size, angle, alpha) and colour [3]."""
        k = len(self.times)
        i = int(np.clip(np.searchsorted(self.times, t, side="right") - 1, 0, max(k - 2, 0)))
        j = min(i + 1, k - 1)
        span = self.times[j] - self.times[i]
        w = float(np.clip((t - self.times[i]) / span, 0.0, 1.0)) if span > 0 else 1.0
        return {
            name: (1 - w) * getattr(self, name)[i] + w * getattr(self, name)[j]
            for name in ("x", "y", "size", "angle", "alpha", "colour")
        }

    def reversed(self, t_last: float) -> Track:
        """The same motion played backwards over [0, t_last]."""
        return Track(
            t_last - self.times[::-1],
            *(getattr(self, name)[::-1].copy() for name in ("x", "y", "size", "angle", "alpha", "colour")),
        )


def make_track(times: Sequence[float], **values) -> Track:
    """Build a Track; scalars (or a 3-tuple for colour) are held constant over all keys. Defaults: alpha 1, angle 0."""
    times = np.asarray(times, dtype=np.float64)
    k = len(times)
    values.setdefault("alpha", 1.0)
    values.setdefault("angle", 0.0)
    fields = {}
    for name in ("x", "y", "size", "angle", "alpha"):
        fields[name] = np.broadcast_to(np.asarray(values[name], dtype=np.float64), (k,)).copy()
    colour = np.asarray(values["colour"], dtype=np.float64)
    fields["colour"] = np.broadcast_to(colour, (k, 3)).copy()
    return Track(times, **fields)


@dataclass(frozen=True, eq=False)
class SceneObject:
    """A shape on a track. role: "main" (carries the class), "wall", "distractor", "left"/"right" (order
    classes), "actor" (unlabeled scenes); aspect: width / height of the unit shape (walls are thin bars)."""

    shape: str
    track: Track
    role: str = "main"
    aspect: float = 1.0

    def name(self, t: float = 0.0) -> str:
        """Placeholder text from the shape and the palette colour nearest to the colour at time t."""
        rgb = self.track.at(t)["colour"]
        colours = {**PALETTE, **_EXTRA_COLOURS}
        colour = min(colours, key=lambda c: float(np.sum((np.asarray(colours[c]) - rgb) ** 2)))
        return describe("wall" if self.role == "wall" else self.shape, colour)


@dataclass(frozen=True, eq=False)
class Background:
    """Texture c0 + (c1 - c0)·g(x - offset - velocity·t) with g in [0, 1] built from plane waves.
    kind: "stripes" (wave 0), "checker" (waves 0 and 1, sharpened), "blobs" (all waves summed);
    waves: [M, 4] rows (kx, ky in radians per px, phase, amplitude); velocity, offset: (vx, vy) px/s, px."""

    kind: str
    colour0: tuple[float, float, float]
    colour1: tuple[float, float, float]
    waves: np.ndarray
    velocity: tuple[float, float]
    offset: tuple[float, float]


@dataclass(frozen=True, eq=False)
class Scene:
    """Everything needed to render a video: frame k is at time k / fps, k < num_frames."""

    height: int
    width: int
    fps: int
    num_frames: int
    background: Background
    objects: tuple[SceneObject, ...]

    @property
    def t_last(self) -> float:
        return (self.num_frames - 1) / self.fps

    def times(self) -> np.ndarray:
        return np.arange(self.num_frames) / self.fps


def reverse_scene(scene: Scene) -> Scene:
    """The scene played backwards: frame k of the result equals frame num_frames-1-k of `scene`."""
    bg = scene.background
    t_last = scene.t_last
    offset = (bg.offset[0] + bg.velocity[0] * t_last, bg.offset[1] + bg.velocity[1] * t_last)
    background = replace(bg, velocity=(-bg.velocity[0], -bg.velocity[1]), offset=offset)
    objects = tuple(replace(o, track=o.track.reversed(t_last)) for o in scene.objects)
    return replace(scene, background=background, objects=objects)


# ----------------------------------------------------------------------------------------------------------------
# Renderer


@lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: y [H, 1], x [1, W] (float32, read-only: shared between calls)."""
    y = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
    x = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    y.flags.writeable = x.flags.writeable = False
    return y, x


def render_background(bg: Background, height: int, width: int, t: float) -> np.ndarray:
    """float32 [3, H, W] in 0..255 (channels first: numpy broadcasts over a trailing axis of 3 very slowly)."""
    y, x = _pixel_grid(height, width)
    x = x - np.float32(bg.offset[0] + bg.velocity[0] * t)
    y = y - np.float32(bg.offset[1] + bg.velocity[1] * t)
    used = {"stripes": 1, "checker": 2}.get(bg.kind, len(bg.waves))
    waves = [np.sin(np.float32(kx) * x + np.float32(ky) * y + np.float32(ph)) for kx, ky, ph, _ in bg.waves[:used]]
    if bg.kind == "stripes":
        g = 0.5 + 0.5 * waves[0]
    elif bg.kind == "checker":
        g = 0.5 + 0.5 * np.tanh(3.0 * waves[0] * waves[1])
    else:
        amps = bg.waves[:, 3].astype(np.float32)
        g = 0.5 + 0.5 * sum(a * w for a, w in zip(amps, waves)) / amps.sum()
    c0 = np.asarray(bg.colour0, dtype=np.float32)[:, None, None]
    c1 = np.asarray(bg.colour1, dtype=np.float32)[:, None, None]
    return c0 + (c1 - c0) * g[None]


def _coverage(obj: SceneObject, t: float, height: int, width: int) -> tuple[slice, slice, np.ndarray] | None:
    """(rows, cols, cover): the share of each pixel that `obj` covers at time t (float32 in 0..1, alpha
    included) over its bounding box rows × cols; None when it covers nothing."""
    s = obj.track.at(t)
    size, alpha = float(s["size"]), float(s["alpha"])
    if size <= 0 or alpha <= 0:
        return None
    reach = SHAPE_REACH * size * max(1.0, obj.aspect) + 2
    x0, x1 = max(int(s["x"] - reach), 0), min(int(s["x"] + reach) + 1, width)
    y0, y1 = max(int(s["y"] - reach), 0), min(int(s["y"] + reach) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None] - np.float32(s["y"])
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :] - np.float32(s["x"])
    cos, sin = np.float32(np.cos(s["angle"])), np.float32(np.sin(s["angle"]))
    # world = R(angle) · local, so local = R(-angle) · world; with y down a growing angle turns clockwise.
    u = (cos * dx + sin * dy) / np.float32(size * obj.aspect)
    v = (-sin * dx + cos * dy) / np.float32(size)
    distance_px = SHAPES[obj.shape](u, v) * np.float32(size * min(1.0, obj.aspect))
    return slice(y0, y1), slice(x0, x1), np.clip(distance_px + 0.5, 0.0, 1.0) * np.float32(alpha)


def draw_object(image: np.ndarray, obj: SceneObject, t: float) -> None:
    """Composite `obj` at time t onto image (float32 [3, H, W], modified in place), over its bounding box only."""
    covered = _coverage(obj, t, *image.shape[1:])
    if covered is None:
        return
    rows, cols, cover = covered
    patch = image[:, rows, cols]
    patch += (obj.track.at(t)["colour"].astype(np.float32)[:, None, None] - patch) * cover


def render_frame(scene: Scene, t: float) -> np.ndarray:
    """uint8 [H, W, 3] frame of `scene` at time t (seconds)."""
    image = render_background(scene.background, scene.height, scene.width, t)
    for obj in scene.objects:
        draw_object(image, obj, t)
    planes = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    frame = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    for channel in range(3):  # channel-wise copies beat a transpose + copy by ~3x
        frame[..., channel] = planes[channel]
    return frame


# Objects that carry what a clip is about; walls and distractors are scenery.
SUBJECT_ROLES = frozenset({"main", "left", "right", "actor"})


def render_subjects(scene: Scene, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the frame at time t shows of its subjects (objects of SUBJECT_ROLES), for measuring how well a tokenizer
    keeps them: (coverage float32 [H, W] in 0..1: how much of each pixel the visible subjects cover, after the
    objects drawn in front of them; colour float32 [H, W, 3]: the colour of the front-most subject at each pixel;
    scenery float32 [H, W, 3]: the frame with the subjects left out)."""
    scenery = render_background(scene.background, scene.height, scene.width, t)
    coverage = np.zeros((scene.height, scene.width), dtype=np.float32)
    colour = np.zeros((3, scene.height, scene.width), dtype=np.float32)
    for obj in scene.objects:
        covered = _coverage(obj, t, scene.height, scene.width)
        if covered is None:
            continue
        rows, cols, cover = covered
        if obj.role in SUBJECT_ROLES:
            coverage[rows, cols] += (1.0 - coverage[rows, cols]) * cover
            rgb = obj.track.at(t)["colour"].astype(np.float32)[:, None, None]
            colour[:, rows, cols] += (rgb - colour[:, rows, cols]) * cover
        else:
            coverage[rows, cols] *= 1.0 - cover
            draw_object(scenery, obj, t)
    return coverage, colour.transpose(1, 2, 0), scenery.transpose(1, 2, 0)


def iter_frames(scene: Scene) -> Iterator[np.ndarray]:
    """Frames uint8 [H, W, 3] at t = k / fps, k = 0..num_frames-1, one at a time (long videos never in memory)."""
    for t in scene.times():
        yield render_frame(scene, float(t))


def render_video(scene: Scene) -> np.ndarray:
    """All frames: uint8 [num_frames, H, W, 3]."""
    return np.stack(list(iter_frames(scene)))


# ----------------------------------------------------------------------------------------------------------------
# Random scene parts shared by all classes


@dataclass(frozen=True)
class Canvas:
    """Frame geometry and look for samplers: height, width (px), fps, num_frames; m = shorter side; T = last frame
    time; object_scale multiplies every object size; smooth: backgrounds of long waves and low contrast."""

    height: int
    width: int
    fps: int
    num_frames: int
    object_scale: float = 1.0
    smooth: bool = False

    @property
    def m(self) -> float:
        return float(min(self.height, self.width))

    @property
    def T(self) -> float:
        return (self.num_frames - 1) / self.fps


def _sample_background(rng: np.random.Generator, c: Canvas, speed: float) -> Background:
    """Desaturated two-colour texture drifting in a uniform direction (so reversal leaves its law unchanged).
    Smooth (`c.smooth`): soft blobs of waves 0.6–1.5 frame sides long and half the contrast, so the objects hold
    most of a frame's detail (a small tokenizer then spends its codes on them, not on the texture)."""
    kind = "blobs" if c.smooth else str(rng.choice(["stripes", "checker", "blobs"]))
    grey = rng.uniform(70, 185)
    tint = rng.uniform(-18, 18, size=3)
    contrast = rng.uniform(10, 28) if c.smooth else rng.uniform(20, 55)
    contrast *= rng.choice([-1, 1])
    colour0 = tuple(float(v) for v in np.clip(grey + tint - contrast / 2, 0, 255))
    colour1 = tuple(float(v) for v in np.clip(grey + tint + contrast / 2, 0, 255))
    directions = rng.uniform(0, 2 * np.pi, size=4)
    wavelengths = rng.uniform(0.6, 1.5, size=4) * c.m if c.smooth else rng.uniform(0.08, 0.4, size=4) * c.m
    k = 2 * np.pi / wavelengths
    waves = np.stack(
        [k * np.cos(directions), k * np.sin(directions), rng.uniform(0, 2 * np.pi, 4), rng.uniform(0.3, 1, 4)], 1
    )
    heading = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(0, speed) * c.m
    return Background(
        kind=kind,
        colour0=colour0,
        colour1=colour1,
        waves=waves,
        velocity=(float(v * np.cos(heading)), float(v * np.sin(heading))),
        offset=(float(rng.uniform(0, c.m)), float(rng.uniform(0, c.m))),
    )


def _colour(rng: np.random.Generator, exclude: Sequence[str] = ()) -> tuple[str, np.ndarray]:
    """A palette colour (name, RGB) with a little jitter so objects of one name are not pixel-identical."""
    names = [n for n in PALETTE if n not in exclude]
    name = str(rng.choice(names))
    return name, np.clip(np.asarray(PALETTE[name], dtype=np.float64) + rng.uniform(-10, 10, 3), 0, 255)


def _main_size(rng: np.random.Generator, c: Canvas) -> float:
    return float(rng.uniform(0.07, 0.12) * c.m * c.object_scale)


def _margin(size: float) -> float:
    return SHAPE_REACH * size + 1


def _distractors(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
    """0–2 small objects drifting slowly in uniform directions: the same law for every class and under reversal."""
    out = []
    for _ in range(int(rng.integers(0, 3))):
        size = float(rng.uniform(0.035, 0.06) * c.m * c.object_scale)
        margin = _margin(size)
        x, y = rng.uniform(margin, c.width - margin), rng.uniform(margin, c.height - margin)
        heading, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.05) * c.m
        _, rgb = _colour(rng)
        track = make_track(
            [0.0, c.T],
            x=[x, x + speed * c.T * np.cos(heading)],
            y=[y, y + speed * c.T * np.sin(heading)],
            size=size,
            angle=rng.uniform(0, 2 * np.pi),
            colour=rgb,
        )
        out.append(SceneObject(str(rng.choice(OBJECT_SHAPES)), track, role="distractor"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Class samplers: rng, canvas -> the class-carrying objects (drawn in front of the distractors)


def _segment(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float]:
    """A random segment (start, end) inside [lo, hi], length 45–85 % of it, placed uniformly."""
    length = (hi - lo) * rng.uniform(0.45, 0.85)
    centre = rng.uniform(lo + length / 2, hi - length / 2)
    return centre - length / 2, centre + length / 2


def _translate(axis: int) -> Callable[[np.random.Generator, Canvas], list[SceneObject]]:
    """Constant-speed motion along +x (axis 0) or +y (axis 1) inside the centred m×m square.

    The perpendicular coordinate is a uniform point of an independent segment drawn the same way, so (x, y) of a
    time-shuffled frame is a product of two identical laws for both axes: right/left/down/up all match."""

    def sample(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
        size = _main_size(rng, c)
        margin = _margin(size)
        start, end = _segment(rng, margin, c.m - margin)
        p0, p1 = _segment(rng, margin, c.m - margin)
        across = rng.uniform(p0, p1)
        ox, oy = (c.width - c.m) / 2, (c.height - c.m) / 2
        along = np.array([start, end])
        xs, ys = (ox + along, oy + across) if axis == 0 else (ox + across, oy + along)
        _, rgb = _colour(rng)
        track = make_track([0.0, c.T], x=xs, y=ys, size=size, angle=rng.uniform(0, 2 * np.pi), colour=rgb)
        return [SceneObject(str(rng.choice(OBJECT_SHAPES)), track)]

    return sample


def _rotate(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
    """Turning clockwise at 90–200 °/s (< 60° between frames at ≥ 4 fps) from a uniform starting angle."""
    size = _main_size(rng, c)
    margin = _margin(size)
    x, y = rng.uniform(margin, c.width - margin), rng.uniform(margin, c.height - margin)
    angle0 = rng.uniform(0, 2 * np.pi)
    omega = np.deg2rad(rng.uniform(90, 200))
    _, rgb = _colour(rng)
    track = make_track([0.0, c.T], x=x, y=y, size=size, angle=[angle0, angle0 + omega * c.T], colour=rgb)
    return [SceneObject(str(rng.choice(ASYMMETRIC_SHAPES)), track)]


def _grow(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
    """Size from 4–6 % to 11–15 % of the shorter side, linear in time, fixed position."""
    small, big = (rng.uniform(lo, hi) * c.m * c.object_scale for lo, hi in ((0.04, 0.06), (0.11, 0.15)))
    margin = _margin(big)
    x, y = rng.uniform(margin, c.width - margin), rng.uniform(margin, c.height - margin)
    _, rgb = _colour(rng)
    track = make_track([0.0, c.T], x=x, y=y, size=[small, big], angle=rng.uniform(0, 2 * np.pi), colour=rgb)
    return [SceneObject(str(rng.choice(OBJECT_SHAPES)), track)]


def _step_times(rng: np.random.Generator, c: Canvas, lo: float = 0.25, hi: float = 0.75) -> tuple[float, float]:
    """An event at a uniform time in [lo, hi]·T lasting 1.5 frames (a quick fade, not a pop)."""
    start = rng.uniform(lo, hi) * c.T
    return start, min(start + 1.5 / c.fps, c.T)


def _appear(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
    """Absent, then fades in within 1.5 frames at a uniform time in the middle half of the clip."""
    size = _main_size(rng, c)
    margin = _margin(size)
    x, y = rng.uniform(margin, c.width - margin), rng.uniform(margin, c.height - margin)
    t0, t1 = _step_times(rng, c)
    _, rgb = _colour(rng)
    track = make_track(
        [0.0, t0, t1, c.T], x=x, y=y, size=size, angle=rng.uniform(0, 2 * np.pi), alpha=[0, 0, 1, 1], colour=rgb
    )
    return [SceneObject(str(rng.choice(OBJECT_SHAPES)), track)]


def _contact(through: bool) -> Callable[[np.random.Generator, Canvas], list[SceneObject]]:
    """An object moving horizontally meets a vertical wall at time t_b and bounces back (or, `through`, continues
    on the other side: the path after t_b mirrored across the wall). The starting side is a fair coin, so the side
    in any frame is a fair coin independent of the distance to the wall, which is the same function of time for
    both classes; the object never overlaps the wall at a frame time."""

    def sample(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
        half_w = 0.02 * c.m + 1
        half_h = rng.uniform(0.3, 0.42) * c.height
        wall_x = c.width / 2 + rng.uniform(-0.08, 0.08) * c.width
        wall_y = c.height / 2 + rng.uniform(-0.05, 0.05) * c.height
        size = _main_size(rng, c)
        reach = SHAPE_REACH * size
        contact = half_w + reach + 1
        room = min(wall_x, c.width - wall_x) - contact - reach - 1
        t_b = rng.uniform(0.3, 0.7) * c.T
        speed = room * rng.uniform(0.5, 1.0) / max(t_b, c.T - t_b)
        side = rng.choice([-1.0, 1.0])
        before, after = contact + speed * t_b, contact + speed * (c.T - t_b)
        if through:
            times, xs = [0.0, t_b, t_b, c.T], [side * before, side * contact, -side * contact, -side * after]
        else:
            times, xs = [0.0, t_b, c.T], [side * before, side * contact, side * after]
        y = wall_y + rng.uniform(-0.6, 0.6) * half_h
        _, rgb = _colour(rng)
        track = make_track(times, x=wall_x + np.array(xs), y=y, size=size, angle=rng.uniform(0, 2 * np.pi), colour=rgb)
        wall_colour = str(rng.choice(WALL_COLOURS))
        wall_rgb = {**PALETTE, **_EXTRA_COLOURS}[wall_colour]
        wall = make_track([0.0, c.T], x=wall_x, y=wall_y, size=half_h, colour=wall_rgb)
        return [
            SceneObject("bar", wall, role="wall", aspect=half_w / half_h),
            SceneObject(str(rng.choice(OBJECT_SHAPES)), track),
        ]

    return sample


def _colour_order(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
    """Two objects (left third, right third) each change colour once; the left one first (gap 20–40 % of T).
    Old and new colours are independent palette draws, so every frame shows two random colours in both orders."""
    t_first = rng.uniform(0.15, 0.45) * c.T
    t_second = t_first + rng.uniform(0.2, 0.4) * c.T
    objects = []
    for role, (lo, hi), t0 in (("left", (0.15, 0.4), t_first), ("right", (0.6, 0.85), t_second)):
        size = _main_size(rng, c)
        margin = _margin(size)
        x, y = rng.uniform(lo, hi) * c.width, rng.uniform(margin, c.height - margin)
        old_name, old = _colour(rng)
        _, new = _colour(rng, exclude=[old_name])
        t1 = min(t0 + 1.5 / c.fps, c.T)
        track = make_track(
            [0.0, t0, t1, c.T], x=x, y=y, size=size, angle=rng.uniform(0, 2 * np.pi), colour=[old, old, new, new]
        )
        objects.append(SceneObject(str(rng.choice(OBJECT_SHAPES)), track, role=role))
    return objects


def _start(rng: np.random.Generator, c: Canvas) -> list[SceneObject]:
    """Still, then moves at constant speed in a uniform direction from a uniform time in the middle half."""
    size = _main_size(rng, c)
    margin = _margin(size)
    t0 = rng.uniform(0.25, 0.75) * c.T
    heading = rng.uniform(0, 2 * np.pi)
    dx, dy = np.cos(heading), np.sin(heading)
    length = rng.uniform(0.2, 0.4) * c.m * (c.T - t0)
    length = min(
        length, (c.width - 2 * margin - 1) / max(abs(dx), 1e-6), (c.height - 2 * margin - 1) / max(abs(dy), 1e-6)
    )
    cx = rng.uniform(margin + abs(dx) * length / 2, c.width - margin - abs(dx) * length / 2)
    cy = rng.uniform(margin + abs(dy) * length / 2, c.height - margin - abs(dy) * length / 2)
    p0, p1 = (cx - dx * length / 2, cy - dy * length / 2), (cx + dx * length / 2, cy + dy * length / 2)
    _, rgb = _colour(rng)
    track = make_track(
        [0.0, t0, c.T],
        x=[p0[0], p0[0], p1[0]],
        y=[p0[1], p0[1], p1[1]],
        size=size,
        angle=rng.uniform(0, 2 * np.pi),
        colour=rgb,
    )
    return [SceneObject(str(rng.choice(OBJECT_SHAPES)), track)]


@dataclass(frozen=True)
class ClassSpec:
    """One labeled class. template: SSV2-style text with [something] placeholders; group: classes with the same
    single-frame distribution; sample + reverse: the objects come from `sample`, played backwards if `reverse`;
    roles: which objects fill the placeholders, in order; why: why no single frame tells it from its group."""

    key: str
    template: str
    group: str
    sample: Callable[[np.random.Generator, Canvas], list[SceneObject]] = field(repr=False)
    reverse: bool
    roles: tuple[str, ...]
    why: str

    @property
    def label_name(self) -> str:
        """The key of something-something-v2-labels.json: the template without brackets."""
        return self.template.replace("[", "").replace("]", "")


_REVERSAL = "{b} is {a} played backwards: both show the same frames in opposite order"
_TRANSLATE_WHY = (
    _REVERSAL + "; path centre, length and the perpendicular coordinate have one law on a centred square for all "
    "four directions, so a frame's position, size and colour are distributed alike for right/left/down/up."
)
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec(
        "right",
        "Moving [something] from left to right",
        "translate",
        _translate(0),
        False,
        ("main",),
        _TRANSLATE_WHY.format(a="right", b="left"),
    ),
    ClassSpec(
        "left",
        "Moving [something] from right to left",
        "translate",
        _translate(0),
        True,
        ("main",),
        _TRANSLATE_WHY.format(a="right", b="left"),
    ),
    ClassSpec(
        "down",
        "Moving [something] down",
        "translate",
        _translate(1),
        False,
        ("main",),
        _TRANSLATE_WHY.format(a="down", b="up"),
    ),
    ClassSpec(
        "up",
        "Moving [something] up",
        "translate",
        _translate(1),
        True,
        ("main",),
        _TRANSLATE_WHY.format(a="down", b="up"),
    ),
    ClassSpec(
        "clockwise",
        "Turning [something] clockwise",
        "rotate",
        _rotate,
        False,
        ("main",),
        _REVERSAL.format(a="clockwise", b="counterclockwise") + "; the starting angle is uniform, so the "
        "orientation in any frame is uniform for both; shapes have no rotational symmetry.",
    ),
    ClassSpec(
        "counterclockwise",
        "Turning [something] counterclockwise",
        "rotate",
        _rotate,
        True,
        ("main",),
        _REVERSAL.format(a="clockwise", b="counterclockwise") + "; the starting angle is uniform, so the "
        "orientation in any frame is uniform for both; shapes have no rotational symmetry.",
    ),
    ClassSpec(
        "grow",
        "[Something] growing bigger",
        "scale",
        _grow,
        False,
        ("main",),
        _REVERSAL.format(a="growing", b="shrinking") + "; both sweep the same size range at the same rate.",
    ),
    ClassSpec(
        "shrink",
        "[Something] shrinking",
        "scale",
        _grow,
        True,
        ("main",),
        _REVERSAL.format(a="growing", b="shrinking") + "; both sweep the same size range at the same rate.",
    ),
    ClassSpec(
        "appear",
        "[Something] appearing",
        "visibility",
        _appear,
        False,
        ("main",),
        _REVERSAL.format(a="appearing", b="disappearing") + "; the object is present in the same fraction of "
        "frames (half on average) for both.",
    ),
    ClassSpec(
        "disappear",
        "[Something] disappearing",
        "visibility",
        _appear,
        True,
        ("main",),
        _REVERSAL.format(a="appearing", b="disappearing") + "; the object is present in the same fraction of "
        "frames (half on average) for both.",
    ),
    ClassSpec(
        "bounce",
        "Bouncing [something] off [something]",
        "contact",
        _contact(False),
        False,
        ("main", "wall"),
        "passing through is bouncing with the path after contact mirrored across the wall; the side is a fair "
        "coin and the distance to the wall the same function of time in both, at every frame.",
    ),
    ClassSpec(
        "through",
        "[Something] passing through [something]",
        "contact",
        _contact(True),
        False,
        ("main", "wall"),
        "passing through is bouncing with the path after contact mirrored across the wall; "
        "the side is a fair coin and the distance to the wall the same function of time in both, at every "
        "frame.",
    ),
    ClassSpec(
        "left_first",
        "[Something] on the left changing colour before [something] on the right",
        "order",
        _colour_order,
        False,
        ("left", "right"),
        _REVERSAL.format(a="left-first", b="right-first") + "; old and new colours are independent draws from "
        "one palette, so every frame shows two random colours in both orders.",
    ),
    ClassSpec(
        "right_first",
        "[Something] on the right changing colour before [something] on the left",
        "order",
        _colour_order,
        True,
        ("right", "left"),
        _REVERSAL.format(a="left-first", b="right-first") + "; old and new colours are independent draws from "
        "one palette, so every frame shows two random colours in both orders.",
    ),
    ClassSpec(
        "start",
        "[Something] starting to move",
        "onset",
        _start,
        False,
        ("main",),
        _REVERSAL.format(a="starting", b="stopping") + "; the still part and the path have one law.",
    ),
    ClassSpec(
        "stop",
        "[Something] coming to a stop",
        "onset",
        _start,
        True,
        ("main",),
        _REVERSAL.format(a="starting", b="stopping") + "; the still part and the path have one law.",
    ),
)
CLASS_KEYS = tuple(spec.key for spec in CLASSES)


def fill_template(template: str, placeholders: Sequence[str]) -> str:
    """SSV2's `label`: the template lower-cased with each [..] replaced by the next placeholder (kept as written)."""
    parts = template.split("[")
    out = parts[0].lower()
    for part, text in zip(parts[1:], placeholders):
        out += text + part.split("]", 1)[1].lower()
    return out


@dataclass(frozen=True, eq=False)
class Look:
    """A video's appearance when a corpus draws from a fixed set of them (SynthConfig.looks): a still background
    and the class-carrying object's shape, colour [3] RGB and starting angle (radians)."""

    background: Background
    shape: str
    colour: np.ndarray
    angle: float


def sample_looks(seed: int, count: int, canvas: Canvas) -> list[Look]:
    """`count` looks from the corpus seed alone, so every split and class draws from the same set."""
    rng = _rng(seed, _PART_LOOKS)
    return [
        Look(
            _sample_background(rng, canvas, speed=0.0),
            str(rng.choice(OBJECT_SHAPES)),
            _colour(rng)[1],
            float(rng.uniform(0, 2 * np.pi)),
        )
        for _ in range(count)
    ]


def _dress(obj: SceneObject, look: Look) -> SceneObject:
    """`obj` in the look's shape and colour, turned so it starts at the look's angle (its own turning is kept). A
    colour that changes along the track carries the class (colour order), so it is left alone."""
    track = obj.track
    constant = bool(np.all(track.colour == track.colour[0]))
    colour = np.broadcast_to(look.colour, track.colour.shape).copy() if constant else track.colour
    track = replace(track, angle=track.angle - track.angle[0] + look.angle, colour=colour)
    return replace(obj, shape=look.shape, track=track)


def labeled_scene(
    spec: ClassSpec, rng: np.random.Generator, canvas: Canvas, calm: bool = False, looks: Sequence[Look] = ()
) -> tuple[Scene, list[str]]:
    """A random clip of class `spec` on `canvas`: (scene, placeholders named at the first frame). `calm`: a still
    background and no distractors, so the class's motion is the only change between frames (an easier corpus).
    `looks`: the background and the main object's appearance come from one of these (drawn uniformly), so what
    tells two videos apart is mostly their motion (a harder contrastive task; see SynthConfig.looks)."""
    look = looks[int(rng.integers(len(looks)))] if looks else None
    background = look.background if look else _sample_background(rng, canvas, speed=0.0 if calm else 0.06)
    distractors = [] if calm else _distractors(rng, canvas)
    main = spec.sample(rng, canvas)
    if look:
        main = [_dress(o, look) if o.role == "main" else o for o in main]
    scene = Scene(canvas.height, canvas.width, canvas.fps, canvas.num_frames, background, (*distractors, *main))
    if spec.reverse:
        scene = reverse_scene(scene)
    by_role = {o.role: o for o in scene.objects}
    return scene, [by_role[role].name(0.0) for role in spec.roles]


def _wander(rng: np.random.Generator, times: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A smooth bounded path: sum of 3 sinusoids of 0.02–0.15 Hz mapped into [lo, hi]."""
    freqs = rng.uniform(0.02, 0.15, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    amps = rng.uniform(0.3, 1.0, 3)
    wave = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * times[None] + phases[:, None])).sum(0) / amps.sum()
    return lo + (hi - lo) * (0.5 + 0.5 * wave)


def unlabeled_scene(rng: np.random.Generator, canvas: Canvas) -> Scene:
    """A long scene that keeps its identity: one background (fixed texture, slow drift) and 2–4 objects with fixed
    shape, colour and base size that wander, turn and breathe for the whole video (keys every 0.25 s)."""
    background = _sample_background(rng, canvas, speed=0.03)
    keys = np.arange(0.0, canvas.T + 0.25, 0.25)
    objects = []
    for _ in range(int(rng.integers(2, 5))):
        base = rng.uniform(0.05, 0.12) * canvas.m * canvas.object_scale
        margin = _margin(base * 1.2)
        _, rgb = _colour(rng)
        spin = np.deg2rad(rng.uniform(-60, 60))
        breathe = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * keys + rng.uniform(0, 2 * np.pi))
        track = make_track(
            keys,
            x=_wander(rng, keys, margin, canvas.width - margin),
            y=_wander(rng, keys, margin, canvas.height - margin),
            size=base * breathe,
            angle=rng.uniform(0, 2 * np.pi) + spin * keys,
            colour=rgb,
        )
        objects.append(SceneObject(str(rng.choice(OBJECT_SHAPES)), track, role="actor"))
    return Scene(canvas.height, canvas.width, canvas.fps, canvas.num_frames, background, tuple(objects))


# ----------------------------------------------------------------------------------------------------------------
# Encoding

# Default codec per container extension; every one is in PyAV's bundled FFmpeg (docs/design.md §11.3).
DEFAULT_CODECS = {"mp4": "libx264", "mkv": "libx264", "mov": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4"}
_CODEC_OPTIONS = {
    "libx264": {"crf": "18", "preset": "veryfast", "threads": "1"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "1M"},
    "mpeg4": {"qscale": "3"},
}


def encode_video(path: Path, frames: Iterator[np.ndarray], fps: int, height: int, width: int, codec: str) -> int:
    """Encode uint8 [H, W, 3] frames (frame k at k / fps) into `path` (container from the extension), writing a
    temporary file first so a killed run never leaves a truncated video under the final name. Returns the number
    of frames. One encoder thread: the process pool supplies the parallelism. Encoded bytes are not reproducible
    (this libx264 build varies run to run even single-threaded; the rendered frames are), so compare decoded frames."""
    count = 0
    with atomic_path(path) as tmp, av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = height, width
        formats = [f.name for f in (stream.codec_context.codec.video_formats or [])]
        stream.pix_fmt = "yuv420p" if "yuv420p" in formats or not formats else formats[0]
        time_base = Fraction(1, fps)  # not stream.time_base: the muxer changes it (mp4: 1/12288) on the first write
        stream.time_base = stream.codec_context.time_base = time_base
        stream.codec_context.thread_count = 1
        stream.options = dict(_CODEC_OPTIONS.get(codec, {}))
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = count
            video_frame.time_base = time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


def _encode_job(job: tuple[Scene, str, str]) -> tuple[str, int]:
    """Worker entry point (module-level so process pools can pickle it): render and encode one scene."""
    scene, path, codec = job
    return path, encode_video(Path(path), iter_frames(scene), scene.fps, scene.height, scene.width, codec)


# ----------------------------------------------------------------------------------------------------------------
# The corpus

LABELS_FILE = "something-something-v2-labels.json"
SPLIT_FILES = {"train": "something-something-v2-train.json", "validation": "something-something-v2-validation.json"}
HOWTO_FILE = "HowTo100M_v1.csv"
HOWTO_HEADER = ("video_id", "category_1", "category_2", "rank", "task_id")
MANIFEST_FILE = "synth.json"
# Present from the first file written until synth.json is: a folder holding it is an interrupted synth output.
IN_PROGRESS_FILE = ".synth-in-progress"
README_FILE = "README.txt"
_SPLIT_CODES = {"train": 0, "validation": 1}
_PART_LABELED, _PART_UNLABELED, _PART_LOOKS = 0, 1, 2


# Largest object scales: the biggest growing object must fit the frame with its margins twice, and an object
# meeting a wall at 0.42 of the width needs its own width of room on the wall's side.
MAX_OBJECT_SCALE = 2.0
MAX_CONTACT_SCALE = 1.25


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. size: (height, width) px, even; clip_seconds: labeled clip length range; codec None =
    the default for `ext`; classes None = all of CLASSES (else keys, in catalogue order)."""

    out: Path
    seed: int = 0
    classes: tuple[str, ...] | None = None
    train_per_class: int = 8
    val_per_class: int = 2
    unlabeled: int = 3
    unlabeled_seconds: float = 30.0
    calm: bool = False  # labeled clips without background drift and distractors (see labeled_scene)
    object_scale: float = 1.0  # every object's size × this
    smooth_background: bool = False  # soft, low-contrast backgrounds (see _sample_background)
    # Labeled clips take their background and main object's look from this many shared looks (None: every clip its
    # own). With few looks, appearance no longer identifies a video; what does is its motion.
    looks: int | None = None
    clip_seconds: tuple[float, float] = (2.0, 4.0)
    fps: int = 12
    size: tuple[int, int] = (160, 192)
    ext: str = "mp4"
    codec: str | None = None
    workers: int = 1

    def chosen_classes(self) -> list[ClassSpec]:
        if self.classes is None:
            return list(CLASSES)
        wanted = set(self.classes)
        return [spec for spec in CLASSES if spec.key in wanted]

    def codec_name(self) -> str:
        return self.codec or DEFAULT_CODECS[self.ext]

    def canvas(self, num_frames: int) -> Canvas:
        height, width = self.size
        return Canvas(height, width, self.fps, num_frames, self.object_scale, self.smooth_background)


def validate_config(cfg: SynthConfig) -> None:
    """Raise UsageError for settings that cannot work, before anything is written."""
    height, width = cfg.size
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise UsageError(f"--size {height}x{width}: height and width must be even and ≥ 16 (e.g. 160x192)")
    if cfg.fps < 1:
        raise UsageError(f"--fps {cfg.fps}: must be a positive integer (e.g. 12)")
    if cfg.seed < 0:
        raise UsageError(f"--seed {cfg.seed}: must be ≥ 0")
    lo, hi = cfg.clip_seconds
    if not 0 < lo <= hi < math.inf or lo * cfg.fps < 2:
        raise UsageError(f"--clip-seconds {lo} {hi}: need 0 < MIN ≤ MAX and at least 2 frames (MIN·fps ≥ 2)")
    if min(cfg.train_per_class, cfg.val_per_class, cfg.unlabeled) < 0 or cfg.workers < 1:
        raise UsageError("counts must be ≥ 0 and --workers ≥ 1")
    if cfg.unlabeled and not 2 <= cfg.unlabeled_seconds * cfg.fps < math.inf:
        raise UsageError(f"--unlabeled-seconds {cfg.unlabeled_seconds}: need at least 2 frames")
    if cfg.classes is not None:
        unknown = sorted(set(cfg.classes) - set(CLASS_KEYS))
        if unknown or not cfg.classes:
            raise UsageError(f"--classes: unknown {', '.join(unknown) or '(empty)'}; valid: {', '.join(CLASS_KEYS)}")
    if not 0 < cfg.object_scale <= MAX_OBJECT_SCALE:
        raise UsageError(
            f"--object-scale {cfg.object_scale}: must be in (0, {MAX_OBJECT_SCALE}] "
            "(larger objects leave no room to move)"
        )
    contact = {"bounce", "through"} & {spec.key for spec in cfg.chosen_classes()}
    if contact and cfg.object_scale > MAX_CONTACT_SCALE:
        raise UsageError(
            f"--object-scale {cfg.object_scale}: the classes {', '.join(sorted(contact))} need room on both sides of "
            f"their wall, so at most {MAX_CONTACT_SCALE}; pass --classes without them for larger objects"
        )
    if cfg.looks is not None and cfg.looks < 1:
        raise UsageError(f"--looks {cfg.looks}: must be ≥ 1 (or leave it out: every clip its own look)")
    if cfg.codec is None and cfg.ext not in DEFAULT_CODECS:
        raise UsageError(f"--ext {cfg.ext}: no default codec; pass --codec or use one of {', '.join(DEFAULT_CODECS)}")
    if not (cfg.train_per_class + cfg.val_per_class) and not cfg.unlabeled:
        raise UsageError("nothing to generate: all counts are 0")
    _check_encoder(cfg)


def _check_encoder(cfg: SynthConfig) -> None:
    """Encode a 2-frame clip with the chosen codec and container, so a bad pair fails before the real work."""
    try:
        av.codec.Codec(cfg.codec_name(), "w")
    except (av.FFmpegError, ValueError):
        raise UsageError(
            f"--codec {cfg.codec_name()}: unknown video encoder in PyAV's FFmpeg; e.g. libx264, libvpx-vp9, mpeg4, ffv1"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        frames = iter(np.zeros((2, cfg.size[0], cfg.size[1], 3), np.uint8))
        try:
            encode_video(Path(tmp) / f"probe.{cfg.ext}", frames, cfg.fps, cfg.size[0], cfg.size[1], cfg.codec_name())
        except (av.FFmpegError, ValueError, KeyError, OSError) as err:
            raise UsageError(
                f"cannot write .{cfg.ext} with codec {cfg.codec_name()}: {err}; try --ext mp4 (libx264) or "
                "--ext webm (libvpx-vp9)"
            ) from None


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


@dataclass(frozen=True)
class PlannedVideo:
    """One video to write: id (file stem), split ("train"/"validation"/"unlabeled"), class key ("" unlabeled),
    scene, placeholders (labeled only)."""

    id: str
    split: str
    class_key: str
    scene: Scene
    placeholders: tuple[str, ...] = ()


def plan_labeled(cfg: SynthConfig) -> list[PlannedVideo]:
    """Every labeled clip, sampled (not rendered). Clip k of class c in split s comes from its own generator
    (seed, labeled, s, catalogue index of c, k), so subsets and worker counts never change a clip. Ids are a seeded
    shuffle of 1..N as strings, like SSV2's numeric ids (the id says nothing about the class)."""
    planned = []
    looks = sample_looks(cfg.seed, cfg.looks, cfg.canvas(2)) if cfg.looks else ()
    for split, count in (("train", cfg.train_per_class), ("validation", cfg.val_per_class)):
        for spec in cfg.chosen_classes():
            for k in range(count):
                rng = _rng(cfg.seed, _PART_LABELED, _SPLIT_CODES[split], CLASS_KEYS.index(spec.key), k)
                seconds = rng.uniform(*cfg.clip_seconds)
                canvas = cfg.canvas(max(2, round(seconds * cfg.fps)))
                scene, placeholders = labeled_scene(spec, rng, canvas, cfg.calm, looks)
                planned.append(PlannedVideo("", split, spec.key, scene, tuple(placeholders)))
    ids = _rng(cfg.seed, _PART_LABELED, 99).permutation(len(planned)) + 1
    return [replace(p, id=str(i)) for p, i in zip(planned, ids)]


def plan_unlabeled(cfg: SynthConfig) -> list[PlannedVideo]:
    """The long videos: synth_long_000, ... each from generator (seed, unlabeled, index)."""
    canvas = cfg.canvas(max(2, round(cfg.unlabeled_seconds * cfg.fps)))
    return [
        PlannedVideo(
            f"synth_long_{i:03d}", "unlabeled", "", unlabeled_scene(_rng(cfg.seed, _PART_UNLABELED, i), canvas)
        )
        for i in range(cfg.unlabeled)
    ]


def _prepare_out(out: Path) -> None:
    """Create `out`, or clear a previous synth output in it, finished or interrupted; refuse a non-empty folder that
    is neither. Marks `out` as in progress until `generate` writes synth.json."""
    if out.exists() and any(out.iterdir()):
        if not any((out / name).is_file() for name in (MANIFEST_FILE, IN_PROGRESS_FILE)):
            raise UsageError(f"--out {out} is not empty and holds no {MANIFEST_FILE}; choose a new or empty folder")
        for name in ("videos", "unlabeled"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (LABELS_FILE, *SPLIT_FILES.values(), MANIFEST_FILE, README_FILE):
            (out / name).unlink(missing_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / IN_PROGRESS_FILE).touch()


def suggested_frame_size(size: tuple[int, int], largest: int = 128) -> int:
    """The --frame-size to tokenize videos of `size` (height, width) px at: the largest multiple of 8 up to
    `largest` that the shorter side holds without upscaling (8 at the least)."""
    return max(8, min(largest, min(size) // 8 * 8))


def tokenize_commands(out: Path, size: tuple[int, int], tokenizer: str = "TOKENIZER") -> dict[str, str]:
    """The `vimpac tokenize` command for each part of a corpus of `size` (height, width) px videos (tokenizer: a
    directory from train-tokenizer/convert-dalle)."""
    frame = suggested_frame_size(size)
    labeled_files = " ".join(str(out / name) for name in (LABELS_FILE, *SPLIT_FILES.values()))
    # Databases go beside OUT, not inside it: regenerating OUT must not leave stale codes that a resume would trust.
    codes = out.parent / f"{out.name}-codes"
    return {
        "labeled": f"vimpac tokenize --videos {out / 'videos'} --format ssv2 --annotations {labeled_files} "
        f"--tokenizer {tokenizer} --out {codes / f'ssv2_f{frame}_fps4'} --fps 4 --frame-size {frame} --views center",
        "unlabeled": f"vimpac tokenize --videos {out / 'unlabeled' / 'videos'} --format howto100m "
        f"--annotations {out / 'unlabeled' / HOWTO_FILE} --tokenizer {tokenizer} "
        f"--out {codes / f'howto100m_f{frame}_fps2'} --fps 2 --frame-size {frame} --views center",
    }


def _write_annotations(cfg: SynthConfig, labeled: list[PlannedVideo], unlabeled: list[PlannedVideo]) -> None:
    specs = {spec.key: spec for spec in CLASSES}
    if labeled:
        labels = {spec.label_name: str(i) for i, spec in enumerate(cfg.chosen_classes())}
        write_json_atomic(cfg.out / LABELS_FILE, labels, indent=1)
        for split, name in SPLIT_FILES.items():
            items = [
                {
                    "id": p.id,
                    "label": fill_template(specs[p.class_key].template, p.placeholders),
                    "template": specs[p.class_key].template,
                    "placeholders": list(p.placeholders),
                }
                for p in labeled
                if p.split == split
            ]
            write_json_atomic(cfg.out / name, items, indent=1)
    if unlabeled:
        with open(cfg.out / "unlabeled" / HOWTO_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HOWTO_HEADER)
            for rank, p in enumerate(unlabeled, 1):
                writer.writerow([p.id, "Synthetic scenes", "Drifting shapes", rank, 0])


def _readme(manifest: dict) -> str:
    lab, unl = manifest["labeled"], manifest["unlabeled"]
    lines = [
        "Synthetic video corpus written by `vimpac synth` (vimpac.tokenization.synth); details in synth.json.",
        "",
        f"seed {manifest['seed']}, {manifest['fps']} fps, {manifest['size'][0]}x{manifest['size'][1]} (HxW), "
        f"codec {manifest['codec']} in .{manifest['ext']}",
        "",
        f"Labeled part, Something-Something-v2 format: {LABELS_FILE}, {SPLIT_FILES['train']} "
        f"({lab['counts']['train']} videos), {SPLIT_FILES['validation']} ({lab['counts']['validation']} videos);",
        "videos in videos/<id>." + manifest["ext"] + ". Classes (no single frame tells a class from its group):",
    ]
    for c in lab["classes"]:
        lines.append(f"  {c['id']:>2} [{c['group']}] {c['template']}: {c['why']}")
    lines += [
        "",
        f"Unlabeled part, HowTo100M format: unlabeled/{HOWTO_FILE} ({unl['count']} videos of "
        f"{unl['seconds']:g} s; each keeps its background and objects throughout), videos in unlabeled/videos/.",
        "",
        "Tokenize (TOKENIZER = a directory from `vimpac train-tokenizer` or `vimpac convert-dalle`):",
        "  labeled:   " + manifest["commands"]["labeled"],
        "  unlabeled: " + manifest["commands"]["unlabeled"],
        "",
    ]
    return "\n".join(lines)


def generate(cfg: SynthConfig, progress: bool = True) -> dict:
    """Write the corpus to cfg.out (see the module docstring for the layout) and return the manifest (also written
    as synth.json). Raises UsageError for bad settings before writing anything."""
    from tqdm import tqdm

    validate_config(cfg)
    started = time.perf_counter()
    labeled = plan_labeled(cfg) if cfg.train_per_class + cfg.val_per_class else []
    unlabeled = plan_unlabeled(cfg)
    _prepare_out(cfg.out)
    if unlabeled:
        (cfg.out / "unlabeled" / "videos").mkdir(parents=True, exist_ok=True)
    codec = cfg.codec_name()
    jobs = [(p.scene, str(cfg.out / "unlabeled" / "videos" / f"{p.id}.{cfg.ext}"), codec) for p in unlabeled]
    jobs += [(p.scene, str(cfg.out / "videos" / f"{p.id}.{cfg.ext}"), codec) for p in labeled]
    frames_written = 0
    with tqdm(total=len(jobs), unit="video", desc="synth", disable=not progress) as bar:
        if cfg.workers == 1:
            for job in jobs:
                frames_written += _encode_job(job)[1]
                bar.update()
        else:
            # spawn: workers start clean (no inherited threads or tqdm state); long videos were queued first.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(cfg.workers, len(jobs)), mp_context=context) as pool:
                for future in as_completed([pool.submit(_encode_job, job) for job in jobs]):
                    frames_written += future.result()[1]
                    bar.update()
    _write_annotations(cfg, labeled, unlabeled)

    chosen = cfg.chosen_classes()
    lengths = [p.scene.num_frames for p in labeled]
    manifest = {
        "generator": "vimpac synth",
        "format_version": 1,
        "seed": cfg.seed,
        "fps": cfg.fps,
        "size": list(cfg.size),
        "codec": codec,
        "ext": cfg.ext,
        "labeled": {
            "format": "ssv2",
            "videos": "videos",
            "annotations": [LABELS_FILE, *SPLIT_FILES.values()],
            "classes": [
                {"id": i, "key": s.key, "template": s.template, "group": s.group, "why": s.why}
                for i, s in enumerate(chosen)
            ],
            "counts": {split: sum(p.split == split for p in labeled) for split in SPLIT_FILES},
            "clip_seconds": list(cfg.clip_seconds),
            "calm": cfg.calm,
            "frames": {"min": min(lengths, default=0), "max": max(lengths, default=0), "total": sum(lengths)},
        },
        "unlabeled": {
            "format": "howto100m",
            "videos": "unlabeled/videos",
            "annotations": [f"unlabeled/{HOWTO_FILE}"],
            "count": len(unlabeled),
            "seconds": cfg.unlabeled_seconds,
            "frames_each": unlabeled[0].scene.num_frames if unlabeled else 0,
        },
        "videos": [
            {"id": p.id, "split": p.split, "class": p.class_key, "frames": p.scene.num_frames}
            for p in (*labeled, *unlabeled)
        ],
        "commands": tokenize_commands(cfg.out, cfg.size),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "frames_written": frames_written,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    (cfg.out / README_FILE).write_text(_readme(manifest))
    write_json_atomic(cfg.out / MANIFEST_FILE, manifest, indent=1)
    (cfg.out / IN_PROGRESS_FILE).unlink()
    return manifest
