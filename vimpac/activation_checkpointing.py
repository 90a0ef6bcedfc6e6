"""Activation checkpointing per transformer layer, non-reentrant so that every parameter trains.

The reentrant variant (`deepspeed.checkpointing.checkpoint`, torch's `use_reentrant=True`) silently gives no
gradient to the parameters of a block when none of its *inputs* requires grad (docs/design.md §11.2). The
non-reentrant torch implementation records the block's graph through saved-tensor hooks instead, so parameters
always get gradients, and it restores the RNG state for recomputation, so dropout masks match the first pass.

DeepSpeed's own options in the json's "activation_checkpointing" section (partition_activations,
cpu_checkpointing, ...) target model-parallel runs, which vimpac does not use; only the section's presence
matters (vimpac.ds_config). Wrapping replaces each layer's `forward` on the instance, so module names and the
state dict are unchanged (checkpoints and exported weights are the same with and without it).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Recompute each layer's activations in backward instead of storing them (idempotent)."""
    for layer in layers:
        if "forward" not in vars(layer):
            layer.forward = functools.partial(_checkpointed, type(layer).forward.__get__(layer))


def activation_checkpointing_enabled(layers: nn.ModuleList) -> bool:
    return all("forward" in vars(layer) for layer in layers)
