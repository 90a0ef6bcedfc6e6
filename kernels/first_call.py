"""First-call check of the Triton kernels against their PyTorch references, with a per-shape-class fallback.

A kernel that compiles and passes on the GPUs the project was tested on can still fail on another architecture
(a compiler bug, a register or shared-memory limit, a tensor-core path with other rounding). With VIMPAC_KERNELS
unset, the dispatcher (`vimpac.kernels`) therefore checks the first Triton call of each *key* in a process
against the reference and keeps using Triton for that key only if it agrees:

  axial_attention  key (device, dtype, axis, 1 + axis length, head dim, PAD mask?, dropout?, backward?): what
                   picks the compiled kernels (the constexprs N, HEAD_DIM, HAS_PAD, HAS_DROPOUT, the compute dtype
                   and with them the tile) and whether the backward kernel will run (q needs a gradient: an
                   evaluation call never launches it, so its tile's limits must not fail that call). The check
                   runs forward (and backward, when needed) on synthetic inputs of a slice of the call's shape
                   (check_shape: ≤ 2 whole samples, few heads), chosen so that every argument Triton specialises
                   on matches the real call's: the check runs the very binary the real call needs, and its
                   cost is two small launches of each kernel (plus the keep-mask kernel with dropout) and a
                   reference run on two clips: about a millisecond on a GPU once compiled.
  nearest_code,    key (device, dtype, K, D, bias?, ⌈log2 N⌉): the autotuner's key. The real call runs on Triton
  argmax_scores    and its first and last few rows are checked against the reference on those rows (the kernel
                   is exact up to near-ties within its rounding bound, which are accepted).

Synthetic inputs (a fixed CPU generator) rather than the caller's data: the check is deterministic, independent
of the batch, and cannot fail on a first batch that happens to hold NaN or Inf. The dropout check passes an
explicit seed, so no RNG stream of the caller advances.

On a mismatch or any exception from the Triton side (compile or launch), the key falls back to the reference
for the rest of the process, with one KernelFallbackWarning naming kernel, shape, dtype, error and the remedy.
VIMPAC_KERNELS=triton skips all of this (failures propagate); VIMPAC_KERNELS=reference never reaches Triton.
Under torch.compile the check cannot run (the trace sees fake tensors): a traced call reads the verdict recorded
so far (the trainers' start-up check records the model's keys) and otherwise uses Triton.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vimpac.kernels.axial_attention_reference import AXIS_DIMS, axial_attention_reference
from vimpac.kernels.vq_reference import argmax_scores_reference, check_inputs, nearest_code_reference

# Allowed max abs error relative to max(1, max |reference|), per input dtype. Far above the kernels' real
# errors (fp32 ~1e-6, fp16 ~1e-3, bf16 ~1e-2 on unit-scale inputs), far below what a broken kernel gives (~1).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
CHECK_SEED = 12  # synthetic inputs and the dropout seed of the check
PAD_RATE = 0.3  # fraction of PAD tokens in the synthetic mask
VQ_CHECK_ROWS = 4  # rows checked at each end of a VQ call
REMEDY = "VIMPAC_KERNELS=reference"


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed its first-call check; the reference is used for that shape class from now on."""


@dataclass
class Comparison:
    """One kernel run against its reference. Errors are max abs differences; tolerances absolute (scaled)."""

    kernel: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    detail: str = ""  # axis, PAD, dropout, bias ...
    fwd_err: float | None = None
    fwd_tol: float | None = None
    bwd_err: float | None = None  # None: no backward (VQ) or not reached
    bwd_tol: float | None = None
    error: str | None = None  # exception from the Triton side
    mismatch: str | None = None  # a failure other than an error over tolerance (VQ: a worse pick)
    skipped: str | None = None  # why Triton did not run (`vimpac selfcheck` only)
    triton_s: float | None = None
    reference_s: float | None = None

    @property
    def ok(self) -> bool:
        # `not err <= tol` so a NaN error fails.
        if self.error is not None or self.mismatch is not None or self.skipped is not None:
            return False
        if self.fwd_err is None or not self.fwd_err <= self.fwd_tol:
            return False
        return self.bwd_err is None or self.bwd_err <= self.bwd_tol

    def problem(self) -> str:
        """What failed, in words ('' when ok)."""
        if self.error is not None:
            return f"error: {self.error}"
        if self.mismatch is not None:
            return self.mismatch
        if self.fwd_err is None or not self.fwd_err <= self.fwd_tol:
            return f"forward max abs error {self.fwd_err:.3g} > tolerance {self.fwd_tol:.3g}"
        if self.bwd_err is not None and not self.bwd_err <= self.bwd_tol:
            return f"backward max abs error {self.bwd_err:.3g} > tolerance {self.bwd_tol:.3g}"
        return ""

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        detail = f", {self.detail}" if self.detail else ""
        return f"{self.kernel} {list(self.shape)} {dtype} on {self.device}{detail}"


_lock = threading.Lock()
_verdicts: dict[tuple, bool] = {}  # key → Triton passed (True) or falls back (False)
_results: dict[tuple, Comparison] = {}  # key → the comparison behind the verdict


def reset() -> None:
    """Forget every verdict (tests; a process normally checks each key once)."""
    with _lock:
        _verdicts.clear()
        _results.clear()


def results() -> dict[tuple, Comparison]:
    """A snapshot of the checks run so far: key → Comparison."""
    with _lock:
        return dict(_results)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # a name is decoration; never fail the check for it
            return str(device)
    return str(device)


def fallback_message(comparison: Comparison) -> str:
    return (
        f"vimpac.kernels: the Triton {comparison.kernel} kernel failed its first-call check against the PyTorch "
        f"reference: {comparison.describe()}: {comparison.problem()}. Using the PyTorch reference for this shape "
        f"class from now on (slower). Set {REMEDY} to use the reference everywhere without this check "
        "(or VIMPAC_KERNELS=triton to make this an error), and please report the GPU and this message."
    )


def _decide(key: tuple, compare: Callable[[], Comparison | None]) -> bool | None:
    """The verdict for `key`, running `compare` once per process (under a lock: concurrent first calls wait).
    `compare` returning None decides nothing (no usable rows); the next call tries again."""
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is not None:
            return verdict
        comparison = compare()
        if comparison is None:
            return None
        _results[key] = comparison
        _verdicts[key] = comparison.ok
    if not comparison.ok:
        warnings.warn(fallback_message(comparison), KernelFallbackWarning, stacklevel=4)
    return comparison.ok


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` runs of fn (CUDA: synchronised around each)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _max_abs(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs error over the pairs, the dtype-free scale max(1, max |want|)); NaN anywhere → NaN error."""
    got, want = [g.detach().float() for g in got], [w.detach().float() for w in want]
    err = max(float((g - w).abs().max()) if g.numel() else 0.0 for g, w in zip(got, want))
    scale = max([1.0] + [float(w.abs().max()) for w in want if w.numel()])
    return err, scale


# ---------------------------------------------------------------------------------------------------------------
# Axial attention


def axial_key(q: torch.Tensor, axis: str, key_padding_mask: torch.Tensor | None, dropout_p: float) -> tuple:
    """What selects the compiled kernels for this call, and whether it runs the backward (module docstring)."""
    seq = 1 + q.shape[AXIS_DIMS[axis]]
    return ("axial_attention", str(q.device), q.dtype, axis, seq, q.shape[-1], key_padding_mask is not None,
            dropout_p > 0.0, q.requires_grad)  # fmt: skip


def check_shape(shape: tuple[int, ...], axis: str) -> tuple[int, ...]:
    """The first-call check's slice of [B, T, H, W, heads, d]: whole samples, so that the integer arguments Triton
    specialises on (== 1, divisible by 16: lines per sample, the lines' second extent, every stride but the
    batch count's) are the real call's and the check compiles and runs the same kernel binary; ≤ 2 samples (a
    second sample's programs index their lines from another base) and as few heads as keep the head count's
    specialisation (1, 16, or 2)."""
    heads = shape[4]
    return (min(shape[0], 2), *shape[1:4], 1 if heads == 1 else 16 if heads % 16 == 0 else 2, shape[5])


def small_shape(shape: tuple[int, ...], axis: str, dropout_p: float) -> tuple[int, ...]:
    """A smaller slice, for the interpreter (`vimpac selfcheck` on CPU): ≤ 2 samples, ≤ 2 heads, the full axis, and
    just over one program's worth of lines per sample (so a second, partly filled program covers the tile's tail
    masking)."""
    from vimpac.kernels.axial_attention_triton import _tile

    a = AXIS_DIMS[axis]
    o1, o2 = (d for d in (1, 2, 3) if d != a)
    _, lines_per_program = _tile(1 + shape[a], dropout_p > 0.0, None)
    want = lines_per_program + 1
    out = [min(shape[0], 2), *shape[1:4], min(shape[4], 2), shape[5]]
    out[o1] = min(shape[o1], want)
    out[o2] = min(shape[o2], -(-want // out[o1]))
    return tuple(out)


def _masked_reference(q, k, v, cls_q, cls_k, cls_v, axis, pad, keep, dropout_p, scale):
    """The reference's math with a given dropout keep mask [B, lines, heads, S, S] (the kernels' own, from
    `dropout_keep_mask`): SDPA draws its mask from torch's RNG, so only this way can dropout be compared.
    Lines are numbered row-major over the two other axes, as the kernels number them."""
    a = AXIS_DIMS[axis]
    o1, o2 = (d for d in (1, 2, 3) if d != a)
    order = (0, o1, o2, 4, a, 5)

    def lines(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:  # → [B, L, heads, 1 + N, d], CLS first
        tokens = x.permute(*order).flatten(1, 2)
        return torch.cat([cls[:, None, :, None, :].expand(-1, tokens.shape[1], -1, -1, -1), tokens], dim=3)

    qs, ks, vs = lines(q, cls_q), lines(k, cls_k), lines(v, cls_v)
    scores = qs @ ks.transpose(-1, -2) * scale
    if pad is not None:
        pad_lines = pad.permute(0, o1, o2, a).flatten(1, 2)  # [B, L, N]
        allowed = torch.cat([torch.ones_like(pad_lines[..., :1]), ~pad_lines], dim=-1)
        scores = scores.masked_fill(~allowed[:, :, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1) * keep.to(scores.dtype) / (1.0 - dropout_p)
    out = probs @ vs
    cls_out = out[..., 0, :].mean(1)
    tokens = out[..., 1:, :].unflatten(1, (q.shape[o1], q.shape[o2]))
    return tokens.permute(*(order.index(i) for i in range(6))), cls_out


def compare_axial(
    shape: tuple[int, ...],
    axis: str,
    dtype: torch.dtype,
    device: torch.device,
    has_pad: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    repeats: int = 0,
    backward: bool = True,
) -> Comparison:
    """Triton vs reference, forward and (with `backward`) backward, on synthetic inputs of `shape` [B, T, H, W,
    heads, d].

    q, k, v are strided views of one fused [B, T, H, W, 3, heads, d] tensor, as the model passes them. The
    reference runs in fp32 on the same (rounded) values. With repeats > 0 both paths are also timed (forward +
    backward, median of `repeats` after the compared run, which warms up compilation)."""
    from vimpac.kernels import axial_attention_triton as triton_module

    device = torch.device(device)
    batch, heads, dim = shape[0], shape[4], shape[5]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    detail = f"axis {axis}, {'PAD' if has_pad else 'no PAD'}, dropout {dropout_p:g}"
    result = Comparison("axial_attention", tuple(shape), dtype, _device_name(device), detail)
    gen = torch.Generator().manual_seed(CHECK_SEED)
    fused = torch.randn(*shape[:4], 3, heads, dim, generator=gen).to(device, dtype)
    cls = torch.randn(batch, 3, heads, dim, generator=gen).to(device, dtype)
    pad = (torch.rand(shape[:4], generator=gen) < PAD_RATE).to(device) if has_pad else None
    g_out = torch.randn(shape, generator=gen).to(device)
    g_cls = torch.randn(batch, heads, dim, generator=gen).to(device)

    def run(fn, leaves):
        out, cls_out = fn(*leaves[0].unbind(4), *leaves[1].unbind(1))
        if not backward:
            return [out, cls_out], []
        loss = (out.float() * g_out).sum() + (cls_out.float() * g_cls).sum()
        return [out, cls_out], list(torch.autograd.grad(loss, leaves))

    def triton_fn(q, k, v, cq, ck, cv):
        return triton_module.axial_attention_triton(
            q, k, v, cq, ck, cv, axis, pad, dropout_p, scale, seed=CHECK_SEED
        )  # fmt: skip

    keep = None
    if dropout_p > 0.0:
        a = AXIS_DIMS[axis]
        lines = math.prod(shape[1:4]) // shape[a]
        try:
            keep = triton_module.dropout_keep_mask(batch, lines, heads, 1 + shape[a], dropout_p, CHECK_SEED, device)
        except Exception as err:
            result.error = f"{type(err).__name__}: {err}"
            return result

    def reference_fn(q, k, v, cq, ck, cv):
        if keep is None:
            return axial_attention_reference(q, k, v, cq, ck, cv, axis, pad, 0.0, scale)
        return _masked_reference(q, k, v, cq, ck, cv, axis, pad, keep, dropout_p, scale)

    reference_leaves = [fused.float().requires_grad_(backward), cls.float().requires_grad_(backward)]
    want_fwd, want_bwd = run(reference_fn, reference_leaves)
    triton_leaves = [fused.clone().requires_grad_(backward), cls.clone().requires_grad_(backward)]
    try:
        got_fwd, got_bwd = run(triton_fn, triton_leaves)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous launch failure surfaces here, inside the try
    except Exception as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    result.fwd_err, fwd_scale = _max_abs(got_fwd, want_fwd)
    result.fwd_tol = tol * fwd_scale
    if backward:
        result.bwd_err, bwd_scale = _max_abs(got_bwd, want_bwd)
        result.bwd_tol = tol * bwd_scale
    if repeats > 0:
        result.triton_s = median_seconds(lambda: run(triton_fn, triton_leaves), device, repeats)
        # The reference as the fallback runs it: in the input dtype, with its own (SDPA) dropout.
        ref_leaves = [fused.clone().requires_grad_(backward), cls.clone().requires_grad_(backward)]
        result.reference_s = median_seconds(
            lambda: run(lambda *t: axial_attention_reference(*t, axis, pad, dropout_p, scale), ref_leaves),
            device,
            repeats,
        )
    return result


def axial_attention_passes(
    q: torch.Tensor, axis: str, key_padding_mask: torch.Tensor | None, dropout_p: float, scale: float | None
) -> bool:
    """Whether this call may use Triton: its key's first-call check passed (run now if it has not run yet)."""
    key = axial_key(q, axis, key_padding_mask, dropout_p)
    if torch.compiler.is_compiling():
        return _verdicts.get(key, True)  # a dict read traces (guarded); running the check would not

    def compare() -> Comparison:
        # The caller may be inside no_grad, inference_mode, autocast, or a non-reentrant checkpoint: isolate the
        # check from all. The checkpoint's saved-tensor hooks would make the check's backward recompute the
        # caller's forward, which re-enters this check under its lock (a deadlock): identity hooks shadow them.
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(q.device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ):
            try:
                shape = check_shape(tuple(q.shape), axis)
            except Exception as err:
                result = Comparison("axial_attention", tuple(q.shape), q.dtype, _device_name(q.device))
                result.error = f"{type(err).__name__}: {err}"
                return result
            result = compare_axial(
                shape, axis, q.dtype, q.device, key_padding_mask is not None, dropout_p, scale, backward=q.requires_grad
            )
        result.shape = tuple(q.shape)  # name the caller's shape in the warning; the slice is an implementation detail
        return result

    return bool(_decide(key, compare))


def record_axial_check(
    shape: tuple[int, ...],
    axis: str,
    dtype: torch.dtype,
    device: torch.device,
    has_pad: bool,
    dropout_p: float,
    backward: bool = True,
) -> Comparison:
    """Run (or reuse) the first-call check for the key of a call with these properties (`backward`: a training
    call), without a tensor of the full shape; records the verdict as a real first call would (warning
    included). For the start-up check."""
    one = torch.empty((1,) * len(shape), device=device, dtype=dtype, requires_grad=backward)
    with torch.enable_grad():
        q = one.expand(shape)  # the shape, one element of memory
    pad = torch.empty(0, dtype=torch.bool) if has_pad else None  # only its presence matters for the key
    axial_attention_passes(q, axis, pad, dropout_p, None)
    key = axial_key(q, axis, pad, dropout_p)
    with _lock:
        return _results[key]


# ---------------------------------------------------------------------------------------------------------------
# Nearest code / argmax of scores


def _vq_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32


def vq_key(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """The autotuner's key (K, D, ⌈log2 N⌉) with device, dtype and bias: what selects the compiled kernel."""
    return (kind, str(x.device), _vq_dtype(x, weight), weight.shape[0], weight.shape[1], bias is not None,
            x.shape[0].bit_length())  # fmt: skip


def compare_vq(
    kind: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    got: tuple[torch.Tensor, torch.Tensor],
) -> Comparison | None:
    """Check the first and last VQ_CHECK_ROWS rows of a Triton result `got` = (idx, score | dist) for x [N, D],
    weight [K, D], bias [K] | None ("nearest_code": weight is the codebook, no bias).

    Exact fp64 scores decide: the kernel's pick must score within 2·rounding_bound of the best (its documented
    guarantee; near-ties may differ from the fp32 reference), and its returned score (argmax_scores) or distance
    (nearest_code) must match the fp64 value of that pick. fwd_err reports the largest miss. None when no
    checked row is finite (nothing to decide)."""
    from vimpac.kernels.vq_triton import rounding_bound

    n = x.shape[0]
    rows = torch.unique(torch.cat([torch.arange(min(n, VQ_CHECK_ROWS)), torch.arange(max(n - VQ_CHECK_ROWS, 0), n)]))
    rows = rows.to(x.device)
    rows = rows[torch.isfinite(x[rows]).all(dim=1)]
    if rows.numel() == 0:
        return None
    dtype = _vq_dtype(x, weight)
    result = Comparison(kind, (n, *weight.shape), dtype, _device_name(x.device), "bias" if bias is not None else "")
    xr, w = x[rows].double(), weight.double()
    b = -0.5 * w.pow(2).sum(dim=1) if kind == "nearest_code" else (None if bias is None else bias.double())
    exact = xr @ w.T + (b if b is not None else 0.0)  # [r, K] fp64
    idx, value = got[0][rows], got[1][rows].double()
    if bool(((idx < 0) | (idx >= weight.shape[0])).any()):
        result.error = "index out of range [0, K)"
        return result
    bound = rounding_bound(x[rows].to(dtype), weight.to(dtype), None if b is None else b.float()).double()
    picked = exact.gather(1, idx[:, None]).squeeze(1)
    shortfall = exact.max(dim=1).values - picked  # ≥ 0; 0 when the pick is the exact argmax
    if kind == "nearest_code":
        value_err = (value - (xr - w[idx]).pow(2).sum(dim=1)).abs()
        value_tol = 1e-4 * (xr.pow(2).sum(dim=1) + w[idx].pow(2).sum(dim=1) + 1.0)  # fp32 sum of D squares
    else:
        value_err = (value - picked).abs()
        value_tol = 2 * bound + 1e-6
    # Tolerances differ per row: the table shows the largest miss and the largest tolerance, the verdict is per row.
    result.fwd_err = float(torch.maximum(shortfall, value_err).max())
    result.fwd_tol = float(torch.maximum(2 * bound, value_tol).max())
    bad_pick = ~(shortfall <= 2 * bound)  # `~(<=)`: NaN counts as bad
    bad_value = ~(value_err <= value_tol)
    if bool(bad_pick.any()) or bool(bad_value.any()):
        what = "distance" if kind == "nearest_code" else "score"
        result.mismatch = (
            f"{int(bad_pick.sum())} of {rows.numel()} checked rows pick a code scoring worse than the best beyond the "
            f"rounding bound (largest shortfall {float(shortfall.max()):.3g}), {int(bad_value.sum())} return a wrong "
            f"{what} (largest error {float(value_err.max()):.3g})"
        )
    return result


def vq_checked(
    kind: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    triton_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    reference_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_fn() once its key passed its first-call check (this call's result, checked on its end rows),
    else reference_fn(). Inputs no lookup takes raise ValueError first: a caller's mistake, not the kernel's."""
    check_inputs(x, weight, bias)
    key = vq_key(kind, x, weight, bias)
    verdict = _verdicts.get(key)
    if verdict is True or (verdict is None and torch.compiler.is_compiling()):
        return triton_fn()
    if verdict is False:
        return reference_fn()
    got: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compare() -> Comparison | None:
        try:
            got.append(triton_fn())
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
        except Exception as err:
            result = Comparison(kind, (x.shape[0], *weight.shape), _vq_dtype(x, weight), _device_name(x.device))
            result.error = f"{type(err).__name__}: {err}"
            return result
        return compare_vq(kind, x, weight, bias, got[0])

    passed = _decide(key, compare)
    if passed is False:
        return reference_fn()
    return got[0] if got else triton_fn()  # another thread decided meanwhile: run this call now


def vq_comparison(
    kind: str, rows: int, codes: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int = 0
) -> Comparison:
    """Triton vs reference for `kind` on synthetic x [rows, dim] and weight [codes, dim] (+ bias for
    argmax_scores), checked as a first call is; both timed with repeats > 0. For `vimpac selfcheck`."""
    from vimpac.kernels import vq_triton

    device = torch.device(device)
    gen = torch.Generator().manual_seed(CHECK_SEED)
    x = torch.randn(rows, dim, generator=gen).to(device, dtype)
    weight = torch.randn(codes, dim, generator=gen).to(device, dtype)
    bias = torch.randn(codes, generator=gen).to(device) if kind == "argmax_scores" else None
    if kind == "nearest_code":
        triton_fn = lambda: vq_triton.nearest_code_triton(x, weight)  # noqa: E731
        reference_fn = lambda: nearest_code_reference(x, weight)  # noqa: E731
    else:
        triton_fn = lambda: vq_triton.argmax_scores_triton(x, weight, bias)  # noqa: E731
        reference_fn = lambda: argmax_scores_reference(x, weight, bias)  # noqa: E731
    try:
        got = triton_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:
        result = Comparison(kind, (rows, codes, dim), dtype, _device_name(device), "bias" if bias is not None else "")
        result.error = f"{type(err).__name__}: {err}"
        return result
    result = compare_vq(kind, x, weight, bias, got)
    assert result is not None  # synthetic rows are finite
    if repeats > 0:
        result.triton_s = median_seconds(triton_fn, device, repeats)
        result.reference_s = median_seconds(reference_fn, device, repeats)
    return result


__all__ = [
    "TOLERANCE",
    "Comparison",
    "KernelFallbackWarning",
    "axial_attention_passes",
    "compare_axial",
    "record_axial_check",
    "reset",
    "results",
    "vq_checked",
    "vq_comparison",
]
