"""`vimpac probe`: linear-probe and kNN accuracy of frozen CLS and mean-pooled token features, for a pre-trained
model and for the same architecture at random initialisation (vimpac.probe)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vimpac.errors import UsageError

if TYPE_CHECKING:  # the command imports torch and the model only when it runs
    from vimpac.code_db import CodeDatabase
    from vimpac.config import VimpacConfig
    from vimpac.modeling import VimpacBackbone

# vimpac.probe's defaults, repeated so that building the parser does not import torch (a test keeps them equal).
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# vimpac/finetune.py's --seed default, which seeds its --labels-per-class subset unless --labels-seed is given.
FINETUNE_SEED = 9595
PROBE_HINT = "point it at a pre-training run directory or its export/ folder"

EPILOG = """\
Every video's feature is the mean over its evaluation views (--views; default r<S>_{top,center,bottom}_f0, the
centre view alone for SSV2) and --num-test-clips uniformly spaced clips of the backbone's last-layer CLS vector
(cls) or of its token vectors averaged over the non-PAD positions (mean); training videos are embedded the same
way, without augmentation. The linear probe is an L2-regularised logistic regression on standardised features
(L-BFGS, float64; the penalty is picked from --weight-decays by 5-fold stratified cross-validation on the
training videos, then refitted on all of them); the kNN classifier is the pre-training monitor's weighted cosine vote.
The random baseline is the model's config.json initialised from --seed, with no weights loaded.

Splits default by dataset like fine-tuning: train_k/test_k for UCF101 and HMDB51 (--split-id k), train/val
otherwise. --frame-rate defaults to the pre-training run's (<run>/run_config.json), else the database's fps.

Under a launcher each rank embeds its share of the videos and rank 0 fits the probes, e.g.
  torchrun --nproc_per_node 2 -m vimpac.cli probe --model runs/small_k400 --data data/codes/ucf101_fps2_s128
  deepspeed --num_gpus 2 --no_local_rank --module vimpac.cli probe --model ... --data ...

example:
  vimpac probe --model runs/small_k400 --data data/codes/ucf101_fps2_s128 --split-id 1 --out probe.json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear-probe and kNN accuracy of frozen features, pre-trained vs random initialisation",
        description=(
            "Frozen-feature evaluation of a pre-trained model on a labeled code database: a linear probe and a "
            "kNN classifier on the CLS feature and on the mean-pooled token features, for the pre-trained "
            "weights and for the same architecture at random initialisation."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="export folder (config.json + model.safetensors) or run directory")
    p.add_argument("--data", required=True, help="labeled code database (from `vimpac tokenize`)")
    p.add_argument("--eval-data", default=None, help="database of the evaluation split (default: --data)")
    p.add_argument("--split-id", type=int, default=None, help="UCF101/HMDB51 split 1-3 (train_k/test_k)")
    p.add_argument("--train-split", default=None, help="split the probes are fitted on (default: by dataset)")
    p.add_argument("--eval-split", default=None, help="split the probes are scored on (default: by dataset)")
    p.add_argument("--views", default=None, help="comma-separated views to embed (default: the evaluation views)")
    p.add_argument(
        "--num-test-clips",
        type=int,
        default=1,
        metavar="K",
        help="uniformly spaced clips per video (default 1: the centre one)",
    )
    p.add_argument("--frame-rate", type=float, default=None, help="clip fps (default: the run's, else the database's)")
    p.add_argument(
        "--labels-per-class",
        type=int,
        default=None,
        metavar="N",
        help="fit on N training videos per class, the subset fine-tuning's --labels-per-class takes (default: all)",
    )
    p.add_argument(
        "--labels-seed",
        type=int,
        default=FINETUNE_SEED,
        help="seed of that subset: fine-tuning's --labels-seed, or its --seed where it had none (default "
        "%(default)s, fine-tuning's default --seed)",
    )
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours of the kNN vote (default %(default)s)")
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help="kNN vote weight exp(sim / T) (default %(default)s)",
    )
    p.add_argument(
        "--weight-decays",
        default=",".join(f"{wd:g}" for wd in DEFAULT_WEIGHT_DECAYS),
        metavar="L1,L2,...",
        help="L2 penalties the linear probe chooses from (one value: no search); default %(default)s",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline and of the cross-validation folds")
    p.add_argument("--no-random-baseline", action="store_true", help="probe the pre-trained model only")
    p.add_argument(
        "--batch-size", type=int, default=32, help="clips per forward pass (whole videos, at least one; default 32)"
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the database")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="also write every number and the settings to this JSON file")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ inputs


def recorded_frame_rate(export: Path) -> tuple[float | None, Path | None]:
    """(--frame-rate of the run that wrote `export`, the file that says so): its run_config.json, else the
    export's inference.json (an export moved away from its run directory); (None, None) without either.
    (vimpac.pretrain_eval.recorded_arguments does the same, but importing it loads DeepSpeed.)"""
    for folder in (export, export.parent):
        path = folder / "run_config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["args"].get("frame_rate"), path
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise UsageError(f"{path} cannot be read ({err}); pass --frame-rate") from err
    from vimpac.export_info import INFO_FILE

    info = export / INFO_FILE
    if info.is_file():
        try:
            return json.loads(info.read_text(encoding="utf-8")).get("frame_rate"), info
        except (OSError, ValueError, AttributeError) as err:
            raise UsageError(f"{info} cannot be read ({err}); pass --frame-rate") from err
    return None, None


def check_database(db: CodeDatabase, config: VimpacConfig, export: Path) -> None:
    """Refuse a database the model cannot read: unlabeled, another vocabulary or another code grid."""
    if not db.manifest.get("classes"):
        raise UsageError(f"{db.path} lists no classes; probing needs a labeled code database (e.g. UCF101)")
    vocab = int(db.manifest["tokenizer"]["vocab_size"])
    if vocab != config.vocab_size:
        raise UsageError(
            f"the database {db.path} was tokenized with {vocab} codes but the model {export} has vocab_size "
            f"{config.vocab_size}; probe on a database made with the model's tokenizer"
        )
    grid = tuple(int(g) for g in db.manifest["grid"])
    if grid != tuple(config.grid):
        raise UsageError(
            f"the database {db.path} holds {grid[0]}x{grid[1]} codes per frame but the model {export} expects "
            f"{config.grid[0]}x{config.grid[1]}; probe on a database tokenized at the model's frame size"
        )


def parse_weight_decays(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--weight-decays must be a comma list of numbers, e.g. 1e-4,1e-3; got {text!r}") from None
    if not values or not all(0 <= v < math.inf for v in values):
        raise UsageError(f"--weight-decays must list finite values >= 0; got {text!r}")
    return values


def check_flags(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--num-test-clips", args.num_test_clips),
        ("--k", args.k),
        ("--batch-size", args.batch_size),
        ("--labels-per-class", args.labels_per_class),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.temperature < math.inf or args.num_workers < 0:
        raise UsageError("--temperature must be finite and > 0, and --num-workers >= 0")


def pretrained_backbone(export: Path, config: VimpacConfig) -> VimpacBackbone:
    """The backbone of the exported weights (a pre-training or fine-tuning export; the heads are ignored)."""
    from vimpac.checkpoint import read_export
    from vimpac.modeling import VimpacBackbone

    _, state, _ = read_export(export)
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone_state:
        raise UsageError(f"{export / 'model.safetensors'} holds no backbone.* tensors; is this a VIMPAC export?")
    backbone = VimpacBackbone(config)
    try:
        backbone.load_state_dict(backbone_state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"the weights in {export} do not fit its config.json: {err}") from err
    return backbone


# ------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from vimpac.errors import require_file_path

    require_file_path(args.out, "--out")
    # A launcher with several ranks (torchrun, deepspeed) sets WORLD_SIZE; one process needs no process group.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from vimpac.dist_setup import prepare_environment

        prepare_environment()  # before DeepSpeed is imported: it picks the accelerator at import time

    import torch
    from torch.utils.data import Subset

    from vimpac.checkpoint import check_same_tokenizer, export_folder
    from vimpac.code_db import CodeDatabase
    from vimpac.config import VimpacConfig
    from vimpac.finetune_data import (
        FinetuneTestClips,
        evaluation_views,
        few_labels_warning,
        label_subset,
        split_names,
    )
    from vimpac.modeling import VimpacBackbone
    from vimpac.probe import (
        FEATURES,
        extract_features,
        format_table,
        knn_accuracy,
        linear_probe,
        majority_accuracy,
        retrieval_recall,
    )

    check_flags(args)
    weight_decays = parse_weight_decays(args.weight_decays)
    model_path, data_path = Path(args.model), Path(args.data)
    eval_path = Path(args.eval_data) if args.eval_data else data_path
    for flag, path in (("--model", model_path), ("--data", data_path), ("--eval-data", eval_path)):
        if not path.exists():
            raise UsageError(f"{flag} {path} does not exist")
    export = export_folder(model_path, "--model", PROBE_HINT)
    config = VimpacConfig.load(export / "config.json")
    train_db = CodeDatabase(data_path)
    eval_db = CodeDatabase(eval_path) if eval_path != data_path else train_db
    for db, path in ((train_db, data_path), (eval_db, eval_path)):
        check_database(db, config, export)
        check_same_tokenizer(export, db.manifest, path)
    classes = list(train_db.manifest["classes"])
    if classes != list(eval_db.manifest["classes"]):
        raise UsageError(f"{data_path} and {eval_path} list different classes")
    default_train, default_eval = split_names(train_db.manifest.get("dataset"), args.split_id)
    train_split, eval_split = args.train_split or default_train, args.eval_split or default_eval
    recorded, source = recorded_frame_rate(export)
    frame_rate = args.frame_rate if args.frame_rate is not None else recorded

    def views_of(db: CodeDatabase) -> list[str]:
        if args.views is not None:
            return [v.strip() for v in args.views.split(",") if v.strip()]
        return evaluation_views(db.views, db.manifest.get("dataset"), db.manifest.get("frame_size"))

    common = {"pad_id": config.pad_id, "num_clips": args.num_test_clips, "frame_rate": frame_rate}
    train_set = FinetuneTestClips(train_db, train_split, config.clip_len, views=views_of(train_db), **common)
    eval_set = FinetuneTestClips(eval_db, eval_split, config.clip_len, views=views_of(eval_db), **common)
    train_items = list(range(len(train_set)))
    labels_seed = args.labels_seed
    subset = None
    if args.labels_per_class is not None:
        # Fine-tuning's low-label subset: the same N, seed and split give the very videos a fine-tuning run used.
        labels = train_set.labels.tolist()
        chosen = label_subset(train_set.ids, labels, args.labels_per_class, labels_seed, eval_ids=eval_set.ids)
        warning = few_labels_warning(labels, args.labels_per_class, classes, train_split)
        if warning and os.environ.get("RANK", "0") == "0":
            print(warning, file=sys.stderr, flush=True)
        position = {video: i for i, video in enumerate(train_set.ids)}
        train_items = [position[video] for video in chosen]
        subset = {"labels_per_class": args.labels_per_class, "seed": labels_seed, "ids": chosen}
    shared = sorted({train_set.ids[i] for i in train_items} & set(eval_set.ids))
    if shared:
        # kNN would find each such video itself in the bank (the kNN monitor refuses this too)
        raise UsageError(
            f"{len(shared)} of the {len(eval_set)} evaluation videos (split {eval_split!r}) are also training videos "
            f"(split {train_split!r}), e.g. {shared[0]}: a probe scored on them measures memory, not features; give "
            "an evaluation split disjoint from the training one"
        )
    if len(eval_set) < 2:
        raise UsageError(f"split {eval_split!r} of {eval_path} has {len(eval_set)} video: retrieval needs two or more")
    train_y, eval_y = train_set.labels[train_items], eval_set.labels
    if len(set(train_y.tolist())) < 2:
        raise UsageError(
            f"the training videos (split {train_split!r} of {data_path}) hold one class: every probe would score "
            "1.0; probing needs two classes or more"
        )
    models = {"pretrained": pretrained_backbone(export, config)}  # its errors come before any process group
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    rank, world = 0, 1
    owns_group = distributed and not torch.distributed.is_initialized()
    if owns_group:
        from vimpac.dist_setup import init_distributed

        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # The features are gathered where they are computed: NCCL (the default beside a GPU) takes CUDA tensors only.
        rank, _, world = init_distributed(None if device == "cuda" else "gloo")
    elif distributed:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        if not args.no_random_baseline:
            torch.manual_seed(args.seed)  # the same random weights on every rank and in every run
            models["random"] = VimpacBackbone(config)
        features: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for name in list(models):
            backbone = models.pop(name).to(device)
            features[name] = {
                split: extract_features(
                    backbone,
                    dataset,
                    pad_id=config.pad_id,
                    device=device,
                    rank=rank,
                    world=world,
                    clips_per_forward=args.batch_size,
                    num_workers=args.num_workers,
                    desc=f"{name} {split}",
                )
                for split, dataset in (("train", Subset(train_set, train_items)), ("eval", eval_set))
            }
            del backbone
        if rank != 0:
            return 0

        results: dict[str, dict[str, dict[str, Any]]] = {}
        for name, feats in features.items():
            results[name] = {}
            for i, feature in enumerate(FEATURES):
                train_x, eval_x = feats["train"][i], feats["eval"][i]
                linear = linear_probe(
                    train_x,
                    train_y,
                    eval_x,
                    eval_y,
                    num_classes=len(classes),
                    weight_decays=weight_decays,
                    seed=args.seed,
                    device=device,
                )
                knn = knn_accuracy(
                    train_x, train_y, eval_x, eval_y, args.k, temperature=args.temperature, num_classes=len(classes)
                )
                recall = retrieval_recall(eval_x, eval_y)
                results[name][feature] = {"linear": linear, "knn": knn, **{f"recall@{k}": r for k, r in recall.items()}}
    finally:
        if owns_group:
            from vimpac.dist_setup import shutdown_distributed

            shutdown_distributed()

    per_class = torch.bincount(train_y, minlength=len(classes))
    report = {
        "results": results,
        "majority_class_accuracy": majority_accuracy(train_y, eval_y),
        "chance": 1 / len(classes),
        "num_classes": len(classes),
        "train_videos": len(train_items),
        "eval_videos": len(eval_set),
        "train_videos_per_class": {"min": int(per_class.min()), "max": int(per_class.max())},
        "feature_dim": config.hidden_size,
        "settings": {
            "model": str(export),
            "data": str(data_path),
            "eval_data": str(eval_path),
            "train_split": train_split,
            "eval_split": eval_split,
            "train_views": train_set.views,
            "eval_views": eval_set.views,
            "num_test_clips": args.num_test_clips,
            "frame_rate": frame_rate,
            "run_config": str(source) if source is not None else None,
            "label_subset": subset,
            "k": args.k,
            "temperature": args.temperature,
            "weight_decays": weight_decays,
            "seed": args.seed,
            "random_baseline": not args.no_random_baseline,
            "world_size": world,
        },
    }
    print(
        f"{export}: fitted on {train_split} of {data_path} ({len(train_items)} videos), scored on {eval_split} of "
        f"{eval_path} ({len(eval_set)} videos), {len(classes)} classes; views {eval_set.views} × "
        f"{args.num_test_clips} clips of {config.clip_len} frames at {frame_rate or eval_db.manifest['fps']} fps"
    )
    print(format_table(results, args.k))
    print(f"majority class {report['majority_class_accuracy']:.3f}, chance {report['chance']:.3f}")
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
