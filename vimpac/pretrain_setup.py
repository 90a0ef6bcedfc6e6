"""Pre-training: its task for the shared loop (masked-token + contrastive loss, throughput, kNN monitor) and the
run built from parsed flags (data, model, engine; the shared steps are vimpac.run_setup's).

Called by the entry script `vimpac/pretrain.py` after `vimpac.dist_setup.prepare_environment()`. Each micro-batch
holds B videos × 2 clips ([B, 2, T, h, w], vimpac.data.PretrainClips); it is reordered to [2B, T, h, w] with the B
first clips first, one forward pass over the masked clips feeds both losses (docs/reference.md §5.1, §5.5), and
    loss = mlm_weight · L_mask + nce_weight · L_cl      (L_cl already carries the temperature factor).

`--resume` with another clip length or frame size than the checkpoint (stage-2 pre-training, docs/reference.md §5.7)
loads it with the positional tables and their Adam moments interpolated (vimpac.checkpoint.load_resized_checkpoint) and
keeps the optimizer step, LR-scheduler position and loss scale, so the schedule continues: with the same --epochs, batch
size and number of videos (the same videos tokenized at the new frame size) the total step count, and so every later
learning rate, is unchanged. The position inside an epoch does not carry over, since it indexes the old database's
shuffled order: the run continues at the next epoch boundary (a checkpoint written mid-epoch, with --save-steps, skips
the rest of that epoch, so the schedule then ends short of its last steps).

`--resume-from RUN_DIR` continues the newest checkpoint of another run directory the same way (at the same shape:
exactly where it stopped; at another: as above) while writing to --output, so stage 2 gets its own run directory and
stage 1's checkpoints and export stay as they were: RUN_DIR is only read (a resized copy is staged under --output).
It applies while --output holds no checkpoint; after that, --resume continues --output's own (checkpoint_source).

`--load EXPORT` starts from exported weights (load_export_weights) with a fresh optimizer and schedule, as the
original's --load did; a checkpoint that --resume / --resume-from continues replaces them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vimpac.checkpoint import (
    check_same_tokenizer,
    checkpoint_root,
    export_folder,
    latest_tag,
    load_resized_checkpoint,
    needs_universal_loading,
    resize_source,
    with_universal_loading,
)
from vimpac.code_db import CodeDatabase, check_dataset_name, check_same_tokenizer_databases, read_manifest
from vimpac.config import VimpacConfig, config_from_args, fill_from_database
from vimpac.data import PretrainClips
from vimpac.dist_setup import cpu_accelerator
from vimpac.ds_config import precision_of
from vimpac.entry import check_launch_arguments
from vimpac.errors import UsageError
from vimpac.flops import peak_flops, pretrain_train_flops
from vimpac.knn import knn_monitor_from_args
from vimpac.losses import info_nce, masked_token_loss
from vimpac.modeling import VimpacForPretraining
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
from vimpac.trainer import Metric, Task, Trainer, check_database_matches, steps_summary

if TYPE_CHECKING:
    from vimpac.knn import KnnMonitor


def micro_batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[B, 2, T, h, w] inputs/labels → [2B, T, h, w] with clip A of every video first; returns (tokens, labels, B)."""
    inputs, labels = batch["inputs"], batch["labels"]
    videos = inputs.shape[0]
    return inputs.transpose(0, 1).flatten(0, 1), labels.transpose(0, 1).flatten(0, 1), videos


@dataclass
class PretrainTask(Task):
    """Masked-token and contrastive losses; throughput and model FLOPs per step; the kNN monitor (vimpac.knn) after
    every `eval_every`-th epoch and the last, when there is one. peak_flops: per rank, for speed/mfu."""

    mlm_weight: float = 1.0
    nce_weight: float = 1.0
    temperature: float = 0.2
    peak_flops: float | None = None
    knn: KnnMonitor | None = None

    producer = "vimpac.pretrain"

    def compute_loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Metric]]:
        tokens, labels, videos = micro_batch_tokens(batch)
        device = engine.device
        out = engine(tokens.to(device), labels.to(device))
        loss = torch.zeros((), device=device)
        metrics: dict[str, Metric] = {}
        if "mlm_logits" in out:
            mlm = masked_token_loss(out["mlm_logits"], out["mlm_labels"])
            loss = loss + self.mlm_weight * mlm.loss
            metrics["loss/mlm"] = mlm.loss.detach()
            metrics["accuracy/mlm"] = (mlm.accuracy, mlm.num_masked)
            metrics["predicted_per_micro_step"] = mlm.num_masked
        if "nce" in out:
            nce = info_nce(out["nce"][:videos], out["nce"][videos:], temperature=self.temperature)
            loss = loss + self.nce_weight * nce.loss
            metrics["loss/nce"] = nce.loss.detach()
            metrics["accuracy/nce"] = nce.accuracy
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def step_metrics(self, trainer: Trainer, values: dict[str, float], elapsed: float) -> None:
        predicted = values.pop("predicted_per_micro_step", 0.0) * trainer.accumulation * trainer.world
        clips = 2 * trainer.global_batch
        t, h, w = trainer.config.shape
        values["speed/tokens_per_s"] = clips * t * h * w / elapsed
        values["speed/clips_per_s"] = clips / elapsed
        flops = pretrain_train_flops(
            trainer.config, clips, round(predicted), mlm=self.mlm_weight > 0, nce=self.nce_weight > 0
        )
        values["speed/tflops_per_rank"] = flops / elapsed / trainer.world / 1e12
        if self.peak_flops:
            values["speed/mfu"] = flops / elapsed / trainer.world / self.peak_flops

    def evaluate(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        if self.knn is None or not trainer.evaluation_epoch(epoch):
            return {}
        engine = trainer.engine
        values = self.knn.evaluate(engine.module.backbone, engine.device, trainer.rank, trainer.world)
        if trainer.rank == 0:
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
        return values


def check_objective(mlm_weight: float, nce_weight: float, temperature: float) -> None:
    """UsageError for loss weights and a temperature that cannot train."""
    if not (0 <= mlm_weight < math.inf and 0 <= nce_weight < math.inf) or mlm_weight + nce_weight <= 0:
        raise UsageError(
            f"--mlm-weight and --nce-weight must be >= 0 and not both 0; got {mlm_weight:g} and {nce_weight:g}"
        )
    if not 0 < temperature < math.inf:
        raise UsageError(f"--temperature must be positive (InfoNCE divides by it); got {temperature:g}")


def check_contrastive_batch(nce_weight: float, world: int, micro_batch: int) -> None:
    """UsageError when the contrastive loss is on but a micro-step holds one video over all ranks: its negatives
    are the other videos, so the loss would be exactly 0 with no gradient (and its accuracy 1)."""
    if nce_weight > 0 and world * micro_batch < 2:
        raise UsageError(
            f"the contrastive loss needs at least 2 videos per micro-step over all ranks (its negatives are the "
            f"other videos), but {world} rank(s) × --bs-per-gpu {micro_batch} gives {world * micro_batch}; raise "
            "--bs-per-gpu, add ranks, or pass --nce-weight 0"
        )


def check_database(db: CodeDatabase, args: argparse.Namespace, model_config: VimpacConfig) -> None:
    """UsageError when --data is not the --dataset-name asked for, or does not fit the model."""
    check_dataset_name(args.dataset_name, db.manifest, args.data)
    check_database_matches(db.manifest, model_config)


def recorded_total_steps(output: Path) -> int | None:
    """total_steps of the previous launch's run_config.json (None when there is none)."""
    path = output / "run_config.json"
    try:
        return int(json.loads(path.read_text())["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_source(args: argparse.Namespace, output: Path) -> Path | None:
    """The run directory whose newest checkpoint this launch continues: --output's own when it has one (which
    refuse_existing_run lets through only with --resume), else --resume-from's; None for a fresh start.
    UsageError when --resume-from is needed but holds no checkpoint."""
    if latest_tag(output) is not None:
        return output
    if args.resume_from is None:
        return None
    source = Path(args.resume_from)
    if latest_tag(source) is None:
        raise UsageError(
            f"--resume-from {source}: no complete checkpoint in {checkpoint_root(source)}; point it at the run "
            "directory (--output) of a pre-training run that has saved one"
        )
    return source


def check_resumable_objective(source: Path, args: argparse.Namespace) -> None:
    """UsageError when the run directory `source` (whose checkpoint this launch continues) was trained with heads or
    optimizer groups this launch would not build: the checkpoint's state would not load (a traceback from the
    engine). Read from its run_config.json; a directory without one is not checked."""
    path = source / "run_config.json"
    if not path.is_file():
        return
    run = json.loads(path.read_text())
    saved = run.get("args") or {}
    if "test_views" in run:
        raise UsageError(
            f"{source} is a fine-tuning run: --resume/--resume-from continue pre-training runs; start from its "
            f"weights instead with --load {source}/export"
        )
    for flag, name in (("--mlm-weight", "mlm_weight"), ("--nce-weight", "nce_weight")):
        before, now = float(saved.get(name, 1.0)), float(getattr(args, name))
        if (before > 0) != (now > 0):
            head = "masked-token" if name == "mlm_weight" else "contrastive"
            raise UsageError(
                f"the checkpoint of {source} was trained {'with' if before > 0 else 'without'} the {head} head "
                f"({flag} {before:g}); resume with {flag} {'> 0' if before > 0 else '0'}, or start a new --output "
                f"with --load {source}/export"
            )
    before = saved.get("decay_groups", "structural")
    if before != args.decay_groups:
        raise UsageError(
            f"the checkpoint of {source} was trained with --decay-groups {before}: its optimizer state holds those "
            f"groups; resume with --decay-groups {before}"
        )


def resume_resized(trainer: Trainer, source: Path, tag: str, saved: VimpacConfig, previous_total: int | None) -> bool:
    """Resume checkpoint `tag` of run directory `source`, a model `saved` that differs from the trainer's in
    clip_len / grid only: load it interpolated, then continue at the epoch boundary after the checkpoint (see the
    module docstring)."""
    zero_stage = int(trainer.engine.zero_optimization_stage())
    state = load_resized_checkpoint(
        trainer.engine, source, tag, saved, trainer.config, zero_stage, scratch_run=trainer.output
    )
    trainer.epoch = int(state["epoch"]) + (1 if int(state["step_in_epoch"]) > 0 else 0)
    trainer.step_in_epoch = 0
    if trainer.rank == 0:
        step = int(trainer.engine.global_steps)
        where = tag if source == trainer.output else checkpoint_root(source) / tag
        print(
            f"resumed {where} at a new shape: (T, h, w) {saved.shape} -> {trainer.config.shape}, positional tables "
            f"and their Adam moments interpolated ({saved.pos_emb}); continuing at epoch {trainer.epoch}, optimizer "
            f"step {step} of {trainer.total_steps}",
            flush=True,
        )
        if previous_total is not None and previous_total != trainer.total_steps:
            print(
                f"note: the previous launch planned {previous_total} steps and this one {trainer.total_steps} "
                "(a different number of videos, batch size or --epochs): the learning-rate schedule continues "
                f"from step {step} with the new total",
                flush=True,
            )
    return True


def load_export_weights(model: VimpacForPretraining, load: str, config: VimpacConfig) -> list[str]:
    """Load an export (`--load`: config.json + model.safetensors, or a run directory) into `model` (of `config`):
    the backbone, interpolated when only the clip length / frame size differ (any other architecture difference
    is a UsageError naming it), and the MLM / contrastive heads it holds in the same shapes; a classifier is
    dropped. Returns the names left at their initial values (heads the export lacks)."""
    from vimpac.finetune_setup import load_exported
    from vimpac.interpolate import SHAPE_FIELDS, resize_positional_state

    saved, state = load_exported(load)
    state = resize_positional_state(state, saved, config, allowed=(*SHAPE_FIELDS, "dropout"))
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k.startswith("backbone.") or (k in own and v.shape == own[k].shape)}
    kept = {k: v for k, v in kept.items() if not k.startswith("classifier.")}
    result = model.load_state_dict(kept, strict=False)
    if result.unexpected_keys or any(k.startswith("backbone.") for k in result.missing_keys):
        raise UsageError(f"--load {load}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return list(result.missing_keys)


def build_and_train(args: argparse.Namespace, debug_steps: int) -> int:
    """Everything after parsing; returns the exit code. Raises UsageError for bad input before training."""
    output = Path(args.output)
    refuse_existing_run(output, args.resume)
    lock_run(output)
    check_launch_arguments(args)
    check_objective(args.mlm_weight, args.nce_weight, args.temperature)
    db = CodeDatabase(args.data)
    taken = fill_from_database(args, db.manifest, args.data)  # --vocab-size / --frame-size not given
    model_config = config_from_args(args)
    source = checkpoint_source(args, output)  # the run directory whose checkpoint this launch continues
    if source is not None:
        check_resumable_objective(source, args)
    resize = resize_source(source, model_config) if source else None  # (tag, saved config): shape changed
    check_database(db, args, model_config)
    world = launch_world()
    ds_config = merged_engine_config(args, world)
    check_contrastive_batch(args.nce_weight, world, ds_config["train_micro_batch_size_per_gpu"])
    stage = ds_config["zero_optimization"]["stage"]
    other_world = source is not None and needs_universal_loading(source, world, stage)
    if (resize is not None and stage >= 1) or other_world:
        ds_config = with_universal_loading(ds_config)  # a resized or re-partitioned checkpoint is a universal one
    dataset = PretrainClips(
        db,
        args.split,
        model_config.clip_len,
        pad_id=model_config.pad_id,
        mask_id=model_config.mask_id,
        mask_blocks=args.mask_blocks,
        frame_rate=args.frame_rate,
        rand_replace=args.mask_rand_replace,
        relevance_range=args.nce_relevance_range,
        seed=args.seed,
        mlm_weight=args.mlm_weight,
        on_bad_record=args.on_bad_record,
    )
    knn = knn_monitor_from_args(args, model_config)  # checks its database before any process group exists
    if knn is not None:
        monitored = read_manifest(args.knn_monitor)
        check_same_tokenizer_databases(
            db.manifest, monitored, f"--data {args.data}", f"--knn-monitor {args.knn_monitor}"
        )
    schedule = plan_schedule(args, ds_config, len(dataset), world, debug_steps)

    load = getattr(args, "load", None)
    if load is not None:  # refuse a mismatched export before any process group exists
        check_same_tokenizer(export_folder(load, "--load"), dataset.db.manifest, args.data)
        load_export_weights(VimpacForPretraining(model_config, mlm=False, nce=False), load, model_config)

    def make_model() -> VimpacForPretraining:
        model = VimpacForPretraining(model_config, mlm=args.mlm_weight > 0, nce=args.nce_weight > 0)
        if load is not None:
            fresh = load_export_weights(model, load, model_config)
            print(f"weights from --load {load}" + (f"; initialised fresh: {fresh}" if fresh else ""), flush=True)
        return model

    engine, rank = start_engine(args, ds_config, schedule, make_model)
    precision = precision_of(ds_config)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and not cpu_accelerator():
        peak = peak_flops(torch.cuda.get_device_name(), precision)
    task = PretrainTask(args.mlm_weight, args.nce_weight, args.temperature, peak, knn)
    trainer = Trainer(engine, model_config, dataset, train_settings(args, schedule), output, ds_config, task)
    start_tag = latest_tag(source) if source else None
    if resize is not None:
        resumed = resume_resized(trainer, source, *resize, recorded_total_steps(source))
    else:
        resumed = trainer.resume(source) if source else False
    if resumed and source != output and trainer.epoch >= args.epochs:
        # Every rank sees the same checkpoint, so every rank stops here (no collective is left waiting).
        raise UsageError(
            f"--resume-from {source}: its newest checkpoint is at epoch {trainer.epoch} of the {args.epochs}-epoch "
            "schedule, so nothing is left for this run; was that stage run past its end (--stop-epoch)?"
        )
    if rank == 0:
        record_run(
            output,
            args,
            deepspeed=ds_config,
            model=model_config.to_dict(),
            world_size=world,
            steps_per_epoch=trainer.steps_per_epoch,
            total_steps=schedule.total,
            warmup_steps=schedule.warmup,
            peak_flops=peak,
            resumed=resumed,
            resumed_from=str(checkpoint_root(source) / start_tag) if resumed else None,
            **({"loaded": load} if load is not None else {}),
        )
        if taken is not None:
            print(taken, flush=True)
        print(steps_summary(trainer), flush=True)
        if args.nce_weight > 0:
            videos = world * trainer.micro
            print(
                f"contrastive loss: negatives from one micro-step of all ranks, {world} × {trainer.micro} = "
                f"{videos} videos, {2 * (videos - 1)} negatives per clip (the paper: 128 or 256 videos)",
                flush=True,
            )
        if knn is not None:
            print(knn.describe(), flush=True)
    trainer.fit()
    return 0
