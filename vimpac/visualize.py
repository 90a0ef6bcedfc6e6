"""Pictures of what the model does: decoded clips with the masked cells and the model's fill-in, and curves.

A clip of codes [T, h, w] decodes (with the tokenizer's decoder, d = its downsampling) to frames [T, h·d, w·d, 3].
`clip_rows` makes three such rows: the reconstruction (what the tokenizer keeps of the video), the same with the
masked cells grey (what the model sees), and the decode of the model's predictions in those cells, outlined.
`write_grid_png` lays rows out as a labelled grid (one row per entry, one column per frame) and `write_gif` as an
animation over time. `retrieval_picture` shows query clips beside their nearest neighbours by a feature, framed
green (same class) or red (another). `plot_curves` draws the training curves of pre-training and fine-tuning runs
from their metrics.jsonl. Everything renders off-screen (PIL, matplotlib's Agg canvas); nothing needs a display.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vimpac.errors import UsageError
from vimpac.masking import IGNORE_INDEX
from vimpac.metrics import read_metrics

if TYPE_CHECKING:
    from vimpac.tokenization.tokenizer import Tokenizer

MASK_GREY = 128
PAD_COLOUR = (0, 0, 0)
# Magenta is rare in natural and synthetic video, so the outline stays visible on any content.
OUTLINE_COLOUR = (255, 0, 255)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
GAP = 2
MIN_HEIGHT = 96
TEXT_PAD = 4

# ------------------------------------------------------------------------------------------------- clips


def cell_pixels(cells: np.ndarray, downsample: int) -> np.ndarray:
    """Per-token flags bool [T, h, w] → per-pixel flags bool [T, h·d, w·d] (each token covers a d×d cell)."""
    cells = np.asarray(cells, dtype=bool)
    return cells.repeat(downsample, axis=1).repeat(downsample, axis=2)


def outline_pixels(cells: np.ndarray, downsample: int) -> np.ndarray:
    """The 1-px inner border of the region covered by `cells` bool [T, h, w]: bool [T, h·d, w·d].

    A pixel is on the border when it is covered and one of its 4 neighbours is not (the frame's edge counts as
    not covered), so a block of masked tokens gets one outline rather than a line around every token.
    """
    inside = cell_pixels(cells, downsample)
    padded = np.pad(inside, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    interior = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    return inside & ~interior


def decode_clip(tokenizer: Tokenizer, tokens: np.ndarray) -> np.ndarray:
    """tokens int [T, h, w] → frames uint8 [T, h·d, w·d, 3]; PAD (or any id outside [0, vocab_size)) is black.

    The decoder only knows codes, so such positions are decoded as code 0 and painted over afterwards.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    special = (tokens < 0) | (tokens >= tokenizer.vocab_size)
    frames = tokenizer.decode(np.where(special, 0, tokens))
    frames[cell_pixels(special, tokenizer.downsample)] = PAD_COLOUR
    return frames


def clip_rows(
    tokenizer: Tokenizer, tokens: np.ndarray, masked: np.ndarray, predicted: np.ndarray
) -> dict[str, np.ndarray]:
    """The three rows of a masked-prediction picture, each uint8 [T, h·d, w·d, 3].

    tokens int [T, h, w]: the clip's codes (PAD allowed); masked bool [T, h, w]: the positions the model had to
    predict; predicted int [T, h, w]: the model's codes (only read where masked). Rows:
      "reconstruction"  decode(tokens);
      "masked"          the reconstruction with every masked cell mid-grey (MASK_GREY);
      "prediction"      decode(tokens with the masked positions replaced by predicted), masked region outlined
                        1 px in OUTLINE_COLOUR.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    masked = np.asarray(masked, dtype=bool)
    predicted = np.asarray(predicted, dtype=np.int64)
    if not tokens.shape == masked.shape == predicted.shape or tokens.ndim != 3:
        raise ValueError(
            f"tokens, masked and predicted must be [T, h, w] of one shape; got {tokens.shape}, {masked.shape}, "
            f"{predicted.shape}"
        )
    d = tokenizer.downsample
    reconstruction = decode_clip(tokenizer, tokens)
    grey = reconstruction.copy()
    grey[cell_pixels(masked, d)] = MASK_GREY
    prediction = decode_clip(tokenizer, np.where(masked, predicted, tokens))
    prediction[outline_pixels(masked, d)] = OUTLINE_COLOUR
    return {"reconstruction": reconstruction, "masked": grey, "prediction": prediction}


@torch.no_grad()
def predict_masked(
    model: torch.nn.Module, inputs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, vocab_size: int
) -> np.ndarray:
    """The model's codes at the masked positions of one clip, int64 [T, h, w].

    inputs int [T, h, w]: the clip with MASK at masked positions (as `mask_blocks` makes it); labels int [T, h, w]:
    the original code where masked, IGNORE_INDEX elsewhere. `model` is called as model(tokens [1, T, h, w],
    mlm_labels [1, T, h, w]) and returns "mlm_logits" [M, rows] and "mlm_positions" [M] (VimpacForPretraining).
    Only the first `vocab_size` rows compete in the argmax: PAD and MASK are never a prediction. The result is the
    original clip with the predictions written into the masked positions. The model runs in eval mode on the
    device of its parameters, and is put back into the mode it was in.
    """
    inputs = torch.as_tensor(np.asarray(inputs), dtype=torch.int64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if inputs.shape != labels.shape or inputs.dim() != 3:
        raise ValueError(f"inputs and labels must be [T, h, w] of one shape; got {inputs.shape}, {labels.shape}")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = model(inputs[None].to(device), labels[None].to(device))
    finally:
        model.train(was_training)
    guesses = out["mlm_logits"][:, :vocab_size].argmax(dim=-1).cpu()
    positions = out["mlm_positions"].cpu()
    result = torch.where(labels != IGNORE_INDEX, labels, inputs).flatten()
    result[positions] = guesses
    return result.view(inputs.shape).numpy()


# ------------------------------------------------------------------------------------------------ images


def upscale_factor(height: int) -> int:
    """Integer nearest-neighbour factor that makes a frame of `height` px at least MIN_HEIGHT px high."""
    return max(1, math.ceil(MIN_HEIGHT / height))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def text_size(text: str) -> tuple[int, int]:
    """(width, height) in px of `text` in PIL's default font."""
    left, top, right, bottom = _font().getbbox(text)
    return math.ceil(right - left), math.ceil(bottom - top)


def label_column_width(names: list[str]) -> int:
    """Width of the grid's name column: the widest name plus TEXT_PAD on both sides."""
    return max(text_size(name)[0] for name in names) + 2 * TEXT_PAD


def _check_rows(rows: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """(T, H, W) shared by every row; ValueError if the rows are empty or differ."""
    shapes = {name: np.asarray(frames).shape for name, frames in rows.items()}
    if not shapes:
        raise ValueError("no rows to draw")
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[-1] != 3 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"rows must be uint8 [T, H, W, 3] of one shape; got {shapes}")
    return first[0], first[1], first[2]


def _enlarged(frame: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def write_grid_png(rows: Mapping[str, np.ndarray], path: str | Path, labels: bool = True) -> Path:
    """Save rows {name: uint8 [T, H, W, 3]} as one PNG: a row per entry, a column per frame, GAP px between and
    around the cells, frames enlarged by `upscale_factor(H)` (nearest). With `labels`, each row's name is written
    in a column of `label_column_width` px at the left. Size: width = GAP + [label column + GAP] + T·(s·W + GAP),
    height = GAP + rows·(s·H + GAP). Returns `path`."""
    t, h, w = _check_rows(rows)
    scale = upscale_factor(h)
    cell_w, cell_h = w * scale, h * scale
    left = GAP + (label_column_width(list(rows)) + GAP if labels else 0)
    canvas = Image.new("RGB", (left + t * (cell_w + GAP), GAP + len(rows) * (cell_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (name, frames) in enumerate(rows.items()):
        y = GAP + r * (cell_h + GAP)
        if labels:
            text_h = text_size(name)[1]
            draw.text((GAP + TEXT_PAD, y + (cell_h - text_h) // 2), name, fill=TEXT_COLOUR, font=_font())
        for k in range(t):
            canvas.paste(_enlarged(frames[k], scale), (left + k * (cell_w + GAP), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def gif_frames(rows: Mapping[str, np.ndarray]) -> list[Image.Image]:
    """One image per time step k: the rows' frames k side by side (enlarged as in the grid), each under its
    name, with "frame k+1/T" below. The counter also keeps identical time steps apart: the GIF writer would
    merge equal consecutive frames into one."""
    t, h, w = _check_rows(rows)
    scale = upscale_factor(h)
    cell_w, cell_h = w * scale, h * scale
    line = max(text_size(text)[1] for text in [*rows, f"frame {t}/{t}"]) + 2 * TEXT_PAD
    width = GAP + len(rows) * (cell_w + GAP)
    images = []
    for k in range(t):
        canvas = Image.new("RGB", (width, line + cell_h + line), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for c, (name, frames) in enumerate(rows.items()):
            x = GAP + c * (cell_w + GAP)
            draw.text((x, TEXT_PAD), name, fill=TEXT_COLOUR, font=_font())
            canvas.paste(_enlarged(frames[k], scale), (x, line))
        draw.text((GAP, line + cell_h + TEXT_PAD), f"frame {k + 1}/{t}", fill=TEXT_COLOUR, font=_font())
        images.append(canvas)
    return images


def write_gif(rows: Mapping[str, np.ndarray], path: str | Path, fps: float) -> Path:
    """Save rows {name: uint8 [T, H, W, 3]} as an endlessly looping GIF of T frames at `fps` (see gif_frames).
    Returns `path`."""
    if fps <= 0:
        raise UsageError(f"--fps must be positive, got {fps}")
    first, *rest = gif_frames(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    return path


# --------------------------------------------------------------------------------------------- retrieval

SAME_CLASS_COLOUR = (0, 160, 0)
OTHER_CLASS_COLOUR = (220, 0, 0)
QUERY_COLOUR = (96, 96, 96)
BORDER = 3
QUERY_SEPARATION = 12  # extra px between the query column and its neighbours


def line_height() -> int:
    """Height in px of a caption or title line: the default font's ascender-to-descender box plus TEXT_PAD above
    and below."""
    return text_size("Ag|")[1] + 2 * TEXT_PAD


def retrieval_captions(
    query_labels: np.ndarray, neighbour_labels: np.ndarray, similarities: np.ndarray, class_names: list[str]
) -> tuple[list[str], list[list[str]]]:
    """The captions of `retrieval_picture`: "query: <class>" per query, "#<rank> <class> <similarity> same|other"
    per neighbour (similarity with 3 decimals; same: the query's class)."""
    queries = [f"query: {class_names[int(label)]}" for label in query_labels]
    neighbours = [
        [
            f"#{rank + 1} {class_names[int(label)]} {float(sim):.3f} {'same' if label == query else 'other'}"
            for rank, (label, sim) in enumerate(zip(labels, sims))
        ]
        for query, labels, sims in zip(query_labels, neighbour_labels, similarities)
    ]
    return queries, neighbours


def retrieval_picture(
    queries: np.ndarray,
    neighbours: np.ndarray,
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
    similarities: np.ndarray,
    class_names: list[str],
    title: str | None = None,
) -> Image.Image:
    """Nearest-neighbour retrieval as a picture: one row per query, the query clip then its K nearest clips.

    queries uint8 [Q, F, H, W, 3] (F frames of each query clip, e.g. its first, middle and last), neighbours uint8
    [Q, K, F, H, W, 3] (most similar first), query_labels int [Q], neighbour_labels int [Q, K], similarities
    float [Q, K], class_names: the name of every label. A clip is a tile of its F frames side by side (enlarged
    by s = upscale_factor(H), nearest; GAP px apart) in a BORDER-px frame: QUERY_COLOUR around a query,
    SAME_CLASS_COLOUR around a neighbour of the query's class (a correct retrieval), OTHER_CLASS_COLOUR around
    any other; under each tile its caption (`retrieval_captions`). `title`, when given, is a line above the grid.

    Size, with L = line_height(): column width c = max(F·(s·W + GAP) − GAP + 2·BORDER, widest caption +
    2·TEXT_PAD); width = max(GAP + (K + 1)·(c + GAP) + QUERY_SEPARATION, [title width + 2·TEXT_PAD]); height =
    [L] + GAP + Q·(s·H + 2·BORDER + L + GAP). Returns an RGB image (nothing is written)."""
    queries, neighbours = np.asarray(queries), np.asarray(neighbours)
    query_labels, neighbour_labels = np.asarray(query_labels), np.asarray(neighbour_labels)
    similarities = np.asarray(similarities, dtype=np.float64)
    if queries.ndim != 5 or queries.shape[-1] != 3 or not len(queries):
        raise ValueError(f"queries must be uint8 [Q, F, H, W, 3] with Q >= 1; got {queries.shape}")
    q, f, h, w, _ = queries.shape
    if neighbours.ndim != 6 or neighbours.shape[0] != q or neighbours.shape[2:] != queries.shape[1:]:
        raise ValueError(f"neighbours must be [Q, K, F, H, W, 3] like queries {queries.shape}; got {neighbours.shape}")
    k = neighbours.shape[1]
    if query_labels.shape != (q,) or neighbour_labels.shape != (q, k) or similarities.shape != (q, k):
        raise ValueError(
            f"labels and similarities must be [Q] = [{q}], [Q, K] = [{q}, {k}] and [Q, K]; got {query_labels.shape}, "
            f"{neighbour_labels.shape}, {similarities.shape}"
        )
    query_text, neighbour_text = retrieval_captions(query_labels, neighbour_labels, similarities, class_names)
    scale = upscale_factor(h)
    cell_w, cell_h = w * scale, h * scale
    tile_w, tile_h = f * (cell_w + GAP) - GAP + 2 * BORDER, cell_h + 2 * BORDER
    captions = [*query_text, *(text for row in neighbour_text for text in row)]
    column = max(tile_w, max(text_size(text)[0] for text in captions) + 2 * TEXT_PAD)
    line = line_height()
    top = line if title else 0
    width = GAP + (k + 1) * (column + GAP) + QUERY_SEPARATION
    if title:
        width = max(width, text_size(title)[0] + 2 * TEXT_PAD)
    canvas = Image.new("RGB", (width, top + GAP + q * (tile_h + line + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((TEXT_PAD, TEXT_PAD), title, fill=TEXT_COLOUR, font=_font())

    def tile(frames: np.ndarray, x: int, y: int, colour: tuple[int, int, int], caption: str) -> None:
        draw.rectangle((x, y, x + tile_w - 1, y + tile_h - 1), fill=colour)
        for n in range(f):
            canvas.paste(_enlarged(frames[n], scale), (x + BORDER + n * (cell_w + GAP), y + BORDER))
        draw.text((x + TEXT_PAD, y + tile_h + TEXT_PAD), caption, fill=TEXT_COLOUR, font=_font())

    for r in range(q):
        y = top + GAP + r * (tile_h + line + GAP)
        tile(queries[r], GAP, y, QUERY_COLOUR, query_text[r])
        for n in range(k):
            x = GAP + (n + 1) * (column + GAP) + QUERY_SEPARATION
            same = neighbour_labels[r, n] == query_labels[r]
            tile(neighbours[r, n], x, y, SAME_CLASS_COLOUR if same else OTHER_CLASS_COLOUR, neighbour_text[r][n])
    return canvas


def clip_frames(frames: np.ndarray, count: int = 3) -> np.ndarray:
    """`count` evenly spaced frames of a clip [T, H, W, 3] (its first and last among them; every frame when
    T <= count), in time order."""
    frames = np.asarray(frames)
    if len(frames) <= count:
        return frames
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


# ------------------------------------------------------------------------------------------------ curves

PRETRAIN_KEYS = ("loss/mlm", "loss/nce", "accuracy/mlm", "accuracy/nce")
FINETUNE_KEY = "loss/train"
EVAL_PREFIX = "eval/top1"


def _series(records: Mapping[int, Mapping[str, float]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records holding `key`, in step order."""
    steps = sorted(step for step, record in records.items() if key in record)
    return steps, [float(records[step][key]) for step in steps]


def plot_curves(runs: Mapping[str, str | Path], path: str | Path) -> list[str]:
    """Plot the metrics.jsonl of `runs` {name: run directory} into one PNG of four panels; returns the names drawn.

    Panels: pre-training losses (loss/mlm, loss/nce), pre-training accuracies (accuracy/mlm = masked tokens,
    accuracy/nce = contrastive), the fine-tuning training loss (loss/train) of every fine-tuning run, and the
    evaluation top-1 (every key starting with "eval/top1") of every run, as markers. A run counts as pre-training
    or fine-tuning by the keys it logged, so any mix of runs works. Runs without a metrics.jsonl (or with no
    records) are skipped with a message on stderr; UsageError when none is left.
    """
    from matplotlib.figure import Figure  # the object API renders with Agg and never touches pyplot's backend
    from matplotlib.ticker import MaxNLocator

    metrics = {}
    for name, run in runs.items():
        records = read_metrics(run)
        if records:
            metrics[name] = records
        else:
            print(f"curves: skipping {name}: no records in {Path(run) / 'metrics.jsonl'}", file=sys.stderr)
    if not metrics:
        raise UsageError(
            f"no training metrics to plot: none of {', '.join(str(Path(r)) for r in runs.values()) or 'no runs'} has "
            "a metrics.jsonl with records; train first, or pass --no-curves"
        )

    figure = Figure(figsize=(12, 8), layout="constrained")
    loss_ax, acc_ax, train_ax, eval_ax = figure.subplots(2, 2).flatten()
    panels = {
        loss_ax: ("pre-training loss", "loss"),
        acc_ax: ("pre-training accuracy", "accuracy"),
        train_ax: ("fine-tuning training loss", "loss"),
        eval_ax: ("evaluation top-1", "top-1 accuracy"),
    }
    for name, records in metrics.items():
        keys = set().union(*(record.keys() for record in records.values()))
        for key, ax, label in (
            ("loss/mlm", loss_ax, "masked tokens (mlm)"),
            ("loss/nce", loss_ax, "contrastive (nce)"),
            ("accuracy/mlm", acc_ax, "masked tokens (mlm)"),
            ("accuracy/nce", acc_ax, "contrastive (nce)"),
        ):
            if key in keys:
                ax.plot(*_series(records, key), label=f"{name}: {label}" if len(metrics) > 1 else label)
        if FINETUNE_KEY in keys:
            train_ax.plot(*_series(records, FINETUNE_KEY), label=name)
        for key in sorted(k for k in keys if k.startswith(EVAL_PREFIX)):
            suffix = key[len(EVAL_PREFIX) :].lstrip("_")
            eval_ax.plot(*_series(records, key), marker="o", label=f"{name} ({suffix})" if suffix else name)
    for ax, (title, ylabel) in panels.items():
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return list(metrics)
