"""Build and run a fine-tuning job (vimpac/finetune.py): model from exported weights, data, engine, loop, evaluation.

Called by the entry script after `vimpac.dist_setup.prepare_environment()`. The shared set-up is vimpac.run_setup's
and the loop with checkpoints, exact resume, export and metrics is vimpac.trainer.Trainer; what is fine-tuning's
own is `FinetuneTask` (the classification loss and the multi-view evaluation) and the weights' loading.

Weights (`--load DIR`): DIR (or DIR/export) holds `config.json` + `model.safetensors` written by pre-training or a
fine-tuning run; they are read without pickle. The architecture comes from that config; the clip length and frame
size too, unless --clip-len / --frame-size name another shape, which needs --different-shape (the positional
tables are then interpolated per axis, vimpac.interpolate) and is otherwise an error naming both shapes. The
backbone's dropout is --dropout. Pre-training heads are dropped; a classifier of the same number of classes is
loaded too (how --eval-only evaluates a fine-tuned export). Without --load the model is trained from scratch, with
--vocab-size and --frame-size, when not given, those of --data (vimpac.config.fill_from_database).

Evaluation (docs/reference.md §6.6): every test view × K clips per video, softmax per view, probabilities averaged; each
rank evaluates its share and the results are gathered so that every video counts exactly once whatever the world
size (vimpac.sharded_eval). Results go to <output>/eval/<name>.json, TensorBoard and
metrics.jsonl (eval/top1_clips<K>, eval/top5_clips<K>, eval/loss_clips<K>).

Low-label regime (`--labels-per-class N`): every rank trains on the same vimpac.finetune_data.label_subset of the
training split (N per class, chosen by --labels-seed, default --seed); the evaluation set is unchanged. A subset
smaller than one global batch is seen subset_repeats times per epoch, so every epoch takes an optimizer step.
run_config.json records it under "label_subset".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vimpac.checkpoint import check_same_tokenizer, export_folder, read_export
from vimpac.clip_windows import check_same_clip_rate
from vimpac.code_db import CodeDatabase, check_dataset_name, check_same_tokenizer_databases, extraction_differences
from vimpac.config import (
    ARCHITECTURE_FLAGS,
    VimpacConfig,
    config_from_args,
    fill_architecture,
    fill_from_database,
    grid_from_frame_size,
)
from vimpac.ds_config import load_json, precision_of
from vimpac.errors import UsageError
from vimpac.finetune_data import (
    FinetuneTestClips,
    FinetuneTrainClips,
    average_view_probabilities,
    classification_metrics,
    evaluation_views,
    shared_videos_warning,
    split_names,
    subset_repeats,
    training_views,
)
from vimpac.interpolate import SHAPE_FIELDS, model_differences, resize_positional_state
from vimpac.modeling import VimpacForClassification
from vimpac.run_setup import (
    launch_world,
    lock_run,
    merged_engine_config,
    plan_schedule,
    record_run,
    refuse_existing_run,
    start_engine,
    train_settings,
)
from vimpac.sharded_eval import evaluate_sharded
from vimpac.tokenization.views import view_list
from vimpac.trainer import Metric, Task, Trainer, check_database_matches, steps_summary

# docs/reference.md §6.5: AdamW β (0.9, 0.999), eps 1e-8, decay 0.01, lr 1e-4 (small/base), batch 128.
OPTIMIZER_DEFAULTS = {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
DEFAULT_BATCH = 128
LOAD_HINT = "point it at the export/ folder of a pre-training (or fine-tuning) run"
DEFAULT_CLIP_LEN = VimpacConfig().clip_len  # without --load and --clip-len
EVAL_DIR = "eval"


# ------------------------------------------------------------------------------------------------ weights


def load_exported(path: str | Path) -> tuple[VimpacConfig, dict[str, torch.Tensor]]:
    """(model config, fp32 state dict) of exported weights, read with safetensors (no pickle)."""
    config, state, _ = read_export(export_folder(path, "--load", LOAD_HINT))
    return config, state


def describe_shape(config: VimpacConfig) -> str:
    t, h, w = config.shape
    return f"(T, h, w) = ({t}, {h}, {w}), i.e. --clip-len {t} --frame-size {h * 8}"


def flags_against_checkpoint(args: argparse.Namespace, saved: VimpacConfig) -> list[str]:
    """The architecture fields (ARCHITECTURE_FLAGS, --vocab-size) the command line gives other values than the
    checkpoint `saved` has; flags not given (None) take the checkpoint's."""
    flags = argparse.Namespace(**vars(args))
    fill_architecture(flags, saved)
    asked = {field: getattr(flags, flag) for flag, field in ARCHITECTURE_FLAGS.items()}
    asked["pre_ln"] = flags.pre_ln or flags.pre_ln_original
    if getattr(args, "vocab_size", None) is not None:
        asked["vocab_size"] = args.vocab_size
    config = VimpacConfig.from_dict({**saved.to_dict(), **asked})
    return [name for name in model_differences(saved, config) if name in {*asked, "pre_ln_original"}]


def finetune_config(args: argparse.Namespace, saved: VimpacConfig | None) -> VimpacConfig:
    """The model to fine-tune: the checkpoint's architecture (or the flags' without --load, whose --vocab-size and
    --frame-size must be filled in: fill_from_database), the backbone dropout of --dropout, and the checkpoint's
    clip length / frame size unless --clip-len / --frame-size change them, which needs --different-shape."""
    if saved is None:
        flags = argparse.Namespace(**vars(args))
        flags.clip_len = args.clip_len if args.clip_len is not None else DEFAULT_CLIP_LEN
        fill_architecture(flags, VimpacConfig())
        return config_from_args(flags)
    ignored = flags_against_checkpoint(args, saved)
    if ignored:
        detail = ", ".join(
            f"{name} {saved.num_heads if name == 'heads' else getattr(saved, name)!r}" for name in ignored
        )
        raise UsageError(
            f"the command line asks for another model than the checkpoint {args.load} holds ({detail} there): "
            "fine-tuning keeps the loaded architecture, so drop those flags (only --clip-len / --frame-size, with "
            "--different-shape, and --dropout may change)"
        )
    fields = saved.to_dict()
    fields["dropout"] = args.dropout
    if args.clip_len is not None:
        fields["clip_len"] = args.clip_len
    if args.frame_size is not None:
        fields["grid"] = list(grid_from_frame_size(args.frame_size))
    config = VimpacConfig.from_dict(fields)
    if config.shape != saved.shape and not args.different_shape:
        raise UsageError(
            f"the checkpoint {args.load} was pre-trained at {describe_shape(saved)}, but fine-tuning asks for "
            f"{describe_shape(config)}; pass --different-shape to interpolate its positional tables to the new "
            "shape, or drop --clip-len / --frame-size to keep the checkpoint's"
        )
    return config


def initial_state(
    model: VimpacForClassification, state: dict[str, torch.Tensor], saved: VimpacConfig, config: VimpacConfig
) -> list[str]:
    """Load exported `state` (model `saved`) into `model` (model `config`: same but for shape and dropout):
    positional tables interpolated, pre-training heads dropped, a classifier of the right size loaded. Returns
    the names of the parameters left at their initial values (the classifier, unless it was loaded)."""
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise UsageError("the loaded weights hold no backbone.* tensors; is this a VIMPAC export?")
    backbone = resize_positional_state(backbone, saved, config, allowed=(*SHAPE_FIELDS, "dropout"))
    own = model.state_dict()
    head = {k: v for k, v in state.items() if k.startswith("classifier.") and k in own and v.shape == own[k].shape}
    result = model.load_state_dict({**backbone, **head}, strict=False)
    if result.unexpected_keys or any(k.startswith("backbone.") for k in result.missing_keys):
        raise UsageError(
            f"the loaded weights do not fit the model: missing {result.missing_keys}, unexpected "
            f"{result.unexpected_keys}"
        )
    return list(result.missing_keys)


# --------------------------------------------------------------------------------------------- evaluation


def forward_in_chunks(
    model: torch.nn.Module, tokens: torch.Tensor, chunk: int, retry_smaller: bool = True
) -> tuple[torch.Tensor, int]:
    """(fp32 logits [N, C] of tokens [N, T, h, w], the chunk size that worked): forward `chunk` clips at a time,
    halving the chunk after a CUDA out-of-memory error (down to 1 clip, then the error is raised). The returned
    size is where the next batch should start, so one OOM is paid once per evaluation, not once per batch.

    retry_smaller=False raises at the first out-of-memory error, saying which --eval-batch-size to pass: under
    ZeRO-3 over several ranks each forward gathers parameters with the other ranks, and a rank that retried alone
    would run more forwards than they do and hang them."""
    while True:
        try:
            return torch.cat([model(part).float() for part in tokens.split(chunk)]), chunk
        except torch.OutOfMemoryError as err:
            if chunk == 1:
                raise
            if not retry_smaller:
                raise torch.OutOfMemoryError(
                    f"{err}\nevaluation ran out of memory at {chunk} clips per forward pass; under ZeRO-3 over "
                    f"several ranks it cannot retry with fewer (the ranks gather parameters together): rerun with "
                    f"--eval-batch-size {chunk // 2}"
                ) from err
            chunk = max(1, chunk // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@torch.no_grad()
def evaluate_clips(
    model: torch.nn.Module,
    dataset: FinetuneTestClips,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
    clips_per_forward: int = 32,
    num_workers: int = 0,
    retry_smaller: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [N, C], per-video mean cross-entropy over views [N]) of every video of `dataset`, in its
    order, each counted once (vimpac.sharded_eval). `model` maps tokens [B, T, h, w] to logits [B, C]; it runs in
    eval mode and is put back; `clips_per_forward` is halved on out-of-memory unless `retry_smaller` is false
    (forward_in_chunks). A collective: every rank calls it."""
    views = len(dataset.views) * dataset.num_clips
    chunk = clips_per_forward

    def rows_of(batch: dict[str, Any]) -> torch.Tensor:
        nonlocal chunk
        tokens = batch["tokens"].flatten(0, 1).to(device)  # [B·V, T, h, w]
        logits, chunk = forward_in_chunks(model, tokens, chunk, retry_smaller)
        logits = logits.view(-1, views, logits.shape[-1])
        labels = batch["label"].to(device)
        probs = average_view_probabilities(logits)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(views), reduction="none")
        return torch.cat([probs, loss.view(-1, views).mean(dim=1, keepdim=True)], dim=1)

    batch_size = max(1, clips_per_forward // views)
    result = evaluate_sharded(
        model, dataset, rows_of, rank=rank, world=world, batch_size=batch_size, num_workers=num_workers
    )
    return result[:, :-1], result[:, -1]


@dataclass
class FinetuneTask(Task):
    """Label-smoothed cross-entropy on one clip per video; evaluation on `test_sets` (K → FinetuneTestClips with K
    clips): epochs ending with an evaluation (every eval_every-th) use K = num_test_clips, the last epoch every K
    of last_test_clips (num_test_clips first, then --last-test-clips)."""

    label_smoothing: float
    test_sets: dict[int, FinetuneTestClips]
    num_test_clips: int
    last_test_clips: list[int]
    clips_per_forward: int

    producer = "vimpac.finetune"
    loss_key = "loss/train"

    def compute_loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Metric]]:
        labels = batch["label"].to(engine.device)
        logits = engine(batch["tokens"].to(engine.device)).float()
        # (1 - ε)·NLL + ε·mean_c(−log p_c) (docs/reference.md §6.2): torch's label_smoothing is exactly this.
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"loss/train": loss.detach(), "accuracy/train": accuracy}

    def run_evaluation(self, trainer: Trainer, clip_counts: list[int], name: str, epoch: int) -> dict[str, float]:
        """Evaluate at every K of `clip_counts`; rank 0 writes <output>/eval/<name>_clips<K>.json. Collective."""
        engine, rank, world = trainer.engine, trainer.rank, trainer.world
        values = {}
        for k in clip_counts:
            dataset = self.test_sets[k]
            probs, losses = evaluate_clips(
                engine.module,
                dataset,
                engine.device,
                rank,
                world,
                self.clips_per_forward,
                retry_smaller=world == 1 or engine.zero_optimization_stage() < 3,
            )
            metrics = classification_metrics(probs.cpu(), dataset.labels, dataset.class_names)
            values[f"eval/top1_clips{k}"] = metrics["top1"]
            values[f"eval/top5_clips{k}"] = metrics["top5"]
            values[f"eval/loss_clips{k}"] = float(losses.mean())
            if rank == 0:
                predicted = probs.argmax(dim=1).tolist()
                record = {
                    "name": name,
                    "epoch": epoch,
                    "step": int(engine.global_steps),
                    "database": str(dataset.db.path),
                    "split": dataset.split,
                    "num_videos": len(dataset),
                    "num_test_clips": k,
                    "single_clip": dataset.single_clip,  # where the clip of K = 1 lies (start or centre)
                    "views": dataset.views,
                    "views_per_video": k * len(dataset.views),
                    "world_size": world,
                    "loss": float(losses.mean()),
                    **metrics,
                    "predictions": dict(zip(dataset.ids, predicted)),
                }
                folder = trainer.output / EVAL_DIR
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{name}_clips{k}.json").write_text(json.dumps(record, indent=1) + "\n")
                print(
                    f"{name}: {len(dataset)} videos × {k} clips × {len(dataset.views)} views: top-1 "
                    f"{metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, loss {float(losses.mean()):.4f}",
                    flush=True,
                )
        return values

    def evaluate(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        if epoch + 1 == trainer.settings.epochs:
            return self.run_evaluation(trainer, self.last_test_clips, "final", epoch)
        if not trainer.evaluation_epoch(epoch):
            return {}
        return self.run_evaluation(trainer, [self.num_test_clips], f"epoch{epoch:03d}", epoch)


# ------------------------------------------------------------------------------------------------- build


def parse_clip_counts(text: str | None, default: int) -> list[int]:
    """--last-test-clips "2,5,10" → [2, 5, 10] (None: [default])."""
    if text is None:
        return [default]
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--last-test-clips must be a comma list of clip counts, e.g. 2,5,10; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise UsageError(f"--last-test-clips must list counts >= 1; got {text!r}")
    return sorted(set(counts), key=counts.index)


def label_subset_record(train_set: FinetuneTrainClips) -> dict[str, Any] | None:
    """run_config.json's "label_subset": N, the seed, the chosen count K of the split's M videos, the passes per
    epoch and the chosen ids (sorted; N is small in this regime); None without --labels-per-class."""
    if train_set.labels_per_class is None:
        return None
    return {
        "labels_per_class": train_set.labels_per_class,
        "seed": train_set.labels_seed,
        "num_videos": len(train_set.ids),
        "split_videos": train_set.split_videos,
        "repeats_per_epoch": train_set.repeats,
        "ids": list(train_set.ids),
    }


def label_subset_line(train_set: FinetuneTrainClips, global_batch: int) -> str:
    """'training on K of M labeled videos (N per class)', and the repeats when the subset is under one batch."""
    line = (
        f"training on {len(train_set.ids)} of {train_set.split_videos} labeled videos "
        f"({train_set.labels_per_class} per class)"
    )
    if train_set.repeats > 1:
        line += f"; each epoch passes over them {train_set.repeats} times to fill a global batch of {global_batch}"
    return line


def build_and_finetune(args: argparse.Namespace, debug_steps: int) -> int:
    """Everything after parsing; returns the exit code. UsageError for bad input, before the process group."""
    output = Path(args.output)
    from vimpac.checkpoint import needs_universal_loading, with_universal_loading

    refuse_existing_run(output, args.resume or args.eval_only)
    lock_run(output)
    saved, state = load_exported(args.load) if args.load else (None, None)
    if args.eval_only and state is None:
        raise UsageError("--eval-only needs --load with fine-tuned weights (the export/ folder of a fine-tuning run)")
    train_db = CodeDatabase(args.data)
    eval_db = CodeDatabase(args.eval_data) if args.eval_data else train_db
    # From scratch, --vocab-size / --frame-size not given are --data's; with --load, the export's.
    taken = fill_from_database(args, train_db.manifest, args.data) if saved is None else None
    config = finetune_config(args, saved)

    loaded = export_folder(args.load, "--load", LOAD_HINT) if args.load else None
    for db, path in ((train_db, args.data), (eval_db, args.eval_data or args.data)):
        check_same_tokenizer(loaded, db.manifest, path)
    check_same_tokenizer_databases(
        train_db.manifest, eval_db.manifest, f"--data {args.data}", f"--eval-data {args.eval_data}"
    )
    dataset_name = train_db.manifest.get("dataset")
    for db in (train_db, eval_db):
        check_dataset_name(args.dataset_name, db.manifest, db.path)
        try:
            check_database_matches(db.manifest, config)
        except UsageError as err:
            raise UsageError(f"{db.path}: {err}") from None
    if list(train_db.manifest.get("classes") or []) != list(eval_db.manifest.get("classes") or []):
        raise UsageError(f"{args.data} and {args.eval_data} list different classes")
    rate = check_same_clip_rate(float(train_db.manifest["fps"]), float(eval_db.manifest["fps"]), args.frame_rate)
    made_differently = extraction_differences(train_db.manifest, eval_db.manifest)
    if made_differently and os.environ.get("RANK", "0") == "0":
        print(
            f"warning: {args.data} and {args.eval_data} picked or resized frames differently "
            f"({'; '.join(made_differently)}): training and evaluation see slightly different frames "
            "(`vimpac tokenize --frame-selection` makes a matching database)",
            file=sys.stderr,
            flush=True,
        )
    default_train, default_eval = split_names(dataset_name, args.split_id)
    train_split, eval_split = args.train_split or default_train, args.eval_split or default_eval
    frame_size = eval_db.manifest.get("frame_size")
    views_train = view_list(args.train_views, "--train-views") or training_views(train_db.views, dataset_name)
    views_test = view_list(args.test_views, "--test-views") or evaluation_views(eval_db.views, dataset_name, frame_size)
    # The last epoch is evaluated at --num-test-clips as every other, then at each extra K of --last-test-clips.
    last_clips = list(
        dict.fromkeys([args.num_test_clips, *parse_clip_counts(args.last_test_clips, args.num_test_clips)])
    )
    clip_counts = sorted(last_clips)
    common = {"pad_id": config.pad_id, "frame_rate": args.frame_rate, "on_bad_record": args.on_bad_record}
    subset: dict[str, Any] = {}
    if args.labels_per_class is not None:
        # The whole evaluation split as listed (bad records included): a chosen video among them is refused.
        eval_ids = eval_db.ids(eval_split)
        subset = {"labels_per_class": args.labels_per_class, "labels_seed": args.labels_seed, "eval_ids": eval_ids}
    train_set = FinetuneTrainClips(
        train_db, train_split, config.clip_len, views=views_train, seed=args.seed, **subset, **common
    )
    test_sets = {
        k: FinetuneTestClips(
            eval_db, eval_split, config.clip_len, views=views_test, num_clips=k, single_clip=args.single_clip, **common
        )
        for k in clip_counts
    }
    num_classes = train_set.num_classes
    shared = shared_videos_warning(train_set.ids, eval_db.ids(eval_split), train_split, eval_split)
    if shared and os.environ.get("RANK", "0") == "0":
        print(shared, file=sys.stderr, flush=True)

    base = load_json(args.deepspeed_config) if args.deepspeed_config else {}
    if args.batch_size is None and "train_batch_size" not in base:
        args.batch_size = DEFAULT_BATCH
    world = launch_world()
    ds_config = merged_engine_config(args, world, optimizer_defaults=OPTIMIZER_DEFAULTS)
    if args.resume and needs_universal_loading(output, world, ds_config["zero_optimization"]["stage"]):
        ds_config = with_universal_loading(ds_config)  # ZeRO shards of another world size are re-partitioned
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    if args.labels_per_class is not None:
        # A few labels may not fill one global batch (the sampler drops partial batches): repeat the subset within
        # the epoch instead of refusing, since fewer videos than a batch is the point of the low-label regime.
        train_set.repeats = subset_repeats(len(train_set.ids), world * micro * accumulation)
    schedule = plan_schedule(args, ds_config, len(train_set), world, debug_steps, evaluation_only=args.eval_only)

    def make_model() -> VimpacForClassification:
        model = VimpacForClassification(config, num_classes, dropout=args.last_dropout)
        untouched = initial_state(model, state, saved, config) if state is not None else None
        if args.eval_only and untouched:
            raise UsageError(f"--eval-only: {args.load} holds no classifier for {num_classes} classes (fine-tuned?)")
        return model

    engine, rank = start_engine(args, ds_config, schedule, make_model)
    task = FinetuneTask(
        label_smoothing=args.label_smoothing,
        test_sets=test_sets,
        num_test_clips=args.num_test_clips,
        last_test_clips=last_clips,
        clips_per_forward=args.eval_batch_size or 4 * micro,
    )
    trainer = Trainer(engine, config, train_set, train_settings(args, schedule), output, ds_config, task)
    if args.eval_only:
        output.mkdir(parents=True, exist_ok=True)
        values = task.run_evaluation(trainer, last_clips, "eval_only", -1)
        trainer.writer.write(int(engine.global_steps), -1, values)
        trainer.writer.close()
        return 0
    resumed = trainer.resume() if args.resume else False
    if rank == 0:
        record_run(
            output,
            args,
            deepspeed=ds_config,
            model=config.to_dict(),
            num_classes=num_classes,
            loaded=str(loaded) if loaded else None,
            pretrained_from_shape=list(saved.shape) if saved else None,
            train_split=train_split,
            eval_split=eval_split,
            train_views=views_train,
            test_views=views_test,
            clip_rate=rate,
            single_clip=args.single_clip,
            precision=precision_of(ds_config),
            world_size=world,
            steps_per_epoch=trainer.steps_per_epoch,
            total_steps=schedule.total,
            warmup_steps=schedule.warmup,
            resumed=resumed,
            label_subset=label_subset_record(train_set),
        )
        source = f"weights of {loaded}" if loaded else "scratch (no --load)"
        if taken is not None:
            print(taken, flush=True)
        print(f"fine-tuning from {source}: {num_classes} classes, model {describe_shape(config)}", flush=True)
        print(f"train {train_split}: views {views_train}; eval {eval_split}: views {views_test}", flush=True)
        if train_set.labels_per_class is not None:
            print(label_subset_line(train_set, trainer.global_batch), flush=True)
        print(steps_summary(trainer), flush=True)
    trainer.fit()
    return 0
