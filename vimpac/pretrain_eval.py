"""Held-out evaluation of a pre-trained model against two baselines that need no training (`vimpac pretrain-eval`).

Masked-token accuracy only means something next to what a trivial predictor gets on the same masks:
  most frequent code    always answer the code that is most frequent in the evaluated videos;
  copy nearest visible  answer the code of the nearest unmasked, non-PAD position of the same clip (t, y, x
                        grid units, Euclidean): video codes are highly redundant in time and space, so this is
                        the baseline a model must beat to show it learned more than copying.
All three are scored on exactly the same masked positions. Contrastive accuracy is the fraction of anchors whose
positive (the other clip of the same video) scores highest among the 2B - 1 candidates of its batch, so it is
reported with its chance level 1 / (2B - 1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vimpac.code_db import CodeDatabase
from vimpac.data import PretrainClips
from vimpac.errors import UsageError
from vimpac.finetune_setup import load_exported
from vimpac.losses import info_nce
from vimpac.masking import IGNORE_INDEX
from vimpac.modeling import VimpacForPretraining


def most_frequent_code(
    db: str | Path | CodeDatabase, split: str | None = None, views: Sequence[str] | None = None
) -> int:
    """The most frequent code over every stored frame of the videos of `split` (None: all) in `views` (None: all);
    ties go to the smallest code. This is the constant of the "most frequent code" baseline."""
    db = db if isinstance(db, CodeDatabase) else CodeDatabase(db)
    vocab = int(db.manifest["tokenizer"]["vocab_size"])
    ids = db.ids(split)
    if not ids:
        raise UsageError(f"split {split!r} of {db.path} has no videos")
    counts = np.zeros(vocab, dtype=np.int64)
    for video_id in ids:
        for view in views if views is not None else db.views:
            codes, _ = db.read(video_id, view)
            video_counts = np.bincount(codes.ravel(), minlength=vocab)
            if len(video_counts) > vocab:
                raise ValueError(f"video {video_id!r} ({view}) holds code {len(video_counts) - 1} >= vocab {vocab}")
            counts += video_counts
    return int(counts.argmax())


def nearest_visible_copy(tokens: torch.Tensor, predict: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The "copy nearest visible" prediction of one clip.

    tokens int64 [T, h, w]; predict, visible bool [T, h, w] → int64 [T, h, w]: where `predict`, the token at the
    nearest `visible` position (Euclidean distance over (t, y, x) in grid units; ties go to the smallest flat
    index), or -1 when nothing is visible; elsewhere the token itself.
    """
    if tokens.dim() != 3 or predict.shape != tokens.shape or visible.shape != tokens.shape:
        raise ValueError(
            f"tokens, predict and visible must all be [T, h, w]; got {tuple(tokens.shape)}, "
            f"{tuple(predict.shape)}, {tuple(visible.shape)}"
        )
    flat = tokens.flatten()
    out = flat.clone()
    targets = predict.flatten().nonzero().squeeze(1)
    sources = visible.flatten().nonzero().squeeze(1)
    if targets.numel() == 0:
        return out.view_as(tokens)
    if sources.numel() == 0:
        out[targets] = -1
        return out.view_as(tokens)
    coords = torch.stack(torch.unravel_index(torch.arange(flat.numel(), device=flat.device), tokens.shape), dim=1)
    # Squared distances in integers, so equal distances compare equal (cdist's matmul path can round them apart).
    dist2 = torch.zeros(len(targets), len(sources), dtype=torch.int64, device=flat.device)
    for axis in range(3):
        dist2 += (coords[targets, axis, None] - coords[None, sources, axis]) ** 2
    # Appending the flat index as the low-order part makes every key distinct and breaks ties by that index.
    nearest = (dist2 * flat.numel() + sources[None, :]).argmin(dim=1)
    out[targets] = flat[sources[nearest]]
    return out.view_as(tokens)


def _fraction(correct: int, total: int) -> float | None:
    return correct / total if total else None


@torch.no_grad()
def evaluate_pretraining(
    model: nn.Module,
    dataset: PretrainClips,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    frequent_code: int,
) -> dict[str, Any]:
    """Score `model` and the two baselines on every video of `dataset` once, in order.

    `model` maps (tokens [2B, T, h, w], mlm_labels [2B, T, h, w]) to a dict like VimpacForPretraining's:
    "mlm_logits" [M, rows] with "mlm_positions" [M] (flat indices into the labels) and/or "nce" [2B, d], clip 0 of
    every video first. It runs in eval mode and its mode is restored. The model's prediction is the argmax over
    the first vocab_size rows (PAD / MASK are never an answer). Contrastive numbers use full batches only
    (InfoNCE accuracy depends on B, and a lone video has no negatives); every batch counts for the masked tokens.

    Returns {"masked_positions", "mlm_accuracy", "most_frequent_accuracy", "nearest_copy_accuracy",
    "most_frequent_code", "contrastive_accuracy", "contrastive_chance", "videos", "batch_size"}; an accuracy is
    None when there is nothing to score (no MLM / contrastive head, no full batch, no masked token).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    vocab = dataset.vocab_size
    masked = model_correct = frequent_correct = copy_correct = 0
    has_mlm = has_nce = True
    nce_correct, nce_videos, chances = 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            videos = batch["inputs"].shape[0]
            # Clip 0 of every video first, as in training: "nce" then splits into z1 = [:B] and z2 = [B:].
            tokens = batch["inputs"].transpose(0, 1).flatten(0, 1)
            labels = batch["labels"].transpose(0, 1).flatten(0, 1)
            out = model(tokens.to(device), labels.to(device))
            predict = labels != IGNORE_INDEX
            visible = ~predict & (tokens != dataset.pad_id)
            positions = predict.flatten().nonzero().squeeze(1)
            targets = labels.flatten()[positions]
            masked += len(targets)
            frequent_correct += int((targets == frequent_code).sum())
            copies = torch.stack([nearest_visible_copy(*clip) for clip in zip(tokens, predict, visible)])
            copy_correct += int((copies.flatten()[positions] == targets).sum())
            has_mlm = has_mlm and "mlm_logits" in out
            if has_mlm:
                if not torch.equal(out["mlm_positions"].cpu(), positions):
                    raise ValueError("the model scored other positions than the masked ones of the batch")
                predicted = out["mlm_logits"][:, :vocab].argmax(dim=1).cpu()
                model_correct += int((predicted == targets).sum())
            has_nce = has_nce and "nce" in out
            if has_nce and videos == batch_size and videos > 1:
                nce = info_nce(out["nce"][:videos], out["nce"][videos:])
                nce_correct += float(nce.accuracy) * videos
                nce_videos += videos
                chances.append(1 / (2 * videos - 1))
    finally:
        model.train(was_training)
    return {
        "masked_positions": masked,
        "mlm_accuracy": _fraction(model_correct, masked) if has_mlm else None,
        "most_frequent_accuracy": _fraction(frequent_correct, masked),
        "nearest_copy_accuracy": _fraction(copy_correct, masked),
        "most_frequent_code": int(frequent_code),
        "contrastive_accuracy": nce_correct / nce_videos if has_nce and nce_videos else None,
        "contrastive_chance": sum(chances) / len(chances) if has_nce and chances else None,
        "videos": len(dataset),
        "batch_size": batch_size,
    }


def recorded_arguments(export: Path) -> tuple[dict[str, Any], Path | None]:
    """(the command-line arguments of the pre-training run that wrote `export`, the run_config.json they came
    from): looked up in `export` and its parent (the run directory); ({}, None) when there is none."""
    for folder in (export, export.parent):
        path = folder / "run_config.json"
        if path.is_file():
            try:
                return dict(json.loads(path.read_text(encoding="utf-8"))["args"]), path
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UsageError(f"{path} cannot be read ({err}); pass --mask-blocks and --frame-rate") from err
    return {}, None


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> VimpacForPretraining:
    """The pre-training model of an export folder (or a run directory holding export/), in eval mode on `device`.
    The heads are those present in the weights (a run with --mlm-weight 0 or --nce-weight 0 exports only one)."""
    config, state = load_exported(path)
    heads = {name.split(".", 1)[0] for name in state}
    if "classifier" in heads:
        raise UsageError(
            f"{path} is a fine-tuning export (it has a classifier and no pre-training heads); pass the export of "
            "a pre-training run, or use `vimpac predict` / `vimpac embed` for a fine-tuned model"
        )
    model = VimpacForPretraining(config, mlm="mlm_head" in heads, nce="nce_head" in heads)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UsageError(f"the weights in {path} are not a pre-training model of its config.json: {err}") from err
    return model.to(device).eval()


def _accuracy(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """Aligned lines for the terminal from `evaluate_pretraining`'s result."""
    mlm = "n/a (no MLM head)" if result["mlm_accuracy"] is None else _accuracy(result["mlm_accuracy"])
    lines = [
        f"{'videos':<23}{result['videos']:,} (two masked clips each)",
        f"{'masked-token accuracy':<23}model {mlm} | most frequent code {_accuracy(result['most_frequent_accuracy'])}"
        f" | copy nearest visible {_accuracy(result['nearest_copy_accuracy'])}  "
        f"({result['masked_positions']:,} masked tokens; most frequent code {result['most_frequent_code']})",
    ]
    if result["contrastive_accuracy"] is None:
        contrastive = f"n/a (no contrastive head, or fewer than {result['batch_size']} videos for a full batch)"
    else:
        contrastive = (
            f"{result['contrastive_accuracy']:.2f} (chance {result['contrastive_chance']:.2f}, batches of "
            f"{result['batch_size']} videos)"
        )
    lines.append(f"{'contrastive accuracy':<23}{contrastive}")
    return "\n".join(lines)
