"""Pre-training losses: masked-token cross-entropy (docs/reference.md §5.3) and cross-rank InfoNCE (§5.4).

How the trainer combines them (docs/reference.md §5.5): L = mlm_weight * mlm.loss + nce_weight * nce.loss, where
nce.loss already carries the temperature factor (L_cl = γ (mean loss_a + mean loss_b)).

Across data-parallel ranks both losses are per-rank means over local items (masked positions, local anchors) and
DeepSpeed/DDP average the gradients over ranks. For InfoNCE that average equals the gradient of the mean loss over
all anchors of all ranks, because the all-gather's backward sums every rank's gradient into the rank that owns
the features (see `gather_with_grad`). The MLM loss is a mean of per-rank means, which weighs ranks equally
even when they hold different numbers of masked positions (as the original does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class MaskedTokenLoss(NamedTuple):
    """loss: scalar mean CE over masked positions (0 with a graph when there are none, never NaN);
    num_correct / num_masked: int64 scalars, so accuracy can be summed exactly over ranks and steps."""

    loss: torch.Tensor
    num_correct: torch.Tensor
    num_masked: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """Masked-token accuracy in [0, 1] (0 when nothing was masked)."""
        return self.num_correct.float() / self.num_masked.clamp(min=1).float()


class ContrastiveLoss(NamedTuple):
    """loss: γ (mean loss_a + mean loss_b) over local anchors; accuracy: fraction of the 2B local anchors whose
    highest logit is their positive."""

    loss: torch.Tensor
    accuracy: torch.Tensor


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> MaskedTokenLoss:
    """Cross-entropy of logits [M, rows] (any float dtype; computed in at least fp32) against targets [M] int64.

    With M = 0 the loss is an exact 0 that still depends on the logits, so backward works and no NaN appears
    (the original divided by zero for `--mask-blocks 0`).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_masked = torch.tensor(targets.numel(), device=logits.device)
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return MaskedTokenLoss(zero, torch.zeros((), dtype=torch.int64, device=logits.device), num_masked)
    loss = F.cross_entropy(logits, targets)
    num_correct = (logits.argmax(dim=-1) == targets).sum()
    return MaskedTokenLoss(loss, num_correct, num_masked)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward returns the gradient of every rank's loss w.r.t. the local slice, summed.

    The sum is an all_reduce of the whole gathered gradient followed by taking the local slice: gloo has no
    reduce_scatter, and the tensor is tiny (world * B * 256 floats).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        rank, world = _world(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate x [B, ...] from all ranks in rank order -> [world * B, ...], differentiably.

    Every rank must pass the same B (the sampler's drop_last guarantees it). Without an initialised process
    group, or with one rank, this is the identity.
    """
    if _world(group)[1] == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def _one_direction(
    anchors: torch.Tensor, others_all: torch.Tensor, anchors_all: torch.Tensor, targets: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of anchors [B, d] over [anchors·others_allᵀ, anchors·anchors_allᵀ with self removed] / tau.
    Returns (per-anchor losses [B], per-anchor correctness [B] bool)."""
    cross = anchors @ others_all.T / tau  # positive at column targets[i]
    same = anchors @ anchors_all.T / tau
    self_pair = F.one_hot(targets, num_classes=same.shape[1]).bool()
    same = same.masked_fill(self_pair, float("-inf"))
    logits = torch.cat([cross, same], dim=1)
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(dim=1) == targets


def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.2,
    group: dist.ProcessGroup | None = None,
    normalize: bool = True,
) -> ContrastiveLoss:
    """Symmetric InfoNCE between the two clips of each local video, negatives from every rank (docs/reference.md §5.4).

    z1, z2: [B, d] projections of clip A and clip B of the same B videos (any float dtype; computed in >= fp32;
    L2-normalised here when `normalize`). With g = rank·B + i the global index of local video i:
      loss_a(i) = CE([z1_i·z2_allᵀ, z1_i·z1_allᵀ with column g removed] / γ, target g), loss_b symmetric;
      loss = γ (mean_i loss_a + mean_i loss_b)   (directions summed, as paper Eq. 5; times γ, Eq. 6).
    Each anchor sees 1 positive and 2(N - 1) negatives, N = world·B.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [B, d], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(z1.dtype, torch.float32)  # half/bf16 -> fp32; fp64 stays (exact tests)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    z1_all, z2_all = gather_with_grad(z1, group), gather_with_grad(z2, group)
    rank = _world(group)[0]
    targets = torch.arange(z1.shape[0], device=z1.device) + rank * z1.shape[0]
    loss_a, correct_a = _one_direction(z1, z2_all, z1_all, targets, temperature)
    loss_b, correct_b = _one_direction(z2, z1_all, z2_all, targets, temperature)
    loss = (loss_a.mean() + loss_b.mean()) * temperature
    accuracy = torch.cat([correct_a, correct_b]).float().mean()
    return ContrastiveLoss(loss, accuracy)
