"""The device a Triton launch runs on.

Triton launches on torch's *current* CUDA device and its current stream, whatever device the arguments live on.
A process that put its tensors on cuda:1 without `torch.cuda.set_device(1)` (`vimpac tokenize --device cuda:1`,
`vimpac.load_model(..., device="cuda:1")`) would launch on GPU 0 with pointers into GPU 1: an illegal memory
access, or without ordering against GPU 1's stream. Every launch therefore runs under `on_device(tensor)`.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `tensor`'s CUDA device current for the block (nothing for CPU tensors: the Triton interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
