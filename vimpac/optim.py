"""AdamW parameter groups and learning-rate schedules for pre-training (docs/reference.md §5.6).

Weight decay. The original decided by parameter *name* and so decayed the positional tables, the CLS vector, the MLM
head's LayerNorm and the projection head's BatchNorm weights (docs/reference.md §8.12). Here the rule is structural:
  no decay  every parameter with fewer than 2 dimensions (biases, LayerNorm/BatchNorm weights, the CLS vector,
            the MLM output bias) and every parameter of a positional-embedding module (the T/H/W tables and the
            CLS position: they are additive offsets, like biases, and shrinking them towards 0 erases position);
  decay     the weight matrices of every Linear and the token embedding (tied to the MLM decoder, as in BERT).
With decay_groups="original" (--decay-groups original) the original's rule is reproduced instead: no decay for
every bias and the backbone's LayerNorm weights only; the positional tables, the CLS vector, the MLM head's
LayerNorm weight and the projection head's BatchNorm weights are decayed with the weight matrices.

Schedules (HF `get_*_schedule_with_warmup` semantics, which the original used): the multiplier of the peak
learning rate at optimizer step s (0-based, the value used by update s) is s / warmup during warm-up, then
  linear    (total - s) / (total - warmup), reaching 0 at the last step;
  cosine    0.5 (1 + cos(π (s - warmup) / (total - warmup)));
  constant  1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vimpac.errors import UsageError

SCHEDULES = ("linear", "cosine", "constant")
DECAY_GROUPS = ("structural", "original")


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters excluded from weight decay (see the module docstring)."""
    excluded = {id(p) for p in model.parameters() if p.dim() < 2}
    for module in model.modules():
        if type(module).__name__ == "PositionalEmbedding":
            excluded.update(id(p) for p in module.parameters())
    return excluded


def original_no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids excluded from decay by the original's name rule, in vimpac's names: every bias and the LayerNorm weights
    of the backbone (the original's `ln_pre`, `ln` and `LayerNorm`); its name list missed every other parameter."""
    excluded = {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and name.startswith("backbone.") and module.weight is not None:
            excluded.add(id(module.weight))
    return excluded


def parameter_groups(model: nn.Module, weight_decay: float, decay_groups: str = "structural") -> list[dict]:
    """Two AdamW groups, decayed and not, of the trainable parameters; each dict has "params", "weight_decay"
    and "names" (parameter names, for logging and tests; DeepSpeed and torch ignore unknown group keys).
    decay_groups: "structural" (vimpac's rule) or "original" (the original release's; module docstring)."""
    if decay_groups not in DECAY_GROUPS:
        raise UsageError(f"--decay-groups must be one of {', '.join(DECAY_GROUPS)}; got {decay_groups!r}")
    excluded = no_decay_parameter_ids(model) if decay_groups == "structural" else original_no_decay_parameter_ids(model)
    decay: list[tuple[str, nn.Parameter]] = []
    keep: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if id(p) in excluded else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay, "names": [n for n, _ in decay]},
        {"params": [p for _, p in keep], "weight_decay": 0.0, "names": [n for n, _ in keep]},
    ]


def warmup_steps(warm_up: float, total_steps: int) -> int:
    """--warm-up: a value below 1 is a ratio of the total optimizer steps (rounded down), else a step count."""
    if warm_up < 0:
        raise UsageError(f"--warm-up must be >= 0 (a ratio below 1 or a step count); got {warm_up}")
    if warm_up < 1:
        return int(warm_up * total_steps)
    if not float(warm_up).is_integer():
        raise UsageError(f"--warm-up {warm_up} is >= 1, so it is a step count and must be a whole number")
    return int(warm_up)


def lr_multiplier(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate used by optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    raise UsageError(f"--lr-scheduler must be one of {', '.join(SCHEDULES)}; got {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `optimizer` (DeepSpeed steps it once per applied optimizer step, never on skipped ones).

    The multiplier is a closure on purpose: LambdaLR then checkpoints only its step counter, so a resumed run
    uses this run's warm-up and total (the same ones unless the command line changed them)."""
    if kind not in SCHEDULES:
        raise UsageError(f"--lr-scheduler must be one of {', '.join(SCHEDULES)}; got {kind!r}")

    def multiplier(step: int) -> float:
        return lr_multiplier(kind, step, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
