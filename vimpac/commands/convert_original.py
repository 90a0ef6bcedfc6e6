"""`vimpac convert-original CKPT_DIR --out EXPORT_DIR`: an original-release checkpoint → a vimpac export folder."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Convert a checkpoint of the original VIMPAC release (the folder its trainers save: classifier.pt + args.pickle,
e.g. <output>/last) into a vimpac export folder (config.json + model.safetensors), which `finetune.py --load`,
`vimpac pretrain-eval`, `vimpac probe` and `vimpac.load_model` read. A pre-training checkpoint keeps its MLM and
projection heads; a fine-tuning checkpoint keeps its classifier, so `finetune.py --eval-only --load` evaluates it.
"""

EPILOG = """\
what is kept exactly:
  the architecture from args.pickle (--model layout, --layers, --hid-dim, heads = hid-dim // 64, --pos-emb,
  --halve-att, --halve-mlp, --dropout, --frame-size / --clip-len as the positional tables were trained,
  the projection head's depth and width) and the original special ids (8197 embedding rows: PAD 8193,
  MASK 8196, codes 0..8191), recorded as special_ids "original" in config.json. The converted model computes
  what the original computed, to float32 rounding.
  --pre-activation becomes pre_ln_original (the original's pre-LN block, whose attention blocks add the
  residual to the normalised input; not vimpac's --pre-ln) and --nce-bn-after-proj becomes nce_bn_after_proj
  (the BatchNorm after the projection head's last layer, with its running statistics).

refused, naming the option (the original cannot train them):
  --pos-emb pre_defined/frozen, non-layout --model values, and --pre-activation with --halve-att.

safety:
  classifier.pt is read with torch.load(weights_only=True) and args.pickle with an unpickler that accepts an
  argparse.Namespace of plain values and nothing else, so neither file can run code.

examples:
  vimpac convert-original original_runs/pretrain_large/last --out converted/large
  deepspeed --num_gpus 1 --module vimpac.finetune --load converted/large --data DB ...
  vimpac convert-original original_runs/ucf101_split1 --out converted/ucf101   # finds last/ inside
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-original",
        help="convert an original-release checkpoint (classifier.pt + args.pickle) into a vimpac export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="CKPT_DIR",
        type=Path,
        help="folder with classifier.pt + args.pickle, or one holding last/",
    )
    p.add_argument("--out", type=Path, required=True, help="export folder to write (config.json + model.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.add_argument(
        "--drop-projection-head",
        action="store_true",
        help="leave the contrastive projection head out (convert the backbone and the MLM head only)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.original import convert_checkpoint, export

    converted = convert_checkpoint(args.checkpoint, drop_projection_head=args.drop_projection_head)
    out = export(converted, args.out, overwrite=args.overwrite)
    c = converted.config
    heads = ", ".join(converted.heads) or "none"
    if converted.num_classes is not None:
        heads += f" ({converted.num_classes} classes)"
    print(f"converted the {converted.kind} checkpoint {converted.source} into {out}")
    print(
        f"  model    {c.layers} layers × {c.hidden_size}, {c.num_heads} heads, layout {c.layout}, pos-emb {c.pos_emb}"
        f"{', halve-att' if c.halve_att else ''}{', halve-mlp' if c.halve_mlp else ''}"
        f"{', the original pre-LN (pre_ln_original)' if c.pre_ln_original else ''}"
        f"{', BatchNorm after the projection' if c.nce_bn_after_proj else ''}"
    )
    print(
        f"  input    clip length {c.clip_len}, frame size {c.grid[0] * 8} (grid {c.grid[0]}x{c.grid[1]}), "
        f"vocabulary {c.vocab_size}, original special ids (PAD {c.pad_id}, MASK {c.mask_id})"
    )
    print(f"  heads    {heads}")
    for note in converted.notes:
        print(f"  note     {note}")
    if converted.kind == "finetune":
        print(f"next: python -m vimpac.finetune --eval-only --load {out} --data DB ... (or vimpac.load_model)")
    else:
        print(f"next: python -m vimpac.finetune --load {out} --data DB ... (or vimpac.load_model)")
    return 0
