"""kNN monitor of pre-training (docs/reference.md §5.8): nearest-neighbour classification of backbone CLS features.

At evaluation epochs the trainer embeds one clip per video of a labeled code database (UCF101 in the paper) with
the backbone (the CLS vector, not the projection head, in eval mode, without gradients):
  bank     one seeded random-start clip per video of the train split (`--knn-train-split`),
  queries  one seeded random-start clip per video of the validation split (`--knn-val-split`),
both from one spatial view (default: the database's centre view). Each query is classified by its k = 200
nearest bank features under cosine similarity: neighbour j votes for its class with weight exp(sim_j / t),
t = 0.07, and the class with the largest total wins. top-1 / top-5 accuracy go to TensorBoard and metrics.jsonl
as knn/top1 and knn/top5.

The clip start of video i is drawn from a generator seeded by (seed, i) only, so every evaluation embeds the
same clips and the curve shows what the backbone learned, not which clips were drawn.

Across ranks every video is embedded exactly once (vimpac.sharded_eval), giving one feature per video in split
order whatever the world size.

Entry points: `knn_predict` and `topk_accuracy` (pure functions), `KnnClips` (the dataset), `extract_features`
(backbone → gathered features), `KnnMonitor` (what the trainer calls), `add_knn_arguments` /
`knn_monitor_from_args` (the command line).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vimpac.clip_windows import clip_slack, take_clip
from vimpac.code_db import CodeDatabase
from vimpac.config import VimpacConfig
from vimpac.data import CodeClips, random_start, sample_rng
from vimpac.errors import UsageError
from vimpac.sharded_eval import evaluate_sharded
from vimpac.tokenization.views import centre_view

# Generator stream of the kNN clip draws; vimpac.data uses 0-2 for training samples.
KNN_STREAM = 3
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.07


# ------------------------------------------------------------------------------------------------- scoring


def knn_predict(
    query_feats: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN vote: query_feats [Q, D], bank_feats [N, D], bank_labels [N] int in [0, C) → probs [Q, C].

    Features are L2-normalised here; sim = cosine similarity. Each query takes its min(k, N) most similar bank
    entries (torch.topk: among exactly equal similarities the pick is unspecified) and each votes for its class
    with weight exp(sim / temperature). probs[q, c] is class c's share of query q's total vote, so rows sum to
    1 and the ranking of classes is that of the raw vote sums. Computed in fp32 with the largest similarity
    subtracted before exp (the ratios are unchanged; exp(1 / t) alone overflows fp32 for t < 0.012). Queries
    are processed `chunk` at a time, so memory is O(chunk · N).
    """
    if query_feats.dim() != 2 or bank_feats.dim() != 2 or query_feats.shape[1] != bank_feats.shape[1]:
        shapes = f"{tuple(query_feats.shape)}, {tuple(bank_feats.shape)}"
        raise ValueError(f"features must be [Q, D] and [N, D] with the same D; got {shapes}")
    if bank_labels.shape != (bank_feats.shape[0],):
        raise ValueError(f"bank_labels must be [N] = [{bank_feats.shape[0]}], got {tuple(bank_labels.shape)}")
    if bank_feats.shape[0] == 0:
        raise ValueError("the feature bank is empty")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0; got k={k}, temperature={temperature}")
    labels = bank_labels.to(device=bank_feats.device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"bank labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    bank = F.normalize(bank_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_feats.shape[0], chunk):
        queries = F.normalize(query_feats[start : start + chunk].float().to(bank.device), dim=1)
        sims, idx = (queries @ bank.T).topk(k, dim=1)  # [q, k], sorted descending
        weights = torch.exp((sims - sims[:, :1]) / temperature)
        votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, num_classes, device=bank.device)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, for each k (clamped to the number of
    classes). scores [Q, C], labels [Q]. Between exactly equal scores torch.topk decides."""
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {labels.shape[0]} labels")
    if scores.shape[0] == 0:
        raise ValueError("no queries to score")
    labels = labels.to(scores.device).long()
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


# --------------------------------------------------------------------------------------------- the clips


class KnnClips(CodeClips):
    """One clip per video of a labeled split: item i → {"tokens": int64 [T, h, w], "label": int, "index": i}.

    The clip takes T frames every db_fps / frame_rate database frames from a start drawn uniformly from the
    video's valid starts by a generator seeded by (seed, i); short videos are right-padded with pad_id.
    Every label is read (and checked to lie in [0, classes)) at construction, so `labels` is known on every
    rank without a gather and an unlabeled database is refused before training starts.
    """

    def __init__(
        self,
        db: str | Path | CodeDatabase,
        split: str,
        clip_len: int,
        *,
        pad_id: int,
        frame_rate: float | None = None,
        view: str | None = None,
        seed: int = 0,
    ):
        db = db if isinstance(db, CodeDatabase) else CodeDatabase(db)
        self.num_classes = len(db.manifest.get("classes") or [])
        if self.num_classes < 1:
            raise UsageError(f"the kNN monitor needs a labeled database; {db.path} lists no classes")
        if view is None:
            view = centre_view(db.views, db.manifest.get("frame_size"))
            if view is None:
                raise UsageError(
                    f"{db.path} has no centre view at its frame size; choose one with --knn-view from "
                    f"{', '.join(db.views)}"
                )
        super().__init__(db, [view], clip_len, pad_id, frame_rate)
        self.view = view
        self.ids = self.split_ids(split)
        self.split, self.seed = split, seed
        self.labels = torch.tensor([self.db.record(i, self.view).label for i in self.ids], dtype=torch.long)
        bad = ((self.labels < 0) | (self.labels >= self.num_classes)).nonzero().flatten()
        if bad.numel():
            first = self.ids[int(bad[0])]
            raise UsageError(
                f"{bad.numel()} videos of split {split!r} in {self.db.path} have no label in [0, {self.num_classes}) "
                f"(e.g. {first!r}, label {int(self.labels[bad[0]])}); the kNN monitor needs a labeled split"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def start(self, index: int, num_frames: int) -> int:
        """The clip start of video `index` (a function of seed, index and the video's length only)."""
        delta = clip_slack(num_frames, self.clip_len, self.stride)
        return random_start(delta, sample_rng(self.seed, 0, index, KNN_STREAM))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        codes, label = self.db.read(self.ids[index], self.view)
        tokens = take_clip(codes, self.start(index, codes.shape[0]), self.clip_len, self.stride, self.pad_id)
        return {"tokens": torch.from_numpy(tokens), "label": int(label), "index": index}


# ------------------------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
) -> torch.Tensor:
    """CLS features of every item of `dataset`, one row per item in item order: float32 [len(dataset), D].

    `backbone` maps tokens [B, T, h, w] to (cls [B, D], hiddens); it runs in eval mode (no dropout) and is put
    back in its previous mode. Each rank embeds its share (vimpac.sharded_eval); all ranks must call this together
    (the result is all-gathered, on `device`). The loader has its own generator: no draw from the global RNG.
    """
    return evaluate_sharded(
        backbone,
        dataset,
        lambda batch: backbone(batch["tokens"].to(device))[0].float(),
        rank=rank,
        world=world,
        batch_size=batch_size,
        num_workers=num_workers,
    )


class KnnMonitor:
    """kNN top-1 / top-5 of backbone CLS features: bank from `train`, queries from `val` (two KnnClips)."""

    def __init__(
        self,
        train: KnnClips,
        val: KnnClips,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        batch_size: int = 32,
        num_workers: int = 0,
    ):
        if train.num_classes != val.num_classes:
            raise UsageError(f"train and val splits disagree on the classes ({train.num_classes} vs {val.num_classes})")
        if k < 1 or temperature <= 0 or batch_size < 1:
            raise UsageError("--knn-k and --knn-batch-size must be >= 1 and --knn-temperature > 0")
        self.train, self.val = train, val
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(self, backbone: torch.nn.Module, device: torch.device | str, rank: int = 0, world: int = 1) -> dict:
        """{"knn/top1", "knn/top5"} (fractions); a collective: every rank must call it."""
        args = (device, rank, world, self.batch_size, self.num_workers)
        bank = extract_features(backbone, self.train, *args)
        queries = extract_features(backbone, self.val, *args)
        probs = knn_predict(queries, bank, self.train.labels, self.train.num_classes, self.k, self.temperature)
        accuracy = topk_accuracy(probs, self.val.labels, (1, 5))
        return {"knn/top1": accuracy[1], "knn/top5": accuracy[5]}

    def describe(self) -> str:
        return (
            f"kNN monitor: {len(self.train)} bank videos ({self.train.split}), {len(self.val)} queries "
            f"({self.val.split}), view {self.train.view}, {self.train.num_classes} classes, k={self.k}, "
            f"t={self.temperature}"
        )


# ------------------------------------------------------------------------------------------ command line


def add_knn_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation flags of pre-training: --eval-per-epochs and the kNN monitor's --knn-*."""
    g = parser.add_argument_group("evaluation (kNN monitor of CLS features; off unless --knn-monitor is given)")
    g.add_argument(
        "--eval-per-epochs",
        type=int,
        default=1,
        metavar="N",
        help="evaluate after every N-th epoch and after the last one",
    )
    g.add_argument(
        "--knn-monitor",
        metavar="DB",
        default=None,
        help="labeled code database (e.g. UCF101 tokenized at the model's frame size): log kNN top-1/top-5 of the "
        "backbone's CLS features as knn/top1, knn/top5",
    )
    g.add_argument(
        "--knn-train-split", default="train", metavar="NAME", help="split of DB for the bank (UCF101: train_1)"
    )
    g.add_argument(
        "--knn-val-split", default="val", metavar="NAME", help="split of DB for the queries (UCF101: test_1)"
    )
    g.add_argument("--knn-view", default=None, help="view of DB to read; unset: its r<frame size>_center_f0 view")
    g.add_argument(
        "--knn-frame-rate", type=float, default=None, help="clip fps in DB, must divide its fps; unset: its fps"
    )
    g.add_argument("--knn-k", type=int, default=DEFAULT_K, metavar="K", help="neighbours per query")
    g.add_argument(
        "--knn-temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T", help="vote weight exp(sim / T)"
    )
    g.add_argument("--knn-batch-size", type=int, default=32, metavar="B", help="clips per forward pass when embedding")


def knn_monitor_from_args(args: argparse.Namespace, config: VimpacConfig) -> KnnMonitor | None:
    """The monitor the flags ask for (None without --knn-monitor); UsageError for bad input, before training."""
    if args.eval_per_epochs < 1:
        raise UsageError(f"--eval-per-epochs must be >= 1, got {args.eval_per_epochs}")
    if args.knn_monitor is None:
        return None
    from vimpac.trainer import check_database_matches  # lazy: the trainer imports this module's users

    db = CodeDatabase(args.knn_monitor)
    try:
        check_database_matches(db.manifest, config)
    except UsageError as err:
        raise UsageError(f"--knn-monitor {args.knn_monitor}: {err}") from None
    clips = {
        split: KnnClips(
            db,
            split,
            config.clip_len,
            pad_id=config.pad_id,
            frame_rate=args.knn_frame_rate,
            view=args.knn_view,
            seed=args.seed,
        )
        for split in (args.knn_train_split, args.knn_val_split)
    }
    shared = set(clips[args.knn_train_split].ids) & set(clips[args.knn_val_split].ids)
    if shared:
        raise UsageError(
            f"--knn-monitor {args.knn_monitor}: {len(shared)} videos are in both --knn-train-split "
            f"{args.knn_train_split!r} (the bank) and --knn-val-split {args.knn_val_split!r} (the queries), e.g. "
            f"{min(shared)}: each would find itself in the bank; give two disjoint splits"
        )
    return KnnMonitor(
        clips[args.knn_train_split],
        clips[args.knn_val_split],
        k=args.knn_k,
        temperature=args.knn_temperature,
        batch_size=args.knn_batch_size,
        num_workers=getattr(args, "num_workers", 0),
    )
