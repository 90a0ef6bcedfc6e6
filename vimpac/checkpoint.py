"""Run checkpoints (exact resume) and exported weights (fine-tuning), docs/design.md §8.

Layout of a run directory:

    <output>/checkpoints/<tag>/         DeepSpeed checkpoint: model, optimizer (ZeRO shards), LR scheduler, loss
                                        scale, engine step counters, plus our `client_state` (epoch, optimizer
                                        steps into the epoch, sampler state, world size, model config)
    <output>/checkpoints/<tag>/rng_rank<R>.pt
                                        each rank's python/numpy/torch RNG states (dropout must continue exactly;
                                        DeepSpeed's client_state is written by one rank only)
    <output>/checkpoints/latest         the tag of the newest *complete* checkpoint, replaced atomically
    <output>/checkpoints/.partial-<tag>/
                                        a checkpoint being written (or one a kill interrupted, or an old one being
                                        deleted): never loaded, never counted as a checkpoint
    <output>/export/config.json + model.safetensors
                                        fp32 weights of VimpacForPretraining (backbone.*, mlm_head.*, nce_head.*),
                                        loaded without pickle

Tags are `step<optimizer step, 8 digits>`; only directories named exactly so are complete checkpoints.
Saving (save_checkpoint, collective) is atomic at the level of the tag directory: every rank writes its DeepSpeed
files and RNG states into the staging directory `.partial-<tag>/` (DeepSpeed finds a checkpoint's files by the
directory name alone: nothing inside names the tag, so the renamed directory loads like one written in place); after
a barrier rank 0 fsyncs the files, renames the staging directory to `<tag>/` (an earlier `<tag>/` is first moved
aside under a `.partial-` name: a run killed between that rename and `latest`, then resumed from an older
checkpoint, leaves one), fsyncs the directory entries, replaces `latest`, and only then prunes: the newest `keep`
complete checkpoints stay (the one just written always), older ones are renamed to `.partial-…` before they are
deleted, and stale `.partial-*` directories of earlier, killed saves are deleted. So a kill -9 at any moment leaves
`latest` naming a complete checkpoint (the previous one until the new one is published) and at most some
`.partial-*` debris, which the next save removes. `latest_tag` and `load_checkpoint` accept complete tags only.

Resuming at another shape (stage-2 pre-training: `--frame-size 256 --resume-from` a 128 px run, or `--resume` in it;
docs/reference.md §4.9, §5.7). When the newest checkpoint's model differs from the requested one only in clip_len /
grid (resize_source), the checkpoint is rewritten at the new shape and then loaded by DeepSpeed's own loader
(load_resized_checkpoint):
  ZeRO 1-3  DeepSpeed's universal-checkpoint converter (deepspeed.checkpoint.ds_to_universal) turns the
            partitioned, flattened optimizer state into one folder per parameter (fp32 master, exp_avg,
            exp_avg_sq, step); the positional tables' files are interpolated (vimpac.interpolate; exp_avg_sq
            clamped at 0) and the engine, built with `"checkpoint": {"load_universal": true}`
            (with_universal_loading), slices them into its own partitions. Buffers (BatchNorm statistics, which
            that loader leaves alone) are copied from the checkpoint's module state.
  stage 0   (fp32 only) the model-states file holds the whole module and the torch AdamW state_dict: both are
            interpolated in place, per parameter name, and loaded as a normal checkpoint.
The rewritten checkpoint lives in checkpoints/resized-<tag>/ of the run being started (with --resume-from, its
--output, not the run it reads) only while it is loaded. Everything else is restored
as saved: optimizer step and bias-correction count, LR-scheduler position, loss scale, engine step counters, each
rank's RNG (where the rank existed). Since the partitions are rebuilt, the world size may differ from the run that
wrote the checkpoint. The same path resumes a ZeRO checkpoint at the same shape on another number of ranks
(`world.json` in each checkpoint records its world size, readable before the engine is built for universal
loading; the data position carries over because the sampler counts samples of all ranks; tested 2 → 1 ranks
with ZeRO 2). Without ZeRO the state is not partitioned and loads on any number of ranks directly. Rank 0
converts while the others wait in a collective: about a minute for the large-half model on a local disk, within
DeepSpeed's default 10-minute process-group timeout (raise it with DEEPSPEED_TIMEOUT=<minutes> on slow storage).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vimpac.atomic_write import atomic_path, fsync_path, write_text_atomic
from vimpac.config import VimpacConfig
from vimpac.errors import StorageError, UsageError, first_line
from vimpac.interpolate import (
    check_resizable,
    model_differences,
    positional_leaf,
    resize_positional_state,
    resize_positional_tensor,
)

CHECKPOINTS = "checkpoints"
WORLD_FILE = "world.json"  # {"world_size": N, "precision": "fp16"|"bf16"|"fp32"} of the ranks that wrote a checkpoint
LATEST = "latest"
EXPORT = "export"
TAG_PREFIX = "step"
PARTIAL_PREFIX = ".partial-"  # staging directories of saves in progress (or killed), and doomed old checkpoints
RESIZED_PREFIX = "resized-"  # not TAG_PREFIX: never taken for (or pruned as) a complete checkpoint
MOMENTS = ("exp_avg", "exp_avg_sq")


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


_COMPLETE = re.compile(rf"{TAG_PREFIX}\d{{8}}")


def is_complete_tag(name: str) -> bool:
    """Whether `name` is a complete checkpoint's tag (`step<8 digits>`; never a `.partial-*` staging name)."""
    return _COMPLETE.fullmatch(name) is not None


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS


def complete_tags(output: str | Path) -> list[str]:
    """Tags of the complete checkpoint directories of a run, oldest first (`.partial-*` ones are not)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_complete_tag(p.name) and p.is_dir())


def latest_tag(output: str | Path) -> str | None:
    """Tag of the checkpoint a resume continues: the one `latest` names, or None when the run has none.

    When `latest` is missing or names no complete checkpoint (deleted by hand, or a first save killed between
    its rename and writing `latest`) while complete checkpoints exist, the newest of them is taken, with a
    warning: every complete tag is whole (it is renamed into place only after all ranks wrote it), and starting
    afresh would let the first save prune them all."""
    pointer = checkpoint_root(output) / LATEST
    tag = pointer.read_text().strip() if pointer.is_file() else None
    if tag is not None and is_complete_tag(tag) and (checkpoint_root(output) / tag).is_dir():
        return tag
    complete = complete_tags(output)
    if not complete:
        return None
    said = f"names {tag!r}, which is not a complete checkpoint" if tag is not None else "is missing"
    # stacklevel 1: one location, so the warning shows once per message however many callers ask
    warnings.warn(f"{pointer} {said}; taking the newest complete checkpoint, {complete[-1]}", stacklevel=1)
    return complete[-1]


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python `random`, numpy's global generator, torch CPU, and the generator of the
    CUDA device it runs on (only that one: a resume may see fewer GPUs, or its rank on another device index)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s states; the CUDA one goes to the current device. Checkpoints written before kept
    every visible device's state ("cuda", by device index): the current device's entry is taken if there is one."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif len(state.get("cuda") or ()) > torch.cuda.current_device():
        torch.cuda.set_rng_state(state["cuda"][torch.cuda.current_device()])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_tree(folder: Path) -> None:
    """fsync every file and directory under `folder` (itself included), so that a rename publishes data that is
    on disk, not only in the page cache (a kill -9 keeps the page cache; a power loss does not)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _discard(root: Path, folder: Path) -> None:
    """Delete a checkpoint directory so that no kill can leave a partly deleted one under a complete tag: it is
    renamed to `.partial-<name>` (not counted, deleted by a later save if this one is killed) before deletion."""
    if folder.name.startswith(PARTIAL_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
        return
    doomed = root / f"{PARTIAL_PREFIX}{folder.name}.old"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _publish(root: Path, staging: Path, tag: str) -> None:
    """Rank 0: rename the finished staging directory to `<root>/<tag>` durably, then point `latest` at it."""
    _fsync_tree(staging)
    final = root / tag
    if final.exists():  # written by a run that was killed before `latest` named it, and resumed from before it
        _discard(root, final)
    os.replace(staging, final)
    fsync_path(root)
    write_text_atomic(root / LATEST, tag)
    fsync_path(root)


def _prune(root: Path, tag: str, keep: int) -> None:
    """Rank 0, after publishing `tag`: keep the newest `keep` complete checkpoints up to `tag` (itself included),
    delete older ones, every checkpoint of a later step (left by a run this one replaced, or published by a
    launch killed before it moved `latest`, and now superseded) and every `.partial-*` leftover of an interrupted
    save (none is in progress: all ranks have passed the save)."""
    complete = complete_tags(root.parent)
    ours = [t for t in complete if t <= tag]  # tags are zero-padded step numbers: text order is step order
    for old in ours[: max(0, len(ours) - max(1, keep))] + [t for t in complete if t > tag]:
        _discard(root, root / old)
    for stale in root.iterdir():
        if stale.name.startswith(PARTIAL_PREFIX) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    engine,
    output: str | Path,
    step: int,
    client_state: dict[str, Any],
    keep: int = 2,
    model_config: VimpacConfig | None = None,
) -> str:
    """Save a complete checkpoint on every rank (collective); returns its tag. `keep` >= 1 newest are kept.

    Written into `.partial-<tag>/` and renamed to `<tag>/` by rank 0 once every rank has finished (see the module
    docstring), so a kill at any moment leaves `latest` naming a complete checkpoint. `model_config`, when given,
    is recorded in the checkpoint (vimpac_config.json) before it is published, so a resume can compare shapes
    before loading."""
    root = checkpoint_root(output)
    tag = tag_for_step(step)
    staging_tag = f"{PARTIAL_PREFIX}{tag}"
    staging = root / staging_tag
    rank, _ = _rank_world()
    rng = rng_state()  # before saving: nothing below may draw random numbers, but be explicit about the order
    if rank == 0:  # debris of a killed attempt at this very step: no stale file may survive
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    try:
        engine.save_checkpoint(str(root), tag=staging_tag, client_state=client_state, save_latest=False)
        torch.save(rng, staging / f"rng_rank{rank}.pt")
        if rank == 0:
            # Readable before any engine exists: a resume on another number of ranks must build its engine for
            # universal loading, so it has to know the saved world size first.
            written_by = {"world_size": _rank_world()[1], "precision": engine_precision(engine)}
            (staging / WORLD_FILE).write_text(json.dumps(written_by) + "\n")
            if model_config is not None:
                model_config.save(staging / "vimpac_config.json")
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(mark in str(err) for mark in UNWRITABLE_FILE_MARKS):
            raise  # a collective or another failure: not the storage
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        raise StorageError(
            f"writing checkpoint {staging} failed ({first_line(err)}); {free / 2**20:.0f} MiB free on its disk. "
            f"The newest complete checkpoint is still {latest_tag(output) or 'none'}: free space (or fix the "
            "permissions) and rerun with --resume"
        ) from err
    _barrier()
    failure = None
    if rank == 0:
        try:
            _publish(root, staging, tag)
            _prune(root, tag, keep)
        except Exception as err:  # re-raised below on rank 0, after telling the others (no rank hangs)
            failure = err
    if not _rank0_succeeded(failure is None):  # collective, like the barrier it stands for
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank 0 could not publish checkpoint {root / tag}; see its log")
    return tag


def load_checkpoint(engine, output: str | Path, tag: str) -> dict[str, Any]:
    """Restore engine state and this rank's RNG from `tag`; returns the client_state.

    Another number of ranks than the checkpoint's is fine without ZeRO (the state is not partitioned); ranks the
    checkpoint did not have keep their freshly seeded RNG. ZeRO checkpoints on another world size go through
    `load_resized_checkpoint` instead (universal checkpoint)."""
    root = checkpoint_root(output)
    rank, _ = _rank_world()
    if not is_complete_tag(tag):
        raise UsageError(f"{root / tag} is not a complete checkpoint (their tags are {TAG_PREFIX}<8 digits>)")
    try:
        load_path, client_state = engine.load_checkpoint(str(root), tag=tag)
    except (FileNotFoundError, EOFError, pickle.UnpicklingError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(mark in str(err) for mark in UNREADABLE_FILE_MARKS):
            raise  # out of memory, a state that does not fit: not the file's fault
        raise UsageError(damaged_checkpoint(output, tag, err)) from err
    if load_path is None:
        raise UsageError(f"could not load checkpoint {root / tag}; delete {root} to start over")
    rng = root / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    elif rank < (checkpoint_world_size(output, tag) or rank + 1):  # a rank the checkpoint had
        warnings.warn(
            f"{rng} is missing: this rank's random streams start from the seed, so the run goes on but no longer "
            "matches one that was never stopped",
            stacklevel=2,
        )
    return client_state


# What torch.save's zip writer says when the file system takes fewer bytes than it wrote (a full disk).
UNWRITABLE_FILE_MARKS = ("unexpected pos", "PytorchStreamWriter", "file write failed")
# What torch.load says of a file cut short or garbled (its zip reader, or the pickle inside).
UNREADABLE_FILE_MARKS = ("PytorchStreamReader", "zip archive", "unexpected EOF", "invalid load key")


def damaged_checkpoint(output: str | Path, tag: str, err: BaseException) -> str:
    """The message for checkpoint `tag` of `output` that cannot be read: what failed and how to resume from the
    checkpoint before it (moved aside, `tag` no longer counts and latest_tag falls back to the newest left)."""
    root = checkpoint_root(output)
    earlier = [t for t in complete_tags(output) if t < tag]
    if earlier:
        advice = (
            f"move it aside (mv {root / tag} {root / ('damaged-' + tag)}) and rerun: the resume then takes "
            f"{earlier[-1]}, the newest before it"
        )
    else:
        advice = f"no earlier checkpoint exists: delete {root} to start over"
    return f"checkpoint {root / tag} cannot be read ({first_line(err)}); it is damaged or incomplete: {advice}"


def engine_precision(engine) -> str:
    """ "fp16", "bf16" or "fp32": the precision a DeepSpeed engine trains in (and its optimizer state is kept for)."""
    if engine.fp16_enabled():
        return "fp16"
    return "bf16" if engine.bfloat16_enabled() else "fp32"


def check_checkpoint_precision(output: str | Path, tag: str, precision: str) -> None:
    """UsageError when checkpoint `tag` was written by a run of another precision: DeepSpeed keeps the optimizer
    state of fp16, bf16 and fp32 runs in different files and layouts, and one does not load into another (it would
    fail as a missing file or a missing key). Checkpoints from before the precision was recorded: bf16 ones are
    told by their file names, fp16 and fp32 ones are not told apart."""
    folder = checkpoint_root(output) / tag
    try:
        recorded = json.loads((folder / WORLD_FILE).read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        possible = {recorded}
    elif any(folder.glob("bf16_*optim_states.pt")):
        possible = {"bf16"}
    elif any(folder.glob("*optim_states.pt")):
        possible = {"fp16", "fp32"}
    else:
        return
    if precision not in possible:
        saved = " or ".join(sorted(possible))
        raise UsageError(
            f"checkpoint {folder} was written by a {saved} run and this launch trains in {precision}: the optimizer "
            f"state of one precision does not load into another; resume with --precision {sorted(possible)[0]} "
            "(or a --deepspeed_config of that precision), or start a new --output from its export with --load"
        )


def checkpoint_world_size(output: str | Path, tag: str) -> int | None:
    """The number of ranks that wrote checkpoint `tag` (None for checkpoints that do not record it)."""
    try:
        return int(json.loads((checkpoint_root(output) / tag / WORLD_FILE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def needs_universal_loading(output: str | Path, world: int, zero_stage: int) -> bool:
    """True when resuming `output` means loading a ZeRO checkpoint written by another number of ranks."""
    tag = latest_tag(output)
    saved = None if tag is None else checkpoint_world_size(output, tag)
    return zero_stage >= 1 and saved is not None and saved != world


def checkpoint_model_config(output: str | Path, tag: str) -> VimpacConfig | None:
    """The model config recorded with checkpoint `tag` (None when absent)."""
    path = checkpoint_root(output) / tag / "vimpac_config.json"
    return VimpacConfig.load(path) if path.is_file() else None


def fp32_state_dict(engine, output: str | Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 state dict on rank 0 (None elsewhere); collective for ZeRO-3 gathering.

    ZeRO 1–3 keep the fp32 master weights sharded in the optimizer: they are rebuilt from checkpoint `tag` with
    DeepSpeed's zero_to_fp32 (exact masters, buffers included). Stage 0 keeps whole weights in the module; in a
    16-bit stage-0 run those are the 16-bit copies, upcast (the masters there live in the fp16 optimizer)."""
    rank, _ = _rank_world()
    if zero_stage >= 1:
        if rank != 0:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root(output)), tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if rank != 0:
        return None
    return {
        k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in engine.module.state_dict().items()
    }


EXPORT_FILES = ("config.json", "model.safetensors")


def find_export(path: str | Path) -> Path | None:
    """The folder holding an export (config.json + model.safetensors): `path` itself, or `path`/export for a run
    directory; None when neither holds one."""
    for folder in (Path(path), Path(path) / EXPORT):
        if all((folder / name).is_file() for name in EXPORT_FILES):
            return folder
    return None


def export_folder(
    path: str | Path, flag: str = "--model", hint: str = "point it at a run directory or its export/"
) -> Path:
    """find_export, or a UsageError naming `flag` (the option that gave `path`), where it looked and `hint`."""
    folder = find_export(path)
    if folder is None:
        original = original_checkpoint_advice(path)
        raise UsageError(
            f"{flag} {path}: no {' + '.join(EXPORT_FILES)} there or in {Path(path) / EXPORT}; {original or hint}"
        )
    return folder


# The files of a checkpoint of the original release (vimpac.original reads them; named here to recognise one).
ORIGINAL_CHECKPOINT_FILES = ("classifier.pt", "args.pickle")


def find_original_checkpoint(path: str | Path) -> Path | None:
    """The folder holding a checkpoint of the original release (classifier.pt + args.pickle): `path` itself or
    `path`/last (an original output folder); None when neither holds one."""
    path = Path(path)
    for folder in (path, path / "last"):
        if all((folder / name).is_file() for name in ORIGINAL_CHECKPOINT_FILES):
            return folder
    return None


def original_checkpoint_advice(path: str | Path) -> str | None:
    """How to use a checkpoint of the original release found at `path` (its classifier.pt, the folder holding it,
    or an output folder holding last/): convert it first. None when `path` is no such checkpoint."""
    path = Path(path)
    folder = find_original_checkpoint(path.parent if path.name == ORIGINAL_CHECKPOINT_FILES[0] else path)
    if folder is None:
        return None
    return (
        f"{folder} is a checkpoint of the original release: convert it with `vimpac convert-original {folder} "
        "--out EXPORT` and pass the export (a new run starts from its weights; the original's optimizer state and "
        "step count do not carry over)"
    )


TOKENIZER_KEY = "tokenizer_fingerprint"  # safetensors metadata of an export: the codes' tokenizer
CHECKPOINT_KEY = "checkpoint"  # safetensors metadata of a trainer's export: the checkpoint tag it was made from


def export_metadata(folder: str | Path | None) -> dict[str, str]:
    """The safetensors metadata of the export in `folder` ({} when there is none or it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    weights = Path(folder) / "model.safetensors" if folder is not None else None
    if weights is None or not weights.is_file():
        return {}
    try:
        with safe_open(str(weights), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def export_tokenizer(folder: str | Path | None) -> str | None:
    """The fingerprint of the tokenizer an export's model was trained on (None: not recorded, or not an export)."""
    return export_metadata(folder).get(TOKENIZER_KEY)


def weights_fingerprint(folder: str | Path | None) -> str | None:
    """What identifies the weights a model was loaded from, wherever they lie or however the path is spelt: the
    files_fingerprint of an export's config.json + model.safetensors or an original checkpoint's files (None when
    `folder` holds neither)."""
    from vimpac.tokenization.tokenizer import files_fingerprint

    if folder is None:
        return None
    for names in (EXPORT_FILES, ORIGINAL_CHECKPOINT_FILES):
        paths = [Path(folder) / name for name in names]
        if all(p.is_file() for p in paths):
            return files_fingerprint(paths)
    return None


def check_same_tokenizer(model: str | Path | None, manifest: dict[str, Any], database: str | Path) -> None:
    """Refuse a code database made by another tokenizer than the one the export `model` was trained on: the same
    code number is another visual word there, and vocabulary and grid can match all the same."""
    trained_on = export_tokenizer(model)
    made_by = (manifest.get("tokenizer") or {}).get("fingerprint")
    if trained_on and made_by and trained_on != made_by:
        raise UsageError(
            f"{database} was tokenized by tokenizer {made_by}, but the model {model} was trained on the codes of "
            f"tokenizer {trained_on}; its codes mean other things there: use a database made with that tokenizer"
        )


def read_export(folder: str | Path) -> tuple[VimpacConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, state dict, safetensors metadata) of an export folder (config.json + model.safetensors; no
    pickle); UsageError naming the file when either is damaged or cut short (an interrupted copy)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    try:
        config = VimpacConfig.load(folder / "config.json")
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(
            f"{folder / 'config.json'} is damaged or not a vimpac model config ({err}); export it or copy it again"
        ) from None
    weights = folder / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            names = f.keys()  # safe_open is not iterable itself
            return config, {name: f.get_tensor(name) for name in names}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{weights} is damaged or incomplete ({err}); export it or copy it again") from None


def export_weights(
    state: dict[str, torch.Tensor],
    config: VimpacConfig,
    output: str | Path,
    producer: str = "vimpac.pretrain",
    tokenizer: str | None = None,
    checkpoint: str | None = None,
) -> Path:
    """Write `<output>/export/config.json` and `model.safetensors` (fp32, contiguous) atomically per file;
    `producer` (the entry point that trained the weights), `tokenizer` (the fingerprint of the tokenizer whose
    codes it was trained on) and `checkpoint` (the tag of the checkpoint it holds) go into the safetensors
    metadata."""
    folder = Path(output) / EXPORT
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    optional = {TOKENIZER_KEY: tokenizer, CHECKPOINT_KEY: checkpoint}
    metadata = {"format": "pt", "producer": producer, **{k: v for k, v in optional.items() if v}}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_text_atomic(folder / "config.json", config.to_json() + "\n")
    return folder


# ------------------------------------------------------------------------------ resuming at another shape
def resize_source(output: str | Path, config: VimpacConfig) -> tuple[str, VimpacConfig] | None:
    """For --resume: (tag, saved model config) when the newest checkpoint of `output` must be resized to
    `config` (it differs only in clip_len / grid); None when there is no checkpoint, no recorded config or the
    same model. UsageError when the models differ otherwise, or a `full` positional table would be resized."""
    tag = latest_tag(output)
    if tag is None:
        return None
    saved = checkpoint_model_config(output, tag)
    if saved is None or not model_differences(saved, config):
        return None
    try:
        check_resizable(saved, config)
    except UsageError as err:
        raise UsageError(f"cannot resume checkpoint {tag} of {output}: {err}") from None
    return tag, saved


def with_universal_loading(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `ds_config` whose engine loads universal checkpoints (what load_resized_checkpoint writes for
    ZeRO stages 1-3)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def _model_states_files(folder: Path) -> list[Path]:
    """DeepSpeed's per-(pipeline/ZeRO-3) rank model-states files of a checkpoint folder, sorted."""
    return sorted(folder.glob("*mp_rank_*_model_states.pt"))


def _resize_module_state(module: dict[str, torch.Tensor], old: VimpacConfig, new: VimpacConfig) -> None:
    """Resize the positional entries of a saved module state dict in place (ZeRO-3 files hold empty
    placeholders for partitioned weights: those are left alone)."""
    for name, value in list(module.items()):
        leaf = positional_leaf(name)
        if leaf is not None and torch.is_tensor(value) and value.dim() == 2:
            module[name] = resize_positional_tensor(leaf, value, old, new)


def _resize_universal_folder(folder: Path, old: VimpacConfig, new: VimpacConfig) -> list[str]:
    """Interpolate the per-parameter files of a universal checkpoint's zero/ folder in place; returns the
    names of the parameters that changed. ZeRO-1/2 files hold {"param": tensor, ...} shaped like the parameter,
    ZeRO-3 files a flat tensor."""
    changed = []
    for param_dir in sorted((folder / "zero").iterdir()):
        leaf = positional_leaf(param_dir.name)
        if leaf is None or not param_dir.is_dir():
            continue
        for key in ("fp32", *MOMENTS):
            path = param_dir / f"{key}.pt"
            if not path.is_file():
                continue
            saved = torch.load(path, map_location="cpu", weights_only=False)
            tensor = saved["param"] if isinstance(saved, dict) else saved
            shaped = tensor if tensor.dim() == 2 else tensor.reshape(-1, old.hidden_size)
            resized = resize_positional_tensor(leaf, shaped, old, new, nonnegative=key == "exp_avg_sq")
            if resized is shaped:
                continue
            resized = resized if tensor.dim() == 2 else resized.flatten()
            if isinstance(saved, dict):
                saved["param"] = resized
            else:
                saved = resized
            torch.save(saved, path)
            if param_dir.name not in changed:
                changed.append(param_dir.name)
    return changed


def _resize_stage0_checkpoint(source: Path, target: Path, engine, old: VimpacConfig, new: VimpacConfig) -> None:
    """Stage 0: the model-states file holds the module and the torch optimizer's state_dict (state keyed by the
    parameter's position in the param groups, which are the engine's groups in the same order)."""
    (path,) = _model_states_files(source)
    state = torch.load(path, map_location="cpu", weights_only=False)
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and "state" in optimizer and "param_groups" in optimizer):
        raise UsageError(
            f"checkpoint {source} is a ZeRO stage-0 run with 16-bit precision, whose optimizer state cannot be "
            "resized; resume at another shape with --zero-stage 1 or 2 in both runs (the shipped configs use 2)"
        )
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in engine.optimizer.param_groups]
    saved_groups = [g["params"] for g in optimizer["param_groups"]]
    if [len(g) for g in groups] != [len(g) for g in saved_groups]:
        raise RuntimeError(f"optimizer groups of {path} do not match the model's; cannot resize its state")
    module = state["module"]
    for indices, group_names in zip(saved_groups, groups):
        for index, name in zip(indices, group_names):
            moments = optimizer["state"].get(index, {})
            for key in MOMENTS:
                if key not in moments:
                    continue
                if moments[key].shape != module[name].shape:
                    raise RuntimeError(f"{path}: {key} of parameter {index} does not fit {name}; cannot resize")
                leaf = positional_leaf(name)
                if leaf is not None:
                    resized = resize_positional_tensor(leaf, moments[key], old, new, nonnegative=key == "exp_avg_sq")
                    moments[key] = resized
    state["module"] = resize_positional_state(module, old, new)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(state, target / path.name)


def load_resized_checkpoint(
    engine,
    output: str | Path,
    tag: str,
    old: VimpacConfig,
    new: VimpacConfig,
    zero_stage: int,
    scratch_run: str | Path | None = None,
) -> dict[str, Any]:
    """Load checkpoint `tag` (model `old`) of run directory `output` into `engine` (model `new`, same but for
    clip_len / grid), resizing the positional tables and their Adam moments (see the module docstring).
    Collective; returns the client_state. For ZeRO >= 1 the engine must have been built with
    with_universal_loading(ds_config). The resized copy is written under the checkpoints/ of `scratch_run`
    (default `output`): a run started from another run's checkpoint (--resume-from) leaves that run untouched."""
    check_resizable(old, new)
    root = checkpoint_root(output)
    scratch = checkpoint_root(output if scratch_run is None else scratch_run) / f"{RESIZED_PREFIX}{tag}"
    rank, _ = _rank_world()
    universal = zero_stage >= 1
    # Checked on every rank alike, so that all of them stop together.
    partitioned = any((root / tag).glob("*optim_states.pt"))
    if partitioned and not universal:
        raise UsageError(
            f"checkpoint {root / tag} holds ZeRO-partitioned optimizer state; resume it at the new shape with "
            "--zero-stage 1, 2 or 3 (the stage it was written with is simplest)"
        )
    if universal and not partitioned:
        raise UsageError(f"checkpoint {root / tag} was written without ZeRO; resume it with --zero-stage 0")
    if not universal and (engine.fp16_enabled() or engine.bfloat16_enabled()):
        raise UsageError(
            "resizing a checkpoint without ZeRO works for fp32 runs only (the 16-bit stage-0 optimizer keeps its "
            "state flattened); use --zero-stage 1 or 2 for 16-bit runs, as the shipped configs do"
        )
    if universal and not engine.load_universal_checkpoint():
        raise RuntimeError("resizing a ZeRO checkpoint needs an engine built with with_universal_loading(config)")
    failure = None
    if rank == 0:
        try:
            _write_resized_checkpoint(engine, root / tag, scratch / tag, old, new, universal)
        except Exception as err:  # re-raised below, after telling the other ranks not to wait for the files
            failure = err
    if not _rank0_succeeded(failure is None):
        if failure is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            raise failure
        raise RuntimeError(f"rank 0 could not write the resized checkpoint {scratch / tag}; see its log")
    try:
        load_path, client_state = engine.load_checkpoint(str(scratch), tag=tag)
        if load_path is None:
            raise UsageError(f"could not load the resized checkpoint {scratch / tag}")
        if universal:
            _restore_buffers(engine, root / tag)
        rng = root / tag / f"rng_rank{rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
    finally:
        _barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return client_state


def _rank0_succeeded(ok: bool) -> bool:
    """Rank 0's `ok`, on every rank (collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = [ok]
    dist.broadcast_object_list(flag, src=0)
    return bool(flag[0])


def _write_resized_checkpoint(
    engine, source: Path, target: Path, old: VimpacConfig, new: VimpacConfig, universal: bool
) -> None:
    """Rank 0: write checkpoint `source` at the new shape into `target` (universal for ZeRO, else stage 0)."""
    shutil.rmtree(target.parent, ignore_errors=True)
    target.parent.mkdir(parents=True)
    if universal:
        from deepspeed.checkpoint import ds_to_universal

        args = {
            "input_folder": str(source),
            "output_folder": str(target),
            "num_extract_workers": 1,  # no process pool inside a training process
            "num_merge_workers": 1,
            "keep_temp_folder": False,
            "strict": True,
            "inject_missing_state": True,  # our engines record no universal-checkpoint info
        }
        ds_to_universal.main(argparse.Namespace(**args))
        _resize_universal_folder(target, old, new)
        for path in _model_states_files(target):  # keep the copied module state consistent
            state = torch.load(path, map_location="cpu", weights_only=False)
            _resize_module_state(state["module"], old, new)
            torch.save(state, path)
    else:
        _resize_stage0_checkpoint(source, target, engine, old, new)


def _restore_buffers(engine, folder: Path) -> None:
    """Copy the module buffers (BatchNorm statistics) of checkpoint `folder` into the engine's module: the
    universal loader restores parameters only."""
    saved = torch.load(_model_states_files(folder)[0], map_location="cpu", weights_only=False)["module"]
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in saved:
                if saved[name].shape != buffer.shape:
                    raise RuntimeError(f"buffer {name} has shape {tuple(saved[name].shape)} in {folder}")
                buffer.copy_(saved[name])
