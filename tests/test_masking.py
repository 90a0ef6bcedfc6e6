"""Block masking: the floor rule, brute-force union, PAD, the paper's Table 2 ratios, i.i.d. and BERT modes."""

import itertools

import numpy as np
import pytest

from vimpac.errors import UsageError
from vimpac.masking import (
    IGNORE_INDEX,
    REPLACE_PROBS,
    axis_cover_probability,
    block_actions,
    block_length_limits,
    check_mask_config,
    expected_mask_ratio,
    mask_batch,
    mask_blocks,
    sample_blocks,
)

V = 8192
PAD, MASK = V, V + 1

# Paper Table 2: expected masked ratio (%) for 4..8 blocks at (T, grid).
TABLE_2 = {
    (5, 16): [11.9, 14.5, 17.0, 19.4, 21.7],
    (5, 32): [10.6, 13.1, 15.2, 17.5, 19.5],
    (10, 16): [10.4, 12.8, 15.0, 17.1, 19.2],
    (10, 32): [9.3, 11.4, 13.4, 15.4, 17.2],
}


def brute_force_union(starts, lengths, shape):
    """Mark every block's cube position by position (python loops: an independent construction)."""
    mask = np.zeros(shape, dtype=bool)
    for (t0, h0, w0), (lt, lh, lw) in zip(starts.tolist(), lengths.tolist()):
        for t, h, w in itertools.product(range(t0, t0 + lt), range(h0, h0 + lh), range(w0, w0 + lw)):
            mask[t, h, w] = True
    return mask


def test_config_check():
    with pytest.raises(UsageError, match="masks nothing"):
        check_mask_config(0, mlm_weight=1.0)
    check_mask_config(0, mlm_weight=0.0)  # contrastive-only run: allowed
    with pytest.raises(UsageError, match="probability"):
        check_mask_config(-1001)
    for ok in (5, -1, -1000):
        check_mask_config(ok)


def test_block_length_limits_use_floor():
    assert block_length_limits((5, 16, 16)) == (3, 8, 8)
    assert block_length_limits((10, 32, 32)) == (6, 16, 16)
    assert block_length_limits((15, 16, 8)) == (10, 8, 4)
    assert block_length_limits((1, 1, 3)) == (1, 1, 1)  # degenerate axes still allow a one-position side


def test_block_draws_are_uniform_over_their_ranges():
    rng = np.random.default_rng(1)
    shape = (5, 16, 16)
    starts, lengths = sample_blocks(rng, 4, shape, batch=(20000,))
    limits = block_length_limits(shape)
    n = lengths[..., 0].size
    for axis in range(3):
        counts = np.bincount(lengths[..., axis].ravel(), minlength=limits[axis] + 1)[1:]
        expected = n / limits[axis]
        assert counts.sum() == n and np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
        assert np.all(starts[..., axis] >= 0) and np.all(starts[..., axis] + lengths[..., axis] <= shape[axis])
    # Given the side length, the start is uniform on [0, size - l].
    t_len, t_start = lengths[..., 0].ravel(), starts[..., 0].ravel()
    for length in range(1, limits[0] + 1):
        sel = t_start[t_len == length]
        counts = np.bincount(sel, minlength=shape[0] - length + 1)
        assert len(counts) == shape[0] - length + 1
        expected = len(sel) / len(counts)
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize("shape, num_blocks", [((5, 16, 16), 5), ((10, 8, 12), 3), ((3, 4, 4), 7), ((1, 2, 2), 2)])
def test_mask_is_the_union_of_the_drawn_blocks(shape, num_blocks):
    for seed in range(5):
        tokens = np.random.default_rng(100 + seed).integers(0, V, size=shape)
        inputs, labels = mask_blocks(tokens, num_blocks, np.random.default_rng(seed), PAD, MASK, V)
        # mask_blocks draws its blocks first: replaying the generator gives the same blocks.
        starts, lengths = sample_blocks(np.random.default_rng(seed), num_blocks, shape)
        union = brute_force_union(starts, lengths, shape)
        assert inputs.dtype == np.int64 and labels.dtype == np.int64
        np.testing.assert_array_equal(inputs, np.where(union, MASK, tokens))
        np.testing.assert_array_equal(labels, np.where(union, tokens, IGNORE_INDEX))


def test_pad_is_never_masked_nor_predicted():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(200, 5, 8, 8))
    tokens[:, 3:] = PAD  # short videos: the last two frames are padding
    tokens[:, :, 0, 0] = PAD
    pad = tokens == PAD
    for blocks, rand_replace in [(8, False), (8, True), (-500, False), (-500, True)]:
        inputs, labels = mask_batch(tokens, blocks, rng, PAD, MASK, V, rand_replace=rand_replace)
        assert np.all(inputs[pad] == PAD) and np.all(labels[pad] == IGNORE_INDEX)
        assert np.all((labels != IGNORE_INDEX).any(axis=(1, 2, 3)))  # but the real frames do get masked


def test_batch_masks_each_clip_independently():
    tokens = np.random.default_rng(0).integers(0, V, size=(3, 4, 5, 16, 16))
    inputs, labels = mask_batch(tokens, 5, np.random.default_rng(7), PAD, MASK, V)
    assert inputs.shape == labels.shape == tokens.shape
    flat = (labels != IGNORE_INDEX).reshape(12, -1)
    assert len({row.tobytes() for row in flat}) == 12
    # Same generator state, same masks; a clip's mask matches the union of its own drawn blocks.
    again, _ = mask_batch(tokens, 5, np.random.default_rng(7), PAD, MASK, V)
    np.testing.assert_array_equal(inputs, again)
    starts, lengths = sample_blocks(np.random.default_rng(7), 5, (5, 16, 16), batch=(3, 4))
    np.testing.assert_array_equal(
        flat[5].reshape(5, 16, 16), brute_force_union(starts[1, 1], lengths[1, 1], (5, 16, 16))
    )


def test_zero_blocks_masks_nothing():
    tokens = np.random.default_rng(0).integers(0, V, size=(5, 16, 16))
    inputs, labels = mask_blocks(tokens, 0, np.random.default_rng(0), PAD, MASK, V)
    np.testing.assert_array_equal(inputs, tokens)
    assert np.all(labels == IGNORE_INDEX)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match="one clip"):
        mask_blocks(np.zeros((2, 5, 4, 4), np.int64), 3, np.random.default_rng(0), PAD, MASK, V)


def block_distribution(size, limit):
    """All (start, length) of one axis with their probabilities."""
    return [(s, l, 1 / limit / (size - l + 1)) for l in range(1, limit + 1) for s in range(size - l + 1)]


@pytest.mark.parametrize("shape", [(3, 4, 4), (4, 2, 6)])
def test_expected_ratio_matches_exact_enumeration(shape):
    """Enumerate every block (and every pair of blocks) with its probability: an independent exact reference."""
    axes = [block_distribution(size, limit) for size, limit in zip(shape, block_length_limits(shape))]
    cubes = []
    for (t0, lt, pt), (h0, lh, ph), (w0, lw, pw) in itertools.product(*axes):
        cube = np.zeros(shape, dtype=bool)
        cube[t0 : t0 + lt, h0 : h0 + lh, w0 : w0 + lw] = True
        cubes.append((cube, pt * ph * pw))
    assert sum(p for _, p in cubes) == pytest.approx(1.0)
    one = sum(p * cube.mean() for cube, p in cubes)
    two = sum(pa * pb * (a | b).mean() for (a, pa), (b, pb) in itertools.product(cubes, cubes))
    assert expected_mask_ratio(shape, 1) == pytest.approx(one, abs=1e-12)
    assert expected_mask_ratio(shape, 2) == pytest.approx(two, abs=1e-12)
    # Per-axis marginals: P(axis position covered) summed over the enumeration.
    for axis, (size, dist) in enumerate(zip(shape, axes)):
        ref = np.zeros(size)
        for s, l, p in dist:
            ref[s : s + l] += p
        np.testing.assert_allclose(axis_cover_probability(size, block_length_limits(shape)[axis]), ref, atol=1e-12)


def test_expected_ratio_reproduces_paper_table_2():
    for (t, grid), row in TABLE_2.items():
        for blocks, paper in zip(range(4, 9), row):
            assert 100 * expected_mask_ratio((t, grid, grid), blocks) == pytest.approx(paper, abs=0.3)


@pytest.mark.slow
def test_sampled_ratio_reproduces_paper_table_2():
    """Monte Carlo over the real masking path; 16k clips per cell give a standard error < 0.05 points, so both the
    exact expectation (4.5 standard errors) and the paper (0.3 points) are tight checks."""
    rng = np.random.default_rng(2024)
    clips, chunk = 16000, 250  # small chunks stay in cache
    for (t, grid), row in TABLE_2.items():
        tokens = np.zeros((chunk, t, grid, grid), dtype=np.int16)
        for blocks, paper in zip(range(4, 9), row):
            ratios = np.concatenate(
                [
                    (mask_batch(tokens, blocks, rng, PAD, MASK, V)[1] != IGNORE_INDEX).reshape(chunk, -1).mean(1)
                    for _ in range(clips // chunk)
                ]
            )
            mean, stderr = 100 * ratios.mean(), 100 * ratios.std() / np.sqrt(clips)
            assert stderr < 0.05
            exact = 100 * expected_mask_ratio((t, grid, grid), blocks)
            assert abs(mean - exact) < 4.5 * stderr, (t, grid, blocks, mean, exact, stderr)
            assert abs(mean - paper) < 0.3, (t, grid, blocks, mean, paper)


def test_iid_mode_rate():
    tokens = np.random.default_rng(0).integers(0, V, size=(400, 5, 16, 16))
    inputs, labels = mask_batch(tokens, -145, np.random.default_rng(3), PAD, MASK, V)
    masked = labels != IGNORE_INDEX
    n = masked.size
    assert abs(masked.mean() - 0.145) < 5 * np.sqrt(0.145 * 0.855 / n)
    np.testing.assert_array_equal(inputs, np.where(masked, MASK, tokens))
    # Not blocky: the mask of a frame is uncorrelated with the next frame's.
    same = (masked[:, 1:] == masked[:, :-1]).mean()
    assert abs(same - (0.145**2 + 0.855**2)) < 0.01
    everything = mask_batch(tokens[:2], -1000, np.random.default_rng(0), PAD, MASK, V)[1]
    np.testing.assert_array_equal(everything, tokens[:2])


def classify(inputs, tokens, masked):
    """Per masked position: 0 = MASK, 1 = replaced by another code, 2 = unchanged."""
    return np.where(inputs == MASK, 0, np.where(inputs != tokens, 1, 2))[masked]


def test_rand_replace_is_per_block_80_10_10():
    rng = np.random.default_rng(5)
    n = 8000
    tokens = rng.integers(0, V, size=(n, 4, 8, 8))
    inputs, labels = mask_batch(tokens, 1, rng, PAD, MASK, V, rand_replace=True)
    masked = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[masked], tokens[masked])  # every block position stays a target
    np.testing.assert_array_equal(inputs[~masked], tokens[~masked])
    # One block per clip: its positions all get the same treatment (a random code equals the original with
    # probability 1/V per position, so allow a stray "unchanged" inside a random block).
    per_clip = masked.sum(axis=(1, 2, 3))
    as_mask = ((inputs == MASK) & masked).sum(axis=(1, 2, 3))
    as_noise = ((inputs != MASK) & (inputs != tokens) & masked).sum(axis=(1, 2, 3))
    assert np.all((as_mask == 0) | (as_mask == per_clip))
    kinds = np.where(as_mask == per_clip, 0, np.where(as_noise > 0, 1, 2))
    counts = np.bincount(kinds, minlength=3)
    for count, p in zip(counts, (0.8, 0.1, 0.1)):
        assert abs(count / n - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Random codes are uniform over the vocabulary, not the MASK/PAD ids.
    noise = inputs[masked & (inputs != tokens) & (inputs != MASK)]
    assert noise.min() >= 0 and noise.max() < V
    assert abs(noise.mean() - (V - 1) / 2) < 5 * V / np.sqrt(12 * len(noise))


def test_keep_blocks_leave_earlier_blocks_as_they_were():
    """Blocks fill one after another (the original's loop): MASK and noise blocks overwrite, keep blocks do not."""
    mask, noise, keep = range(len(REPLACE_PROBS))
    starts = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 3]])  # three blocks along w of a [1, 1, 5] clip
    lengths = np.array([[1, 1, 3], [1, 1, 3], [1, 1, 2]])  # w 0-2, 1-3, 3-4
    action = block_actions(starts, lengths, (1, 1, 5), np.array([mask, keep, noise]))
    np.testing.assert_array_equal(action[0, 0], [mask, mask, mask, noise, noise])
    action = block_actions(starts, lengths, (1, 1, 5), np.array([noise, mask, keep]))
    np.testing.assert_array_equal(action[0, 0], [noise, mask, mask, mask, keep])


def test_rand_replace_with_overlapping_blocks_is_near_80_10_10_per_position():
    """Block choices are independent of geometry, so a masked position is MASK / noise / unchanged with about
    80/10/10; overlaps move a little from unchanged to the others, since a keep block covers nothing up."""
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, V, size=(3000, 5, 16, 16))
    inputs, labels = mask_batch(tokens, 6, rng, PAD, MASK, V, rand_replace=True)
    masked = labels != IGNORE_INDEX
    fractions = np.bincount(classify(inputs, tokens, masked), minlength=3) / masked.sum()
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.02)
    assert fractions[2] < 0.1


def test_rand_replace_iid_is_per_token():
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, V, size=(100, 5, 16, 16))
    inputs, labels = mask_batch(tokens, -200, rng, PAD, MASK, V, rand_replace=True)
    masked = labels != IGNORE_INDEX
    kinds = classify(inputs, tokens, masked)
    fractions = np.bincount(kinds, minlength=3) / len(kinds)
    sd = np.sqrt(0.1 * 0.9 / len(kinds))
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=5 * sd)
