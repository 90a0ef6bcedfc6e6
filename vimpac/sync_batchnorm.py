"""BatchNorm1d whose batch statistics span every rank, on any backend (gloo on CPU included).

torch.nn.SyncBatchNorm only runs on CUDA, and the original code therefore could not run on CPU at all (docs/reference.md
§8.3). Here the per-channel sum and count are all-reduced, then the sum of squared deviations from the global mean
(two small calls, exact where a one-call sum of squares cancels); the all-reduce is differentiable
(its backward all-reduces the gradient), so every rank gets the gradient of the global-batch normalisation, as
SyncBatchNorm does. Without an initialised process group or with one rank it computes what BatchNorm1d does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x. Every rank's loss depends on y, so dL/dx on each rank = Σ_ranks dL_r/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _world_size(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class DistributedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over [N, C] with statistics of the batch concatenated across the ranks of `process_group`.

    Every rank must call forward in the same order (it is a collective in training mode). Running statistics
    are updated from the global mean and the unbiased global variance, as BatchNorm does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, process_group=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def _global_sum(self, local: torch.Tensor) -> torch.Tensor:
        """Σ over the ranks of the group (differentiable); `local` itself with one rank."""
        return _AllReduceSum.apply(local, self.process_group) if _world_size(self.process_group) > 1 else local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"DistributedBatchNorm1d expects [N, C]; got {tuple(x.shape)}")
        # fp32 math whatever the activation dtype: sums of squares overflow fp16, and DeepSpeed's bf16/fp16 engines
        # cast the affine parameters but keep the running statistics in fp32.
        xf = x.float()
        if self.training:
            count = torch.full((1,), float(x.shape[0]), device=x.device)
            first = self._global_sum(torch.cat([xf.sum(0), count]))
            n = first[-1]
            mean = first[:-1] / n
            # Two passes, not E[x²] − mean²: that difference cancels catastrophically in fp32 when features sit
            # far from zero relative to their spread (the nearly-collapsed batches BatchNorm is there to spread).
            var = self._global_sum(torch.square(xf - mean).sum(0)) / n
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    unbiased = var * n / (n - 1).clamp_min(1.0)
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)
