"""`vimpac model-info`: parameter counts per part for a model configuration (paper Table 3 style)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  # the paper's small analysis model, with the original release's 8197-row embedding (Table 3: 29,442,048)
  vimpac model-info --layers 6 --hid-dim 512 --model "efflayoutT,H|W"

  # the final large-half model (Table 3: 210,106,368), as JSON
  vimpac model-info --layers 24 --hid-dim 1024 --halve-att --halve-mlp --json

"backbone" is the number the paper reports (embeddings + layers, no heads). The MLM head is tied to the
token embedding, so only its dense layer, LayerNorm and output bias are counted there. `--special-ids compact`
has 3 embedding rows fewer than the original release (the default): 3·D fewer backbone parameters.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from vimpac.config import add_model_arguments

    p = sub.add_parser(
        "model-info",
        help="parameter counts of a model configuration (backbone, MLM head, contrastive head)",
        description="Build the model on the meta device (no memory, instant) and count its parameters per part.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (config + counts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vimpac.config import config_from_args
    from vimpac.modeling import parameter_counts

    config = config_from_args(args)
    counts = parameter_counts(config)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "parameters": counts}, indent=2))
        return 0
    print(
        f"layout {config.layout}: {config.layers} layers × {config.hidden_size}, {config.num_heads} heads of "
        f"{config.head_dim}, MLP {config.mlp_width}, clip {config.shape}, {config.embedding_rows} embedding rows "
        f"({config.special_ids} special ids: PAD={config.pad_id}, MASK={config.mask_id})"
    )
    for name, value in counts.items():
        print(f"  {name:<22}{value:>14,}  ({value / 1e6:.1f}M)")
    return 0
