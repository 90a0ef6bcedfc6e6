"""Paired before/after train steps in one process, alternating step by step, at the demo's model size on a CPU.

    python scripts/bench/train_step_paired.py --before REV --threads 1 --rounds 20 --json out.json

On a shared machine the load drifts between separate runs by more than a 10% change; here the two versions
take turns (order swapped every round) on the same batch, seed and weights, so both see the same conditions.
`--before` is checked out into a temporary shared clone; its vimpac/modeling.py and
kernels/axial_attention_reference.py are loaded beside today's (vimpac.kernels only dispatches to the reference on
a CPU, so the old model is pointed at the old reference directly). Each round reseeds the global RNG, so both
draw the same dropout masks: their losses must agree to fp32 rounding, which is checked and recorded.

--op-budget also times every ATen op of `--budget-rounds` rounds by thread CPU time (a TorchDispatchMode; other
processes' load does not count, unlike the profiler's wall-clock) and groups them by kind: where the step's
time goes and which part a change can reach. Use --threads 1 with it (thread CPU time sees one thread).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vimpac.bench_env import environment
from vimpac.modeling import VimpacForPretraining

REPO = Path(__file__).resolve().parents[2]

# Op kinds for --op-budget, in priority order (first match wins); the rest is "other".
CATEGORIES = (
    ("matmul (Linear: mm, addmm)", {"mm", "addmm"}),
    ("attention matmuls (bmm)", {"bmm"}),
    ("dropout masks (bernoulli_)", {"bernoulli_"}),
    ("zero-filled gradients of indexing", {"select_backward", "slice_backward", "zeros", "fill_", "zero_"}),
    ("layout copies (cat, stack, clone, copy_)", {"cat", "stack", "clone", "copy_", "_to_copy"}),
    ("softmax", {"_softmax", "_softmax_backward_data", "_safe_softmax", "amax", "exp", "isneginf", "all", "where"}),
    ("GELU (exact)", {"gelu", "gelu_backward"}),
    ("LayerNorm", {"native_layer_norm", "native_layer_norm_backward"}),
    ("in-place updates (AdamW, grad accumulation)", {"lerp_", "addcdiv_", "addcmul_", "sqrt", "mul_", "div_", "add_"}),
    ("elementwise (mul, add, div, sub)", {"mul", "add", "div", "sub", "masked_fill_", "masked_fill", "neg"}),
    ("reductions (sum, mean, norms)", {"sum", "mean", "linalg_vector_norm", "_foreach_norm"}),
)


class OpTimer(TorchDispatchMode):
    """Thread CPU time (ns) per ATen op name, summed over everything run inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ns: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's signature
        start = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        self.ns[func.overloadpacket.__name__] += time.thread_time_ns() - start
        return out

    def by_category(self, steps: int) -> dict[str, float]:
        """ms per step for each category of CATEGORIES, plus "other"."""
        result = {name: 0.0 for name, _ in CATEGORIES} | {"other": 0.0}
        for op, ns in self.ns.items():
            name = next((n for n, ops in CATEGORIES if op in ops), "other")
            result[name] += ns / 1e6 / steps
        return result


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def before_model_class(tree: Path) -> type:
    """VimpacForPretraining of the tree at `tree`, wired to that tree's attention reference."""
    reference = load("before_axial_attention_reference", tree / "kernels" / "axial_attention_reference.py")
    modeling = load("before_modeling", tree / "vimpac" / "modeling.py")
    modeling.axial_attention = reference.axial_attention_reference
    modeling.joint_attention = reference.joint_attention
    return modeling.VimpacForPretraining


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare today's tree against")
    parser.add_argument("--config", default="demo", help="scripts/bench/train_step.py preset (default demo)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per step (default 8, the demo's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each version per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--op-budget", action="store_true", help="also time every op by thread CPU time")
    parser.add_argument("--budget-rounds", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = load("bench_train_step", REPO / "scripts" / "bench" / "train_step.py")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(tree)], check=True)
        subprocess.run(["git", "-C", str(tree), "checkout", "-q", args.before], check=True)
        before_commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
        before_class = before_model_class(tree)
    preset = bench.PRESETS[args.config]
    config = preset.config()
    torch.manual_seed(0)
    models = {"before": before_class(config).train(), "after": VimpacForPretraining(config).train()}
    if list(models["before"].state_dict()) != list(models["after"].state_dict()):
        raise SystemExit("the two versions' state_dict keys differ")
    models["after"].load_state_dict(models["before"].state_dict())
    optimizers = {k: bench.MixedPrecisionAdamW(m) for k, m in models.items()}
    batch = bench.make_batch(config, args.batch_size, preset.mask_blocks, 0)
    batch.pop("predicted")
    tokens = batch["tokens"].numel()

    wall: dict[str, list[float]] = {"before": [], "after": []}
    cpu: dict[str, list[float]] = {"before": [], "after": []}
    losses: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    timers = {k: OpTimer() for k in models}
    budget_rounds = args.budget_rounds if args.op_budget else 0
    load_before = os.getloadavg()
    for round_ in range(args.warmup + args.rounds + budget_rounds):
        for side in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
            torch.manual_seed(1000 + round_)  # the same dropout masks for both versions
            timed = args.warmup <= round_ < args.warmup + args.rounds
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            if round_ >= args.warmup + args.rounds:
                with timers[side]:
                    values = bench.train_step(models[side], batch, optimizers[side])
            else:
                values = bench.train_step(models[side], batch, optimizers[side])
            if timed:
                wall[side].append(time.perf_counter() - start_wall)
                cpu[side].append(time.process_time() - start_cpu)
            losses[side].append({k: float(v) for k, v in values.items()})
    load_after = os.getloadavg()

    diff = max(abs(a[k] - b[k]) for a, b in zip(losses["before"], losses["after"]) for k in a)
    result: dict[str, Any] = {
        "what": "scripts/bench/train_step_paired.py: before/after train steps alternating in one process",
        "command": " ".join(["python", *sys.argv]),
        "before_commit": before_commit.stdout.strip(),
        **environment(torch.device("cpu")),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "tokens_per_step": tokens,
        "load_average_before_after": [load_before, load_after],
        "max_abs_loss_difference": diff,
        "losses": losses,
    }
    for side in ("before", "after"):
        result[side] = {
            "wall_s_per_step": wall[side],
            "cpu_s_per_step": cpu[side],
            "tokens_per_s_median": tokens / statistics.median(wall[side]),
            "cpu_s_per_step_median": statistics.median(cpu[side]),
        }
        if budget_rounds:
            result[side]["op_budget_ms_per_step"] = timers[side].by_category(budget_rounds)
    ratios = [b / a for b, a in zip(wall["before"], wall["after"])]
    result["speedup"] = {
        "tokens_per_s_medians": result["after"]["tokens_per_s_median"] / result["before"]["tokens_per_s_median"],
        "per_round_wall_ratio_median": statistics.median(ratios),
        "cpu_per_step_medians": result["before"]["cpu_s_per_step_median"] / result["after"]["cpu_s_per_step_median"],
    }
    print(f"load {load_before[0]:.2f} -> {load_after[0]:.2f}, {args.threads} thread(s), {args.rounds} rounds")
    for side in ("before", "after"):
        r = result[side]
        print(f"{side:6s} {r['tokens_per_s_median']:8.0f} tokens/s, {1e3 * r['cpu_s_per_step_median']:.0f} ms CPU/step")
    print("speed-up " + ", ".join(f"{k} {v:.3f}x" for k, v in result["speedup"].items()))
    print(f"losses over {len(losses['before'])} steps each: max |before - after| = {diff:.2e}")
    if budget_rounds:
        print(f"\n{'thread CPU ms per step':46s} {'before':>8s} {'after':>8s}")
        for name in result["before"]["op_budget_ms_per_step"]:
            b, a = (result[s]["op_budget_ms_per_step"][name] for s in ("before", "after"))
            print(f"{name:46s} {b:8.1f} {a:8.1f}")
        totals = [sum(result[s]["op_budget_ms_per_step"].values()) for s in ("before", "after")]
        print(f"{'total':46s} {totals[0]:8.1f} {totals[1]:8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
