"""VimpacConfig: everything needed to build the model, saved as `config.json` beside the weights (docs/design.md §6).

Special ids. Codes are 0..V-1. The default "original" layout is the released VIMPAC table: PAD = V+1,
MASK = V+4, V+5 embedding rows (8197 for V=8192; V, V+2 and V+3 are unused rows), so paper Table 3's parameter
counts and the original checkpoints line up. The "compact" layout puts PAD = V and MASK = V+1 (V+2 rows).
CLS is not an id: it is a separate learned vector (docs/reference.md §4.1).

Layout strings (the paper's and the seed's `--model "efflayoutT,H|W"`; the bare "T,H|W" is accepted too):
`,` separates attention blocks that run one after the other, each with its own residual and LayerNorm; `|`
separates patterns that run in parallel inside one block, splitting the heads and the attention width evenly
and concatenating their outputs. A pattern names the axes attended jointly: "T", "H", "W" are axial (one line
per position of the other two axes), "HW" (also written "HxW") is one sequence per frame, "THW" (also "TxHxW")
is the whole clip. CLS joins every sequence of every pattern and its outputs are averaged over the sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vimpac.errors import UsageError

SPECIAL_ID_LAYOUTS = ("compact", "original")
POS_EMB_KINDS = ("hw_separation", "temporal_separation", "full")
LAYOUT_PREFIX = "efflayout"
AXES = "THW"
DEFAULT_FRAME_SIZE = 128  # px, the paper's stage-1 frames: the default grid (16, 16) with 8x downsampling
# Fields added after config.json existed: to_dict leaves them out at these defaults (VimpacConfig docstring).
OPTIONAL_FIELDS = {"pre_ln_original": False, "nce_bn_after_proj": False}


def parse_layout(layout: str) -> tuple[tuple[str, ...], ...]:
    """Layout string → blocks of patterns, each pattern its axes in T, H, W order.

    "efflayoutT,H|W" → (("T",), ("H", "W")); "T,HxW" → (("T",), ("HW",)). Raises UsageError naming the problem.
    """
    text = layout.strip()
    if text.startswith(LAYOUT_PREFIX):
        text = text[len(LAYOUT_PREFIX) :]
    text = text.replace(" ", "").replace("x", "").replace("×", "").upper()
    hint = "e.g. 'T,H|W' (default), 'T,H,W', 'T|H|W', 'H|W,T', 'T', 'T,H', 'THW' (joint) or 'T,HW' (divided)"
    if not text:
        raise UsageError(f"empty attention layout {layout!r}; use {hint}")
    blocks = []
    for block in text.split(","):
        patterns = []
        for pattern in block.split("|"):
            if not pattern:
                raise UsageError(f"attention layout {layout!r} has an empty block or pattern; use {hint}")
            unknown = sorted(set(pattern) - set(AXES))
            if unknown:
                raise UsageError(
                    f"attention layout {layout!r}: unknown axis {', '.join(unknown)} (axes are T, H, W); use {hint}"
                )
            if len(set(pattern)) != len(pattern):
                raise UsageError(f"attention layout {layout!r}: pattern {pattern!r} repeats an axis; use {hint}")
            patterns.append("".join(a for a in AXES if a in pattern))
        if len(set(patterns)) != len(patterns):
            raise UsageError(f"attention layout {layout!r}: block {block!r} repeats a pattern; use {hint}")
        blocks.append(tuple(patterns))
    return tuple(blocks)


def format_layout(blocks: tuple[tuple[str, ...], ...]) -> str:
    """Inverse of parse_layout in canonical form: (("T",), ("H", "W")) → "T,H|W"."""
    return ",".join("|".join(patterns) for patterns in blocks)


def grid_from_frame_size(frame_size: int, downsample: int = 8) -> tuple[int, int]:
    """Square frames of `frame_size` px → code grid (h, w) for a tokenizer that downsamples by `downsample`."""
    if frame_size <= 0 or frame_size % downsample:
        raise UsageError(
            f"frame size {frame_size} is not a positive multiple of {downsample} (the tokenizer downsamples by "
            f"{downsample}); use e.g. 128 or 256"
        )
    return (frame_size // downsample, frame_size // downsample)


@dataclass
class VimpacConfig:
    """Model hyper-parameters. Defaults are the paper's small analysis model (6 × 512, T=5, 128 px frames).

    heads None → hidden_size // 64 (the original's rule). halve_att: attention width hidden/2 (Q/K/V and the
    output projection's input); halve_mlp: MLP width 2·hidden instead of 4·hidden. pre_ln: a correct pre-LN block
    (the original's pre-LN attention residual is buggy, docs/reference.md §4.5). pre_ln_original (needs pre_ln):
    the original's pre-LN block instead, whose attention blocks add the residual to the normalised input, for
    its ablation and its `--pre-activation` checkpoints. grid: code grid (h, w) per frame. nce_*: contrastive
    projection head (nce_proj_layers − 1 hidden Linear-BN-ReLU layers of nce_proj_hid_dim, then Linear → nce_dim
    without bias; nce_bn_after_proj adds a BatchNorm after that last Linear). Invalid values raise UsageError at
    construction.

    OPTIONAL_FIELDS (pre_ln_original, nce_bn_after_proj) are left out of to_dict at their default, so the
    config.json of every model without them is what it was before they existed, and a vimpac that does not know
    them refuses (unknown key) a model that uses them instead of building another one.
    """

    vocab_size: int = 8192
    special_ids: str = "original"
    hidden_size: int = 512
    layers: int = 6
    heads: int | None = None
    layout: str = "T,H|W"
    pos_emb: str = "hw_separation"
    halve_att: bool = False
    halve_mlp: bool = False
    pre_ln: bool = False
    pre_ln_original: bool = False
    dropout: float = 0.1
    clip_len: int = 5
    grid: tuple[int, int] = (16, 16)
    nce_proj_layers: int = 2
    nce_proj_hid_dim: int = 2048
    nce_dim: int = 256
    nce_bn_after_proj: bool = False
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)
        self.validate()
        self.layout = format_layout(parse_layout(self.layout))

    @classmethod
    def from_frame_size(cls, frame_size: int, downsample: int = 8, **fields: Any) -> VimpacConfig:
        """Config whose grid matches square frames of `frame_size` px (must be a multiple of `downsample`)."""
        return cls(grid=grid_from_frame_size(frame_size, downsample), **fields)

    # Special ids -------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.vocab_size if self.special_ids == "compact" else self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size + 1 if self.special_ids == "compact" else self.vocab_size + 4

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + 2 if self.special_ids == "compact" else self.vocab_size + 5

    # Derived shapes ----------------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.heads if self.heads is not None else self.hidden_size // 64

    @property
    def attention_width(self) -> int:
        return self.hidden_size // 2 if self.halve_att else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.attention_width // self.num_heads

    @property
    def mlp_width(self) -> int:
        return 2 * self.hidden_size if self.halve_mlp else 4 * self.hidden_size

    @property
    def blocks(self) -> tuple[tuple[str, ...], ...]:
        """Parsed layout: one tuple of patterns (e.g. "H", "W", "HW") per sequential attention block."""
        return parse_layout(self.layout)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Token clip shape (T, h, w)."""
        return (self.clip_len, self.grid[0], self.grid[1])

    # Validation --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise UsageError with what is wrong and how to fix it."""
        if self.special_ids not in SPECIAL_ID_LAYOUTS:
            raise UsageError(f"special_ids must be one of {', '.join(SPECIAL_ID_LAYOUTS)}; got {self.special_ids!r}")
        if self.pos_emb not in POS_EMB_KINDS:
            hint = " (the original's 'default' is 'full')" if self.pos_emb == "default" else ""
            raise UsageError(f"pos_emb must be one of {', '.join(POS_EMB_KINDS)}{hint}; got {self.pos_emb!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "layers",
            "clip_len",
            "nce_proj_layers",
            "nce_proj_hid_dim",
            "nce_dim",
        ):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be at least 1; got {getattr(self, name)}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise UsageError(f"grid must be two positive sizes (h, w); got {self.grid}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.pre_ln_original and not self.pre_ln:
            raise UsageError(
                "pre_ln_original selects the original release's pre-LN block and needs pre_ln=True "
                "(the flag --pre-ln-original sets both)"
            )
        if self.heads is not None and self.heads < 1:
            raise UsageError(f"heads must be at least 1 (or None for hidden_size // 64); got {self.heads}")
        if self.hidden_size % 2 and self.halve_att:
            raise UsageError(f"--halve-att needs an even hidden size; got {self.hidden_size}")
        heads, width = self.num_heads, self.attention_width
        width_note = f"attention width {width}" + (" (hidden/2, --halve-att)" if self.halve_att else "")
        if heads < 1:
            raise UsageError(f"hidden size {self.hidden_size} gives 0 heads (hidden // 64); pass --heads")
        if width % heads:
            raise UsageError(f"{width_note} is not divisible by {heads} heads; choose heads dividing {width}")
        for patterns in parse_layout(self.layout):
            if heads % len(patterns):
                raise UsageError(
                    f"layout {self.layout!r}: block {'|'.join(patterns)!r} splits the {heads} heads and {width_note} "
                    f"over {len(patterns)} parallel patterns, but {heads} heads is not divisible by "
                    f"{len(patterns)}; set heads to a multiple of {len(patterns)} that divides {width} "
                    f"(the hidden size may need to change too)"
                )

    # Serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; an OPTIONAL_FIELDS entry only when it differs from its default."""
        data = dataclasses.asdict(self)
        data["grid"] = list(self.grid)
        for name, default in OPTIONAL_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VimpacConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown model config keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VimpacConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VimpacConfig:
        return cls.from_json(Path(path).read_text())


# The flags that fix the architecture (argparse attribute → VimpacConfig field); --vocab-size, the shape
# (--clip-len, --frame-size), --dropout and the contrastive head's flags are handled on their own.
ARCHITECTURE_FLAGS = {
    "model": "layout",
    "layers": "layers",
    "hid_dim": "hidden_size",
    "heads": "heads",
    "halve_att": "halve_att",
    "halve_mlp": "halve_mlp",
    "pre_ln": "pre_ln",
    "pre_ln_original": "pre_ln_original",
    "pos_emb": "pos_emb",
    "special_ids": "special_ids",
}


def add_model_arguments(
    parser: argparse.ArgumentParser,
    data_default: str | None = None,
    clip_len_default: str | None = None,
    architecture_default: str | None = None,
) -> None:
    """The seed's model flags (`--model "efflayoutT,H|W" --layers --hid-dim ...`), shared by every command.

    data_default: for commands that read a code database, which decides --vocab-size and --frame-size when they
    are not given: both then default to None (filled by fill_from_database) and their help says "default:
    <data_default>". Without it (model-info, selfcheck: no database) they default to 8192 codes and 128 px.
    clip_len_default: likewise for --clip-len (None default, decided later), e.g. fine-tuning's "the export's".
    architecture_default: likewise for ARCHITECTURE_FLAGS (fill_architecture sets them), so that a flag given
    can be told from one left alone, e.g. fine-tuning's "the export's with --load"."""
    d = VimpacConfig()

    def default(value: Any, shown: str | None = None) -> tuple[Any, str]:
        """(argparse default, help text for it) of an architecture flag whose own default is `value`."""
        shown = shown or str(value)
        return (
            (None, f"default: {architecture_default}, else {shown}")
            if architecture_default
            else (value, f"default {shown}")
        )

    g = parser.add_argument_group("model")
    layout, layout_help = default(d.layout)
    g.add_argument(
        "--model",
        default=layout,
        help="attention layout, with or without the seed's 'efflayout' prefix: ',' = blocks in sequence, "
        f"'|' = parallel patterns splitting heads; T/H/W axial, HW or THW joint ({layout_help})",
    )
    layers, layers_help = default(d.layers)
    g.add_argument("--layers", type=int, default=layers, help=f"transformer layers ({layers_help})")
    hidden, hidden_help = default(d.hidden_size)
    g.add_argument("--hid-dim", type=int, default=hidden, help=f"hidden size D ({hidden_help})")
    heads_help = default(None, "hid-dim // 64")[1]
    g.add_argument("--heads", type=int, default=None, help=f"attention heads ({heads_help})")
    off, off_help = default(False, "off")
    g.add_argument(
        "--halve-att", action="store_true", default=off, help=f"attention width D/2 (large-half model; {off_help})"
    )
    g.add_argument(
        "--halve-mlp",
        action="store_true",
        default=off,
        help=f"MLP width 2·D instead of 4·D (large-half model; {off_help})",
    )
    g.add_argument(
        "--pre-ln",
        "--pre-activation",
        action="store_true",
        default=off,
        help=f"pre-LN blocks ({default(False, 'post-LN')[1]})",
    )
    g.add_argument(
        "--pre-ln-original",
        action="store_true",
        default=off,
        help="the original release's pre-LN ablation instead: its attention blocks add the residual to the "
        f"normalised input (implies --pre-ln; {off_help})",
    )
    pos_emb, pos_emb_help = default(d.pos_emb)
    g.add_argument("--pos-emb", default=pos_emb, choices=POS_EMB_KINDS, help=f"positions ({pos_emb_help})")
    g.add_argument("--dropout", type=float, default=d.dropout, help="backbone dropout (default %(default)s)")
    from_data = f"default: {data_default}" if data_default else None
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None if from_data else d.vocab_size,
        help=f"tokenizer codes ({from_data or 'default %(default)s'})",
    )
    special, special_help = default(d.special_ids)
    g.add_argument(
        "--special-ids",
        default=special,
        choices=SPECIAL_ID_LAYOUTS,
        help="PAD/MASK ids: original (PAD=V+1, MASK=V+4, V+5 rows, as the original release and paper Table 3) "
        f"or compact (PAD=V, MASK=V+1, V+2 rows); {special_help}",
    )
    g.add_argument(
        "--clip-len",
        type=int,
        default=None if clip_len_default else d.clip_len,
        help=f"frames per clip T (default: {clip_len_default or '%(default)s'})",
    )
    g.add_argument(
        "--frame-size",
        type=int,
        default=None if from_data else DEFAULT_FRAME_SIZE,
        help=f"frame side in px, multiple of 8 ({from_data or 'default %(default)s'})",
    )
    g.add_argument("--nce-proj-layers", type=int, default=d.nce_proj_layers, help="projection depth (default 2)")
    g.add_argument("--nce-proj-hid-dim", type=int, default=d.nce_proj_hid_dim, help="projection width (default 2048)")
    g.add_argument("--nce-dim", type=int, default=d.nce_dim, help="contrastive embedding size (default 256)")
    g.add_argument(
        "--nce-bn-after-proj",
        action="store_true",
        help="a BatchNorm after the projection head's last Linear (SimCLR; off by default, as in the original)",
    )


def fill_architecture(args: argparse.Namespace, source: VimpacConfig) -> None:
    """Set the ARCHITECTURE_FLAGS left unset (None: add_model_arguments' architecture_default) to `source`'s
    values: the defaults (VimpacConfig()) for a new model, a checkpoint's config for a loaded one. A flag the
    namespace lacks counts as unset."""
    for flag, field in ARCHITECTURE_FLAGS.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, getattr(source, field))


def fill_from_database(args: argparse.Namespace, manifest: dict[str, Any], name: str | Path) -> str | None:
    """Set --vocab-size and --frame-size that were not given (None) to those of the code database `name`: its
    tokenizer's vocabulary and its frame size (manifest.json). Returns the start-up log line saying what was
    taken ("vocabulary 256 and frame size 64 taken from DB"), or None when both were given. Given values are
    kept; vimpac.trainer.check_database_matches refuses them when they contradict the database."""
    taken = []
    if args.vocab_size is None:
        args.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        taken.append(f"vocabulary {args.vocab_size}")
    if args.frame_size is None:
        args.frame_size = int(manifest["frame_size"])
        taken.append(f"frame size {args.frame_size}")
    return f"{' and '.join(taken)} taken from {name}" if taken else None


def config_from_args(args: argparse.Namespace) -> VimpacConfig:
    """VimpacConfig from the flags of add_model_arguments (UsageError on invalid combinations). --vocab-size and
    --frame-size must be set: a trainer fills them from its database first (fill_from_database)."""
    unset = [flag for flag in ("vocab_size", "frame_size") if getattr(args, flag) is None]
    if unset:
        raise ValueError(f"{', '.join(unset)} unset: fill them from the database first (fill_from_database)")
    return VimpacConfig.from_frame_size(
        args.frame_size,
        vocab_size=args.vocab_size,
        special_ids=args.special_ids,
        hidden_size=args.hid_dim,
        layers=args.layers,
        heads=args.heads,
        layout=args.model,
        pos_emb=args.pos_emb,
        halve_att=args.halve_att,
        halve_mlp=args.halve_mlp,
        pre_ln=args.pre_ln or args.pre_ln_original,
        pre_ln_original=args.pre_ln_original,
        dropout=args.dropout,
        clip_len=args.clip_len,
        nce_proj_layers=args.nce_proj_layers,
        nce_proj_hid_dim=args.nce_proj_hid_dim,
        nce_dim=args.nce_dim,
        nce_bn_after_proj=args.nce_bn_after_proj,
    )
