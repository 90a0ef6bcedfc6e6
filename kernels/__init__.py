"""Compute kernels (Triton on CUDA, PyTorch references elsewhere).

This folder stays `kernels/` at the repository root but is installed and imported as `vimpac.kernels`
(setup.py's package_dir; a top-level `kernels` would clash with the PyPI package of that name).

Each public function dispatches per call on its inputs' device (docs/design.md §5.3):
  VIMPAC_KERNELS unset       Triton for CUDA tensors when Triton imports (and supports the shape), else the
                             PyTorch reference; the first Triton call of each shape class in a process is
                             checked against the reference, and a mismatch or a compile/launch error switches
                             that class to the reference with one KernelFallbackWarning (kernels/first_call.py);
  VIMPAC_KERNELS=reference   always the reference;
  VIMPAC_KERNELS=triton      always Triton: an error where it cannot run, never a fallback, no first-call
                             check. CPU tensors need TRITON_INTERPRET=1 (the interpreter, which is how CI tests
                             the kernels).
The Triton modules are imported lazily, so machines without Triton (or without a GPU) never load them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from vimpac.kernels import first_call
from vimpac.kernels.axial_attention_reference import axial_attention_reference
from vimpac.kernels.first_call import KernelFallbackWarning
from vimpac.kernels.vq_reference import argmax_scores_reference, nearest_code_reference

BACKENDS = ("triton", "reference")
# Device types that default to Triton. Tests add "cpu" (with TRITON_INTERPRET=1) to run the default dispatch,
# first-call check included, without a GPU.
_TRITON_DEVICE_TYPES = ("cuda",)


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
    default_triton = device is not None and device.type in _TRITON_DEVICE_TYPES
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
    return "triton" if default_triton and triton_available() else "reference"


def argmax_scores(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_k (x·w_k + b_k) per row: x [N, D], weight [K, D], bias [K] | None → (idx int64 [N], score fp32 [N])."""
    if kernel_backend(x.device) == "triton":
        from vimpac.kernels import vq_triton

        if requested_backend() == "triton":
            return vq_triton.argmax_scores_triton(x, weight, bias)
        return first_call.vq_checked(
            "argmax_scores",
            x,
            weight,
            bias,
            lambda: vq_triton.argmax_scores_triton(x, weight, bias),
            lambda: argmax_scores_reference(x, weight, bias),
        )
    return argmax_scores_reference(x, weight, bias)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per row: x [N, D], codebook [K, D] → (idx int64 [N], dist fp32 [N] = ‖x − e_idx‖²)."""
    if kernel_backend(x.device) == "triton":
        from vimpac.kernels import vq_triton

        if requested_backend() == "triton":
            return vq_triton.nearest_code_triton(x, codebook)
        return first_call.vq_checked(
            "nearest_code",
            x,
            codebook,
            None,
            lambda: vq_triton.nearest_code_triton(x, codebook),
            lambda: nearest_code_reference(x, codebook),
        )
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
    16/32/64/128, lines longer than 255 tokens) and for shape classes that failed their first-call check;
    VIMPAC_KERNELS=triton raises for the former and skips the check.
    """
    if kernel_backend(q.device) == "triton":
        from vimpac.kernels import axial_attention_triton as triton_module

        try:
            triton_module.check_supported(q, axis)
        except ValueError:
            if requested_backend() == "triton":
                raise
        else:
            checked = requested_backend() != "triton"
            if not checked or first_call.axial_attention_passes(q, axis, key_padding_mask, dropout_p, scale):
                # The CLS path may run in another precision (autocast); the kernel wants one dtype (autograd-tracked).
                cls_q, cls_k, cls_v = (c.to(q.dtype) for c in (cls_q, cls_k, cls_v))
                return triton_module.axial_attention_triton(
                    q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale
                )
    return axial_attention_reference(q, k, v, cls_q, cls_k, cls_v, axis, key_padding_mask, dropout_p, scale)


__all__ = [
    "BACKENDS",
    "KernelFallbackWarning",
    "argmax_scores",
    "axial_attention",
    "kernel_backend",
    "nearest_code",
    "triton_available",
]
