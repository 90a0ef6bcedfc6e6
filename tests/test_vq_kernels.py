"""argmax_scores / nearest_code (PyTorch reference + dispatch) against fp64 brute force."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vimpac import kernels
from vimpac.kernels.vq_reference import argmax_scores_reference, nearest_code_reference


def brute_scores(x, weight, bias=None):
    """The full [N, K] score matrix in fp64 (inputs' exact values)."""
    s = x.double() @ weight.double().T
    return s if bias is None else s + bias.double()


def assert_argmax_ok(x, weight, bias, idx, score, tol):
    """idx picks a maximal score (within tol of the true max), and equals the exact argmax where the top two
    scores are more than tol apart; the returned score is the chosen code's true score."""
    s = brute_scores(x, weight, bias)
    top2 = s.topk(2, dim=1).values if s.shape[1] > 1 else torch.cat([s, s - 1e9], 1)
    chosen = s.gather(1, idx[:, None]).squeeze(1)
    assert idx.dtype == torch.int64 and score.dtype == torch.float32
    assert torch.all(chosen >= top2[:, 0] - tol)
    clear = (top2[:, 0] - top2[:, 1]) > tol
    assert clear.float().mean() > 0.9  # the check below must cover most rows to mean something
    assert torch.equal(idx[clear], s.argmax(1)[clear])
    torch.testing.assert_close(score.double(), chosen, atol=tol, rtol=0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("n", "k", "d", "chunk"), [(257, 100, 16, 2**24), (1000, 37, 8, 333), (50, 513, 4, 100)])
def test_argmax_scores_matches_fp64(with_bias, n, k, d, chunk):
    g = torch.Generator().manual_seed(n + k)
    x, w = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    b = torch.randn(k, generator=g) if with_bias else None
    idx, score = argmax_scores_reference(x, w, b, chunk_elems=chunk)
    assert_argmax_ok(x, w, b, idx, score, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    g = torch.Generator().manual_seed(3)
    d = 256  # long enough that half-precision accumulation would lose the ranking
    x, w = torch.randn(300, d, generator=g).to(dtype), torch.randn(500, d, generator=g).to(dtype)
    b = torch.randn(500, generator=g).to(dtype)
    idx, score = argmax_scores_reference(x, w, b, chunk_elems=4096)
    # fp64 brute force on the same (rounded) values: fp32 accumulation is good to ~1e-4 here.
    assert_argmax_ok(x, w, b, idx, score, tol=1e-3)
    idx2, dist = nearest_code_reference(x, w, chunk_elems=4096)
    exact = ((x.double()[:, None] - w.double()[None]) ** 2).sum(-1)
    torch.testing.assert_close(dist.double(), exact.gather(1, idx2[:, None]).squeeze(1), rtol=1e-5, atol=1e-4)
    assert torch.all(exact.gather(1, idx2[:, None]).squeeze(1) <= exact.min(1).values + 1e-3)


def test_ties_pick_the_lowest_index_within_and_across_blocks():
    # Integer-valued inputs: every score is exact in fp32, so the ties below are real ties.
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    # row 0: codes 0, 2 tie (1); row 1: 1, 3 tie; row 2: 0..3 tie at 1, code 4 scores 1 too; row 3: 0..3 tie at 0.
    expected = torch.tensor([0, 1, 0, 0])
    for chunk in (2**24, 2, 1):  # one block; two columns per block (ties across blocks); one score per block
        idx, score = argmax_scores_reference(x, w, b, chunk_elems=chunk)
        assert torch.equal(idx, expected), chunk
        assert torch.equal(score, torch.tensor([1.0, 1.0, 1.0, 0.0]))
        assert torch.equal(idx, (x @ w.T + b).argmax(1))  # same convention as torch.argmax
    dup = torch.randn(6, 3).repeat(2, 1)  # rows 6..11 duplicate 0..5
    idx, dist = nearest_code_reference(dup[3:9] + 0.0, dup, chunk_elems=5)
    assert torch.equal(idx, torch.tensor([3, 4, 5, 0, 1, 2]))
    assert torch.equal(dist, torch.zeros(6))


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(1001, 8, generator=g), torch.randn(97, 8, generator=g), torch.randn(97, generator=g)
    ref_idx, ref_score = argmax_scores_reference(x, w, b)
    for chunk in (1, 96, 97, 98, 97 * 10 + 1, 50_000):
        idx, score = argmax_scores_reference(x, w, b, chunk_elems=chunk)
        assert torch.equal(idx, ref_idx), chunk
        torch.testing.assert_close(score, ref_score, rtol=1e-6, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [64, 2000])
def test_no_intermediate_exceeds_the_chunk_bound(chunk):
    n, k, d = 1000, 300, 4  # the full score matrix would be 300 000 elements
    x, codebook = torch.randn(n, d), torch.randn(k, d)
    with LargestTensor() as mode:
        nearest_code_reference(x, codebook, chunk_elems=chunk)
    # Besides score blocks, only tensors the size of the inputs ([N, D], [K, D]) may exist.
    assert mode.largest <= max(chunk, n * d, k * d)
    with LargestTensor() as mode:
        nearest_code_reference(x, codebook, chunk_elems=n * k)
    assert mode.largest == n * k  # the probe does see the score block when it is allowed to be whole


def test_nearest_code_distance_is_exact_and_never_negative():
    g = torch.Generator().manual_seed(11)
    codebook = torch.randn(64, 16, generator=g)
    x = torch.randn(500, 16, generator=g)
    idx, dist = kernels.nearest_code(x, codebook)
    exact = ((x.double()[:, None] - codebook.double()[None]) ** 2).sum(-1)
    assert torch.equal(idx, exact.argmin(1))
    torch.testing.assert_close(dist.double(), exact.min(1).values, rtol=1e-5, atol=1e-6)
    # Far from the origin ‖x‖² − 2x·e + ‖e‖² cancels to within a few units in fp32 (it can even go negative);
    # the returned distance is recomputed from the chosen code. Score gaps between codes (~16) still exceed the
    # fp32 spacing (~1) here, so the search itself finds the right codes.
    far_codes, far_x = codebook + 1000.0, codebook[idx[:50]] + 1000.0 + 1e-3
    far_idx, far_dist = kernels.nearest_code(far_x, far_codes)
    assert torch.equal(far_idx, idx[:50])
    expected = ((far_x.double() - far_codes.double()[far_idx]) ** 2).sum(1)
    torch.testing.assert_close(far_dist.double(), expected, rtol=1e-3, atol=1e-9)
    assert torch.all(far_dist < 1e-3)


def test_dispatch_and_validation(monkeypatch):
    x, w = torch.randn(5, 3), torch.randn(4, 3)
    monkeypatch.setenv("VIMPAC_KERNELS", "reference")
    idx, _ = kernels.argmax_scores(x, w)
    assert torch.equal(idx, (x @ w.T).argmax(1))
    monkeypatch.setenv("VIMPAC_KERNELS", "triton")
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU tensors run on the interpreter (conftest, without CUDA)
        assert torch.equal(kernels.nearest_code(x, w)[0], ((x[:, None] - w[None]) ** 2).sum(-1).argmin(1))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.nearest_code(x, w)
    monkeypatch.setenv("VIMPAC_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="triton, reference"):
        kernels.argmax_scores(x, w)
    monkeypatch.delenv("VIMPAC_KERNELS")
    empty_idx, empty_dist = kernels.nearest_code(torch.empty(0, 3), w)
    assert empty_idx.shape == (0,) and empty_dist.shape == (0,) and empty_dist.dtype == torch.float32
    with pytest.raises(ValueError, match="feature sizes"):
        kernels.nearest_code(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="bias"):
        kernels.argmax_scores(x, w, torch.zeros(3))
