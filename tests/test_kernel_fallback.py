"""The first-call check of the default kernel dispatch (kernels/first_call.py), run on CPU under the interpreter.

CPU tensors are made to take the CUDA default path (Triton + first-call check) by adding "cpu" to the
dispatcher's Triton device types; the Triton entry points are then monkeypatched to fail or to lie.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import vimpac.kernels as kernels
from vimpac.kernels import KernelFallbackWarning, first_call, vq_triton
from vimpac.kernels import axial_attention_triton as attention_module
from vimpac.kernels.axial_attention_reference import axial_attention_reference
from vimpac.kernels.vq_reference import nearest_code_reference

SHAPE = (2, 3, 2, 4, 2, 16)  # [B, T, H, W, heads, d]: tiny, so the interpreter stays fast


@pytest.fixture(autouse=True)
def default_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv("VIMPAC_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    first_call.reset()
    yield
    first_call.reset()


def inputs(seed: int = 0) -> list[torch.Tensor]:
    """q, k, v [B, T, H, W, heads, d] (views of one fused leaf) and cls_q, cls_k, cls_v [B, heads, d]."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(*SHAPE[:4], 3, *SHAPE[4:], generator=gen).requires_grad_()
    cls = torch.randn(SHAPE[0], 3, *SHAPE[4:], generator=gen).requires_grad_()
    return [fused, cls]


def run(fn, axis: str = "W", seed: int = 0) -> list[torch.Tensor]:
    """out, cls_out and the gradients of both leaves under a fixed linear loss."""
    leaves = inputs(seed)
    out, cls_out = fn(*leaves[0].unbind(4), *leaves[1].unbind(1), axis)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    grads = torch.autograd.grad((out * weights).sum() + cls_out.sum(), leaves)
    return [out.detach(), cls_out.detach(), *grads]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float = 1e-5) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


def fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]


class _DoubleGrad(torch.autograd.Function):
    """Identity forward, gradient × 2: a kernel whose forward is right and backward wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def patched(monkeypatch, mode: str) -> list[int]:
    """Replace axial_attention_triton by a failing or lying wrapper; returns a call counter."""
    real = attention_module.axial_attention_triton
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if mode == "error":
            raise RuntimeError("simulated launch failure: no kernel image for this architecture")
        out, cls_out = real(*args, **kwargs)
        if mode == "wrong_forward":
            return out + 0.5, cls_out
        if mode == "wrong_backward":
            return _DoubleGrad.apply(out), cls_out
        if mode == "wrong_second_sample":  # a mistake in the per-sample program base, invisible with batch 1
            return torch.cat([out[:1], out[1:] + 0.5]), cls_out
        return out, cls_out

    monkeypatch.setattr(attention_module, "axial_attention_triton", fake)
    return calls


def reference(*args):
    return axial_attention_reference(*args)


@pytest.mark.parametrize("mode", ["error", "wrong_forward", "wrong_backward", "wrong_second_sample"])
def test_failing_kernel_falls_back_to_the_reference_with_one_warning(monkeypatch, mode):
    calls = patched(monkeypatch, mode)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = run(kernels.axial_attention)
        second = run(kernels.axial_attention, seed=1)  # same key: no second check, no second warning
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    for part in ("axial_attention", "float32", str(list(SHAPE)), "VIMPAC_KERNELS=reference", "axis W"):
        assert part in messages[0], (part, messages[0])
    if mode == "error":
        assert "simulated launch failure" in messages[0]
    else:
        assert ("backward" if mode == "wrong_backward" else "forward") in messages[0]
    assert calls[0] == 1, "only the check reaches the kernel; the calls themselves use the reference"
    # The fallback is the reference itself: same values and gradients (autograd through it).
    assert_close(first, run(reference))
    assert_close(second, run(reference, seed=1))


def test_the_verdict_is_per_shape_class(monkeypatch):
    patched(monkeypatch, "error")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(kernels.axial_attention, "W")
        run(kernels.axial_attention, "T")  # lines of 1 + T = 4 tokens: another key, checked (and failing) anew
    assert len(fallback_warnings(record)) == 2
    assert sorted(key[3] for key in first_call.results()) == ["T", "W"]


def test_correct_kernel_passes_and_keeps_using_triton(monkeypatch):
    calls = patched(monkeypatch, "correct")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        got = run(kernels.axial_attention)
        run(kernels.axial_attention, seed=1)
    assert calls[0] == 3, "one check, then every call on Triton"
    (result,) = first_call.results().values()
    assert result.ok and result.fwd_err < 1e-5 and result.bwd_err < 1e-5
    assert_close(got, run(reference))


def test_dropout_and_padding_are_checked_with_the_kernels_own_mask(monkeypatch):
    calls = patched(monkeypatch, "correct")
    leaves = inputs()
    pad = torch.zeros(SHAPE[:4], dtype=torch.bool)
    pad[0, 0, 0, 1] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        kernels.axial_attention(*leaves[0].unbind(4), *leaves[1].unbind(1), "T", pad, dropout_p=0.3)
    assert calls[0] == 2
    ((key, result),) = first_call.results().items()
    assert key[-3:] == (True, True, True) and result.ok, result.problem()  # PAD, dropout, backward


@pytest.mark.parametrize("mode", ["error", "wrong_forward"])
def test_forced_triton_neither_checks_nor_falls_back(monkeypatch, mode):
    monkeypatch.setenv("VIMPAC_KERNELS", "triton")
    calls = patched(monkeypatch, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        if mode == "error":
            with pytest.raises(RuntimeError, match="simulated launch failure"):
                run(kernels.axial_attention)
        else:
            got = run(kernels.axial_attention)
            torch.testing.assert_close(got[0], run(reference)[0] + 0.5, atol=1e-5, rtol=0)
    assert calls[0] == 1 and first_call.results() == {}


def test_concurrent_first_calls_check_once(monkeypatch):
    calls = patched(monkeypatch, "error")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=run, args=(kernels.axial_attention,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert calls[0] == 1 and len(fallback_warnings(record)) == 1


def test_check_runs_inside_no_grad_and_keeps_the_callers_mode(monkeypatch):
    patched(monkeypatch, "correct")
    leaves = inputs()
    with torch.no_grad():
        out, _ = kernels.axial_attention(*leaves[0].unbind(4), *leaves[1].unbind(1), "W")
    assert not out.requires_grad and first_call.results()
    assert next(iter(first_call.results().values())).ok


def test_an_evaluation_call_does_not_need_the_backward_tile(monkeypatch):
    # fp32, head dim 128, lines of 41 tokens: the forward tile fits the 163 KB assumed off CUDA, the backward's not
    gen = torch.Generator().manual_seed(0)
    fused, cls = torch.randn(1, 1, 1, 40, 3, 1, 128, generator=gen), torch.randn(1, 3, 1, 128, generator=gen)
    calls = patched(monkeypatch, "correct")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        with torch.no_grad():
            got = kernels.axial_attention(*fused.unbind(4), *cls.unbind(1), "W")
        assert calls[0] == 2, "checked (forward only), then run on Triton"
        ((key, result),) = first_call.results().items()
        assert key[-1] is False and result.ok and result.bwd_err is None
        assert_close(list(got), list(reference(*fused.unbind(4), *cls.unbind(1), "W")), atol=1e-4)
        fused.requires_grad_()  # a training call: its backward tile does not fit, so the reference, no warning
        kernels.axial_attention(*fused.unbind(4), *cls.unbind(1), "W")
    assert calls[0] == 2 and len(first_call.results()) == 1


# ---------------------------------------------------------------------------------------------------------------
# VQ


def vq_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(10, 16, generator=gen), torch.randn(40, 16, generator=gen)


@pytest.mark.parametrize("mode", ["error", "wrong"])
def test_vq_failing_kernel_falls_back(monkeypatch, mode):
    real = vq_triton.nearest_code_triton

    def fake(x, codebook):
        if mode == "error":
            raise RuntimeError("simulated compile error")
        idx, dist = real(x, codebook)
        return (idx + 1) % codebook.shape[0], dist

    monkeypatch.setattr(vq_triton, "nearest_code_triton", fake)
    x, codebook = vq_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = kernels.nearest_code(x, codebook)
        kernels.nearest_code(x, codebook)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "nearest_code" in messages[0] and "VIMPAC_KERNELS=reference" in messages[0]
    want = nearest_code_reference(x, codebook)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_vq_correct_kernel_passes():
    x, codebook = vq_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        idx, _ = kernels.nearest_code(x, codebook)
        idx_scores, _ = kernels.argmax_scores(x, codebook, -0.5 * codebook.pow(2).sum(1))
    assert torch.equal(idx, nearest_code_reference(x, codebook)[0])
    assert torch.equal(idx_scores, idx), "nearest code = argmax of x·e − ½‖e‖²"
    assert len(first_call.results()) == 2 and all(r.ok for r in first_call.results().values())


def test_compiled_calls_read_the_verdict_without_a_graph_break(monkeypatch):
    calls = patched(monkeypatch, "correct")
    leaves = [t.detach() for t in inputs()]

    def loss(fused, cls):
        out, cls_out = kernels.axial_attention(*fused.unbind(4), *cls.unbind(1), "W")
        return out.sum() + cls_out.sum()

    q = leaves[0].unbind(4)[0]
    first_call._verdicts[first_call.axial_key(q, "W", None, 0.0)] = False  # as a failed start-up check leaves it
    compiled = torch.compile(loss, backend="eager", fullgraph=True)  # fullgraph: a break would raise
    torch.testing.assert_close(compiled(*leaves), loss(*leaves), atol=1e-5, rtol=0)
    assert calls[0] == 0, "the failed verdict holds under tracing too"


def test_first_call_inside_activation_checkpointing(monkeypatch):
    # A non-reentrant checkpoint's saved-tensor hooks must not capture the check's own autograd graph.
    from torch.utils.checkpoint import checkpoint

    patched(monkeypatch, "correct")

    def attend(*args):
        return kernels.axial_attention(*args, "W")

    got = run(lambda *args: checkpoint(attend, *args[:-1], use_reentrant=False))
    assert next(iter(first_call.results().values())).ok
    assert_close(got, run(reference))


def test_a_callers_mistake_raises_and_leaves_the_kernel_in_use():
    x, codebook = vq_inputs()
    bias = -0.5 * codebook.pow(2).sum(1)
    with pytest.raises(ValueError, match="bias must be"):
        kernels.argmax_scores(x, codebook, bias[:-1])
    with pytest.raises(ValueError, match="feature sizes differ"):
        kernels.nearest_code(x[:, :8], codebook)
    assert first_call.results() == {}, "no verdict from a bad call"
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        kernels.argmax_scores(x, codebook, bias)
    assert all(r.ok for r in first_call.results().values())


def launch_int_arguments(monkeypatch, shape: tuple[int, ...], axis: str, backward: bool) -> list[int]:
    """The integer arguments of the forward (or backward) kernel launch for q [B, T, H, W, heads, d] with a PAD
    mask, the model's layout (q, k, v strided views of one fused tensor), recorded on meta tensors."""
    launches: list[tuple] = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)

    name = "_axial_bwd_kernel" if backward else "_axial_fwd_kernel"
    monkeypatch.setattr(attention_module, name, Recorder())
    fused = torch.empty(*shape[:4], 3, *shape[4:], device="meta")
    cls = torch.empty(shape[0], 3, *shape[4:], device="meta")
    pad = torch.empty(shape[:4], device="meta", dtype=torch.bool)
    seed = torch.empty((), device="meta", dtype=torch.int64)
    common = (*fused.unbind(4), *cls.unbind(1), axis, pad, 0.1, shape[5] ** -0.5, seed, None)
    if backward:
        attention_module._backward(
            *common, torch.empty(shape, device="meta"), torch.empty(cls[:, 0].shape, device="meta")
        )
    else:
        attention_module._forward(*common)
    monkeypatch.undo()
    return [a for a in launches[0] if isinstance(a, int) and not isinstance(a, bool)]


@pytest.mark.parametrize("axis", ["T", "H", "W"])
@pytest.mark.parametrize(
    "shape", [(8, 5, 16, 16, 12, 64), (4, 8, 32, 32, 16, 64), (3, 4, 7, 5, 1, 32), (1, 2, 1, 3, 3, 16)]
)
def test_the_check_launches_the_binary_of_the_real_call(monkeypatch, shape, axis):
    """Triton compiles a variant per integer argument that is 1 or divisible by 16: the check's slice must give
    every integer argument of the launch (lines per sample, extents, strides, heads) the real call's properties."""

    def spec(values):
        return [(v == 1, v % 16 == 0) for v in values]

    sliced = first_call.check_shape(shape, axis)
    assert sliced[0] <= 2 and sliced[4] <= 16 and sliced[1:4] == shape[1:4]
    for backward in (False, True):
        real = launch_int_arguments(monkeypatch, shape, axis, backward)
        check = launch_int_arguments(monkeypatch, sliced, axis, backward)
        assert len(real) == len(check) and spec(check) == spec(real), (backward, real, check)
