"""Merging a DeepSpeed json with the command line, batch arithmetic, and the shipped ds_configs/*.json."""

import json

import pytest

from tests.helpers import REPO
from vimpac.ds_config import load_json, merge_ds_config, precision_of, resolve_batch, uses_activation_checkpointing
from vimpac.errors import UsageError

CONFIGS = REPO / "ds_configs"


def test_resolve_batch():
    assert resolve_batch(8, 1024, 4) == (8, 32, 1024)
    assert resolve_batch(None, 64, 2) == (32, 1, 64)
    assert resolve_batch(2, 1024, 128) == (2, 4, 1024)
    with pytest.raises(UsageError, match=r"--batch-size 100 is not divisible by --bs-per-gpu 8 × 2 ranks = 16"):
        resolve_batch(8, 100, 2)
    with pytest.raises(UsageError, match="not divisible by the 3 ranks"):
        resolve_batch(None, 64, 3)
    with pytest.raises(UsageError, match=">= 1"):
        resolve_batch(0, 64, 1)


def test_command_line_wins_over_json_and_json_over_defaults():
    base = {
        "train_micro_batch_size_per_gpu": 4,
        "train_batch_size": 32,
        "gradient_accumulation_steps": 99,
        "optimizer": {"type": "Adam", "params": {"lr": 5e-4, "betas": [0.8, 0.9]}},
        "gradient_clipping": 2.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
    }
    merged = merge_ds_config(base, 2)
    assert merged["train_micro_batch_size_per_gpu"] == 4
    assert merged["gradient_accumulation_steps"] == 4 and merged["train_batch_size"] == 32
    params = merged["optimizer"]["params"]
    assert merged["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert params["lr"] == 5e-4 and params["betas"] == [0.8, 0.9]
    assert params["eps"] == 1e-8 and params["weight_decay"] == 0.05  # defaults fill what neither names
    assert merged["gradient_clipping"] == 2.0 and precision_of(merged) == "bf16"
    assert merged["zero_optimization"]["stage"] == 1

    merged = merge_ds_config(
        base, 2, bs_per_gpu=2, batch_size=64, lr=1e-3, beta2=0.98, epsilon=1e-6, weight_decay=0.1,
        clip_grad_norm=1.0, precision="fp16", zero_stage=3, grad_checkpoint=True,
    )  # fmt: skip
    params = merged["optimizer"]["params"]
    assert (merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"]) == (2, 16)
    assert params["lr"] == 1e-3 and params["betas"] == [0.8, 0.98]
    assert params["eps"] == 1e-6 and params["weight_decay"] == 0.1
    assert merged["gradient_clipping"] == 1.0 and precision_of(merged) == "fp16"
    assert merged["zero_optimization"]["stage"] == 3 and uses_activation_checkpointing(merged)
    assert base["optimizer"]["params"]["lr"] == 5e-4, "the json dict itself is not modified"


def test_a_json_that_states_its_batch_as_micro_times_accumulation():
    merged = merge_ds_config({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 1)
    assert (merged["train_batch_size"], merged["gradient_accumulation_steps"]) == (32, 4)
    merged = merge_ds_config({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 3)
    assert (merged["train_batch_size"], merged["gradient_accumulation_steps"]) == (96, 4)
    merged = merge_ds_config({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 1, batch_size=16)
    assert merged["gradient_accumulation_steps"] == 2  # --batch-size wins; the json's count was for its own batch


def test_empty_json_gives_the_papers_pretraining_settings():
    merged = merge_ds_config({}, 1)
    params = merged["optimizer"]["params"]
    assert params["betas"] == [0.9, 0.98] and params["weight_decay"] == 0.05
    assert merged["gradient_clipping"] == 1.0 and precision_of(merged) == "fp32"
    assert merged["zero_optimization"]["stage"] == 0 and not uses_activation_checkpointing(merged)
    assert merged["train_batch_size"] == 64 and merged["gradient_accumulation_steps"] == 1


def test_refusals(tmp_path):
    with pytest.raises(UsageError, match="'scheduler' section"):
        merge_ds_config({"scheduler": {"type": "WarmupLR"}}, 1)
    with pytest.raises(UsageError, match="AdamW"):
        merge_ds_config({"optimizer": {"type": "Lamb"}}, 1)
    with pytest.raises(UsageError, match="both fp16 and bf16"):
        merge_ds_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, 1)
    with pytest.raises(UsageError, match="ZeRO stage"):
        merge_ds_config({"zero_optimization": {"stage": 4}}, 1)
    with pytest.raises(UsageError, match="does not exist"):
        load_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UsageError, match="not valid json"):
        load_json(tmp_path / "bad.json")


def test_grad_checkpoint_flag_can_switch_the_json_off():
    base = {"activation_checkpointing": {}}
    assert uses_activation_checkpointing(merge_ds_config(base, 1))
    assert not uses_activation_checkpointing(merge_ds_config(base, 1, grad_checkpoint=False))


@pytest.mark.parametrize("name", ["small", "large", "large_frame256"])
def test_gpu_configs_match_the_paper(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    merged = merge_ds_config(config, 8)
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0, "fp16 with dynamic loss scaling"
    assert config["zero_optimization"]["stage"] == 2 and uses_activation_checkpointing(config)
    assert config["gradient_clipping"] == 1.0
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert params["betas"] == [0.9, 0.98] and params["weight_decay"] == 0.05
    assert merged["train_batch_size"] == 1024, "the paper's global batch of 1024 videos"
    assert "scheduler" not in config


def test_cpu_config():
    config = json.loads((CONFIGS / "cpu.json").read_text())
    assert precision_of(config) in ("fp32", "bf16")
    merged = merge_ds_config(config, 2)
    assert merged["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    merged = merge_ds_config(load_json(path), 2 if path.name.endswith("cpu.json") else 8)
    assert precision_of(merged) == ("bf16" if path.stem.endswith("_bf16") else precision_of(load_json(path)))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*_bf16.json")), ids=lambda p: p.name)
def test_bf16_variants_differ_from_their_fp16_config_only_in_precision(path):
    config, sibling = load_json(path), load_json(CONFIGS / path.name.replace("_bf16", ""))
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert merge_ds_config(config, 8)["bf16"]["enabled"] and not merge_ds_config(config, 8)["fp16"]["enabled"]
    assert sibling["fp16"]["enabled"] is True
    strip = {"fp16", "bf16"}
    assert {k: v for k, v in config.items() if k not in strip} == {k: v for k, v in sibling.items() if k not in strip}


def test_every_fp16_config_has_a_bf16_variant():
    fp16 = {p.stem for p in CONFIGS.glob("*.json") if load_json(p).get("fp16", {}).get("enabled")}
    assert fp16 and {f"{name}_bf16" for name in fp16} <= {p.stem for p in CONFIGS.glob("*_bf16.json")}


def test_optim_adam_and_sgd_are_the_originals_alternatives():
    base = json.loads((CONFIGS / "finetune_small.json").read_text())
    adamw = merge_ds_config(base, 8)
    assert adamw == merge_ds_config(base, 8, optimizer_kind="adamw") and adamw["optimizer"]["type"] == "AdamW"
    adam = merge_ds_config(base, 8, optimizer_kind="adam", beta1=0.8)
    assert adam["optimizer"]["type"] == "Adam" and adam["optimizer"]["params"]["adam_w_mode"] is False
    assert adam["optimizer"]["params"]["betas"] == [0.8, 0.999] and adam["optimizer"]["params"]["torch_adam"]
    sgd = merge_ds_config(base, 8, optimizer_kind="sgd", lr=0.1, weight_decay=1e-4)
    assert sgd["optimizer"] == {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}}
    assert sgd["zero_allow_untested_optimizer"] is True and "zero_allow_untested_optimizer" not in adamw
    with pytest.raises(UsageError, match="--optim"):
        merge_ds_config(base, 8, optimizer_kind="lamb")
