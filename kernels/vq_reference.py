"""PyTorch reference for the nearest-code / argmax-of-scores kernel (docs/design.md §5.2).

`argmax_scores` finds, for every row x_n, the index k maximising x_n·w_k + b_k. `nearest_code` is the special
case that serves vector quantisation: argmin_k ‖x − e_k‖² = argmax_k (x·e_k − ½‖e_k‖²), because ‖x‖² is the
same for every k. The full [N, K] score matrix is never built: rows (and, for huge K, columns) are processed in
blocks of at most `chunk_elems` scores, so memory stays bounded for any number of frames or codes.

Ties: the lowest index wins, like `torch.argmax`. The outputs carry no gradient (the VQ-VAE uses a
straight-through estimator, and the dVAE only needs the index).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMS = 2**24


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """ValueError for inputs no VQ lookup takes: shapes that do not fit, no codes, tensors on different devices."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"expected x [N, D] and weight [K, D], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"feature sizes differ: x has D={x.shape[1]}, weight has D={weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (K=0): there is nothing to choose from")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [K]={weight.shape[0]}, got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")


def _block_sizes(n: int, k: int, chunk_elems: int) -> tuple[int, int]:
    """Rows and columns per block so that rows × cols ≤ chunk_elems (at least one of each)."""
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
    cols = min(k, chunk_elems)
    rows = max(1, min(n, chunk_elems // cols))
    return rows, cols


@torch.no_grad()
def argmax_scores_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_k (x·w_k + b_k) for every row of x.

    x: [N, D], weight: [K, D], bias: [K] or None; any float dtype. fp16/bf16 inputs are upcast to fp32 per
    block, so scores accumulate in fp32 (fp64 inputs stay fp64 for the search).
    Returns (idx int64 [N], score fp32 [N]) on x's device. Ties resolve to the lowest index.
    """
    check_inputs(x, weight, bias)
    n, k = x.shape[0], weight.shape[0]
    compute = torch.promote_types(x.dtype, torch.float32)
    idx = torch.zeros(n, dtype=torch.int64, device=x.device)
    score = torch.empty(n, dtype=compute, device=x.device)
    if n == 0:
        return idx, score.float()
    rows, cols = _block_sizes(n, k, chunk_elems)
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    for r0 in range(0, n, rows):
        xs = x[r0 : r0 + rows].to(compute)
        best = torch.full((xs.shape[0],), -torch.inf, dtype=compute, device=x.device)
        best_idx = torch.zeros(xs.shape[0], dtype=torch.int64, device=x.device)
        for c0 in range(0, k, cols):
            block = xs @ w[c0 : c0 + cols].T  # [rows, cols]: the largest intermediate, ≤ chunk_elems
            if b is not None:
                block += b[c0 : c0 + cols]
            block_idx = block.argmax(dim=1)
            block_best = block.gather(1, block_idx[:, None]).squeeze(1)
            # Strictly greater: on a tie across column blocks the earlier (lower) index is kept.
            better = block_best > best
            best = torch.where(better, block_best, best)
            best_idx = torch.where(better, block_idx + c0, best_idx)
        idx[r0 : r0 + rows] = best_idx
        score[r0 : r0 + rows] = best
    return idx, score.float()


@torch.no_grad()
def nearest_code_reference(
    x: torch.Tensor, codebook: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row (squared Euclidean distance) for every row of x.

    x: [N, D], codebook: [K, D]. Returns (idx int64 [N], dist fp32 [N] = ‖x − e_idx‖²). The search uses the
    expanded form x·e − ½‖e‖² (one matmul); the returned distance is recomputed directly from the chosen code,
    so it is exact up to fp32 rounding and never negative (the expanded form can cancel badly).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    half_sq_norm = -0.5 * codebook.to(compute).pow(2).sum(dim=1)
    idx, _ = argmax_scores_reference(x, codebook, half_sq_norm, chunk_elems)
    dist = (x.to(compute) - codebook.to(compute)[idx]).pow(2).sum(dim=1)
    return idx, dist.float()
