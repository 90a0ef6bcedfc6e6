"""Frozen-feature evaluation (`vimpac probe`): how linearly separable and how clustered a model's video features are.

The standard measure of self-supervised features, run on a labeled code database with the backbone frozen:
  features   per clip, the CLS vector (cls) and the mean of the T·h·w token vectors over the non-PAD positions
             (mean), from the last layer, in eval mode; per video, the mean of its clip features over the V
             evaluation views × K uniformly spaced clips (vimpac.finetune_data.FinetuneTestClips, the clips that
             fine-tuning evaluates), so a video's feature does not depend on a random draw;
  linear     multinomial logistic regression on features standardised with the training set's mean and std,
             with an L2 penalty, fitted full-batch by L-BFGS in float64 from zero weights (deterministic). The
             penalty is chosen from a small fixed grid by 5-fold stratified cross-validation on the training
             videos (ties go to the stronger penalty), then the model is refitted on every training video;
  kNN        the weighted vote of the pre-training monitor (vimpac.knn.knn_predict): cosine similarity of the raw
             features, the k nearest training videos vote for their class with weight exp(sim / 0.07).
Both are reported as top-1 accuracy over the evaluation videos. The numbers mean most next to those of the same
architecture at random initialisation, which `vimpac probe` computes too: a random transformer's features are
already far above chance on many video datasets.

Under a launcher every rank embeds its share of the videos (vimpac.sharded_eval) and the features are
all-gathered in video order (`extract_features`), so the result does not depend on the number of ranks; the
probes themselves are fitted on one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vimpac.knn import knn_predict
from vimpac.sharded_eval import evaluate_sharded

FEATURES = ("cls", "mean")
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# L2 penalty on the weights, relative to the mean cross-entropy of standardised features. 1e-4 is about
# scikit-learn's default C = 1 for 10k videos; 1e-1 about that for 10 videos.
DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Used when the grid cannot be searched: every class has a single training video, so none can be held out.
FALLBACK_WEIGHT_DECAY = 1e-3
# Cross-validation rather than one held-out split: with a few hundred training videos a fifth is a few dozen, and
# the chosen penalty (and with it the probe's accuracy) then swings by 10-20 points between split seeds; scoring
# every training video once makes the choice stable (benchmarks/README.md, "Linear probe").
DEFAULT_FOLDS = 5
DEFAULT_MAX_ITER = 300


# --------------------------------------------------------------------------------------------- features


def clip_features(backbone: nn.Module, tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens int64 [B, T, h, w] → (cls [B, D], mean [B, D]) in float32.

    mean averages the last hidden states over the non-PAD positions only: a short video's clip is right-padded
    with PAD along time, and those positions (never attended to as keys) would otherwise dilute the mean."""
    cls, hidden = backbone(tokens)  # [B, D], [B, T, h, w, D]
    real = (tokens != pad_id).unsqueeze(-1).to(hidden.dtype)  # [B, T, h, w, 1]
    mean = (hidden * real).sum(dim=(1, 2, 3)) / real.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return cls.float(), mean.float()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    clips: Dataset,
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    clips_per_forward: int = 32,
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every video of `clips`: (cls [N, D], mean [N, D]), float32 on the CPU, in item order.

    Item i of `clips` holds "tokens" int64 [C, T, h, w] (C = views × clips, the same for every video, e.g.
    FinetuneTestClips); video i's feature is the mean over its C clips of `clip_features`. `backbone` maps
    tokens [B, T, h, w] to (cls [B, D], hidden [B, T, h, w, D]); it runs in eval mode, without gradients, and
    its mode is restored. About `clips_per_forward` clips go through it at once (whole videos, at least one).
    Each rank embeds its share (vimpac.sharded_eval) and the features are all-gathered: a collective, every rank of
    the process group calls it. A tqdm bar (rank 0, on a terminal) counts this rank's videos, titled `desc`.
    """
    per_video = int(clips[0]["tokens"].shape[0])

    def rows_of(batch: dict[str, Any]) -> torch.Tensor:
        tokens = batch["tokens"]  # [B, C, T, h, w]
        cls, mean = clip_features(backbone, tokens.flatten(0, 1).to(device), pad_id)  # [B·C, D] each
        return torch.cat([cls, mean], dim=1).view(tokens.shape[0], per_video, -1).mean(dim=1)  # [B, 2D]

    batch_size = max(1, clips_per_forward // per_video)
    both = evaluate_sharded(
        backbone, clips, rows_of, rank=rank, world=world, batch_size=batch_size, num_workers=num_workers, progress=desc
    ).cpu()
    return both[:, : both.shape[1] // 2], both[:, both.shape[1] // 2 :]


def stratified_folds(labels: torch.Tensor, folds: int = DEFAULT_FOLDS, seed: int = 0) -> list[list[int]]:
    """Disjoint cross-validation folds of the indices of `labels` [N], stratified by class.

    Every class with at least 2 items is shuffled by a generator of `seed` and dealt round-robin over the folds,
    each class continuing where the previous one stopped, so fold sizes differ by at most one. A class with a single
    item is never scored (it could not be fitted then): it stays in every fold's fitting set. Empty folds are
    dropped, so the list is empty when no class has 2 items.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    labels_np = labels.numpy()
    rng = np.random.default_rng(seed)
    dealt: list[list[int]] = [[] for _ in range(folds)]
    position = 0
    for label in np.unique(labels_np):
        members = np.flatnonzero(labels_np == label)
        if len(members) < 2:
            continue
        for index in members[rng.permutation(len(members))]:
            dealt[position % folds].append(int(index))
            position += 1
    return [sorted(fold) for fold in dealt if fold]


# ----------------------------------------------------------------------------------------------- probes


def _check(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D]; got {tuple(train_x.shape)}, {tuple(test_x.shape)}")
    if train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError("labels must be [N] and [M], one per feature row")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("no training or no test features")


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Subtract the training mean and divide by the training std (per dimension; constant dimensions are only
    centred) from `train_x` [N, D] and every tensor of `others` [M, D]."""
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train_x, *others)]


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = DEFAULT_MAX_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: (weight [D, C], bias [C]) minimising
    mean cross-entropy(x @ weight + bias, y) + weight_decay / 2 · ||weight||² (the bias is not penalised),
    by full-batch L-BFGS (strong Wolfe line search) from zeros, in x's dtype and on its device."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    # Tolerances for float64: torch's defaults (meant for float32) stop while the gradient is still ~1e-5.
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _fit_and_score(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
) -> float:
    train_x, test_x = standardize(train_x, test_x)
    weight, bias = fit_logistic_regression(train_x, train_y, num_classes, weight_decay, max_iter)
    return float(((test_x @ weight + bias).argmax(dim=1) == test_y).double().mean())


def _cross_validate(
    x: torch.Tensor, y: torch.Tensor, folds: list[list[int]], num_classes: int, weight_decay: float, max_iter: int
) -> float:
    """Accuracy over every video of `folds`, each fold scored by a model fitted on all other rows of x [N, D]."""
    correct, scored = 0.0, 0
    for fold in folds:
        held = torch.tensor(fold, device=x.device)
        keep = torch.ones(len(y), dtype=torch.bool, device=x.device)
        keep[held] = False
        correct += _fit_and_score(x[keep], y[keep], x[held], y[held], num_classes, weight_decay, max_iter) * len(fold)
        scored += len(fold)
    return correct / scored


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1 accuracy of a linear classifier of train_x [N, D] (labels train_y [N] in [0, C)) on test_x [M, D].

    Logistic regression on standardised features (module docstring). With several `weight_decays` the penalty
    is the one with the best cross-validated accuracy over `stratified_folds(train_y, folds, seed)` (each fold
    scored by a model fitted on the other training videos; ties: the larger penalty), or FALLBACK_WEIGHT_DECAY
    when nothing can be held out; the final model is fitted on all of train_x. Computed in float64 on `device`.
    Returns {"accuracy", "weight_decay", "cv_accuracy" ({str(λ): accuracy over the scored training videos} of
    the search, None without one)}.
    """
    _check(train_x, train_y, test_x, test_y)
    if not weight_decays or min(weight_decays) < 0:
        raise ValueError(f"weight_decays must be a non-empty list of values >= 0; got {list(weight_decays)}")
    classes = int(num_classes if num_classes is not None else max(int(train_y.max()), int(test_y.max())) + 1)
    x, y = train_x.to(device, torch.float64), train_y.to(device, torch.long)
    tx, ty = test_x.to(device, torch.float64), test_y.to(device, torch.long)
    searched: dict[str, float] | None = None
    chosen = float(weight_decays[0])
    if len(weight_decays) > 1:
        parts = stratified_folds(train_y.cpu(), folds, seed)
        if parts:
            searched = {
                str(float(wd)): _cross_validate(x, y, parts, classes, float(wd), max_iter) for wd in weight_decays
            }
            # max over (accuracy, penalty): among equally accurate penalties the strongest, the simplest model.
            chosen = max((acc, float(wd)) for wd, acc in searched.items())[1]
        else:
            chosen = FALLBACK_WEIGHT_DECAY
    accuracy = _fit_and_score(x, y, tx, ty, classes, chosen, max_iter)
    return {"accuracy": accuracy, "weight_decay": chosen, "cv_accuracy": searched}


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = DEFAULT_K,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy of the weighted kNN vote (vimpac.knn.knn_predict: cosine similarity, the min(k, N) nearest
    of train_x [N, D] vote for their label train_y [N] with weight exp(sim / temperature)) on test_x [M, D]."""
    _check(train_x, train_y, test_x, test_y)
    classes = int(num_classes if num_classes is not None else max(int(train_y.max()), int(test_y.max())) + 1)
    probs = knn_predict(test_x, train_x, train_y, classes, k=k, temperature=temperature)  # [M, C]
    return float((probs.argmax(dim=1).cpu() == test_y.cpu()).double().mean())


def nearest_neighbours(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each video's k nearest other videos among x [M, D] (M ≥ 2) by cosine similarity, the most similar first:
    (indices int64 [M, k'], similarities float64 [M, k']) on the CPU, k' = min(k, M − 1). A video never retrieves
    itself. The neighbours `retrieval_recall` scores (and the demo's retrieval picture shows)."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"retrieval needs features [M, D] of at least two videos; got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    unit = F.normalize(x.double(), dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("-inf"))  # a video never retrieves itself
    values, indices = sim.topk(min(k, x.shape[0] - 1), dim=1)  # [M, k'], most similar first
    return indices.cpu(), values.cpu()


def retrieval_queries(y: torch.Tensor, count: int) -> list[int]:
    """`count` query videos (fewer when y [M] has fewer items) for a picture of retrieval: the first video of
    each class in label order, then the second of each, and so on, so the queries cover as many classes as they
    can. Indices into y, in that order."""
    labels = y.cpu().tolist()
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    rounds = max((len(members) for members in by_class.values()), default=0)
    order = [by_class[c][r] for r in range(rounds) for c in sorted(by_class) if r < len(by_class[c])]
    return order[: max(0, count)]


def retrieval_recall(x: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Same-class retrieval among the videos x [M, D] with labels y [M] (M ≥ 2): each video queries all the others
    by cosine similarity; recall@k is the share of queries with at least one video of their class among their
    k nearest (k capped at M − 1; `nearest_neighbours`). {k: recall}."""
    if x.shape[0] < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"retrieval needs at least two videos with one label each; got {x.shape[0]} and {y.shape[0]}")
    nearest, _ = nearest_neighbours(x, max(ks))  # [M, k], most similar first
    same = y.cpu()[nearest] == y.cpu()[:, None]
    return {k: float(same[:, :k].any(dim=1).double().mean()) for k in ks}


def majority_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent training class (ties: the smallest label): the floor that
    a probe must beat on an unbalanced split."""
    majority = int(torch.bincount(train_y.long()).argmax())
    return float((test_y == majority).double().mean())


# ---------------------------------------------------------------------------------------------- report


def format_table(results: dict[str, dict[str, dict[str, Any]]], k: int) -> str:
    """Aligned rows feature × classifier, one column per model, from
    results[model][feature] = {"linear": {"accuracy", "weight_decay", ...}, "knn": accuracy, "recall@1": r,
    "recall@5": r} (recall: same-class retrieval among the held-out videos, retrieval_recall)."""
    models = list(results)
    rows = [("feature", "classifier", *models)]
    for feature in FEATURES:
        rows.append((feature, "linear probe", *(f"{results[m][feature]['linear']['accuracy']:.3f}" for m in models)))
        rows.append((feature, f"kNN (k={k})", *(f"{results[m][feature]['knn']:.3f}" for m in models)))
        for name in ("recall@1", "recall@5"):
            if all(name in results[m][feature] for m in models):
                rows.append((feature, f"retrieval {name}", *(f"{results[m][feature][name]:.3f}" for m in models)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
