"""DeepSpeed configuration: read a `ds_configs/*.json`, apply the command line, validate, record (docs/design.md §10).

The json holds engine settings (precision and loss scaling, ZeRO stage, activation checkpointing, micro-batch);
the command line holds the experiment. Where both name a value the command line wins:

    flag                      json key
    --bs-per-gpu              train_micro_batch_size_per_gpu
    --batch-size              train_batch_size (global, per optimizer step)
    --lr --beta1 --beta2      optimizer.params.lr / betas
    --epsilon --weight-decay  optimizer.params.eps / weight_decay
    --clip-grad-norm          gradient_clipping
    --precision               fp16.enabled / bf16.enabled (neither: fp32)
    --zero-stage              zero_optimization.stage
    --grad-checkpoint         presence of the "activation_checkpointing" section (per transformer layer)

Values named by neither come from DEFAULTS (the paper's pre-training settings, docs/reference.md §5.6). Gradient
accumulation is always derived: global = micro × accumulation × world size, and a global batch that the micro-batches of
all ranks do not divide is refused. The optimizer is AdamW unless `optimizer=` (fine-tuning's --optim) asks for the
original release's alternatives: "adam" (torch.optim.Adam: weight decay as an L2 term in the gradient) or "sgd"
(torch.optim.SGD, momentum = β1, L2 weight decay; eps and β2 unused). `"torch_adam": true` (torch.optim.AdamW) is the
default because DeepSpeed's FusedAdam is JIT-compiled on first use (docs/design.md §11.2). The learning-rate schedule
belongs to the trainer (--lr-scheduler, --warm-up), so a json "scheduler" section is refused.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from vimpac.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "betas": (0.9, 0.98),
    "eps": 1e-8,
    "weight_decay": 0.05,
    "gradient_clipping": 1.0,
    "train_batch_size": 64,
}
ADAM_TYPES = ("adam", "adamw")
OPTIMIZERS = ("adamw", "adam", "sgd")
# Printing from inside the engine would interleave with our own logging; the trainer logs every step itself.
QUIET_STEPS_PER_PRINT = 10**9


def load_json(path: str | Path) -> dict[str, Any]:
    """The json file as a dict; UsageError naming the file when it is missing or not a json object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config {path} does not exist; pass one of ds_configs/*.json") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"DeepSpeed config {path} is not valid json: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"DeepSpeed config {path} must hold a json object")
    return data


def resolve_batch(micro: int | None, global_batch: int | None, world_size: int) -> tuple[int, int, int]:
    """(micro-batch per rank, gradient accumulation, global batch) with global = micro × accumulation × world.

    micro None: the whole global batch in one micro-step per rank (accumulation 1)."""
    if global_batch is None or global_batch < 1:
        raise UsageError(f"the global batch (--batch-size / train_batch_size) must be >= 1; got {global_batch}")
    if micro is None:
        if global_batch % world_size:
            raise UsageError(f"--batch-size {global_batch} is not divisible by the {world_size} ranks")
        return global_batch // world_size, 1, global_batch
    if micro < 1:
        raise UsageError(f"--bs-per-gpu must be >= 1; got {micro}")
    per_step = micro * world_size
    if global_batch % per_step:
        raise UsageError(
            f"--batch-size {global_batch} is not divisible by --bs-per-gpu {micro} × {world_size} ranks = {per_step}, "
            f"so no whole number of gradient-accumulation steps gives it; use a multiple of {per_step} (e.g. "
            f"{max(per_step, global_batch // per_step * per_step)}) or change --bs-per-gpu"
        )
    return micro, global_batch // per_step, global_batch


def precision_of(config: dict[str, Any]) -> str:
    """The precision named by the json's sections: "fp16", "bf16" or "fp32"."""
    fp16 = bool(config.get("fp16", {}).get("enabled", False))
    bf16 = bool(config.get("bf16", config.get("bfloat16", {})).get("enabled", False))
    if fp16 and bf16:
        raise UsageError("the DeepSpeed config enables both fp16 and bf16; enable one (or neither for fp32)")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _set_precision(config: dict[str, Any], precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    config.pop("bfloat16", None)
    for key in ("fp16", "bf16"):
        section = config.setdefault(key, {})
        section["enabled"] = precision == key


def merge_ds_config(
    base: dict[str, Any],
    world_size: int,
    *,
    bs_per_gpu: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    epsilon: float | None = None,
    weight_decay: float | None = None,
    clip_grad_norm: float | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    grad_checkpoint: bool | None = None,
    optimizer_kind: str = "adamw",
) -> dict[str, Any]:
    """The config DeepSpeed runs with: `base` (the json) overridden by every argument that is not None;
    `optimizer_kind` one of OPTIMIZERS (see the module docstring)."""
    if optimizer_kind not in OPTIMIZERS:
        raise UsageError(f"--optim must be one of {', '.join(OPTIMIZERS)}; got {optimizer_kind!r}")
    config = copy.deepcopy(base)
    if "scheduler" in config:
        raise UsageError(
            "the DeepSpeed config has a 'scheduler' section, but the learning-rate schedule is set on the command "
            "line (--lr-scheduler linear|cosine|constant, --warm-up); remove the section"
        )
    json_accumulation = config.pop("gradient_accumulation_steps", None)  # derived below from the global batch

    micro = bs_per_gpu if bs_per_gpu is not None else config.get("train_micro_batch_size_per_gpu")
    if batch_size is not None:
        global_batch = batch_size
    elif "train_batch_size" not in config and json_accumulation is not None and micro is not None:
        # a json that states its batch as micro-batch × accumulation: the global batch it means, on this world
        global_batch = int(micro) * int(json_accumulation) * world_size
    else:
        global_batch = config.get("train_batch_size", DEFAULTS["train_batch_size"])
    micro, accumulation, global_batch = resolve_batch(micro, global_batch, world_size)
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = global_batch

    optimizer = config.setdefault("optimizer", {"type": "AdamW"})
    if str(optimizer.get("type", "")).lower() not in ADAM_TYPES:
        raise UsageError(f"pre-training uses AdamW; the DeepSpeed config asks for {optimizer.get('type')!r}")
    optimizer["type"] = "AdamW"
    params = optimizer.setdefault("params", {})
    params.setdefault("torch_adam", True)
    params.pop("adam_w_mode", None)  # AdamW is decoupled decay by definition
    betas = list(params.get("betas", DEFAULTS["betas"]))
    if beta1 is not None:
        betas[0] = beta1
    if beta2 is not None:
        betas[1] = beta2
    params["betas"] = betas
    for key, value in (("lr", lr), ("eps", epsilon), ("weight_decay", weight_decay)):
        params[key] = value if value is not None else params.get(key, DEFAULTS[key])
    if not 0 < params["lr"] < math.inf:
        raise UsageError(f"--lr must be positive and finite; got {params['lr']}")
    if not 0 < params["eps"] < math.inf or not 0 <= params["weight_decay"] < math.inf:
        raise UsageError(
            f"--epsilon must be positive and --weight-decay >= 0, both finite; got {params['eps']} and "
            f"{params['weight_decay']}"
        )
    if not all(0 <= b < 1 for b in betas):
        raise UsageError(f"--beta1/--beta2 must lie in [0, 1); got {betas}")
    if optimizer_kind == "adam":
        optimizer["type"] = "Adam"
        params["adam_w_mode"] = False  # torch.optim.Adam: the decay is added to the gradient, as in the original
    elif optimizer_kind == "sgd":
        optimizer["type"] = "SGD"  # not one of DeepSpeed's own: it builds torch.optim.SGD from these params
        optimizer["params"] = {"lr": params["lr"], "momentum": betas[0], "weight_decay": params["weight_decay"]}
        config["zero_allow_untested_optimizer"] = True  # ZeRO partitions SGD's state like any torch optimizer

    if clip_grad_norm is not None:
        config["gradient_clipping"] = clip_grad_norm
    config.setdefault("gradient_clipping", DEFAULTS["gradient_clipping"])

    _set_precision(config, precision if precision is not None else precision_of(config))

    zero = config.setdefault("zero_optimization", {})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in (0, 1, 2, 3):
        raise UsageError(f"ZeRO stage must be 0, 1, 2 or 3; got {zero['stage']}")

    if grad_checkpoint is True:
        config.setdefault("activation_checkpointing", {})
    elif grad_checkpoint is False:
        config.pop("activation_checkpointing", None)

    config.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    return config


def uses_activation_checkpointing(config: dict[str, Any]) -> bool:
    """Per-layer activation checkpointing is on when the merged config has an "activation_checkpointing" section."""
    return "activation_checkpointing" in config
