"""`vimpac pretrain-eval`: masked-token and contrastive accuracy of a pre-trained model on held-out videos, next to
the "most frequent code" and "copy nearest visible" baselines (vimpac.pretrain_eval)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vimpac.errors import UsageError

EPILOG = """\
The clips are masked as in pre-training (--mask-blocks blocks, drawn from --seed, so two runs score the same
positions) and filled with MASK; clip length, grid and PAD / MASK ids come from the model's config.json. The model
and both baselines are scored on exactly the same masked tokens. The most frequent code is counted over the very
split and views of DB that are evaluated, which favours that baseline: it sees the test data's statistics.

--mask-blocks and --frame-rate default to the run's own (args in <run>/run_config.json, found when --model is a
run directory or its export/ folder), else 5 blocks and the database's fps; the two clips of a video are drawn
within the run's --nce-relevance-range, if it had one.

example:
  vimpac pretrain-eval --model runs/small_k400 --data data/codes/ucf101_fps2_s128 --split test --out eval.json
"""

DEFAULT_MASK_BLOCKS = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain-eval",
        help="held-out masked-token / contrastive accuracy of a pre-trained model, with two baselines",
        description=(
            "Evaluate exported pre-training weights on a code database: masked-token accuracy of the model, of "
            "predicting the most frequent code and of copying the nearest visible code; contrastive accuracy "
            "and its chance level."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="export folder (config.json + model.safetensors) or run directory")
    p.add_argument("--data", required=True, help="code database (from `vimpac tokenize`)")
    p.add_argument("--split", default=None, help="split to evaluate (default: every video of the database)")
    p.add_argument("--views", default=None, help="comma-separated views to draw clips from (default: all)")
    p.add_argument("--frame-rate", type=float, default=None, help="clip fps (default: the run's, else the database's)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch: 2B - 1 contrastive candidates")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip starts and masks")
    p.add_argument("--mask-blocks", type=int, default=None, help="masked blocks per clip (default: the run's, else 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="also write the numbers and settings to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.errors import require_file_path

    require_file_path(args.out, "--out")
    import torch

    from vimpac.checkpoint import check_same_tokenizer, export_folder
    from vimpac.code_db import CodeDatabase
    from vimpac.config import VimpacConfig
    from vimpac.data import PretrainClips
    from vimpac.pretrain_eval import (
        evaluate_pretraining,
        format_report,
        load_pretrained,
        most_frequent_code,
        recorded_arguments,
    )

    if args.batch_size < 2:
        raise UsageError(
            f"--batch-size {args.batch_size}: the contrastive accuracy picks each clip's partner among the other "
            "clips of a batch, so it needs 2 videos or more"
        )
    model_path, data_path = Path(args.model), Path(args.data)
    for flag, path in (("--model", model_path), ("--data", data_path)):
        if not path.exists():
            raise UsageError(f"{flag} {path} does not exist")
    export = export_folder(model_path, "--model", "point it at a pre-training run directory or its export/ folder")
    config = VimpacConfig.load(export / "config.json")
    db = CodeDatabase(data_path)
    vocab = int(db.manifest["tokenizer"]["vocab_size"])
    if vocab != config.vocab_size:
        raise UsageError(
            f"the database {data_path} was tokenized with {vocab} codes but the model {export} has vocab_size "
            f"{config.vocab_size}; evaluate on a database made with the model's tokenizer"
        )
    grid = tuple(int(g) for g in db.manifest["grid"])
    if grid != config.grid:
        raise UsageError(
            f"the database {data_path} holds {grid[0]}x{grid[1]} codes per frame but the model {export} expects "
            f"{config.grid[0]}x{config.grid[1]}; evaluate on a database tokenized at the model's frame size"
        )
    check_same_tokenizer(export, db.manifest, data_path)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    recorded, source = recorded_arguments(export)
    mask_blocks = args.mask_blocks if args.mask_blocks is not None else recorded.get("mask_blocks", DEFAULT_MASK_BLOCKS)
    frame_rate = args.frame_rate if args.frame_rate is not None else recorded.get("frame_rate")
    relevance_range = recorded.get("nce_relevance_range")  # the second clip's distance, as the run drew its pairs
    views = [v.strip() for v in args.views.split(",") if v.strip()] if args.views is not None else None
    dataset = PretrainClips(
        db,
        args.split,
        config.clip_len,
        pad_id=config.pad_id,
        mask_id=config.mask_id,
        mask_blocks=int(mask_blocks),
        frame_rate=frame_rate,
        relevance_range=relevance_range,
        views=views,
        seed=args.seed,
    )
    frequent = most_frequent_code(db, args.split, dataset.views)
    model = load_pretrained(export, device)
    result = evaluate_pretraining(model, dataset, batch_size=args.batch_size, device=device, frequent_code=frequent)

    settings = {
        "model": str(export),
        "data": str(data_path),
        "split": args.split,
        "views": dataset.views,
        "frame_rate": frame_rate,
        "mask_blocks": int(mask_blocks),
        "nce_relevance_range": relevance_range,
        "seed": args.seed,
        "run_config": str(source) if source is not None else None,
    }
    origin = f" (from {source})" if source is not None and args.mask_blocks is None else ""
    print(
        f"{export} on {data_path} split {args.split or 'all'}: {mask_blocks} mask blocks{origin}, clips of "
        f"{config.clip_len} frames at {frame_rate or db.manifest['fps']} fps, seed {args.seed}"
    )
    print(format_report(result))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "settings": settings}, indent=2) + "\n", encoding="utf-8")
    return 0
