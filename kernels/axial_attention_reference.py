"""Axial attention with a CLS token in every line: the PyTorch reference of `vimpac.kernels.axial_attention`.

docs/design.md §5.1 fixes the API; the Triton kernel (`axial_attention_triton.py`) implements the same function. For one
axis of the clip tensor `[B, T, H, W]`, every 1-D line of tokens along that axis is one attention sequence, with the CLS
token prepended as query, key and value (length 1 + axis length). Every token therefore sees CLS, CLS sees every token
of the line, and the CLS query's outputs are averaged over all lines (docs/reference.md §4.4, TimeSformer style).

`joint_attention` generalises the line to several axes at once ("HW": one sequence per frame, as in divided
space-time attention; "THW": one sequence per clip, full joint attention). CLS is prepended in the same way and
averaged over the remaining lines (over T frames for "HW"; nothing to average for "THW"). It has no Triton
counterpart: SDPA already covers long joint sequences well.

Both are written without Python loops over lines: permute the attended axes to the end, concatenate CLS, run
one batched attention, split CLS off and average it. Dropout goes through SDPA's own RNG, except when an explicit
`torch.Generator` is given: SDPA takes none, so that case computes softmax and the keep mask explicitly, which
makes dropout reproducible for tests.

CPU speed (the demo trains on 2 CPU cores, where these small tensors make per-op overhead count): with dropout on
a CPU, SDPA falls back to its unfused "math" path anyway, which also scales q and k separately (two copies) and
checks for fully masked rows (three more passes; CLS is always a key, so there are none). There the attention is
written out instead (`_cpu_dropout_attention`): the same operations, and `F.dropout` on the probabilities draws
the keep mask from the global RNG exactly as SDPA's math path does, so a seeded run gives the same losses. Views
are cut from one tensor with `split`, never by indexing: the backward of `x[..., 0, :]` or `x[..., 1:, :]`
allocates a zero-filled tensor of x's full size per piece, while `split`'s backward is one `cat`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Position of each named axis in [B, T, H, W, heads, d].
AXIS_DIMS = {"T": 1, "H": 2, "W": 3}


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cls_q: torch.Tensor,
    cls_k: torch.Tensor,
    cls_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> None:
    if q.dim() != 6 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one shape [B, T, H, W, heads, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        # The Triton kernel loads rows of d contiguous values; hold the reference to the same contract.
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1); got strides {t.stride()}")
    batch, _, _, _, heads, dim = q.shape
    for name, t in (("cls_q", cls_q), ("cls_k", cls_k), ("cls_v", cls_v)):
        if tuple(t.shape) != (batch, heads, dim):
            raise ValueError(f"{name} must be [B, heads, d] = {(batch, heads, dim)}; got {tuple(t.shape)}")
    if key_padding_mask is not None and (
        tuple(key_padding_mask.shape) != tuple(q.shape[:4]) or key_padding_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"key_padding_mask must be bool [B, T, H, W] = {tuple(q.shape[:4])}; "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def _axes_to_dims(axes: str) -> tuple[int, ...]:
    if not axes or any(a not in AXIS_DIMS for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"axes must be distinct letters from 'T', 'H', 'W'; got {axes!r}")
    return tuple(sorted(AXIS_DIMS[a] for a in axes))


def _lines_with_cls(x: torch.Tensor, cls: torch.Tensor, attn_dims: tuple[int, ...]) -> torch.Tensor:
    """[B, T, H, W, heads, d] + CLS [B, heads, d] → [B, L, heads, 1 + N, d] (L lines of N tokens, CLS first)."""
    line_dims = tuple(d for d in (1, 2, 3) if d not in attn_dims)
    lines = x.permute(0, *line_dims, 4, *attn_dims, 5).flatten(-1 - len(attn_dims), -2)
    cls = cls.view(cls.shape[0], *([1] * len(line_dims)), cls.shape[1], 1, cls.shape[2])
    cls = cls.expand(*lines.shape[:-2], 1, lines.shape[-1])
    seqs = torch.cat([cls, lines], dim=-2)
    return seqs.view(seqs.shape[0], -1, *seqs.shape[-3:])


def _allowed_keys(key_padding_mask: torch.Tensor, attn_dims: tuple[int, ...]) -> torch.Tensor:
    """PAD mask [B, T, H, W] → allowed keys [B·L, 1, 1, 1 + N] (True = may attend; CLS always allowed)."""
    line_dims = tuple(d for d in (1, 2, 3) if d not in attn_dims)
    pad = key_padding_mask.permute(0, *line_dims, *attn_dims).flatten(1 + len(line_dims)).flatten(0, len(line_dims))
    cls_pad = torch.zeros_like(pad[:, :1])
    return ~torch.cat([cls_pad, pad], dim=1)[:, None, None, :]


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    dropout_p: float,
    scale: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Batched attention on [N, heads, S, d]; explicit softmax + keep mask when a generator is given."""
    if generator is None and dropout_p > 0.0 and q.device.type == "cpu":
        return _cpu_dropout_attention(q, k, v, allowed, dropout_p, scale)
    if generator is None or dropout_p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax in at least fp32 (bf16/fp16 inputs), in the input precision otherwise.
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32) >= dropout_p
    probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    return torch.matmul(probs, v)


class _ScaledScores(torch.autograd.Function):
    """scale · q @ kᵀ with disallowed keys at -inf: q, k [..., S, d], allowed bool (broadcastable) | None → [..., S, S].

    The backward computes dk as scale · dsᵀ @ q. Autograd's own matmul backward computes it as (qᵀ @ ds)ᵀ: a batch of
    [d, S] products, which MKL runs about 6× slower than [S, d] ones for the short lines here (S = 6 to 9 tokens,
    d = 64: ~3.4 ms against ~0.5 ms for 2048 lines). Same products, same sums; only the batched-GEMM layout
    differs. The mask is applied in here, in place: an in-place op on a custom Function's output is refused under
    torch.compile, and a separate masked_fill would copy the scores.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        allowed: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, allowed)
        ctx.scale = scale
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        return scores if allowed is None else scores.masked_fill_(~allowed, float("-inf"))

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        q, k, allowed = ctx.saved_tensors
        grad = grad * ctx.scale
        if allowed is not None:
            # A masked score is a constant (-inf): no gradient flows through it to q or k.
            grad = grad.masked_fill_(~allowed, 0.0)
        grad_q = torch.matmul(grad, k) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad.transpose(-1, -2), q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, None, None


def _cpu_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    """SDPA's CPU math path with dropout, minus its extra passes: q, k, v [N, heads, S, d] → [N, heads, S, d].

    allowed: bool, broadcastable to [N, heads, S, S] (True = may attend). The keep mask comes from `F.dropout` on
    the [N, heads, S, S] probabilities, the same call (hence the same draws from the global RNG) as SDPA's math
    path makes on CPU; the scores differ from SDPA's only by rounding (SDPA scales q and k by √scale each).
    """
    out_dtype = q.dtype
    # 16-bit inputs run in fp32, as SDPA's CPU math path does; fp32 and fp64 stay as they are (no copy).
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    scores = _ScaledScores.apply(q, k, scale, allowed)
    # Softmax spelled out: ATen's softmax kernel vectorises along the row, which at 6 to 9 keys leaves it ~3×
    # slower (forward + backward) than these whole-tensor ops. The detached max only shifts for stability (its
    # gradient is zero); CLS is always allowed, so every row has a finite max and a positive sum.
    weights = (scores - scores.detach().amax(dim=-1, keepdim=True)).exp()
    probs = F.dropout(weights / weights.sum(dim=-1, keepdim=True), dropout_p, training=True)
    return torch.matmul(probs, v).to(out_dtype)


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cls_q: torch.Tensor,
    cls_k: torch.Tensor,
    cls_v: torch.Tensor,
    axes: str,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the joint sequence of the named axes, CLS prepended to every such sequence.

    q, k, v: [B, T, H, W, heads, d], any strides with a contiguous last dim. cls_q, cls_k, cls_v: [B, heads, d].
    axes: distinct letters of "THW" ("T" = temporal lines, "HW" = one sequence per frame, "THW" = whole clip).
    key_padding_mask: bool [B, T, H, W], True = PAD, never attended to as a key; CLS is always a valid key, so no
    row is ever fully masked (a line made only of PAD attends to CLS alone).
    dropout_p: dropout on the attention probabilities (pass 0.0 in eval). scale: default 1/√d.
    generator: makes dropout reproducible (explicit-softmax path; a generator on the inputs' device); None uses
    SDPA and the global RNG.
    Returns (out [B, T, H, W, heads, d] (a strided view), cls_out [B, heads, d] = CLS output averaged over lines).
    """
    _check_inputs(q, k, v, cls_q, cls_k, cls_v, key_padding_mask, dropout_p)
    attn_dims = _axes_to_dims(axes)
    batch, heads, dim = q.shape[0], q.shape[4], q.shape[5]
    line_sizes = [q.shape[d] for d in (1, 2, 3) if d not in attn_dims]
    attn_sizes = [q.shape[d] for d in attn_dims]

    qs, ks, vs = (_lines_with_cls(x, c, attn_dims) for x, c in ((q, cls_q), (k, cls_k), (v, cls_v)))
    seq = qs.shape[-2]
    allowed = None if key_padding_mask is None else _allowed_keys(key_padding_mask, attn_dims)
    out = _attention(
        qs.view(-1, heads, seq, dim),
        ks.view(-1, heads, seq, dim),
        vs.view(-1, heads, seq, dim),
        allowed,
        dropout_p,
        scale if scale is not None else 1.0 / math.sqrt(dim),
        generator,
    ).view(batch, -1, heads, seq, dim)

    # split, not indexing: see the module docstring (backward is one cat instead of two zero-filled full copies).
    cls_out, tokens = out.split([1, seq - 1], dim=3)
    cls_out = cls_out.squeeze(3).mean(dim=1)
    tokens = tokens.reshape(batch, *line_sizes, heads, *attn_sizes, dim)
    # Invert the permutation (0, *line_dims, 4, *attn_dims, 5) used to build the lines.
    line_dims = tuple(d for d in (1, 2, 3) if d not in attn_dims)
    order = (0, *line_dims, 4, *attn_dims, 5)
    inverse = tuple(order.index(i) for i in range(6))
    return tokens.permute(*inverse), cls_out


def axial_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cls_q: torch.Tensor,
    cls_k: torch.Tensor,
    cls_v: torch.Tensor,
    axis: str,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial attention along one axis ('T' | 'H' | 'W') with CLS in every line (docs/design.md §5.1).

    q, k, v: [B, T, H, W, heads, d], any strides with a contiguous last dim (views into one fused QKV output).
    cls_q, cls_k, cls_v: [B, heads, d]. key_padding_mask: bool [B, T, H, W], True = PAD (never a key); CLS always
    is a key. dropout_p: attention-probability dropout. scale: default 1/√d. generator: reproducible dropout.
    Returns out [B, T, H, W, heads, d] and cls_out [B, heads, d], the CLS output averaged over all lines
    (H·W lines for 'T', T·W for 'H', T·H for 'W').
    """
    if axis not in AXIS_DIMS:
        raise ValueError(f"axis must be one of 'T', 'H', 'W'; got {axis!r}")
    return joint_attention(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale, generator)
