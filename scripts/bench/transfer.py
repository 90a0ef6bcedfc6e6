"""Does pre-training transfer? The demo's protocol over seeds, label budgets and the paper's ablation.

    python scripts/bench/transfer.py                          # CPU-sized: seeds 0 1 2, 8 and all labels per class
    python scripts/bench/transfer.py --labels 2 4 8 all --seeds 0 1 2 3 4
    python scripts/bench/transfer.py --budget long            # on a GPU: the demo's `long` corpus and model

For each seed S the demo's data stages run once (`vimpac demo --seed S`: synthetic corpus, VQ-VAE tokenizer with
the validation videos held out, code databases). Then, on those codes:
  pre-training   one run per variant: both losses (MLM + CL, the paper's default), masked tokens only
                 (--nce-weight 0), contrastive only (--mlm-weight 0); the same schedule for all
  probes         `vimpac probe` on every pre-trained model and on the same architecture at random
                 initialisation: linear probe and kNN on frozen CLS and mean-pooled features
  fine-tuning    every variant and a model from scratch, with N labeled training videos per class for each N of
                 --labels (`--labels-per-class`, the same subset for every variant), evaluated on the held-out
                 validation videos with multi-view testing (top-1 at the largest K of the budget)
Everything goes under --work (the per-seed run directories are caches: a rerun skips finished runs). The results
go to --out as JSON (every number, the settings, the machine), a markdown table (mean ± std over seeds per
variant and label budget, and the probe accuracies) and a plot (top-1 against labels per class, one line per
variant, chance dashed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vimpac.bench_env import environment
from vimpac.commands import probe as probe_command
from vimpac.commands.demo import (
    BUDGETS,
    DemoPaths,
    Stages,
    finetune_flags,
    launch,
    make_data,
    model_flags,
    pretrain_flags,
    probe_flags,
    run_command,
)

# Pre-training variants: the paper's ablation (Table 7), as extra trainer flags.
VARIANTS = {"mlm+cl": [], "mlm": ["--nce-weight", "0"], "cl": ["--mlm-weight", "0"]}
SCRATCH = "scratch"


def parse_labels(values: list[str]) -> list[int | None]:
    """'all' → None (every training video), else a positive count per class."""
    out: list[int | None] = []
    for value in values:
        if value == "all":
            out.append(None)
        elif value.isdigit() and int(value) > 0:
            out.append(int(value))
        else:
            raise SystemExit(f"--labels: {value!r} is neither a positive count nor 'all'")
    return out


def label_name(labels: int | None) -> str:
    return "all" if labels is None else str(labels)


def scratch_name(lr: float | None) -> str:
    """The from-scratch row: at the budget's fine-tuning learning rate, or at its own (--scratch-lr)."""
    return SCRATCH if lr is None else f"{SCRATCH} (lr {lr:g})"


def pretrain_run(paths: DemoPaths, variant: str) -> tuple[Path, str]:
    """(run directory, stage name) of a variant's pre-training. MLM + CL is the demo's own run, so a
    `vimpac demo --seed S --out WORK/seedS` directory already holds it (and the data)."""
    if variant == "mlm+cl":
        return paths.training("pretrain"), "pretrain"
    return paths.run / f"pretrain_{variant}", f"pretrain:{variant}"


def final_top1(run_dir: Path) -> dict[str, Any]:
    """Top-1 of a finished fine-tuning run at the largest K of its final evaluation."""
    records = [json.loads(p.read_text()) for p in (run_dir / "eval").glob("final_clips*.json")]
    if not records:
        raise RuntimeError(f"{run_dir} has no final evaluation; see its log")
    best = max(records, key=lambda r: r["num_test_clips"])
    return {"top1": best["top1"], "num_test_clips": best["num_test_clips"], "num_videos": best["num_videos"]}


def run_seed(args: argparse.Namespace, seed: int, labels: list[int | None]) -> list[dict[str, Any]]:
    """Every run of one seed; returns one row per (variant, label budget) and per probed model."""
    budget = BUDGETS[args.budget]
    paths = DemoPaths(args.work / f"seed{seed}")
    paths.run.mkdir(parents=True, exist_ok=True)
    stages = Stages(paths, args.budget, budget, seed)
    make_data(paths, budget, stages, args.device, args.workers, seed)
    rows: list[dict[str, Any]] = []

    for variant in args.variants:
        if variant == SCRATCH:
            continue
        run_dir, stage = pretrain_run(paths, variant)
        if stages.needed(stage):
            started = time.perf_counter()
            flags = [*pretrain_flags(paths, budget, args.device, args.ranks, seed), *VARIANTS[variant]]
            launch("vimpac.pretrain", flags, args.ranks, run_dir, paths.log(run_dir.name), args.device)
            stages.mark(stage, {"seconds": time.perf_counter() - started})
        out = paths.run / f"probe_{variant}.json"
        if stages.needed(f"probe:{variant}"):
            flags = probe_flags(paths, budget, run_dir, seed, out)
            run_command(probe_command.register, ["probe", *flags, "--device", args.device])
            stages.mark(f"probe:{variant}", {"result": str(out)})
        rows.append({"seed": seed, "variant": variant, "probe": json.loads(out.read_text())})

    for variant in args.variants:
        own_lr = args.scratch_lr if variant == SCRATCH else None
        for n in labels:
            tag = variant if own_lr is None else f"{variant}_lr{own_lr:g}"
            name = f"finetune_{tag}_{label_name(n)}"
            run_dir = paths.run / name
            if stages.needed(name):
                started = time.perf_counter()
                if variant == SCRATCH:
                    source = [*model_flags(budget), *([] if own_lr is None else ["--lr", str(own_lr)])]
                else:
                    source = ["--load", str(pretrain_run(paths, variant)[0] / "export")]
                flags = [*finetune_flags(paths, budget, args.device, args.ranks, seed, n), *source]
                launch("vimpac.finetune", flags, args.ranks, run_dir, paths.log(name), args.device)
                stages.mark(name, {"seconds": time.perf_counter() - started})
            shown = scratch_name(own_lr) if variant == SCRATCH else variant
            rows.append({"seed": seed, "variant": shown, "labels": label_name(n), **final_top1(run_dir)})
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def probe_numbers(row: dict[str, Any]) -> dict[str, float]:
    """{'pretrained linear cls': acc, ...} flattened from a `vimpac probe` JSON."""
    out = {}
    for model, by_feature in row["probe"]["results"].items():
        for feature, by_classifier in by_feature.items():
            for classifier, value in by_classifier.items():
                out[f"{model} {classifier} {feature}"] = float(value["accuracy"] if isinstance(value, dict) else value)
    return out


def markdown(rows: list[dict[str, Any]], labels: list[int | None], variants: list[str], chance: float) -> str:
    """The fine-tuning table (variant × label budget, mean ± std over seeds) and the probe table."""
    names = [label_name(n) for n in labels]
    lines = ["| variant | " + " | ".join(f"{n} labels/class" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for variant in variants:
        cells = []
        for n in names:
            values = [r["top1"] for r in rows if r["variant"] == variant and r.get("labels") == n]
            cells.append(mean_std(values))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append(f"\nFine-tuning top-1 on the held-out videos (chance {chance:.3f}), mean ± std over seeds.\n")
    probes = [r for r in rows if "probe" in r]
    if probes:
        keys = sorted({k for r in probes for k in probe_numbers(r)})
        lines.append("| pre-training | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for variant in variants:
            chosen = [probe_numbers(r) for r in probes if r["variant"] == variant]
            if chosen:
                cells = [mean_std([c[k] for c in chosen if k in c]) for k in keys]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("\nFrozen-feature probes (`vimpac probe`), mean ± std over seeds; 'random' is the same")
        lines.append("architecture at random initialisation.\n")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], labels: list[int | None], variants: list[str], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [label_name(n) for n in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in variants:
        means, stds = [], []
        for n in names:
            values = [r["top1"] for r in rows if r["variant"] == variant and r.get("labels") == n]
            means.append(statistics.mean(values) if values else float("nan"))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(range(len(names)), means, yerr=stds, marker="o", capsize=3, label=variant)
    ax.axhline(chance, linestyle="--", color="grey", label="chance")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("labeled training videos per class")
    ax.set_ylabel("top-1 on held-out videos")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=("default", "long"), default="default", help="the demo budget to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (each: its own corpus too)")
    parser.add_argument("--labels", nargs="+", default=["8", "all"], help="labeled videos per class, or 'all'")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[*VARIANTS, SCRATCH],
        choices=[*VARIANTS, SCRATCH],
        help="pre-training variants to compare (default: all four)",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench_transfer"), help="run directories (cache)")
    parser.add_argument("--out", type=Path, default=None, help="result stem (default benchmarks/transfer_<budget>)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--ranks", type=int, default=None, help="training processes (default: 2 on CPU, 1 on GPU)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    parser.add_argument(
        "--scratch-lr",
        type=float,
        default=None,
        help="fine-tuning learning rate of the from-scratch model (default: the budget's, as the pre-trained ones)",
    )
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.ranks = args.ranks or (1 if args.device == "cuda" else 2)
    device_name = "cpu" if args.device == "cpu" else "gpu"
    out = args.out or Path("benchmarks") / f"transfer_{args.budget}_{device_name}"
    labels = parse_labels(args.labels)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows += run_seed(args, seed, labels)
        write_results(args, out, labels, rows, time.perf_counter() - started)  # a crash keeps finished seeds
    print(markdown(rows, labels, shown_variants(args), chance_of(args.budget)))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def shown_variants(args: argparse.Namespace) -> list[str]:
    return [scratch_name(args.scratch_lr) if v == SCRATCH else v for v in args.variants]


def chance_of(budget_name: str) -> float:
    budget = BUDGETS[budget_name]
    return 1.0 / (len(budget.classes) if budget.classes else 16)


def write_results(
    args: argparse.Namespace, out: Path, labels: list[int | None], rows: list[dict[str, Any]], seconds: float
) -> None:
    """JSON (every row, the settings, the machine), markdown table and plot of the rows so far."""
    chance = chance_of(args.budget)
    result = {
        "settings": {**vars(args), "work": str(args.work), "out": str(out), "labels": args.labels},
        "budget": {"name": args.budget, **json.loads(json.dumps(BUDGETS[args.budget].__dict__))},
        "chance_top1": chance,
        "rows": rows,
        "seconds": round(seconds, 1),
        "environment": environment(torch.device(args.device)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows, labels, shown_variants(args), chance)
    seeds = sorted({row["seed"] for row in rows})
    title = f"# Transfer benchmark ({args.budget} budget, {args.device}, seeds {', '.join(map(str, seeds))})"
    out.with_suffix(".md").write_text(f"{title}\n\n{table}\n")
    plot(rows, labels, shown_variants(args), chance, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
