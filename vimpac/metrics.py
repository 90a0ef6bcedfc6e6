"""Training metrics: averaged over micro-steps and ranks, written to TensorBoard and to `metrics.jsonl`.

Only rank 0 writes. `metrics.jsonl` holds one json object per optimizer step ({"step": s, "epoch": e, name:
value, ...}); it is what tests and scripts read back, TensorBoard is for people. Names:
  loss/total, loss/mlm, loss/nce      weighted total and the two raw losses (nce includes the temperature factor)
  accuracy/mlm, accuracy/nce          masked-token accuracy over all predicted positions of the step; fraction of
                                      anchors whose positive scores highest
  optim/lr, optim/loss_scale, optim/skipped_steps, optim/grad_norm
  speed/tokens_per_s, speed/clips_per_s, speed/tflops_per_rank, speed/mfu
  knn/top1, knn/top5                  kNN monitor accuracy (vimpac.knn), only in the last record of an evaluation
                                      epoch
A line torn by a kill is skipped. A resumed run appends to the same file; the records of steps it repeats
(those after the last checkpoint) follow the earlier ones, so readers keep the last record per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


class StepAccumulator:
    """Sums per-micro-step values of one optimizer step, then reduces them over ranks in one all_reduce.

    `add(name, value, weight)` accumulates value·weight and weight; `reduce()` returns {name: Σ value·weight /
    Σ weight} over micro-steps and ranks (weights: 1 for plain means, counts for exact ratios) and resets.
    `device` is where the all_reduce happens: the engine's device, since NCCL (the process group on GPUs) moves
    CUDA tensors only and refuses a CPU one."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float | torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        total = self._sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * float(weight)
        total[1] += float(weight)

    def reduce(self) -> dict[str, float]:
        names = sorted(self._sums)
        self._sums, sums = {}, self._sums
        if not names:
            return {}
        packed = torch.tensor([v for n in names for v in sums[n]], dtype=torch.float64, device=self.device)
        # Also in a one-rank group: a one-GPU run then takes the path (and the device) of a many-GPU one.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        pairs = packed.view(-1, 2).tolist()
        return {n: (total / weight if weight > 0 else 0.0) for n, (total, weight) in zip(names, pairs)}


class MetricsWriter:
    """TensorBoard events under `<output>/tensorboard` and `<output>/metrics.jsonl`, on rank 0 only."""

    def __init__(self, output: str | Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(output) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: only rank 0 pays for it

            self._tb = SummaryWriter(str(Path(output) / "tensorboard"))
            torn = self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
            self._file = self.path.open("a")
            if torn:  # a killed run left half a line: end it so the next record starts on its own line
                self._file.write("\n")

    def write(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        self._file.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._file.close()
            self.enabled = False


def read_metrics(output: str | Path) -> dict[int, dict[str, float]]:
    """`metrics.jsonl` of a run as {step: record}, the last record winning for repeated steps."""
    records: dict[int, dict[str, float]] = {}
    path = Path(output) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # empty, or torn by a kill
            records[int(record["step"])] = record
    return records
