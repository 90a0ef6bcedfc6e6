"""Benchmark `vimpac predict` and `vimpac embed` on video files: videos/s end to end on this machine.

    python scripts/bench/inference_throughput.py --videos 24 --json benchmarks/inference_cpu_2core.json
    python scripts/bench/inference_throughput.py --corpus DIR --export runs/demo/finetune_pretrained --device cuda

Every measured video goes through what the two commands do per video, with the library calls they make
(vimpac.inference, in this process; no CLI start-up, the model and tokenizer loaded once and timed apart):
  tokens    VideoPipeline.tokens: PyAV decoding, resampling to the database's fps, the test views, the
            tokenizer's encoder, the evaluation clips (test views × K)
  predict   + VideoPipeline.probabilities_of (classifier logits per clip, softmax, mean) and top_k(5)
  embed     + VideoPipeline.features_of(tokens, "cls") (the mean CLS vector over the clips)
videos/s = measured videos / wall time of the pass. Each pass is preceded by one untimed warm-up video and runs
--repeats times; the JSON keeps the repeat of median time (and every repeat's videos/s): on a shared machine one
pass can be slowed several-fold by other processes. A decode-only pass (vimpac.tokenization.decode.
iter_view_frames over the same files, also --repeats times) splits the tokens time into decoding and encoding.

Inputs:
  --corpus DIR   video files to use (recursively; the first --videos of them, sorted); without it the script
                 writes --videos synthetic clips with `vimpac synth`'s generator at the demo's default-budget
                 corpus settings (vimpac.commands.demo.BUDGETS["default"]: 6 motion classes, H.264)
  --export DIR   a fine-tuned export or its run directory (its inference settings and tokenizer, as `vimpac
                 predict --model DIR` finds them; --tokenizer / --data as there; a pre-training export is
                 measured for embed only). Without it the script makes
                 one at the demo's default-budget sizes (tokenizer vocabulary and frame size, model layers,
                 width, heads and clip length, database fps, clip frame rate, the SSV2 centre view and the
                 largest K of its test clips) with random weights: an untrained VQ-VAE and an untrained
                 classifier cost what trained ones cost, so the rates are those of the demo's trained models
                 without training them (their outputs are meaningless).

The JSON holds every pass's videos, frames, seconds and videos/s, the settings, the load average before and
after (the machine may be shared), the machine, library versions, the git commit and the date
(vimpac.bench_env).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vimpac.bench_env import environment
from vimpac.checkpoint import export_weights
from vimpac.commands.demo import BUDGETS, MOTION_CLASSES
from vimpac.config import VimpacConfig
from vimpac.export_info import FORMAT, INFO_FILE
from vimpac.inference import load_pipeline, video_files
from vimpac.modeling import VimpacForClassification
from vimpac.tokenization.decode import iter_view_frames
from vimpac.tokenization.synth import SynthConfig, generate
from vimpac.tokenization.tokenizer import load_tokenizer
from vimpac.tokenization.vqvae import VQVAE, VQVAEConfig, save_vqvae

TOP_K = 5
METHOD = (
    "library: vimpac.inference.load_pipeline once, then per video VideoPipeline.tokens + probabilities_of + "
    "top_k(5) (predict) or tokens + features_of(cls) (embed), as `vimpac predict` / `vimpac embed` call them; "
    "no CLI process start-up, model and tokenizer loading timed apart"
)


def make_corpus(out: Path, videos: int, seed: int) -> Path:
    """`videos` synthetic clips (or a few more: whole classes) at the demo's default corpus settings."""
    budget = BUDGETS["default"]
    classes = budget.classes or MOTION_CLASSES
    generate(
        SynthConfig(
            out=out,
            seed=seed,
            classes=classes,
            train_per_class=math.ceil(videos / len(classes)),
            val_per_class=0,
            unlabeled=0,
            size=budget.video_size,
            calm=budget.calm,
            object_scale=budget.object_scale,
            smooth_background=budget.smooth_background,
            workers=os.cpu_count() or 1,
        ),
        False,
    )
    return out / "videos"


def make_export(out: Path, seed: int) -> Path:
    """A fine-tuning-shaped run directory at the demo's default-budget sizes, random weights: RUN/export with
    config.json, model.safetensors and inference.json, and RUN/tokenizer (an untrained VQ-VAE)."""
    budget = BUDGETS["default"]
    torch.manual_seed(seed)
    tokenizer_dir = out / "tokenizer"
    fingerprint = save_vqvae(VQVAE(VQVAEConfig(vocab_size=budget.vocab_size)), tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    grid = budget.frame_size // tokenizer.downsample
    config = VimpacConfig(
        vocab_size=budget.vocab_size,
        hidden_size=budget.hid_dim,
        layers=budget.layers,
        heads=budget.heads,
        clip_len=budget.clip_len,
        grid=(grid, grid),
        nce_proj_hid_dim=4 * budget.hid_dim,
    )
    classes = list(budget.classes or MOTION_CLASSES)
    model = VimpacForClassification(config, len(classes))
    export = export_weights(model.state_dict(), config, out / "run", producer="scripts/bench/inference_throughput.py")
    info = {
        "format": FORMAT,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": fingerprint,
            "fp16": False,
            "path": str(tokenizer_dir),
        },
        "fps": budget.fps,
        "frame_rate": budget.frame_rate,
        "frame_size": budget.frame_size,
        "views": [f"r{budget.frame_size}_center_f0"],  # SSV2's one evaluation view, as the demo's database
        "num_clips": max(int(k) for k in budget.test_clips.split(",")),
        "single_clip": "centre",
        "clip_len": budget.clip_len,
        "classes": classes,
        "dataset": "ssv2",
        "database": None,
        "run": str(out / "run"),
    }
    (export / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return export


def timed_pass(pipeline, videos: list[Path], mode: str) -> dict:
    """One untimed warm-up video, then every video of `videos` through tokens + the `mode` head."""

    def one(video: Path) -> tuple[float, float, int]:
        start = time.perf_counter()
        tokens = pipeline.tokens(video)
        middle = time.perf_counter()
        if mode == "predict":
            pipeline.top_k(pipeline.probabilities_of(tokens), TOP_K)
        else:
            pipeline.features_of(tokens, "cls")
        if str(pipeline.model.device).startswith("cuda"):
            torch.cuda.synchronize()
        return middle - start, time.perf_counter() - middle, int(tokens.shape[0])

    one(videos[0])
    tokens_s = model_s = 0.0
    clips = 0
    start = time.perf_counter()
    for video in videos:
        t, m, c = one(video)
        tokens_s, model_s, clips = tokens_s + t, model_s + m, clips + c
    seconds = time.perf_counter() - start
    return {
        "videos": len(videos),
        "clips": clips,
        "seconds": seconds,
        "videos_per_s": len(videos) / seconds,
        "tokens_seconds": tokens_s,
        "model_seconds": model_s,
    }


def decode_pass(pipeline, videos: list[Path]) -> dict:
    """Decoding alone (fps resampling and the views included), as VideoPipeline.codes decodes."""
    frames, start = 0, time.perf_counter()
    for video in videos:
        for chunk in iter_view_frames(video, pipeline.fps, pipeline.views, pipeline.frame_size):
            frames += chunk.shape[0] * chunk.shape[1]
    seconds = time.perf_counter() - start
    return {"videos": len(videos), "frames": frames, "seconds": seconds, "videos_per_s": len(videos) / seconds}


def median_pass(run, repeats: int) -> dict:
    """The result of `run()` whose time is the median of `repeats` calls (the upper median for an even count),
    with every call's videos/s in "repeats_videos_per_s"."""
    runs = [run() for _ in range(repeats)]
    chosen = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    chosen["repeats_videos_per_s"] = [r["videos_per_s"] for r in runs]
    return chosen


def measure(
    videos: list[Path], export: str | Path, tokenizer: str | None, data: str | None, device: str, repeats: int = 1
) -> dict:
    """Load the pipeline (timed), then the decode-only, predict and embed passes over `videos`, each `repeats`
    times (median_pass)."""
    start = time.perf_counter()
    pipeline = load_pipeline(export, tokenizer, device, data)
    pipeline.tokenizer  # noqa: B018 - load (and check) it now, inside the timed start-up
    load_s = time.perf_counter() - start
    decode = median_pass(lambda: decode_pass(pipeline, videos), repeats)
    # A pre-training export has no classifier: embed only.
    predict = None
    if pipeline.model.has_classifier:
        predict = median_pass(lambda: timed_pass(pipeline, videos, "predict"), repeats)
    embed = median_pass(lambda: timed_pass(pipeline, videos, "embed"), repeats)
    frames = decode["frames"]
    for result in (r for r in (predict, embed) if r is not None):
        result["frames"] = frames
        result["frames_per_s"] = frames / result["seconds"]
    config = pipeline.model.config
    return {
        "load_seconds": load_s,
        "decode_only": decode,
        "predict": predict,
        "embed": embed,
        "model": {
            "source": str(pipeline.model.source),
            "layers": config.layers,
            "hidden_size": config.hidden_size,
            "heads": config.heads,
            "clip_len": config.clip_len,
            "grid": list(config.grid),
            "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in pipeline.model._model.parameters()),
        },
        "tokenizer": {"name": pipeline.tokenizer.name, "vocab_size": pipeline.tokenizer.vocab_size},
        "inference": {k: pipeline.info.get(k) for k in ("fps", "frame_rate", "frame_size", "views", "num_clips")},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="folder of video files (default: synthetic clips made here)")
    parser.add_argument("--videos", type=int, default=24, help="videos measured per pass (default 24)")
    parser.add_argument("--export", help="fine-tuned export or run directory (default: random weights made here)")
    parser.add_argument("--tokenizer", help="with --export: tokenizer directory (default: the one it names)")
    parser.add_argument("--data", help="with --export: its evaluation code database (default: the run's)")
    parser.add_argument("--device", default="cpu", help="where the tokenizer and the model run (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips and the random weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, the cores)")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each kind; the median is kept (3)")
    parser.add_argument("--note", default=None, help="free text recorded in the JSON (e.g. what else ran)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.videos < 1 or args.repeats < 1:
        parser.error(f"--videos and --repeats must be >= 1; got {args.videos} and {args.repeats}")
    if args.export is None and (args.tokenizer or args.data):
        parser.error("--tokenizer and --data go with --export")

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before anything runs; environment() records the count
    work = Path(tempfile.mkdtemp(prefix="vimpac-bench-inference-"))
    try:
        folder = args.corpus if args.corpus is not None else make_corpus(work / "synth", args.videos, args.seed)
        videos = video_files([folder])[: args.videos]
        if not videos:
            parser.error(f"no video files under {folder}")
        export = args.export if args.export is not None else make_export(work / "model", args.seed)
        load_before = os.getloadavg()
        results = measure(videos, export, args.tokenizer, args.data, args.device, args.repeats)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    payload = {
        **environment(torch.device(args.device)),
        "method": METHOD,
        "weights": "given export" if args.export else "random init at the demo's default-budget sizes (untrained)",
        "corpus": str(args.corpus) if args.corpus else "synthetic (vimpac synth, demo default-budget settings)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_1_5_15_min": {"before": list(load_before), "after": list(load_after)},
        "note": args.note,
        **results,
    }
    predict, embed, decode = results["predict"], results["embed"], results["decode_only"]
    load_s = results["load_seconds"]
    print(f"{len(videos)} videos, {decode['frames']} frames decoded, on {args.device}; loading took {load_s:.2f} s")
    print(f"{'pass':<14}{'videos/s':>10}{'decode+tokenize s':>19}{'model s':>9}")
    print(f"{'decode only':<14}{decode['videos_per_s']:>10.2f}{decode['seconds']:>19.2f}{'':>9}")
    for name, row in (("predict", predict), ("embed", embed)):
        if row is None:
            print(f"{name:<14}{'(no classifier)':>10}")
            continue
        print(f"{name:<14}{row['videos_per_s']:>10.2f}{row['tokens_seconds']:>19.2f}{row['model_seconds']:>9.2f}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
