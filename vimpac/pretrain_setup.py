"""Build a pre-training run from parsed flags: process group, merged engine config, data, model, DeepSpeed engine.

Called by the entry script `vimpac/pretrain.py` after `vimpac.dist_setup.prepare_environment()`. Order matters
for reproducibility: the model is initialised from `seed` on every rank (identical weights without relying on a
broadcast), then each rank reseeds with seed + rank for dropout.

`--resume` with another clip length or frame size than the checkpoint (stage-2 pre-training, docs/reference.md §5.7)
loads it with the positional tables and their Adam moments interpolated (vimpac.checkpoint.load_resized_checkpoint) and
keeps the optimizer step, LR-scheduler position and loss scale, so the schedule continues: with the same --epochs, batch
size and number of videos (the same videos tokenized at the new frame size) the total step count, and so every later
learning rate, is unchanged. The position inside an epoch does not carry over, since it indexes the old database's
shuffled order: the run continues at the next epoch boundary (a checkpoint written mid-epoch, with --save-steps, skips
the rest of that epoch, so the schedule then ends short of its last steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from vimpac.activation_checkpointing import enable_activation_checkpointing
from vimpac.checkpoint import (
    latest_tag,
    load_resized_checkpoint,
    needs_universal_loading,
    resize_source,
    with_universal_loading,
)
from vimpac.code_db import CodeDatabase
from vimpac.config import VimpacConfig, config_from_args
from vimpac.data import PretrainClips
from vimpac.dist_setup import init_distributed
from vimpac.ds_config import load_json, merge_ds_config, precision_of, uses_activation_checkpointing
from vimpac.entry import check_launch_arguments
from vimpac.errors import UsageError
from vimpac.flops import peak_flops
from vimpac.knn import knn_monitor_from_args
from vimpac.modeling import VimpacForPretraining
from vimpac.optim import build_scheduler, parameter_groups, warmup_steps
from vimpac.trainer import PretrainTrainer, TrainSettings, check_database_matches, epoch_steps, steps_summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def merged_engine_config(
    args: argparse.Namespace, world: int, optimizer_defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The json of --deepspeed_config merged with the command line (vimpac.ds_config). optimizer_defaults: AdamW
    params (lr, betas, eps, weight_decay) used where neither the json nor the command line names them, instead
    of the pre-training defaults (fine-tuning passes its own)."""
    base = load_json(args.deepspeed_config) if args.deepspeed_config else {}
    if optimizer_defaults:
        params = base.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
        for key, value in optimizer_defaults.items():
            params.setdefault(key, value)
    config = merge_ds_config(
        base,
        world,
        bs_per_gpu=args.bs_per_gpu,
        batch_size=args.batch_size,
        lr=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        epsilon=args.epsilon,
        weight_decay=args.weight_decay,
        clip_grad_norm=args.clip_grad_norm,
        precision=args.precision,
        zero_stage=args.zero_stage,
        grad_checkpoint=args.grad_checkpoint,
    )
    precision = precision_of(config)
    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise UsageError(
            f"fp16 is not supported on this {accelerator.device_name()} device; use ds_configs/cpu.json or "
            "--precision bf16 / fp32"
        )
    return config


def build_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    scheduler: str,
    warmup: int,
    total: int,
    compile_backend: str | None = None,
):
    """deepspeed.initialize on `model` (which has a `backbone`): AdamW groups with and without decay
    (vimpac.optim), the warm-up + decay schedule stepped per optimizer step, per-layer activation checkpointing
    when the config asks for it, and torch.compile of the module by the engine when `compile_backend` names a
    backend ("inductor" on GPUs; the Triton attention is a registered op it traces through). Returns the engine."""
    if uses_activation_checkpointing(ds_config):
        enable_activation_checkpointing(model.backbone.layers)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in parameter_groups(model, ds_config["optimizer"]["params"]["weight_decay"])
    ]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, scheduler, warmup, total),
    )
    if compile_backend is not None:
        engine.compile(backend=compile_backend)
    return engine


def open_database(args: argparse.Namespace, model_config: VimpacConfig) -> CodeDatabase:
    db = CodeDatabase(args.data)
    manifest = db.manifest
    if args.dataset_name is not None and args.dataset_name != manifest.get("dataset"):
        raise UsageError(
            f"--dataset-name {args.dataset_name} but {args.data} holds dataset {manifest.get('dataset')!r}; "
            "drop the flag or point --data at the right database"
        )
    check_database_matches(manifest, model_config)
    return db


def record_run(output: Path, args: argparse.Namespace, **sections: Any) -> None:
    """<output>/run_config.json: the command line, the merged engine config and what was derived from them."""
    output.mkdir(parents=True, exist_ok=True)
    payload = {"argv": sys.argv, "args": vars(args), **sections}
    (output / "run_config.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def recorded_total_steps(output: Path) -> int | None:
    """total_steps of the previous launch's run_config.json (None when there is none)."""
    path = output / "run_config.json"
    try:
        return int(json.loads(path.read_text())["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_resized(trainer: PretrainTrainer, tag: str, saved: VimpacConfig, previous_total: int | None) -> bool:
    """Resume checkpoint `tag` of a model `saved` that differs from the trainer's in clip_len / grid only: load it
    interpolated, then continue at the epoch boundary after the checkpoint (see the module docstring)."""
    zero_stage = int(trainer.engine.zero_optimization_stage())
    state = load_resized_checkpoint(trainer.engine, trainer.output, tag, saved, trainer.config, zero_stage)
    trainer.epoch = int(state["epoch"]) + (1 if int(state["step_in_epoch"]) > 0 else 0)
    trainer.step_in_epoch = 0
    if trainer.rank == 0:
        step = int(trainer.engine.global_steps)
        print(
            f"resumed {tag} at a new shape: (T, h, w) {saved.shape} -> {trainer.config.shape}, positional tables "
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


def build_and_train(args: argparse.Namespace, debug_steps: int) -> int:
    """Everything after parsing; returns the exit code. Raises UsageError for bad input before training."""
    output = Path(args.output)
    if not args.resume and latest_tag(output) is not None:
        raise UsageError(f"{output} already holds checkpoints; pass --resume to continue it or choose another --output")
    check_launch_arguments(args)
    # Validate everything before the process group exists: bad input fails fast, with one clear message.
    model_config = config_from_args(args)
    resize = resize_source(output, model_config) if args.resume else None  # (tag, saved config): shape changed
    db = open_database(args, model_config)
    world = int(os.environ["WORLD_SIZE"])
    ds_config = merged_engine_config(args, world)
    stage = ds_config["zero_optimization"]["stage"]
    other_world = args.resume and needs_universal_loading(output, world, stage)
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
    limit = args.max_steps_per_epoch if args.max_steps_per_epoch is not None else debug_steps if args.debug else None
    steps = epoch_steps(
        len(dataset),
        int(os.environ["WORLD_SIZE"]),
        ds_config["train_micro_batch_size_per_gpu"],
        ds_config["gradient_accumulation_steps"],
        limit,
    )
    total = steps * args.epochs
    warmup = warmup_steps(args.warm_up, total)
    rank, _, world = init_distributed(args.dist_backend)

    seed_everything(args.seed)  # same initial weights on every rank
    model = VimpacForPretraining(model_config, mlm=args.mlm_weight > 0, nce=args.nce_weight > 0)
    engine = build_engine(model, ds_config, args.lr_scheduler, warmup, total, args.compile)
    seed_everything(args.seed + rank)  # dropout differs per rank

    precision = precision_of(ds_config)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and torch.cuda.is_available():
        peak = peak_flops(torch.cuda.get_device_name(), precision)
    settings = TrainSettings(
        epochs=args.epochs,
        mlm_weight=args.mlm_weight,
        nce_weight=args.nce_weight,
        temperature=args.temperature,
        save_steps=args.save_steps,
        save_epochs=args.save_epochs,
        keep_checkpoints=args.keep_checkpoints,
        steps_per_epoch_limit=limit,
        max_epochs_this_run=args.interval,
        num_workers=args.num_workers,
        seed=args.seed,
        progress=args.tqdm,
        peak_flops=peak,
        eval_every=args.eval_per_epochs,
        knn=knn,
        max_nonfinite_steps=args.max_nonfinite_steps,
    )
    trainer = PretrainTrainer(engine, model_config, dataset, settings, output, ds_config)
    previous_total = recorded_total_steps(output)
    if resize is not None:
        resumed = resume_resized(trainer, *resize, previous_total)
    else:
        resumed = trainer.resume() if args.resume else False
    if rank == 0:
        record_run(
            output,
            args,
            deepspeed=ds_config,
            model=model_config.to_dict(),
            world_size=world,
            steps_per_epoch=trainer.steps_per_epoch,
            total_steps=total,
            warmup_steps=warmup,
            peak_flops=peak,
            resumed=resumed,
        )
        print(steps_summary(trainer), flush=True)
        if knn is not None:
            print(knn.describe(), flush=True)
    trainer.fit()
    return 0
