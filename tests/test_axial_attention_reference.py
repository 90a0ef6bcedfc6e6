"""The axial-attention reference against a naive per-line loop with an explicit softmax (float64, tests.helpers).

The naive version builds every line (and every joint sequence) one at a time from the docs/design.md §5.1 definition:
CLS prepended as query/key/value, PAD keys excluded, CLS query outputs averaged over the lines.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import naive_attention
from vimpac.kernels import axial_attention
from vimpac.kernels.axial_attention_reference import _attention, axial_attention_reference, joint_attention

SHAPES = [(2, 1, 3, 4), (1, 7, 2, 5), (2, 3, 5, 2)]  # (B, T, H, W): T=1, T=7, H != W


def fused_inputs(shape, heads=2, dim=4, dtype=torch.float64, seed=0):
    """q, k, v as strided views of one fused [B, T, H, W, 3, heads, d] tensor (as the model's QKV projection)."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(*shape, 3, heads, dim, generator=gen, dtype=dtype).requires_grad_()
    cls = torch.randn(shape[0], 3, heads, dim, generator=gen, dtype=dtype).requires_grad_()
    return fused, cls


def split(fused, cls):
    return (*fused.unbind(4), *cls.unbind(1))


def outputs_and_grads(fn, fused, cls, seed=1):
    out, cls_out = fn(*split(fused, cls))
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    g_cls = torch.randn(cls_out.shape, generator=gen, dtype=out.dtype)
    loss = (out * g_out).sum() + (cls_out * g_cls).sum()
    grads = torch.autograd.grad(loss, [fused, cls])
    return out.detach(), cls_out.detach(), grads


def assert_matches_naive(fn_under_test, axes, fused, cls, pad=None, atol=1e-10):
    got = outputs_and_grads(lambda *a: fn_under_test(*a, key_padding_mask=pad), fused, cls)
    want = outputs_and_grads(lambda *a: naive_attention(*a, axes, pad=pad), fused, cls)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_axial_matches_naive_outputs_and_grads(shape, axis):
    fused, cls = fused_inputs(shape)
    assert not fused.unbind(4)[0].is_contiguous()
    assert_matches_naive(lambda *a, **kw: axial_attention_reference(*a, axis, **kw), axis, fused, cls)


@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_dispatch_is_the_same_function(axis):
    fused, cls = fused_inputs((2, 3, 4, 5))
    got = axial_attention(*split(fused, cls), axis)
    want = axial_attention_reference(*split(fused, cls), axis)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_padding_mask_matches_naive(shape, axis):
    fused, cls = fused_inputs(shape, seed=2)
    pad = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.35
    assert_matches_naive(lambda *a, **kw: axial_attention_reference(*a, axis, **kw), axis, fused, cls, pad=pad)


@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_fully_padded_line_attends_to_cls_only(axis):
    shape = (2, 3, 4, 5)
    fused, cls = fused_inputs(shape, seed=4)
    pad = torch.zeros(shape, dtype=torch.bool)
    line = {"T": (1, slice(None), 2, 3), "H": (0, 2, slice(None), 1), "W": (1, 0, 3, slice(None))}[axis]
    pad[line] = True
    q, k, v, cls_q, cls_k, cls_v = split(fused, cls)
    out, cls_out = axial_attention_reference(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.isfinite(cls_out).all()
    # Every query of the padded line sees only the CLS key, so its output is CLS's value.
    padded = out[line]
    torch.testing.assert_close(padded, cls_v[line[0]].expand_as(padded).detach(), atol=1e-12, rtol=0)
    assert_matches_naive(lambda *a, **kw: axial_attention_reference(*a, axis, **kw), axis, fused, cls, pad=pad)


@pytest.mark.parametrize("axes", ["HW", "THW", "TW"])
def test_joint_attention_matches_naive(axes):
    shape = (2, 3, 4, 2)
    fused, cls = fused_inputs(shape, seed=5)
    pad = torch.rand(shape, generator=torch.Generator().manual_seed(6)) < 0.3
    pad[0] = True  # a whole sample of PAD: every sequence still has CLS
    assert_matches_naive(lambda *a, **kw: joint_attention(*a, axes, **kw), axes, fused, cls, pad=pad)


def test_float32_and_custom_scale():
    fused, cls = fused_inputs((2, 4, 3, 5), heads=3, dim=8, dtype=torch.float32, seed=7)
    got, got_cls = axial_attention_reference(*split(fused, cls), "W", scale=0.7)
    want, want_cls = naive_attention(*(t.double() for t in split(fused, cls)), "W", scale=0.7)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(got_cls.double(), want_cls, atol=2e-6, rtol=0)


def one_hot_inputs(shape, axis, heads=2):
    """q = k = 0 (uniform attention); v one-hot over the line position, CLS value = e_0, so each output element
    is keep_ij / ((1 - p) · S): it exposes the dropout keep mask directly."""
    seq = 1 + shape["THW".index(axis) + 1]
    dim = seq
    q = torch.zeros(*shape, heads, dim)
    positions = torch.arange(shape["THW".index(axis) + 1]) + 1
    view = [1, 1, 1, 1, 1, 1]
    view["THW".index(axis) + 1] = -1
    v = torch.nn.functional.one_hot(positions, dim).float().view(*view[:5], dim).expand(*shape, heads, dim)
    cls = torch.zeros(shape[0], heads, dim)
    cls_v = cls.clone()
    cls_v[..., 0] = 1.0
    return (q, q, v.contiguous(), cls, cls, cls_v), seq


@pytest.mark.parametrize("axis", ["T", "W"])
@pytest.mark.parametrize("use_generator", [True, False])
def test_dropout_keep_rate_and_scaling(axis, use_generator):
    shape, p = (4, 7, 5, 6), 0.3
    args, seq = one_hot_inputs(shape, axis)
    no_drop, _ = axial_attention_reference(*args, axis)
    torch.testing.assert_close(no_drop, torch.full_like(no_drop, 1.0 / seq))
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(11) if use_generator else None
    out, _ = axial_attention_reference(*args, axis, dropout_p=p, generator=generator)
    keep = out * (1 - p) * seq
    assert torch.allclose(keep, keep.round(), atol=1e-5), "dropped weights are 0, kept ones scaled by 1/(1-p)"
    assert set(keep.round().unique().tolist()) <= {0.0, 1.0}
    rate = keep.round().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate


def test_dropout_with_generator_is_reproducible():
    fused, cls = fused_inputs((2, 3, 4, 5), seed=8)

    def run(seed):
        return axial_attention_reference(
            *split(fused, cls), "H", dropout_p=0.4, generator=torch.Generator().manual_seed(seed)
        )

    first, second, other = run(5), run(5), run(6)
    torch.testing.assert_close(first[0], second[0], atol=0, rtol=0)
    torch.testing.assert_close(first[1], second[1], atol=0, rtol=0)
    assert not torch.equal(first[0], other[0])


def test_dropout_backward_uses_the_forward_mask():
    fused, cls = fused_inputs((1, 2, 3, 2), heads=1, dim=3, seed=9)
    pad = torch.zeros(1, 2, 3, 2, dtype=torch.bool)
    pad[0, 1, 0, 1] = True

    def fn(fused, cls):
        # A fresh generator with a fixed seed each call: the function is deterministic, so gradcheck applies.
        gen = torch.Generator().manual_seed(3)
        return axial_attention_reference(*split(fused, cls), "H", pad, dropout_p=0.5, generator=gen)

    assert torch.autograd.gradcheck(fn, (fused, cls), fast_mode=True)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_path_draws_sdpa_s_mask(masked, dtype):
    """Dropout on a CPU without a generator skips SDPA (its math path there) but keeps its RNG use: with the same
    seed, outputs and gradients equal SDPA's up to rounding, so a seeded training run keeps its losses."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(24, 2, 7, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    allowed = (torch.rand(24, 1, 1, 7, generator=gen) > 0.3) if masked else None
    if allowed is not None:
        allowed[..., 0] = True  # CLS: no row is fully masked
    g_out = torch.randn(24, 2, 7, 16, generator=gen).to(dtype)

    def run(fn):
        torch.manual_seed(3)
        out = fn()
        return (out, *torch.autograd.grad(out, [q, k, v], g_out))

    got = run(lambda: _attention(q, k, v, allowed, 0.3, 0.25, None))
    want = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=0.3, scale=0.25))
    # A different keep mask would differ by whole dropped terms (order 1), far above these tolerances.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_cpu_dropout_path_gradcheck():
    """The explicit CPU attention with dropout (and its hand-written score backward) against finite differences;
    the seed is reset in every call, so the keep mask is fixed."""
    fused, cls = fused_inputs((1, 2, 3, 2), heads=2, dim=3, seed=10)
    pad = torch.zeros(1, 2, 3, 2, dtype=torch.bool)
    pad[0, 0, 1, 1] = True

    def fn(fused, cls):
        torch.manual_seed(4)
        return axial_attention_reference(*split(fused, cls), "W", pad, dropout_p=0.5)

    assert torch.autograd.gradcheck(fn, (fused, cls))


def test_rejects_bad_inputs():
    fused, cls = fused_inputs((1, 2, 3, 4))
    q, k, v, cls_q, cls_k, cls_v = split(fused, cls)
    with pytest.raises(ValueError, match="axis"):
        axial_attention_reference(q, k, v, cls_q, cls_k, cls_v, "X")
    with pytest.raises(ValueError, match="contiguous last dim"):
        strided_last = torch.randn(*q.shape[:-1], 2 * q.shape[-1], dtype=q.dtype)[..., ::2]
        axial_attention_reference(strided_last, k, v, cls_q, cls_k, cls_v, "T")
    with pytest.raises(ValueError, match="cls_q"):
        axial_attention_reference(q, k, v, cls_q[:, :1], cls_k, cls_v, "T")
    with pytest.raises(ValueError, match="key_padding_mask"):
        axial_attention_reference(q, k, v, cls_q, cls_k, cls_v, "T", key_padding_mask=torch.zeros(1, 2, 3, 4))
