"""`vimpac demo`: the whole pipeline on the embedded default (a synthetic corpus), with no download.

Stages, in order, into one run directory (which is also the cache: a finished stage is skipped on rerun, an
interrupted training resumes from its last checkpoint, `--fresh` redoes everything):

  synth        real H.264 videos: labeled motion classes (SSV2 layout) [+ long unlabeled videos (HowTo100M layout)]
  tokenizer    a VQ-VAE trained on frames of the corpus
  tokenize     code databases: labeled training views and test views [+ unlabeled, centre view]
  pretrain     masked-token + contrastive pre-training under the DeepSpeed launcher (2 CPU ranks, or the GPU) on
               the training videos without their labels (default) or on the long unlabeled videos (tiny, long)
  finetune     the pre-trained model and, as the baseline, the same model from scratch, with multi-view testing
  report       held-out masked-token accuracy against two baselines, contrastive accuracy, top-1 of both
  pictures     reconstructions / masked blocks / predictions of a held-out video (PNG + GIF), the curves, and
               held-out videos beside their nearest neighbours by the pre-trained CLS feature

Budgets: `default` fits in about 10 minutes on 2 CPU cores; `long` is sized for one GPU (a larger corpus, model
and schedule, all 16 classes at 128 px); `tiny` is the test suite's one-minute smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from vimpac.atomic_write import write_json_atomic

REPO = Path(__file__).resolve().parents[2]
# Classes whose motion lasts the whole video, so any temporal crop shows it, and that stay visible at 64 px
# (rotation of a few-pixel object, or an appearance half-way through, would make crops ambiguous).
MOTION_CLASSES = ("right", "left", "down", "up", "grow", "shrink")


# Process settings for CPU training ranks (a user's own values win).
CPU_TRAINING_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": "1000000000",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
}


@dataclass(frozen=True)
class Budget:
    """Everything the demo's size decides. Frame sizes in pixels, rates in frames per second."""

    # corpus
    classes: tuple[str, ...] | None  # None: every synthetic class
    train_per_class: int
    val_per_class: int
    unlabeled: int
    unlabeled_seconds: float
    video_size: tuple[int, int]
    calm: bool  # labeled clips without background drift and distractors (SynthConfig.calm)
    object_scale: float  # every object's size × this (SynthConfig.object_scale)
    smooth_background: bool  # soft, low-contrast backgrounds (SynthConfig.smooth_background)
    looks: int | None  # labeled clips share this many looks (SynthConfig.looks); None: each its own
    # tokenizer and code databases
    vocab_size: int
    tokenizer_steps: int
    tokenizer_crop: int
    frame_size: int
    fps: float  # of the code databases
    frame_rate: float  # of the training clips (a divisor of fps): clip_len frames span clip_len / frame_rate s
    # model
    layers: int
    hid_dim: int
    heads: int
    clip_len: int
    # pre-training and fine-tuning
    pretrain_data: str  # "unlabeled" (long videos, HowTo100M's role) or "labeled_train" (train split, labels unused)
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_epochs: int
    finetune_batch: int
    finetune_lr: float
    labels_per_class: int | None  # labeled training videos per class fine-tuning sees (None: all of them)
    test_clips: str  # the K of the final multi-view evaluation

    @property
    def probe_clips(self) -> int:
        """Clips per video of the frozen-feature probes: the largest K of the final evaluation, so a video's
        feature averages the very clips fine-tuning's K-clip test sees."""
        return max(int(k) for k in self.test_clips.split(","))


BUDGETS = {
    "tiny": Budget(
        classes=MOTION_CLASSES[:4],
        train_per_class=2,
        val_per_class=1,
        unlabeled=4,
        unlabeled_seconds=6.0,
        video_size=(64, 80),
        calm=True,
        smooth_background=True,
        looks=None,
        object_scale=1.5,
        vocab_size=64,
        tokenizer_steps=20,
        tokenizer_crop=32,
        frame_size=32,
        fps=4.0,
        frame_rate=4.0,
        layers=1,
        hid_dim=32,
        heads=2,
        clip_len=3,
        pretrain_data="unlabeled",
        pretrain_epochs=2,
        pretrain_batch=4,
        pretrain_lr=1e-3,
        finetune_epochs=2,
        finetune_batch=4,
        finetune_lr=1e-3,
        labels_per_class=None,
        test_clips="1,2",
    ),
    "default": Budget(
        classes=MOTION_CLASSES,
        train_per_class=32,
        val_per_class=16,
        unlabeled=0,
        unlabeled_seconds=20.0,
        video_size=(96, 112),
        calm=True,
        smooth_background=True,
        looks=4,
        object_scale=1.5,
        vocab_size=256,
        tokenizer_steps=1200,
        tokenizer_crop=32,
        frame_size=64,
        fps=4.0,
        frame_rate=2.0,
        layers=2,
        hid_dim=128,
        heads=2,
        clip_len=5,
        pretrain_data="labeled_train",
        pretrain_epochs=50,
        pretrain_batch=16,
        pretrain_lr=2e-3,  # 1e-3 plateaus by epoch 15 (development seeds 5, 6: benchmarks/README.md)
        finetune_epochs=60,
        finetune_batch=8,
        finetune_lr=1e-3,
        labels_per_class=8,
        test_clips="1,3",
    ),
    "long": Budget(
        classes=None,
        train_per_class=48,
        val_per_class=8,
        unlabeled=64,
        unlabeled_seconds=30.0,
        video_size=(160, 192),
        calm=False,
        smooth_background=False,
        looks=None,
        object_scale=1.0,
        vocab_size=512,
        tokenizer_steps=1500,
        tokenizer_crop=64,
        frame_size=128,
        fps=4.0,
        frame_rate=2.0,
        layers=4,
        hid_dim=256,
        heads=4,
        clip_len=5,
        pretrain_data="unlabeled",
        pretrain_epochs=400,
        pretrain_batch=64,
        pretrain_lr=1e-3,
        finetune_epochs=30,
        finetune_batch=32,
        finetune_lr=5e-4,
        labels_per_class=None,
        test_clips="1,3,5",
    ),
}


@dataclass(frozen=True)
class DemoPaths:
    """The run directory's layout (`vimpac visualize --run` reads the same names)."""

    run: Path

    @property
    def corpus(self) -> Path:
        return self.run / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.run / "tokenizer"

    def db(self, name: str) -> Path:
        return self.run / "codes" / name

    def training(self, name: str) -> Path:
        return self.run / name

    def log(self, name: str) -> Path:
        return self.run / "logs" / f"{name}.log"

    @property
    def pictures(self) -> Path:
        return self.run / "pictures"

    @property
    def report(self) -> Path:
        return self.run / "report.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a synthetic corpus (no download; CPU is fine)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default", help="corpus and training budget")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    p.add_argument("--ranks", type=int, default=None, help="training processes (default: 2 on CPU, 1 on a GPU)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of everything random: the corpus, the tokenizer, pre-training, fine-tuning and the probes (0). "
        "Results that hold only for one seed prove nothing: compare a few",
    )
    p.add_argument("--fresh", action="store_true", help="delete the run directory first and redo every stage")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ stages


class Stages:
    """stages.json: what is finished, with each stage's summary. A stage is recorded only after it completed."""

    def __init__(self, paths: DemoPaths, budget_name: str, budget: Budget, seed: int) -> None:
        self.path = paths.run / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}
        wanted = json.loads(json.dumps({"name": budget_name, "seed": seed, **asdict(budget)}))  # tuples as lists
        recorded = self.done.get("budget")
        if recorded is not None and recorded != wanted:
            from vimpac.errors import UsageError

            raise UsageError(
                f"{paths.run} was made with other settings (budget {recorded['name']!r} as it was then, seed "
                f"{recorded.get('seed', 0)}); pass --fresh to redo it with the {budget_name!r} budget and seed {seed}, "
                "or choose another --out"
            )
        self.done["budget"] = wanted

    def needed(self, name: str) -> bool:
        if name in self.done:
            print(f"[{name}] done earlier (--fresh redoes it)")
            return False
        print(f"[{name}] ...", flush=True)
        return True

    def mark(self, name: str, info: dict) -> None:
        self.done[name] = info
        write_json_atomic(self.path, self.done)


def launch(module: str, flags: list[str], ranks: int, run_dir: Path, log: Path, device: str) -> None:
    """Run `module` (vimpac.pretrain or vimpac.finetune) under the DeepSpeed launcher (`--module`: the installed
    package, not a path in a checkout) with `ranks` processes, its output in `log`, and show a progress bar from
    the run's metrics.jsonl. Resumes the run when it already holds a checkpoint."""
    from tqdm import tqdm

    from vimpac.checkpoint import latest_tag
    from vimpac.dist_setup import free_port
    from vimpac.errors import UsageError

    if latest_tag(run_dir) is not None:
        flags = [*flags, "--resume"]
    # The launcher as a module of this interpreter, not the `deepspeed` script: that script sits wherever pip put
    # it (a venv's bin/, ~/.local/bin, a --target directory's bin/), not necessarily beside sys.executable.
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    command = [*launcher, "--num_gpus", str(ranks), "--master_port", str(free_port())]
    command += ["--module", module, *flags, "--output", str(run_dir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
        # Measured at the demo's size (benchmarks/README.md): spinning OpenMP threads starve the other rank, and
        # glibc returning freed activations to the OS costs thousands of page faults per step.
        for name, value in CPU_TRAINING_ENV.items():
            env.setdefault(name, value)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n\n")
        out.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        bar = tqdm(desc=f"  {run_dir.name}", unit="step", leave=True, dynamic_ncols=True)
        try:
            while process.poll() is None:
                time.sleep(1.0)
                _update_bar(bar, run_dir)
            _update_bar(bar, run_dir)
        finally:
            bar.close()
            if process.poll() is None:
                process.terminate()
                process.wait()
    if process.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise UsageError(f"{module} failed (exit {process.returncode}); the end of {log}:\n" + "\n".join(tail))


def _update_bar(bar, run_dir: Path) -> None:
    from vimpac.metrics import read_metrics

    if bar.total is None and (run_dir / "run_config.json").exists():
        bar.total = json.loads((run_dir / "run_config.json").read_text()).get("total_steps")
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    if records:
        step = max(records)
        bar.n = step
        last = records[step]
        losses = ("loss/mlm", "loss/nce", "loss/train")
        bar.set_postfix({k.split("/")[-1]: f"{last[k]:.3f}" for k in losses if k in last})
        bar.refresh()


def run_command(register: Callable, argv: list[str]) -> int:
    """Run another `vimpac` subcommand in this process, parsed by its own parser (as from the command line)."""
    parser = argparse.ArgumentParser(prog="vimpac")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def run(args: argparse.Namespace) -> int:
    import torch

    from vimpac.errors import UsageError, require_directory

    require_directory(args.out, "--out")
    budget = BUDGETS[args.budget]
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: seeds are non-negative integers (0, 1, 2, ...)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; leave --device out to use the CPU")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ranks = args.ranks or (1 if device == "cuda" else 2)
    batches = (budget.pretrain_batch, budget.finetune_batch)
    if ranks < 1 or any(batch % ranks for batch in batches):
        # checked now, not after the data stages: every rank takes the same share of each batch
        raise UsageError(
            f"--ranks {ranks}: the {args.budget} budget's batches ({' and '.join(map(str, batches))} videos) must "
            f"split evenly over the ranks; choose one of {[r for r in range(1, 9) if all(b % r == 0 for b in batches)]}"
        )
    workers = args.workers or os.cpu_count() or 1
    paths = DemoPaths(args.out)
    if args.fresh and paths.run.exists():
        shutil.rmtree(paths.run)
    paths.run.mkdir(parents=True, exist_ok=True)
    stages = Stages(paths, args.budget, budget, args.seed)
    started = time.perf_counter()
    print(f"vimpac demo ({args.budget} budget, seed {args.seed}) on {device} into {paths.run}", flush=True)

    make_data(paths, budget, stages, device, workers, args.seed)
    train_models(paths, budget, stages, device, ranks, args.seed)
    report = make_report(paths, budget, stages, device, args.seed)
    print_report(paths, report, time.perf_counter() - started)
    return 0


def make_data(paths: DemoPaths, budget: Budget, stages: Stages, device: str, workers: int, seed: int) -> None:
    from vimpac.tokenization.extract import ExtractConfig, extract
    from vimpac.tokenization.fidelity import measure_subject_fidelity, synth_holdout
    from vimpac.tokenization.synth import SynthConfig, generate
    from vimpac.tokenization.tokenizer import load_tokenizer
    from vimpac.tokenization.train_vqvae import TrainSettings, train_from_videos
    from vimpac.tokenization.vqvae import VQVAEConfig

    if stages.needed("synth"):
        generate(
            SynthConfig(
                out=paths.corpus,
                seed=seed,
                classes=budget.classes,
                train_per_class=budget.train_per_class,
                val_per_class=budget.val_per_class,
                unlabeled=budget.unlabeled,
                unlabeled_seconds=budget.unlabeled_seconds,
                size=budget.video_size,
                calm=budget.calm,
                object_scale=budget.object_scale,
                smooth_background=budget.smooth_background,
                looks=budget.looks,
                workers=workers,
            )
        )
        stages.mark("synth", {"corpus": str(paths.corpus)})

    if stages.needed("tokenizer"):
        settings = TrainSettings(
            model=VQVAEConfig(vocab_size=budget.vocab_size),
            steps=budget.tokenizer_steps,
            frame_size=budget.frame_size,
            crop_size=budget.tokenizer_crop,
            fps=budget.fps,
            seed=seed,
            device=device,
        )
        # The validation videos stay unseen, so the object-fidelity numbers are held-out ones.
        holdout = synth_holdout(paths.corpus)
        result = train_from_videos(paths.corpus, paths.tokenizer, settings, log=print, exclude=holdout.files)
        tokenizer = load_tokenizer(paths.tokenizer, device=device)
        fidelity = measure_subject_fidelity(tokenizer, paths.corpus, budget.frame_size, budget.fps, holdout.videos)
        stages.mark(
            "tokenizer",
            {
                "psnr_db": result.psnr,
                "baseline_psnr_db": result.baseline_psnr,
                "codes_used": result.used_fraction,
                "objects": fidelity.to_dict(),
            },
        )

    labeled = sorted(paths.corpus.glob("something-something-v2-*.json"))
    databases = {
        # pre-training reads the long unlabeled videos (HowTo100M's role in the paper), one view
        "unlabeled": dict(
            videos=paths.corpus / "unlabeled" / "videos",
            format="howto100m",
            annotations=[paths.corpus / "unlabeled" / "HowTo100M_v1.csv"],
            views="center",
        ),
        # fine-tuning: training views (6: SSV2 has no flips) and test views (3 crops) of the labeled part
        "labeled_train": dict(videos=paths.corpus / "videos", format="ssv2", annotations=labeled, views="train"),
        "labeled_test": dict(videos=paths.corpus / "videos", format="ssv2", annotations=labeled, views="test"),
    }
    if budget.pretrain_data != "unlabeled":
        del databases["unlabeled"]
    for name, spec in databases.items():
        if stages.needed(f"tokenize:{name}"):
            config = ExtractConfig(
                tokenizer=str(paths.tokenizer),
                out=paths.db(name),
                fps=budget.fps,
                frame_size=budget.frame_size,
                workers=workers,
                device=device,
                **spec,
            )
            summary = extract(config)
            stages.mark(f"tokenize:{name}", {"videos": summary.total_videos, "failures": summary.total_failures})


def model_flags(budget: Budget) -> list[str]:
    return [
        *("--layers", str(budget.layers), "--hid-dim", str(budget.hid_dim), "--heads", str(budget.heads)),
        *("--clip-len", str(budget.clip_len), "--frame-size", str(budget.frame_size)),
        *("--vocab-size", str(budget.vocab_size), "--nce-proj-hid-dim", str(4 * budget.hid_dim)),
    ]


def micro_batch(batch: int, ranks: int, largest: int = 8) -> int:
    """Videos per rank per micro-step: the largest divisor of batch / ranks up to `largest` (memory)."""
    per_rank = max(1, batch // ranks)
    return max(d for d in range(1, min(per_rank, largest) + 1) if per_rank % d == 0)


def engine_config(device: str, finetune: bool) -> str:
    """fp32 on CPU (fp16 is GPU-only); the paper's fp16 ZeRO-2 settings on a GPU."""
    if device == "cpu":
        return str(REPO / "ds_configs" / "cpu.json")
    return str(REPO / "ds_configs" / ("finetune_small.json" if finetune else "small.json"))


def pretrain_flags(paths: DemoPaths, budget: Budget, device: str, ranks: int, seed: int) -> list[str]:
    """Flags of the demo's pre-training run (vimpac/pretrain.py), without --output."""
    return [
        *("--deepspeed_config", engine_config(device, finetune=False)),
        *("--data", str(paths.db(budget.pretrain_data))),
        *model_flags(budget),
        *("--num-workers", "0", "--frame-rate", str(budget.frame_rate), "--seed", str(seed)),
        *("--epochs", str(budget.pretrain_epochs), "--batch-size", str(budget.pretrain_batch)),
        *("--bs-per-gpu", str(micro_batch(budget.pretrain_batch, ranks))),
        *("--lr", str(budget.pretrain_lr), "--warm-up", "0.05"),
        *("--save-epochs", str(max(1, budget.pretrain_epochs // 4))),
    ]


def finetune_flags(
    paths: DemoPaths, budget: Budget, device: str, ranks: int, seed: int, labels_per_class: int | None
) -> list[str]:
    """Flags of a demo fine-tuning run (vimpac/finetune.py) without --output and without the weights' source
    (--load EXPORT, or the model flags for a run from scratch). labels_per_class None: every training video."""
    flags = [
        *("--deepspeed_config", engine_config(device, finetune=True)),
        *("--data", str(paths.db("labeled_train")), "--eval-data", str(paths.db("labeled_test"))),
        *("--num-workers", "0", "--frame-rate", str(budget.frame_rate), "--seed", str(seed)),
        *("--epochs", str(budget.finetune_epochs), "--batch-size", str(budget.finetune_batch)),
        *("--bs-per-gpu", str(micro_batch(budget.finetune_batch, ranks))),
        *("--lr", str(budget.finetune_lr), "--beta2", "0.999", "--weight-decay", "0.01"),
        *("--eval-per-epochs", str(max(1, budget.finetune_epochs // 4)), "--last-test-clips", budget.test_clips),
        *("--save-epochs", str(max(1, budget.finetune_epochs // 4))),
    ]
    if labels_per_class is not None:
        flags += ["--labels-per-class", str(labels_per_class)]
    return flags


def probe_flags(paths: DemoPaths, budget: Budget, model: Path, seed: int, out: Path) -> list[str]:
    """Flags of `vimpac probe` on a demo's pre-trained run: fitted on the labeled training videos, scored on the
    held-out ones, each video's feature the mean over `budget.probe_clips` clips."""
    return [
        *("--model", str(model), "--data", str(paths.db("labeled_train"))),
        *("--eval-data", str(paths.db("labeled_test")), "--num-test-clips", str(budget.probe_clips)),
        *("--seed", str(seed), "--out", str(out)),
    ]


def train_models(paths: DemoPaths, budget: Budget, stages: Stages, device: str, ranks: int, seed: int) -> None:
    if stages.needed("pretrain"):
        started = time.perf_counter()
        flags = pretrain_flags(paths, budget, device, ranks, seed)
        launch("vimpac.pretrain", flags, ranks, paths.training("pretrain"), paths.log("pretrain"), device)
        stages.mark("pretrain", {"seconds": time.perf_counter() - started, "ranks": ranks})

    finetune = finetune_flags(paths, budget, device, ranks, seed, budget.labels_per_class)
    sources = {
        "finetune_pretrained": ["--load", str(paths.training("pretrain") / "export")],
        "finetune_scratch": model_flags(budget),
    }
    for name, source in sources.items():
        if stages.needed(name):
            started = time.perf_counter()
            launch("vimpac.finetune", [*finetune, *source], ranks, paths.training(name), paths.log(name), device)
            stages.mark(name, {"seconds": time.perf_counter() - started, "ranks": ranks})


def make_report(paths: DemoPaths, budget: Budget, stages: Stages, device: str, seed: int) -> dict:
    from vimpac.code_db import CodeDatabase
    from vimpac.commands import visualize
    from vimpac.metrics import read_metrics

    report: dict = {"budget": stages.done["budget"], "device": device, "stages": {}}
    for name, info in stages.done.items():
        if name != "budget":
            report["stages"][name] = info

    if stages.needed("pretrain-eval"):
        from vimpac.commands import pretrain_eval
        from vimpac.tokenization.views import centre_view

        out = paths.run / "pretrain_eval.json"
        test_db = CodeDatabase(paths.db("labeled_test"))
        flags = ["--model", str(paths.training("pretrain")), "--data", str(paths.db("labeled_test"))]
        flags += ["--split", "val", "--views", centre_view(test_db.views) or test_db.views[0], "--out", str(out)]
        flags += ["--batch-size", str(min(8, len(test_db.ids("val"))))]
        run_command(pretrain_eval.register, ["pretrain-eval", *flags, "--device", device])
        stages.mark("pretrain-eval", {"result": str(out)})
    report["pretraining"] = json.loads((paths.run / "pretrain_eval.json").read_text())
    last = read_metrics(paths.training("pretrain"))
    report["pretraining"]["final_training_step"] = last[max(last)] if last else None

    if stages.needed("probe"):
        from vimpac.commands import probe

        out = paths.run / "probe.json"
        flags = probe_flags(paths, budget, paths.training("pretrain"), seed, out)
        run_command(probe.register, ["probe", *flags, "--device", device])
        stages.mark("probe", {"result": str(out)})
    report["probe"] = json.loads((paths.run / "probe.json").read_text())

    report["finetuning"], report["finetuning_train_accuracy"] = {}, {}
    for name in ("finetune_pretrained", "finetune_scratch"):
        results = {}
        for path in sorted((paths.training(name) / "eval").glob("final_clips*.json")):
            record = json.loads(path.read_text())
            results[record["num_test_clips"]] = {
                key: record[key] for key in ("top1", "top5", "loss", "views", "views_per_video", "num_videos")
            }
        report["finetuning"][name] = results
        report["finetuning_train_accuracy"][name] = last_epoch_mean(read_metrics(paths.training(name)))
    db = CodeDatabase(paths.db("labeled_test"))
    report["chance_top1"] = 1.0 / len(db.manifest["classes"])

    if stages.needed("pictures"):
        video = db.ids("val")[0]
        flags = ["--run", str(paths.run), "--video", video, "--split", "val", "--device", device]
        run_command(visualize.register, ["visualize", *flags])
        stages.mark("pictures", {"video": video, "png": str(paths.pictures / f"{video}.png")})
    if stages.needed("pictures:retrieval"):
        stages.mark("pictures:retrieval", retrieval_picture(paths, device, budget.probe_clips))
    report["pictures"] = {
        "video": stages.done["pictures"]["video"],
        "png": str(paths.pictures / f"{stages.done['pictures']['video']}.png"),
        "gif": str(paths.pictures / f"{stages.done['pictures']['video']}.gif"),
        "curves": str(paths.pictures / "curves.png"),
        "retrieval": stages.done["pictures:retrieval"]["png"],
    }
    paths.report.write_text(json.dumps(report, indent=2) + "\n")
    return report


def retrieval_picture(paths: DemoPaths, device: str, num_clips: int, queries: int = 3, neighbours: int = 3) -> dict:
    """pictures/retrieval.png: a few held-out videos (one per class in turn) and their nearest held-out videos by
    the pre-trained model's CLS feature, the neighbours the probe stage's retrieval recall counts (the features of
    the probe stage: evaluation views, `num_clips` clips per video, the run's frame rate), each shown by its middle
    clip of the first view, decoded by the tokenizer."""
    import numpy as np

    from vimpac.checkpoint import export_folder
    from vimpac.code_db import CodeDatabase
    from vimpac.commands.probe import pretrained_backbone, recorded_frame_rate
    from vimpac.config import VimpacConfig
    from vimpac.finetune_data import FinetuneTestClips, evaluation_views, split_names
    from vimpac.probe import extract_features, nearest_neighbours, retrieval_queries
    from vimpac.tokenization.tokenizer import load_tokenizer
    from vimpac.visualize import clip_frames, decode_clip
    from vimpac.visualize import retrieval_picture as draw

    export = export_folder(paths.training("pretrain"))
    config = VimpacConfig.load(export / "config.json")
    db = CodeDatabase(paths.db("labeled_test"))
    dataset = db.manifest.get("dataset")
    clips = FinetuneTestClips(
        db,
        split_names(dataset)[1],
        config.clip_len,
        pad_id=config.pad_id,
        views=evaluation_views(db.views, dataset, db.manifest.get("frame_size")),
        num_clips=num_clips,
        frame_rate=recorded_frame_rate(export)[0],
    )
    backbone = pretrained_backbone(export, config).to(device)
    cls, _ = extract_features(backbone, clips, pad_id=config.pad_id, device=device)
    index, similarity = nearest_neighbours(cls, neighbours)
    rows = retrieval_queries(clips.labels, queries)
    tokenizer = load_tokenizer(paths.tokenizer, device=device)

    def frames(video: int) -> np.ndarray:  # clips are view-major: the first view's (SSV2: the only one) middle clip
        return clip_frames(decode_clip(tokenizer, clips[video]["tokens"][num_clips // 2].numpy()))

    image = draw(
        np.stack([frames(q) for q in rows]),
        np.stack([np.stack([frames(int(n)) for n in index[q]]) for q in rows]),
        clips.labels[rows].numpy(),
        clips.labels[index[rows]].numpy(),
        similarity[rows].numpy(),
        clips.class_names,
        title=f"held-out videos and their {index.shape[1]} nearest by the pre-trained CLS feature (cosine); "
        "green: same class, red: another",
    )
    path = paths.pictures / "retrieval.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return {
        "png": str(path),
        "queries": [clips.ids[q] for q in rows],
        "neighbours": [[clips.ids[int(n)] for n in index[q]] for q in rows],
    }


def last_epoch_mean(records: dict[int, dict], key: str = "accuracy/train") -> float | None:
    """Mean of `key` over the optimizer steps of the last epoch of a run's metrics (None without records)."""
    if not records:
        return None
    epoch = records[max(records)]["epoch"]
    values = [r[key] for r in records.values() if r.get("epoch") == epoch and key in r]
    return sum(values) / len(values) if values else None


def print_report(paths: DemoPaths, report: dict, seconds: float) -> None:
    from vimpac.pretrain_eval import format_report

    stages = report["stages"]
    tok = stages["tokenizer"]
    print(f"\nvimpac demo: done in {seconds:.0f} s ({report['budget']['name']} budget, {report['device']})")
    print(f"run directory  {paths.run}   (report: {paths.report})")
    print(
        f"tokenizer      {paths.tokenizer}: held-out PSNR {tok['psnr_db']:.1f} dB (flat mean colour "
        f"{tok['baseline_psnr_db']:.1f} dB), {100 * tok['codes_used']:.0f}% of codes used"
    )
    objects = tok["objects"]
    print(
        f"  inside the moving objects of {objects['videos']} unseen videos: {objects['subject_psnr']:.1f} dB (flat "
        f"{objects['flat_subject_psnr']:.1f} dB, {objects['subject_psnr'] - objects['flat_subject_psnr']:+.1f}); "
        f"{100 * objects['subject_kept']:.0f}% of object pixels look like the object"
    )
    for name in ("unlabeled", "labeled_train", "labeled_test"):
        info = stages.get(f"tokenize:{name}")
        if info is None:
            continue
        print(f"code database  {paths.db(name)}: {info['videos']} videos, {info['failures']} failures")
    print(f"pre-training   {paths.training('pretrain')} ({stages['pretrain']['seconds']:.0f} s)")
    print("held-out pre-training objectives (validation videos, centre view):")
    print("  " + format_report(report["pretraining"]).replace("\n", "\n  "))
    from vimpac.probe import format_table

    probe = report["probe"]
    print(
        f"frozen-feature probes, top-1 (fitted on {probe['train_videos']} training videos, scored on "
        f"{probe['eval_videos']} held-out, {probe['settings']['num_test_clips']} clips per video; "
        f"chance {probe['chance']:.3f}):"
    )
    print("  " + format_table(probe["results"], probe["settings"]["k"]).replace("\n", "\n  "))
    labels = report["budget"]["labels_per_class"]
    subset = f"{labels} labeled videos per class" if labels is not None else "every labeled training video"
    print(f"fine-tuning on {subset}, top-1 on held-out videos (chance {report['chance_top1']:.3f}):")
    pre, scratch = report["finetuning"]["finetune_pretrained"], report["finetuning"]["finetune_scratch"]
    for k in sorted(pre, key=int):
        views = pre[k]["views_per_video"]
        line = f"  K={k} ({views} views/video): pre-trained {pre[k]['top1']:.3f}"
        if k in scratch:
            line += f" | from scratch {scratch[k]['top1']:.3f}"
        print(line)
    train = report["finetuning_train_accuracy"]
    if None not in train.values():
        line = f"  last-epoch training accuracy: pre-trained {train['finetune_pretrained']:.3f}"
        line += f" | from scratch {train['finetune_scratch']:.3f}"
        if max(train.values()) > 2 * max(r["top1"] for r in pre.values()):
            line += " (far above top-1: the small labeled set is memorised rather than generalised)"
        print(line)
    print(f"  runs: {paths.training('finetune_pretrained')}, {paths.training('finetune_scratch')}")
    pictures = report["pictures"]
    print(f"pictures       {pictures['png']} (+ .gif): reconstruction / masked / predicted")
    print(f"curves         {pictures['curves']}")
    print(f"retrieval      {pictures['retrieval']}: held-out videos and their nearest by the pre-trained CLS feature")
    print(f"tensorboard    tensorboard --logdir {paths.run}")
