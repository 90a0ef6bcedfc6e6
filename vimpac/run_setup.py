"""The set-up both training entry points share, in launch order: refuse to overwrite a run, merge the engine
config, plan the schedule, build the model and the DeepSpeed engine, fill the loop's settings, record the run.

Order matters for reproducibility: the model is initialised from `seed` on every rank (identical weights without
relying on a broadcast), then each rank reseeds with seed + rank for dropout. Everything that can refuse bad input
runs before the process group exists, so a mistake fails fast with one message.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from vimpac.activation_checkpointing import enable_activation_checkpointing
from vimpac.atomic_write import write_json_atomic
from vimpac.checkpoint import checkpoint_root, complete_tags, latest_tag, original_checkpoint_advice
from vimpac.dist_setup import init_distributed, track_engine
from vimpac.ds_config import load_json, merge_ds_config, precision_of, uses_activation_checkpointing
from vimpac.errors import UsageError, require_directory
from vimpac.optim import build_scheduler, parameter_groups, warmup_steps
from vimpac.trainer import TrainSettings, epoch_steps


def refuse_existing_run(output: Path, resume: bool) -> None:
    """UsageError when `output` already holds checkpoints and --resume was not given, is not a directory, or is an
    output folder of the original release given with --resume (which would start afresh beside it)."""
    require_directory(output, "--output")
    original = original_checkpoint_advice(output)
    if resume and original and not complete_tags(output):
        raise UsageError(f"--resume --output {output}: no vimpac checkpoint to continue; {original}")
    if not resume and (complete_tags(output) or latest_tag(output) is not None):
        raise UsageError(
            f"{output} already holds checkpoints; pass --resume to continue it, choose another --output, or delete "
            f"{checkpoint_root(output)} to start over"
        )


RUN_LOCKS = ".run-locks"  # <output>/.run-locks/rank<R>.lock, one per rank of the launch running there
_held_locks: list[Any] = []  # open lock files: each flock lasts until its file is closed


def lock_run(output: Path) -> None:
    """Every rank holds an flock on <output>/.run-locks/rank<R>.lock until its launch ends: a second launch on
    the same run directory (a duplicated --resume, say) stops on each of its ranks, on every node, instead of
    pruning the first one's checkpoints and writing its metrics twice. run_reporting_errors releases the locks;
    a killed process's go with it. A file system without flock (some NFS or Lustre mounts) gets a warning."""
    rank = int(os.environ.get("RANK", "0"))
    folder = output / RUN_LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = open(folder / f"rank{rank}.lock", "a")  # noqa: SIM115 (held open until release_run_locks)
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise UsageError(
            f"another launch is running in {output} (its rank {rank} holds {folder / f'rank{rank}.lock'}); wait "
            "for it to end or choose another --output"
        ) from None
    except OSError as err:
        lock_file.close()
        if rank == 0:
            warnings.warn(
                f"cannot lock {folder} ({err.strerror}): nothing stops a second launch on {output}", stacklevel=2
            )
        return
    _held_locks.append(lock_file)


def release_run_locks() -> None:
    """Let go of lock_run's locks (at the end of a launch; a process that ends lets go by itself)."""
    while _held_locks:
        _held_locks.pop().close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def launch_world() -> int:
    """Ranks of this launch, from the launcher's environment (the process group does not exist yet)."""
    return int(os.environ["WORLD_SIZE"])


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
        optimizer_kind=getattr(args, "optim", "adamw"),
    )
    precision = precision_of(config)
    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise UsageError(
            f"fp16 is not supported on this {accelerator.device_name()} device; use ds_configs/cpu.json or "
            "--precision bf16 / fp32"
        )
    return config


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps: per epoch (after --debug / --max-steps-per-epoch, `limit`), in all, and of warm-up."""

    limit: int | None
    steps_per_epoch: int
    total: int
    warmup: int


def plan_schedule(
    args: argparse.Namespace,
    ds_config: dict[str, Any],
    videos: int,
    world: int,
    debug_steps: int,
    evaluation_only: bool = False,
) -> Schedule:
    """The schedule of `args.epochs` epochs over `videos` training videos on `world` ranks (one nominal step per
    epoch when the run only evaluates: its training split need not fill a batch)."""
    limit = args.max_steps_per_epoch
    if limit is None and args.debug:
        limit = debug_steps
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    steps = 1 if evaluation_only else epoch_steps(videos, world, micro, accumulation, limit)
    total = steps * args.epochs
    return Schedule(limit, steps, total, warmup_steps(args.warm_up, total))


def build_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    scheduler: str,
    warmup: int,
    total: int,
    compile_backend: str | None = None,
    decay_groups: str = "structural",
):
    """deepspeed.initialize on `model` (which has a `backbone`): AdamW groups with and without decay
    (vimpac.optim), the warm-up + decay schedule stepped per optimizer step, per-layer activation checkpointing
    when the config asks for it, and torch.compile of the module by the engine when `compile_backend` names a
    backend ("inductor" on GPUs; the Triton attention is a registered op it traces through). `decay_groups`: which
    parameters are decayed (vimpac.optim.DECAY_GROUPS). Returns the engine."""
    if uses_activation_checkpointing(ds_config):
        enable_activation_checkpointing(model.backbone.layers)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in parameter_groups(model, ds_config["optimizer"]["params"]["weight_decay"], decay_groups)
    ]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, scheduler, warmup, total),
    )
    track_engine(engine)
    if compile_backend is not None:
        engine.compile(backend=compile_backend)
    return engine


def start_engine(
    args: argparse.Namespace, ds_config: dict[str, Any], schedule: Schedule, make_model: Callable[[], torch.nn.Module]
) -> tuple[Any, int]:
    """(engine, rank): the process group, the model from `make_model()` with the same initial weights on every
    rank, the engine around it, then per-rank seeds for dropout."""
    rank, _, _ = init_distributed(args.dist_backend)
    seed_everything(args.seed)
    model = make_model()
    decay_groups = getattr(args, "decay_groups", "structural")
    engine = build_engine(
        model, ds_config, args.lr_scheduler, schedule.warmup, schedule.total, args.compile, decay_groups
    )
    seed_everything(args.seed + rank)
    return engine, rank


def train_settings(args: argparse.Namespace, schedule: Schedule) -> TrainSettings:
    """The loop settings both entry points take from their common flags."""
    return TrainSettings(
        epochs=args.epochs,
        save_steps=getattr(args, "save_steps", 0),
        save_epochs=args.save_epochs,
        keep_checkpoints=args.keep_checkpoints,
        steps_per_epoch_limit=schedule.limit,
        max_epochs_this_run=args.interval,
        stop_epoch=getattr(args, "stop_epoch", None),
        num_workers=args.num_workers,
        seed=args.seed,
        progress=args.tqdm,
        eval_every=args.eval_per_epochs,
        max_nonfinite_steps=args.max_nonfinite_steps,
        evaluation_only=getattr(args, "eval_only", False),
    )


def record_run(output: Path, args: argparse.Namespace, **sections: Any) -> None:
    """<output>/run_config.json: the command line, the merged engine config and what was derived from them. A
    resumed run whose --lr differs from the one recorded is warned: the checkpoint's optimizer state brings its own
    learning rate back, so the new value would not take effect."""
    previous = output / "run_config.json"
    if getattr(args, "resume", False) and previous.is_file() and os.environ.get("RANK", "0") == "0":
        before, now = (_peak_lr(json.loads(previous.read_text())), _peak_lr({"args": vars(args), **sections}))
        if before is not None and now is not None and before != now:
            print(
                f"warning: --lr {now:g} differs from the {before:g} this run was trained with; a resumed "
                "run keeps the learning rate its checkpoint's optimizer holds. To train at another rate, start a new "
                "--output from this run's export (--load)",
                file=sys.stderr,
                flush=True,
            )
    output.mkdir(parents=True, exist_ok=True)
    payload = {"argv": sys.argv, "args": vars(args), **sections}
    write_json_atomic(output / "run_config.json", payload, sort_keys=True, default=str)


def _peak_lr(run: dict[str, Any]) -> float | None:
    """The peak learning rate of a run_config payload: --lr, else its engine config's optimizer lr."""
    lr = (run.get("args") or {}).get("lr")
    if lr is None:
        lr = (((run.get("deepspeed") or {}).get("optimizer") or {}).get("params") or {}).get("lr")
    return None if lr is None else float(lr)
