"""Benchmark the Triton kernels against their baselines, all measured in the same run.

    python scripts/bench/kernels.py --json benchmarks/kernels_h100.json          # on a GPU: the issue's shapes
    python scripts/bench/kernels.py --quick --device cpu --no-compile             # smoke run (Triton interpreter)

Axial attention (fp16 on GPU, forward and forward+backward, per axis and for one T,H|W layer):
  eager      the PyTorch reference (permute + CLS concat + SDPA + mean), kernels/axial_attention_reference.py
  compiled   the same reference under torch.compile
  triton     kernels/axial_attention_triton.py
Shapes: small f128 (B16, T5, 16x16, 8 heads of 64), large-half f256 (B4, T5, 32x32, 16 heads of 32) and T=10.
Memory traffic counted for the floor: forward reads Q, K, V and writes O (4 tensors); forward+backward adds
reading Q, K, V, dO and writing dQ, dK, dV (11 tensors in all). "floor" = that traffic / the GPU's peak HBM
bandwidth (vimpac.flops.peak_bandwidth); "of floor" = floor / measured time.

VQ lookup (fp16 inputs): nearest code for N rows against a (K, D) codebook, and the dVAE head (argmax of a
D=2048 → K=8192 1x1 conv):
  cdist      torch.cdist + argmin (fp32)
  matmul     x @ codebookᵀ − ½‖e‖² then argmax (fp16 matmul)
  triton     kernels/vq_triton.py (tiled running argmax; exact rescoring of near-ties)
The VQ rows also give Triton's TFLOP/s (2·N·K·D per call) and its fraction of the GPU's dense tensor-core peak.

Each figure is the median of --iters timed calls after --warmup calls (CUDA-synchronised). The JSON holds every
row, the settings, the machine, library versions, the git commit and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vimpac.bench_env import environment
from vimpac.flops import peak_bandwidth, peak_flops
from vimpac.kernels.axial_attention_reference import axial_attention_reference
from vimpac.kernels.first_call import median_seconds

# (B, T, H, W, heads, head dim)
ATTENTION_SHAPES = {
    "small-f128": (16, 5, 16, 16, 8, 64),
    "small-f128-T10": (16, 10, 16, 16, 8, 64),
    "large-half-f256": (4, 5, 32, 32, 16, 32),
    "large-half-f256-T10": (4, 10, 32, 32, 16, 32),
}
QUICK_ATTENTION = {"tiny": (2, 3, 4, 5, 2, 16)}
# (name, N rows, K codes, D, with bias: the dVAE head's 1x1 conv has one)
VQ_SHAPES = [
    ("vq-8192x256", 262_144, 8192, 256, False),
    ("vq-1024x64", 262_144, 1024, 64, False),
    ("vq-8192x32", 1_048_576, 8192, 32, False),
    ("dvae-head", 65_536, 8192, 2048, True),
]
QUICK_VQ = [("vq-tiny", 64, 70, 20, False)]


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    return 1e3 * median_seconds(fn, device, iters)


def attention_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Q, K, V as views of one fused [B, T, H, W, 3, heads, d] projection output, CLS [B, 3, heads, d], the
    upstream gradients, and a PAD mask with the last frame of the first video padded."""
    b, t, h, w, heads, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(b, t, h, w, 3, heads, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    cls = torch.randn(b, 3, heads, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    pad = torch.zeros(b, t, h, w, dtype=torch.bool, device=device)
    pad[0, -1] = True
    return {
        "qkv": qkv,
        "cls": cls,
        "pad": pad,
        "grad_out": torch.randn(b, t, h, w, heads, d, generator=gen, device=device, dtype=dtype),
        "grad_cls": torch.randn(b, heads, d, generator=gen, device=device, dtype=dtype),
    }


def layer_call(attention: Callable, inputs: dict[str, torch.Tensor], axes: tuple[str, ...]) -> list[torch.Tensor]:
    """One attention call per axis in `axes` on head slices (one axis: all heads; "H", "W": half each, as T,H|W)."""
    qkv, cls, pad = inputs["qkv"], inputs["cls"], inputs["pad"]
    heads = qkv.shape[-2]
    per = heads // len(axes)
    outs = []
    for i, axis in enumerate(axes):
        hs = slice(i * per, (i + 1) * per)
        args = (qkv[..., 0, hs, :], qkv[..., 1, hs, :], qkv[..., 2, hs, :], cls[:, 0, hs], cls[:, 1, hs], cls[:, 2, hs])
        outs.extend(attention(*args, axis, pad))
    return outs


def attention_case(
    attention: Callable, inputs: dict[str, torch.Tensor], axes: tuple[str, ...], backward: bool
) -> Callable[[], None]:
    def run() -> None:
        outs = layer_call(attention, inputs, axes)
        if backward:
            grads = []
            for i, _ in enumerate(axes):
                heads = outs[2 * i].shape[-2]
                grads += [inputs["grad_out"][..., :heads, :], inputs["grad_cls"][:, :heads]]
            torch.autograd.backward(outs, grads)
            inputs["qkv"].grad = inputs["cls"].grad = None

    return run


def in_sequence(calls: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


def implementations(device: torch.device, compile_reference: bool, with_triton: bool) -> dict[str, Callable]:
    impls: dict[str, Callable] = {"eager": axial_attention_reference}
    if compile_reference:
        impls["compiled"] = torch.compile(axial_attention_reference, dynamic=False)
    if with_triton:
        from vimpac.kernels.axial_attention_triton import axial_attention_triton

        impls["triton"] = axial_attention_triton
    return impls


def bench_attention(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    shapes = QUICK_ATTENTION if args.quick else ATTENTION_SHAPES
    impls = implementations(device, not args.no_compile, not args.no_triton)
    bandwidth = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = []
    for name, shape in shapes.items():
        # One compiled reference serves every call: a shape's 5 calls (T, H, W; H and W on half the heads) stay
        # under Dynamo's recompile limit of 8, all shapes together would not, and past it Dynamo runs eager silently.
        torch._dynamo.reset()
        inputs = attention_inputs(shape, dtype, device)
        tensor_bytes = inputs["grad_out"].numel() * inputs["grad_out"].element_size()
        for axes in (("T",), ("H",), ("W",), ("T", "H", "W")):
            label = "layer T,H|W" if len(axes) == 3 else f"axis {axes[0]}"
            for backward in (False, True):
                # A whole layer is the T pattern on all heads then H|W on half each: time T and H|W calls.
                plan = [("T",), ("H", "W")] if len(axes) == 3 else [axes]
                traffic = (11 if backward else 4) * tensor_bytes * len(plan)
                times = {}
                for impl, attention in impls.items():
                    step = in_sequence([attention_case(attention, inputs, a, backward) for a in plan])
                    times[impl] = median_ms(step, device, args.warmup, args.iters)
                floor = traffic / bandwidth * 1e3 if bandwidth else None
                row = {
                    "kernel": "axial_attention",
                    "shape": name,
                    "dims": dict(zip(("B", "T", "H", "W", "heads", "d"), shape)),
                    "case": label,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "dtype": str(dtype).replace("torch.", ""),
                    "ms": times,
                    "bytes": traffic,
                    "floor_ms": floor,
                }
                add_ratios(row, times, traffic, floor)
                rows.append(row)
                print_row(row)
    return rows


def add_ratios(row: dict[str, Any], times: dict[str, float], traffic: int, floor: float | None) -> None:
    if "triton" not in times:
        return
    row["speedup_vs"] = {impl: ms / times["triton"] for impl, ms in times.items() if impl != "triton"}
    row["triton_GBps"] = traffic / (times["triton"] * 1e-3) / 1e9
    row["triton_fraction_of_floor"] = floor / times["triton"] if floor else None


def vq_implementations(
    x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, quick: bool, with_triton: bool
) -> dict[str, Callable[[], Any]]:
    """The callables to time for one VQ shape: nearest code (bias None) or argmax of scores + bias."""
    from vimpac.kernels.vq_reference import argmax_scores_reference

    offset = bias if bias is not None else -0.5 * codes.float().square().sum(1)
    impls: dict[str, Callable[[], Any]] = {"matmul": lambda: (x @ codes.T + offset.to(x.dtype)).argmax(1)}
    if bias is None:
        impls["cdist"] = lambda: torch.cdist(x.float(), codes.float()).argmin(1)
    if with_triton:
        from vimpac.kernels.vq_triton import argmax_scores_triton, nearest_code_triton

        if bias is None:
            impls["triton"] = lambda: nearest_code_triton(x, codes)
        else:
            impls["triton"] = lambda: argmax_scores_triton(x, codes, bias)
    if quick:  # the chunked reference is far too slow at the real sizes
        impls["reference"] = lambda: argmax_scores_reference(x, codes, offset)
    return impls


def bench_vq(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    shapes = QUICK_VQ if args.quick else VQ_SHAPES
    rows = []
    for name, n, k, d, has_bias in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
        codes = torch.randn(k, d, generator=gen, device=device, dtype=dtype)
        bias = torch.randn(k, generator=gen, device=device, dtype=torch.float32) if has_bias else None
        impls = vq_implementations(x, codes, bias, args.quick, not args.no_triton)
        times = {impl: median_ms(fn, device, args.warmup, args.iters) for impl, fn in impls.items()}
        row = {
            "kernel": "argmax_scores" if has_bias else "nearest_code",
            "shape": name,
            "dims": {"N": n, "K": k, "D": d},
            "dtype": str(dtype).replace("torch.", ""),
            "ms": times,
            "tflops_triton": 2 * n * k * d / (times["triton"] * 1e-3) / 1e12 if "triton" in times else None,
        }
        if "triton" in times:
            row["speedup_vs"] = {impl: ms / times["triton"] for impl, ms in times.items() if impl != "triton"}
            peak = peak_flops(torch.cuda.get_device_name(device), args.dtype) if device.type == "cuda" else None
            row["triton_fraction_of_tensor_peak"] = row["tflops_triton"] * 1e12 / peak if peak else None
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    times = "  ".join(f"{impl} {ms:8.3f} ms" for impl, ms in row["ms"].items())
    speed = "  ".join(f"×{v:.2f} vs {k}" for k, v in row.get("speedup_vs", {}).items())
    extra = ""
    if row.get("triton_fraction_of_floor") is not None:
        extra = f"  {row['triton_GBps']:.0f} GB/s = {100 * row['triton_fraction_of_floor']:.0f}% of HBM floor"
    if row.get("triton_fraction_of_tensor_peak") is not None:
        extra = f"  {row['tflops_triton']:.0f} TFLOP/s = {100 * row['triton_fraction_of_tensor_peak']:.0f}% of peak"
    case = f"{row.get('case', '')} {row.get('pass', '')}".strip()
    print(f"{row['kernel']:<15} {row['shape']:<20} {case:<20} {times}  {speed}{extra}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "fp32")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run; Triton interpreter on CPU)")
    parser.add_argument("--only", choices=("attention", "vq"), default=None, help="one kernel family")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-triton", action="store_true", help="baselines only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the environment here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and not args.no_triton and os.environ.get("TRITON_INTERPRET") != "1":
        print("Triton on CPU needs TRITON_INTERPRET=1 (or pass --no-triton)", file=sys.stderr)
        return 2
    rows = []
    if args.only in (None, "attention"):
        rows += bench_attention(args, device, dtype)
    if args.only in (None, "vq"):
        rows += bench_vq(args, device, dtype)
    if args.json is not None:
        payload = {**environment(device), "settings": vars(args) | {"json": str(args.json)}, "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
