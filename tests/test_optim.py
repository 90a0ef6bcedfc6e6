"""AdamW parameter groups (which parameters are decayed) and the learning-rate schedules."""

import math

import pytest
import torch

from vimpac.config import VimpacConfig
from vimpac.errors import UsageError
from vimpac.modeling import VimpacForPretraining
from vimpac.optim import build_scheduler, lr_multiplier, parameter_groups, warmup_steps


@pytest.fixture(scope="module")
def model():
    config = VimpacConfig(
        vocab_size=50, hidden_size=64, heads=2, layers=2, clip_len=3, grid=(2, 2), nce_proj_hid_dim=32
    )
    return VimpacForPretraining(config)


def test_groups_split_every_trainable_parameter_once(model):
    decay, keep = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    names = dict(model.named_parameters())
    assert sorted(decay["names"] + keep["names"]) == sorted(names)
    for group in (decay, keep):
        assert all(p is names[n] for p, n in zip(group["params"], group["names"], strict=True))


def test_decay_only_on_weight_matrices_and_the_token_embedding(model):
    decay, keep = parameter_groups(model, 0.05)
    expected_decay = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    expected_decay = {f"{name}.weight" for name in expected_decay} | {"backbone.token_embedding.weight"}
    assert set(decay["names"]) == expected_decay
    # What the original wrongly decayed (docs/reference.md §8.12) is excluded here.
    for name in ("backbone.cls", "backbone.positional_embedding.cls", "backbone.positional_embedding.temporal"):
        assert name in keep["names"]
    assert "mlm_head.norm.weight" in keep["names"] and "mlm_head.bias" in keep["names"]
    assert any(n.startswith("nce_head.") and n.endswith(".weight") for n in keep["names"])  # BatchNorm weight


def test_original_decay_groups_spare_only_biases_and_backbone_layernorm_weights(model):
    """--decay-groups original: the original's name rule (bias, ln_pre, ln, LayerNorm), so the positional tables,
    the CLS vector, the MLM head's LayerNorm weight and the projection head's BatchNorm weights are decayed."""
    decay, keep = parameter_groups(model, 0.05, "original")
    names = dict(model.named_parameters())
    assert sorted(decay["names"] + keep["names"]) == sorted(names)
    backbone_ln = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    backbone_ln = {n for n in backbone_ln if n.startswith("backbone.")}
    assert backbone_ln and set(keep["names"]) == {n for n in names if n.endswith("bias")} | backbone_ln
    for name in ("backbone.cls", "mlm_head.norm.weight", "nce_head.net.1.weight", "backbone.token_embedding.weight"):
        assert name in decay["names"]
    assert any(n.startswith("backbone.positional_embedding.") for n in decay["names"])
    structural_decay, _ = parameter_groups(model, 0.05)
    assert set(structural_decay["names"]) < set(decay["names"])
    with pytest.raises(UsageError, match="decay-groups"):
        parameter_groups(model, 0.05, "by-name")


def test_frozen_parameters_are_left_out(model):
    model.backbone.cls.requires_grad_(False)
    try:
        names = [n for g in parameter_groups(model, 0.1) for n in g["names"]]
        assert "backbone.cls" not in names
    finally:
        model.backbone.cls.requires_grad_(True)


def test_warmup_ratio_or_count():
    assert warmup_steps(0.05, 1000) == 50
    assert warmup_steps(0.1, 12) == 1
    assert warmup_steps(0, 10) == 0
    assert warmup_steps(30, 1000) == 30
    with pytest.raises(UsageError, match="whole number"):
        warmup_steps(2.5, 100)
    with pytest.raises(UsageError, match=">= 0"):
        warmup_steps(-1, 100)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_values(kind):
    warm, total = 10, 110
    for step in range(warm):
        assert lr_multiplier(kind, step, warm, total) == pytest.approx(step / warm)
    expected = {
        "linear": lambda s: (total - s) / (total - warm),
        "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))),
        "constant": lambda s: 1.0,
    }[kind]
    for step in (10, 35, 60, 109, 110):
        assert lr_multiplier(kind, step, warm, total) == pytest.approx(expected(step), abs=1e-12)
    assert lr_multiplier(kind, total + 5, warm, total) == pytest.approx(1.0 if kind == "constant" else 0.0, abs=1e-12)


def test_scheduler_drives_optimizer_and_checkpoints_only_its_counter():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2.0)
    scheduler = build_scheduler(optimizer, "linear", 2, 6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 1.0, 2.0, 1.5, 1.0, 0.5])
    state = scheduler.state_dict()
    assert state["last_epoch"] == 6 and state["lr_lambdas"] == [None]
    with pytest.raises(UsageError, match="linear, cosine, constant"):
        build_scheduler(optimizer, "step", 0, 1)
