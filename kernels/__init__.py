"""Compute kernels (Triton on CUDA, PyTorch references elsewhere); imported as `vimpac.kernels`.

Each public function dispatches to an implementation. `VIMPAC_KERNELS=reference` forces the PyTorch
reference; `VIMPAC_KERNELS=triton` asks for Triton (the Triton kernels arrive in a later issue, so for now it
raises a clear error rather than silently running something else); unset picks the best available, which is
currently always the reference.
"""

from __future__ import annotations

import os

import torch

from vimpac.kernels.vq_reference import argmax_scores_reference, nearest_code_reference

BACKENDS = ("triton", "reference")


def kernel_backend() -> str:
    """The backend chosen by `VIMPAC_KERNELS` ("triton" | "reference"; unset → "reference" for now)."""
    choice = os.environ.get("VIMPAC_KERNELS", "").strip().lower()
    if choice not in ("", *BACKENDS):
        raise ValueError(f"VIMPAC_KERNELS={choice!r} is not one of {', '.join(BACKENDS)} (or unset)")
    if choice == "triton":
        raise NotImplementedError(
            "VIMPAC_KERNELS=triton: the Triton kernels are not part of this version yet; "
            "unset VIMPAC_KERNELS or set it to 'reference'"
        )
    return "reference"


def argmax_scores(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_k (x·w_k + b_k) per row: x [N, D], weight [K, D], bias [K] | None → (idx int64 [N], score fp32 [N])."""
    kernel_backend()
    return argmax_scores_reference(x, weight, bias)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per row: x [N, D], codebook [K, D] → (idx int64 [N], dist fp32 [N] = ‖x − e_idx‖²)."""
    kernel_backend()
    return nearest_code_reference(x, codebook)


__all__ = ["BACKENDS", "argmax_scores", "kernel_backend", "nearest_code"]


# Axial attention with CLS (owner: model helper; DESIGN §5). Appended after the module's own exports.
from vimpac.kernels.axial_attention_reference import axial_attention_reference  # noqa: E402


def axial_attention(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial attention with CLS in every line: q/k/v [B,T,H,W,heads,d], cls_* [B,heads,d] → (out, cls_out).

    See kernels/axial_attention_reference.py for the exact semantics (axis 'T'|'H'|'W', PAD mask, CLS averaging).
    """
    kernel_backend()
    return axial_attention_reference(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale)


__all__ += ["axial_attention"]
