"""Run checkpoints (exact resume) and exported weights (fine-tuning), DESIGN §6.

Layout of a run directory:

    <output>/checkpoints/<tag>/         DeepSpeed checkpoint: model, optimizer (ZeRO shards), LR scheduler, loss
                                        scale, engine step counters, plus our `client_state` (epoch, optimizer
                                        steps into the epoch, sampler state, world size, model config)
    <output>/checkpoints/<tag>/rng_rank<R>.pt
                                        each rank's python/numpy/torch RNG states (dropout must continue exactly;
                                        DeepSpeed's client_state is written by one rank only)
    <output>/checkpoints/latest         the tag of the newest *complete* checkpoint, replaced atomically after
                                        every rank has finished writing, so a kill mid-save resumes from the
                                        previous one
    <output>/export/config.json + model.safetensors
                                        fp32 weights of VimpacForPretraining (backbone.*, mlm_head.*, nce_head.*),
                                        loaded without pickle

Tags are `step<optimizer step, 8 digits>`; older complete checkpoints beyond `keep` are deleted.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vimpac.config import VimpacConfig
from vimpac.errors import UsageError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
EXPORT = "export"
TAG_PREFIX = "step"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS


def latest_tag(output: str | Path) -> str | None:
    """Tag of the newest complete checkpoint of a run, or None."""
    pointer = checkpoint_root(output) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (checkpoint_root(output) / tag).is_dir() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python `random`, numpy's global generator, torch CPU (and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, output: str | Path, step: int, client_state: dict[str, Any], keep: int = 2) -> str:
    """Save a complete checkpoint on every rank (collective); returns its tag. `keep` >= 1 newest are kept."""
    root = checkpoint_root(output)
    tag = tag_for_step(step)
    rank, _ = _rank_world()
    rng = rng_state()  # before saving: nothing below may draw random numbers, but be explicit about the order
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng, root / tag / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        _write_atomic(root / LATEST, tag)
        complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
        for old in complete[: max(0, len(complete) - max(1, keep))]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag


def load_checkpoint(engine, output: str | Path, tag: str) -> dict[str, Any]:
    """Restore engine state and this rank's RNG from `tag`; returns the client_state. Same world size only."""
    root = checkpoint_root(output)
    rank, world = _rank_world()
    load_path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise UsageError(f"could not load checkpoint {root / tag}; delete {root / LATEST} to start over")
    saved_world = int(client_state.get("world_size", world))
    if saved_world != world:
        raise UsageError(
            f"checkpoint {root / tag} was written by {saved_world} ranks and this run has {world}; exact resume "
            f"(data order, ZeRO shards, per-rank RNG) needs the same number, so relaunch with {saved_world} ranks"
        )
    set_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=False))
    return client_state


def checkpoint_model_config(output: str | Path, tag: str) -> VimpacConfig | None:
    """The model config recorded with checkpoint `tag` (None when absent)."""
    path = checkpoint_root(output) / tag / "vimpac_config.json"
    return VimpacConfig.load(path) if path.is_file() else None


def record_model_config(output: str | Path, tag: str, config: VimpacConfig) -> None:
    """Write the model config beside checkpoint `tag` (rank 0), so a resume can compare shapes before loading."""
    if _rank_world()[0] == 0:
        config.save(checkpoint_root(output) / tag / "vimpac_config.json")


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


def export_weights(state: dict[str, torch.Tensor], config: VimpacConfig, output: str | Path) -> Path:
    """Write `<output>/export/config.json` and `model.safetensors` (fp32, contiguous) atomically per file."""
    folder = Path(output) / EXPORT
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "vimpac.pretrain"})
    os.replace(tmp, folder / "model.safetensors")
    _write_atomic(folder / "config.json", config.to_json() + "\n")
    return folder
