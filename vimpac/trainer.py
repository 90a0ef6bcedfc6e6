"""The training loop on a DeepSpeed engine, shared by pre-training and fine-tuning: data, accumulation, backward,
gradient norm, loss scale, logging, checkpoints, exact resume, non-finite streaks, bad records.

What differs between the two is a `Task` (vimpac.pretrain_setup.PretrainTask, vimpac.finetune_setup.FinetuneTask):
the loss of one micro-batch with the metrics to log (`compute_loss`), per-step extras such as throughput
(`step_metrics`) and the evaluation run after an epoch (`evaluate`). One optimizer step = `gradient_accumulation_steps`
micro-steps on every rank.

Exact resume: the data order and masks are pure functions of (seed, epoch, sample index) (vimpac.data), so the
position in the epoch is one number, the optimizer steps already done in it; DeepSpeed restores weights,
optimizer, scheduler and loss scale; vimpac.checkpoint restores each rank's RNG (dropout). The DataLoader gets
its own generator so creating an iterator never draws from the global RNG (it would, by default, and a run
resumed mid-epoch creates its iterator at a different moment than the uninterrupted run).

Non-finite losses (--max-nonfinite-steps N): fp16 overflow steps are skipped by DeepSpeed (optim/skipped_steps,
optim/loss_scale), but a loss that stays NaN/Inf means the run has diverged. The loop counts consecutive optimizer
steps whose all-reduced loss (the task's `loss_key`) is not finite (so every rank decides alike); a finite step
resets the count. At N it writes that step's metrics and raises vimpac.errors.NonFiniteLossError on every rank,
naming the step, the streak, the last good checkpoint and remedies; nothing is saved. While a streak is running,
scheduled checkpoints (and exports) are skipped with a warning, so no checkpoint can hold a diverged state.
N = 0 turns all of this off.

Bad records (--on-bad-record skip, vimpac.data): the batches' bad-record fields are taken out before the model
sees them; after each optimizer step the count is summed over ranks (a collective, in skip mode only), rank 0
prints one warning line per bad record and appends it to <output>/bad_records.jsonl, and the epoch's last
metrics record holds data/bad_records (samples substituted in the epoch, in this launch).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vimpac.checkpoint import (
    CHECKPOINT_KEY,
    EXPORT,
    check_checkpoint_precision,
    checkpoint_model_config,
    checkpoint_root,
    checkpoint_world_size,
    engine_precision,
    export_metadata,
    export_weights,
    fp32_state_dict,
    latest_tag,
    load_checkpoint,
    load_resized_checkpoint,
    needs_universal_loading,
    save_checkpoint,
)
from vimpac.config import VimpacConfig
from vimpac.data import BAD_RECORD_LOG_KEY, BAD_RECORDS_KEY, ResumableDistributedSampler, bad_record_line
from vimpac.errors import NonFiniteLossError, UsageError
from vimpac.interpolate import model_differences
from vimpac.kernels.selfcheck import startup_line
from vimpac.metrics import MetricsWriter, StepAccumulator


@dataclass
class TrainSettings:
    """Loop settings that are not DeepSpeed's. steps_per_epoch_limit: --debug / --max-steps-per-epoch.
    eval_every: the task evaluates after the last step of every `eval_every`-th epoch and of the last.
    max_nonfinite_steps: stop after this many consecutive non-finite losses (0: never; module docstring)."""

    epochs: int
    save_steps: int = 0
    save_epochs: int = 1  # checkpoint (and export) every N-th epoch end and at the end of every launch
    keep_checkpoints: int = 2
    steps_per_epoch_limit: int | None = None
    max_epochs_this_run: int | None = None
    stop_epoch: int | None = None  # no launch trains past the end of this epoch (1-based) of the schedule
    num_workers: int = 2
    seed: int = 9595
    progress: bool = False
    export: bool = True
    eval_every: int = 1
    max_nonfinite_steps: int = 20
    evaluation_only: bool = False  # no training loop (finetune --eval-only): the batch need not fit the split


# A logged value of one micro-step: a scalar, or (value, weight) for a weighted mean over the step.
Metric = torch.Tensor | float | tuple[torch.Tensor | float, torch.Tensor | float]


class Task:
    """What one kind of training adds to the loop. `producer` goes into the exported weights' metadata;
    `loss_key` names the logged loss that is watched for non-finite values and shown on the progress bar."""

    producer = "vimpac"
    loss_key = "loss/total"

    def compute_loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Metric]]:
        """(loss to backpropagate, metrics of this micro-batch) for one micro-batch, forwarded through `engine`."""
        raise NotImplementedError

    def step_metrics(self, trainer: Trainer, values: dict[str, float], elapsed: float) -> None:
        """Add derived per-step values (throughput) to the step's reduced `values`, in place."""

    def evaluate(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        """Evaluation values to log with the last step of `epoch` ({} when there is nothing to run). A collective:
        every rank calls it at the same step."""
        return {}


def check_database_matches(manifest: dict[str, Any], config: VimpacConfig) -> None:
    """Refuse a database whose vocabulary or code grid does not fit the model, saying which flag to change."""
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab != config.vocab_size:
        raise UsageError(
            f"the database was tokenized with {vocab} codes but the model has --vocab-size {config.vocab_size}; "
            f"pass --vocab-size {vocab}"
        )
    grid = tuple(int(g) for g in manifest["grid"])
    if grid != tuple(config.grid):
        frame = manifest.get("frame_size")
        raise UsageError(
            f"the database holds {grid[0]}x{grid[1]} codes per frame (frame size {frame}) but the model expects "
            f"{config.grid[0]}x{config.grid[1]} (--frame-size {config.grid[0] * 8}); pass --frame-size {frame} "
            "or use a database tokenized at the model's frame size"
        )


def epoch_steps(videos: int, world: int, micro: int, accumulation: int, limit: int | None = None) -> int:
    """Optimizer steps per epoch: each rank gets videos // world samples (drop_last), in whole micro-batches, in
    whole accumulation cycles; `limit` caps it (--debug, --max-steps-per-epoch)."""
    steps = videos // world // micro // accumulation
    if steps < 1:
        raise UsageError(
            f"the training split has {videos} videos, fewer than one global batch of {world * micro * accumulation} "
            f"({world} ranks × {micro} videos × {accumulation} accumulation steps); lower --batch-size or use more data"
        )
    return steps if limit is None else min(steps, limit)


def resume_position(
    state: dict[str, Any], global_batch: int, steps_per_epoch: int, num_samples: int
) -> tuple[int, int, str | None]:
    """(epoch, step in it) where training goes on from a checkpoint's client state, and a note when that is not
    exactly where the checkpoint stopped. The checkpoint's sampler counts the videos of its epoch already trained
    on; when the global batch changed (another --batch-size, or ranks × micro-batch without a fixed
    train_batch_size), the run goes on from the step of the new batch at or before that count (at the latest the
    epoch's last step, so that its end — evaluation, save, export — still runs), so no video is skipped and at most
    one batch is trained twice."""
    epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    consumed = int(state["sampler"]["consumed"])
    saved_batch = int(state.get("global_batch") or (consumed // step if step else global_batch))
    complete = state.get("epoch_complete")
    if complete is None:  # written before it was recorded: an epoch ends when no whole batch is left
        complete = step >= steps_per_epoch if saved_batch == global_batch else consumed + saved_batch > num_samples
    if complete:
        return epoch + 1, 0, None
    note = None
    if saved_batch != global_batch and step:
        step = min(consumed // global_batch, max(steps_per_epoch - 1, 0))
        again = consumed - step * global_batch
        note = (
            f"the checkpoint stopped {consumed} videos into epoch {epoch} at a global batch of {saved_batch}; at "
            f"this run's {global_batch} it goes on from epoch {epoch}, step {step}"
            + (f", training the last {again} of those videos again" if again else "")
        )
    if step >= steps_per_epoch:
        return epoch + 1, 0, note
    return epoch, step, note


def current_loss_scale(engine) -> float | None:
    """The dynamic loss scale of an fp16 run (None otherwise)."""
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    config = getattr(optimizer, "loss_scale_config", None)  # where the engine's own accessor looks first
    candidates = [getattr(config, "cur_scale", None)] if config is not None else []
    candidates += [getattr(optimizer, name, None) for name in ("cur_scale", "loss_scale")]
    for value in candidates:
        if value is not None and not callable(value):
            return float(value)
    return None


def grad_norm(parameters) -> float:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class Trainer:
    """Runs epochs of `task` on `engine` (deepspeed.initialize output) over `dataset` (a map-style dataset with
    set_epoch(epoch)), writing metrics, checkpoints and exports under `output`."""

    def __init__(
        self,
        engine,
        config: VimpacConfig,
        dataset,
        settings: TrainSettings,
        output: str | Path,
        ds_config: dict[str, Any],
        task: Task,
    ) -> None:
        self.engine, self.config, self.dataset, self.settings, self.task = engine, config, dataset, settings, task
        self.output = Path(output)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.micro = int(ds_config["train_micro_batch_size_per_gpu"])
        self.accumulation = int(ds_config["gradient_accumulation_steps"])
        self.global_batch = int(ds_config["train_batch_size"])
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.fp32 = not (ds_config["fp16"]["enabled"] or ds_config["bf16"]["enabled"])
        self.sampler = ResumableDistributedSampler(len(dataset), self.rank, self.world, seed=settings.seed)
        self.steps_per_epoch = (
            0
            if settings.evaluation_only
            else epoch_steps(len(dataset), self.world, self.micro, self.accumulation, settings.steps_per_epoch_limit)
        )
        self.writer = MetricsWriter(self.output, enabled=self.rank == 0)
        self.epoch, self.step_in_epoch = 0, 0
        if settings.max_nonfinite_steps < 0:
            raise UsageError(f"--max-nonfinite-steps must be >= 0 (0: off), got {settings.max_nonfinite_steps}")
        self.nonfinite_steps = 0  # consecutive optimizer steps with a non-finite loss
        self.last_finite_step: int | None = None
        self.track_bad_records = getattr(dataset, "on_bad_record", "stop") == "skip"
        # The checkpoint tag whose state the engine holds (resumed or just saved); None once a step changed it.
        self.state_tag: str | None = None
        self.epoch_bad_records = 0
        self._step_bad_records, self._step_bad_log = 0, []
        self._warned_bad: set[tuple] = set()
        self._last_grad_norm: float | None = None
        # Check the Triton kernels at this model's shapes on this GPU before the first step, so a kernel that is
        # wrong here falls back to the reference (with its warning) before it trains anything; every rank checks
        # its own GPU, rank 0 reports. Nothing on CPU, where the reference runs.
        half = torch.float16 if ds_config["fp16"]["enabled"] else torch.bfloat16
        kernel_line = startup_line(
            config,
            getattr(engine, "device", None),
            torch.float32 if self.fp32 else half,
            compiled=bool(getattr(engine, "is_compiled", False)),
        )
        if kernel_line is not None and self.rank == 0:
            print(kernel_line, flush=True)

    # ---------------------------------------------------------------------------------------------- sizes
    def full_epoch_steps(self) -> int:
        return epoch_steps(len(self.dataset), self.world, self.micro, self.accumulation)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.settings.epochs

    # ------------------------------------------------------------------------------------------- resume
    def resume(self, source: str | Path | None = None) -> bool:
        """Load the newest complete checkpoint of run directory `source` (default: the output directory; another
        run's is only read, for --resume-from), if any; True when one was loaded."""
        source = self.output if source is None else Path(source)
        tag = latest_tag(source)
        if tag is None:
            return False
        saved = checkpoint_model_config(source, tag)
        changed = model_differences(saved, self.config) if saved is not None else []
        if changed:
            # Pre-training resumes at another --frame-size/--clip-len (stage 2) before it gets here; fine-tuning
            # changes shape only from an export (--load --different-shape).
            how = (
                "only --frame-size and --clip-len may change: their positional tables are interpolated"
                if self.task.producer == "vimpac.pretrain"
                else f"for another shape, fine-tune anew from {source}/export with --load ... --different-shape"
            )
            raise UsageError(
                f"checkpoint {tag} in {source} was trained with a different model ({', '.join(changed)} differ); "
                f"resume with the same model flags ({how})"
            )
        check_checkpoint_precision(source, tag, engine_precision(self.engine))
        saved_world = checkpoint_world_size(source, tag) or self.world
        if needs_universal_loading(source, self.world, self.zero_stage):
            # ZeRO shards of another world size: converted to a universal checkpoint and re-partitioned.
            state = load_resized_checkpoint(
                self.engine, source, tag, self.config, self.config, self.zero_stage, scratch_run=self.output
            )
        else:
            state = load_checkpoint(self.engine, source, tag)
        # The sampler position counts samples of all ranks, so it carries over to another world size.
        self.sampler.load_state_dict(state["sampler"])
        if source == self.output:  # the engine holds this run's checkpoint `tag` (another run's is not ours to export)
            self.state_tag = tag
        self.epoch, self.step_in_epoch, note = resume_position(
            state, self.global_batch, self.steps_per_epoch, self.sampler.num_samples
        )
        if self.rank == 0:
            where = tag if source == self.output else checkpoint_root(source) / tag
            print(f"resumed from {where}: epoch {self.epoch}, step {self.step_in_epoch} of {self.steps_per_epoch}")
            if note:
                print(f"note: {note}", flush=True)
            if saved_world != self.world:
                print(
                    f"note: {tag} was written by {saved_world} ranks and this run has {self.world}: state "
                    "re-partitioned, data position kept; ranks the checkpoint did not have start with fresh "
                    "dropout RNG streams",
                    flush=True,
                )
        return True

    def client_state(self) -> dict[str, Any]:
        consumed = self.step_in_epoch * self.global_batch
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "epoch_complete": self.step_in_epoch >= self.steps_per_epoch,
            "global_batch": self.global_batch,
            "sampler": self.sampler.state_dict(consumed),
            "world_size": self.world,
            "global_step": int(self.engine.global_steps),
        }

    def save(self) -> str:
        self.state_tag = save_checkpoint(
            self.engine,
            self.output,
            int(self.engine.global_steps),
            self.client_state(),
            self.settings.keep_checkpoints,
            model_config=self.config,
        )
        return self.state_tag

    def export(self, tag: str) -> None:
        state = fp32_state_dict(self.engine, self.output, tag, self.zero_stage)
        if state is not None:
            manifest = getattr(getattr(self.dataset, "db", None), "manifest", None) or {}
            tokenizer = (manifest.get("tokenizer") or {}).get("fingerprint")
            export_weights(state, self.config, self.output, self.task.producer, tokenizer, checkpoint=tag)
        if dist.is_initialized():
            dist.barrier()

    def refresh_export(self) -> None:
        """Export the newest checkpoint when export/ holds other weights: a launch killed between its last save
        and the export, resumed with nothing left to train, would otherwise keep the older export. Only while the
        engine holds that checkpoint's state (exports of ZeRO stage 0 read the engine): a launch whose last save
        was refused (a non-finite streak) exports nothing. Collective: rank 0 decides, before anyone writes."""
        latest = latest_tag(self.output)
        held = latest is not None and self.state_tag == latest
        stale = [held and export_metadata(self.output / EXPORT).get(CHECKPOINT_KEY) != latest]
        if dist.is_initialized():
            dist.broadcast_object_list(stale, src=0)
        if stale[0]:
            if self.rank == 0:
                print(f"export/ does not hold {latest}, the newest checkpoint: exporting it", flush=True)
            self.export(latest)

    # -------------------------------------------------------------------------------------------- loop
    def loader(self) -> DataLoader:
        # A private generator: creating the iterator must not draw from the global RNG (see module docstring).
        return DataLoader(
            self.dataset,
            batch_size=self.micro,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.settings.num_workers,
            generator=torch.Generator().manual_seed(self.settings.seed),
        )

    def micro_step(self, batch: dict[str, torch.Tensor], meter: StepAccumulator) -> None:
        loss, metrics = self.task.compute_loss(self.engine, batch)
        for name, metric in metrics.items():
            value, weight = metric if isinstance(metric, tuple) else (metric, 1.0)
            meter.add(name, value, weight=weight)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        norm = None
        if boundary and self.zero_stage == 0 and self.fp32:
            # The engine reports the norm only from ZeRO/16-bit optimizers; stage-0 fp32 grads are whole here
            # (already averaged over ranks by backward at the boundary).
            norm = grad_norm(self.engine.module.parameters())
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm() if norm is None else norm
            self._last_grad_norm = None if norm is None else float(norm)

    def optimizer_step(self, iterator, meter: StepAccumulator) -> dict[str, float]:
        started = time.perf_counter()
        lr = float(self.engine.get_lr()[0])  # the rate this step uses (the scheduler advances inside it)
        self._last_grad_norm = None
        for _ in range(self.accumulation):
            self.micro_step(next(iterator), meter)
        values = meter.reduce()
        self.task.step_metrics(self, values, time.perf_counter() - started)
        values["optim/lr"] = lr
        values["optim/skipped_steps"] = float(self.engine.skipped_steps)
        scale = current_loss_scale(self.engine)
        if scale is not None:
            values["optim/loss_scale"] = scale
        if self._last_grad_norm is not None:
            values["optim/grad_norm"] = self._last_grad_norm
        return values

    # ------------------------------------------------------------------------------------- step health
    def batches(self, iterator):
        """The loader's batches with the bad-record fields of "skip" mode taken out and counted for the step."""
        for batch in iterator:
            if BAD_RECORDS_KEY in batch:
                self._step_bad_records += int(batch.pop(BAD_RECORDS_KEY).sum())
                for text in batch.pop(BAD_RECORD_LOG_KEY):
                    self._step_bad_log.extend(json.loads(text))
            yield batch

    def count_bad_records(self, step: int) -> None:
        """After each optimizer step in "skip" mode (a collective): add the samples substituted on every rank to
        the epoch's count; rank 0 warns once per bad record and appends it to <output>/bad_records.jsonl."""
        local, log = self._step_bad_records, self._step_bad_log
        self._step_bad_records, self._step_bad_log = 0, []
        distributed = dist.is_initialized() and self.world > 1
        total = torch.tensor([local], dtype=torch.int64, device=self.engine.device)
        if distributed:
            dist.all_reduce(total)
        total = int(total.item())
        self.epoch_bad_records += total
        if total == 0:
            return
        if distributed:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, log)
            log = [entry for part in parts for entry in part]
        if self.rank != 0:
            return
        with (self.output / "bad_records.jsonl").open("a") as f:
            for entry in log:
                key = (entry["path"], entry["view"], entry["id"])
                if key in self._warned_bad:
                    continue
                self._warned_bad.add(key)
                print(bad_record_line(entry, f"another video stands in (step {step})"), file=sys.stderr, flush=True)
                f.write(json.dumps({"step": step, "epoch": self.epoch, **entry}) + "\n")

    def count_nonfinite(self, values: dict[str, float], step: int) -> bool:
        """Update the streak of non-finite losses with this step's all-reduced loss (the same on every rank);
        True when it reaches --max-nonfinite-steps."""
        loss = values.get(self.task.loss_key)
        limit = self.settings.max_nonfinite_steps
        if loss is None or math.isfinite(loss) or not limit:
            self.nonfinite_steps, self.last_finite_step = 0, step
            return False
        self.nonfinite_steps += 1
        if self.rank == 0:
            print(
                f"warning: step {step}: the loss is {loss} ({self.nonfinite_steps} consecutive non-finite "
                f"step{'s' if self.nonfinite_steps > 1 else ''}; training stops at {limit})",
                file=sys.stderr,
                flush=True,
            )
        return self.nonfinite_steps >= limit

    def nonfinite_error(self, step: int, loss: float) -> NonFiniteLossError:
        tag = latest_tag(self.output)
        count, limit = self.nonfinite_steps, self.settings.max_nonfinite_steps
        steps = f"step {step}" if count == 1 else f"steps {step - count + 1}-{step}"
        last_good = f"step {self.last_finite_step}" if self.last_finite_step is not None else "none in this launch"
        if tag is not None:
            checkpoint = f"last good checkpoint: {checkpoint_root(self.output) / tag}"
            # A resumed run keeps the checkpoint's LR schedule (its peak --lr); the warm-up length is re-read.
            restart = (
                "resume from it (--resume) with a longer --warm-up, or start a new run (another --output) with a "
                "lower --lr (--resume keeps the checkpoint's peak learning rate)"
            )
        else:
            checkpoint = "last good checkpoint: none yet"
            restart = "start again with a lower --lr or a longer --warm-up"
        return NonFiniteLossError(
            f"training stopped at optimizer step {step} (epoch {self.epoch}): the loss was non-finite ({loss}) for "
            f"{count} consecutive optimizer step{'s' if count > 1 else ''} ({steps}; --max-nonfinite-steps "
            f"{limit}); last finite loss: {last_good}. Nothing was saved after the loss became non-finite; "
            f"{checkpoint}. Remedies: {restart}; train with --precision bf16; with fp16, lower "
            '"initial_scale_power" or raise "loss_scale_window" in the "fp16" section of the --deepspeed_config json'
        )

    def save_allowed(self, when: str, final: bool = False) -> bool:
        """False (rank 0 warns) while a streak of non-finite losses is running: such a state is never saved.
        `final`: the launch's last save (there is no later one to wait for)."""
        if self.nonfinite_steps == 0:
            return True
        if self.rank == 0:
            streak = "the last step" if self.nonfinite_steps == 1 else f"the last {self.nonfinite_steps} steps"
            tag = latest_tag(self.output)
            later = (
                f"this launch ends without it; the newest checkpoint is {tag or 'none'}"
                if final
                else "the next scheduled save after a finite step will be written"
            )
            print(
                f"warning: not saving the checkpoint {when}: {streak} had a non-finite loss ({later})",
                file=sys.stderr,
                flush=True,
            )
        return False

    def evaluation_epoch(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) ends with an evaluation: every `eval_every` epochs and the last."""
        return (epoch + 1) % self.settings.eval_every == 0 or epoch + 1 == self.settings.epochs

    def evaluate(self, epoch: int) -> dict[str, float]:
        """The task's evaluation values to log with the last step of `epoch`. A collective."""
        return self.task.evaluate(self, epoch)

    def fit(self) -> None:
        """Train until `epochs` (or `max_epochs_this_run` more epochs, or the end of epoch `stop_epoch`), saving
        and exporting at every `save_epochs`-th epoch end and at the last one."""
        from tqdm import tqdm

        last_epoch = self.settings.epochs
        if self.settings.max_epochs_this_run is not None:
            last_epoch = min(last_epoch, self.epoch + self.settings.max_epochs_this_run)
        if self.settings.stop_epoch is not None:
            last_epoch = min(last_epoch, self.settings.stop_epoch)
        if self.epoch >= last_epoch and self.rank == 0:
            stop = "" if self.settings.stop_epoch is None else f", --stop-epoch {self.settings.stop_epoch}"
            print(
                f"nothing to train: the run is at epoch {self.epoch} of its {self.settings.epochs}-epoch schedule"
                f"{stop}",
                flush=True,
            )
        tag = None
        while self.epoch < last_epoch:
            self.dataset.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, self.step_in_epoch * self.global_batch)
            iterator = self.batches(iter(self.loader()))
            meter = StepAccumulator(self.engine.device)
            self.epoch_bad_records = 0
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {self.epoch}",
                disable=not (self.settings.progress and self.rank == 0),
            )
            while self.step_in_epoch < self.steps_per_epoch:
                values = self.optimizer_step(iterator, meter)
                self.state_tag = None
                self.step_in_epoch += 1
                step = int(self.engine.global_steps)
                if self.track_bad_records:
                    self.count_bad_records(step)
                if self.count_nonfinite(values, step):
                    self.writer.write(step, self.epoch, values)
                    bar.close()
                    self.writer.close()
                    raise self.nonfinite_error(step, values[self.task.loss_key])
                if self.step_in_epoch == self.steps_per_epoch:
                    # In the epoch's last record (one record per step: readers keep the last one written).
                    values.update(self.evaluate(self.epoch))
                    if self.track_bad_records:
                        values["data/bad_records"] = float(self.epoch_bad_records)
                self.writer.write(step, self.epoch, values)
                bar.update(1)
                bar.set_postfix(loss=f"{values[self.task.loss_key]:.4f}", lr=f"{values['optim/lr']:.2e}")
                save_now = self.settings.save_steps and step % self.settings.save_steps == 0
                if save_now and self.step_in_epoch < self.steps_per_epoch and self.save_allowed(f"at step {step}"):
                    tag = self.save()
            bar.close()
            del iterator
            at_epoch = (self.epoch + 1) % self.settings.save_epochs == 0 or self.epoch + 1 == last_epoch
            # A --save-steps step that ends an epoch is saved here, with the epoch's end state.
            at_step = bool(self.settings.save_steps) and int(self.engine.global_steps) % self.settings.save_steps == 0
            if (at_epoch or at_step) and self.save_allowed(
                f"at the end of epoch {self.epoch}", self.epoch + 1 == last_epoch
            ):
                tag = self.save()
                if at_epoch and self.settings.export:
                    self.export(tag)
            self.writer.flush()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.settings.export:
            self.refresh_export()
        self.writer.close()


def steps_summary(trainer: Trainer) -> str:
    """One line for the log: what a clip covers, batch arithmetic and schedule length."""
    return (
        f"{trainer.dataset.describe_clips()}; {len(trainer.dataset)} videos, {trainer.world} ranks × "
        f"{trainer.micro} videos × {trainer.accumulation} "
        f"accumulation = {trainer.global_batch} per step; {trainer.steps_per_epoch} steps/epoch × "
        f"{trainer.settings.epochs} epochs = {trainer.total_steps} steps"
        + ("" if trainer.steps_per_epoch == trainer.full_epoch_steps() else " (limited by --debug/--max-steps)")
    )
