"""The FLOP formula behind tokens/s → MFU, checked against torch's FlopCounterMode on the real model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vimpac.config import VimpacConfig
from vimpac.flops import peak_flops, pretrain_forward_flops, pretrain_train_flops
from vimpac.modeling import VimpacForPretraining


@pytest.mark.parametrize(
    ("layout", "halve", "proj_layers"),
    [("T,H|W", False, 2), ("T,H|W", True, 3), ("T,H,W", False, 1), ("T,HW", True, 2), ("THW", False, 2)],
)
def test_forward_flops_equal_counted_matmuls(layout, halve, proj_layers):
    config = VimpacConfig(
        vocab_size=50, hidden_size=64, heads=2, layers=2, clip_len=3, grid=(4, 5), layout=layout,
        halve_att=halve, halve_mlp=halve, nce_proj_layers=proj_layers, nce_proj_hid_dim=32, dropout=0.0,
    )  # fmt: skip
    model = VimpacForPretraining(config).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, *config.shape), generator=generator)
    labels = torch.where(torch.rand(tokens.shape, generator=generator) < 0.2, tokens, -100)
    # The math backend runs attention as counted batched matmuls (the fused CPU kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, labels)
    predicted = int((labels != -100).sum())
    assert pretrain_forward_flops(config, 3, predicted) == counter.get_total_flops()
    assert pretrain_train_flops(config, 3, predicted) == 3 * counter.get_total_flops()


def test_heads_left_out():
    config = VimpacConfig(vocab_size=50, hidden_size=64, heads=2, layers=1, clip_len=2, grid=(2, 2))
    both = pretrain_forward_flops(config, 4, 10)
    assert pretrain_forward_flops(config, 4, 10, mlm=False) < both
    assert pretrain_forward_flops(config, 4, 10, nce=False) < both


def test_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == pytest.approx(156e12)
    assert peak_flops("cpu", "fp32") is None
