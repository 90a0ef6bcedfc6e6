"""Triton kernel for argmax-of-scores / nearest-code search (docs/design.md §5.2); semantics of `vq_reference.py`.

One program owns BLOCK_N rows of x and streams the whole codebook past them in [BLOCK_K, BLOCK_D] tiles,
keeping a running (best, argmax, second-best) per row, so the [N, K] score matrix never exists in memory.

Exactness. The kernel's fp32 sums (tensor-core MMA on CUDA, numpy under the interpreter) round in their own
order, so on near-ties its argmax can differ from the true one. Every score it computes is within

    err_n = SAFETY · (D + 2) · 2⁻²⁴ · (‖x_n‖₂ · max_k ‖w_k‖₂ + max_k |b_k|),   SAFETY = 8,

of the exact score x_n·w_k + b_k (of the operands' exact values). Why this form: for fp32 accumulation in any
order, round-to-nearest, the classic bound is |ŝ − s| ≤ γ_{D+1} · (Σ_d |x_d w_d| + |b|) with γ_m ≈ m·2⁻²⁴
(D−1 additions, the product rounding for fp32 inputs, the bias add), and Σ_d |x_d w_kd| ≤ ‖x‖‖w_k‖
(Cauchy–Schwarz). SAFETY = 8 covers: ×2 for tensor cores that truncate instead of rounding when they align
addends (unit 2⁻²³), ×2 for the per-block-FMA alignment error (at most (1 + 1/4)·D + 1 error terms for MMA
k-steps of ≥ 4), ×2 for γ's 1/(1 − m·u) and the norms themselves being fp32. It is a worst-case bound, about
√D times larger than typical errors; being loose only costs rescoring a few more rows.

If the kernel's best and second-best differ by more than 2·err_n, the kernel's argmax is the exact one (each of
the two scores is off by at most err_n). The other rows (true ties included, whose margin is 0) are rescored by
`argmax_scores_reference` on just those rows in fp64, which is exact for them up to fp64 rounding, and ties go to
the lowest index as there. So the result is the exact argmax of the operands' values, not merely the argmax of
one fp32 evaluation; it can differ from the fp32 reference only where the reference itself rounds wrongly.

Bytes per call (`bytes_moved`: what the loads and stores address), for x [N, D], codebook [K, D] of E-byte
elements, fp32 bias, blocks (BLOCK_N, BLOCK_K, ·):

    actual   N·D·E·⌈K/BLOCK_K⌉ (x tiles, re-read for every codebook tile) + K·D·E·⌈N/BLOCK_N⌉ (the codebook, read
             by every program) [+ 4·K·⌈N/BLOCK_N⌉ bias] + 16·N (idx int64, best and second fp32)
    minimum  N·D·E + K·D·E [+ 4·K] + 8·N (inputs and codebook read once, indices written once)

Worked example, the DALL-E dVAE head as `vimpac tokenize` runs it (8192 codes × 2048 features with a bias, fp16,
--encode-batch 64 frames of 128 px → N = 64 · 16 · 16 = 16,384 rows), first fp16 config (128, 128, 32): 8,196
MiB requested against a minimum of 96.2 MiB (× 85), half of it x and half the codebook. These are the re-reads of
a GEMM tiling, served by L2 where they hit: the 32 MiB codebook fits in an H100's L2 while the programs in
flight stream it; each program's x rows (128 × 2048 × 2 B = 512 KB) are re-read once per codebook tile. The call
also does 2·N·K·D = 550 GFLOP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vimpac.kernels.launch import on_device
from vimpac.kernels.vq_reference import argmax_scores_reference, check_inputs

ROUNDING_SAFETY = 8.0
_UNIT_ROUNDOFF = 2.0**-24
_DIST_CHUNK_ELEMS = 2**24  # [rows, D] elements per block of the direct distance computation
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _argmax_scores_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    best_ptr,
    second_ptr,
    N,
    K,
    D,
    stride_xn,
    stride_wk,
    N_LOG2,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x [N, D] (row stride stride_xn), w [K, D] (row stride stride_wk), b [K] fp32 → idx int64 [N], best and
    second fp32 [N]: the max score, its lowest index, and the largest score at any other index. N_LOG2 is unused
    by the body: it is part of the autotuning key."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 offsets: N · stride can pass 2³¹ for the large frame batches this serves.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    cols_in_tile = tl.arange(0, BLOCK_K)
    d_in_chunk = tl.arange(0, BLOCK_D)

    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    second = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols_in_tile
        col_ok = cols < K
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wk
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + d_in_chunk
            d_ok = ds < D
            # Padding loads as 0, so padded features add nothing to any score.
            xt = tl.load(x_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                # The interpreter does bf16 arithmetic on raw bits and fp16 dots in fp16 (docs/design.md §11.1).
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))

        tile_best = tl.max(acc, axis=1)
        # Lowest index among the tile's maxima, explicitly, rather than relying on tl.argmax's tie rule.
        tile_idx = tl.min(tl.where(acc == tile_best[:, None], cols[None, :], K + BLOCK_K), axis=1)
        # A duplicate of the maximum at another index is a second-best equal to the best (margin 0).
        tile_second = tl.max(tl.where(cols[None, :] == tile_idx[:, None], float("-inf"), acc), axis=1)
        # Strictly greater: on a tie across tiles the earlier (lower) index is kept.
        better = tile_best > best
        second = tl.where(better, tl.maximum(best, tile_second), tl.maximum(second, tile_best))
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)

    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(second_ptr + rows, second, mask=row_ok)


_INTERPRET = type(_argmax_scores_kernel).__name__ == "InterpretedFunction"
# Each interpreted program costs 10–35 ms whatever its size, so tests keep launches small; these blocks still
# make N, K and D span several blocks at test sizes. tl.dot needs every dim ≥ 16 on a GPU.
_INTERPRETER_BLOCKS = (32, 32, 16)
# Per operand width, every config compiles without spilling registers on sm_80 and sm_90 for fp16, bf16 and fp32,
# also when the strides are not known 16-divisible (scripts/bench/kernels_static.py). The earlier shared set spilled
# up to 2 KB for fp32 operands and 128x128x64 blocks spilled for fp16 (unaligned loads keep more addresses live);
# on sm_80, 128x64x64 spilled for bf16 and 64x128x32, 128x64x16 (3 stages) and 64x64x16 for fp32.
_HALF_CONFIGS = [  # fp16 / bf16 operands
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
]
_FP32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    # Small enough for GPUs with little shared memory.
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_D": 16}, num_warps=4, num_stages=2),
]
_CUDA_CONFIGS = _HALF_CONFIGS + _FP32_CONFIGS


def configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The autotune configs tried for operands of `dtype`."""
    return _FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS


def _prune_by_dtype(configs, named_args, **kwargs):
    """Autotuning tries only the configs of the operands' width (the dtype is part of the tuning key)."""
    keep = configs_for(named_args["x_ptr"].dtype)
    return [c for c in configs if any(c is k for k in keep)]


# The outputs are overwritten, never accumulated, so benchmarking reruns need no restore. N enters the key only
# by its bit length: a small first batch must not fix the blocks for big ones, and a ragged last batch should
# not trigger a retune.
_argmax_scores_tuned = (
    None
    if _INTERPRET
    else triton.autotune(
        configs=_CUDA_CONFIGS, key=["K", "D", "N_LOG2"], prune_configs_by={"early_config_prune": _prune_by_dtype}
    )(_argmax_scores_kernel)
)


def _kernel_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t [R, D] as `dtype` with a unit feature stride (any row stride is kept as is)."""
    t = t.to(dtype)
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel as is, no rescoring. x [N, D], weight [K, D] (one dtype of fp16/bf16/fp32, unit feature
    stride), bias fp32 [K] | None → (idx int64 [N], best fp32 [N], second fp32 [N]; −inf where K = 1).
    `blocks` = (BLOCK_N, BLOCK_K, BLOCK_D) skips autotuning on CUDA; under the interpreter it defaults to small
    fixed blocks (autotuning needs a GPU there)."""
    n, d = x.shape
    k = weight.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    second = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, best, second
    b = bias if bias is not None else best  # never read without HAS_BIAS
    args = (x, weight, b, idx, best, second, n, k, d, x.stride(0), weight.stride(0), n.bit_length())
    # fp32 on CUDA defaults to TF32 (10-bit mantissa), far outside the rounding bound used to rescore; for
    # fp16/bf16 operands "tf32" is the default and means nothing (their products are exact).
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    flags = {"HAS_BIAS": bias is not None, "DOT_PRECISION": precision, "UPCAST": _INTERPRET}
    if blocks is None and _INTERPRET:
        blocks = _INTERPRETER_BLOCKS
    with on_device(x):
        if blocks is None:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _argmax_scores_tuned[grid](*args, **flags)
        else:
            block_n, block_k, block_d = blocks
            _argmax_scores_kernel[(triton.cdiv(n, block_n),)](
                *args, **flags, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d
            )
    return idx, best, second


def bytes_moved(
    n: int, k: int, d: int, dtype: torch.dtype, blocks: tuple[int, int, int], bias: bool = True
) -> dict[str, int]:
    """Bytes one launch of `_argmax_scores_kernel` moves through global memory, and the minimum (module docstring,
    "Bytes per call"). x [n, d] and the codebook [k, d] in `dtype`, bias fp32 [k], blocks (BLOCK_N, BLOCK_K,
    BLOCK_D) of the config that runs. Counts what the kernel's loads and stores address; all values in bytes:

      x         x rows, read again for every codebook tile: n · d · elem · ⌈k / BLOCK_K⌉
      codebook  the whole codebook, read by every program: k · d · elem · ⌈n / BLOCK_N⌉
      bias      the fp32 bias, read by every program (0 without bias)
      outputs   idx (int64), best and second (fp32) per row: 16 · n
      total     the sum of the above
      minimum   x, codebook and bias read once, idx written once

    Not counted: the exact rescoring of near-tie rows (data-dependent, few rows) and `nearest_code_triton`'s
    distance recomputation."""
    block_n, block_k, _ = blocks
    elem = torch.empty((), dtype=dtype).element_size()
    programs = triton.cdiv(n, block_n)
    counts = {
        "x": n * d * elem * triton.cdiv(k, block_k),
        "codebook": k * d * elem * programs,
        "bias": 4 * k * programs if bias else 0,
        "outputs": 16 * n,
    }
    counts["total"] = sum(counts.values())
    counts["minimum"] = n * d * elem + k * d * elem + (4 * k if bias else 0) + 8 * n
    return counts


def rounding_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """err fp32 [N]: a bound on |kernel score − exact score| for every code, per row (module docstring).

    x [N, D], weight [K, D], bias [K] | None, as passed to the kernel."""
    d = x.shape[1]
    x_norm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).max()
    b_max = bias.abs().max().float() if bias is not None else 0.0
    return ROUNDING_SAFETY * (d + 2) * _UNIT_ROUNDOFF * (x_norm * w_norm + b_max)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (got {x.device}); on CPU it runs only with TRITON_INTERPRET=1 "
            "set before vimpac.kernels.vq_triton is imported"
        )


@torch.no_grad()
def argmax_scores_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_k (x·w_k + b_k) for every row of x, exact (see the module docstring); ties → lowest index.

    x: [N, D] (any row stride), weight: [K, D], bias: [K] or None, on one device. fp16/bf16/fp32 run in the
    kernel with fp32 accumulation; fp64 goes to the reference; other dtypes are computed as fp32.
    Returns (idx int64 [N], score fp32 [N]) on x's device, without gradient.
    """
    check_inputs(x, weight, bias)
    _check_device(x)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if dtype == torch.float64:
        return argmax_scores_reference(x, weight, bias)
    if dtype not in _KERNEL_DTYPES:
        dtype = torch.float32
    xk, wk = _kernel_operand(x, dtype), _kernel_operand(weight, dtype)
    bk = None if bias is None else bias.to(torch.float32).contiguous()
    idx, best, second = _launch(xk, wk, bk)
    if x.shape[0] == 0:
        return idx, best
    # `not >` rather than `<=`: a NaN margin (inf or NaN inputs) also goes to the reference.
    near = ~((best - second) > 2 * rounding_bound(xk, wk, bk))
    rows = near.nonzero().squeeze(1)
    if rows.numel() > 0:
        # Module-level name, looked up at call time, so tests can count the rows that take this path.
        r_idx, r_score = argmax_scores_reference(xk[rows].double(), wk.double(), None if bk is None else bk.double())
        idx[rows] = r_idx
        best[rows] = r_score.float()
    return idx, best


@torch.no_grad()
def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row (squared Euclidean distance) for every row of x, as `nearest_code_reference`.

    x: [N, D], codebook: [K, D] → (idx int64 [N], dist fp32 [N] = ‖x − e_idx‖²). The search maximises
    x·e − ½‖e‖² with ½‖e‖² in fp32; the distance is recomputed directly from the chosen code (in blocks of
    rows), not as ‖x‖² − 2·score, which cancels badly far from the origin.
    """
    check_inputs(x, codebook, None)
    _check_device(x)
    compute = torch.promote_types(x.dtype, torch.float32)
    half_sq_norm = -0.5 * codebook.to(compute).pow(2).sum(dim=1)
    idx, _ = argmax_scores_triton(x, codebook, half_sq_norm)
    n, d = x.shape
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    rows = max(1, _DIST_CHUNK_ELEMS // max(d, 1))
    for r0 in range(0, n, rows):
        diff = x[r0 : r0 + rows].to(compute) - codebook[idx[r0 : r0 + rows]].to(compute)
        dist[r0 : r0 + rows] = diff.pow(2).sum(dim=1)
    return idx, dist


__all__ = ["argmax_scores_triton", "bytes_moved", "nearest_code_triton", "rounding_bound"]
