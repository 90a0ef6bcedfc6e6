"""`vimpac selfcheck`: every Triton kernel against its PyTorch reference at a model configuration's shapes, on this
machine's device: errors (forward and backward), times, and a verdict per kernel (vimpac.kernels.selfcheck)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vimpac.errors import UsageError

EPILOG = """\
Axial attention is checked per single-axis pattern of --model (joint patterns such as HW run on SDPA, not on a
Triton kernel), with inference inputs (no PAD mask, no dropout) and training inputs (a PAD mask, --dropout);
nearest_code and argmax_scores (with a bias, as the DALL-E head) on --vq-rows features against --codes codes of
--code-dim. Inputs are synthetic with a fixed seed; both paths get the same values, the reference computes in
fp32; errors are max abs differences, timed forward + backward (median of --repeats). A kernel passes within the
first-call check's tolerance (relative to the reference's magnitude: fp32 1e-3, fp16 2e-2, bf16 8e-2); the VQ
kernels must pick a code whose exact score is within their rounding bound of the best.

On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here when unset): a check of
correctness only, at small shapes (each case shrunk to the first-call check's slice: batch 1, ≤ 2 heads, a few
lines; VQ to 16 rows × 256 codes × 64), unless --full. Exit code 1 when a kernel fails.

examples:
  vimpac selfcheck                                                 # the small model, default device
  vimpac selfcheck --layers 24 --hid-dim 1024 --halve-att --halve-mlp --deepspeed_config ds_configs/large.json
  vimpac selfcheck --precision bf16 --batch 4 --json selfcheck.json
"""


def register(sub: argparse._SubParsersAction) -> None:
    from vimpac.config import add_model_arguments

    p = sub.add_parser(
        "selfcheck",
        help="check every Triton kernel against its PyTorch reference at a model's shapes on this device",
        description="Run the Triton kernels and their PyTorch references on the same inputs at the shapes of a "
        "model configuration; print max abs errors (forward, backward), times and a verdict per kernel.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=None,
        help="engine json: its precision is checked (default fp32; --precision wins)",
    )
    p.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"), help="dtype of the inputs")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch", type=int, default=1, help="clips per attention call (default 1)")
    p.add_argument("--codes", type=int, default=None, help="VQ codebook size K (default: --vocab-size)")
    p.add_argument("--code-dim", type=int, default=256, help="VQ feature size D (default 256)")
    p.add_argument("--vq-rows", type=int, default=None, help="VQ rows N (default: --batch × T × h × w)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per path (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--full", action="store_true", help="full shapes on CPU too (slow: the interpreter)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.config import config_from_args
    from vimpac.errors import require_file_path

    require_file_path(args.json, "--json")
    from vimpac.ds_config import load_json, precision_of

    config = config_from_args(args)
    for name in ("batch", "code_dim"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    precision = args.precision or (precision_of(load_json(args.deepspeed_config)) if args.deepspeed_config else "fp32")

    from vimpac.devices import resolve_device

    device = resolve_device(args.device)
    interpreted = device.type != "cuda"
    if interpreted and "TRITON_INTERPRET" not in os.environ:
        # Read when the kernel modules are imported, which happens only below: setting it now is in time.
        os.environ["TRITON_INTERPRET"] = "1"

    from vimpac.kernels.selfcheck import DTYPES, as_record, format_table, run_selfcheck

    t, h, w = config.shape
    vq = (args.vq_rows or args.batch * t * h * w, args.codes or config.vocab_size, args.code_dim)
    repeats = args.repeats if args.repeats is not None else (1 if interpreted else 10)
    small = interpreted and not args.full
    note = " (Triton interpreter: correctness only, timings are not kernel speeds)" if interpreted else ""
    print(
        f"selfcheck on {device}{note}, {precision}, layout {config.layout}, clip {config.shape}, "
        f"{config.num_heads} heads of {config.head_dim}" + (", small shapes (--full for the model's)" if small else ""),
        flush=True,
    )
    rows = run_selfcheck(config, device, DTYPES[precision], args.batch, vq, small=small, repeats=repeats)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([as_record(r) for r in rows], indent=2) + "\n")
    failed = [r for r in rows if r.skipped is None and not r.ok]
    if failed:
        print(
            f"{len(failed)} kernel case(s) failed: unset VIMPAC_KERNELS falls back to the reference for them "
            "(with a warning); VIMPAC_KERNELS=reference avoids Triton altogether",
            file=sys.stderr,
        )
        return 1
    return 0
