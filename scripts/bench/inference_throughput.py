"""Benchmark `vimpac predict` and `vimpac embed` on video files: videos/s end to end on this machine.

    python scripts/bench/inference_throughput.py --videos 48 --json benchmarks/inference_cpu_2core.json
    python scripts/bench/inference_throughput.py --seconds 60 --videos 8 --json benchmarks/inference_cpu_2core_60s.json
    python scripts/bench/inference_throughput.py --budget long --device cuda --videos 96 --json OUT.json
    python scripts/bench/inference_throughput.py --corpus DIR --export runs/demo/finetune_pretrained --device cuda

Two ways through the same library calls the commands make (vimpac.inference, in this process; no CLI start-up, the
model and tokenizer loaded once and timed apart), each pass over the same videos:
  streamed        what `vimpac predict` / `vimpac embed` run: vimpac.inference_stream.file_codes with --workers
                  decode processes (the pool's start-up included in every pass) and the tokenizer's batches
                  filled from several videos, then run_videos: the model on up to --clips-per-forward clips of
                  several videos per forward pass (probabilities, or the mean CLS vector for embed)
  one at a time   the baseline: per video VideoPipeline.tokens (decoding and encoding in this process) then
                  probabilities_of + top_k(5) (predict) or features_of(tokens, "cls") (embed); it also splits the
                  time into decode + tokenize and model
videos/s = measured videos / wall time of the pass. Every pass is preceded by one untimed warm-up video and runs
--repeats times; the JSON keeps the repeat of median time (and every repeat's videos/s): on a shared machine one
pass can be slowed several-fold by other processes. A decode-only pass (vimpac.tokenization.decode.
iter_view_frames over the same files in this process, also --repeats times) is one worker's decoding rate: the
streamed pass cannot beat --workers × that.

Inputs:
  --corpus DIR   video files to use (recursively; the first --videos of them, sorted); without it the script
                 writes --videos synthetic clips with `vimpac synth`'s generator at the corpus settings of the
                 demo budget --budget (vimpac.commands.demo.BUDGETS: default 6 motion classes at 96×112, long
                 16 classes at 160×192; H.264), or with --seconds S that many videos of S seconds (the
                 synthesizer's long unlabeled videos), where the evaluation clips read a small share of the frames
  --export DIR   a fine-tuned export or its run directory (its inference settings and tokenizer, as `vimpac
                 predict --model DIR` finds them; --tokenizer / --data as there; a pre-training export is
                 measured for embed only). Without it the script makes one at the sizes of --budget (tokenizer
                 vocabulary and frame size, model layers, width, heads and clip length, database fps, clip frame
                 rate, the SSV2 centre view and the largest K of its test clips) with random weights: an
                 untrained VQ-VAE and an untrained classifier cost what trained ones cost, so the rates are those
                 of the demo's trained models without training them (their outputs are meaningless).

The JSON holds every pass's videos, clips, frames, seconds and videos/s, the settings, the load average before and
after (the machine may be shared), the machine, library versions, the git commit and the date (vimpac.bench_env).
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
from vimpac.commands.demo import BUDGETS
from vimpac.config import VimpacConfig
from vimpac.export_info import FORMAT, INFO_FILE
from vimpac.inference import load_pipeline, video_files
from vimpac.inference_stream import file_codes, run_videos
from vimpac.modeling import VimpacForClassification
from vimpac.tokenization.decode import iter_view_frames
from vimpac.tokenization.synth import CLASS_KEYS, SynthConfig, generate
from vimpac.tokenization.tokenizer import load_tokenizer
from vimpac.tokenization.vqvae import VQVAE, VQVAEConfig, save_vqvae

TOP_K = 5
METHOD = (
    "library: vimpac.inference.load_pipeline once; streamed = inference_stream.file_codes(workers) + run_videos "
    "(as `vimpac predict` / `vimpac embed` run), one at a time = per video VideoPipeline.tokens + probabilities_of + "
    "top_k(5) (predict) or tokens + features_of(cls) (embed); no CLI process start-up, model and tokenizer loading "
    "timed apart"
)


def make_corpus(out: Path, videos: int, seed: int, budget_name: str = "default", seconds: float | None = None) -> Path:
    """`videos` synthetic clips (or a few more: whole classes) at the corpus settings of a demo budget; with
    `seconds`, `videos` long videos of that length instead (the synthesizer's unlabeled ones, one scene each)."""
    budget = BUDGETS[budget_name]
    classes = budget.classes or CLASS_KEYS
    generate(
        SynthConfig(
            out=out,
            seed=seed,
            classes=classes,
            train_per_class=0 if seconds else math.ceil(videos / len(classes)),
            val_per_class=0,
            unlabeled=videos if seconds else 0,
            unlabeled_seconds=seconds or 30.0,
            size=budget.video_size,
            calm=budget.calm,
            object_scale=budget.object_scale,
            smooth_background=budget.smooth_background,
            workers=os.cpu_count() or 1,
        ),
        False,
    )
    return out / "unlabeled" / "videos" if seconds else out / "videos"


def make_export(out: Path, seed: int, budget_name: str = "default") -> Path:
    """A fine-tuning-shaped run directory at a demo budget's sizes, random weights: RUN/export with config.json,
    model.safetensors and inference.json, and RUN/tokenizer (an untrained VQ-VAE)."""
    budget = BUDGETS[budget_name]
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
    classes = list(budget.classes or CLASS_KEYS)
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
        "frame_selection": "vimpac",
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


def one_at_a_time_pass(pipeline, videos: list[Path], mode: str) -> dict:
    """One untimed warm-up video, then every video of `videos` through tokens + the `mode` head, one by one."""

    def one(video: Path) -> tuple[float, float, int]:
        start = time.perf_counter()
        tokens = pipeline.tokens(video)
        middle = time.perf_counter()
        if mode == "predict":
            pipeline.top_k(pipeline.probabilities_of(tokens), TOP_K)
        else:
            pipeline.features_of(tokens, "cls")
        synchronize(pipeline)
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


def streamed_pass(pipeline, videos: list[Path], mode: str, workers: int) -> dict:
    """One untimed warm-up video in this process, then every video of `videos` as the commands run them: decoded in
    `workers` processes (started inside the timed pass), tokenizer and model batched across videos."""
    pipeline.tokens(videos[0])
    items = [(str(i), v) for i, v in enumerate(videos)]
    output = "probabilities" if mode == "predict" else "features"
    start = time.perf_counter()
    failed = 0
    for result in run_videos(pipeline, file_codes(pipeline, items, workers), output):
        if result.failure is not None:
            failed += 1
        elif mode == "predict":
            pipeline.top_k(result.probabilities, TOP_K)
    synchronize(pipeline)
    seconds = time.perf_counter() - start
    clips = (len(videos) - failed) * len(pipeline.views) * pipeline.num_clips
    return {
        "videos": len(videos),
        "failed": failed,
        "clips": clips,
        "workers": workers,
        "clips_per_forward": pipeline.clips_per_forward,
        "seconds": seconds,
        "videos_per_s": len(videos) / seconds,
    }


def synchronize(pipeline) -> None:
    if pipeline.model.device.type == "cuda":
        torch.cuda.synchronize()


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
    videos: list[Path],
    export: str | Path,
    tokenizer: str | None,
    data: str | None,
    device: str,
    workers: int,
    precision: str = "auto",
    repeats: int = 1,
) -> dict:
    """Load the pipeline (timed), then the decode-only pass and, for predict (when the export has a classifier) and
    embed, the streamed and the one-at-a-time passes over `videos`, each `repeats` times (median_pass)."""
    start = time.perf_counter()
    pipeline = load_pipeline(export, tokenizer, device, data, precision=precision)
    pipeline.tokenizer  # noqa: B018 - load (and check) it now, inside the timed start-up
    load_s = time.perf_counter() - start
    decode = median_pass(lambda: decode_pass(pipeline, videos), repeats)
    modes = ["predict", "embed"] if pipeline.model.has_classifier else ["embed"]  # no classifier: embed only
    streamed = {m: median_pass(lambda m=m: streamed_pass(pipeline, videos, m, workers), repeats) for m in modes}
    alone = {m: median_pass(lambda m=m: one_at_a_time_pass(pipeline, videos, m), repeats) for m in modes}
    frames = decode["frames"]
    for result in [*streamed.values(), *alone.values()]:
        result["frames"] = frames
        result["frames_per_s"] = frames / result["seconds"]
    config = pipeline.model.config
    return {
        "load_seconds": load_s,
        "decode_only": decode,
        "streamed": streamed,
        "one_at_a_time": alone,
        "precision": str(pipeline.dtype).replace("torch.", ""),
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
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="without --corpus: long synthetic videos of this many seconds instead of the demo's clips",
    )
    parser.add_argument("--budget", choices=("default", "long"), default="default", help="sizes without --export")
    parser.add_argument("--export", help="fine-tuned export or run directory (default: random weights made here)")
    parser.add_argument("--tokenizer", help="with --export: tokenizer directory (default: the one it names)")
    parser.add_argument("--data", help="with --export: its evaluation code database (default: the run's)")
    parser.add_argument("--device", default="cpu", help="where the tokenizer and the model run (default cpu)")
    parser.add_argument("--precision", default="auto", help="the model's: auto (fp16 on CUDA), fp32, fp16, bf16")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="decoding processes of the streamed passes (default: as the commands, one per core but one)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic clips and the random weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, the cores)")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each kind; the median is kept (3)")
    parser.add_argument("--note", default=None, help="free text recorded in the JSON (e.g. what else ran)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.videos < 1 or args.repeats < 1 or args.workers < 1:
        parser.error(
            f"--videos, --repeats and --workers must be >= 1; got {args.videos}, {args.repeats}, {args.workers}"
        )
    if args.seconds is not None and (args.seconds <= 0 or args.corpus is not None):
        parser.error(f"--seconds makes the synthetic videos: a positive length, without --corpus; got {args.seconds}")
    if args.export is None and (args.tokenizer or args.data):
        parser.error("--tokenizer and --data go with --export")

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before anything runs; environment() records the count
    work = Path(tempfile.mkdtemp(prefix="vimpac-bench-inference-"))
    try:
        if args.corpus is not None:
            folder = args.corpus
        else:
            folder = make_corpus(work / "synth", args.videos, args.seed, args.budget, args.seconds)
        videos = video_files([folder])[: args.videos]
        if not videos:
            parser.error(f"no video files under {folder}")
        export = args.export if args.export is not None else make_export(work / "model", args.seed, args.budget)
        load_before = os.getloadavg()
        results = measure(
            videos, export, args.tokenizer, args.data, args.device, args.workers, args.precision, args.repeats
        )
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    payload = {
        **environment(torch.device(args.device)),
        "method": METHOD,
        "weights": "given export" if args.export else f"random init at the demo's {args.budget}-budget sizes",
        "corpus": str(args.corpus)
        if args.corpus
        else f"synthetic (vimpac synth, demo {args.budget}-budget settings"
        + (f", {args.seconds:g} s unlabeled videos)" if args.seconds else ")"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_1_5_15_min": {"before": list(load_before), "after": list(load_after)},
        "note": args.note,
        **results,
    }
    decode, load_s = results["decode_only"], results["load_seconds"]
    print(
        f"{len(videos)} videos, {decode['frames']} frames decoded, on {args.device} ({results['precision']}); "
        f"loading took {load_s:.2f} s"
    )
    print(f"{'pass':<24}{'videos/s':>10}{'decode+tokenize s':>19}{'model s':>9}")
    print(f"{'decode only, 1 process':<24}{decode['videos_per_s']:>10.2f}{decode['seconds']:>19.2f}{'':>9}")
    for mode, row in results["one_at_a_time"].items():
        print(
            f"{mode + ', one at a time':<24}{row['videos_per_s']:>10.2f}{row['tokens_seconds']:>19.2f}"
            f"{row['model_seconds']:>9.2f}"
        )
    for mode, row in results["streamed"].items():
        print(f"{mode + f', {args.workers} workers':<24}{row['videos_per_s']:>10.2f}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
