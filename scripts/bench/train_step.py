"""Benchmark one pre-training step: tokens/s, TFLOP/s, MFU and peak memory for the paper's model sizes.

    python scripts/bench/train_step.py                                   # small (f128) and large-half (f256)
    python scripts/bench/train_step.py --configs small --batch-size 2 --precision bf16 --json bench.json
    python scripts/bench/train_step.py --attention triton --precision fp16   # on a GPU
    python scripts/bench/train_step.py --configs demo --threads 1            # one of the demo's 2 CPU ranks

One step = what one rank does per micro-step in `vimpac/pretrain.py`: the real VimpacForPretraining on a batch
of B videos × 2 block-masked clips (vimpac.masking, 5 blocks at f128 / 6 at f256, as the launch scripts), one
forward feeding both losses (masked-token CE + InfoNCE, vimpac.losses), backward, and with --optimizer-step
(default on) gradient clipping at 1.0 and an AdamW update. DeepSpeed is not used: a single-rank step has no
communication, and its mixed precision is reproduced here: with fp16/bf16 the model itself is in 16 bits (as
DeepSpeed's engine holds it), the loss is scaled (fp16: a fixed 2^12 instead of the dynamic scale, no
overflow skipping) and the update runs on fp32 master weights that are copied back. So memory matches a
ZeRO-0 rank (ZeRO-1/2 would shard the optimizer state over ranks). Masking happens once, outside the timing
(in training it runs in the loader workers). Activation checkpointing follows the config's ds_configs json
(both turn it on) unless --grad-checkpoint / --no-grad-checkpoint says otherwise.

Timing: --warmup steps, then the median of --steps timed steps (torch.cuda.synchronize around each on GPU).
  tokens/s   2·B·T·h·w / median step time (same definition as the trainer's speed/tokens_per_s)
  TFLOP/s    vimpac.flops.pretrain_train_flops (matmul model FLOPs, 3 × forward, recomputation not counted)
             / median step time
  MFU        TFLOP/s / peak: --peak-tflops, else the GPU's datasheet peak from vimpac.flops (fp16/bf16 dense
             tensor core; TF32 for fp32); on a CPU no peak is assumed and MFU is left empty unless given.
  peak mem   GPU: torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer state,
             activations). CPU: the process's peak resident set (VmHWM) over the timed steps after resetting it
             through /proc/self/clear_refs, and the same minus the resident set before the model was built
             (falls back to getrusage's lifetime ru_maxrss where the reset is not allowed; the JSON says which).
The attention implementation is vimpac.kernels' (VIMPAC_KERNELS, set by --attention). The JSON holds every
step time, the settings, the machine, library versions, the git commit and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vimpac.activation_checkpointing import enable_activation_checkpointing
from vimpac.bench_env import environment
from vimpac.config import VimpacConfig
from vimpac.ds_config import load_json, uses_activation_checkpointing
from vimpac.flops import peak_flops, pretrain_train_flops
from vimpac.losses import info_nce, masked_token_loss
from vimpac.masking import mask_batch
from vimpac.modeling import VimpacForPretraining
from vimpac.optim import parameter_groups

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0**12


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model of the launch scripts: its VimpacConfig fields, frame size, mask blocks and engine json."""

    frame_size: int
    mask_blocks: int
    ds_config: str | None
    fields: dict[str, Any]

    def config(self) -> VimpacConfig:
        return VimpacConfig.from_frame_size(self.frame_size, **self.fields)


PRESETS = {
    # scripts/pretrain/small.sh
    "small": Preset(128, 5, "ds_configs/small.json", dict(hidden_size=512, layers=6, nce_proj_hid_dim=2048)),
    # scripts/pretrain/large_frame256cont.sh (stage 2 of the large-half model)
    "large-half": Preset(
        256,
        6,
        "ds_configs/large_frame256.json",
        dict(hidden_size=1024, layers=24, halve_att=True, halve_mlp=True, nce_proj_layers=3, nce_proj_hid_dim=4096),
    ),
    # `vimpac demo`'s default budget (vimpac/commands/demo.py): 2 × 128, 2 heads, 5 frames of 64 px (8 × 8 codes),
    # vocab 256, projection 4 × 128, fp32 on the CPU engine (no activation checkpointing), pretrain.py's default 5
    # mask blocks. Its CPU default batch is the demo's micro-batch: 16 videos over 2 ranks = 8 per rank.
    "demo": Preset(
        64,
        5,
        "ds_configs/cpu.json",
        dict(vocab_size=256, hidden_size=128, layers=2, heads=2, clip_len=5, nce_proj_hid_dim=512),
    ),
    # A toy size for tests and smoke runs.
    "tiny": Preset(
        32, 2, None, dict(vocab_size=64, hidden_size=64, layers=2, heads=2, clip_len=4, nce_proj_hid_dim=64)
    ),
}


# ------------------------------------------------------------------------------------------------- the step


def make_batch(config: VimpacConfig, videos: int, mask_blocks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """B videos × 2 masked clips of random codes, laid out as the trainer feeds the model: [2B, T, h, w] with
    every video's first clip first. Returns {"tokens", "labels"} (int64) and the predicted-position count."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, config.vocab_size, size=(2, videos, *config.shape))
    inputs, labels = mask_batch(codes, mask_blocks, rng, config.pad_id, config.mask_id, config.vocab_size)
    tokens = torch.from_numpy(inputs).flatten(0, 1)
    labels = torch.from_numpy(labels).flatten(0, 1)
    return {"tokens": tokens, "labels": labels, "predicted": int((labels != -100).sum())}


class MixedPrecisionAdamW:
    """AdamW (clip 1.0, the paper's betas and decay groups) on fp32 master weights of a 16-bit model, as
    DeepSpeed's fp16/bf16 optimizers do; on an fp32 model it steps the model's own parameters."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.05):
        groups = parameter_groups(model, weight_decay)
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                master = p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, master))
                masters.append(master)
            master_groups.append({"params": masters, "weight_decay": group["weight_decay"]})
        self.optimizer = torch.optim.AdamW(master_groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)

    def step(self, loss_scale: float = 1.0) -> None:
        for p, master in self.pairs:
            if p.grad is None:
                continue
            if master is p:
                if loss_scale != 1.0:
                    p.grad.div_(loss_scale)
            else:
                master.grad = p.grad.float().div_(loss_scale)
        torch.nn.utils.clip_grad_norm_([m for _, m in self.pairs if m.grad is not None], 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for p, master in self.pairs:
                if master is not p:
                    p.copy_(master)
                    master.grad = None
                p.grad = None


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: MixedPrecisionAdamW | None,
    loss_scale: float = 1.0,
    temperature: float = 0.2,
) -> dict[str, float]:
    """One forward (both heads) + backward (+ optimizer update); returns the losses. Does not synchronise."""
    videos = batch["tokens"].shape[0] // 2
    out = model(batch["tokens"], batch["labels"])
    mlm = masked_token_loss(out["mlm_logits"], out["mlm_labels"])
    nce = info_nce(out["nce"][:videos], out["nce"][videos:], temperature=temperature)
    loss = mlm.loss + nce.loss
    (loss * loss_scale).backward()
    if optimizer is not None:
        optimizer.step(loss_scale)
    else:
        model.zero_grad(set_to_none=True)
    return {"loss/mlm": mlm.loss.detach(), "loss/nce": nce.loss.detach()}


# ---------------------------------------------------------------------------------------------- measuring


def _read_status(field: str) -> int | None:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory over a window: start() before it, stop() after; see the module docstring for the kinds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = _read_status("VmRSS") if device.type == "cpu" else None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        elif _reset_peak_rss() and _read_status("VmHWM") is not None:
            self.kind = "process peak RSS (VmHWM, reset before the timed steps)"
        else:
            self.kind = "process lifetime peak RSS (getrusage ru_maxrss)"

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"peak_memory_bytes": peak, "peak_memory_kind": self.kind, "peak_memory_above_baseline_bytes": None}
        if self.kind.startswith("process peak RSS"):
            peak = _read_status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        above = peak - self.baseline if self.baseline is not None else None
        return {"peak_memory_bytes": peak, "peak_memory_kind": self.kind, "peak_memory_above_baseline_bytes": above}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    batch_size: int,
    precision: str,
    device: str | torch.device,
    warmup: int = 2,
    steps: int = 5,
    optimizer_step: bool = True,
    grad_checkpoint: bool | None = None,
    peak_tflops: float | None = None,
    seed: int = 0,
    compile_backend: str | None = None,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Time `steps` steps of preset `name` after `warmup` untimed ones; returns one result row (JSON-ready).
    compile_backend: run the model under torch.compile with that backend (the warm-up steps compile it).
    profile_steps: after the timed steps, run this many more under torch.profiler and add the top ops by self
    time ("profile_top_ops", per step) to the row."""
    preset = PRESETS[name]
    device = torch.device(device)
    dtype = DTYPES[precision]
    if precision == "fp16" and device.type != "cuda":
        raise SystemExit("fp16 needs CUDA here (as in vimpac/pretrain.py); use --precision bf16 or fp32 on a CPU")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1, --warmup >= 0")
    if compile_backend is not None and warmup < 1:
        raise SystemExit("--compile needs --warmup >= 1: the first step compiles")
    config = preset.config()
    if grad_checkpoint is None:
        grad_checkpoint = bool(preset.ds_config) and uses_activation_checkpointing(load_json(REPO / preset.ds_config))
    gc.collect()
    memory = PeakMemory(device)
    torch.manual_seed(seed)
    model = VimpacForPretraining(config).to(device=device, dtype=dtype).train()
    parameters = sum(p.numel() for p in model.parameters())
    if grad_checkpoint:
        enable_activation_checkpointing(model.backbone.layers)
    optimizer = MixedPrecisionAdamW(model) if optimizer_step else None
    runner = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    batch = make_batch(config, batch_size, preset.mask_blocks, seed)
    predicted = batch.pop("predicted")
    batch = {k: v.to(device) for k, v in batch.items()}

    for _ in range(warmup):
        train_step(runner, batch, optimizer, loss_scale)
    _sync(device)
    memory.start()
    load_before = os.getloadavg()[0]
    times, cpu_times, losses = [], [], []
    for _ in range(steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        values = train_step(runner, batch, optimizer, loss_scale)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append({k: float(v) for k, v in values.items()})
    peak = memory.stop()
    load_after = os.getloadavg()[0]
    top_ops = profile_top_ops(
        functools.partial(train_step, runner, batch, optimizer, loss_scale), profile_steps, device
    )

    clips = 2 * batch_size
    t, h, w = config.shape
    tokens = clips * t * h * w
    median = statistics.median(times)
    flops = pretrain_train_flops(config, clips, predicted)
    if peak_tflops is not None:
        peak_flops_value = peak_tflops * 1e12
    elif device.type == "cuda":
        peak_flops_value = peak_flops(torch.cuda.get_device_name(device), precision)
    else:
        peak_flops_value = None
    achieved = flops / median
    del model, runner, optimizer, batch
    gc.collect()
    return {
        "config": name,
        "frame_size": preset.frame_size,
        "model": config.to_dict(),
        "parameters": parameters,
        "batch_videos": batch_size,
        "clips": clips,
        "tokens_per_step": tokens,
        "predicted_per_step": predicted,
        "mask_blocks": preset.mask_blocks,
        "precision": precision,
        "attention": os.environ.get("VIMPAC_KERNELS") or "reference",
        "compile": compile_backend,
        "grad_checkpoint": grad_checkpoint,
        "optimizer_step": optimizer_step,
        "device": str(device),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_times_s": times,
        # CPU time of this process (all its threads) per step: less sensitive than the wall time to other
        # processes taking the cores, though not immune (caches, memory bandwidth).
        "process_cpu_times_s": cpu_times,
        "median_step_s": median,
        "tokens_per_s": tokens / median,
        "clips_per_s": clips / median,
        "model_flops_per_step": flops,
        "tflops_per_s": achieved / 1e12,
        "peak_flops": peak_flops_value,
        "mfu": achieved / peak_flops_value if peak_flops_value else None,
        **peak,
        "losses": losses,
        # Runnable processes on the machine (1-minute average) around the timed steps: above the cores used here,
        # other work shared the CPU and the times are pessimistic.
        "load_average_before_after": [load_before, load_after],
        **({"profile_steps": profile_steps, "profile_top_ops": top_ops} if profile_steps else {}),
    }


def profile_top_ops(step, steps: int, device: torch.device, top: int = 25) -> list[dict[str, Any]]:
    """Run `step` `steps` times under torch.profiler; the `top` ops by self time, per step (ms, calls). The
    profiler's times are wall-clock: on a loaded machine they include time spent waiting for a core."""
    if steps < 1:
        return []
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "self_cpu_share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:top]
    ]


# ------------------------------------------------------------------------------------------------ report


def _size(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "config", "frame", "batch", "clips", "prec", "attn", "ckpt", "opt", "step s", "tokens/s", "TFLOP/s", "MFU",
        "peak mem", "mem above base",
    )  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["config"],
                str(r["frame_size"]),
                str(r["batch_videos"]),
                str(r["clips"]),
                r["precision"],
                r["attention"],
                "on" if r["grad_checkpoint"] else "off",
                "on" if r["optimizer_step"] else "off",
                f"{r['median_step_s']:.3f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['tflops_per_s']:.4f}",
                "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                _size(r["peak_memory_bytes"]),
                _size(r["peak_memory_above_baseline_bytes"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench/train_step.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cuda = torch.cuda.is_available()
    parser.add_argument("--configs", default="small,large-half", help=f"comma-separated presets: {', '.join(PRESETS)}")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="videos per step (2 clips each); default: the launch scripts' --bs-per-gpu on a GPU (small 8, "
        "large-half 1), 1 on a CPU except demo (8, the demo's per-rank micro-batch)",
    )
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp16" if cuda else "fp32")
    parser.add_argument(
        "--attention",
        choices=("reference", "triton"),
        default=os.environ.get("VIMPAC_KERNELS") or "reference",
        help="axial attention implementation (sets VIMPAC_KERNELS)",
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model with this backend (inductor on a GPU); the warm-up steps compile",
    )
    parser.add_argument(
        "--optimizer-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include clipping + AdamW on fp32 master weights",
    )
    parser.add_argument(
        "--grad-checkpoint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation checkpointing per layer (default: as the preset's ds_configs json)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for the MFU (default: known GPUs only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after timing, profile this many steps (torch.profiler) and print/record the top ops by self time",
    )
    parser.add_argument("--json", type=Path, default=None, help="write settings, environment and results here")
    return parser


# Environment that changes CPU speed without changing results: threads, OpenMP waiting (on a shared machine a
# spinning thread waits out other processes' time slices: OMP_WAIT_POLICY=PASSIVE), glibc malloc returning memory
# (every fresh page is a fault, ~20% of a demo-size step: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), torch's
# transparent huge pages. Recorded in the JSON because they are read at start-up, not set by this script.
CPU_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "THP_MEM_ALLOC_ENABLE",
)

DEFAULT_GPU_BATCH = {"small": 8, "large-half": 1, "demo": 8, "tiny": 2}  # the launch scripts' --bs-per-gpu
DEFAULT_CPU_BATCH = {"demo": 8}  # the demo's --bs-per-gpu on 2 CPU ranks; other presets: 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        print(f"unknown --configs {unknown}; choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    os.environ["VIMPAC_KERNELS"] = args.attention
    from vimpac.kernels import kernel_backend

    try:
        kernel_backend(torch.device(args.device))
    except (RuntimeError, ValueError) as err:
        print(f"--attention {args.attention}: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name in names:
        default_batch = DEFAULT_GPU_BATCH[name] if device.type == "cuda" else DEFAULT_CPU_BATCH.get(name, 1)
        batch = args.batch_size or default_batch
        row = measure(
            name,
            batch,
            args.precision,
            device,
            warmup=args.warmup,
            steps=args.steps,
            optimizer_step=args.optimizer_step,
            grad_checkpoint=args.grad_checkpoint,
            peak_tflops=args.peak_tflops,
            seed=args.seed,
            compile_backend=args.compile,
            profile_steps=args.profile_steps,
        )
        rows.append(row)
        print(f"{name}: median step {row['median_step_s']:.3f} s over {args.steps} steps", file=sys.stderr, flush=True)
    print(table(rows))
    for row in rows:
        if row.get("profile_top_ops"):
            print(f"\n{row['config']}: top ops by self time over {row['profile_steps']} profiled steps (per step)")
            for op in row["profile_top_ops"][:15]:
                print(
                    f"  {op['self_cpu_ms_per_step']:9.2f} ms  {100 * op['self_cpu_share']:5.1f}%  "
                    f"{op['calls_per_step']:6.1f} calls  {op['op']}"
                )
    if all(r["mfu"] is None for r in rows):
        print("MFU: no peak known for this device; pass --peak-tflops to compute it")
    if args.json:
        payload = {
            **environment(device),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "cpu_env": {name: os.environ.get(name) for name in CPU_ENV},
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
