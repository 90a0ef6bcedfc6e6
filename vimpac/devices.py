"""The torch device a `--device` flag names: "cpu" or "cuda[:N]", checked against what this machine has."""

from __future__ import annotations

import torch

from vimpac.errors import UsageError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None, flag: str = "--device") -> torch.device:
    """torch.device of "cpu" or "cuda[:N]" (None: CUDA when available); UsageError for another name or a GPU that
    is not there, before any work (torch would fail later with a traceback)."""
    text = str(device or default_device())
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UsageError(f"{flag} must be cpu or cuda[:N]; got {text!r}")
    if kind == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise UsageError(f"{flag} {text}: no CUDA device is visible here; leave {flag} out or pass {flag} cpu")
        if index and int(index) >= visible:
            raise UsageError(f"{flag} {text}: only {visible} CUDA device(s) are visible (cuda:0 … cuda:{visible - 1})")
    return torch.device(text)
