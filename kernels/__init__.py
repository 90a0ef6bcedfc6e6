"""Compute kernels (Triton on CUDA, PyTorch references elsewhere); imported as `vimpac.kernels`.

Each public function dispatches per call on its inputs' device (DESIGN §5):
  VIMPAC_KERNELS unset       Triton for CUDA tensors when Triton imports (and supports the shape), else the
                             PyTorch reference;
  VIMPAC_KERNELS=reference   always the reference;
  VIMPAC_KERNELS=triton      always Triton: an error where it cannot run, never a silent fallback. CPU tensors
                             need TRITON_INTERPRET=1 (the interpreter, which is how CI tests the kernels).
The Triton modules are imported lazily, so machines without Triton (or without a GPU) never load them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from vimpac.kernels.axial_attention_reference import axial_attention_reference
from vimpac.kernels.vq_reference import argmax_scores_reference, nearest_code_reference

BACKENDS = ("triton", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """VIMPAC_KERNELS: "triton", "reference", or "" (unset: choose per device)."""
    choice = os.environ.get("VIMPAC_KERNELS", "").strip().lower()
    if choice not in ("", *BACKENDS):
        raise ValueError(f"VIMPAC_KERNELS={choice!r} is not one of {', '.join(BACKENDS)} (or unset)")
    return choice


def kernel_backend(device: torch.device | None = None) -> str:
    """The backend for tensors on `device` ("triton" | "reference"), following `VIMPAC_KERNELS`."""
    choice = requested_backend()
    on_cuda = device is not None and device.type == "cuda"
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("VIMPAC_KERNELS=triton but the triton package is not installed; unset VIMPAC_KERNELS")
        if device is not None and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"VIMPAC_KERNELS=triton with {device.type} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before Python starts, or unset VIMPAC_KERNELS to use the PyTorch reference"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"


def argmax_scores(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_k (x·w_k + b_k) per row: x [N, D], weight [K, D], bias [K] | None → (idx int64 [N], score fp32 [N])."""
    if kernel_backend(x.device) == "triton":
        from vimpac.kernels.vq_triton import argmax_scores_triton

        return argmax_scores_triton(x, weight, bias)
    return argmax_scores_reference(x, weight, bias)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per row: x [N, D], codebook [K, D] → (idx int64 [N], dist fp32 [N] = ‖x − e_idx‖²)."""
    if kernel_backend(x.device) == "triton":
        from vimpac.kernels.vq_triton import nearest_code_triton

        return nearest_code_triton(x, codebook)
    return nearest_code_reference(x, codebook)


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
    Unset VIMPAC_KERNELS falls back to the reference for shapes the kernel does not cover (head dim not in
    16/32/64/128, lines longer than 255 tokens); VIMPAC_KERNELS=triton raises for them instead.
    """
    if kernel_backend(q.device) == "triton":
        from vimpac.kernels.axial_attention_triton import axial_attention_triton, check_supported

        try:
            check_supported(q, axis)
        except ValueError:
            if requested_backend() == "triton":
                raise
        else:
            # The CLS path may run in another precision (autocast); the kernel wants one dtype (autograd-tracked).
            cls_q, cls_k, cls_v = (c.to(q.dtype) for c in (cls_q, cls_k, cls_v))
            return axial_attention_triton(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale)
    return axial_attention_reference(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale)


__all__ = ["BACKENDS", "argmax_scores", "axial_attention", "kernel_backend", "nearest_code", "triton_available"]
