"""Every Triton kernel against its PyTorch reference at a model's shapes: `vimpac selfcheck` and the one line the
trainers print at start-up on CUDA.

A model config is used duck-typed (`shape` (T, h, w), `blocks`, `num_heads`, `head_dim`, `dropout`, as on
`vimpac.config.VimpacConfig`), so the kernels do not import the model package.

Cases. Axial attention runs once per single-axis pattern of the layout ("T", "H", "W"; joint patterns such as
"HW" use SDPA, not a Triton kernel) in two variants that between them cover every kernel feature: inference
(no PAD mask, no dropout) and training (PAD mask, the config's dropout). VQ runs nearest_code and argmax_scores
(with a bias, as the DALL-E head) on [rows, dim] features and [codes, dim] codebooks. Comparisons are those of
the first-call check (`first_call.compare_axial`, `first_call.vq_comparison`): synthetic fixed-seed inputs,
tolerance by dtype, forward and backward.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from vimpac.kernels import first_call, requested_backend, triton_available
from vimpac.kernels.first_call import Comparison

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Under the interpreter (CPU) every program runs as numpy, ~10⁴× slower than a GPU: shapes shrink to these.
SMALL_VQ = (16, 256, 64)  # rows, codes, dim


def triton_unusable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` in this process (None: they can)."""
    if not triton_available():
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton needs CUDA, or TRITON_INTERPRET=1 set before the kernels are imported (its CPU interpreter)"
    loaded = [m for m in ("vimpac.kernels.axial_attention_triton", "vimpac.kernels.vq_triton") if m in sys.modules]
    if any(not sys.modules[name]._INTERPRET for name in loaded):
        return "the Triton kernels were imported before TRITON_INTERPRET=1 was set"
    return None


def attention_cases(
    config: Any, batch: int, variants: tuple[tuple[bool, float], ...] | None = None
) -> list[tuple[str, tuple[int, ...], bool, float]]:
    """(axis, q shape [B, T, H, W, heads, d], PAD mask?, dropout_p) per single-axis pattern and variant
    (PAD mask?, dropout_p); default variants: inference (no PAD, no dropout), training (PAD, config.dropout)."""
    if variants is None:
        variants = ((False, 0.0), (True, float(config.dropout)))
    t, h, w = config.shape
    cases = []
    for patterns in config.blocks:
        heads = config.num_heads // len(patterns)  # parallel patterns split the heads
        for pattern in patterns:
            if len(pattern) != 1:
                continue
            shape = (batch, t, h, w, heads, config.head_dim)
            for has_pad, dropout_p in variants:
                case = (pattern, shape, has_pad, dropout_p)
                if case not in cases:
                    cases.append(case)
    return cases


def _unsupported(shape: tuple[int, ...], axis: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the dispatcher would not send this call to Triton (None: it would). The probe is one element expanded
    to `shape` on `device`, requiring grad as the checked calls do (support may depend on device and backward)."""
    from vimpac.kernels.axial_attention_triton import check_supported

    probe = torch.empty((1,) * 6, dtype=dtype, device=device, requires_grad=True)
    try:
        check_supported(probe.expand(shape), axis)
    except ValueError as err:
        return str(err)
    return None


def run_selfcheck(
    config: Any,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 1,
    vq: tuple[int, int, int] | None = None,
    small: bool = False,
    repeats: int = 5,
) -> list[Comparison]:
    """Compare every kernel with its reference (and time both) at `config`'s shapes; vq = (rows, codes, dim).

    small: shrink each case to the first-call check's slice (attention) and SMALL_VQ (for the interpreter).
    A case that cannot run on Triton comes back with `skipped` set (why) and no numbers."""
    device = torch.device(device)
    unusable = triton_unusable(device)
    rows: list[Comparison] = []
    for axis, shape, has_pad, dropout_p in attention_cases(config, batch):
        detail = f"axis {axis}, {'PAD' if has_pad else 'no PAD'}, dropout {dropout_p:g}"
        skip = unusable or _unsupported(shape, axis, dtype, device)
        if skip is None:
            run_shape = first_call.small_shape(shape, axis, dropout_p) if small else shape
            result = first_call.compare_axial(run_shape, axis, dtype, device, has_pad, dropout_p, repeats=repeats)
        else:
            result = Comparison("axial_attention", shape, dtype, str(device), detail, skipped=skip)
        rows.append(result)
    if vq is not None:
        n, k, d = (min(a, b) for a, b in zip(vq, SMALL_VQ)) if small else vq
        for kind in ("nearest_code", "argmax_scores"):
            if unusable is None:
                rows.append(first_call.vq_comparison(kind, n, k, d, dtype, device, repeats=repeats))
            else:
                rows.append(Comparison(kind, (n, k, d), dtype, str(device), skipped=unusable))
    return rows


def verdict(row: Comparison) -> str:
    if row.skipped is not None:
        return "skipped"
    if row.ok:
        return "ok"
    return "ERROR" if row.error is not None else "MISMATCH"


def _number(value: float | None, scale: float = 1.0, fmt: str = ".2e") -> str:
    return "-" if value is None else format(value * scale, fmt)


def format_table(rows: list[Comparison]) -> str:
    """kernel, shape, dtype, case, max abs error fwd/bwd, Triton and reference ms (fwd+bwd), verdict."""
    header = ("kernel", "shape", "dtype", "case", "err fwd", "err bwd", "triton ms", "ref ms", "verdict")
    body = [
        (
            r.kernel,
            "x".join(map(str, r.shape)),
            str(r.dtype).removeprefix("torch."),
            r.detail,
            _number(r.fwd_err),
            _number(r.bwd_err),
            _number(r.triton_s, 1e3, ".3f"),
            _number(r.reference_s, 1e3, ".3f"),
            verdict(r),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    notes = [f"  {r.kernel} ({r.detail}): {r.skipped or r.problem()}" for r in rows if not r.ok]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def as_record(row: Comparison) -> dict[str, Any]:
    """A JSON-ready dict of one row."""
    return {
        "kernel": row.kernel,
        "shape": list(row.shape),
        "dtype": str(row.dtype).removeprefix("torch."),
        "device": row.device,
        "case": row.detail,
        "max_abs_err_fwd": row.fwd_err,
        "tol_fwd": row.fwd_tol,
        "max_abs_err_bwd": row.bwd_err,
        "tol_bwd": row.bwd_tol,
        "triton_ms": None if row.triton_s is None else row.triton_s * 1e3,
        "reference_ms": None if row.reference_s is None else row.reference_s * 1e3,
        "verdict": verdict(row),
        "problem": row.skipped or row.problem() or None,
    }


def startup_line(config: Any, device: torch.device | None, dtype: torch.dtype, compiled: bool = False) -> str | None:
    """Check the attention kernels at `config`'s training shapes on a CUDA `device` and say so in one line.

    Runs the first-call check for each axis's training key (the config's dropout; a PAD mask when `compiled`,
    since the compiled model always passes one) and records its verdict, so a traced call finds it and a
    failing key falls back (with its warning) before the first step. Slices are tiny: on a GPU it costs the
    compilation the first step needs anyway plus well under a millisecond per key. None on other devices
    (the reference runs there; nothing to report) and for layouts without an axial pattern."""
    import vimpac.kernels as dispatch

    # Where the default dispatch uses Triton (CUDA; tests add CPU to run this under the interpreter).
    if device is None or torch.device(device).type not in dispatch._TRITON_DEVICE_TYPES:
        return None
    device = torch.device(device)
    backend = requested_backend()
    if backend == "reference":
        return "kernels: PyTorch reference (VIMPAC_KERNELS=reference)"
    if not triton_available():
        return "kernels: PyTorch reference (triton is not installed)"
    start = time.perf_counter()
    parts, failed, worst = [], [], [0.0, 0.0]
    for axis, shape, has_pad, dropout_p in attention_cases(config, 1, ((compiled, float(config.dropout)),)):
        label = f"{axis}/{1 + shape[1 + 'THW'.index(axis)]}"
        reason = _unsupported(shape, axis, dtype, device)
        if reason is not None:
            parts.append(f"{label} reference (unsupported)")
            continue
        if backend == "triton":  # forced: report, never fall back
            run_shape = first_call.check_shape(shape, axis)
            result = first_call.compare_axial(run_shape, axis, dtype, device, has_pad, dropout_p)
        else:
            result = first_call.record_axial_check(shape, axis, dtype, device, has_pad, dropout_p)
        worst = [max(worst[0], result.fwd_err or 0.0), max(worst[1], result.bwd_err or 0.0)]
        parts.append(f"{label} {'ok' if result.ok else 'FAILED'}")
        if not result.ok:
            failed.append(f"{label}: {result.problem()}")
    if not parts:
        return None  # joint layouts only: no Triton kernel in this model
    ms = (time.perf_counter() - start) * 1e3
    head = (
        f"kernel self-check on {first_call._device_name(device)}, {str(dtype).removeprefix('torch.')}: axial_attention "
    )
    errors = f"max abs err fwd {worst[0]:.1e} bwd {worst[1]:.1e}, {ms:.0f} ms"
    if not failed:
        return f"{head}{', '.join(parts)} ({errors}): Triton in use"
    action = (
        "VIMPAC_KERNELS=triton: no fallback, expect wrong results or errors"
        if backend == "triton"
        else "those shapes use the PyTorch reference (set VIMPAC_KERNELS=reference to skip Triton)"
    )
    return f"{head}{', '.join(parts)} ({errors}); {'; '.join(failed)}; {action}"


__all__ = ["DTYPES", "as_record", "attention_cases", "format_table", "run_selfcheck", "startup_line", "verdict"]
