"""Clip sampling from a real (tiny) code database, pre-training samples, and the resumable distributed sampler."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vimpac.clip_windows import clip_frame_indices, clip_slack, evaluation_starts, frame_stride, take_clip, window_span
from vimpac.code_db import CodeDatabaseWriter
from vimpac.data import PretrainClips, ResumableDistributedSampler, pair_starts
from vimpac.errors import UsageError
from vimpac.masking import IGNORE_INDEX

VOCAB = 1000
PAD, MASK = VOCAB, VOCAB + 1
GRID = (4, 4)
VIEWS = ["r32_top_f0", "r32_center_f0", "r32_bottom_f0"]
# Frames per video (at the database's 4 fps): long ones and ones shorter than a clip window.
LENGTHS = {"long/a": 40, "long/b": 25, "short/c": 5, "short/d": 2, "mid/e": 12}


def frame_codes(view: int, frames: int) -> np.ndarray:
    """Codes that identify (view, frame): every position of frame f in view v holds v*300 + f."""
    return np.broadcast_to((view * 300 + np.arange(frames))[:, None, None], (frames, *GRID)).copy()


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "toy"
    manifest = {
        "dataset": "toy",
        "fps": 4,
        "frame_size": 32,
        "grid": list(GRID),
        "tokenizer": {"name": "toy", "vocab_size": VOCAB, "fingerprint": "0" * 16},
        "views": VIEWS,
        "classes": ["x", "y"],
    }
    with CodeDatabaseWriter(path, manifest) as writer:
        for n, (video_id, frames) in enumerate(LENGTHS.items()):
            codes = {view: frame_codes(v, frames) for v, view in enumerate(VIEWS)}
            writer.add(video_id, codes, label=n % 2, duration=frames / 4, fps=4.0)
        writer.finalize({"train": list(LENGTHS), "val": ["mid/e"]})
    return path


def original(sample_inputs, sample_labels):
    """Undo the masking: labels hold the original code wherever inputs were changed."""
    return torch.where(sample_labels != IGNORE_INDEX, sample_labels, sample_inputs)


def decode_clip(clip):
    """(view, frame indices, number of PAD frames) of an unmasked clip of frame_codes."""
    frames = clip[:, 0, 0]
    real = frames[frames != PAD]
    assert torch.all(clip == clip[:, :1, :1]), "every position of a frame holds the same code"
    views = set((real // 300).tolist())
    assert len(views) == 1
    return views.pop(), (real % 300).tolist(), int((frames == PAD).sum())


# ------------------------------------------------------------------------------------------ pure functions


def test_frame_stride():
    assert frame_stride(16, 2) == 8 and frame_stride(16, 4) == 4 and frame_stride(2, 2) == 1
    assert frame_stride(2, None) == 1 and frame_stride(29.97, 29.97) == 1
    for bad in (3, 32, 0):
        with pytest.raises(UsageError, match="frame-rate"):
            frame_stride(16, bad)


def test_window_arithmetic_matches_brute_force():
    for n, clip_len, stride in itertools.product(range(1, 30), range(1, 7), range(1, 5)):
        valid = [s for s in range(n) if all(s + stride * k < n for k in range(clip_len))]
        delta = clip_slack(n, clip_len, stride)
        assert window_span(clip_len, stride) == clip_len * stride
        if valid:  # valid starts are exactly 0..delta
            assert valid == list(range(delta + 1)), (n, clip_len, stride)
            for start in (0, delta):
                assert clip_frame_indices(start, clip_len, stride, n).tolist() == [
                    start + stride * k for k in range(clip_len)
                ]
        else:  # the video is shorter than the window: one clip from frame 0, as many frames as exist
            assert delta == 0
            assert clip_frame_indices(0, clip_len, stride, n).tolist() == list(range(0, n, stride))[:clip_len]


def test_take_clip_pads_short_videos():
    codes = frame_codes(0, 5)
    clip = take_clip(codes, 0, 4, 2, PAD)
    assert clip.dtype == np.int64 and clip.shape == (4, *GRID)
    assert clip[:, 0, 0].tolist() == [0, 2, 4, PAD]
    assert take_clip(codes, 1, 2, 3, PAD)[:, 0, 0].tolist() == [1, 4]


def test_pair_starts_without_range_are_independent_uniform():
    rng = np.random.default_rng(0)
    delta, n = 6, 49000
    pairs = np.array([pair_starts(delta, rng) for _ in range(n)])
    counts = np.zeros((delta + 1, delta + 1))
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    expected = n / (delta + 1) ** 2
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_pair_starts_with_relevance_range_clamp_at_the_ends():
    rng = np.random.default_rng(1)
    delta, reach, n = 10, 3, 60000
    pairs = np.array([pair_starts(delta, rng, reach) for _ in range(n)])
    first = np.bincount(pairs[:, 0], minlength=delta + 1)
    assert np.all(np.abs(first - n / (delta + 1)) < 5 * np.sqrt(n / (delta + 1)))
    for s1 in range(delta + 1):
        second = pairs[pairs[:, 0] == s1, 1]
        lo, hi = max(s1 - reach, 0), min(s1 + reach, delta)
        assert second.min() == lo and second.max() == hi  # the whole clamped window, nothing outside it
        counts = np.bincount(second - lo, minlength=hi - lo + 1)
        expected = len(second) / (hi - lo + 1)
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    zero = np.array([pair_starts(delta, rng, 0) for _ in range(100)])
    assert np.all(zero[:, 0] == zero[:, 1])


def test_test_starts():
    assert evaluation_starts(20, 5) == [0, 5, 10, 15, 20]
    assert evaluation_starts(7, 3) == [0, 3, 7]
    assert evaluation_starts(0, 4) == [0, 0, 0, 0]
    assert evaluation_starts(21, 1) == [10]  # centred: 10 slack frames before the clip, 11 after
    assert evaluation_starts(0, 1) == [0]


# --------------------------------------------------------------------------------------------- the dataset


def make(db_path, **kwargs):
    args = {"clip_len": 4, "pad_id": PAD, "mask_id": MASK, "mask_blocks": 2, "seed": 3}
    return PretrainClips(db_path, "train", **{**args, **kwargs})


def test_sample_layout_and_masking(db_path):
    data = make(db_path)
    assert len(data) == len(LENGTHS) and data.ids == sorted(LENGTHS)
    sample = data[0]
    assert sample["inputs"].shape == sample["labels"].shape == (2, 4, *GRID)
    assert sample["inputs"].dtype == sample["labels"].dtype == torch.int64
    assert sample["index"] == 0 and sample["label"] == list(LENGTHS).index(data.ids[0]) % 2
    masked = sample["labels"] != IGNORE_INDEX
    assert torch.all(sample["inputs"][masked] == MASK) and masked.any()
    assert torch.all(sample["inputs"][~masked] != MASK)


def test_clips_follow_the_window_arithmetic(db_path):
    data = make(db_path, frame_rate=2, mask_blocks=-300)  # stride 2
    assert data.stride == 2
    assert data.describe_clips() == "clips of 4 frames at 2 fps (1 in 2 frames of 4 fps) = 2 s"
    assert make(db_path, mask_blocks=-300).describe_clips() == "clips of 4 frames at 4 fps = 1 s"
    for index, video_id in enumerate(data.ids):
        n = LENGTHS[video_id]
        delta = clip_slack(n, 4, 2)
        for epoch in range(6):
            sample = data[(epoch, index)]
            clips = original(sample["inputs"], sample["labels"])
            decoded = [decode_clip(c) for c in clips]
            assert decoded[0][0] == decoded[1][0], "both clips come from the same view"
            for _, frames, pads in decoded:
                start = frames[0]
                assert 0 <= start <= delta
                assert frames == [start + 2 * k for k in range(4 - pads)]
                assert pads == 4 - len([f for f in range(start, start + 8, 2) if f < n])
                assert pads == 0 or delta == 0
            pad = sample["inputs"] == PAD
            assert torch.all(sample["labels"][pad] == IGNORE_INDEX)


def test_short_video_is_right_padded(db_path):
    data = make(db_path, clip_len=6, mask_blocks=3)
    sample = data[data.ids.index("short/d")]  # 2 frames
    assert torch.all(sample["inputs"][:, 2:] == PAD)
    assert torch.all(sample["labels"][:, 2:] == IGNORE_INDEX)
    clips = original(sample["inputs"], sample["labels"])
    assert clips[:, :2, 0, 0].remainder(300).tolist() == [[0, 1], [0, 1]]


def test_views_are_drawn_uniformly_per_sample(db_path):
    data = make(db_path, mask_blocks=-1)
    index = data.ids.index("long/a")
    seen = []
    for epoch in range(300):
        sample = data[(epoch, index)]
        seen.append(decode_clip(original(sample["inputs"], sample["labels"])[0])[0])
    counts = np.bincount(seen, minlength=3)
    assert np.all(np.abs(counts - 100) < 5 * np.sqrt(100 * 2 / 3))
    only = make(db_path, mask_blocks=-1, views=[VIEWS[2]])
    assert {decode_clip(original(only[(e, 0)]["inputs"], only[(e, 0)]["labels"])[0])[0] for e in range(20)} == {2}
    with pytest.raises(UsageError, match="valid views"):
        make(db_path, views=["r999_top_f0"])


def test_samples_are_a_function_of_seed_epoch_index(db_path):
    data = make(db_path)
    again = make(db_path)  # a fresh process/worker after a resume
    for key in [(0, 0), (3, 2), (7, 4)]:
        a, b = data[key], again[key]
        assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["labels"], b["labels"])
    data.set_epoch(3)
    assert torch.equal(data[2]["labels"], again[(3, 2)]["labels"])
    base = data[(0, 0)]["labels"]
    assert not torch.equal(base, data[(1, 0)]["labels"])
    assert not torch.equal(base, make(db_path, seed=4)[(0, 0)]["labels"])
    two = data[(0, 0)]["labels"]
    assert not torch.equal(two[0] != IGNORE_INDEX, two[1] != IGNORE_INDEX), "the two clips get different masks"


def test_dataloader_workers_give_the_same_samples(db_path):
    data = make(db_path)
    sampler = ResumableDistributedSampler(len(data), rank=0, world_size=1, seed=5)
    sampler.set_epoch(2)
    loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=2, drop_last=True)
    keys = list(sampler)
    batches = list(loader)
    assert len(batches) == len(keys) // 2
    for n, batch in enumerate(batches):
        for j in range(2):
            expected = data[keys[2 * n + j]]
            assert torch.equal(batch["inputs"][j], expected["inputs"]) and batch["index"][j] == expected["index"]


def test_dataset_refuses_bad_configuration(db_path):
    with pytest.raises(UsageError, match="collides"):
        make(db_path, pad_id=5)
    with pytest.raises(UsageError, match="masks nothing"):
        make(db_path, mask_blocks=0)
    assert make(db_path, mask_blocks=0, mlm_weight=0)[0]["labels"].eq(IGNORE_INDEX).all()
    with pytest.raises(UsageError, match="frame-rate"):
        make(db_path, frame_rate=3)
    with pytest.raises(UsageError, match="unknown split"):
        PretrainClips(db_path, "nope", clip_len=4, pad_id=PAD, mask_id=MASK, mask_blocks=2)
    assert make(db_path).ids != PretrainClips(db_path, "val", clip_len=4, pad_id=PAD, mask_id=MASK, mask_blocks=2).ids


# --------------------------------------------------------------------------------------------- the sampler


def shards(num_samples, world, epoch, consumed=0, **kwargs):
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(num_samples, rank=rank, world_size=world, **kwargs)
        sampler.set_epoch(epoch, consumed)
        keys = list(sampler)
        assert len(keys) == len(sampler) and all(e == epoch for e, _ in keys)
        out.append([i for _, i in keys])
    return out


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    for n, world in [(23, 4), (24, 3), (7, 1), (5, 5)]:
        parts = shards(n, world, epoch=0, seed=1)
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) == n // world
        flat = list(itertools.chain(*parts))
        assert len(set(flat)) == len(flat) == n // world * world
        order = ResumableDistributedSampler(n, rank=0, world_size=world, seed=1).epoch_order(0)
        assert sorted(flat) == sorted(order[: n // world * world].tolist())
        padded = shards(n, world, epoch=0, seed=1, drop_last=False)
        assert set(itertools.chain(*padded)) == set(range(n)) and len({len(p) for p in padded}) == 1


def test_sampler_reshuffles_each_epoch_and_is_seeded():
    a0, a1 = shards(50, 2, 0, seed=1), shards(50, 2, 1, seed=1)
    assert a0 != a1 and sorted(itertools.chain(*a0)) == sorted(itertools.chain(*a1))
    assert shards(50, 2, 0, seed=1) == a0 and shards(50, 2, 0, seed=2) != a0
    assert shards(6, 2, 3, shuffle=False) == [[0, 2, 4], [1, 3, 5]]


def test_sampler_resumes_mid_epoch_with_the_same_order():
    full = shards(37, 3, epoch=4, seed=9)
    for consumed in (0, 3, 12, 33, 36):
        resumed = shards(37, 3, epoch=4, consumed=consumed, seed=9)
        assert resumed == [part[consumed // 3 :] for part in full]
    state = ResumableDistributedSampler(37, rank=1, world_size=3, seed=9)
    state.set_epoch(4)
    saved = state.state_dict(consumed=12)
    fresh = ResumableDistributedSampler(37, rank=1, world_size=3, seed=9)
    fresh.load_state_dict(saved)
    assert [i for _, i in fresh] == full[1][4:]
    with pytest.raises(UsageError, match="num_samples"):
        ResumableDistributedSampler(38, rank=1, world_size=3, seed=9).load_state_dict(saved)
    with pytest.raises(UsageError, match="seed"):
        ResumableDistributedSampler(37, rank=1, world_size=3, seed=8).load_state_dict(saved)


def test_sampler_without_process_group_defaults_to_one_rank():
    sampler = ResumableDistributedSampler(10, seed=0)
    assert (sampler.rank, sampler.world_size) == (0, 1) and len(list(sampler)) == 10
    with pytest.raises(ValueError):
        ResumableDistributedSampler(10, rank=2, world_size=2)
