"""Checkpoints of the original VIMPAC release (`classifier.pt` + `args.pickle`) → vimpac exported weights.

The original trainers save `<output>/last/` (and `<output>/epochN/`) holding `classifier.pt`, a plain state dict
saved with `torch.save(model.state_dict())`, and `args.pickle`, the pickled `argparse.Namespace` of the run. The
architecture is only in that Namespace (the number of heads is not stored at all: the original always uses
hid_dim // 64), so both files are needed. Neither is trusted: the weights are read with
`torch.load(weights_only=True)` and the arguments with `ArgsUnpickler`, which rebuilds an `argparse.Namespace`
of plain values and refuses every other global, so a crafted file cannot run code.

What is converted (docs/reference.md §4 describes both models):

- Pre-training (`ModelWithHead`: `backbone.*`, `mlm_head.*`, `cls_head.*`; a head may be absent only when its
  loss weight was 0, else the file is refused as truncated) → `backbone.*`, `mlm_head.*`, `nce_head.*`, as
  `vimpac.pretrain` exports.
- Fine-tuning (`Sequential(backbone, dropout, cls_fc)`) → `backbone.*`, `classifier.fc.*`, as `vimpac.finetune`
  exports; the number of classes is read from `cls_fc.weight`.
- Per-axis query/key/value of one layout block are fused into vimpac's single QKV projection: all queries in
  pattern order, then all keys, then all values; head i of pattern k keeps its place.
- The config keeps the original's special ids (`special_ids="original"`: 8197 embedding rows, PAD 8193,
  MASK 8196), heads = hid_dim // 64, its LayerNorm eps (1e-12) and BatchNorm buffers.
- `--pre-activation` checkpoints become `pre_ln=True, pre_ln_original=True`: the original's pre-LN block, whose
  attention blocks add the residual to the normalised input (LN(x) + W·att(LN(x)); docs/reference.md §4.5), not
  vimpac's correct `--pre-ln`. Their per-block `dense` / `LayerNorm` (no `output.` level), the MLP's `ln` (now
  before the MLP) and the final `ln_post` map to `out` / `norm`, `mlp.norm` and `final_norm`; there is no `ln_pre`.
- `--nce-bn-after-proj`: the projection head's BatchNorm after its last Linear (`bn_{N-1}`, an affine
  SyncBatchNorm with running statistics) becomes `nce_bn_after_proj=True` and the BatchNorm after vimpac's last
  projection Linear, weights and buffers.

Refused, with the option named: a `--model` that is not an `efflayout` layout of the axes T, H and W, the
`pre_defined` / `frozen` positional embeddings (the original raises NotImplementedError for them) and
`--pre-activation` with `--halve-att` (the original's pre-LN output projection is D → D while the halved
attention is D/2 wide, so it could not run such a model). `drop_projection_head` leaves the projection head out.
Every tensor of the file must be used and every tensor of the vimpac model filled, shape for shape.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vimpac.atomic_write import atomic_path, write_text_atomic
from vimpac.checkpoint import ORIGINAL_CHECKPOINT_FILES, find_original_checkpoint
from vimpac.config import LAYOUT_PREFIX, VimpacConfig, parse_layout
from vimpac.errors import UsageError

CHECKPOINT_FILE, ARGS_FILE = ORIGINAL_CHECKPOINT_FILES
PRODUCER = "vimpac convert-original"
ORIGINAL_ARGS_FILE = "original_args.json"
# The original's hard-coded projection size (pretrain.py: CLSMLPHead(output_dim=256)).
ORIGINAL_NCE_DIM = 256
# --pos-emb of the original → vimpac's pos_emb.
POS_EMB = {"default": "full", "temporal_separation": "temporal_separation", "hw_separation": "hw_separation"}
# The original's positional-table names → vimpac's, per kind.
POS_TABLES = {
    "full": {"positional_embedding": "table"},
    "temporal_separation": {
        "cls_pos_embedding": "cls",
        "temporal_pos_embedding": "temporal",
        "spatial_pos_embedding": "spatial",
    },
    "hw_separation": {
        "cls_pos_embedding": "cls",
        "temporal_pos_embedding": "temporal",
        "height_pos_embedding": "height",
        "width_pos_embedding": "width",
    },
}
REQUIRED_ARGS = ("model", "pos_emb", "layers", "hid_dim", "frame_size", "clip_len", "vocab_size")


# ------------------------------------------------------------------------------------------------ reading


class RefusedPickle(pickle.UnpicklingError):
    """args.pickle asked for something an argparse.Namespace of plain values never needs."""


class ArgsUnpickler(pickle.Unpickler):
    """Unpickles an `argparse.Namespace` and plain values only: any other global (a class or a function that could
    run code, e.g. os.system in a crafted `__reduce__`) is refused before it is called."""

    ALLOWED: Mapping[tuple[str, str], Any] = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refusing to load {module}.{name}: the original release's {ARGS_FILE} holds only an "
                "argparse.Namespace of plain values"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"refusing persistent id {pid!r}: not part of an argparse.Namespace")


_PLAIN = (str, int, float, bool, complex, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple | set | frozenset):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _PLAIN) and _is_plain(v) for k, v in value.items())
    return False


def read_args(path: str | Path) -> dict[str, Any]:
    """The fields of the pickled argparse.Namespace at `path`, read with ArgsUnpickler (never runs code)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            args = ArgsUnpickler(f).load()
    except RefusedPickle as err:
        raise UsageError(f"{path} was refused: {err}; only convert checkpoints the original trainers wrote") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise UsageError(f"{path} is not a readable pickle of the original's arguments ({err})") from None
    if not isinstance(args, argparse.Namespace):
        raise UsageError(f"{path} holds a {type(args).__name__}, not the argparse.Namespace the original saves")
    fields = vars(args)
    odd = sorted(k for k, v in fields.items() if not _is_plain(v))
    if odd:
        raise UsageError(f"{path}: the arguments {', '.join(odd)} are not plain values; not an original args.pickle")
    return dict(fields)


def checkpoint_folder(path: str | Path) -> Path:
    """The folder holding classifier.pt + args.pickle: `path` itself or `path`/last (an original output folder)."""
    path = Path(path)
    folder = find_original_checkpoint(path)
    if folder is not None:
        return folder
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory; give the folder holding {CHECKPOINT_FILE} and {ARGS_FILE}")
    missing = [name for name in (CHECKPOINT_FILE, ARGS_FILE) if not (path / name).is_file()]
    raise UsageError(
        f"{path} lacks {' and '.join(missing)}: an original checkpoint folder (e.g. <output>/last or "
        f"<output>/epochN) holds both {CHECKPOINT_FILE} (the weights) and {ARGS_FILE} (the architecture)"
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in classifier.pt, read with torch.load(weights_only=True); a DDP `module.` prefix is removed."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UsageError(
            f"{path} is not a plain state dict of tensors (torch.load with weights_only=True refused it: "
            f"{str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UsageError(f"{path} cannot be read as a torch checkpoint ({err})") from None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------ configuration


def _arg(args: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = args.get(name, default)
    return default if value is None else value


def _refuse(option: str, value: Any, why: str) -> UsageError:
    return UsageError(f"cannot convert: the checkpoint was trained with {option} {value!r}, {why}")


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def original_config(args: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> VimpacConfig:
    """The VimpacConfig of the model the original built from `args` (its args.pickle) for the weights `state`.

    Raises UsageError naming the option when the original model cannot be expressed exactly."""
    missing = [name for name in REQUIRED_ARGS if args.get(name) is None]
    if missing:
        raise UsageError(f"the original arguments lack {', '.join(missing)}; is this an original {ARGS_FILE}?")
    model = str(args["model"])
    if not model.startswith(LAYOUT_PREFIX):
        raise _refuse("--model", model, f"which is not an '{LAYOUT_PREFIX}...' attention layout the original can train")
    try:
        blocks = parse_layout(model)
    except UsageError as err:
        raise _refuse("--model", model, f"which is not a layout: {err}") from None
    joint = [p for patterns in blocks for p in patterns if len(p) > 1]
    if joint:
        raise _refuse("--model", model, f"whose joint pattern(s) {', '.join(joint)} the original cannot build")
    pos = str(args["pos_emb"])
    if pos in ("pre_defined", "frozen"):
        raise _refuse("--pos-emb", pos, "which the original leaves unimplemented (NotImplementedError)")
    if pos not in POS_EMB:
        raise _refuse("--pos-emb", pos, f"which is not one of {', '.join(POS_EMB)}")
    pre_activation = bool(_arg(args, "pre_activation", False))
    if pre_activation and _arg(args, "halve_att", False):
        raise _refuse(
            "--pre-activation",
            True,
            "together with --halve-att: the original's pre-LN output projection maps D → D but the halved attention "
            "is D/2 wide, so the original could not run this model",
        )
    hidden = int(args["hid_dim"])
    frame = int(args["frame_size"])
    if frame % 8:
        raise _refuse("--frame-size", frame, "which is not a multiple of 8 (the DALL-E grid)")
    rows = _shape(state, "backbone.embedding.weight")
    vocab = int(args["vocab_size"])
    if rows is not None and rows[0] != vocab + 5:
        raise UsageError(
            f"the embedding has {rows[0]} rows but the original builds vocab_size + 5 = {vocab + 5} for "
            f"--vocab-size {vocab}; the weights do not belong to these arguments"
        )
    nce_layers = int(_arg(args, "nce_proj_layers", 2))
    nce_hidden = int(_arg(args, "nce_proj_hid_dim", 4096))
    nce_dim = ORIGINAL_NCE_DIM
    projection = any(k.startswith("cls_head.") for k in state)
    if projection:
        linears = sorted(int(m[1]) for k in state if (m := re.fullmatch(r"cls_head\.mlp\.linear_(\d+)\.weight", k)))
        if linears != list(range(len(linears))) or not linears:
            raise UsageError(f"the projection head's layers are {linears}; expected linear_0 .. linear_N")
        if len(linears) != nce_layers:
            raise UsageError(
                f"{ARGS_FILE} says --nce-proj-layers {nce_layers} but the projection head has {len(linears)} layers"
            )
        nce_dim = state[f"cls_head.mlp.linear_{nce_layers - 1}.weight"].shape[0]
        if nce_layers > 1:
            nce_hidden = state["cls_head.mlp.linear_0.weight"].shape[0]
    try:
        config = VimpacConfig(
            vocab_size=vocab,
            special_ids="original",
            hidden_size=hidden,
            layers=int(args["layers"]),
            heads=hidden // 64,
            layout=model,
            pos_emb=POS_EMB[pos],
            halve_att=bool(_arg(args, "halve_att", False)),
            halve_mlp=bool(_arg(args, "halve_mlp", False)),
            pre_ln=pre_activation,
            pre_ln_original=pre_activation,
            dropout=float(_arg(args, "dropout", 0.1)),
            clip_len=int(args["clip_len"]),
            grid=(frame // 8, frame // 8),
            nce_proj_layers=nce_layers,
            nce_proj_hid_dim=nce_hidden,
            nce_dim=nce_dim,
            # Only where the head is kept: a model without it (fine-tuned, or dropped) has no use for the option.
            nce_bn_after_proj=projection and bool(_arg(args, "nce_bn_after_proj", False)),
        )
    except UsageError as err:
        raise UsageError(f"the original model (--model {model} --hid-dim {hidden}) cannot be built: {err}") from None
    return config


# ------------------------------------------------------------------------------------------------ weights


def _take(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return state.pop(key)
    except KeyError:
        raise UsageError(f"the checkpoint lacks {key}, which the original model of its {ARGS_FILE} has") from None


def _pop_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}


def convert_backbone(state: dict[str, torch.Tensor], config: VimpacConfig) -> dict[str, torch.Tensor]:
    """Pop every `backbone.*` tensor of an original state dict and return vimpac's `backbone.*` tensors.

    Post-LN (the default): input `ln_pre`, per block `output.dense` / `output.LayerNorm`. The original's pre-LN
    (`config.pre_ln_original`): final `ln_post` instead of `ln_pre`, per block `dense` / `LayerNorm`."""
    out = {
        "backbone.cls": _take(state, "backbone.cls_param"),
        "backbone.token_embedding.weight": _take(state, "backbone.embedding.weight"),
    }
    pre_ln = config.pre_ln_original
    outer = ("final_norm", "ln_post") if pre_ln else ("input_norm", "ln_pre")
    for kind in ("weight", "bias"):
        out[f"backbone.{outer[0]}.{kind}"] = _take(state, f"backbone.{outer[1]}.{kind}")
    output = "" if pre_ln else "output."
    for theirs, ours in POS_TABLES[config.pos_emb].items():
        out[f"backbone.positional_embedding.{ours}"] = _take(state, f"backbone.positional_embedding.{theirs}")
    for i in range(config.layers):
        src, dst = f"backbone.transformer.resblocks.{i}.", f"backbone.layers.{i}."
        for j, patterns in enumerate(config.blocks):
            block = f"{src}attention_blocks.{j}."
            for kind in ("weight", "bias"):
                pieces = [
                    _take(state, f"{block}attentions.{k}.attention.{name}.{kind}")
                    for name in ("query", "key", "value")
                    for k in range(len(patterns))
                ]
                out[f"{dst}attention.{j}.qkv.{kind}"] = torch.cat(pieces, dim=0)
                out[f"{dst}attention.{j}.out.{kind}"] = _take(state, f"{block}{output}dense.{kind}")
                out[f"{dst}attention.{j}.norm.{kind}"] = _take(state, f"{block}{output}LayerNorm.{kind}")
        for kind in ("weight", "bias"):
            out[f"{dst}mlp.fc.{kind}"] = _take(state, f"{src}mlp.c_fc.{kind}")
            out[f"{dst}mlp.proj.{kind}"] = _take(state, f"{src}mlp.c_proj.{kind}")
            out[f"{dst}mlp.norm.{kind}"] = _take(state, f"{src}ln.{kind}")
    return out


def convert_mlm_head(state: dict[str, torch.Tensor], embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pop `mlm_head.*` (BertLMPredictionHead: transform.0 Linear, transform.2 LayerNorm, decoder tied to the
    embedding, bias shared with the decoder) and return vimpac's MLMHead tensors."""
    head = _pop_prefix(state, "mlm_head.")
    decoder = head.pop("decoder.weight", None)
    if decoder is not None and not torch.equal(decoder, embedding):
        raise UsageError("the MLM decoder is not tied to the token embedding, as the original ties it; cannot convert")
    bias = head.pop("bias", None)
    decoder_bias = head.pop("decoder.bias", None)
    if bias is None:
        bias = decoder_bias
    elif decoder_bias is not None and not torch.equal(bias, decoder_bias):
        raise UsageError("mlm_head.bias and mlm_head.decoder.bias differ; the original shares one tensor")
    if bias is None:
        raise UsageError("the checkpoint lacks mlm_head.bias")
    out = {"mlm_head.bias": bias}
    for theirs, ours in (("transform.0", "dense"), ("transform.2", "norm")):
        for kind in ("weight", "bias"):
            key = f"{theirs}.{kind}"
            if key not in head:
                raise UsageError(f"the checkpoint lacks mlm_head.{key}")
            out[f"mlm_head.{ours}.{kind}"] = head.pop(key)
    state.update({f"mlm_head.{k}": v for k, v in head.items()})  # left over: reported as unused
    return out


_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def convert_projection_head(state: dict[str, torch.Tensor], config: VimpacConfig) -> dict[str, torch.Tensor]:
    """Pop `cls_head.mlp.*` (linear_i, bn_i, act_i per hidden layer, then linear_N without bias and, with
    --nce-bn-after-proj, bn_N) and return vimpac's `nce_head.net.*` (Linear, BatchNorm, ReLU per hidden layer at
    3i, 3i+1, 3i+2; the last Linear at 3N, its BatchNorm at 3N+1)."""
    out = {}
    last = config.nce_proj_layers - 1
    for i in range(config.nce_proj_layers):
        out[f"nce_head.net.{3 * i}.weight"] = _take(state, f"cls_head.mlp.linear_{i}.weight")
        if i < last:
            out[f"nce_head.net.{3 * i}.bias"] = _take(state, f"cls_head.mlp.linear_{i}.bias")
        if i < last or config.nce_bn_after_proj:
            for name in _BN_FIELDS:
                out[f"nce_head.net.{3 * i + 1}.{name}"] = _take(state, f"cls_head.mlp.bn_{i}.{name}")
    return out


@dataclass
class ConvertedCheckpoint:
    """An original checkpoint in vimpac's terms: what `export` writes and `vimpac.load_model` builds."""

    kind: str  # "pretrain" or "finetune"
    config: VimpacConfig
    state: dict[str, torch.Tensor]
    args: dict[str, Any]
    source: Path
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def heads(self) -> list[str]:
        """The heads present besides the backbone: mlm_head, nce_head or classifier."""
        return sorted({k.split(".", 1)[0] for k in self.state} - {"backbone"})


def _model_for(converted: ConvertedCheckpoint) -> torch.nn.Module:
    from vimpac.modeling import VimpacForClassification, VimpacForPretraining

    with torch.device("meta"):
        if converted.kind == "finetune":
            return VimpacForClassification(converted.config, converted.num_classes or 1)
        heads = converted.heads
        return VimpacForPretraining(converted.config, mlm="mlm_head" in heads, nce="nce_head" in heads)


def _check_against_model(converted: ConvertedCheckpoint) -> None:
    """Every tensor of the vimpac model present with its shape and dtype class, nothing else."""
    expected = _model_for(converted).state_dict()
    missing = sorted(set(expected) - set(converted.state))
    extra = sorted(set(converted.state) - set(expected))
    wrong = [
        f"{k}: {tuple(converted.state[k].shape)} {converted.state[k].dtype} vs {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in converted.state
        and (
            tuple(converted.state[k].shape) != tuple(v.shape)
            or converted.state[k].is_floating_point() != v.is_floating_point()
        )
    ]
    if missing or extra or wrong:
        details = []
        if wrong:
            listed = "; ".join(wrong[:6])
            details.append(f"shapes or dtypes differ (checkpoint vs the model of its arguments): {listed}")
        if missing:
            details.append(f"missing {missing[:6]}")
        if extra:
            details.append(f"unexpected {extra[:6]}")
        raise UsageError(
            f"the weights do not fit the model of {ARGS_FILE} "
            f"({converted.config.layout}, D={converted.config.hidden_size}, shape {converted.config.shape}): "
            + "; ".join(details)
        )


def _check_pretraining_heads(args: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """UsageError when a head whose loss weight is positive in `args` is absent from a checkpoint without a
    classifier: a truncated file, or a fine-tuning checkpoint that lost its cls_fc."""
    absent = [
        f"{prefix}* (--{flag.replace('_', '-')} {_arg(args, flag, 1.0)})"
        for prefix, flag in (("mlm_head.", "mlm_weight"), ("cls_head.", "nce_weight"))
        if float(_arg(args, flag, 1.0)) > 0 and not any(k.startswith(prefix) for k in state)
    ]
    if absent:
        raise UsageError(
            f"the checkpoint has no classifier (cls_fc) and lacks {' and '.join(absent)}, though {ARGS_FILE} trains "
            "that head: is classifier.pt truncated, or a fine-tuning checkpoint without its classifier?"
        )


def convert_state(
    state: Mapping[str, torch.Tensor],
    args: Mapping[str, Any],
    source: str | Path = "",
    drop_projection_head: bool = False,
) -> ConvertedCheckpoint:
    """An original state dict + its arguments → ConvertedCheckpoint (UsageError on anything that does not fit)."""
    state = dict(state)
    finetune = "cls_fc.weight" in state
    pretrain_heads = any(k.startswith(("mlm_head.", "cls_head.")) for k in state)
    if finetune and pretrain_heads:
        raise UsageError("the checkpoint holds both a fine-tuning classifier (cls_fc) and pre-training heads")
    if not any(k.startswith("backbone.") for k in state):
        raise UsageError(f"the checkpoint holds no backbone.* tensors (keys: {sorted(state)[:5]} ...)")
    notes = []
    has_projection = any(k.startswith("cls_head.") for k in state)
    if not finetune:
        _check_pretraining_heads(args, state)
    if has_projection and drop_projection_head:
        _pop_prefix(state, "cls_head.")
        has_projection = False
        notes.append("the projection head (cls_head) was dropped (--drop-projection-head)")
    config = original_config(args, state)
    embedding = state.get("backbone.embedding.weight")
    out = convert_backbone(state, config)
    num_classes = None
    if finetune:
        weight, bias = _take(state, "cls_fc.weight"), _take(state, "cls_fc.bias")
        out["classifier.fc.weight"], out["classifier.fc.bias"] = weight, bias
        num_classes = int(weight.shape[0])
    if any(k.startswith("mlm_head.") for k in state):
        out.update(convert_mlm_head(state, embedding))
    if has_projection:
        out.update(convert_projection_head(state, config))
    if state:
        raise UsageError(
            f"the checkpoint holds tensors the original model of its {ARGS_FILE} does not have (an option this "
            f"converter does not know?): {sorted(state)[:8]}"
        )
    converted = ConvertedCheckpoint(
        kind="finetune" if finetune else "pretrain",
        config=config,
        state={k: v.detach().to(torch.float32) if v.is_floating_point() else v.detach() for k, v in out.items()},
        args=dict(args),
        source=Path(source),
        num_classes=num_classes,
        notes=notes,
    )
    _check_against_model(converted)
    return converted


def convert_checkpoint(path: str | Path, drop_projection_head: bool = False) -> ConvertedCheckpoint:
    """Read an original checkpoint folder (`path` or `path`/last) and convert it (UsageError when it cannot)."""
    folder = checkpoint_folder(path)
    args = read_args(folder / ARGS_FILE)
    state = read_weights(folder / CHECKPOINT_FILE)
    return convert_state(state, args, folder, drop_projection_head=drop_projection_head)


def export(converted: ConvertedCheckpoint, out: str | Path, overwrite: bool = False) -> Path:
    """Write `out`/config.json + model.safetensors (the format of a vimpac run's export/, which `finetune.py
    --load`, `vimpac.load_model` and the other commands read) and `out`/original_args.json (the original
    arguments, for the record). Each file is replaced atomically. Returns `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if (out / "model.safetensors").exists() and not overwrite:
        raise UsageError(f"{out} already holds model.safetensors; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in converted.state.items()}
    # Tied tensors: the original shares one embedding between backbone and decoder; vimpac stores it once anyway.
    metadata = {
        "format": "pt",
        "producer": PRODUCER,
        "original_kind": converted.kind,
        "original_checkpoint": str(converted.source),
    }
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_text_atomic(out / "config.json", converted.config.to_json() + "\n")
    record = {"source": str(converted.source), "kind": converted.kind, "args": converted.args}
    write_text_atomic(out / ORIGINAL_ARGS_FILE, json.dumps(record, indent=2, sort_keys=True, default=repr) + "\n")
    return out
