"""Block masking for masked-token pre-training (docs/reference.md §5.2), vectorised with numpy.

A clip of codes [T, H, W] is masked by the union of `num_blocks` random cubes. Each cube has side lengths drawn
uniformly from [1, ⌊2T/3⌋] × [1, ⌊H/2⌋] × [1, ⌊W/2⌋] (floor, as the original code: the floor rule is what
reproduces paper Table 2) and a uniformly drawn offset that keeps it inside the clip. PAD positions are never
masked or predicted. Labels hold the original code at every masked position and IGNORE_INDEX elsewhere.

Modes of `num_blocks` (the `--mask-blocks` flag):
  k > 0   k random blocks;
  k < 0   i.i.d. masking, each position with probability -k/1000 (so -145 masks 14.5 %), k >= -1000;
  k = 0   nothing is masked (only meaningful with mlm_weight 0: `check_mask_config` refuses it otherwise, since
          the original then averages a loss over zero positions and gets NaN, docs/reference.md §8.8).

With `rand_replace` (BERT-style noise, the `--mask-rand-replace` ablation) the 80/10/10 choice is made per block,
as in the original code (the paper describes it per token): a block is filled with MASK (80 %), with uniformly
random codes in [0, vocab_size) (10 %), or keeps its codes (10 %). Where blocks overlap, the block drawn last
decides. Every masked non-PAD position stays a prediction target. In i.i.d. mode each masked position counts as
its own block, which is the per-token BERT rule (the original refuses this combination).

Masking runs in the data-loader workers with a per-sample generator (see vimpac.data), so a resumed run masks
exactly as the interrupted one would have. There is no Python loop over positions (rand_replace loops over
the few blocks).
"""

from __future__ import annotations

import numpy as np

from vimpac.errors import UsageError

IGNORE_INDEX = -100
IID_DENOMINATOR = 1000
# Per-block action for rand_replace: index 0 = MASK, 1 = random codes, 2 = keep (probabilities 80/10/10).
REPLACE_PROBS = (0.8, 0.1, 0.1)
_MASK, _RANDOM, _KEEP = 0, 1, 2


def check_mask_config(num_blocks: int, mlm_weight: float = 1.0) -> None:
    """Refuse `--mask-blocks` values that cannot train: 0 blocks with an MLM loss, or an i.i.d. rate above 100 %."""
    if num_blocks < -IID_DENOMINATOR:
        raise UsageError(
            f"--mask-blocks {num_blocks} asks for i.i.d. masking with probability {-num_blocks}/{IID_DENOMINATOR} "
            f"> 1; use a value in [-{IID_DENOMINATOR}, -1] (e.g. -145 for 14.5 %) or a positive block count"
        )
    if num_blocks == 0 and mlm_weight != 0:
        raise UsageError(
            "--mask-blocks 0 masks nothing, so the masked-token loss has no targets; use a positive block count "
            "(5 for T=5 at 16x16 codes, 6 at 32x32), a negative one for i.i.d. masking, or --mlm-weight 0 for a "
            "contrastive-only run"
        )


def block_length_limits(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Largest block side per axis for a clip shape (T, H, W): (⌊2T/3⌋, ⌊H/2⌋, ⌊W/2⌋), at least 1 each (the
    original fails for T = 1 or H = 1; a one-position side is the only sensible block there)."""
    t, h, w = shape
    return max(2 * t // 3, 1), max(h // 2, 1), max(w // 2, 1)


def sample_blocks(
    rng: np.random.Generator, num_blocks: int, shape: tuple[int, int, int], batch: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks: (starts, lengths), each int64 [*batch, num_blocks, 3] over the axes (T, H, W).

    lengths[..., a] is uniform on [1, limit_a] (block_length_limits) and starts[..., a] uniform on
    [0, shape[a] - lengths[..., a]], both inclusive.
    """
    limits = np.asarray(block_length_limits(shape))
    sizes = np.asarray(shape)
    lengths = rng.integers(1, limits + 1, size=(*batch, num_blocks, 3))
    starts = rng.integers(0, sizes - lengths + 1)
    return starts, lengths


def axis_indicators(
    starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis extent of each block: bool [..., k, T], [..., k, H], [..., k, W] from starts/lengths [..., k, 3].
    A block covers (t, h, w) iff all three indicators are true (a cube is an outer product of intervals)."""
    out = []
    for axis, size in enumerate(shape):
        pos = np.arange(size)
        s = starts[..., axis, None]
        out.append((pos >= s) & (pos < s + lengths[..., axis, None]))
    return out[0], out[1], out[2]


def block_union(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Positions covered by at least one block: bool [..., T, H, W].

    The number of blocks covering (t, h, w) is sum_k [t,h in block k] * [w in block k], a matrix product over k,
    which BLAS does ~20x faster than materialising the [..., k, T, H, W] cubes. Counts are small integers, exact
    in float32.
    """
    t, h, w = axis_indicators(starts, lengths, shape)
    th = (t[..., :, None] & h[..., None, :]).reshape(*t.shape[:-1], -1)  # [..., k, T*H]
    counts = np.matmul(np.swapaxes(th, -1, -2).astype(np.float32), w.astype(np.float32))  # [..., T*H, W]
    return counts.reshape(*counts.shape[:-2], *shape) > 0


def block_actions(
    starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int, int], block_action: np.ndarray
) -> np.ndarray:
    """Per-position rand_replace action int [..., T, H, W], as the original fills blocks one after another: a MASK
    or noise block overwrites what it covers, a keep block writes nothing, so a position takes the action of the
    last MASK / noise block covering it and _KEEP where there is none. block_action: int [..., k]."""
    t, h, w = axis_indicators(starts, lengths, shape)
    action = np.full((*t.shape[:-2], *shape), _KEEP)
    for j in range(block_action.shape[-1]):  # a loop over the few blocks; each step is vectorised over positions
        cover = t[..., j, :, None, None] & h[..., j, None, :, None] & w[..., j, None, None, :]
        writes = cover & (block_action[..., j, None, None, None] != _KEEP)
        action = np.where(writes, block_action[..., j, None, None, None], action)
    return action


def _apply(
    tokens: np.ndarray,
    masked: np.ndarray,
    action: np.ndarray | None,
    rng: np.random.Generator,
    pad_id: int,
    mask_id: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from the selected positions; `action` (per position, or None = all MASK) picks the
    rand_replace treatment. PAD positions are removed from the selection first."""
    tokens = np.asarray(tokens, dtype=np.int64)
    masked = masked & (tokens != pad_id)
    labels = np.where(masked, tokens, IGNORE_INDEX)
    if action is None:
        inputs = np.where(masked, mask_id, tokens)
    else:
        noise = rng.integers(0, vocab_size, size=tokens.shape)
        replacement = np.where(action == _MASK, mask_id, np.where(action == _RANDOM, noise, tokens))
        inputs = np.where(masked, replacement, tokens)
    return inputs, labels


def mask_batch(
    tokens: np.ndarray,
    num_blocks: int,
    rng: np.random.Generator,
    pad_id: int,
    mask_id: int,
    vocab_size: int,
    rand_replace: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask clips tokens [..., T, H, W] (any leading batch dims, each clip masked independently).

    Returns (inputs, labels), int64 of the same shape: inputs with MASK (or noise, see rand_replace) at masked
    positions; labels = original code at masked non-PAD positions, IGNORE_INDEX elsewhere.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim < 3:
        raise ValueError(f"tokens must be [..., T, H, W], got shape {tokens.shape}")
    check_mask_config(num_blocks, mlm_weight=0)
    shape = tuple(tokens.shape[-3:])
    batch = tuple(tokens.shape[:-3])
    action = None
    if num_blocks > 0:
        starts, lengths = sample_blocks(rng, num_blocks, shape, batch)
        masked = block_union(starts, lengths, shape)
        if rand_replace:
            block_action = rng.choice(len(REPLACE_PROBS), size=(*batch, num_blocks), p=REPLACE_PROBS)
            action = block_actions(starts, lengths, shape, block_action)
    elif num_blocks < 0:
        masked = rng.random(tokens.shape) < (-num_blocks / IID_DENOMINATOR)
        if rand_replace:
            action = rng.choice(len(REPLACE_PROBS), size=tokens.shape, p=REPLACE_PROBS)
    else:
        masked = np.zeros(tokens.shape, dtype=bool)
    return _apply(tokens, masked, action, rng, pad_id, mask_id, vocab_size)


def mask_blocks(
    tokens: np.ndarray,
    num_blocks: int,
    rng: np.random.Generator,
    pad_id: int,
    mask_id: int,
    vocab_size: int,
    rand_replace: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one clip tokens [T, H, W] -> (inputs [T, H, W], labels [T, H, W]) int64 (see mask_batch)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be one clip [T, H, W], got shape {tokens.shape}; use mask_batch for more")
    return mask_batch(tokens, num_blocks, rng, pad_id, mask_id, vocab_size, rand_replace)


def axis_cover_probability(size: int, limit: int) -> np.ndarray:
    """P(a random block side covers position i) along one axis, float64 [size]: the side length l is uniform on
    [1, limit] and the start uniform on [0, size - l], so P = mean_l (#starts s with s <= i < s + l) / (size-l+1)."""
    pos = np.arange(size)
    prob = np.zeros(size)
    for length in range(1, limit + 1):
        lo = np.maximum(pos - length + 1, 0)
        hi = np.minimum(pos, size - length)
        prob += np.maximum(hi - lo + 1, 0) / (size - length + 1)
    return prob / limit


def expected_mask_ratio(shape: tuple[int, int, int], num_blocks: int) -> float:
    """Expected fraction of a PAD-free clip that `num_blocks` masks (exact, no sampling).

    Blocks are independent and a block's axes are independent, so a position is covered with probability
    1 - (1 - p_T(t) p_H(h) p_W(w))^k. Useful to choose the block count closest to a target ratio (paper: 15 %).
    """
    if num_blocks < 0:
        return -num_blocks / IID_DENOMINATOR
    p_t, p_h, p_w = (axis_cover_probability(s, m) for s, m in zip(shape, block_length_limits(shape)))
    p_block = p_t[:, None, None] * p_h[None, :, None] * p_w[None, None, :]
    return float(np.mean(1.0 - (1.0 - p_block) ** num_blocks))
