"""`vimpac demo`: the whole pipeline on the embedded default (a synthetic corpus), with no download and no GPU.

Stages run in order into one run directory, which is also the cache: a stage whose output is complete is skipped
on rerun (`--fresh` redoes everything). Today the demo covers tokenization — synthetic corpus, tokenizer
training, code databases for pre-training (unlabeled, centre view) and for fine-tuning (labeled, training and test
views) — and prints what each database holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

SIZES = {
    # tiny: for the test suite (well under a minute); default: the README's first command on 2 CPU cores
    "tiny": dict(per_class=1, val_per_class=1, unlabeled=1, unlabeled_seconds=8.0, tok_steps=30, pool=128),
    "default": dict(per_class=8, val_per_class=2, unlabeled=3, unlabeled_seconds=30.0, tok_steps=600, pool=2048),
}


@dataclass(frozen=True)
class DemoPaths:
    run: Path

    @property
    def corpus(self) -> Path:
        return self.run / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.run / "tokenizer"

    def db(self, name: str) -> Path:
        return self.run / "codes" / name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on a synthetic corpus (no download, CPU is fine)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="corpus and training budget")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first and redo every stage")
    p.set_defaults(func=run)


def _done(paths: DemoPaths) -> dict:
    marker = paths.run / "stages.json"
    return json.loads(marker.read_text()) if marker.exists() else {}


def _mark(paths: DemoPaths, stage: str, info: dict) -> None:
    done = _done(paths)
    done[stage] = info
    tmp = paths.run / ".stages.json.tmp"
    tmp.write_text(json.dumps(done, indent=2) + "\n")
    tmp.replace(paths.run / "stages.json")


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from vimpac.code_db import inspect
    from vimpac.tokenization.extract import ExtractConfig, extract
    from vimpac.tokenization.synth import SynthConfig, generate
    from vimpac.tokenization.train_vqvae import TrainSettings, train_from_videos
    from vimpac.tokenization.vqvae import VQVAEConfig

    size = SIZES[args.size]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = args.workers or os.cpu_count() or 1
    paths = DemoPaths(args.out)
    if args.fresh and paths.run.exists():
        shutil.rmtree(paths.run)
    paths.run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = _done(paths)

    def stage(name: str) -> bool:
        if name in done:
            print(f"[{name}] already done (see {paths.run / 'stages.json'}); --fresh redoes it")
            return False
        print(f"[{name}] ...")
        return True

    if stage("synth"):
        generate(
            SynthConfig(
                out=paths.corpus,
                train_per_class=size["per_class"],
                val_per_class=size["val_per_class"],
                unlabeled=size["unlabeled"],
                unlabeled_seconds=size["unlabeled_seconds"],
                workers=workers,
            )
        )
        _mark(paths, "synth", {"corpus": str(paths.corpus)})

    if stage("tokenizer"):
        settings = TrainSettings(
            model=VQVAEConfig(vocab_size=512), steps=size["tok_steps"], pool_size=size["pool"], device=device
        )
        result = train_from_videos(paths.corpus, paths.tokenizer, settings, log=print)
        _mark(
            paths,
            "tokenizer",
            {"psnr_db": result.psnr, "baseline_psnr_db": result.baseline_psnr, "codes_used": result.used_fraction},
        )

    labeled = sorted(paths.corpus.glob("something-something-v2-*.json"))
    databases = {
        # pre-training reads long unlabeled videos at 2 fps, one view (as HowTo100M in the paper)
        "unlabeled_f128_fps2": dict(
            videos=paths.corpus / "unlabeled" / "videos",
            format="howto100m",
            annotations=[paths.corpus / "unlabeled" / "HowTo100M_v1.csv"],
            fps=2.0,
            views="center",
        ),
        # fine-tuning: the labeled part at 4 fps, training views (6: ssv2 has no flips) and test views
        "labeled_f128_fps4_train": dict(
            videos=paths.corpus / "videos", format="ssv2", annotations=labeled, fps=4.0, views="train"
        ),
        "labeled_f128_fps4_test": dict(
            videos=paths.corpus / "videos", format="ssv2", annotations=labeled, fps=4.0, views="test"
        ),
    }
    for name, spec in databases.items():
        if stage(f"tokenize:{name}"):
            summary = extract(
                ExtractConfig(
                    tokenizer=str(paths.tokenizer),
                    out=paths.db(name),
                    frame_size=128,
                    workers=workers,
                    device=device,
                    **spec,
                )
            )
            _mark(paths, f"tokenize:{name}", {"videos": summary.total_videos, "failures": summary.total_failures})

    print(f"\nvimpac demo: done in {time.perf_counter() - started:.0f} s — run directory {paths.run}")
    tok = _done(paths)["tokenizer"]
    print(
        f"  tokenizer   {paths.tokenizer}: held-out PSNR {tok['psnr_db']:.1f} dB "
        f"(flat mean colour {tok['baseline_psnr_db']:.1f} dB), {100 * tok['codes_used']:.0f}% of codes used"
    )
    for name in databases:
        report = inspect(paths.db(name), sample=20)
        counts = report["counts"]
        print(
            f"  database    {paths.db(name)}: {counts['videos']} videos, {counts['frames']} frames, "
            f"{len(report['manifest']['views'])} views, {counts['failures']['total']} failures, "
            f"check {'ok' if report['ok'] else 'FAILED'}"
        )
    print(f"next: vimpac db inspect {paths.db('labeled_f128_fps4_test')}")
    return 0
