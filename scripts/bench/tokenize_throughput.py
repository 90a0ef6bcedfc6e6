"""Benchmark the tokenization stage on the synthetic corpus.

Measures (1) single-process decode rate: frames/s of `iter_view_frames` (PyAV decode + fps resample + views),
(2) encode rate: frames/s of `tokenizer.encode` on the chosen device, (3) end to end: videos/s and frames/s of
`vimpac tokenize` with W decode workers. The goal (issue 2): with the encoder on a GPU, end to end ≥ 80% of
W × the single-worker decode rate, i.e. decoding, not the pipeline, is the limit.

    python scripts/bench/tokenize_throughput.py --corpus /tmp/synth --tokenizer runs/tok --workers 2 --device cpu \
        --json benchmarks/tokenize_cpu.json

Without --corpus / --tokenizer it makes both: a synthetic corpus (`--per-class` training videos per class) and
an untrained tokenizer of `--kind` (vqvae, or the paper's full-size DALL-E encoder with random weights): its
codes are meaningless but its cost is the real one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vimpac.tokenization.dalle import DalleConfig, DalleEncoder, save_dalle
from vimpac.tokenization.decode import iter_view_frames
from vimpac.tokenization.extract import ExtractConfig, extract, extraction_views
from vimpac.tokenization.synth import SynthConfig, generate
from vimpac.tokenization.tokenizer import load_tokenizer
from vimpac.tokenization.vqvae import VQVAE, VQVAEConfig, save_vqvae


def decode_rate(videos: list[Path], fps: float, views, size: int, seconds: float) -> dict:
    frames, start = 0, time.perf_counter()
    for path in videos:
        for chunk in iter_view_frames(path, fps, views, size):
            frames += chunk.shape[0] * chunk.shape[1]
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"frames": frames, "seconds": elapsed, "frames_per_s": frames / elapsed}


def encode_rate(tokenizer, size: int, batch: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    tokenizer.encode(frames)  # warm-up (cudnn autotune, lazy init)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokenizer.encode(frames)
        done += batch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"frames": done, "seconds": elapsed, "frames_per_s": done / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="output of `vimpac synth` (made in a temp dir if absent)")
    parser.add_argument("--tokenizer", help="tokenizer directory (an untrained one of --kind if absent)")
    parser.add_argument("--kind", choices=("vqvae", "dalle"), default="vqvae", help="untrained tokenizer to make")
    parser.add_argument("--fp16", action="store_true", help="encode under fp16 autocast (CUDA)")
    parser.add_argument("--per-class", type=int, default=8, help="training videos per class in a made corpus")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--frame-size", type=int, default=128)
    parser.add_argument("--views", default="test", choices=("center", "test", "train"))
    parser.add_argument("--encode-batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="time budget of each rate measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vimpac-bench-"))
    try:
        corpus = args.corpus
        if corpus is None:
            corpus = work / "synth"
            cores = os.cpu_count() or 1
            generate(SynthConfig(out=corpus, train_per_class=args.per_class, unlabeled=0, workers=cores), False)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = str(work / "tok")
            if args.kind == "vqvae":
                save_vqvae(VQVAE(VQVAEConfig()), tok_dir)
            else:
                save_dalle(tok_dir, DalleEncoder(DalleConfig()).state_dict())
        tokenizer = load_tokenizer(tok_dir, device=args.device, fp16=args.fp16)
        cfg = ExtractConfig(
            videos=corpus / "videos",
            annotations=sorted(corpus.glob("something-something-v2-*.json")),
            format="ssv2",
            tokenizer=tok_dir,
            out=work / "db",
            fps=args.fps,
            frame_size=args.frame_size,
            views=args.views,
            workers=args.workers,
            device=args.device,
            encode_batch=args.encode_batch,
            fp16=args.fp16,
            progress=False,
        )
        views = extraction_views(cfg)
        videos = sorted((corpus / "videos").iterdir())
        dec = decode_rate(videos, args.fps, views, args.frame_size, args.seconds)
        enc = encode_rate(tokenizer, args.frame_size, args.encode_batch, args.seconds)
        summary = extract(cfg)
        e2e = {
            "videos": summary.tokenized,
            "frames": summary.frames,
            "seconds": summary.seconds,
            "videos_per_s": summary.videos_per_s,
            "frames_per_s": summary.frames_per_s,
        }
        target = 0.8 * args.workers * dec["frames_per_s"]
        result = {
            "machine": platform.node(),
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "tokenizer": tokenizer.name,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "views": len(views),
            "decode_single_worker": dec,
            "encode": enc,
            "end_to_end": e2e,
            "goal_frames_per_s": target,
            "goal_met": e2e["frames_per_s"] >= target,
        }
        print(f"{'measure':<34}{'frames/s':>12}")
        print(f"{'decode, 1 worker (' + str(len(views)) + ' views)':<34}{dec['frames_per_s']:>12.0f}")
        print(f"{'encode on ' + result['device']:<34}{enc['frames_per_s']:>12.0f}")
        print(
            f"{'end to end, ' + str(args.workers) + ' workers':<34}{e2e['frames_per_s']:>12.0f}"
            f"   ({e2e['videos_per_s']:.2f} videos/s)"
        )
        print(f"{'goal: 0.8 × W × decode':<34}{target:>12.0f}   met: {result['goal_met']}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
