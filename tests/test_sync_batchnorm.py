"""DistributedBatchNorm1d on one process: equal to torch's BatchNorm1d, and usable under 16-bit engines."""

import copy

import torch

from vimpac.sync_batchnorm import DistributedBatchNorm1d


def pair(channels: int = 5) -> tuple[DistributedBatchNorm1d, torch.nn.BatchNorm1d]:
    torch.manual_seed(0)
    ours, reference = DistributedBatchNorm1d(channels), torch.nn.BatchNorm1d(channels)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def test_single_process_equals_batchnorm():
    ours, reference = pair()
    for _ in range(3):  # running statistics over several steps
        x = torch.randn(7, 5, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        torch.testing.assert_close(ours(x), reference(x_ref), rtol=1e-5, atol=1e-5)
        ours(x).pow(3).sum().backward()
        reference(x_ref).pow(3).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    ours.eval()
    reference.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), reference(x))


def test_bf16_parameters_with_fp32_running_stats():
    """DeepSpeed's bf16 engine casts parameters, not buffers: the layer must run (torch's BatchNorm1d raises)."""
    ours, reference = pair()
    ours.weight.data = ours.weight.data.bfloat16()
    ours.bias.data = ours.bias.data.bfloat16()
    x = torch.randn(16, 5)
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference(x), rtol=0.05, atol=0.05)


def test_features_far_from_zero_relative_to_their_spread():
    """A nearly collapsed batch (mean 300, spread 0.01): E[x²] − mean² would cancel to garbage in fp32."""
    ours, reference = pair()
    x = 300 + 0.01 * torch.randn(16, 5)
    exact = copy.deepcopy(reference).double()(x.double())
    torch_error = (reference(x).double() - exact).abs().max()  # torch's own fp32 BatchNorm1d: the bar
    assert (ours(x).double() - exact).abs().max() <= 2 * torch_error + 1e-4
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-2, atol=0)
