"""Evaluate a model over a dataset split across ranks, counting every item exactly once, whatever the world size.

Rank r takes items r, r + W, r + 2W, ... (`shard_positions`); ranks with one item fewer repeat an item so every
rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively in each). The per-item rows
are all-gathered and the repeats dropped (`assemble_shards`), giving one row per item in item order. Used by the
kNN monitor, fine-tuning's multi-view evaluation and `vimpac probe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset


def shard_positions(num_items: int, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank `rank`'s share of items 0..num_items-1: (positions [L], valid [L] bool), L = ceil(num_items / world).

    Rank r owns positions r, r + W, r + 2W, ...; where it has one fewer than L, the last entry repeats an item
    (so every rank does the same number of forward passes) and is marked invalid."""
    if num_items < 1:
        raise ValueError("nothing to shard")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    length = math.ceil(num_items / world)
    positions = rank + world * np.arange(length)
    valid = positions < num_items
    return np.where(valid, positions, positions % num_items), valid


def assemble_shards(positions: torch.Tensor, valid: torch.Tensor, feats: torch.Tensor, num_items: int) -> torch.Tensor:
    """All-gathered shards → one feature per item in item order: positions / valid [W, L], feats [W, L, D] →
    [num_items, D]. Invalid (repeated) entries are dropped; raises if an item is missing or appears twice."""
    keep = valid.reshape(-1).to(torch.bool)
    pos = positions.reshape(-1).long()[keep]
    rows = feats.reshape(-1, feats.shape[-1])[keep.to(feats.device)]
    counts = torch.bincount(pos.cpu(), minlength=num_items)
    if pos.numel() != num_items or counts.numel() != num_items or not bool((counts == 1).all()):
        missing = int((counts[:num_items] == 0).sum())
        raise RuntimeError(
            f"gathered {pos.numel()} features for {num_items} items ({missing} missing); the ranks disagree on the "
            "split (same database and split on every rank?)"
        )
    ordered = torch.empty_like(rows)
    ordered[pos.to(rows.device)] = rows
    return ordered


def all_gather_rows(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """[...] on every rank → [world, ...] in rank order (identity plus a leading 1 without a process group)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


@torch.no_grad()
def evaluate_sharded(
    model: torch.nn.Module,
    dataset: Dataset,
    rows_of: Callable[[dict[str, Any]], torch.Tensor],
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: str | None = None,
) -> torch.Tensor:
    """rows_of(batch) → float rows [B, F] for each loader batch of this rank's share; returns [len(dataset), F]
    in item order, every item once, on the rows' device. `model` is in eval mode meanwhile and its mode restored;
    no gradients. A collective: every rank calls it. The loader has its own generator (no draw from the global
    RNG). `progress`: the title of a tqdm bar on rank 0 counting this rank's items (None: no bar)."""
    from tqdm import tqdm

    positions, valid = shard_positions(len(dataset), rank, world)
    loader = DataLoader(
        Subset(dataset, positions.tolist()),
        batch_size=batch_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    was_training = model.training
    model.eval()
    rows = []
    bar = tqdm(total=len(positions), desc=progress, unit="video", disable=True if progress is None or rank else None)
    try:
        for batch in loader:
            rows.append(rows_of(batch))
            bar.update(rows[-1].shape[0])
    finally:
        bar.close()
        model.train(was_training)
    local = torch.cat(rows)
    gathered = all_gather_rows(local, world)
    pos = all_gather_rows(torch.from_numpy(positions).to(local.device), world)
    keep = all_gather_rows(torch.from_numpy(valid).to(local.device), world)
    return assemble_shards(pos, keep, gathered, len(dataset))
