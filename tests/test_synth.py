"""The synthetic corpus: renderer geometry, class semantics read back from pixels, single-frame indistinguishability
(statistical, with a naive generator as a control that the test can fail), determinism, the official SSV2 and
HowTo100M file formats, real decodable videos, and the CLI."""

from __future__ import annotations

import csv
import filecmp
import itertools
import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from vimpac.tokenization import synth as S

SPECS = {spec.key: spec for spec in S.CLASSES}
CANVAS = S.Canvas(64, 80, 8, 20)
GREY = (128.0, 128.0, 128.0)


def flat_background(value: tuple[float, float, float] = GREY) -> S.Background:
    return S.Background("stripes", value, value, np.zeros((1, 4)), (0.0, 0.0), (0.0, 0.0))


def sample(key: str, seed: int, canvas: S.Canvas = CANVAS) -> tuple[S.Scene, list[str]]:
    return S.labeled_scene(SPECS[key], np.random.default_rng(seed), canvas)


def bare(scene: S.Scene, keep=("main", "left", "right")) -> S.Scene:
    """Only the class-carrying objects on a flat grey background: pixels that differ from grey are the objects."""
    return replace(scene, background=flat_background(), objects=tuple(o for o in scene.objects if o.role in keep))


def object_mask(frames: np.ndarray) -> np.ndarray:
    """bool [..., H, W]: pixels at least half covered by an object (every palette colour is far from grey)."""
    return np.abs(frames.astype(np.int16) - 128).max(-1) > 40


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


# ----------------------------------------------------------------------------------------------------------------
# Catalogue and renderer


def test_catalogue_has_at_least_12_classes_in_groups_of_two_or_more():
    assert len(S.CLASSES) >= 12
    assert len(set(S.CLASS_KEYS)) == len(S.CLASSES)
    assert len({spec.label_name for spec in S.CLASSES}) == len(S.CLASSES)
    groups = {}
    for spec in S.CLASSES:
        groups.setdefault(spec.group, []).append(spec.key)
        assert spec.template.count("[") == spec.template.count("]") == len(spec.roles) >= 1
        assert spec.why and "[" not in spec.label_name
    assert all(len(members) >= 2 for members in groups.values()), groups


@pytest.mark.parametrize("shape", S.ASYMMETRIC_SHAPES)
def test_rotation_shapes_have_no_rotational_symmetry(shape):
    v, u = np.mgrid[-1.4:1.4:141j, -1.4:1.4:141j]
    inside = S.SHAPES[shape](u, v) > 0
    for n in (2, 3, 4):  # rotate by 360°/n: a symmetric shape would map onto itself
        a = 2 * np.pi / n
        turned = S.SHAPES[shape](np.cos(a) * u + np.sin(a) * v, -np.sin(a) * u + np.cos(a) * v) > 0
        iou = (inside & turned).sum() / (inside | turned).sum()
        assert iou < 0.85, (shape, n, iou)


def single_object_frame(shape: str, x: float, y: float, size: float, angle: float, h=96, w=112) -> np.ndarray:
    track = S.make_track([0.0, 1.0], x=x, y=y, size=size, angle=angle, colour=(250.0, 0.0, 0.0))
    scene = S.Scene(h, w, 8, 9, flat_background((0.0, 0.0, 0.0)), (S.SceneObject(shape, track),))
    return S.render_frame(scene, 0.5)


def test_renderer_draws_antialiased_shapes_with_the_right_area_and_place():
    frame = single_object_frame("circle", 40.3, 51.7, 17.0, 0.0)
    coverage = frame[..., 0] / 250.0
    assert abs(coverage.sum() - np.pi * 17.0**2) < 0.01 * np.pi * 17.0**2
    ys, xs = np.mgrid[: frame.shape[0], : frame.shape[1]] + 0.5
    assert abs((coverage * xs).sum() / coverage.sum() - 40.3) < 0.05
    assert abs((coverage * ys).sum() / coverage.sum() - 51.7) < 0.05
    assert 0 < ((coverage > 0.05) & (coverage < 0.95)).sum() < 0.2 * (coverage > 0.5).sum()  # soft edge only
    square = single_object_frame("square", 50, 50, 20, np.pi / 4)[..., 0] / 250.0
    assert abs(square.sum() - (1.7 * 20) ** 2) < 0.01 * (1.7 * 20) ** 2
    assert not frame[..., 1:].any()


def test_growing_angle_turns_clockwise_on_screen():
    # The half-disc's bulk lies on its local "up" side; a clockwise quarter turn on screen moves it to the right.
    cx, cy = 56.0, 48.0
    up = centroid(single_object_frame("half-disc", cx, cy, 20, 0.0)[..., 0] > 125)
    right = centroid(single_object_frame("half-disc", cx, cy, 20, np.pi / 2)[..., 0] > 125)
    assert up[1] < cy - 3 and abs(up[0] - cx) < 1
    assert right[0] > cx + 3 and abs(right[1] - cy) < 1


def test_track_interpolates_and_jumps():
    track = S.make_track([0.0, 1.0, 1.0, 2.0], x=[0.0, 10.0, -10.0, -20.0], y=0.0, size=1.0, colour=(1, 2, 3))
    assert track.at(0.5)["x"] == pytest.approx(5.0)
    assert track.at(1.0)["x"] == pytest.approx(-10.0)  # at a repeated time the later key holds
    assert track.at(1.5)["x"] == pytest.approx(-15.0)
    assert track.at(9.0)["x"] == pytest.approx(-20.0)
    assert np.allclose(track.at(0.3)["colour"], [1, 2, 3])


@pytest.mark.parametrize("key", ["right", "clockwise", "grow", "appear", "bounce", "left_first", "start"])
def test_reverse_scene_plays_the_frames_backwards(key):
    scene, _ = sample(key, 3)
    forward = S.render_video(scene).astype(np.int16)
    backward = S.render_video(S.reverse_scene(scene)).astype(np.int16)
    diff = np.abs(forward[::-1] - backward)
    assert diff.max() <= 1 and diff.mean() < 0.01  # equal up to float rounding of the background phase


# ----------------------------------------------------------------------------------------------------------------
# Class semantics, measured on pixels


def rotation_steps(masks: np.ndarray) -> np.ndarray:
    """Angle change (degrees, + = clockwise on screen) between consecutive masks, by aligning radius-weighted
    histograms of pixel angles around the mask centroid."""
    hists = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        dx, dy = xs - xs.mean(), ys - ys.mean()
        bins = (np.degrees(np.arctan2(dy, dx)) % 360 // 5).astype(int)
        hists.append(np.bincount(bins, weights=np.hypot(dx, dy), minlength=72))
    shifts = np.arange(-9, 10)
    return np.array(
        [5 * shifts[np.argmax([np.dot(np.roll(a, s), b) for s in shifts])] for a, b in itertools.pairwise(hists)]
    )


@pytest.mark.parametrize("seed", range(4))
def test_each_class_shows_its_motion(seed):
    canvas = S.Canvas(96, 112, 8, 24)
    for key in S.CLASS_KEYS:
        scene, _ = sample(key, 100 + seed, canvas)
        frames = S.render_video(bare(scene))
        masks = object_mask(frames)
        area = masks.sum((1, 2))
        if key in ("right", "left", "down", "up", "start", "stop"):
            (x0, y0), (x1, y1) = centroid(masks[0]), centroid(masks[-1])
            if key in ("start", "stop"):
                moves = np.hypot(*np.diff([centroid(m) for m in masks], axis=0).T) > 0.5
                still, moving = (moves[:4], moves[-4:]) if key == "start" else (moves[-4:], moves[:4])
                assert not still.any() and moving.all(), (key, moves)
                continue
            along, across = {"right": (x1 - x0, y1 - y0), "left": (x0 - x1, y1 - y0)}.get(
                key, (y1 - y0, x1 - x0) if key == "down" else (y0 - y1, x1 - x0)
            )
            assert along > 10 and abs(across) < 1.5, (key, along, across)
        elif key in ("clockwise", "counterclockwise"):
            steps = rotation_steps(masks)
            sign = 1 if key == "clockwise" else -1
            assert (sign * steps > 0).mean() > 0.8, (key, steps)
        elif key in ("grow", "shrink"):
            ratio = area[-1] / area[0] if key == "grow" else area[0] / area[-1]
            assert ratio > 2.5 and (np.sign(np.diff(area)) * (1 if key == "grow" else -1) >= 0).mean() > 0.9
        elif key in ("appear", "disappear"):
            present = area > 0.5 * area.max()
            expected = [False, True] if key == "appear" else [True, False]
            assert [present[0], present[-1]] == expected and area.max() > 30
            assert np.count_nonzero(np.diff(present.astype(int))) == 1  # one change, no flicker
        elif key in ("bounce", "through"):
            wall_x = next(o for o in scene.objects if o.role == "wall").track.x[0]
            sides = np.sign([centroid(m)[0] - wall_x for m in masks])
            assert abs(sides.sum()) == len(sides) if key == "bounce" else sides[0] == -sides[-1]
            distance = np.abs([centroid(m)[0] - wall_x for m in masks])
            assert distance.argmin() not in (0, len(distance) - 1)  # approaches, then leaves
        else:  # colour order: the first-named object changes colour first
            left_half = np.arange(canvas.width) < canvas.width / 2
            change = {}
            for side, columns in (("left", left_half), ("right", ~left_half)):
                mean = np.array([f[m & columns].mean(0) for f, m in zip(frames, masks)])
                change[side] = int(np.argmax(np.abs(mean - mean[0]).max(1) > 40))
            first, second = ("left", "right") if key == "left_first" else ("right", "left")
            assert 0 < change[first] < change[second], (key, change)


# ----------------------------------------------------------------------------------------------------------------
# Single frames cannot tell a class from its group


def frame_features(scene: S.Scene, t: float) -> np.ndarray:
    """What one frame shows of the class-carrying objects (position, visible size, colour, orientation) and of the
    background, at time t."""
    out = [*render_mean_background(scene, t)]
    wall = next((o for o in scene.objects if o.role == "wall"), None)
    for obj in sorted((o for o in scene.objects if o.role in ("main", "left", "right")), key=lambda o: o.role):
        s = obj.track.at(t)
        visible = s["size"] * (s["alpha"] > 0.5)
        x = s["x"] - wall.track.x[0] if wall else s["x"]
        out += [x, s["y"], visible, *s["colour"], np.cos(s["angle"]), np.sin(s["angle"])]
    return np.array(out)


def render_mean_background(scene: S.Scene, t: float) -> np.ndarray:
    return S.render_background(scene.background, 16, 16, t).mean((1, 2))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_critical(n: int, m: int, alpha: float = 1e-4) -> float:
    return float(np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m)))


def time_shuffled_features(make_scene, n: int, seed: int) -> np.ndarray:
    """Features of one frame at a uniformly random frame index of each of n random clips: [n, F]."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = make_scene(i)
        rows.append(frame_features(scene, rng.integers(scene.num_frames) / scene.fps))
    return np.stack(rows)


@pytest.mark.parametrize("group", sorted({spec.group for spec in S.CLASSES}))
def test_single_frames_are_identically_distributed_within_each_group(group):
    n = 300
    keys = [spec.key for spec in S.CLASSES if spec.group == group]
    canvas = S.Canvas(96, 112, 8, 24)
    feats = {
        key: time_shuffled_features(lambda i, key=key: sample(key, 10_000 + i, canvas)[0], n, seed=7) for key in keys
    }
    critical = ks_critical(n, n)
    for key in keys[1:]:
        for f in range(feats[keys[0]].shape[1]):
            d = ks_distance(feats[keys[0]][:, f], feats[key][:, f])
            assert d < critical, (group, keys[0], key, f, d, critical)


def test_the_statistical_test_catches_a_naive_left_right_generator():
    """Control: with start points on the side the object comes from (a naive design), the same test fails."""
    canvas = S.Canvas(96, 112, 8, 24)

    def naive(i: int, direction: int) -> S.Scene:
        scene, _ = sample("right", 20_000 + i, canvas)
        main = next(o for o in scene.objects if o.role == "main")
        rng = np.random.default_rng(i)
        length = rng.uniform(0.3, 0.5) * canvas.width
        start = rng.uniform(0.1, 0.2) * canvas.width
        xs = [start, start + length] if direction > 0 else [canvas.width - start, canvas.width - start - length]
        track = replace(main.track, x=np.array(xs))
        return replace(scene, objects=(replace(main, track=track),))

    right = time_shuffled_features(lambda i: naive(i, +1), 300, seed=7)
    left = time_shuffled_features(lambda i: naive(i, -1), 300, seed=7)
    assert ks_distance(right[:, 3], left[:, 3]) > 2 * ks_critical(300, 300)  # feature 3 = x of the object


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, train: int) -> float:
    x = (features - features[:train].mean(0)) / (features[:train].std(0) + 1e-9)
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    y = 2.0 * labels - 1
    w = np.linalg.solve(x[:train].T @ x[:train] + 1.0 * np.eye(x.shape[1]), x[:train].T @ y[:train])
    return float(((x[train:] @ w > 0) == (labels[train:] > 0)).mean())


def test_a_linear_classifier_needs_two_frames_to_tell_left_from_right():
    canvas = S.Canvas(48, 64, 8, 20)
    n, rng = 200, np.random.default_rng(0)
    single, motion, labels = [], [], []
    for i in range(n):
        key = ("right", "left")[i % 2]
        scene, _ = sample(key, 30_000 + i, canvas)
        k = int(rng.integers(1, scene.num_frames - 1))
        before, now, after = (S.render_frame(scene, j / scene.fps).astype(np.float32) for j in (k - 1, k, k + 1))
        # single frame: a coarse image (6×8 cells × RGB) plus the colour-saturated pixels' centroid and count
        saturated = (now.max(-1) - now.min(-1)) > 60
        ys, xs = np.nonzero(saturated)
        coarse = now.reshape(6, 8, 8, 8, 3).mean((1, 3)).ravel()
        single.append(np.concatenate([coarse, [xs.mean() if len(xs) else 32, ys.mean() if len(ys) else 24, len(xs)]]))
        # two frames: gradient-constraint motion energy sum(I_t * I_x) over the saturated (object) pixels
        grey = now.mean(-1)
        it = (after - before).mean(-1)
        ix = np.gradient(grey, axis=1)
        motion.append([-(it * ix)[saturated].sum() / ((ix * ix)[saturated].sum() + 1e-6)])
        labels.append(i % 2 == 0)
    labels = np.array(labels)
    single_acc = ridge_accuracy(np.array(single), labels, 120)
    motion_acc = ridge_accuracy(np.array(motion), labels, 120)
    assert single_acc < 0.68, single_acc  # chance is 0.5; 80 test clips give a standard error of ~0.056
    assert motion_acc > 0.85, motion_acc


# ----------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_frames_and_subsets_keep_their_clips(tmp_path):
    small = dict(size=(48, 64), fps=8, clip_seconds=(1.0, 1.5), train_per_class=2, val_per_class=1)
    a = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=5, **small))
    b = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=5, **small))
    c = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=6, **small))
    subset = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=5, classes=("through", "up"), **small))
    assert [p.id for p in a] == [p.id for p in b] and [p.placeholders for p in a] == [p.placeholders for p in b]
    for pa, pb, pc in list(zip(a, b, c))[::5]:
        frames = S.render_video(pa.scene)
        assert np.array_equal(frames, S.render_video(pb.scene))
        assert not np.array_equal(frames, S.render_video(pc.scene))
    full = {(p.split, p.class_key, p.placeholders): p for p in a}
    for p in subset:
        assert np.array_equal(
            S.render_video(p.scene), S.render_video(full[(p.split, p.class_key, p.placeholders)].scene)
        )
    long_a, long_b = (S.plan_unlabeled(S.SynthConfig(out=tmp_path, seed=5, unlabeled_seconds=2, **small)) for _ in "ab")
    assert np.array_equal(S.render_video(long_a[1].scene), S.render_video(long_b[1].scene))


def test_object_scale_and_smooth_background_change_only_the_look(tmp_path):
    """--object-scale multiplies every object's size and keeps the motion; --smooth-background trades the busy
    texture for one with far less detail (smaller frame-to-frame pixel differences along a row)."""
    small = dict(size=(64, 80), fps=8, clip_seconds=(1.0, 1.5), train_per_class=1, val_per_class=0, unlabeled=0)
    classes = ("right", "grow")
    base = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=2, classes=classes, **small))
    big = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=2, classes=classes, object_scale=1.5, **small))
    for a, b in zip(base, big):
        main_a, main_b = (next(o for o in p.scene.objects if o.role == "main") for p in (a, b))
        for t in (0.0, a.scene.t_last):
            sa, sb = main_a.track.at(t), main_b.track.at(t)
            assert np.isclose(float(sb["size"]), 1.5 * float(sa["size"]))

    def detail(smooth: bool) -> float:
        cfg = S.SynthConfig(out=tmp_path, seed=4, classes=classes, calm=True, smooth_background=smooth, **small)
        backgrounds = [S.render_background(p.scene.background, 64, 80, 0.0) for p in S.plan_labeled(cfg)]
        return float(np.mean([np.abs(np.diff(bg, axis=-1)).mean() for bg in backgrounds]))

    assert detail(True) < detail(False) / 3


def test_looks_share_appearance_across_clips_and_keep_each_class_motion(tmp_path):
    """--looks N: every labeled clip's background and main object (shape, colour, starting angle) is one of N
    looks, drawn independently of the class; the motion (positions, sizes) is the class's own."""
    small = dict(size=(64, 80), fps=8, clip_seconds=(1.0, 1.5), train_per_class=6, val_per_class=2, unlabeled=0)
    classes = ("right", "left", "grow", "shrink")
    own = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=3, classes=classes, calm=True, **small))
    shared = S.plan_labeled(S.SynthConfig(out=tmp_path, seed=3, classes=classes, calm=True, looks=3, **small))

    def look(p: S.PlannedVideo) -> tuple:
        main = next(o for o in p.scene.objects if o.role == "main")
        return (p.scene.background.colour0, main.shape, tuple(main.track.colour[0]), float(main.track.angle[0]))

    assert len({look(p) for p in own}) == len(own)
    assert len({look(p) for p in shared}) <= 3
    by_class = {key: {look(p) for p in shared if p.class_key == key} for key in classes}
    assert sum(len(v) > 1 for v in by_class.values()) >= 3  # a look does not give the class away
    for p in shared:
        main = next(o for o in p.scene.objects if o.role == "main")
        assert np.all(main.track.colour == main.track.colour[0])
        start, end = main.track.at(0.0), main.track.at(p.scene.t_last)
        moved = {"right": end["x"] > start["x"], "left": end["x"] < start["x"]}
        grew = {"grow": end["size"] > start["size"], "shrink": end["size"] < start["size"]}
        assert {**moved, **grew}[p.class_key]
        assert p.placeholders[0] == main.name(0.0) and p.placeholders[0].endswith(main.shape)


# ----------------------------------------------------------------------------------------------------------------
# Unlabeled long videos


def colour_histogram(frame: np.ndarray) -> np.ndarray:
    hist = np.histogramdd(frame.reshape(-1, 3), bins=(6, 6, 6), range=[(0, 256)] * 3)[0]
    return hist.ravel() / hist.sum()


def test_long_videos_default_to_30_s_and_keep_their_identity(tmp_path):
    assert S.SynthConfig(out=tmp_path).unlabeled_seconds >= 30
    videos = S.plan_unlabeled(S.SynthConfig(out=tmp_path, seed=1, unlabeled=6, size=(64, 80)))
    assert all(v.scene.num_frames / v.scene.fps >= 30 for v in videos)
    for v in videos:  # by construction: one background, objects never change shape or colour
        for obj in v.scene.objects:
            assert (obj.track.colour == obj.track.colour[0]).all() and obj.track.alpha.min() == 1
    first = [colour_histogram(S.render_frame(v.scene, 0.0)) for v in videos]
    last = [colour_histogram(S.render_frame(v.scene, v.scene.t_last)) for v in videos]
    for i in range(len(videos)):  # the end of a video looks like its own start more than like any other video
        own = np.abs(first[i] - last[i]).sum()
        others = min(np.abs(first[i] - last[j]).sum() for j in range(len(videos)) if j != i)
        assert own < others, (i, own, others)
    # ...while the content does move: the frames at start and end differ
    frames = [S.render_frame(videos[0].scene, t) for t in (0.0, videos[0].scene.t_last)]
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 5


# ----------------------------------------------------------------------------------------------------------------
# The written corpus


TINY = dict(
    train_per_class=1,
    val_per_class=1,
    unlabeled=2,
    unlabeled_seconds=3.0,
    clip_seconds=(1.0, 1.5),
    fps=8,
    size=(48, 64),
    workers=1,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    cfg = S.SynthConfig(out=out, seed=3, **TINY)
    return cfg, S.generate(cfg, progress=False)


def decode(path: Path) -> tuple[np.ndarray, av.video.stream.VideoStream, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.average_rate, container.duration / av.time_base


def test_ssv2_files_follow_the_official_format(corpus):
    cfg, manifest = corpus
    labels = json.loads((cfg.out / S.LABELS_FILE).read_text())
    assert all(isinstance(k, str) and isinstance(v, str) and v.isdigit() for k, v in labels.items())
    assert sorted(int(v) for v in labels.values()) == list(range(len(S.CLASSES)))
    assert set(labels) == {spec.label_name for spec in S.CLASSES}
    ids = []
    for split, name in S.SPLIT_FILES.items():
        items = json.loads((cfg.out / name).read_text())
        assert len(items) == len(S.CLASSES)  # one clip per class in each split
        per_class = {}
        for item in items:
            assert set(item) == {"id", "label", "template", "placeholders"}
            assert item["id"].isdigit() and isinstance(item["placeholders"], list)
            label_id = labels[item["template"].replace("[", "").replace("]", "")]  # the official lookup
            per_class[label_id] = per_class.get(label_id, 0) + 1
            assert item["template"].count("[") == len(item["placeholders"])
            assert all(p.startswith(("a ", "an ")) for p in item["placeholders"])
            expected = item["template"].lower()
            for placeholder in item["placeholders"]:
                start, end = expected.index("["), expected.index("]")
                expected = expected[:start] + placeholder + expected[end + 1 :]
            assert item["label"] == expected
            ids.append(item["id"])
        assert set(per_class.values()) == {1}, (split, per_class)
    assert len(ids) == len(set(ids))
    assert manifest["labeled"]["counts"] == {"train": len(S.CLASSES), "validation": len(S.CLASSES)}


def test_videos_decode_to_the_rendered_frames_at_the_stated_rate(corpus):
    cfg, manifest = corpus
    planned = {p.id: p for p in S.plan_labeled(cfg)}
    files = sorted(p.name for p in (cfg.out / "videos").iterdir())
    assert files == sorted(f"{i}.mp4" for i in planned)  # and no leftover temporary files
    stated = {v["id"]: v["frames"] for v in manifest["videos"]}
    for i, video_id in enumerate(sorted(planned)):
        frames, rate, duration = decode(cfg.out / "videos" / f"{video_id}.mp4")
        assert frames.shape == (stated[video_id], 48, 64, 3) and rate == 8
        assert duration == pytest.approx(stated[video_id] / 8, abs=0.01)
        if i % 4 == 0:  # lossy, but the content is the rendered scene
            rendered = S.render_video(planned[video_id].scene)
            assert np.abs(frames.astype(np.int16) - rendered).mean() < 4


def test_unlabeled_part_is_a_howto100m_csv_of_long_videos(corpus):
    cfg, _ = corpus
    with open(cfg.out / "unlabeled" / S.HOWTO_FILE, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video_id", "category_1", "category_2", "rank", "task_id"]
    assert [r[0] for r in rows[1:]] == ["synth_long_000", "synth_long_001"]
    assert all(len(r) == 5 and r[3].isdigit() and r[4].isdigit() for r in rows[1:])
    for row in rows[1:]:
        frames, rate, duration = decode(cfg.out / "unlabeled" / "videos" / f"{row[0]}.mp4")
        assert frames.shape == (24, 48, 64, 3) and rate == 8 and duration == pytest.approx(3.0, abs=0.01)


def test_the_project_annotation_parser_reads_both_parts(corpus):
    from vimpac.tokenization.annotations import load_annotations

    cfg, _ = corpus
    files = [cfg.out / S.LABELS_FILE, *(cfg.out / name for name in S.SPLIT_FILES.values())]
    ssv2 = load_annotations("ssv2", files, cfg.out / "videos")
    assert not ssv2.problems and ssv2.classes == [spec.label_name for spec in S.CLASSES]
    assert len(ssv2.entries) == 2 * len(S.CLASSES) and all(e.path is not None for e in ssv2.entries)
    assert {len(v) for v in ssv2.splits().values()} == {len(S.CLASSES)}
    howto = load_annotations("howto100m", [cfg.out / "unlabeled" / S.HOWTO_FILE], cfg.out / "unlabeled" / "videos")
    assert not howto.problems and [e.label for e in howto.entries] == [-1, -1]


def test_manifest_and_readme_name_the_tokenize_commands(corpus):
    cfg, manifest = corpus
    on_disk = json.loads((cfg.out / S.MANIFEST_FILE).read_text())
    assert on_disk["commands"] == manifest["commands"]
    assert "--format ssv2" in manifest["commands"]["labeled"]
    assert "--format howto100m" in manifest["commands"]["unlabeled"]
    frame = S.suggested_frame_size(cfg.size)
    assert all(f"--frame-size {frame} " in command for command in manifest["commands"].values())
    readme = (cfg.out / S.README_FILE).read_text()
    assert manifest["commands"]["labeled"] in readme and manifest["commands"]["unlabeled"] in readme
    assert all(spec.template in readme for spec in S.CLASSES)
    assert [c["key"] for c in manifest["labeled"]["classes"]] == list(S.CLASS_KEYS)


def test_the_suggested_frame_size_never_upscales():
    assert S.suggested_frame_size((160, 192)) == 128  # the default corpus: the paper's 128 px
    assert S.suggested_frame_size((64, 80)) == 64
    assert S.suggested_frame_size((100, 60)) == 56
    assert S.suggested_frame_size((6, 6)) == 8


def test_a_process_pool_writes_the_same_videos(corpus, tmp_path):
    # Rendered frames are reproducible; libx264's bytes are not (even single-threaded), so compare decoded frames.
    cfg, _ = corpus
    again = replace(cfg, out=tmp_path / "again", workers=2)
    S.generate(again, progress=False)
    names = sorted(p.name for p in (cfg.out / "videos").iterdir())
    assert names == sorted(p.name for p in (again.out / "videos").iterdir())
    for name in names[::3]:
        a, b = decode(cfg.out / "videos" / name)[0], decode(again.out / "videos" / name)[0]
        assert a.shape == b.shape and np.abs(a.astype(np.int16) - b).mean() < 1.5
    for name in (*S.SPLIT_FILES.values(), S.LABELS_FILE, f"unlabeled/{S.HOWTO_FILE}"):
        assert filecmp.cmp(cfg.out / name, again.out / name, shallow=False)


def test_webm_container_and_regeneration_in_place(tmp_path):
    cfg = S.SynthConfig(out=tmp_path / "w", classes=("appear",), ext="webm", **{**TINY, "unlabeled": 0})
    S.generate(cfg, progress=False)
    S.generate(replace(cfg, train_per_class=2), progress=False)  # an earlier synth output is replaced
    files = sorted((cfg.out / "videos").iterdir())
    assert len(files) == 3 and all(f.suffix == ".webm" for f in files)
    with av.open(str(files[0])) as container:
        assert container.streams.video[0].codec_context.name == "vp9"


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_a_corpus_and_prints_the_next_commands(tmp_path, capsys):
    from vimpac.cli import main

    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--size", "48x64", "--fps", "6", "--classes", "left,right",
            "--train-per-class", "1", "--val-per-class", "1", "--unlabeled", "1", "--unlabeled-seconds", "2",
            "--clip-seconds", "1", "1", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 train + 2 validation clips of 2 classes" in printed
    assert "vimpac tokenize" in printed and "--format ssv2" in printed and "--format howto100m" in printed
    labels = json.loads((out / S.LABELS_FILE).read_text())
    assert labels == {"Moving something from left to right": "0", "Moving something from right to left": "1"}
    assert len(list((out / "videos").glob("*.mp4"))) == 4 and len(list((out / "unlabeled" / "videos").iterdir())) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "49x64"], "even"),
        (["--classes", "left,sideways"], "unknown sideways; valid: right, left"),
        (["--ext", "xyz"], "no default codec"),
        (["--ext", "webm", "--codec", "libx264"], "cannot write .webm with codec libx264"),
        (["--codec", "nosuchcodec"], "unknown video encoder"),
        (["--unlabeled", "0", "--train-per-class", "0", "--val-per-class", "0"], "nothing to generate"),
        (["--object-scale", "2.5"], "must be in (0, 2.0]"),
        (["--object-scale", "1.5"], "bounce, through need room on both sides"),
        (["--looks", "0"], "--looks 0: must be ≥ 1"),
    ],
)
def test_cli_rejects_bad_settings_with_a_clear_message(tmp_path, capsys, extra, message):
    from vimpac.cli import main

    assert main(["synth", "--out", str(tmp_path / "o"), "--size", "48x64", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the settings are checked


def test_cli_refuses_a_folder_that_is_not_a_synth_output(tmp_path, capsys):
    from vimpac.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["synth", "--out", str(tmp_path), "--size", "48x64", "--unlabeled", "0"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "notes.txt").exists()


def test_an_interrupted_synth_output_is_cleared_and_written_again(tmp_path, monkeypatch, corpus):
    real, calls = S._encode_job, [0]

    def interrupted(job):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(job)

    cfg = replace(corpus[0], out=tmp_path / "corpus")
    monkeypatch.setattr(S, "_encode_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.generate(cfg, progress=False)
    assert (cfg.out / S.IN_PROGRESS_FILE).is_file() and not (cfg.out / S.MANIFEST_FILE).exists()
    monkeypatch.setattr(S, "_encode_job", real)
    manifest = S.generate(cfg, progress=False)  # a rerun, as `vimpac demo` reruns an unfinished stage
    assert manifest["videos"] == corpus[1]["videos"] and not (cfg.out / S.IN_PROGRESS_FILE).exists()
    written = sorted(p.relative_to(cfg.out) for p in cfg.out.rglob("*.mp4"))
    assert written == sorted(p.relative_to(corpus[0].out) for p in corpus[0].out.rglob("*.mp4"))


def test_cli_help_teaches_the_layout_and_flags(capsys):
    from vimpac.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--train-per-class", "--unlabeled-seconds", "--codec", "--workers", "something-something-v2",
                   "HowTo100M_v1.csv", "played backwards"):  # fmt: skip
        assert needle in text
