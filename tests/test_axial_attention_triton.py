"""The Triton axial-attention kernels against the PyTorch reference (interpreter on CPU, real kernels on CUDA).

Every comparison covers out, cls_out and the gradients of all six inputs under a random upstream gradient.
Dropout is checked against the reference math run with the kernel's own keep mask (`dropout_keep_mask`).
"""

from __future__ import annotations

import math

import pytest
import torch

from vimpac.kernels.axial_attention_reference import (
    AXIS_DIMS,
    _allowed_keys,
    _lines_with_cls,
    axial_attention_reference,
)
from vimpac.kernels.axial_attention_triton import axial_attention_triton, bytes_moved, dropout_keep_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 1, 3, 4), (1, 7, 2, 5), (2, 3, 5, 2)]  # (B, T, H, W): T=1, T=7, H != W, odd sizes


def fused_inputs(shape, heads=2, dim=16, dtype=torch.float32, seed=0):
    """Leaves: fused [B, T, H, W, 3, heads, d] (q, k, v are strided views of it) and cls [B, 3, heads, d]."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(*shape, 3, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    cls = torch.randn(shape[0], 3, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    return fused, cls


def split(fused, cls):
    return (*fused.unbind(4), *cls.unbind(1))


def random_pad(shape, rate, seed):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).to(DEVICE)


def outputs_and_grads(fn, leaves, seed=1):
    """fn(*leaves) → (out, cls_out); returns them (fp32) and the fp32 gradients of a random linear loss."""
    out, cls_out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    g_cls = torch.randn(cls_out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * g_out).sum() + (cls_out * g_cls).sum(), leaves)
    return [t.detach().float() for t in (out, cls_out, *grads)]


def fp32_leaves(leaves):
    return [t.detach().float().requires_grad_() for t in leaves]


def assert_all_close(got, want, atol, rtol=0.0):
    names = ["out", "cls_out"] + [f"grad{i}" for i in range(len(got) - 2)]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def compare_fused(axis, shape, heads=2, dim=16, dtype=torch.float32, pad=None, atol=2e-5, rtol=0.0, seed=0, **kw):
    """Triton on views of a fused QKV tensor vs the reference on the same values in fp32."""
    fused, cls = fused_inputs(shape, heads, dim, dtype, seed)
    got = outputs_and_grads(
        lambda f, c: axial_attention_triton(*split(f, c), axis, key_padding_mask=pad, **kw), [fused, cls]
    )
    want = outputs_and_grads(
        lambda f, c: axial_attention_reference(*split(f, c), axis, key_padding_mask=pad), fp32_leaves([fused, cls])
    )
    assert_all_close(got, want, atol, rtol)
    return got


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_fp32_matches_reference(shape, axis):
    fused, _ = fused_inputs(shape)
    assert not fused.unbind(4)[0].is_contiguous()
    compare_fused(axis, shape)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 6e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("axis", ["T", "W"])
def test_half_precision_matches_fp32_reference(dtype, atol, axis):
    shape = (2, 3, 5, 2)
    pad = random_pad(shape, 0.3, seed=4)
    got = compare_fused(axis, shape, dtype=dtype, pad=pad, atol=atol)
    fused, cls = fused_inputs(shape, dtype=dtype)
    out, cls_out = axial_attention_triton(*split(fused, cls), axis)
    assert out.dtype == cls_out.dtype == dtype
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_padding_mask_and_fully_padded_line(axis):
    shape = (2, 3, 4, 5)
    pad = random_pad(shape, 0.35, seed=3)
    line = {"T": (1, slice(None), 2, 3), "H": (0, 2, slice(None), 1), "W": (1, 0, 3, slice(None))}[axis]
    pad[line] = True
    compare_fused(axis, shape, pad=pad, seed=5)
    fused, cls = fused_inputs(shape, seed=5)
    out, _ = axial_attention_triton(*split(fused, cls), axis, key_padding_mask=pad)
    # Every query of a line made only of PAD sees the CLS key alone, so its output is CLS's value.
    cls_v = cls[:, 2].detach()
    padded = out[line].detach()
    torch.testing.assert_close(padded, cls_v[line[0]].expand_as(padded), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("dim", "heads", "axis"), [(32, 3, "H"), (64, 1, "T"), (128, 1, "W")])
def test_head_dims(dim, heads, axis):
    compare_fused(axis, (1, 3, 2, 4), heads=heads, dim=dim, pad=random_pad((1, 3, 2, 4), 0.3, seed=6))


@pytest.mark.parametrize("block_rows", [16, 32, 128])
def test_packing_does_not_change_results(block_rows):
    # Lines of 1 + 5 = 6 rows: 2, 5 and 21 lines per program; the last program is partly empty in each case.
    shape = (1, 3, 5, 5)
    compare_fused("W", shape, pad=random_pad(shape, 0.3, seed=7), block_rows=block_rows)


# Programs never straddle samples: the lines of a sample are split into ⌈lines / LPP⌉ programs, the last one
# partly empty when LPP does not divide the lines. (3, 2, 3, 3): 3 samples; T: 9 lines of 3 rows, H and W: 6 lines
# of 4 rows. block_rows 16 → 5 (T) or 4 (H, W) lines per program: 2 programs per sample, the second with 4 or 2
# lines; 32 → 10 or 8, one program per sample holding fewer lines than it could.
@pytest.mark.parametrize(
    ("axis", "block_rows", "with_pad"),
    [("T", 16, False), ("T", 32, True), ("H", 16, True), ("W", 16, False), ("W", None, True)],
)
def test_several_samples_and_a_ragged_last_program(axis, block_rows, with_pad):
    shape = (3, 2, 3, 3)
    pad = random_pad(shape, 0.3, seed=20) if with_pad else None
    compare_fused(axis, shape, pad=pad, block_rows=block_rows, seed=21)


@pytest.mark.parametrize(("axis", "block_rows"), [("T", None), ("H", 32)])
def test_dropout_several_samples_and_a_ragged_last_program(axis, block_rows):
    """Dropout with 3 samples whose lines do not fill their last program: the kernels draw the keep mask of
    `dropout_keep_mask` (global line numbers, independent of the packing) and match the reference with it."""
    shape, heads, p, seed = (3, 2, 3, 3), 2, 0.3, 31
    pad = random_pad(shape, 0.3, seed=22)
    fused, cls = fused_inputs(shape, heads, seed=23)
    keep = keep_mask_for(shape, heads, axis, p, seed)
    # 16-row tiles (the default with dropout) and one program per sample hold the same mask.
    torch.testing.assert_close(keep, keep_mask_for(shape, heads, axis, p, seed, block_rows=64))
    got = outputs_and_grads(
        lambda f, c: axial_attention_triton(
            *split(f, c), axis, key_padding_mask=pad, dropout_p=p, seed=seed, block_rows=block_rows
        ),
        [fused, cls],
    )
    want = outputs_and_grads(
        lambda f, c: reference_with_keep(*split(f, c), axis, pad, keep, p), fp32_leaves([fused, cls])
    )
    assert_all_close(got, want, atol=2e-5)


def test_bytes_moved_by_hand():
    """[2, 3, 4, 4] along H: 12 lines of 5 rows per sample, 2 heads of 16, fp16 (2 B), 96 tokens · 2 heads = 192
    token rows of 32 B."""
    shape, row = (2, 3, 4, 4), 16 * 2
    # Forward, default tile (32 rows, 6 lines per program): 2 per sample and head, 8 programs in all.
    fwd = bytes_moved(shape, "H", 2, 16, torch.float16)
    assert fwd == {
        "tokens": 4 * 192 * row,  # q, k, v read, out written
        "cls": 3 * 8 * row,  # cls_q, cls_k, cls_v rows, once per program
        "pad": 0,
        "seed": 0,
        "partials": 2 * 8 * 16 * 4,  # one fp32 partial per program, written and read back
        "cls_out": 2 * 2 * row,
        "total": 24576 + 768 + 1024 + 128,
        "minimum": 24576 + 4 * 2 * 2 * row,  # tokens + cls_q, cls_k, cls_v, cls_out once
    }
    per_line = bytes_moved(shape, "H", 2, 16, torch.float16, per_line=True)
    assert per_line["cls"] == 3 * 24 * 2 * row and per_line["minimum"] == fwd["minimum"]
    assert per_line["partials"] == 6 * fwd["partials"]  # the packing factor: 6 lines per program
    assert per_line["total"] == 24576 + 4608 + 6144 + 128
    # Backward with PAD and dropout: 16-row tiles of 3 lines, 4 per sample and head, 16 programs.
    bwd = bytes_moved(shape, "H", 2, 16, torch.float16, dropout=True, backward=True, pad=True)
    assert bwd == {
        "tokens": 7 * 192 * row,  # q, k, v, dO read; dq, dk, dv written
        "cls": 4 * 16 * row,  # cls_q, cls_k, cls_v, dcls
        "pad": 192,  # 96 mask bytes, read by each head's programs
        "seed": 16 * 8,
        "partials": 2 * 3 * 16 * 16 * 4,
        "cls_out": 3 * 2 * 2 * row,
        "total": 43008 + 2048 + 192 + 128 + 6144 + 384,
        "minimum": 43008 + 7 * 2 * 2 * row + 96,
    }
    per_line = bytes_moved(shape, "H", 2, 16, torch.float16, dropout=True, backward=True, pad=True, per_line=True)
    assert per_line["partials"] == 3 * bwd["partials"]  # 3 lines per program
    assert per_line["seed"] == bwd["seed"]  # 24 lines fill 8 programs of 3 either way


@pytest.mark.parametrize("axis", ["T", "H"])
def test_separate_strided_inputs_and_mask(axis):
    """q, k, v, cls_* and the PAD mask as unrelated non-contiguous views (no shared strides)."""
    batch, t, h, w, heads, dim = 2, 3, 4, 2, 2, 16
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(batch, t, h, w, heads, dim, generator=gen).to(DEVICE).requires_grad_()
    k_base = torch.randn(w, heads, batch, h, t, dim, generator=gen).to(DEVICE).requires_grad_()
    v_base = torch.randn(batch, t, h, w, heads, 2, dim, generator=gen).to(DEVICE).requires_grad_()
    cls_base = torch.randn(heads, batch, 3, dim, generator=gen).to(DEVICE).requires_grad_()
    pad_base = torch.rand(w, t, batch, h, generator=gen).to(DEVICE) < 0.4
    leaves = [q, k_base, v_base, cls_base]

    def views(q, k_base, v_base, cls_base):
        k = k_base.permute(2, 4, 3, 0, 1, 5)
        v = v_base[..., 1, :]
        cls_q, cls_k, cls_v = cls_base.permute(1, 0, 2, 3).unbind(2)
        return q, k, v, cls_q, cls_k, cls_v

    pad = pad_base.permute(2, 1, 3, 0)
    assert not pad.is_contiguous() and not views(*leaves)[1].is_contiguous()
    got = outputs_and_grads(lambda *a: axial_attention_triton(*views(*a), axis, key_padding_mask=pad), leaves)
    want = outputs_and_grads(
        lambda *a: axial_attention_reference(*views(*a), axis, key_padding_mask=pad), fp32_leaves(leaves)
    )
    assert_all_close(got, want, atol=2e-5)


def test_expanded_upstream_gradient_and_custom_scale():
    fused, cls = fused_inputs((1, 2, 3, 3), seed=9)
    for fn in (axial_attention_triton, axial_attention_reference):
        out, cls_out = fn(*split(fused, cls), "H", scale=0.3)
        # out.sum() hands backward a stride-0 (expanded) gradient.
        grads = torch.autograd.grad(out.sum() + cls_out.sum(), [fused, cls])
        if fn is axial_attention_triton:
            got = [out.detach(), cls_out.detach(), *grads]
        else:
            want = [out.detach(), cls_out.detach(), *grads]
    assert_all_close(got, want, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------------
# Dropout


def reference_with_keep(q, k, v, cls_q, cls_k, cls_v, axis, pad, keep, dropout_p, scale=None):
    """The reference's math (explicit softmax) with a given keep mask [B, lines, heads, 1 + L, 1 + L]."""
    dims = (AXIS_DIMS[axis],)
    batch, heads, dim = q.shape[0], q.shape[4], q.shape[5]
    qs, ks, vs = (_lines_with_cls(x, c, dims) for x, c in ((q, cls_q), (k, cls_k), (v, cls_v)))
    seq = qs.shape[-2]
    qs, ks, vs = (x.reshape(-1, heads, seq, dim) for x in (qs, ks, vs))
    scores = qs @ ks.transpose(-1, -2) * (dim**-0.5 if scale is None else scale)
    if pad is not None:
        scores = scores.masked_fill(~_allowed_keys(pad, dims), float("-inf"))
    probs = scores.softmax(-1) * keep.reshape(-1, heads, seq, seq) / (1.0 - dropout_p)
    out = (probs @ vs).view(batch, -1, heads, seq, dim)
    line_dims = tuple(d for d in (1, 2, 3) if d not in dims)
    tokens = out[:, :, :, 1:].reshape(batch, *(q.shape[d] for d in line_dims), heads, q.shape[dims[0]], dim)
    order = (0, *line_dims, 4, *dims, 5)
    return tokens.permute(*(order.index(i) for i in range(6))), out[:, :, :, 0].mean(1)


def keep_mask_for(shape, heads, axis, dropout_p, seed, block_rows=None):
    a = AXIS_DIMS[axis]
    lines = math.prod(shape[d] for d in (1, 2, 3) if d != a)
    return dropout_keep_mask(shape[0], lines, heads, 1 + shape[a], dropout_p, seed, DEVICE, block_rows)


def test_keep_mask_rate_independence_and_seed():
    p, shape, heads = 0.3, (1, 7, 16, 16), 2
    # 128-row tiles: 16 lines per program, 32 programs in all (the mask does not depend on the tiling).
    keep = keep_mask_for(shape, heads, "T", p, seed=123, block_rows=128)
    assert keep.shape == (1, 16 * 16, heads, 8, 8)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01  # 32768 draws: 4 standard deviations
    # Neighbouring keys, queries, heads and lines are independent: they agree with probability p² + (1-p)².
    agree = p**2 + (1 - p) ** 2
    for a, b in [
        (keep[..., 1:], keep[..., :-1]),
        (keep[..., 1:, :], keep[..., :-1, :]),
        (keep[:, :, 1:], keep[:, :, :-1]),
        (keep[:, 1:], keep[:, :-1]),
    ]:
        assert abs((a == b).float().mean().item() - agree) < 0.02
    other = keep_mask_for(shape, heads, "T", p, seed=124, block_rows=128)
    assert abs((keep == other).float().mean().item() - agree) < 0.02
    small = (2, 3, 4, 5)
    torch.testing.assert_close(
        keep_mask_for(small, heads, "W", p, seed=5), keep_mask_for(small, heads, "W", p, seed=5, block_rows=64)
    )


@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_dropout_matches_reference_with_the_same_mask(axis):
    shape, heads, p, seed = (2, 3, 4, 5), 2, 0.4, 77
    pad = random_pad(shape, 0.3, seed=10)
    fused, cls = fused_inputs(shape, heads, seed=11)
    keep = keep_mask_for(shape, heads, axis, p, seed)
    got = outputs_and_grads(
        lambda f, c: axial_attention_triton(*split(f, c), axis, key_padding_mask=pad, dropout_p=p, seed=seed),
        [fused, cls],
    )
    want = outputs_and_grads(
        lambda f, c: reference_with_keep(*split(f, c), axis, pad, keep, p), fp32_leaves([fused, cls])
    )
    assert_all_close(got, want, atol=2e-5)


def test_dropout_mask_is_independent_of_packing():
    shape, p, seed = (1, 5, 3, 4), 0.25, 5
    fused, cls = fused_inputs(shape, seed=12)
    runs = [
        outputs_and_grads(
            lambda f, c, br=br: axial_attention_triton(*split(f, c), "T", dropout_p=p, seed=seed, block_rows=br),
            [fused, cls],
        )
        for br in (16, 64)
    ]
    assert_all_close(runs[0], runs[1], atol=1e-6)


def one_hot_inputs(shape, axis, heads=2, dim=16):
    """q = k = 0 (uniform attention over 1 + L keys) and v[j] = e_j (CLS = e_0): out[i, j] = keep_ij / ((1-p)·S)."""
    a = AXIS_DIMS[axis]
    seq = 1 + shape[a]
    q = torch.zeros(*shape, heads, dim, device=DEVICE)
    view = [1, 1, 1, 1, 1, dim]
    view[a] = shape[a]
    v = torch.eye(dim, device=DEVICE)[1:seq].view(view).expand(*shape, heads, dim).contiguous()
    cls = torch.zeros(shape[0], heads, dim, device=DEVICE)
    cls_v = cls.clone()
    cls_v[..., 0] = 1.0
    return (q, q, v, cls, cls, cls_v), seq


def test_dropout_forward_applies_the_keep_mask():
    shape, axis, p, seed = (2, 5, 3, 4), "T", 0.3, 21
    args, seq = one_hot_inputs(shape, axis)
    out, cls_out = axial_attention_triton(*args, axis, dropout_p=p, seed=seed)
    keep = out[..., :seq] * (1 - p) * seq
    assert torch.allclose(keep, keep.round(), atol=1e-5), "dropped weights are 0, kept ones scaled by 1/(1-p)"
    assert abs(keep.round().mean().item() - (1 - p)) < 0.05
    mask = keep_mask_for(shape, 2, axis, p, seed)  # [B, lines = H·W, heads, S, S]
    tokens = mask[:, :, :, 1:].reshape(shape[0], shape[2], shape[3], 2, shape[1], seq).permute(0, 4, 1, 2, 3, 5)
    torch.testing.assert_close(keep.round(), tokens.float(), atol=0, rtol=0)
    torch.testing.assert_close(cls_out[..., :seq] * (1 - p) * seq, mask[:, :, :, 0].float().mean(1))


def test_dropout_seed_reproducibility():
    fused, cls = fused_inputs((2, 3, 4, 2), seed=13)
    args = split(fused, cls)

    def run(**kw):
        return axial_attention_triton(*args, "H", dropout_p=0.5, **kw)[0]

    torch.testing.assert_close(run(seed=3), run(seed=3), atol=0, rtol=0)
    assert not torch.equal(run(seed=3), run(seed=4))
    torch.manual_seed(0)
    first = run()
    torch.manual_seed(0)
    torch.testing.assert_close(run(), first, atol=0, rtol=0)
    assert not torch.equal(run(), first)
    torch.testing.assert_close(axial_attention_triton(*args, "H")[0], axial_attention_reference(*args, "H")[0])


def test_tensor_seed_matches_int_seed():
    """A seed tensor (any integer dtype, shape [] or [1]) draws the mask of the int seed of the same value."""
    fused, cls = fused_inputs((2, 3, 4, 2), seed=13)
    args = split(fused, cls)
    want = axial_attention_triton(*args, "W", dropout_p=0.4, seed=2**40 + 3)[0]
    for seed in (torch.tensor(2**40 + 3), torch.tensor([2**40 + 3], device=DEVICE)):
        torch.testing.assert_close(
            axial_attention_triton(*args, "W", dropout_p=0.4, seed=seed)[0], want, atol=0, rtol=0
        )
    small = axial_attention_triton(*args, "W", dropout_p=0.4, seed=torch.tensor([9], dtype=torch.int32))[0]
    torch.testing.assert_close(small, axial_attention_triton(*args, "W", dropout_p=0.4, seed=9)[0], atol=0, rtol=0)
    torch.testing.assert_close(
        keep_mask_for((2, 3, 4, 2), 2, "W", 0.4, seed=torch.tensor(9, device=DEVICE)),
        keep_mask_for((2, 3, 4, 2), 2, "W", 0.4, seed=9),
    )
    with pytest.raises(ValueError, match="seed"):
        axial_attention_triton(*args, "W", dropout_p=0.4, seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="seed"):
        axial_attention_triton(*args, "W", dropout_p=0.4, seed=torch.tensor([1, 2]))


def test_rejects_unsupported_inputs():
    fused, cls = fused_inputs((1, 2, 3, 4), dim=16)
    with pytest.raises(ValueError, match="axis"):
        axial_attention_triton(*split(fused, cls), "X")
    small = fused_inputs((1, 2, 3, 4), dim=8)
    with pytest.raises(ValueError, match="head dims"):
        axial_attention_triton(*split(*small), "T")
    odd = fused_inputs((1, 2, 3, 4), dim=24)
    with pytest.raises(ValueError, match="head dims"):
        axial_attention_triton(*split(*odd), "T")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        axial_attention_triton(*(t.double() for t in split(fused, cls)), "T")
    with pytest.raises(ValueError, match="contiguous last dim"):
        q = torch.randn(1, 2, 3, 4, 2, 32, device=DEVICE)[..., ::2]
        axial_attention_triton(q, *split(fused, cls)[1:], "T")
    with pytest.raises(ValueError, match="block_rows"):
        axial_attention_triton(*split(fused, cls), "T", block_rows=24)


# ----------------------------------------------------------------------------------------------------------------
# torch.library op


@pytest.mark.parametrize("seed_shape", [(), (1,)])
def test_registered_op_passes_opcheck(seed_shape):
    shape = (1, 2, 3, 2)
    fused, cls = fused_inputs(shape, seed=16)
    pad = random_pad(shape, 0.3, seed=17)
    seed = torch.full(seed_shape, 7, dtype=torch.int64, device=DEVICE)
    args = (*split(fused, cls), "H", pad, 0.2, 0.25, seed, 0)
    torch.library.opcheck(torch.ops.vimpac.axial_attention.default, args)


def test_compiled_function_matches_eager():
    shape, p, seed = (1, 3, 2, 4), 0.3, 8
    pad = random_pad(shape, 0.3, seed=18)
    fused, cls = fused_inputs(shape, seed=19)

    def attend(f, c):
        return axial_attention_triton(*split(f, c), "T", key_padding_mask=pad, dropout_p=p, seed=seed)

    want = outputs_and_grads(attend, [fused, cls])
    # aot_eager runs Dynamo, fake tensors and the registered autograd formula without a C++ toolchain; fullgraph
    # proves the op is traced through without a graph break.
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert_all_close(outputs_and_grads(compiled, [fused, cls]), want, atol=0)


def test_compiled_dropout_without_seed_has_no_graph_break():
    """The model's call (dropout, no seed): the seed is drawn as a device tensor, so fullgraph compiles it."""
    shape, axis, p = (2, 7, 8, 8), "T", 0.2
    args, seq = one_hot_inputs(shape, axis)

    def attend(*a):
        return axial_attention_triton(*a, axis, dropout_p=p)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out, cls_out = compiled(*args)
    # One-hot values under uniform attention: out[..., j] = keep_ij / ((1 - p) · S), so the kept fraction is
    # readable from the output (14336 query-key draws: the tolerance is ~4.5 standard deviations).
    keep = out[..., :seq] * (1 - p) * seq
    assert torch.allclose(keep, keep.round(), atol=1e-5)
    assert abs(keep.round().mean().item() - (1 - p)) < 0.015
    torch.manual_seed(0)
    again = compiled(*args)
    torch.testing.assert_close(again[0], out, atol=0, rtol=0)
    torch.testing.assert_close(again[1], cls_out, atol=0, rtol=0)
    torch.manual_seed(1)
    assert not torch.equal(compiled(*args)[0], out)


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition"])
def test_compiled_dropout_without_seed_backward_uses_the_forward_mask(backend):
    """Backward of the compiled graph reuses the drawn seed (saved, not redrawn by the partitioner): the same
    torch.manual_seed gives eager's outputs and gradients, which the eager autograd formula ties together."""
    shape, p = (1, 3, 2, 4), 0.3
    pad = random_pad(shape, 0.3, seed=18)
    fused, cls = fused_inputs(shape, seed=19)

    def attend(f, c):
        return axial_attention_triton(*split(f, c), "T", key_padding_mask=pad, dropout_p=p)

    torch.manual_seed(3)
    want = outputs_and_grads(attend, [fused, cls])
    compiled = torch.compile(attend, backend=backend, fullgraph=True)
    torch.manual_seed(3)
    assert_all_close(outputs_and_grads(compiled, [fused, cls]), want, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# GPU: the small model's real size


REAL = (16, 5, 16, 16)  # B, T, H, W of the small model (128-pixel frames, 5-frame clips); 8 heads of 64


@pytest.mark.gpu
@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_gpu_real_size_fp16_matches_reference(axis):
    pad = random_pad(REAL, 0.1, seed=14)
    compare_fused(axis, REAL, heads=8, dim=64, dtype=torch.float16, pad=pad, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", ["T", "W"])
def test_gpu_real_size_dropout_matches_reference_with_mask(axis):
    p, seed = 0.1, 99
    fused, cls = fused_inputs(REAL, 8, 64, torch.float16, seed=15)
    keep = keep_mask_for(REAL, 8, axis, p, seed)
    assert abs(keep.float().mean().item() - (1 - p)) < 2e-3
    got = outputs_and_grads(
        lambda f, c: axial_attention_triton(*split(f, c), axis, dropout_p=p, seed=seed), [fused, cls]
    )
    want = outputs_and_grads(
        lambda f, c: reference_with_keep(*split(f, c), axis, None, keep, p), fp32_leaves([fused, cls])
    )
    assert_all_close(got, want, atol=1e-2, rtol=1e-2)


def test_refuses_a_tile_beyond_the_shared_memory_limit(monkeypatch):
    """A line whose tile needs more shared memory than the device allows is refused before any launch, with a
    message that says why; `vimpac.kernels.axial_attention` then takes the reference (VIMPAC_KERNELS unset)."""
    from vimpac.kernels import axial_attention as dispatch
    from vimpac.kernels import axial_attention_triton as module

    shape = (1, 40, 2, 1)  # lines of 41 tokens: a 64-row tile
    fused, cls = fused_inputs(shape, dim=32)
    # Backward at 64 rows, d=32, fp32: 4 · 64 · (6 · 32 + 64) B = 64 KB; forward 40 KB. Allow 48 KB.
    assert module._shared_bytes(64, 32, torch.float32, backward=True) == 64 * 1024
    monkeypatch.setattr(module, "_shared_memory_limit", lambda device: 48 * 1024)
    with pytest.raises(ValueError, match=r"lines of 41 tokens .* 64 KB of shared memory .* over the 48 KB"):
        module.check_supported(split(fused, cls)[0], "T")
    with pytest.raises(ValueError, match="shared memory"):
        axial_attention_triton(*split(fused, cls), "T")
    # Without a gradient only the forward tile must fit: it runs.
    with torch.no_grad():
        out, _ = axial_attention_triton(*(t.detach() for t in split(fused, cls)), "T")
    torch.testing.assert_close(out, axial_attention_reference(*split(fused, cls), "T")[0].detach())
    # An explicit packing that does not fit is refused too.
    with pytest.raises(ValueError, match="shared memory"), torch.no_grad():
        short = fused_inputs((1, 3, 2, 1), dim=32)
        axial_attention_triton(*split(*short), "T", block_rows=128)
    # The dispatcher falls back to the reference with VIMPAC_KERNELS unset, raises with VIMPAC_KERNELS=triton.
    monkeypatch.setattr("vimpac.kernels.kernel_backend", lambda device: "triton")
    monkeypatch.delenv("VIMPAC_KERNELS", raising=False)
    got = dispatch(*split(fused, cls), "T")
    torch.testing.assert_close(got[0], axial_attention_reference(*split(fused, cls), "T")[0])
    monkeypatch.setenv("VIMPAC_KERNELS", "triton")
    with pytest.raises(ValueError, match="shared memory"):
        dispatch(*split(fused, cls), "T")


def test_shared_memory_limit_has_a_static_fallback():
    from vimpac.kernels import axial_attention_triton as module

    assert module._shared_memory_limit(torch.device("cpu")) == module.STATIC_SHARED_LIMIT == 163 * 1024
    if torch.cuda.is_available():
        assert module._shared_memory_limit(torch.device("cuda")) >= 96 * 1024
