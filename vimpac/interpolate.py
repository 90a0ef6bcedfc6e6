"""Resize learned positional tables to a new clip length or frame size, as pure tensor functions.

Used by stage-2 pre-training (`--frame-size 256 --resume` on a 128 px run: vimpac.checkpoint) and by fine-tuning at
another shape than pre-training (`--different-shape`). Only the positional tables depend on (T, h, w); every other
weight is shape-independent, so a checkpoint carries over to another clip length or grid by resizing these alone.

Rule (the original's, docs/reference.md §4.9): 1-D **linear** interpolation with align_corners=False along a table's
first axis, the hidden size D acting as channels; the Adam moments of a resized table are resized the same way.
  hw_separation        the temporal (T, D), height (h, D) and width (w, D) tables are resized independently
                       (T 5→10, h/w 16→32); the CLS position (1, D) is unchanged.
  temporal_separation  the temporal table as above; the spatial table (h·w, D) is reshaped to [h, w, D] and resized
                       bilinearly (align_corners=False), i.e. the same 1-D linear rule along each spatial axis in
                       turn (bilinear is separable). The original interpolated the flattened h·w sequence instead,
                       which mixes the end of one row with the start of the next.
  full                 one (1 + T·h·w, D) table: a 1-D resize of the flattened sequence (CLS included) is
                       meaningless (docs/reference.md §4.9, §8.2), so changing the shape is refused.

Only `clip_len` and `grid` may differ between the two configs; any other difference (layers, hidden size, layout,
vocabulary, ...) is a different model and is refused with the differing fields named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from vimpac.config import VimpacConfig
from vimpac.errors import UsageError

SHAPE_FIELDS = ("clip_len", "grid")
POSITIONAL_MODULE = "positional_embedding"


def interpolate_table(table: torch.Tensor, new_n: int) -> torch.Tensor:
    """[n, D] → [new_n, D]: 1-D linear interpolation along rows, align_corners=False, D as channels.

    Row i of the result samples the old rows at position (i + 0.5)·n/new_n − 0.5, clamped to [0, n − 1] (the
    half-pixel convention of torch.nn.functional.interpolate). Computed in float32 at least; the result has the
    input's dtype and device. new_n == n returns an unchanged copy."""
    if table.dim() != 2:
        raise ValueError(f"table must be [n, D]; got shape {tuple(table.shape)}")
    if new_n < 1:
        raise ValueError(f"new_n must be at least 1; got {new_n}")
    if new_n == table.shape[0]:
        return table.clone()
    work = table.float() if table.dtype in (torch.float16, torch.bfloat16) else table
    out = F.interpolate(work.t()[None], size=new_n, mode="linear", align_corners=False)[0].t()
    return out.to(table.dtype).contiguous()


def interpolate_grid(table: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """[h·w, D] (row-major over h, w) → [h'·w', D]: bilinear, align_corners=False, D as channels."""
    h, w = old_hw
    if table.dim() != 2 or table.shape[0] != h * w:
        raise ValueError(f"spatial table must be [{h}·{w}, D]; got shape {tuple(table.shape)}")
    if tuple(new_hw) == (h, w):
        return table.clone()
    work = table.float() if table.dtype in (torch.float16, torch.bfloat16) else table
    grid = work.reshape(h, w, -1).permute(2, 0, 1)[None]  # [1, D, h, w]
    out = F.interpolate(grid, size=tuple(new_hw), mode="bilinear", align_corners=False)[0]
    return out.permute(1, 2, 0).reshape(new_hw[0] * new_hw[1], -1).to(table.dtype).contiguous()


def model_differences(old: VimpacConfig, new: VimpacConfig) -> list[str]:
    """Names of the config fields whose values differ, sorted. Compared over the keys of both to_dict()s: an
    optional field (config.OPTIONAL_FIELDS) is in one only when it is set there, and then it differs. Heads are
    compared as counts: None (hidden_size // 64) is the same model as that number given."""
    a, b = old.to_dict(), new.to_dict()
    a["heads"], b["heads"] = old.num_heads, new.num_heads
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_resizable(old: VimpacConfig, new: VimpacConfig, allowed: Iterable[str] = SHAPE_FIELDS) -> None:
    """Raise UsageError unless `new` differs from `old` only in `allowed` fields (clip_len, grid) and, where the
    shape changes, the positional kind can be resized (not `full`). hidden_size and pos_emb may never differ."""
    changed = model_differences(old, new)
    allowed = set(allowed) - {"hidden_size", "pos_emb"}
    other = [k for k in changed if k not in allowed]
    if other:
        detail = ", ".join(f"{k} {getattr(old, k)!r} → {getattr(new, k)!r}" for k in other)
        raise UsageError(
            f"the checkpoint's model differs in {', '.join(other)} ({detail}); only the clip length (--clip-len) and "
            "the frame size (--frame-size) can change when loading it: pass the checkpoint's values for the others"
        )
    if old.shape != new.shape and old.pos_emb == "full":
        raise UsageError(
            f"cannot resize the 'full' positional table from (T, h, w) = {old.shape} to {new.shape}: it is one "
            "(1 + T·h·w)-row table, and interpolating that flattened sequence (CLS included) mixes time, rows and "
            "columns into meaningless positions (the original's bug). Keep the shape, or pre-train with "
            "--pos-emb hw_separation (factorised T, H, W tables, which resize independently)"
        )


def positional_leaf(key: str) -> str | None:
    """'backbone.positional_embedding.height' (or 'positional_embedding.height') → 'height'; else None."""
    prefix, _, leaf = key.rpartition(".")
    if prefix == POSITIONAL_MODULE or prefix.endswith("." + POSITIONAL_MODULE):
        return leaf
    return None


def resize_positional_tensor(
    leaf: str,
    tensor: torch.Tensor,
    old: VimpacConfig,
    new: VimpacConfig,
    nonnegative: bool = False,
    allowed: Iterable[str] = SHAPE_FIELDS,
) -> torch.Tensor:
    """Resize one positional parameter (or an Adam moment of it) named `leaf` (cls, temporal, height, width,
    spatial, table) from `old`'s shape to `new`'s. nonnegative: clamp at 0 afterwards (second moments).
    allowed: the config fields that may differ (see check_resizable). Returns `tensor` itself when nothing
    changes."""
    check_resizable(old, new, allowed)
    (t0, h0, w0), (t1, h1, w1) = old.shape, new.shape
    d = old.hidden_size
    expected_old = {
        "cls": (1, d),
        "temporal": (t0, d),
        "height": (h0, d),
        "width": (w0, d),
        "spatial": (h0 * w0, d),
        "table": (1 + t0 * h0 * w0, d),
    }
    if leaf not in expected_old:
        raise ValueError(f"unknown positional parameter {leaf!r}; expected one of {', '.join(expected_old)}")
    if tuple(tensor.shape) != expected_old[leaf]:
        raise ValueError(f"positional {leaf} has shape {tuple(tensor.shape)}, expected {expected_old[leaf]}")
    if leaf == "temporal" and t1 != t0:
        out = interpolate_table(tensor, t1)
    elif leaf == "height" and h1 != h0:
        out = interpolate_table(tensor, h1)
    elif leaf == "width" and w1 != w0:
        out = interpolate_table(tensor, w1)
    elif leaf == "spatial" and (h1, w1) != (h0, w0):
        out = interpolate_grid(tensor, (h0, w0), (h1, w1))
    else:  # cls, an unchanged axis, or a `full` table of an unchanged shape (check_resizable refused the rest)
        return tensor
    return out.clamp_min(0) if nonnegative else out


def resize_positional_state(
    state: Mapping[str, torch.Tensor],
    old: VimpacConfig,
    new: VimpacConfig,
    nonnegative: bool = False,
    allowed: Iterable[str] = SHAPE_FIELDS,
) -> dict[str, torch.Tensor]:
    """A new dict: `state` (a state dict, or per-parameter Adam moments keyed by parameter name) with every
    `*positional_embedding.<leaf>` entry resized from `old`'s (T, h, w) to `new`'s; other entries are the same
    objects. nonnegative: clamp resized entries at 0 (use it for exp_avg_sq). UsageError when the configs differ
    in more than the shape (fields outside `allowed`, by default clip_len and grid; a caller that also changes
    e.g. dropout passes it too) or a `full` table would have to be resized."""
    check_resizable(old, new, allowed)
    out = {}
    for key, value in state.items():
        leaf = positional_leaf(key)
        out[key] = value if leaf is None else resize_positional_tensor(leaf, value, old, new, nonnegative, allowed)
    return out
